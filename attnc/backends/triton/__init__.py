"""Triton code generation: kernel templates (*.j2) with named hooks, filled by the expression emitter."""
from __future__ import annotations

from pathlib import Path

from .. import source_fingerprint


def codegen_fingerprint() -> str:
    """The cache key's codegen part: this package's templates and generators (backends.source_fingerprint)."""
    return source_fingerprint(Path(__file__).parent)
