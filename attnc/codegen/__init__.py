"""Code generators, one package per backend (triton/, tvm/)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def source_fingerprint(package: Path) -> str:
    """SHA-256 over a code generator package's sources and templates: a kernel cache key part, so an edited
    code generator never loads what an older one built (as Inductor keys on its own code)."""
    digest = hashlib.sha256()
    for path in sorted(package.iterdir()):
        if path.suffix in (".py", ".j2"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
