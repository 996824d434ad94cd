"""Code generators, launchers and AOT builders, one package per backend (triton/, tvm/); peers that import
nothing from each other or from the runtime above them.

`get_backend(name)` is the registry: names map to the classes by import path, so a backend's compiler
(Triton, TVM) is imported on its first use and nothing here imports a backend module at import time.
"""
from __future__ import annotations

import contextvars
import hashlib
from contextlib import contextmanager
from functools import lru_cache
from importlib import import_module
from pathlib import Path

from ..errors import CompileError

BUILTIN = {
    "triton": ("attnc.backends.triton.backend", "TritonBackend"),
    "tvm": ("attnc.backends.tvm.backend", "TvmBackend"),
}

# attnc modules that generated kernels render besides their own package: the operator table (each operator's
# Triton and TVM forms) and the index-data rules (how the serving kernels clamp and flag bad offsets and pages).
SHARED_SOURCES = ("ops.py", "index_data.py")

_instances: dict[str, object] = {}
_compiles_first = contextvars.ContextVar("attnc_compiles_first", default=False)


@contextmanager
def compiles_first(on: bool = True):
    """Within it (where `on`), launchers compile a kernel before its first launch instead of running their fallback
    while it compiles in the background: every call runs the kernel its plan names (a deterministic Kernel's)."""
    token = _compiles_first.set(_compiles_first.get() or on)
    try:
        yield
    finally:
        _compiles_first.reset(token)


def launches_compile_first() -> bool:
    return _compiles_first.get()


def get_backend(name: str):
    """The backend object registered as `name` (made once): `target(device) -> Target` and
    `build(plan) -> launcher` (attnc.runtime.kernel.Backend)."""
    backend = _instances.get(name)
    if backend is None:
        if name not in BUILTIN:
            raise CompileError(f"backend {name!r} is not available (known: {', '.join(sorted(BUILTIN))})")
        module, attr = BUILTIN[name]
        try:
            factory = getattr(import_module(module), attr)
        except ImportError as err:
            raise CompileError(f"backend {name!r} cannot be imported here ({err}); "
                               f"use backend='triton' with TRITON_INTERPRET=1 on CPU") from err
        backend = _instances[name] = factory()
    return backend


@lru_cache(maxsize=None)
def source_fingerprint(package: Path) -> str:
    """SHA-256 over a code generator package's sources and templates and the modules every generator renders
    (SHARED_SOURCES): a kernel cache key part, so an edited code generator never loads what an older one built (as
    Inductor keys on its own code). It reads files only, so a key is computed without importing a compiler."""
    digest = hashlib.sha256()
    shared = [Path(__file__).parent.parent / name for name in SHARED_SOURCES]
    for path in [*sorted(package.iterdir()), *shared]:
        if path.suffix in (".py", ".j2"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
