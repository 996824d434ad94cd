"""Global positions for a shard: the spec a rank compiles, and which shard pairs a mask leaves empty.

A rank computes attention between a run of the global sequence's queries (global rows q0 .. q0 + m - 1) and a run
of its keys (k0 .. k0 + n - 1). The spec's score, masks, sink and lookups are written for global positions and the
global lengths, so the rank runs a *shard spec*: the same spec with every `i` replaced by `i + q0`, every `j` by
`j + k0`, and the sizes M and N (where the expressions read them) by the global lengths, all four runtime i32
params. Nothing in the passes or the backends changes: the kernel's own i and j count from 0 in its slice, the
mask analysis still sees affine bounds (now with params in them), and changing the offsets never recompiles.
Input tables are global (every rank passes the whole table); a table dimension declared M or N gets a free size of
its own, since it no longer has the local q's or k's length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from ..ir import Attention, Binary, Expr, IndexVar, ParamDecl, ParamRef, SizeRef, children, with_children
from ..passes.fold import NotConstant, evaluate
from ..passes.masks import analyze_masks, query_range
from ..passes.plan import KernelPlan, QueryRange, Target


@dataclass(frozen=True)
class ShardNames:
    """The names the shard spec adds (chosen not to collide with the spec's own)."""

    q0: str  # i32 param: the global position of the slice's first query
    k0: str  # ... of its first key
    m: str  # i32 param: the global query length (what the spec's M means)
    n: str  # ... the global key length (N)
    table_m: str  # free size replacing M in input table shapes
    table_n: str  # ... N


def shard_names(spec: Attention) -> ShardNames:
    taken = {p.name for p in spec.params} | {t.name for t in spec.inputs}
    taken |= {s for t in (spec.q, spec.k, spec.v, *spec.inputs) for s in t.shape}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    return ShardNames(fresh("cp_q0"), fresh("cp_k0"), fresh("cp_m"), fresh("cp_n"), fresh("CPM"), fresh("CPN"))


def shard_spec(spec: Attention, names: ShardNames, sink: bool = True) -> Attention:
    """`spec` on a slice of the global sequence (module docstring). sink=False drops the softmax sink: a row's
    sink joins its denominator once, so only one of the key runs a row attends to carries it."""
    swap: dict[str, Expr] = {
        "i": Binary("+", IndexVar("i"), ParamRef(names.q0)),
        "j": Binary("+", IndexVar("j"), ParamRef(names.k0)),
        "M": ParamRef(names.m),
        "N": ParamRef(names.n),
    }
    memo: dict[int, Expr] = {}

    def rewrite(e: Expr) -> Expr:
        key = id(e)
        if key not in memo:
            if isinstance(e, (IndexVar, SizeRef)) and e.name in swap:
                memo[key] = swap[e.name]
            else:
                kids = children(e)
                new = tuple(rewrite(c) for c in kids)
                memo[key] = e if new == kids else with_children(e, new)
        return memo[key]

    table_size = {"M": names.table_m, "N": names.table_n}
    inputs = tuple(replace(t, shape=tuple(table_size.get(s, s) for s in t.shape)) for t in spec.inputs)
    offsets = tuple(ParamDecl(name, "i32", 0) for name in (names.q0, names.k0, names.m, names.n))
    normalizer = spec.normalizer
    if normalizer.sink is not None:
        normalizer = replace(normalizer, sink=rewrite(normalizer.sink) if sink else None)
    return replace(spec, name=f"{spec.name}_shard", inputs=inputs,
                   params=tuple(sorted(spec.params + offsets, key=lambda p: p.name)),
                   score=rewrite(spec.score), masks=tuple(rewrite(m) for m in spec.masks),
                   normalizer=normalizer, returns_lse=True)



class PairSkipper:
    """Which (query run, key run) pairs of the global sequence keep no (row, key) under the spec's masks, from the
    mask analysis transposed (passes/plan.QueryRange): the key run [j0, j1) is reached only from rows i >= j0 + 1 - r
    (upper bounds i + r), i < j1 - r (lower bounds i + r), and not at all where a bound free of i excludes the run.
    A bound that needs h, b or a lookup to evaluate bounds nothing here (the kernels skip those tiles themselves)."""

    def __init__(self, spec: Attention):
        plan = analyze_masks(KernelPlan(spec=spec, spec_key=spec.key, target=Target("tvm", "cpu"), head_dim=0,
                                        value_dim=0))
        self.rows: QueryRange = query_range(plan.masks)

    def empty(self, env: Mapping[str, object], q0: int, q1: int, j0: int, j1: int) -> bool:
        """True when no row of [q0, q1) keeps a key of [j0, j1); env: sizes (global M, N) and params."""
        if q1 <= q0 or j1 <= j0:
            return True
        uppers = [r for r in (_value(r, env) for r in self.rows.from_upper) if r is not None]
        lowers = [r for r in (_value(r, env) for r in self.rows.from_lower) if r is not None]
        if uppers and lowers and max(lowers) >= min(uppers):  # every row's keys [i + lower, i + upper) are none
            return True
        lo = max([q0] + [j0 + 1 - r for r in uppers])
        hi = min([q1] + [j1 - r for r in lowers])
        if lo >= hi:
            return True
        if any(u is not None and u <= j0 for u in (_value(e, env) for e in self.rows.upper_free)):
            return True
        return any(low is not None and low >= j1 for low in (_value(e, env) for e in self.rows.lower_free))


def _value(e: Expr, env: Mapping[str, object]) -> int | None:
    try:
        return int(evaluate(e, env))
    except (NotConstant, TypeError, ValueError):
        return None
