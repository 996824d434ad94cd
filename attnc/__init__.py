"""attnc: a compiler for attention. Public API only; each name is imported on first use so that
`import attnc` (and the CLI) stay fast and pull in torch, Triton or TVM only when needed."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import AttncError, CacheError, CallError, CompileError, SpecError, TraceError
from .ir import Attention
from .ops import UNARY_FUNCTIONS as _UNARY_FUNCTIONS

if TYPE_CHECKING:  # what type checkers see of the names imported on first use below (py.typed ships)
    from .dsl.parser import parse, parse_file
    from .dsl.reference import reference
    from .dsl.trace import (
        Tensor, abs, causal, exp, exp2, floor, log, log2, maximum, minimum, rsqrt, sigmoid, softmax,
        sqrt, tanh, where,
    )
    from .dsl.flex import flex_spec
    from .explainer import explain
    from .merge import merge_states
    from .backends.triton.binaries import finish_compiles
    from . import distributed
    from .runtime.api import AttentionKernel, attention, compile, create_block_mask, flex_attention, load

from .version import __version__

_LAZY = {
    "parse": ("attnc.dsl.parser", "parse"),
    "parse_file": ("attnc.dsl.parser", "parse_file"),
    "reference": ("attnc.dsl.reference", "reference"),
    "attention": ("attnc.runtime.api", "attention"),
    "Tensor": ("attnc.dsl.trace", "Tensor"),
    "causal": ("attnc.dsl.trace", "causal"),
    "softmax": ("attnc.dsl.trace", "softmax"),
    "where": ("attnc.dsl.trace", "where"),
    **{fn: ("attnc.dsl.trace", fn) for fn in (*_UNARY_FUNCTIONS, "minimum", "maximum")},  # attnc.tanh, attnc.erf, ...
    "flex_attention": ("attnc.runtime.api", "flex_attention"),
    "create_block_mask": ("attnc.runtime.api", "create_block_mask"),
    "flex_spec": ("attnc.dsl.flex", "flex_spec"),
    "AuxRequest": ("attnc.dsl.flex", "AuxRequest"),
    "AuxOutput": ("attnc.dsl.flex", "AuxOutput"),
    "compile": ("attnc.runtime.api", "compile"),
    "load": ("attnc.runtime.api", "load"),
    "AttentionKernel": ("attnc.runtime.api", "AttentionKernel"),
    "merge_states": ("attnc.merge", "merge_states"),
    "distributed": ("attnc.distributed", None),
    "explain": ("attnc.explainer", "explain"),
    "check_errors": ("attnc.backends.device_errors", "check_errors"),
    "finish_compiles": ("attnc.backends.triton.binaries", "finish_compiles"),
}

__all__ = ["AttncError", "SpecError", "TraceError", "CallError", "CompileError", "CacheError", "Attention",
           "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = import_module(module) if attr is None else getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
