"""A trimmed TVM runtime (~15 MB) for running AOT artifacts on a machine without TVM or a package registry:

    python -m attnc.backends.tvm.runtime_pack OUT [--python 3.12]

OUT/tvm_ffi/ is the tvm_ffi package for that Python (copied when it is this Python's, else unpacked from the
wheel pip downloads); OUT/tvm_runtime/ holds libtvm_runtime.so, libtvm_runtime_cuda.so and the CUDA runtime
they link. Put OUT on PYTHONPATH there: runtime.load_module finds tvm_runtime/ on sys.path.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .runtime import CUDART, RUNTIME_DIR, RUNTIME_LIBS

SKIP = ("__pycache__", "include", "src", "3rdparty")  # C++ headers and sources: not needed to run


def pack(out: Path, python: str) -> Path:
    import tvm
    import tvm_ffi

    out.mkdir(parents=True, exist_ok=True)
    libs = out / RUNTIME_DIR
    libs.mkdir(exist_ok=True)
    tvm_lib = Path(tvm.__file__).parent / "lib"
    for name in RUNTIME_LIBS:
        shutil.copy2(tvm_lib / name, libs / name)
    cudart = _find_cudart()
    if cudart is not None:
        shutil.copy2(cudart, libs / CUDART)
    ffi = out / "tvm_ffi"
    shutil.rmtree(ffi, ignore_errors=True)
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        shutil.copytree(Path(tvm_ffi.__file__).parent, ffi, ignore=_skip)
    else:
        _unpack_wheel(python, tvm_ffi.__version__, out)
    return out


def _skip(folder: str, names: list[str]) -> list[str]:
    """Headers, sources and caches are not needed to run."""
    return [n for n in names if n in SKIP]


def _unpack_wheel(python: str, version: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--platform", "manylinux_2_28_x86_64", "-d", tmp,
                        f"apache-tvm-ffi=={version}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith("tvm_ffi/") and not any(f"/{d}/" in m for d in SKIP)]
            z.extractall(out, members)


def _find_cudart() -> Path | None:
    for folder in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda-13.0/lib"):
        path = Path(folder) / CUDART
        if path.exists():
            return path.resolve()
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the Python version of the machine that runs the artifacts (default: this one)")
    args = ap.parse_args(argv)
    out = pack(args.out, args.python)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB); on the GPU machine: PYTHONPATH={out}:$PYTHONPATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
