"""The exp2 domain: kernels evaluate the normalizer's weight map in base 2 on logits2 = score * log2(e), since
exp(s) = 2^(s log2 e) and sigmoid(s) = 1 / (1 + 2^(-s log2 e)); the factor folds into qk's scale."""
from __future__ import annotations

import math
from dataclasses import replace

from ..ir import QK, Binary, Expr, Num, Unary, walk
from .fold import fold
from .plan import KernelPlan, ScorePlan

LOG2E = Num(math.log2(math.e), True)


def to_exp2_domain(plan: KernelPlan) -> KernelPlan:
    sink = plan.spec.normalizer.sink
    return replace(plan, score=ScorePlan(scaled(plan.spec.score, LOG2E),
                                         None if sink is None else scaled(sink, LOG2E)))


def scaled(e: Expr, factor: Expr) -> Expr:
    """`e * factor`, distributed over + and - so that a term `qk * c` (c free of qk) becomes
    `qk * (c * factor)`: the product of constants folds, or is computed once per program."""
    if isinstance(e, Binary) and e.op in ("+", "-"):
        return Binary(e.op, scaled(e.lhs, factor), scaled(e.rhs, factor))
    if isinstance(e, Unary) and e.op == "neg":
        return Unary("neg", scaled(e.operand, factor))
    if isinstance(e, QK):
        return Binary("*", e, factor)
    if isinstance(e, Binary) and e.op == "*":
        for a, b in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
            if isinstance(a, QK) and not _has_qk(b):
                return Binary("*", a, fold(Binary("*", b, factor), {}))
    return fold(Binary("*", e, factor), {})


def _has_qk(e: Expr) -> bool:
    return any(isinstance(n, QK) for n in walk(e))
