"""attnc: a compiler for attention. Public API only; each name is imported on first use so that
`import attnc` (and the CLI) stay fast and pull in torch, Triton or TVM only when needed."""
from __future__ import annotations

from importlib import import_module

from .errors import AttncError, CacheError, CallError, CompileError, SpecError, TraceError
from .ir import Attention

__version__ = "0.1.0"

_LAZY = {
    "parse": ("attnc.dsl.parser", "parse"),
    "parse_file": ("attnc.dsl.parser", "parse_file"),
    "reference": ("attnc.dsl.reference", "reference"),
    "attention": ("attnc.dsl.trace", "attention"),
    "Tensor": ("attnc.dsl.trace", "Tensor"),
    "causal": ("attnc.dsl.trace", "causal"),
    "softmax": ("attnc.dsl.trace", "softmax"),
    "where": ("attnc.dsl.trace", "where"),
    **{fn: ("attnc.dsl.trace", fn) for fn in
       ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "minimum", "maximum", "floor")},
    "flex_attention": ("attnc.dsl.flex", "flex_attention"),
    "create_block_mask": ("attnc.dsl.flex", "create_block_mask"),
    "AuxRequest": ("attnc.dsl.flex", "AuxRequest"),
    "AuxOutput": ("attnc.dsl.flex", "AuxOutput"),
    "compile": ("attnc.runtime.api", "compile"),
    "load": ("attnc.runtime.api", "load"),
    "merge_states": ("attnc.merge", "merge_states"),
}

__all__ = ["AttncError", "SpecError", "TraceError", "CallError", "CompileError", "CacheError", "Attention",
           "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
