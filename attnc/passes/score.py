"""The exp2 domain: kernels evaluate the normalizer's weight map in base 2 on logits2 = score * log2(e), since
exp(s) = 2^(s log2 e) and sigmoid(s) = 1 / (1 + 2^(-s log2 e)); the factor folds into qk's scale."""
from __future__ import annotations

import math
from dataclasses import replace

from ..ir import QK, Binary, Call, Expr, Num, Unary, children
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
    so that a term `qk * c` (c free of qk) becomes `qk * (c * factor)`: the product of constants folds, or is
    computed once per program. Each distinct node is scaled once."""
    memo: dict[Expr, Expr] = {}
    has_qk: dict[Expr, bool] = {}

    def reads_qk(node: Expr) -> bool:
        if node not in has_qk:
            has_qk[node] = isinstance(node, QK) or any(reads_qk(c) for c in children(node))
        return has_qk[node]

    def scale(node: Expr) -> Expr:
        if node not in memo:
            memo[node] = _scaled(node, factor, scale, reads_qk)
        return memo[node]

    return scale(e)


def _scaled(e: Expr, factor: Expr, scale, reads_qk) -> Expr:
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
