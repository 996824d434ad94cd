"""The float64 oracle: what every kernel must compute (DESIGN.md, Semantics).

For every b, h, i the kept keys are the j where every mask holds; each has the weight w_j = f(score_j), f the
normalizer's map (ir.Normalizer); p_j = w_j / (sum_k w_k [+ exp(sink)]) where the normalizer normalises rows,
else p_j = w_j; out = sum_j p_j v[b, kvh, j, :] with kvh = h // (H // HKV); lse = log(sum_j w_j [+ exp(sink)]).
A row with no kept key gives out = 0 and lse = -inf (with a sink: lse = the sink's logit).

Expressions are evaluated with torch in float64 / int64 on a broadcast grid b [Bc,1,1,1], h [1,H,1,1],
i [1,1,Mc,1], j [1,1,1,N], a chunk of batches and query rows at a time.

Lookups out of range (the language's rule, shared by every backend): a lookup `t[x, ...]` whose index lies
outside t's shape reads 0 (false for a bool table), wherever it is evaluated; kernels evaluate expressions on
whole tiles, so a spec may well form such indices for keys it masks out (`rel[i - j]` under a causal mask).
Validate mode (`validate=True` here and on kernels, or ATTNC_VALIDATE=1) reports an out-of-range lookup where it
can change the result: for an index that depends on j, at a (b, h, i, j) every mask keeps; for one that does not
(per row: `slopes[h]`, `lim[b]`, the sink), at every query row. `check_lookups` is that rule.

Ragged and paged storage (docs/serving.md) are computed one sequence b at a time: i and j are positions inside
the sequence, and M and N its own query and key lengths (offsets[b + 1] - offsets[b], or lengths[b]); the keys
of a paged sequence are gathered from its pages first. The offsets, lengths and page ids are checked here, by the
rules of attnc/index_data.py (which the kernels check on the device).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch

from ..errors import CallError, checks_arguments
from ..index_data import LENGTH, OFFSETS_DECREASE, OFFSETS_END, OFFSETS_START, PAGE_ID, Violation
from ..ir import (
    QK, QUANTIZE_DTYPES, QUANTIZE_TINY, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, Paged, ParamRef, Ragged,
    SizeRef, TensorDecl, Unary, children, print_expr, walk,
)
from ..ops import op_of
from .signature import Bound, bind, canonical_view, lse_shape, out_shape, positional_qkv

# Scores are materialized at most this many elements at a time (batches x heads x query rows x keys).
_CHUNK_ELEMS = 1 << 22

# Params are evaluated as int64, float64 or bool whatever their declared width (input tensors: _widen).
_PARAM_DTYPES = {"i32": torch.int64, "f32": torch.float64, "bool": torch.bool}
# log f(s) of each normalizer's weight map f (ir.Normalizer.weight), exact for very negative s (log sigmoid(s) = s).
_LOG_WEIGHTS: Mapping[str, Callable] = {"exp": lambda s: s, "sigmoid": torch.nn.functional.logsigmoid}


@checks_arguments
def reference(spec: Attention, *qkv: torch.Tensor, validate: bool = False,
              **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference(spec, q, k, v, **named) (or (spec, q, k, **named) where the spec's values are its keys): out
    (float64, q's layout with DV for D), or (out, lse) with lse float64 [B, H, M] ([H, T] for a ragged q) when
    the spec returns lse. Params and input tensors are passed by name, as to a compiled kernel.
    validate=True also raises a CallError for an out-of-range lookup that reaches the result (`check_lookups`)."""
    if not isinstance(spec, Attention):
        raise CallError(f"spec: expected an attnc.Attention (from attnc.parse or a decorator's .spec), got "
                        f"{type(spec).__name__}")
    q, k, v = positional_qkv(spec, qkv, kwargs)
    bound = bind(spec, q, k, v, kwargs)
    heads, kv_heads, d, dv = (bound.sizes[r] for r in ("H", "HKV", "D", "DV"))
    group = heads // kv_heads  # query head h reads K/V head h // group
    device = q.device
    out = torch.empty(out_shape(spec, bound), dtype=torch.float64, device=device)
    lse = torch.empty(lse_shape(bound), dtype=torch.float64, device=device)
    env = _env(spec, bound)
    for seg in _segments(spec, bound, out, lse):
        nb, m, n = seg.queries["q"].shape[0], seg.queries["q"].shape[2], seg.keys["k"].shape[2]
        for m0, m1, chunk in _chunks(env, seg.b0, nb, heads, m, n):
            # Grouping the query heads that share a K/V head as extra rows avoids copying K and V per head.
            dots = {}
            for dot in (QK(), *spec.dots):  # (qk also gives the score's shape)
                query = seg.queries[dot.query][:, :, m0:m1]
                product = query.reshape(nb, kv_heads, group * (m1 - m0), query.shape[-1]) \
                    @ seg.keys[dot.key].transpose(-1, -2)
                dots[dot] = product.view(nb, heads, m1 - m0, n)
            p, row_lse = _weights(spec, replace(chunk, qk=dots.pop(QK()), dots=dots))
            seg.lse[:, :, m0:m1] = row_lse
            pv = p.reshape(nb, kv_heads, group * (m1 - m0), n) @ seg.v
            seg.out[:, :, m0:m1] = pv.view(nb, heads, m1 - m0, dv)
    if validate:
        check_lookups(spec, bound)
    return (out, lse) if spec.returns_lse else out


def check_lookups(spec: Attention, bound: Bound) -> None:
    """Validate mode's rule for lookups (module docstring): raise a CallError for the first out-of-range lookup
    index that can change the result, naming the table, the expression, the value and where it was read. Only
    index expressions and masks are evaluated (never qk), on the call's device."""
    lookups = list(dict.fromkeys(n for e in _spec_exprs(spec) for n in walk(e) if isinstance(n, Lookup)))
    if not lookups:
        return
    env = _env(spec, bound)
    heads = bound.sizes["H"]
    for b0, nb, m, n in _extents(spec, bound):
        for _, _, chunk in _chunks(env, b0, nb, heads, m, n):
            keep = torch.ones((), dtype=torch.bool, device=env.device)
            for mask in spec.masks:
                keep = keep & evaluate(mask, chunk).bool()
            for lookup in lookups:
                _check_lookup(lookup, chunk, keep)


def _check_lookup(e: Lookup, env: _Env, keep: torch.Tensor) -> None:
    table = env.inputs[e.tensor]
    per_key = any(isinstance(x, IndexVar) and x.name == "j" for x in walk(e))
    grid = [len(env.index[name].view(-1)) for name in ("b", "h", "i")] + [len(env.index["j"].view(-1))
                                                                           if per_key else 1]
    for axis, index_expr in enumerate(e.indices):
        index = evaluate(index_expr, env).expand(grid)
        outside = (index < 0) | (index >= table.shape[axis])
        if per_key:
            outside = outside & keep.expand(grid)
        if bool(outside.any()):
            at = [int(x) for x in outside.nonzero()[0]]
            where = ", ".join(f"{name}={int(env.index[name].view(-1)[n])}"
                              for name, n in zip(("b", "h", "i", "j"), at[:4 if per_key else 3]))
            raise CallError(
                f"{e.tensor}: index {axis} of `{print_expr(e)}` is {int(index[tuple(at)])} at {where}, outside dim "
                f"{axis} ({env.input_decls[e.tensor].shape[axis]}) of {e.tensor}, which has size "
                f"{table.shape[axis]}; an out-of-range lookup reads 0 (validate mode reports it where it "
                f"{'meets a kept key' if per_key else 'is read for a query row'}): fix the index or the table")


def _spec_exprs(spec: Attention) -> list[Expr]:
    sink = spec.normalizer.sink
    return [spec.score, *spec.masks, *([] if sink is None else [sink])]


def _env(spec: Attention, bound: Bound) -> _Env:
    """The evaluation environment of a call; the index grid, qk and the sequence's M and N are filled in per
    chunk (`_chunks`)."""
    device = bound.q.device
    return _Env(
        index={},
        qk=torch.empty(0),
        sizes={name: torch.tensor(value, device=device) for name, value in bound.sizes.items()},
        params={p.name: torch.tensor(bound.params[p.name], dtype=_PARAM_DTYPES[p.dtype], device=device)
                for p in spec.params},
        inputs={name: _widen(t) for name, t in bound.inputs.items()},
        input_decls={decl.name: decl for decl in spec.inputs},
        device=device,
    )


def _chunks(env: _Env, b0: int, nb: int, heads: int, m: int, n: int):
    """(m0, m1, `env` over batches b0 .. b0 + nb - 1, query rows m0 .. m1 - 1, with M = m and N = n), a chunk of
    rows at a time."""
    device = env.device
    sizes = dict(env.sizes, M=torch.tensor(m, device=device), N=torch.tensor(n, device=device))
    rows = max(1, _CHUNK_ELEMS // (nb * heads * max(n, 1)))
    for m0 in range(0, m, rows):
        m1 = min(m0 + rows, m)
        index = {
            "b": torch.arange(b0, b0 + nb, device=device).view(-1, 1, 1, 1),
            "h": torch.arange(heads, device=device).view(1, -1, 1, 1),
            "i": torch.arange(m0, m1, device=device).view(1, 1, -1, 1),
            "j": torch.arange(n, device=device).view(1, 1, 1, -1),
        }
        yield m0, m1, replace(env, index=index, sizes=sizes)


@dataclass(frozen=True)
class _Segment:
    """Batches b0 .. b0 + nb - 1 with one M and one N, as canonical float64 views: the query-side tensors of the
    dot products by name (q [nb, H, M, D], ...), the key-side ones (k [nb, HKV, N, D], ...), v [nb, HKV, N, DV],
    and the out [nb, H, M, DV] and lse [nb, H, M] they write."""

    b0: int
    queries: Mapping[str, torch.Tensor]
    keys: Mapping[str, torch.Tensor]
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def _segments(spec: Attention, bound: Bound, out: torch.Tensor, lse: torch.Tensor):
    """Dense specs: chunks of whole batches. Ragged or paged ones: each sequence alone, sliced or gathered."""
    def view(t: torch.Tensor, decl: TensorDecl) -> torch.Tensor:
        return _dequantized(spec, bound, decl.name, _quantized(spec, decl.name, canonical_view(t, decl)).double())

    queries = {"q": view(bound.q, spec.q)}
    keys = {"k": view(bound.k, spec.k)}
    values = view(bound.v, spec.v)
    for dot in spec.dots:
        for side, name in ((queries, dot.query), (keys, dot.key)):
            if name not in side:
                side[name] = view(bound.inputs[name], spec.input(name))
    out_c = canonical_view(out, spec.q)
    sequences = _sequences(spec, bound)

    def segment(b0: int, query_rows, key_rows, out_rows, lse_rows) -> _Segment:
        return _Segment(b0, {name: query_rows(t) for name, t in queries.items()},
                        {name: key_rows(t) for name, t in keys.items()}, key_rows(values), out_rows(out_c),
                        lse_rows(lse))

    if sequences is None:
        for b0, b1 in _batch_chunks(bound.sizes):
            def batches(t, b0=b0, b1=b1):
                return t[b0:b1]
            yield segment(b0, batches, batches, batches, batches)
        return
    page = bound.sizes.get("PAGE")
    for b, seq in enumerate(sequences):
        if isinstance(seq.keys, torch.Tensor):  # page ids: the pages' slots in order, cut at the sequence's length
            def key_rows(t, ids=seq.keys, n=seq.n):
                return t[ids].transpose(0, 1).reshape(t.shape[1], len(ids) * page, t.shape[3])[:, :n][None]
        elif seq.keys is not None:
            def key_rows(t, rows=seq.keys):
                return t[:, rows][None]
        else:
            def key_rows(t, b=b):
                return t[b:b + 1]
        if seq.rows is None:
            def batch(t, b=b):
                return t[b:b + 1]
            yield segment(b, batch, key_rows, batch, batch)
        else:  # a ragged q is canonically [H, T, D] and its lse [H, T]
            def packed(t, rows=seq.rows):
                return t[:, rows][None]
            yield segment(b, packed, key_rows, packed, packed)


def quantize_rows(t: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize ... to DTYPE` of a tensor's rows (its last dim), as ir.Quantize defines it: (the e4m3 values, each
    row's float32 scale a / 448), with a = max(amax(|x|), QUANTIZE_TINY) and the values e4m3(x * (448 / a)), the
    quotient and the product each rounded to float32. The quotient divides two tensors: torch computes a Python
    number over a tensor as a reciprocal times the number, a second rounding that moves x * (448 / a) off the
    midpoints between e4m3 values where x / a is a short binary fraction, and the kernels divide."""
    x = t.float()
    a = x.abs().amax(-1, keepdim=True).clamp(min=QUANTIZE_TINY)
    top = torch.full_like(a, QUANTIZE_DTYPES[dtype])
    return (x * (top / a)).to(torch.float8_e4m3fn), a / top


def _quantized(spec: Attention, name: str, t: torch.Tensor) -> torch.Tensor:
    """A query-side tensor as the score reads it: quantised per row where the spec says so (ir.Quantize)."""
    d = spec.quantized(name)
    if d is None:
        return t
    values, scale = quantize_rows(t, d.dtype)
    return values.double() * scale.double()


def _dequantized(spec: Attention, bound: Bound, name: str, t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor's values (`dequant NAME by SCALE`): its canonical float64 view [..., HKV, rows, dim] times its
    scale, one per tensor (a param) or per K/V head (an input [HKV]); other tensors as they are."""
    d = next((d for d in spec.dequant if d.tensor == name), None)
    if d is None:
        return t
    if d.scale in bound.params:
        return t * bound.params[d.scale]
    return t * bound.inputs[d.scale].double().view(-1, 1, 1)


def _extents(spec: Attention, bound: Bound):
    """(b0, nb, m, n) of each segment `_segments` makes: batches b0 .. b0 + nb - 1 sharing M = m and N = n."""
    sequences = _sequences(spec, bound)
    if sequences is None:
        for b0, b1 in _batch_chunks(bound.sizes):
            yield b0, b1 - b0, bound.sizes["M"], bound.sizes["N"]
        return
    for b, seq in enumerate(sequences):
        yield b, 1, seq.m, seq.n


def _batch_chunks(sizes) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // (sizes["H"] * max(sizes["M"], 1) * max(sizes["N"], 1)))
    return [(b0, min(b0 + step, sizes["B"])) for b0 in range(0, sizes["B"], step)]


@dataclass(frozen=True)
class _Sequence:
    """One sequence of a ragged or paged call: its rows of a ragged q (None: q's batch b) and its keys: rows of
    ragged k/v, the page ids of a paged cache (an int64 tensor), or None for k/v's batch b."""

    rows: slice | None
    keys: slice | torch.Tensor | None
    m: int
    n: int


def _sequences(spec: Attention, bound: Bound) -> list[_Sequence] | None:
    """Each sequence's rows and keys, after checking the index data (attnc/index_data.py); None for a dense spec."""
    if spec.q_storage is None and spec.kv_storage is None:
        return None
    sizes = bound.sizes
    q_rows = _sequence_rows(spec.q_storage, bound, kv=False) if spec.q_storage is not None else None
    kv = spec.kv_storage
    if isinstance(kv, Paged):
        keys, lengths = _page_ids(kv, bound)
    elif kv is not None:
        keys = _sequence_rows(kv, bound, kv=True)
        lengths = [r.stop - r.start for r in keys]
    else:
        keys, lengths = [None] * sizes["B"], [sizes["N"]] * sizes["B"]
    return [_Sequence(None if q_rows is None else q_rows[b], keys[b],
                      sizes["M"] if q_rows is None else q_rows[b].stop - q_rows[b].start, lengths[b])
            for b in range(sizes["B"])]


def _sequence_rows(storage: Ragged, bound: Bound, kv: bool) -> list[slice]:
    """Each sequence's rows, after checking that the offsets start at 0, never decrease and end at the total."""
    name = storage.offsets
    offsets = bound.inputs[name].tolist()
    count = bound.sizes["TK" if kv else "T"]
    bad = None
    if offsets[0] != 0:
        bad = Violation(OFFSETS_START, name, 0, 0, offsets[0], count)
    else:
        b = next((b for b in range(1, len(offsets)) if offsets[b] < offsets[b - 1]), None)
        if b is not None:
            bad = Violation(OFFSETS_DECREASE, name, b - 1, b, offsets[b], count, offsets[b - 1])
        elif offsets[-1] != count:
            bad = Violation(OFFSETS_END, name, len(offsets) - 2, len(offsets) - 1, offsets[-1], count, int(kv))
    if bad is not None:
        raise CallError(bad.message())
    return [slice(a, b) for a, b in zip(offsets, offsets[1:])]


def _page_ids(storage: Paged, bound: Bound) -> tuple[list[torch.Tensor], list[int]]:
    """Each sequence's page ids (int64) and key count, after checking the lengths and the page ids in use; table
    entries past a sequence's last page are unused."""
    lengths, table = bound.inputs[storage.lengths].tolist(), bound.inputs[storage.table]
    page, pages, capacity = bound.sizes["PAGE"], bound.sizes["PAGES"], bound.sizes["N"]
    ids = []
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise CallError(Violation(LENGTH, storage.lengths, b, b, n, capacity, bound.sizes["MAXP"]).message())
        used = table[b, :-(-n // page)]
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < pages):
            bad = next(e for e, x in enumerate(used.tolist()) if not 0 <= x < pages)
            raise CallError(Violation(PAGE_ID, storage.table, b, bad, int(used[bad]), pages, n).message())
        ids.append(used.long())
    return ids, lengths


def _weights(spec: Attention, env: _Env) -> tuple[torch.Tensor, torch.Tensor]:
    """p [Bc, H, Mc, N] over the kept keys, and each row's natural-log lse (the sink joins the sum)."""
    keep = torch.ones((), dtype=torch.bool, device=env.device)
    for mask in spec.masks:
        keep = keep & evaluate(mask, env).bool()
    normalizer = spec.normalizer
    scores = torch.where(keep, _as_float(evaluate(spec.score, env)), -torch.inf).expand(env.qk.shape)
    log_w = _LOG_WEIGHTS[normalizer.weight](scores)  # log f(s): -inf where nothing is kept
    if normalizer.sink is None:
        row_lse = torch.logsumexp(log_w, dim=-1)
    else:
        sink = _as_float(evaluate(normalizer.sink, env)).expand(*env.qk.shape[:-1], 1)
        row_lse = torch.logsumexp(torch.cat([log_w, sink], dim=-1), dim=-1)
    if not normalizer.normalized:
        return torch.exp(log_w), row_lse
    # A row with nothing kept has lse = -inf and all logits -inf: subtracting 0 keeps p = 0, not NaN (a NaN lse
    # stays, so that a NaN sink or score makes its row NaN).
    return torch.exp(log_w - torch.where(row_lse == -torch.inf, 0.0, row_lse)[..., None]), row_lse


def _widen(t: torch.Tensor) -> torch.Tensor:
    """An input tensor as float64, int64 or bool, the types expressions are evaluated in."""
    if t.dtype == torch.bool:
        return t
    return t.double() if t.is_floating_point() else t.long()


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class _Env:
    index: Mapping[str, torch.Tensor]  # b, h, i, j as broadcastable int64 tensors
    qk: torch.Tensor  # float64 [Bc, H, Mc, N]
    sizes: Mapping[str, torch.Tensor]
    params: Mapping[str, torch.Tensor]
    inputs: Mapping[str, torch.Tensor]
    input_decls: Mapping[str, TensorDecl]
    device: torch.device
    dots: Mapping[QK, torch.Tensor] = field(default_factory=dict)  # the other dot products (latent attention)


def evaluate(e: Expr, env: _Env) -> torch.Tensor:
    """An IR expression as a float64, int64 or bool tensor that broadcasts against the grid, each distinct node
    evaluated once. With only those three dtypes, torch's promotion gives float64 when either side is float and
    int64 for ints; operands are converted as the operator table says (ops.py): booleans count as ints where a
    number is needed, and `/` and the float functions take float64 (torch would give float32)."""
    memo: dict[Expr, torch.Tensor] = {}

    def value(node: Expr) -> torch.Tensor:
        if node not in memo:
            memo[node] = _evaluate(node, value, env)
        return memo[node]

    return value(e)


def _evaluate(e: Expr, value: Callable[[Expr], torch.Tensor], env: _Env) -> torch.Tensor:
    if isinstance(e, Num):
        dtype = torch.bool if isinstance(e.value, bool) else torch.float64 if e.is_float else torch.int64
        return torch.tensor(e.value, dtype=dtype, device=env.device)
    if isinstance(e, IndexVar):
        return env.index[e.name]
    if isinstance(e, SizeRef):
        return env.sizes[e.name]
    if isinstance(e, ParamRef):
        return env.params[e.name]
    if isinstance(e, QK):
        return env.qk if e.is_qk else env.dots[e]
    if isinstance(e, Lookup):
        return _lookup(e, value, env)
    if isinstance(e, (Unary, Binary, Call)):
        op = op_of(e)
        args = [_operand(value(x), role, op.result) for x, role in zip(children(e), op.operands)]
        try:
            return op.torch(torch, *args)
        except ZeroDivisionError:
            raise CallError(f"integer {'division' if op.name == '//' else 'modulo'} by zero in `{print_expr(e)}`: "
                            f"`{print_expr(e.rhs)}` is 0; pass a non-zero value") from None
    raise TypeError(f"not an IR expression: {e!r}")


def _operand(x: torch.Tensor, role: str, result: str) -> torch.Tensor:
    if role in ("number", "integer"):
        return _as_float(x) if result == "float" else _as_number(x)
    return x.bool() if role == "bool" else x


def _lookup(e: Lookup, value: Callable[[Expr], torch.Tensor], env: _Env) -> torch.Tensor:
    """t[x, ...], reading 0 (false) where an index lies outside t (the module docstring's rule)."""
    table = env.inputs[e.tensor]
    indices, inside = [], torch.ones((), dtype=torch.bool, device=env.device)
    for axis, index_expr in enumerate(e.indices):
        index = value(index_expr)
        size = table.shape[axis]
        inside = inside & (index >= 0) & (index < size)
        indices.append(index.clamp(0, max(size - 1, 0)))
    if table.numel() == 0:
        return torch.zeros(inside.shape, dtype=table.dtype, device=env.device)
    return torch.where(inside, table[tuple(indices)], torch.zeros((), dtype=table.dtype, device=env.device))


def _as_number(x: torch.Tensor) -> torch.Tensor:
    """Booleans count as ints in arithmetic (torch would add two bools as a logical or)."""
    return x.long() if x.dtype == torch.bool else x


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.double()


def keep_mask(spec: Attention, sizes: Mapping[str, int], params: Mapping[str, object],
              inputs: Mapping[str, torch.Tensor], b: int, h: int, rows: range, cols: range) -> torch.Tensor:
    """bool [len(rows), len(cols)]: the (query i, key j) pairs of batch b and head h that every mask of `spec`
    keeps, with these sizes, params and input tensors (what `attnc explain` maps; masks never read qk)."""
    env = _Env(
        index={"b": torch.tensor(b), "h": torch.tensor(h), "i": torch.tensor(list(rows)).view(-1, 1),
               "j": torch.tensor(list(cols)).view(1, -1)},
        qk=torch.empty(0, dtype=torch.float64),
        sizes={name: torch.tensor(value) for name, value in sizes.items()},
        params={p.name: torch.tensor(params[p.name], dtype=_PARAM_DTYPES[p.dtype]) for p in spec.params},
        inputs={name: _widen(t.cpu()) for name, t in inputs.items()},
        input_decls={decl.name: decl for decl in spec.inputs},
        device=torch.device("cpu"),
    )
    keep = torch.ones(len(rows), len(cols), dtype=torch.bool)
    for mask in spec.masks:
        keep &= evaluate(mask, env).bool()
    return keep
