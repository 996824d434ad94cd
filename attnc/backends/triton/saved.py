"""Triton kernels rebuilt from saved files, for the two places that keep Triton's output: attnc's binary cache
(binaries.py) and ahead-of-time artifacts (aot.py). Imports neither torch nor the runtime: AOT's compiler workers
import it."""
from __future__ import annotations

from pathlib import Path


def source_class(gluon: bool):
    """What Triton compiles a kernel from: Gluon's AST source for a Gluon kernel (imported only then), Triton's
    otherwise."""
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        return GluonASTSource
    from triton.compiler import ASTSource

    return ASTSource


def compiled_kernel(src, name: str, metadata: Path, binary: Path, triton_hash: str):
    """Triton's CompiledKernel rebuilt from a saved cubin and its metadata (the cubin loads on first launch)."""
    from triton.compiler import CompiledKernel

    return CompiledKernel(src, {f"{name}.json": str(metadata), f"{name}.cubin": str(binary)}, triton_hash)
