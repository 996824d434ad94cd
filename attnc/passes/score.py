"""The exp2 domain: kernels evaluate the normalizer's weight map in base 2 on logits2 = score * log2(e), since
exp(s) = 2^(s log2 e) and sigmoid(s) = 1 / (1 + 2^(-s log2 e)); the factor folds into qk's scale."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ..ir import QK, Binary, Call, Expr, IndexVar, Num, Unary, children, post_order, walk, with_children
from ..ops import op_of
from .fold import fold
from .plan import KernelPlan, ScorePlan

LOG2E = Num(math.log2(math.e), True)


def to_exp2_domain(plan: KernelPlan) -> KernelPlan:
    sink = plan.spec.normalizer.sink
    return replace(plan, score=ScorePlan(scaled(plan.spec.score, LOG2E),
                                         None if sink is None else scaled(sink, LOG2E)))


def scaled(e: Expr, factor: Expr) -> Expr:
    """`e * factor`, distributed over the additive operators (+, -, unary -: the operator table's `linearity`)
    that read qk, so that a term `qk * c` (c free of qk) becomes `qk * (c * factor)`, and a product `c * x` whose
    c varies along fewer axes than x (per program or per row, x per score) is x scaled by c * factor: the product of
    the coarser factors folds, or is computed once where it lives. Each distinct node is scaled once."""
    memo: dict[Expr, Expr] = {}
    reads_qk = _qk_reader()

    def scale(node: Expr) -> Expr:
        if node not in memo:
            memo[node] = _scaled(node, factor, scale, reads_qk)
        return memo[node]

    return scale(e)


def _scaled(e: Expr, factor: Expr, scale, reads_qk) -> Expr:
    coarse = _coarse_factor(e, reads_qk)
    if coarse is not None:
        varying, c = coarse
        if reads_qk(varying):
            return scaled(varying, fold(Binary("*", c, factor), {}))
        return Binary("*", varying, fold(Binary("*", c, factor), {}))
    if not reads_qk(e):  # scaled whole: `(j - i) * factor` keeps the exact integer difference
        return fold(Binary("*", e, factor), {})
    if isinstance(e, (Unary, Binary, Call)) and op_of(e).linearity == "additive":
        parts = [scale(x) for x in children(e)]
        return Unary(e.op, parts[0]) if isinstance(e, Unary) else Binary(e.op, *parts)
    if isinstance(e, QK):
        return Binary("*", e, factor)
    split = _qk_times(e, reads_qk)
    if split is not None:
        dot, rest = split
        return Binary("*", dot, fold(Binary("*", rest, factor), {}))
    return fold(Binary("*", e, factor), {})


def _coarse_factor(e: Expr, reads_qk) -> tuple[Expr, Expr] | None:
    """(x, c) where `e` is `c * x` or `x * c`, c free of qk and varying along fewer axes than x; else None."""
    if not (isinstance(e, Binary) and e.op == "*"):
        return None
    for varying, c in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
        if not reads_qk(c) and axes_of(c) < axes_of(varying):
            return varying, c
    return None


def _qk_reader() -> Callable[[Expr], bool]:
    """Whether a node reads a dot product, memoised by node for one rewrite (linear in a DAG)."""
    has_qk: dict[int, bool] = {}

    def reads_qk(node: Expr) -> bool:
        if id(node) not in has_qk:
            has_qk[id(node)] = isinstance(node, QK) or any(reads_qk(c) for c in children(node))
        return has_qk[id(node)]

    return reads_qk


def qk_times(e: Expr) -> tuple[QK, Expr] | None:
    """_qk_times for a caller without a reader of its own (the Triton softmax's constant logit scale)."""
    return _qk_times(e, _qk_reader())


def _qk_times(e: Expr, reads_qk) -> tuple[QK, Expr] | None:
    """(qk, c) where `e` is a product of one dot product and factors free of qk, in any nesting (`qk * scale * c`,
    as FP8 keys' dequant scale makes it: passes/dequant.py); c is the product of those factors. None otherwise."""
    if not (isinstance(e, Binary) and op_of(e).linearity == "product"):
        return None
    for a, b in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
        if reads_qk(b):
            continue
        if isinstance(a, QK):
            return a, b
        inner = _qk_times(a, reads_qk)
        if inner is not None:
            return inner[0], Binary("*", inner[1], b)
    return None


# The axes a value varies along in a kernel: a score tile along the query rows and the keys; h goes with the rows
# (packed GQA heads share a tile's rows); b, sizes, params and literals are the same for a whole program.
_AXES = {"i": frozenset("i"), "h": frozenset("i"), "j": frozenset("j")}
_TILE = frozenset("ij")


def _own_axes(node: Expr) -> frozenset:
    """The axes a node adds to its children's: a dot product's i and j, an index variable's own."""
    if isinstance(node, QK):
        return _TILE
    return _AXES.get(node.name, frozenset()) if isinstance(node, IndexVar) else frozenset()


def axes_of(e: Expr) -> frozenset:
    """The axes among i (query rows) and j (keys) along which `e` varies in a kernel."""
    return frozenset().union(*(_own_axes(n) for n in walk(e)))


def reciprocal_divisors(plan: KernelPlan) -> KernelPlan:
    """by_reciprocals on the score, in the spec too: the backward differentiates plan.spec.score, and its
    derivative then reads the same subexpressions as the logits (one tanh a score, not two)."""
    return replace(plan, spec=replace(plan.spec, score=by_reciprocals(plan.spec.score)),
                   score=replace(plan.score, logits2=by_reciprocals(plan.score.logits2)))


def by_reciprocals(e: Expr) -> Expr:
    """`e` with each `a / b` whose divisor varies along fewer axes than its dividend (b per program, per row or per
    key, a per score) written `a * (1 / b)`, or `qk * (c * (1 / b))` where a is `qk * c`: the kernel computes the
    reciprocal where b lives and a score pays one multiply, not div.full.f32's three more instructions."""
    axes: dict[int, frozenset] = {}
    reads_qk = _qk_reader()
    done: dict[int, Expr] = {}
    for node in post_order(e):
        parts = tuple(done[id(c)] for c in children(node))
        axes[id(node)] = _own_axes(node).union(*(axes[id(c)] for c in children(node)))
        new = with_children(node, parts) if parts else node
        if isinstance(node, Binary) and node.op == "/" and axes[id(node.rhs)] < axes[id(node.lhs)]:
            dividend, reciprocal = parts[0], Binary("/", Num(1.0, True), parts[1])
            split = _qk_times(dividend, reads_qk)
            new = (Binary("*", split[0], fold(Binary("*", split[1], reciprocal), {})) if split is not None
                   else Binary("*", dividend, fold(reciprocal, {})))
        done[id(node)] = new
    return done[id(e)]
