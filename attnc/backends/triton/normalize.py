"""The normalizer's lowering for the Triton templates (ir.Normalizer): the code each template splices in at named
hooks, so that kernel.py.j2 and decode.py.j2 never know which normalizer they run.

In a key tile, `s` holds the base-2 logits (-inf where a key is not kept); the hooks keep per row `l_i`, the sum of
the weights so far (and `m_i`, the running max, where rows are normalised), and `acc`, the weighted sum of values:
    state           the lines that start m_i / l_i
    weights(masked) from `s`: `p`, the tile's weights, and l_i updated (masked: some row may have kept nothing yet)
    acc_scale       what acc is before this tile's P V is added (the old acc rescaled to the new running max)
    advance         the line that ends a tile (None: nothing to carry)
    out             from acc and l_i after the last tile: `l_safe` (l_i, 1 where 0) and `out`, 0 for a row that
                    kept no key
    log2_total      the base-2 log of the row's total weight from m_i and l_safe: lse / ln 2 where l_i > 0
    combine_acc     attn_combine's acc after a chunk of splits: their partial outs `parts` [splits, rows, DV], each
                    split weighted by `w` = exp2(lse_s - m) (alpha: the rescale of acc to the new max m)
    combine_out     attn_combine's out from acc and l_safe
The backward (backward.py.j2) recomputes a tile's weights from the forward's lse:
    recompute(row)  from `s` and `lse2` (the row's lse in base 2, +inf for a row that kept nothing): `p`, each
                    kept key's weight in out (0 where s = -inf); `row` broadcasts a row vector against the tile
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ...ir import Normalizer
from .emit import TRITON_VECTORS, Vectors, divide, reciprocal


class TritonNormalizer(ABC):
    acc_scale: str
    advance: str | None
    out: str
    log2_total: str
    combine_acc: str
    combine_out: str

    folds_logit_scale = False  # whether `weights` can take s unscaled and a positive scale (logit_scale)

    def __init__(self, exp2: str, vectors: Vectors = TRITON_VECTORS, logit_scale: float | None = None):
        self.exp2 = exp2  # the base-2 exponential's name in the generated module
        self.vectors = vectors  # how the module spells new vectors (Triton or Gluon)
        if logit_scale is not None and not self.folds_logit_scale:
            raise ValueError(f"{type(self).__name__} takes its logits scaled")
        # where set, the forward's `s` is qk and the base-2 logits are s * logit_scale (a positive literal)
        self.logit_scale = logit_scale

    def reciprocal(self, x: str) -> str:
        """1 / x: on a GPU (the inline-PTX exp2) the one-instruction rcp_approx, as emit.py's formulas divide."""
        return reciprocal(self.exp2, x)

    def per_row(self, acc: str, divisor: str) -> str:
        """`acc` [BLOCK_M, BLOCK_DV] over the row vector `divisor` (at least 1): on a GPU one reciprocal a row."""
        return divide(self.exp2, acc, divisor, "[:, None]")

    @property
    @abstractmethod
    def state(self) -> str:
        """The lines that start the running state."""

    @abstractmethod
    def weights(self, masked) -> str:
        """The lines of a key tile that turn `s` into `p` and update the running state."""

    @abstractmethod
    def recompute(self, row: str) -> str:
        """The backward's line that turns `s` into `p` given the row's `lse2`."""


class _Normalised(TritonNormalizer):
    """p = exp2(s - m) with a running max m, l the running sum (rescaled by alpha whenever m grows)."""

    @property
    def state(self) -> str:
        return (f"m_i = {self.vectors.full('[BLOCK_M]', '-INF', 'tl.float32')}  # running max, base 2\n"
                f"l_i = {self.vectors.zeros('[BLOCK_M]', 'tl.float32')}")

    acc_scale = "acc * alpha[:, None]"
    advance = "m_i = m_new"

    @property
    def out(self) -> str:
        return f"l_safe = tl.where(l_i == 0.0, 1.0, l_i)\nout = {self.per_row('acc', 'l_safe')}"

    log2_total = "tl.where(m_i == INF, INF, m_i + tl.log2(l_safe))"  # a +inf logit: +inf, though its weights are NaN
    # where, not a product alone: a split with weight 0 contributes 0 whatever its partial row holds
    combine_acc = "acc * alpha[:, None] + tl.sum(tl.where(w[:, :, None] > 0, w[:, :, None] * parts, 0.0), 0)"

    @property
    def combine_out(self) -> str:
        return self.per_row("acc", "l_safe")

    folds_logit_scale = True

    def weights(self, masked) -> str:
        safe = ("m_safe = tl.where(m_new == -INF, 0.0, m_new)  # a row with nothing kept yet: exp2(-inf - 0) = 0, "
                "not NaN" if masked else "m_safe = m_new  # a full tile keeps a key in every row: the max is finite")
        if self.logit_scale is None:
            tile_max, exponent = "tl.max(s, 1)", "s - m_safe[:, None]"
        else:
            # s is qk: the scale is positive, so the row's max scales with it (rounding is monotonic), and s * c - m
            # is one FFMA an element where scaling s first took a multiply and a subtract
            c = repr(self.logit_scale)
            tile_max, exponent = f"tl.max(s, 1) * {c}", f"s * {c} - m_safe[:, None]"
        return "\n".join([f"m_new = tl.maximum(m_i, {tile_max})", safe,
                          f"p = {self.exp2}({exponent})",
                          f"alpha = {self.exp2}(m_i - m_safe)",
                          "l_i = l_i * alpha + tl.sum(p, 1)"])

    def recompute(self, row: str) -> str:
        return f"p = {self.exp2}(s - lse2{row})"


class _Sigmoid(TritonNormalizer):
    """p = sigmoid(s ln 2) = 1 / (1 + exp2(-s)), in (0, 1): no running max. s = -inf (not kept) or very negative
    gives exp2(-s) = inf and p = 0, not NaN; the outs of splits add up."""

    @property
    def state(self) -> str:
        return f"l_i = {self.vectors.zeros('[BLOCK_M]', 'tl.float32')}  # the row's total weight"

    acc_scale = "acc"
    advance = None
    out = "l_safe = tl.where(l_i == 0.0, 1.0, l_i)\nout = acc  # not normalised: a row that kept no key holds 0"
    log2_total = "tl.log2(l_safe)"
    combine_acc = "acc + tl.sum(parts, 0)"  # every split writes its rows (0 where it kept no key)
    combine_out = "acc"

    def weights(self, masked) -> str:
        return f"{self.recompute('')}\nl_i = l_i + tl.sum(p, 1)"

    def recompute(self, row: str) -> str:
        return f"p = {self.reciprocal(f'1.0 + {self.exp2}(-s)')}"  # the divisor is at least 1


_LOWERINGS: dict[str, type[TritonNormalizer]] = {"softmax": _Normalised, "sigmoid": _Sigmoid}


def lower(normalizer: Normalizer, exp2: str, vectors: Vectors = TRITON_VECTORS,
          logit_scale: float | None = None) -> TritonNormalizer:
    """The hooks of `normalizer`, with `exp2` the name of the base-2 exponential the kernel calls; `logit_scale`: the
    forward's `s` is qk and the logits are s times it (only where folds_logit_scale)."""
    return _LOWERINGS[normalizer.name](exp2, vectors, logit_scale)


def folds_logit_scale(normalizer: Normalizer) -> bool:
    return _LOWERINGS[normalizer.name].folds_logit_scale
