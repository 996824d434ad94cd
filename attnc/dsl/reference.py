"""The float64 oracle: what every kernel must compute (DESIGN.md, Semantics).

For every b, h, i the kept keys are the j where every mask holds; p = softmax(score over the kept j), where
a sink adds exp(sink) to the denominator only; out = sum_j p_j v[b, kvh, j, :] with kvh = h // (H // HKV).
A row with no kept key gives out = 0 and lse = -inf (with a sink: lse = the sink's logit).

Expressions are evaluated with torch in float64 / int64 on a broadcast grid b [Bc,1,1,1], h [1,H,1,1],
i [1,1,Mc,1], j [1,1,1,N], a chunk of batches and query rows at a time. Every tensor lookup is checked over
the whole grid, kept or not, since kernels evaluate expressions on whole tiles.

Ragged and paged storage (docs/serving.md) are computed one sequence b at a time: i and j are positions inside
the sequence, and M and N its own query and key lengths (offsets[b + 1] - offsets[b], or lengths[b]); the keys
of a paged sequence are gathered from its pages first. The offsets, lengths and page ids are checked here.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from ..errors import CallError
from ..ir import (
    QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, Paged, ParamRef, Ragged, SizeRef, TensorDecl, Unary,
    print_expr,
)
from .signature import Bound, bind, canonical_view, lse_shape, out_shape

# Scores are materialized at most this many elements at a time (batches x heads x query rows x keys).
_CHUNK_ELEMS = 1 << 22

# Params are evaluated as int64, float64 or bool whatever their declared width (input tensors: _widen).
_PARAM_DTYPES = {"i32": torch.int64, "f32": torch.float64, "bool": torch.bool}
_ARITH: Mapping[str, Callable] = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.true_divide, "%": torch.remainder,
    "//": lambda a, b: torch.div(a, b, rounding_mode="floor"),
}
_COMPARE: Mapping[str, Callable] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_LOGIC: Mapping[str, Callable] = {"and": torch.logical_and, "or": torch.logical_or}
_FLOAT_FUNCS: Mapping[str, Callable] = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "floor": torch.floor,
}


def reference(spec: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, **kwargs):
    """out (float64, q's layout with DV for D), or (out, lse) with lse float64 [B, H, M] ([H, T] for a ragged
    q) when the spec returns lse. Params and input tensors are passed by name, as to a compiled kernel."""
    bound = bind(spec, q, k, v, kwargs)
    heads, kv_heads, d, dv = (bound.sizes[r] for r in ("H", "HKV", "D", "DV"))
    group = heads // kv_heads  # query head h reads K/V head h // group
    device = q.device
    out = torch.empty(out_shape(spec, bound), dtype=torch.float64, device=device)
    lse = torch.empty(lse_shape(bound), dtype=torch.float64, device=device)
    env = _Env(  # the index grid, qk and the sequence lengths M and N are filled in per chunk
        index={},
        qk=torch.empty(0),
        sizes={name: torch.tensor(value, device=device) for name, value in bound.sizes.items()},
        params={p.name: torch.tensor(bound.params[p.name], dtype=_PARAM_DTYPES[p.dtype], device=device)
                for p in spec.params},
        inputs={name: _widen(t) for name, t in bound.inputs.items()},
        input_decls={decl.name: decl for decl in spec.inputs},
        device=device,
    )
    for seg in _segments(spec, bound, out, lse):
        nb, m, n = seg.q.shape[0], seg.q.shape[2], seg.k.shape[2]
        sizes = dict(env.sizes, M=torch.tensor(m, device=device), N=torch.tensor(n, device=device))
        rows = max(1, _CHUNK_ELEMS // (nb * heads * max(n, 1)))
        for m0 in range(0, m, rows):
            m1 = min(m0 + rows, m)
            # Grouping the query heads that share a K/V head as extra rows avoids copying K and V per head.
            qk = seg.q[:, :, m0:m1].reshape(nb, kv_heads, group * (m1 - m0), d) @ seg.k.transpose(-1, -2)
            index = {
                "b": torch.arange(seg.b0, seg.b0 + nb, device=device).view(-1, 1, 1, 1),
                "h": torch.arange(heads, device=device).view(1, -1, 1, 1),
                "i": torch.arange(m0, m1, device=device).view(1, 1, -1, 1),
                "j": torch.arange(n, device=device).view(1, 1, 1, -1),
            }
            p, row_lse = _softmax(spec, replace(env, index=index, sizes=sizes, qk=qk.view(nb, heads, m1 - m0, n)))
            seg.lse[:, :, m0:m1] = row_lse
            pv = p.reshape(nb, kv_heads, group * (m1 - m0), n) @ seg.v
            seg.out[:, :, m0:m1] = pv.view(nb, heads, m1 - m0, dv)
    return (out, lse) if spec.returns_lse else out


@dataclass(frozen=True)
class _Segment:
    """Batches b0 .. b0 + nb - 1 with one M and one N, as canonical float64 views: q [nb, H, M, D],
    k [nb, HKV, N, D], v [nb, HKV, N, DV], and the out [nb, H, M, DV] and lse [nb, H, M] they write."""

    b0: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def _segments(spec: Attention, bound: Bound, out: torch.Tensor, lse: torch.Tensor):
    """Dense specs: chunks of whole batches. Ragged or paged ones: each sequence alone, sliced or gathered."""
    qc, kc, vc = (canonical_view(t, decl).double() for t, decl in
                  ((bound.q, spec.q), (bound.k, spec.k), (bound.v, spec.v)))
    out_c = canonical_view(out, spec.q)
    sizes = bound.sizes
    if spec.q_storage is None and spec.kv_storage is None:
        step = max(1, _CHUNK_ELEMS // (sizes["H"] * max(sizes["M"], 1) * max(sizes["N"], 1)))
        for b0 in range(0, sizes["B"], step):
            b1 = min(b0 + step, sizes["B"])
            yield _Segment(b0, qc[b0:b1], kc[b0:b1], vc[b0:b1], out_c[b0:b1], lse[b0:b1])
        return
    q_rows = _sequence_rows(spec.q_storage, bound, "T") if spec.q_storage is not None else None
    if isinstance(spec.kv_storage, Paged):
        kv_of = _paged_keys(spec.kv_storage, bound, kc, vc)
    elif spec.kv_storage is not None:
        kv_rows = _sequence_rows(spec.kv_storage, bound, "TK")
        kv_of = lambda b: (kc[:, kv_rows[b]][None], vc[:, kv_rows[b]][None])  # noqa: E731
    else:
        kv_of = lambda b: (kc[b:b + 1], vc[b:b + 1])  # noqa: E731
    for b in range(sizes["B"]):
        k_b, v_b = kv_of(b)
        if q_rows is None:
            yield _Segment(b, qc[b:b + 1], k_b, v_b, out_c[b:b + 1], lse[b:b + 1])
        else:  # a ragged q is canonically [H, T, D] and its lse [H, T]
            rows = q_rows[b]
            yield _Segment(b, qc[:, rows][None], k_b, v_b, out_c[:, rows][None], lse[:, rows][None])


def _sequence_rows(storage: Ragged, bound: Bound, total: str) -> list[slice]:
    """Each sequence's rows, after checking that the offsets start at 0, never decrease and end at the total."""
    name = storage.offsets
    offsets = bound.inputs[name].tolist()
    count = bound.sizes[total]
    if offsets[0] != 0:
        raise CallError(f"{name}: the offsets must start at 0, but {name}[0] = {offsets[0]}")
    for b in range(len(offsets) - 1):
        if offsets[b + 1] < offsets[b]:
            raise CallError(f"{name}: the offsets must never decrease, but {name}[{b + 1}] = {offsets[b + 1]} < "
                            f"{name}[{b}] = {offsets[b]}")
    if offsets[-1] != count:
        raise CallError(f"{name}: the offsets must end at {total} = {count}, the number of packed tokens, but "
                        f"{name}[{len(offsets) - 1}] = {offsets[-1]}")
    return [slice(a, b) for a, b in zip(offsets, offsets[1:])]


def _paged_keys(storage: Paged, bound: Bound, kc: torch.Tensor, vc: torch.Tensor):
    """b -> (k, v) [1, HKV, N_b, D] of sequence b gathered from the pages (canonically [PAGES, HKV, PAGE, D]),
    after checking the lengths and the page ids in use; table entries past a sequence's last page are unused."""
    lengths, table = bound.inputs[storage.lengths].tolist(), bound.inputs[storage.table]
    page, pages, capacity = bound.sizes["PAGE"], bound.sizes["PAGES"], bound.sizes["N"]
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise CallError(f"{storage.lengths}: {storage.lengths}[{b}] = {n}, but a sequence holds 0 to MAXP * PAGE "
                            f"= {capacity} keys (its {bound.sizes['MAXP']} block-table entries of {page} slots)")
        used = table[b, :-(-n // page)]
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < pages):
            bad = next(p for p, e in enumerate(used.tolist()) if not 0 <= e < pages)
            raise CallError(f"{storage.table}: {storage.table}[{b}, {bad}] = {int(used[bad])} is not a page id: "
                            f"k and v have PAGES = {pages} pages, and sequence {b} uses the first {used.numel()} "
                            f"entries of its row ({n} keys)")

    def gather(b: int):
        n = lengths[b]
        ids = table[b, :-(-n // page)].long()
        return tuple(t[ids].transpose(0, 1).reshape(t.shape[1], len(ids) * page, t.shape[3])[:, :n][None]
                     for t in (kc, vc))

    return gather


def _softmax(spec: Attention, env: _Env) -> tuple[torch.Tensor, torch.Tensor]:
    """p [Bc, H, Mc, N] over the kept keys, and each row's natural-log lse (the sink joins the sum)."""
    keep = torch.ones((), dtype=torch.bool, device=env.device)
    for mask in spec.masks:
        keep = keep & evaluate(mask, env).bool()
    logits = torch.where(keep, _as_float(evaluate(spec.score, env)), -torch.inf).expand(env.qk.shape)
    if spec.normalizer.sink is None:
        row_lse = torch.logsumexp(logits, dim=-1)
    else:
        sink = _as_float(evaluate(spec.normalizer.sink, env)).expand(*env.qk.shape[:-1], 1)
        row_lse = torch.logsumexp(torch.cat([logits, sink], dim=-1), dim=-1)
    # A row with nothing kept has lse = -inf and all logits -inf: subtracting 0 keeps p = 0, not NaN.
    return torch.exp(logits - torch.where(row_lse > -torch.inf, row_lse, 0.0)[..., None]), row_lse


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


def evaluate(e: Expr, env: _Env) -> torch.Tensor:
    """An IR expression as a float64, int64 or bool tensor that broadcasts against the grid. With only
    those three dtypes, torch's promotion gives float64 when either side is float and int64 for ints;
    only true division and the float functions need an explicit cast (they would give float32)."""
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
        return env.qk
    if isinstance(e, Lookup):
        return _lookup(e, env)
    if isinstance(e, Unary):
        x = evaluate(e.operand, env)
        return torch.logical_not(x) if e.op == "not" else -_as_number(x)
    if isinstance(e, Binary):
        a, b = evaluate(e.lhs, env), evaluate(e.rhs, env)
        if e.op in _LOGIC:
            return _LOGIC[e.op](a, b)
        if e.op in _COMPARE:
            return _COMPARE[e.op](a, b)
        a, b = _as_number(a), _as_number(b)
        if e.op == "/":
            a, b = _as_float(a), _as_float(b)
        elif e.op in ("%", "//") and not b.is_floating_point() and bool((b == 0).any()):
            what = "modulo" if e.op == "%" else "division"
            raise CallError(f"integer {what} by zero in `{print_expr(e)}`: `{print_expr(e.rhs)}` is 0; "
                            f"pass a non-zero value")
        return _ARITH[e.op](a, b)
    if isinstance(e, Call):
        args = [evaluate(x, env) for x in e.args]
        if e.fn in _FLOAT_FUNCS:
            return _FLOAT_FUNCS[e.fn](_as_float(args[0]))
        if e.fn == "abs":
            return torch.abs(_as_number(args[0]))
        if e.fn in ("min", "max"):
            fn = torch.minimum if e.fn == "min" else torch.maximum
            return fn(_as_number(args[0]), _as_number(args[1]))
        if e.fn == "where":
            return torch.where(args[0].bool(), args[1], args[2])
    raise TypeError(f"not an IR expression: {e!r}")


def _lookup(e: Lookup, env: _Env) -> torch.Tensor:
    table, decl = env.inputs[e.tensor], env.input_decls[e.tensor]
    indices = []
    for axis, index_expr in enumerate(e.indices):
        index = evaluate(index_expr, env)
        size = table.shape[axis]
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= size:
                raise CallError(f"{e.tensor}: index {axis} of `{print_expr(e)}` takes values {lo}..{hi}, but dim "
                                f"{axis} ({decl.shape[axis]}) of {e.tensor} has size {size}, so it must lie in "
                                f"0..{size - 1}; fix the index expression or the tensor's shape")
        indices.append(index)
    return table[tuple(indices)]


def _as_number(x: torch.Tensor) -> torch.Tensor:
    """Booleans count as ints in arithmetic (torch would add two bools as a logical or)."""
    return x.long() if x.dtype == torch.bool else x


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.double()

