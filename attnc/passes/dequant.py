"""FP8 K/V caches (`dequant k by k_scale`): the kernels compute on the stored FP8 values, converted exactly to the
query's dtype, and apply each scale where it is constant. A key-side scale is constant along a dot product (one
per K/V head), so `q @ k` over dequantised keys is `(q @ k) * scale`: the score reads it and the exp2 domain
folds it with qk's other factors (one multiply per score). The values' scale is constant along the weighted sum
and every normalizer's partial results merge linearly, so it multiplies the output rows (`value_scale`)."""
from __future__ import annotations

from dataclasses import replace

from ..ir import QK, Binary, Expr, children, with_children
from .plan import KernelPlan


def dequantize(plan: KernelPlan) -> KernelPlan:
    spec = plan.spec
    if not spec.dequant:
        return plan
    memo: dict[Expr, Expr] = {}

    def scaled(e: Expr) -> Expr:
        if e not in memo:
            scale = spec.scale_of(e.key) if isinstance(e, QK) else None
            memo[e] = with_children(e, tuple(scaled(c) for c in children(e))) if scale is None else \
                Binary("*", e, scale)
        return memo[e]

    return replace(plan, spec=replace(spec, score=scaled(spec.score)), value_scale=spec.scale_of(spec.v.name))

