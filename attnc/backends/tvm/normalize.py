"""The normalizer's lowering for the TVM kernels (ir.Normalizer), one row's arithmetic as TIR expressions; the CPU,
GPU and CUDA builders place it in their own loops and registers.

Per row a kernel keeps `l`, the sum of the weights so far, and where rows are normalised (`running_max`) also `m`,
the running max of the base-2 logits: each key tile then rescales l and the output by exp2(m_old - m_new) and
weighs its keys relative to the new max. `native`: the target evaluates exp2 in hardware (GPUs); else the
vectorizable polynomials of emit.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tvm import tirx as tir

from ...ir import Normalizer
from .emit import LN2, exp2, exp2_nonpositive, f32

NEG_INF = -math.inf


@dataclass(frozen=True)
class TirNormalizer:
    running_max: bool  # rows are normalised: keep m, rescale l and the output when it grows
    # weight(s, m_safe, native): a key's weight from its base-2 logit s (-inf: not kept) and the row's m_safe (the
    # running max, 0 while the row has kept nothing; unused without a running max)
    weight: Callable[[tir.PrimExpr, tir.PrimExpr, bool], tir.PrimExpr]
    # out = acc * out_scale(l); 0 where l == 0 if it divides (and NaN where l is: a NaN weight reaches the output)
    out_scale: Callable[[tir.PrimExpr], tir.PrimExpr]
    log2_total: Callable[[tir.PrimExpr, tir.PrimExpr], tir.PrimExpr]  # log2 of the total weight from m, l > 0

    def lse(self, m: tir.PrimExpr, l_sum: tir.PrimExpr) -> tir.PrimExpr:
        """The natural-log lse of a row from its running max (base 2) and sum; -inf for a row that kept nothing,
        NaN for a row whose sum is NaN."""
        return tir.Select(l_sum == f32(0), f32(NEG_INF), self.log2_total(m, l_sum) * f32(LN2))


def _exp_weight(s, m_safe, native: bool):
    return (tir.exp2 if native else exp2_nonpositive)(s - m_safe)  # s <= m: the argument is never positive


def _sigmoid_weight(s, m_safe, native: bool):
    # sigmoid(s ln 2) = 1 / (1 + 2^-s): s = -inf or very negative gives 2^-s = inf and a weight of 0, not NaN
    return f32(1.0) / (f32(1.0) + (tir.exp2 if native else exp2)(-s))


_LOWERINGS = {
    "softmax": TirNormalizer(
        running_max=True, weight=_exp_weight,
        out_scale=lambda l_sum: tir.Select(l_sum == f32(0), f32(0), f32(1) / l_sum),
        # a +inf logit: +inf, as the reference's logsumexp, though its weights are NaN
        log2_total=lambda m, l_sum: tir.Select(m == f32(math.inf), m, m + tir.log2(l_sum))),
    "sigmoid": TirNormalizer(
        running_max=False, weight=_sigmoid_weight, out_scale=lambda l_sum: f32(1),
        log2_total=lambda m, l_sum: tir.log2(l_sum)),
}


def lower(normalizer: Normalizer) -> TirNormalizer:
    return _LOWERINGS[normalizer.name]
