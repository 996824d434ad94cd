"""Differentiation as a pass over the IR: the backward computation of an `Attention`, derived from its forward IR
with the operator table's derivative rules (ops.Op.derivative), so that a new operator or normalizer needs no
backward code of its own in any backend.

The forward computes, per kept (b, h, i, j), s = score, w = f(s) (the normalizer's weight map) and
out_i = sum_j p_ij v_j. Given dO (and dlse where the caller's lse takes part in the loss), the backward is:

    dP_ij  = dO_i . v_j
    dS_ij  = normalized rows (softmax):  P_ij (dP_ij - Delta_i + dlse_i),  Delta_i = rowsum(dO_i * O_i)
             unnormalized (sigmoid):     f'(s_ij) (dP_ij + dlse_i exp(-lse_i))
    dqk_ij = dS_ij * d score / d qk                              (Derivatives.dqk, an IR expression)
    dQ_i   = sum_j dqk_ij k_j,  dK_j = sum_i dqk_ij q_i,  dV_j = sum_i P_ij dO_i
    dT[x]  += dS_ij * d score / d T[x]  for every float input T the score reads at x (Derivatives.score_tables)
    dsink  = p_sink (dlse_i - Delta_i),  p_sink = exp(sink - lse_i), into the tables the sink reads (sink_tables)

`NormalizerBackward` says which dS rule a normalizer takes, as data (its kind and f'/f as IR of s and w).
A row with no kept key (lse = -inf) has no kept j and contributes nothing. Masks are boolean: no gradient flows
through them, and the backward keeps exactly the forward's kept set (the backends reuse its mask analysis).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..ir import QK, Attention, Call, Expr, IndexVar, Lookup, Normalizer, Num, Binary, Unary, children, dtype_kind, walk
from ..ops import Kinds, function, op_of
from .fold import fold
from .masks import full_query_range, query_range
from .plan import BackwardPlan, KernelPlan
from .tiling import PREP_TILE, backward_tiles
from .warpgroups import dkdv_layout

ONE = Num(1.0, True)
SCORE = IndexVar("s")  # stands for the score value in NormalizerBackward's expressions
WEIGHT = IndexVar("w")  # stands for the weight f(s)


@dataclass(frozen=True)
class TableGrad:
    """The gradient of one float input read by one lookup: dT[lookup.indices] += dS * dscore."""

    lookup: Lookup
    dscore: Expr  # d (score or sink) / d (the looked-up value), IR over the forward's names


@dataclass(frozen=True)
class Derivatives:
    """What the backward needs of the score and the sink, beyond the normalizer's rule."""

    dqk: Expr  # d score / d qk
    score_tables: tuple[TableGrad, ...]  # float inputs read by the score
    sink_tables: tuple[TableGrad, ...]  # float inputs read by the sink (softmax(score, sink=...))

    @property
    def tables(self) -> tuple[str, ...]:
        """The float inputs that receive a gradient, each once, in order of first appearance."""
        return tuple(dict.fromkeys(g.lookup.tensor for g in self.score_tables + self.sink_tables))


@dataclass(frozen=True)
class NormalizerBackward:
    """How dS follows from dP for one normalizer (module docstring): `normalized` rows take the softmax rule,
    the others `dweight` (f'(s), IR over SCORE and WEIGHT, from the operator table's rule for f)."""

    normalized: bool
    dweight: Expr


def normalizer_backward(n: Normalizer) -> NormalizerBackward:
    return NormalizerBackward(n.normalized, _weight_derivative(n, SCORE, WEIGHT))


def weight_derivative(n: Normalizer, score: Expr) -> Expr:
    """f'(score) as IR of the score itself: NormalizerBackward.dweight with s = score and w = f(score), for a
    kernel that evaluates the score's expression (an emitter shares the nodes f and f' have in common)."""
    return _weight_derivative(n, score, Call(n.weight, (score,)))


def _weight_derivative(n: Normalizer, score: Expr, weight: Expr) -> Expr:
    return fold(function(n.weight).derivative[0]((score,), weight), {})


def plan_backward(plan: KernelPlan) -> BackwardPlan:
    """The backward kernels' tiles and the mask analysis transposed (rows per key tile) for a planned forward."""
    dkdv, dq, dq_kernel = backward_tiles(plan)
    masks = plan.masks
    layout, why = dkdv_layout(plan, bool(derive(plan.spec).score_tables), masks.data_dependent)
    # the Gluon dK/dV kernel leaves dQ to the dQ kernel, unless it reduce-adds dQ itself (dq_in_dkdv)
    if layout is not None:
        dq_kernel = not layout.dq_in_dkdv
    return BackwardPlan(dkdv, dq, PREP_TILE, query_range(masks), full_query_range(masks), dq_kernel, layout, why)


def derive(spec: Attention) -> Derivatives:
    """The partial derivatives of the (constant-folded) score and sink of `spec`."""
    kinds = Kinds(spec)
    floats = {t.name for t in spec.inputs if dtype_kind(t.dtype) == "float"}
    sink = spec.normalizer.sink
    return Derivatives(
        dqk=_as_float(derivative(spec.score, QK()), kinds),
        score_tables=_table_grads(spec.score, floats, kinds),
        sink_tables=() if sink is None else _table_grads(sink, floats, kinds),
    )


def _table_grads(e: Expr, floats: set[str], kinds: Kinds) -> tuple[TableGrad, ...]:
    lookups = [x for x in walk(e) if isinstance(x, Lookup) and x.tensor in floats]
    return tuple(TableGrad(x, _as_float(derivative(e, x), kinds)) for x in lookups)


def _as_float(e: Expr, kinds: Kinds) -> Expr:
    """Derivatives are floats: an integer one (`qk * 2` gives 2) is converted by the folder."""
    return e if kinds(e) == "float" else fold(Binary("*", e, ONE), {})


def derivative(e: Expr, leaf: Expr) -> Expr:
    """d e / d leaf, forward mode over the DAG: each distinct node is differentiated once, and a node that does
    not read `leaf` has derivative 0 (pruned, so a lookup's integer indices are never differentiated). The rules
    receive the node itself as `result`, so a backend evaluates f(x) once for f and f'."""
    memo: dict[Expr, Expr | None] = {}

    def d(node: Expr) -> Expr | None:
        if node not in memo:
            memo[node] = _derivative(node, leaf, d)
        return memo[node]

    result = d(e)
    return Num(0.0, True) if result is None else fold(result, {})


def _derivative(e: Expr, leaf: Expr, d: Callable[[Expr], Expr | None]) -> Expr | None:
    if e == leaf:
        return ONE
    if not isinstance(e, (Unary, Binary, Call)):
        return None  # leaves, and lookups other than `leaf` (their indices are integers)
    terms = []
    rules = op_of(e).derivative
    for index, operand in enumerate(children(e)):
        inner = d(operand)
        if inner is None:
            continue
        rule = rules[index] if rules is not None else None
        if rule is None:
            continue  # a boolean operand: no gradient through it
        terms.append(_times(rule(children(e), e), inner))
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = Binary("+", total, t)
    return total


def _times(a: Expr, b: Expr) -> Expr:
    if b == ONE:
        return a
    if a == ONE:
        return b
    return Binary("*", a, b)
