"""The float64 oracle: what every kernel must compute (DESIGN.md, Semantics).

For every b, h, i the kept keys are the j where every mask holds; p = softmax(score over the kept j), where
a sink adds exp(sink) to the denominator only; out = sum_j p_j v[b, kvh, j, :] with kvh = h // (H // HKV).
A row with no kept key gives out = 0 and lse = -inf (with a sink: lse = the sink's logit).

Expressions are evaluated with torch in float64 / int64 on a broadcast grid b [Bc,1,1,1], h [1,H,1,1],
i [1,1,Mc,1], j [1,1,1,N], a chunk of batches and query rows at a time. Every tensor lookup is checked over
the whole grid, kept or not, since kernels evaluate expressions on whole tiles.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from ..errors import CallError
from ..ir import (
    QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, TensorDecl, Unary, print_expr,
)
from .signature import bind, canonical_view, lse_shape, out_shape

# Scores are materialized at most this many elements at a time (batches x heads x query rows x keys).
_CHUNK_ELEMS = 1 << 22

# Params are evaluated as int64, float64 or bool whatever their declared width (input tensors: _widen).
_PARAM_DTYPES = {"i32": torch.int64, "f32": torch.float64, "bool": torch.bool}
_ARITH: Mapping[str, Callable] = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.true_divide, "%": torch.remainder,
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
    """out (float64, q's layout with DV for D), or (out, lse) with lse float64 [B, H, M] when the spec
    returns lse. Params and input tensors are passed by name, as to a compiled kernel."""
    bound = bind(spec, q, k, v, kwargs)
    batch, heads, kv_heads, m, n, d, dv = (bound.sizes[r] for r in ("B", "H", "HKV", "M", "N", "D", "DV"))
    group = heads // kv_heads  # query head h reads K/V head h // group
    device = q.device
    qc, kc, vc = (canonical_view(t, decl).double() for t, decl in ((q, spec.q), (k, spec.k), (v, spec.v)))
    out = torch.empty(out_shape(spec, bound), dtype=torch.float64, device=device)
    out_c = canonical_view(out, spec.q)
    lse = torch.empty(lse_shape(bound), dtype=torch.float64, device=device)
    env = _Env(  # the index grid and qk are filled in per chunk
        index={},
        qk=torch.empty(0),
        sizes={name: torch.tensor(value, device=device) for name, value in bound.sizes.items()},
        params={p.name: torch.tensor(bound.params[p.name], dtype=_PARAM_DTYPES[p.dtype], device=device)
                for p in spec.params},
        inputs={name: _widen(t) for name, t in bound.inputs.items()},
        input_decls={decl.name: decl for decl in spec.inputs},
        device=device,
    )
    for b0, b1, m0, m1 in _chunks(batch, heads, m, n):
        nb, nm = b1 - b0, m1 - m0
        # Grouping the query heads that share a K/V head as extra rows avoids copying K and V per head.
        qk = qc[b0:b1, :, m0:m1].reshape(nb, kv_heads, group * nm, d) @ kc[b0:b1].transpose(-1, -2)
        index = {
            "b": torch.arange(b0, b1, device=device).view(-1, 1, 1, 1),
            "h": torch.arange(heads, device=device).view(1, -1, 1, 1),
            "i": torch.arange(m0, m1, device=device).view(1, 1, -1, 1),
            "j": torch.arange(n, device=device).view(1, 1, 1, -1),
        }
        p, row_lse = _softmax(spec, replace(env, index=index, qk=qk.view(nb, heads, nm, n)))
        lse[b0:b1, :, m0:m1] = row_lse
        pv = p.reshape(nb, kv_heads, group * nm, n) @ vc[b0:b1]
        out_c[b0:b1, :, m0:m1] = pv.view(nb, heads, nm, dv)
    return (out, lse) if spec.returns_lse else out


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


def _chunks(batch: int, heads: int, m: int, n: int):
    """(b0, b1, m0, m1) pieces of the grid with at most _CHUNK_ELEMS scores each."""
    if m == 0:
        return
    per_batch = heads * m * max(n, 1)
    if per_batch <= _CHUNK_ELEMS:
        step = _CHUNK_ELEMS // per_batch
        for b0 in range(0, batch, step):
            yield b0, min(b0 + step, batch), 0, m
        return
    rows = max(1, _CHUNK_ELEMS // (heads * max(n, 1)))
    for b0 in range(batch):
        for m0 in range(0, m, rows):
            yield b0, b0 + 1, m0, min(m0 + rows, m)


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
        elif e.op == "%" and not b.is_floating_point() and bool((b == 0).any()):
            raise CallError(f"integer modulo by zero in `{print_expr(e)}`: `{print_expr(e.rhs)}` is 0; "
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

