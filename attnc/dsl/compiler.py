"""How the front-ends compile what they trace. The runtime sits above dsl/ and installs its `compile` here when it
is imported (attnc.runtime.api), so a decorated function or `flex_attention` runs kernels while dsl/ imports
nothing from the layers above it."""
from __future__ import annotations

from typing import Callable

from ..errors import CompileError

_compile: Callable | None = None


def install(compile_fn: Callable) -> None:
    global _compile
    _compile = compile_fn


def compile_spec(spec, backend):
    if _compile is None:
        raise CompileError("no compiler is installed: import attnc (or attnc.runtime.api) before calling a traced "
                           "attention")
    return _compile(spec, backend=backend)
