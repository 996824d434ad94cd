"""Triton code generation: kernel templates (*.j2) with named hooks, filled by the expression emitter."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def codegen_fingerprint() -> str:
    """SHA-256 over this package's templates and generators: a kernel cache key part, so an edited code
    generator never loads source that an older one wrote (as Inductor keys on its own code)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.iterdir()):
        if path.suffix in (".py", ".j2"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
