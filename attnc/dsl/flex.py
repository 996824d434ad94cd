"""FlexAttention's API on attnc: `score_mod` / `mask_mod` functions written for
`torch.nn.attention.flex_attention` are traced into the IR and run on attnc's kernels.

Semantics follow FlexAttention: tensors are BHSD; the `score` reaching score_mod is `qk * scale` (scale None
is 1/sqrt(D), the text language's default score); masks are top-left aligned (`q_idx >= kv_idx` is `i >= j`);
`return_lse` gives the natural-log row log-sum-exp. The index arguments of a mod are symbolic and behave
like 0-dim torch tensors; a tensor the mod captures (closure or global) and indexes, `bias[h, q_idx]`,
becomes an `input` named after its variable and is passed to the kernel at every call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from ..errors import CallError, Diagnostic, TraceError
from ..ir import (
    QK, Attention, Binary, Expr, IndexVar, Num, default_score, make_attention, print_expr, split_conjuncts,
)
from . import symbolic
from .check import check_attention
from .symbolic import Sym

_CAPTURE_HINT = (" that is not a variable it captures; a mod can index tensors it captures from its closure or "
                 "globals, not tensors it builds or reaches through attributes: bind the tensor to a variable first")


@dataclass(frozen=True)
class ModTrace:
    """A traced mod: its expression and the captured tensors it indexes, by variable name."""

    expr: Expr
    tensors: tuple[tuple[str, torch.Tensor], ...] = ()

    @cached_property
    def text(self) -> str:
        return print_expr(self.expr)


def _index_args() -> tuple[Sym, Sym, Sym, Sym]:
    return tuple(Sym(IndexVar(name), "int") for name in ("b", "h", "i", "j"))


def _trace_mod(fn: Callable, label: str, args: tuple, want: str, variables: dict | None = None) -> ModTrace:
    """Run `fn` on symbolic arguments; `want` is the kind it must return ('bool' for a mask, 'number').
    `variables`: what fn captures, when the caller has it already."""
    if variables is None:
        variables, _ = symbolic.captured_variables(fn)
    tracer = symbolic.Tracer(label, symbolic.capture_table(variables.items()), _CAPTURE_HINT)
    with symbolic.tracing(tracer):
        result = fn(*args)
    span = symbolic.function_span(fn)
    if isinstance(result, (Sym, bool, int, float)):
        expr, kind = symbolic.as_expr(result)
        if (kind == "bool") == (want == "bool"):
            return ModTrace(expr, tuple(tracer.used.items()))
    wanted = "a boolean (a comparison)" if want == "bool" else "a number (the new score)"
    got = getattr(result, "kind", type(result).__name__)
    raise TraceError(Diagnostic(f"{label} must return {wanted}, got {got}", span))


# ---------------------------------------------------------------- block masks


@dataclass(frozen=True, eq=False)
class BlockMask:
    """What `create_block_mask` records: the traced mask_mod and the sizes it was made for. No N^2 work is
    done: the kernels derive which tiles to skip from the mask's expression."""

    mask_mod: Callable
    B: int | None
    H: int | None
    Q_LEN: int
    KV_LEN: int
    trace: ModTrace = field(repr=False)

    @property
    def shape(self) -> tuple[int | None, int | None, int, int]:
        return self.B, self.H, self.Q_LEN, self.KV_LEN

    @cached_property
    def masks(self) -> tuple[Expr, ...]:
        """The mask as conjuncts; a constant `true` (torch's noop_mask) keeps every key."""
        return tuple(m for m in split_conjuncts(self.trace.expr) if m != Num(True, False))


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device=None,
                      **ignored) -> BlockMask:
    """FlexAttention's `create_block_mask`: traces `mask_mod(b, h, q_idx, kv_idx)` at once. `device` and
    FlexAttention's other options (BLOCK_SIZE, _compile) are accepted and have no effect."""
    for name, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CallError(f"{name}: expected a non-negative int, got {value!r}")
    return BlockMask(mask_mod, B, H, Q_LEN, KV_LEN, _trace_mod(mask_mod, "mask_mod", _index_args(), "bool"))


# ---------------------------------------------------------------- flex_attention

# score_mod -> {(scale, captured values): ModTrace}; weak, so mods made per call do not pile up.
_SCORE_TRACES: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
# (score text, mask text, q/k/v and input signature, return_lse, name, backend) -> (spec, kernel)
_KERNELS: dict[tuple, tuple[Attention, object]] = {}


def _base_score(scale) -> Expr:
    if scale is None:
        return default_score()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise CallError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return Binary("*", QK(), Num(float(scale), True))


def _score_trace(score_mod: Callable | None, scale) -> ModTrace:
    if score_mod is None:
        return ModTrace(_base_score(scale))
    variables, plain = symbolic.captured_variables(score_mod)
    key = (scale, symbolic.snapshot(variables)) if plain else None
    try:
        per_mod = _SCORE_TRACES.setdefault(score_mod, {})
    except TypeError:  # not weak-referenceable (a builtin): trace every call
        per_mod = {}
    trace = per_mod.get(key) if key is not None else None
    if trace is None:
        score = Sym(_base_score(scale), "float")
        trace = _trace_mod(score_mod, "score_mod", (score, *_index_args()), "number", variables)
        if key is not None:
            per_mod[key] = trace
    return trace


def _tensors(score: ModTrace, block_mask: BlockMask | None) -> dict[str, torch.Tensor]:
    tensors = dict(score.tensors)
    for name, t in block_mask.trace.tensors if block_mask is not None else ():
        if tensors.setdefault(name, t) is not t:
            raise CallError(f"score_mod and mask_mod capture different tensors named {name!r}; rename one of the "
                            f"variables (each captured tensor becomes an input named after its variable)")
    return tensors


def _check_block_mask(block_mask, query: torch.Tensor, key: torch.Tensor) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise CallError(f"block_mask: expected the result of attnc.create_block_mask, got "
                        f"{type(block_mask).__name__} (a torch BlockMask holds no traceable mask_mod)")
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if (block_mask.Q_LEN, block_mask.KV_LEN) != (q_len, kv_len):
        raise CallError(f"block_mask: was created for Q_LEN={block_mask.Q_LEN}, KV_LEN={block_mask.KV_LEN} but "
                        f"query has {q_len} positions and key {kv_len}; create the block mask for these lengths")
    for name, size, have in (("B", block_mask.B, batch), ("H", block_mask.H, heads)):
        if size not in (None, 1, have):
            raise CallError(f"block_mask: was created for {name}={size} but the query has {have}; pass "
                            f"{name}={have} or None to create_block_mask")


def _name(score_mod, mask_mod) -> str:
    """The spec's name: the mods' function names (lambdas have none), else `flex_attention`."""
    names = [getattr(fn, "__name__", "") for fn in (score_mod, mask_mod) if fn is not None]
    names = [n for n in names if n.isidentifier()]
    return "_".join(names) or "flex_attention"


def _variant(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse):
    """(cache key, score trace, tensors): all a call needs before the kernel is found. The key holds what the
    spec depends on (dtypes, head counts, head dims), so a hit builds no declarations."""
    try:
        signature = (query.dtype, key.dtype, value.dtype, query.dim(), key.dim(), value.dim(),
                     key.shape[1] != query.shape[1], value.shape[3] != query.shape[3], bool(enable_gqa))
    except (AttributeError, IndexError, TypeError):
        symbolic.qkv_decls(query, key, value, "BHSD", gqa_allowed=enable_gqa)  # raises the CallError
        raise
    _check_block_mask(block_mask, query, key)
    score = _score_trace(score_mod, scale)
    tensors = _tensors(score, block_mask)
    mask_text = block_mask.trace.text if block_mask is not None else ""
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    inputs = tuple((name, t.dtype, t.dim()) for name, t in tensors.items())
    cache_key = (score.text, mask_text, signature, inputs, bool(return_lse), _name(score_mod, mask_mod))
    return cache_key, score, tensors


def _build_spec(query, key, value, enable_gqa, score: ModTrace, block_mask, tensors, return_lse, name):
    decls = symbolic.qkv_decls(query, key, value, "BHSD", gqa_allowed=enable_gqa)
    masks = block_mask.masks if block_mask is not None else ()
    fallback = symbolic.function_span(block_mask.mask_mod) if block_mask is not None else None
    spec = make_attention(name, *decls, inputs=symbolic.input_decls([score.expr, *masks], tensors, fallback),
                          score=score.expr, masks=masks, returns_lse=bool(return_lse))
    check_attention(spec)
    return spec


def flex_spec(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
              return_lse=False) -> Attention:
    """The spec `flex_attention` runs for these arguments, without compiling it."""
    cache_key, score, tensors = _variant(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse)
    return _build_spec(query, key, value, enable_gqa, score, block_mask, tensors, return_lse, cache_key[-1])


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None):
    """FlexAttention's `flex_attention` on attnc kernels: out [B, H, M, DV], or (out, lse) with return_lse.

    kernel_options may hold "backend" (passed to attnc.compile); FlexAttention's tuning options (BLOCK_M, ...)
    are accepted and ignored, since attnc plans its own tiles.
    """
    cache_key, score, tensors = _variant(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse)
    backend = (kernel_options or {}).get("backend")
    entry = _KERNELS.get((cache_key, backend))
    if entry is None:
        from ..runtime.api import compile as compile_spec  # the backend loads only when first needed

        spec = _build_spec(query, key, value, enable_gqa, score, block_mask, tensors, return_lse, cache_key[-1])
        entry = _KERNELS[(cache_key, backend)] = (spec, compile_spec(spec, backend=backend))
    return entry[1](query, key, value, **tensors)
