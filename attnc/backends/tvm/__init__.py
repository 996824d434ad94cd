"""The TVM backend: attention plans lowered to TensorIR (kernel.py, emit.py) and built with LLVM for the host
CPU (host.py); backend.py builds (through the kernel cache) and launches through DLPack."""
from __future__ import annotations

from pathlib import Path

from .. import source_fingerprint


def codegen_fingerprint() -> str:
    """The cache key's codegen part: this package's lowering and build code (backends.source_fingerprint)."""
    return source_fingerprint(Path(__file__).parent)
