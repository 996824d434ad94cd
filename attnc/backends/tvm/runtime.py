"""TVM's runtime without its compiler: loading a built kernel library (from the kernel cache or an AOT folder) and
the version that keys the cache, neither of which imports `tvm`.

`import tvm` loads the whole compiler (Relax, TIR, the LLVM code generator: seconds); a library that is already
built needs only libtvm_runtime.so and the tvm_ffi package. The runtime libraries come from the installed `tvm`
package's lib folder (found without importing it), else from `ATTNC_TVM_RUNTIME` or a `tvm_runtime` folder on
sys.path (runtime_pack.py makes one for machines without TVM).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from ...errors import CompileError

RUNTIME_ENV = "ATTNC_TVM_RUNTIME"  # a folder holding libtvm_runtime.so (runtime_pack.py makes one)
RUNTIME_DIR = "tvm_runtime"  # ... or this folder under any sys.path entry
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
CUDART = "libcudart.so.13"  # what libtvm_runtime_cuda.so links (apache-tvm 0.27 wheels)
DISTRIBUTIONS = ("apache-tvm", "tvm")  # what the TVM package is installed as (a wheel, or a source build)


def ffi() -> ModuleType:
    """The tvm_ffi package (TVM's calling convention), imported without ml_dtypes where nothing has imported that
    yet. tvm_ffi imports ml_dtypes, if present, to map its numpy dtypes (bfloat16 and float8 arrays); ml_dtypes
    registers its numpy ufunc loops as it is imported, which took 0.9 s with numpy 2.4. attnc hands TVM torch
    tensors through DLPack, never numpy arrays, so it needs none of that. ml_dtypes stays importable afterwards;
    only tvm_ffi's numpy conversions of its dtypes are missing in this process."""
    if "tvm_ffi" in sys.modules or "ml_dtypes" in sys.modules:
        import tvm_ffi

        return tvm_ffi
    sys.modules["ml_dtypes"] = None  # type: ignore[assignment]  # `import ml_dtypes` raises ImportError meanwhile
    try:
        import tvm_ffi
    finally:
        if sys.modules.get("ml_dtypes", False) is None:
            del sys.modules["ml_dtypes"]
    return tvm_ffi


def load_module(library: Path, cuda: bool):
    """The runtime module in the shared library `library` (exported by TVM). Through `tvm` where it is imported
    already, else through tvm_ffi and the runtime libraries (with the CUDA runtime for `cuda` kernels)."""
    tvm = sys.modules.get("tvm")
    if tvm is not None:
        return tvm.runtime.load_module(str(library))
    tvm_ffi = ffi()
    _load_runtime(cuda)
    return tvm_ffi.load_module(str(library))


@lru_cache(maxsize=None)
def _load_runtime(cuda: bool) -> None:
    """Load the runtime libraries into the process, global, so that kernel libraries find the runtime's symbols
    (the thread pool, workspaces). A later `import tvm` loads the same files, so one copy is in use."""
    folder = runtime_folder()
    names = RUNTIME_LIBS[:1] + ((CUDART, RUNTIME_LIBS[1]) if cuda else ())
    for name in names:
        lib = folder / name
        if lib.exists() or name != CUDART:  # the CUDA runtime may come from the system instead
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def runtime_folder() -> Path:
    """The folder of libtvm_runtime.so: the installed tvm package's, else RUNTIME_ENV's, else a RUNTIME_DIR on
    sys.path."""
    candidates = []
    package = importlib.util.find_spec("tvm")  # finds the package without running its __init__
    if package is not None and package.submodule_search_locations:
        candidates += [Path(p) / "lib" for p in package.submodule_search_locations]
    if os.environ.get(RUNTIME_ENV):
        candidates.append(Path(os.environ[RUNTIME_ENV]))
    candidates += [Path(p) / RUNTIME_DIR for p in sys.path if p]
    for folder in candidates:
        if (folder / RUNTIME_LIBS[0]).exists():
            return folder
    raise CompileError(f"running a TVM kernel needs the TVM runtime: install apache-tvm, or point {RUNTIME_ENV} at "
                       f"a folder with {RUNTIME_LIBS[0]} (python -m attnc.backends.tvm.runtime_pack makes one)")


@lru_cache(maxsize=None)
def tvm_version() -> str:
    """The installed TVM's version, from its package metadata; from `tvm` itself for a build without metadata."""
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import tvm

    return tvm.__version__
