"""FlexAttention's API on attnc: `score_mod` / `mask_mod` functions written for
`torch.nn.attention.flex_attention` are traced into the IR and run on attnc's kernels.

Semantics follow FlexAttention: tensors are BHSD; the `score` reaching score_mod is `qk * scale` (scale None
is 1/sqrt(D), the text language's default score); masks are top-left aligned (`q_idx >= kv_idx` is `i >= j`);
`return_aux=AuxRequest(lse=True)` (torch 2.11's spelling) or `return_lse=True` gives the natural-log row
log-sum-exp. The index arguments of a mod are symbolic and behave like 0-dim torch tensors; a tensor the mod
captures (closure or global) and indexes, `bias[h, q_idx]`, becomes an `input` named after its variable and is
passed to the kernel at every call. A dim of it indexed by a bare b, h, q_idx or kv_idx has that role's size; any
other dim (`bias[q_idx - kv_idx + N - 1]`, `blocks[q_idx // 64]`) has its own size, the tensor's.

`block_mask` is attnc's (`attnc.create_block_mask`) or torch's own BlockMask, whose `mask_mod` is traced once
per BlockMask object: its block tables are not read, since the kernels derive which tiles to skip themselves.

A score_mod is traced once per scale and per snapshot of what it captures: each call re-reads its closure cells
and the globals it loads and compares them, by identity, with those it was traced with, so a changed scalar or
a tensor rebound to another object traces it again; a mod reading an arbitrary object (a dict, `self`) is
traced at every call. A mask_mod is traced once, by create_block_mask.

Latent attention (MLA; docs/mla.md): `flex_attention((q, q_pe), (ckv, k_pe), ckv, ...)`. Tuples of one length
for query and key make the score the sum of the pairs' dot products (the concatenated tensors' score; scale None
is 1/sqrt of the head dims' sum); the extra pairs become the spec's inputs qr, kr (qr2, kr2, ...) with head dims
DR (DR2, ...) bound from the tensors. A value that is key[0] itself makes the values the keys (`@ k`, read once);
key[0] may then be [B, N, D], without a head axis (one K/V head), or [B, 1, N, D] with enable_gqa=True.

`flex_attention(..., normalizer="sigmoid")` (an attnc extension; FlexAttention always normalises with softmax)
runs sigmoid attention with the same mods: weights sigmoid(score), rows not normalised, lse the log of each row's
total weight (ir.Normalizer); write a bias such as -log(N) in the score_mod.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, NamedTuple, NoReturn

import torch

from ..errors import CallError, Diagnostic, TraceError, checks_arguments
from ..ir import (
    DEFAULT_NORMALIZER, NORMALIZERS, QK, Attention, Binary, Call, Expr, IndexVar, Normalizer, Num, SizeRef,
    TensorDecl, default_score, expr_key, make_attention, split_conjuncts,
)
from . import compiler, symbolic
from .check import check_attention, number_problem, spec_name
from .signature import call_key, call_key_of_inputs
from .symbolic import Sym

_CAPTURE_HINT = (" that is not a variable it captures; a mod can index tensors it captures from its closure or "
                 "globals, not tensors it builds or reaches through attributes: bind the tensor to a variable first")


@dataclass(frozen=True, eq=False)
class ModTrace:
    """A traced mod: its expression and the captured tensors it indexes, by variable name."""

    expr: Expr
    tensors: tuple[tuple[str, torch.Tensor], ...] = ()

    @cached_property
    def key(self) -> str:
        """The expression's structure as a string (ir.expr_key), for the kernel cache's key."""
        return expr_key(self.expr)


def _index_args() -> tuple[Sym, Sym, Sym, Sym]:
    return tuple(Sym(IndexVar(name), "int") for name in ("b", "h", "i", "j"))


def _trace_mod(fn: Callable, label: str, args: tuple, want: str, captured: symbolic.Captures | None = None) -> ModTrace:
    """Run `fn` on symbolic arguments; `want` is the kind it must return ('bool' for a mask, 'number').
    `captured`: what fn captures, when the caller has walked it already."""
    if not callable(fn):
        raise CallError(f"{label}: expected a function, got {type(fn).__name__}")
    if captured is None:
        captured = symbolic.captures(fn)
    tracer = symbolic.Tracer(label, symbolic.capture_table(captured.variables), _CAPTURE_HINT)
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
    done: the kernels derive which tiles to skip from the mask's expression. The mask_mod is traced once, at
    creation: the Python values it captures are read then (FlexAttention also computes its block mask at
    creation); the tensors it indexes are passed by reference to every call, so writes into them are seen."""

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


@checks_arguments
def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device=None,
                      **ignored) -> BlockMask:
    """FlexAttention's `create_block_mask`: traces `mask_mod(b, h, q_idx, kv_idx)` at once. `device` and
    FlexAttention's other options (BLOCK_SIZE, _compile) are accepted and have no effect."""
    for name, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CallError(f"{name}: expected a non-negative int, got {value!r}")
    return BlockMask(mask_mod, B, H, Q_LEN, KV_LEN, _trace_mod(mask_mod, "mask_mod", _index_args(), "bool"))


# id(torch BlockMask) -> (a weak reference to it, the mask_mod traced, attnc's BlockMask); weak, as _SCORE_MODS.
_TORCH_BLOCK_MASKS: dict[int, tuple[weakref.ref, Callable, BlockMask]] = {}


def _forget_torch_mask(ref: weakref.ref, key: int) -> None:
    entry = _TORCH_BLOCK_MASKS.get(key)
    if entry is not None and entry[0] is ref:
        del _TORCH_BLOCK_MASKS[key]


def _from_torch(block_mask) -> BlockMask:
    """attnc's BlockMask for torch's: its mask_mod traced, once per object (and again if `mask_mod` is
    reassigned). Its sizes: `seq_lengths` (torch >= 2.6; `shape[-2:]` before) and the batch and head counts
    of its block tables (1 when created with None)."""
    entry = _TORCH_BLOCK_MASKS.get(id(block_mask))
    mask_mod = getattr(block_mask, "mask_mod", None)
    if entry is not None and entry[0]() is block_mask and entry[1] is mask_mod:
        return entry[2]
    if not (callable(mask_mod) and hasattr(block_mask, "shape") and hasattr(block_mask, "kv_num_blocks")):
        raise CallError(f"block_mask: expected the result of attnc.create_block_mask or of torch's "
                        f"create_block_mask, got {type(block_mask).__name__}")
    torch_flex = _torch_flex()
    if mask_mod is getattr(torch_flex, "_sliced_mask_mod_error", None):
        raise CallError("block_mask: a sliced torch BlockMask (block_mask[...]) keeps no mask_mod to trace; "
                        "create the block mask for the sizes you call with")
    if mask_mod is torch_flex.noop_mask and not bool(block_mask.to_dense().all()):
        # A mask held only in the block tables (BlockMask.from_kv_blocks without a mask_mod, or a slice on
        # torch < 2.13): tracing noop_mask would keep keys the tables drop.
        raise CallError("block_mask: this torch BlockMask drops blocks but its mask_mod is noop_mask, so the mask "
                        "lives only in its block tables, which attnc does not read; pass mask_mod to "
                        "create_block_mask (or from_kv_blocks) so that it says which keys are kept")
    q_len, kv_len = getattr(block_mask, "seq_lengths", None) or tuple(block_mask.shape[-2:])
    batch, heads = (tuple(block_mask.shape[:-2]) + (None, None))[:2]
    converted = create_block_mask(mask_mod, batch, heads, int(q_len), int(kv_len))
    try:
        ref = weakref.ref(block_mask, partial(_forget_torch_mask, key=id(block_mask)))
    except TypeError:  # not weak-referenceable: traced on every call
        return converted
    _TORCH_BLOCK_MASKS[id(block_mask)] = (ref, mask_mod, converted)
    return converted


def _torch_flex():
    """torch.nn.attention.flex_attention, the module (the package attribute of that name is the function)."""
    import importlib

    return importlib.import_module("torch.nn.attention.flex_attention")


# ---------------------------------------------------------------- auxiliary outputs

try:  # torch >= 2.11: return_aux takes torch's own types, and attnc returns them
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:
    class AuxRequest(NamedTuple):
        """Which auxiliary outputs flex_attention returns (torch 2.11's AuxRequest)."""

        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        """The auxiliary outputs flex_attention returns; a field not requested is None (torch 2.11's AuxOutput)."""

        lse: torch.Tensor | None = None
        max_scores: torch.Tensor | None = None


def _wants_lse(return_lse, return_aux) -> bool:
    """Whether the kernel must return lse, for FlexAttention's two spellings of the request."""
    if return_aux is None:
        return bool(return_lse)
    if return_lse:
        raise CallError("return_lse and return_aux: pass one of them (return_lse is torch's older spelling of "
                        "return_aux=AuxRequest(lse=True))")
    if not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise CallError(f"return_aux: expected an AuxRequest(lse=..., max_scores=...), got "
                        f"{type(return_aux).__name__}")
    if return_aux.max_scores:
        raise CallError("return_aux: max_scores is not computed by attnc's kernels; request lse only "
                        "(AuxRequest(lse=True))")
    return bool(return_aux.lse)


# ---------------------------------------------------------------- latent attention (MLA)


def dot_names(n: int) -> tuple[str, str, str]:
    """The spec's names for the extra dot product n (from 0): its query-side input, key-side input and head dim,
    qr, kr, DR; then qr2, kr2, DR2; ... (docs/mla.md's names; the decorator numbers head dims alike)."""
    suffix = "" if n == 0 else str(n + 1)
    return f"qr{suffix}", f"kr{suffix}", f"DR{suffix}"


@dataclass(frozen=True, eq=False)
class _Latent:
    """A call in the latent form (module doc): the extra dot products' (query-side, key-side) tensors, whether
    the values are the keys, and what the spec depends on beyond the plain call's signature."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    shares_kv: bool
    signature: tuple

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The kernel's arguments for the extra dot products, by name."""
        names = (dot_names(n) for n in range(len(self.pairs)))
        return {name: t for (query, key, _), pair in zip(names, self.pairs) for name, t in zip((query, key), pair)}


def _latent(query, key, value, enable_gqa) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Latent | None]:
    """(q, k, v, latent): the call's tensors and None for a plain call; for the latent form (query and key
    tuples, or a key without a head axis) their first tensors, v (k itself where the values are the keys) and
    the rest, checked here so that errors name the tuple's argument."""
    if not (isinstance(query, tuple) or isinstance(key, tuple) or getattr(key, "ndim", 4) == 3):
        return query, key, value, None
    if isinstance(query, tuple) != isinstance(key, tuple):
        which, other = ("query", "key") if isinstance(query, tuple) else ("key", "query")
        raise CallError(f"{which}: a tuple, but {other} is not: pass both as tuples of one length, (q, q_pe) and "
                        f"(k, k_pe), whose pairs' dot products the score sums, or both as tensors")
    queries, keys = (query, key) if isinstance(query, tuple) else ((query,), (key,))
    if not queries:
        raise CallError("query: an empty tuple; pass (q, q_pe, ...), the query tensor first")
    if len(queries) != len(keys):
        raise CallError(f"key: a tuple of {len(keys)} tensors, but query has {len(queries)}; each query-side tensor "
                        f"pairs with a key-side one (query[n] @ key[n])")
    for side, tensors in (("query", queries), ("key", keys)):
        for n, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                where = f"{side}[{n}]" if isinstance(query, tuple) else side
                raise CallError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    q, k = queries[0], keys[0]
    shares = value is k
    if k.dim() == 3 and not shares:
        raise CallError(f"value: key{'[0]' if isinstance(key, tuple) else ''} has no head axis ([B, N, D]: a "
                        f"latent cache, one K/V head), so the values are the keys: pass that very tensor as value")
    v = k if shares else value
    if not (q.dim() == 4 and k.dim() in (3, 4) and (shares or isinstance(v, torch.Tensor) and v.dim() == 4)):
        symbolic.qkv_decls(q, k, v, "BHSD", enable_gqa, headless_k=True)  # raises the CallError
    for n, (qr, kr) in enumerate(zip(queries[1:], keys[1:]), 1):
        for side, t, first in (("query", qr, q), ("key", kr, k)):
            if t.shape[:-1] != first.shape[:-1] or t.dtype != first.dtype:
                raise CallError(f"{side}[{n}]: expected {first.dtype} with {side}[0]'s shape but for its head dim, "
                                f"({', '.join(map(str, first.shape[:-1]))}, ·), got {t.dtype} {tuple(t.shape)}")
        if qr.shape[-1] != kr.shape[-1]:
            raise CallError(f"key[{n}]: head dim {kr.shape[-1]}, but query[{n}]'s is {qr.shape[-1]}: the two sides of "
                            f"a dot product share one head dim")
    heads = k.shape[1] != q.shape[1] if k.dim() == 4 else None  # None: no head axis
    signature = (q.dtype, k.dtype, v.dtype, heads, v.shape[-1] != q.shape[3], bool(enable_gqa), shares,
                 tuple([qr.shape[-1] for qr in queries[1:]]))  # the head dims, bound at compile time
    return q, k, v, _Latent(tuple(zip(queries[1:], keys[1:])), shares, signature)


# ---------------------------------------------------------------- flex_attention

# The per-call path, on a hit: q, k, v's call_key, one look-up (_CALLS), a few reads and identity checks of what
# the score_mod captures, then the kernel's prepared launch. Where a call misses it (no launch prepared yet, another
# shape, a changed capture): the q/k/v signature, the block mask's sizes, the traces' and kernels' look-ups.
# Walking and tracing happen only when something changed.

SNAPSHOTS_PER_MOD = 8  # captured-value snapshots whose traces a score_mod keeps (a tensor rebound per step, ...)
VARIANTS = 64  # (score trace, block mask) pairs whose merged inputs and names are kept
CALLS = 64  # call signatures (shapes, strides, ...) whose kernels are kept for a direct look-up
_NO_KEYWORDS: dict = {}


# What the score reaching score_mod is made from (_base_score): the scale, and the number of extra dot products.
_Base = tuple[float | int | None, int]


class _ScoreMod:
    """The traces of one score_mod (`mod`, weakly). `current` pairs what the mod read at the last call (a
    symbolic.Captures) with the traces (_Base -> ModTrace) made from those values; one attribute, so that
    threads never see the values of one snapshot with the traces of another. `seen` keeps earlier snapshots by
    Captures.key, so values that come back, or are rebound to equal ones, trace nothing."""

    __slots__ = ("mod", "current", "seen")

    def __init__(self, mod: weakref.ref | None = None):
        self.mod = mod
        self.current: tuple[symbolic.Captures, dict[_Base, ModTrace]] = (symbolic.Captures({}, None), {})
        self.seen: dict[tuple, tuple[symbolic.Captures, dict[_Base, ModTrace]]] = {}

    def trace(self, score_mod: Callable, base: _Base) -> tuple[ModTrace, symbolic.Captures | None]:
        """The trace for `base`, and the Captures it was made from (None where it is not kept)."""
        captured, traces = self.current
        if not captured.unchanged():
            captured, traces = self.current = self._snapshot(score_mod)
        trace = traces.get(base)
        if trace is None:
            score = Sym(_base_score(base), "float")
            trace = _trace_mod(score_mod, "score_mod", (score, *_index_args()), "number", captured)
            if not captured.unchanged():  # something was rebound while tracing: keep nothing
                return trace, None
            traces[base] = trace
        return trace, captured

    def _snapshot(self, score_mod: Callable) -> tuple[symbolic.Captures, dict[_Base, ModTrace]]:
        captured = symbolic.captures(score_mod)
        if captured.key is None:  # reads an arbitrary object: nothing is kept
            return captured, {}
        entry = self.seen.get(captured.key)
        if entry is None:
            if len(self.seen) >= SNAPSHOTS_PER_MOD:
                self.seen.pop(next(iter(self.seen)), None)  # the oldest snapshot
            entry = self.seen[captured.key] = (captured, {})  # its Captures holds the objects whose ids key it
        return captured, entry[1]


# id(score_mod) -> its traces. Weak: an entry goes with its function, so mods made per call do not pile up
# (keyed by id because a WeakKeyDictionary look-up makes a weak reference each time).
_SCORE_MODS: dict[int, _ScoreMod] = {}
_PLAIN_SCORES: dict[_Base, ModTrace] = {}  # the score without a score_mod


def _forget(ref: weakref.ref, key: int) -> None:
    state = _SCORE_MODS.get(key)
    if state is not None and state.mod is ref:
        del _SCORE_MODS[key]


def _score_trace(score_mod: Callable | None,
                 base: _Base) -> tuple[ModTrace, _ScoreMod | None, symbolic.Captures | None]:
    """The score's trace, with score_mod's state and the Captures the trace was made from, which tell whether
    a later call of the same mod may reuse it (None, None without a score_mod; Captures None where the trace is
    not kept)."""
    if score_mod is None:
        trace = _PLAIN_SCORES.get(base)
        if trace is None:
            trace = _PLAIN_SCORES[base] = ModTrace(_base_score(base))
        return trace, None, None
    state = _SCORE_MODS.get(id(score_mod))
    if state is None or state.mod() is not score_mod:
        try:
            state = _ScoreMod(weakref.ref(score_mod, partial(_forget, key=id(score_mod))))
        except TypeError:  # not weak-referenceable: traced on every call
            state = _ScoreMod()
        else:
            _SCORE_MODS[id(score_mod)] = state
    trace, captured = state.trace(score_mod, base)
    return trace, state, captured if state.mod is not None else None  # not weak-referenceable: not kept


@dataclass(frozen=True, eq=False)
class _Variant:
    """What every call with one score trace and one block mask shares: the captured tensors the kernel takes
    (merged, by variable name; `inputs` in that order), the spec's name, and the part of the kernel cache key
    they decide."""

    score: ModTrace
    block_mask: "BlockMask | None"
    tensors: dict[str, torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    names: tuple[str, ...]  # of the inputs
    name: str
    key: tuple


# torch.compile's Dynamo traces flex_attention and hashes every key of a cache it reads, frozen dataclasses field
# by field, as trees: an expression in a key costs time exponential in its sharing (`score = score + score`
# repeated). So keys hold ids, strings and small constants only.
# (id of the score trace, id of the block mask trace) -> _Variant, which holds both, so that no other object
# takes either id while the entry lives; oldest dropped first.
_VARIANTS: dict[tuple[int, int], _Variant] = {}
# (variant key, q/k/v signature, input dtypes and ranks, return_lse, normalizer, backend) -> (spec, kernel)
_KERNELS: dict[tuple, tuple[Attention, object]] = {}
# A plain call's look-up, kept where its kernel prepared a launch; oldest dropped first:
# (call_key of q, k, v alone, id of the score_mod, id of the block mask, scale, return_lse, and normalizer, backend
# and enable_gqa as passed) -> _Call. A hit holds when the score_mod is the one whose state it keeps (the ids are
# pinned: the block mask is held, the mod checked through its state's weak reference), its captures are unchanged,
# and the tensors it captures have the shapes, strides, dtypes and devices they had (`t.data = ...` changes them).
_CALLS: dict[tuple, "_Call"] = {}


class _Call(NamedTuple):
    state: "_ScoreMod | None"  # None without a score_mod
    captured: "symbolic.Captures | None"  # what the score trace was made from
    block_mask: "BlockMask | None"
    variant: _Variant
    key: tuple  # the kernel's call_key: q, k, v's and the captured tensors'
    kernel: object
    prepared: Callable  # the kernel's prepared launch for `key`

    def holds(self, score_mod, q_key: tuple) -> bool:
        """Whether a call of `score_mod` whose q, k, v have `q_key` may take this kernel and launch."""
        state, names = self.state, self.variant.names
        return (state is None or state.mod() is score_mod and self.captured.unchanged()) and (
            not names or call_key_of_inputs(self.variant.tensors, names) == self.key[len(q_key):])


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise CallError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    if number_problem(scale, isinstance(scale, float)):
        raise CallError(f"scale: {number_problem(scale, isinstance(scale, float))}")


def _base_score(base: _Base) -> Expr:
    """The score reaching score_mod: `qk * scale`, or with latent dot products `(qk + qr @ kr + ...) * scale`;
    scale None is 1/sqrt of the head dims' sum (FlexAttention's default for the concatenated tensors)."""
    scale, dots = base
    if not dots:
        return default_score() if scale is None else Binary("*", QK(), Num(float(scale), True))
    products, dims = QK(), SizeRef("D")
    for n in range(dots):
        query, key, dim = dot_names(n)
        products, dims = Binary("+", products, QK(query, key)), Binary("+", dims, SizeRef(dim))
    return Binary("*", products, Call("rsqrt", (dims,)) if scale is None else Num(float(scale), True))


def _new_variant(score: ModTrace, block_mask: BlockMask | None, score_mod: Callable | None, dots: int) -> _Variant:
    mask = block_mask.trace if block_mask is not None else None
    tensors = dict(score.tensors)
    for name, t in mask.tensors if mask is not None else ():
        if tensors.setdefault(name, t) is not t:
            raise CallError(f"score_mod and mask_mod capture different tensors named {name!r}; rename one of "
                            f"the variables (each captured tensor becomes an input named after its variable)")
    for n in range(dots):
        for side, name in zip(("query", "key"), dot_names(n)):
            if name in tensors:
                raise CallError(f"{side}[{n + 1}] is the spec's input {name!r}, and a mod captures a tensor of that "
                                f"name; rename the variable (each captured tensor becomes an input named after it)")
    name = _name(score_mod, block_mask.mask_mod if block_mask is not None else None)
    key = (score.key, mask.key if mask is not None else None, name, *tensors)
    variant = _Variant(score, block_mask, tensors, tuple(tensors.values()), tuple(tensors), name, key)
    if len(_VARIANTS) >= VARIANTS:
        _VARIANTS.pop(next(iter(_VARIANTS)))
    _VARIANTS[(id(score), id(mask))] = variant
    return variant


def _check_block_mask(block_mask: BlockMask, q_shape, kv_len: int) -> None:
    batch, heads = block_mask.B, block_mask.H
    if (block_mask.Q_LEN == q_shape[2] and block_mask.KV_LEN == kv_len
            and (batch is None or batch == 1 or batch == q_shape[0])
            and (heads is None or heads == 1 or heads == q_shape[1])):
        return
    _raise_block_mask_error(block_mask, q_shape, kv_len)


def _raise_block_mask_error(block_mask: BlockMask, q_shape, kv_len: int) -> NoReturn:
    if (block_mask.Q_LEN, block_mask.KV_LEN) != (q_shape[2], kv_len):
        raise CallError(f"block_mask: was created for Q_LEN={block_mask.Q_LEN}, KV_LEN={block_mask.KV_LEN} but "
                        f"query has {q_shape[2]} positions and key {kv_len}; create the block mask for these "
                        f"lengths")
    for name, size, have in (("B", block_mask.B, q_shape[0]), ("H", block_mask.H, q_shape[1])):
        if size not in (None, 1, have):
            raise CallError(f"block_mask: was created for {name}={size} but the query has {have}; pass "
                            f"{name}={have} or None to create_block_mask")


def _name(score_mod, mask_mod) -> str:
    """The spec's name: the mods' function names (lambdas have none), else `flex_attention`."""
    names = [getattr(fn, "__name__", "") for fn in (score_mod, mask_mod) if fn is not None]
    return spec_name("_".join(n for n in names if spec_name(n, None)), "flex_attention")


def _signature(query, key, value, latent: _Latent | None, block_mask, enable_gqa) -> tuple:
    """What the spec depends on in the call's q, k, v (dtypes, whether K/V have their own head count and v its own
    head dim; the latent form's own), checking them and the block mask's sizes against them. `block_mask` is
    attnc's BlockMask (or None) by now; query, key and value are _latent's q, k, v."""
    if latent is not None:
        signature = latent.signature
    else:
        try:
            q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
            if not len(q_shape) == len(k_shape) == len(v_shape) == 4:
                raise IndexError
            signature = (query.dtype, key.dtype, value.dtype, k_shape[1] != q_shape[1], v_shape[3] != q_shape[3],
                         bool(enable_gqa))
        except (AttributeError, IndexError, TypeError):
            symbolic.qkv_decls(query, key, value, "BHSD", gqa_allowed=enable_gqa)  # raises the CallError
            raise
    if block_mask is not None:
        _check_block_mask(block_mask, query.shape, key.shape[-2])
    return signature


def _variant(score_mod, block_mask: BlockMask | None, scale,
             dots: int) -> tuple[_Variant, _ScoreMod | None, symbolic.Captures | None]:
    """The variant of a score_mod (traced for this scale and `dots` extra dot products) with a block mask, and what
    tells a later call whether its score trace still holds (_score_trace)."""
    if scale is not None:
        _check_scale(scale)
    score, state, captured = _score_trace(score_mod, (scale, dots))
    mask = block_mask.trace if block_mask is not None else None
    variant = _VARIANTS.get((id(score), id(mask)))
    if variant is None:
        variant = _new_variant(score, block_mask, score_mod, dots)
    return variant, state, captured


def _kernel_key(signature: tuple, variant: _Variant, return_lse) -> tuple:
    """The start of a _KERNELS key: what the spec depends on, so that a hit builds no declarations."""
    # A tensor's dtype and rank can change in place (`t.data = ...`): read them on every call.
    inputs = tuple([(t.dtype, t.dim()) for t in variant.inputs]) if variant.inputs else ()
    return variant.key, signature, inputs, bool(return_lse)


def _normalizer(normalizer) -> type[Normalizer]:
    if normalizer is None:
        return DEFAULT_NORMALIZER
    if isinstance(normalizer, str) and normalizer in NORMALIZERS:
        return NORMALIZERS[normalizer]
    raise CallError(f"normalizer: expected one of {', '.join(map(repr, NORMALIZERS))} or None "
                    f"({DEFAULT_NORMALIZER.name}, as FlexAttention), got {normalizer!r}")


def _build_spec(query, key, value, latent: _Latent | None, enable_gqa, variant: _Variant, return_lse,
                normalizer: type[Normalizer] = DEFAULT_NORMALIZER) -> Attention:
    q, k, v = symbolic.qkv_decls(query, key, value, "BHSD", gqa_allowed=enable_gqa, headless_k=latent is not None)
    block_mask, score = variant.block_mask, variant.score
    masks = block_mask.masks if block_mask is not None else ()
    fallback = symbolic.function_span(block_mask.mask_mod) if block_mask is not None else None
    inputs = symbolic.input_decls([score.expr, *masks], variant.tensors, fallback)
    dims = {}
    for n, (query_side, _) in enumerate(latent.pairs if latent is not None else ()):
        # shaped like q and k with a head dim of its own, as docs/mla.md declares qr and kr
        names = dot_names(n)
        inputs += tuple(TensorDecl(name, like.dtype, tuple(names[2] if r == "D" else r for r in like.shape))
                        for name, like in zip(names, (q, k)))
        dims[names[2]] = query_side.shape[-1]
    spec = make_attention(variant.name, q, k, k if latent is not None and latent.shares_kv else v, dims=dims,
                          inputs=inputs, score=score.expr, masks=masks, normalizer=normalizer(),
                          returns_lse=bool(return_lse))
    check_attention(spec)
    return spec


@checks_arguments
def flex_spec(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
              return_lse=False, *, return_aux=None, normalizer=None) -> Attention:
    """The spec `flex_attention` runs for these arguments, without compiling it."""
    lse = _wants_lse(return_lse, return_aux)
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        block_mask = _from_torch(block_mask)
    q, k, v, latent = _latent(query, key, value, enable_gqa)
    _signature(q, k, v, latent, block_mask, enable_gqa)
    variant, _, _ = _variant(score_mod, block_mask, scale, len(latent.pairs) if latent is not None else 0)
    return _build_spec(q, k, v, latent, enable_gqa, variant, lse, _normalizer(normalizer))


@checks_arguments
def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None, normalizer=None):
    """FlexAttention's `flex_attention` on attnc kernels: out [B, H, M, DV]; (out, AuxOutput(lse=...)) with
    return_aux=AuxRequest(lse=True); (out, lse) with return_lse=True (torch's older spelling).

    query and key may be tuples, (q, q_pe) and (ckv, k_pe), with value ckv itself: latent attention (module doc).
    block_mask is attnc's or torch's BlockMask. kernel_options may hold "backend" (passed to attnc.compile);
    FlexAttention's tuning options (BLOCK_M, ...) are accepted and ignored, since attnc plans its own tiles.
    `normalizer`: None (softmax, as FlexAttention) or "sigmoid" (sigmoid attention; module doc).
    """
    lse = _wants_lse(return_lse, return_aux)
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        block_mask = _from_torch(block_mask)
    backend = kernel_options.get("backend") if kernel_options else None
    call = None
    # The look-up of a plain call (query a tensor: no extra dot products) by its q, k, v's call_key, whose hit has
    # had its shapes checked for that kernel and block mask on the path below (_CALLS). A scale of another type
    # than a float may be one the path below refuses (True == 1.0). Traced, a key of every stride would make
    # Dynamo guard on each.
    if not isinstance(query, tuple) and (scale is None or type(scale) is float) \
            and not torch.compiler.is_compiling():
        try:
            q_key = call_key(query, key, value, _NO_KEYWORDS, ())
            call = (q_key, id(score_mod), id(block_mask), scale, lse, normalizer, backend, enable_gqa)
            hit = _CALLS.get(call)
        except (AttributeError, KeyError, TypeError):
            call = None  # not tensors, or an unhashable option: the path below words the error
        else:
            if hit is not None and hit.holds(score_mod, q_key):
                result = hit.kernel.call(query, key, value, hit.variant.tensors, hit.key, prepared=hit.prepared)
                return result if return_aux is None else _with_aux(result, lse)
    q, k, v, latent = _latent(query, key, value, enable_gqa)
    signature = _signature(q, k, v, latent, block_mask, enable_gqa)
    variant, state, captured = _variant(score_mod, block_mask, scale, len(latent.pairs) if latent is not None else 0)
    cache_key = _kernel_key(signature, variant, lse) + (_normalizer(normalizer), backend)
    entry = _KERNELS.get(cache_key)
    if entry is None:
        spec = _build_spec(q, k, v, latent, enable_gqa, variant, lse, cache_key[-2])
        entry = _KERNELS[cache_key] = (spec, compiler.compile_spec(spec, backend=backend))
    kernel = entry[1]
    if latent is not None:
        result = kernel(q, k, *(() if latent.shares_kv else (v,)), **latent.inputs, **variant.tensors)
    else:
        tensors_key = None if call is None else call[0] + call_key_of_inputs(variant.tensors, variant.names)
        result = kernel.call(q, k, v, variant.tensors, tensors_key)
        prepared = kernel.prepared_launch(tensors_key) if tensors_key is not None else None
        if prepared is not None and (score_mod is None or captured is not None):
            if len(_CALLS) >= CALLS:
                _CALLS.pop(next(iter(_CALLS)), None)  # the oldest
            _CALLS[call] = _Call(state, captured, block_mask, variant, tensors_key, kernel, prepared)
    return result if return_aux is None else _with_aux(result, lse)


def _with_aux(result, lse: bool) -> tuple:
    """flex_attention's result for return_aux: (out, AuxOutput(lse=...))."""
    return (result[0], AuxOutput(lse=result[1])) if lse else (result, AuxOutput())
