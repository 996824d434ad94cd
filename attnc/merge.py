"""attnc.merge_states: one attention result from two partial ones over disjoint key sets.

(out_a, lse_a) attends over the keys K_a and (out_b, lse_b) over K_b, K_a and K_b disjoint; the merge is
attention over K_a + K_b (cascade / shared-prefix attention, split-KV decode, ring attention). How the outs
combine is the normalizer's (ir.Normalizer.merge): rows it normalises (softmax) merge through the lse, the
weights of one that does not (sigmoid) simply add up, and an lse merge of those would be wrong:

    lse = log(exp(lse_a) + exp(lse_b))                              (every normalizer)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b       (merge "lse")
    out = out_a + out_b                                             (merge "sum")

A side whose lse is -inf (a row that kept no key) adds nothing, whatever its out holds; when both are -inf
the row is out = 0, lse = -inf, as a row with no kept key is everywhere in attnc (DESIGN.md). Computed in
float32; out comes back in out_a's dtype and layout, lse as float32 in lse_a's shape.

CUDA tensors run a Triton kernel; CPU tensors too when TRITON_INTERPRET=1 (Triton's interpreter), else the
same formula in torch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .errors import CallError, checks_arguments
from .ir import DEFAULT_NORMALIZER, NORMALIZERS, Attention, Normalizer

# Each layout: (out's shape as sizes, lse's shape as sizes); rows are out's leading axes, D its last.
LAYOUTS = {
    "bhsd": ("BHMD", "BHM"),  # out [B, H, M, D], lse [B, H, M] (attnc's lse for any dense q)
    "bshd": ("BMHD", "BHM"),  # out [B, M, H, D], lse [B, H, M]
    "thd": ("THD", "HT"),  # out [T, H, D], lse [H, T] (packed sequences, as FlashAttention's varlen)
}


@checks_arguments
def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                 layout: str | None = None, normalizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention over the union of the key sets of two partial results. `layout` is 'bhsd',
    'bshd' or 'thd' (see LAYOUTS); None infers it from the shapes. `normalizer` is the one the halves were
    computed with: its name ('softmax', 'sigmoid'), an ir.Normalizer, or the spec (attnc.Attention) that made
    them; None is softmax. It decides how the outs merge (module doc)."""
    summed = _merge_rule(normalizer) == "sum"
    layout = _check(out_a, lse_a, out_b, lse_b, layout)
    out = empty(out_a.shape, out_a.dtype, out_a.device)
    lse = empty(lse_a.shape, torch.float32, lse_a.device)
    rows = [_rows(t, layout) for t in (out_a, out_b, out, lse_a, lse_b, lse)]
    if lse.numel():
        if out.is_cuda or _interpreting():
            _merge_triton(*rows, summed)
        else:
            _merge_torch(*rows, summed)
    return out, lse


# ---------------------------------------------------------------- checks


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where the results are allocated (tests fill them with NaN, so an unwritten element fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _merge_rule(normalizer) -> str:
    if isinstance(normalizer, Attention):
        normalizer = normalizer.normalizer
    if normalizer is None:
        normalizer = DEFAULT_NORMALIZER()
    elif isinstance(normalizer, str) and normalizer in NORMALIZERS:
        normalizer = NORMALIZERS[normalizer]()
    if not isinstance(normalizer, Normalizer):
        raise CallError(f"normalizer: expected one of {', '.join(map(repr, NORMALIZERS))}, an attnc.Attention "
                        f"or None, got {normalizer!r}; it must be the normalizer the halves were computed with")
    return normalizer.merge


def _check(out_a, lse_a, out_b, lse_b, layout: str | None) -> str:
    named = (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise CallError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise CallError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise CallError(f"{name}: is on {t.device} but out_a is on {out_a.device}; put every tensor on one device")
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype:
        raise CallError(f"out_b: expected out_a's shape {tuple(out_a.shape)} and dtype {out_a.dtype}, got "
                        f"{tuple(out_b.shape)} {out_b.dtype}; both halves come from the same query rows")
    if lse_b.shape != lse_a.shape:
        raise CallError(f"lse_b: expected lse_a's shape {tuple(lse_a.shape)}, got {tuple(lse_b.shape)}")
    if layout is not None:
        if layout not in LAYOUTS:
            raise CallError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        if not _fits(out_a, lse_a, layout):
            out_dims, lse_dims = LAYOUTS[layout]
            raise CallError(f"lse_a: with layout {layout!r}, out [{', '.join(out_dims)}] = {tuple(out_a.shape)} "
                            f"needs lse [{', '.join(lse_dims)}] = {_lse_shape(out_a, layout)}, got "
                            f"{tuple(lse_a.shape)}")
        return layout
    fits = [name for name in LAYOUTS if _fits(out_a, lse_a, name)]
    if not fits:
        raise CallError(f"lse_a: shape {tuple(lse_a.shape)} does not fit out_a {tuple(out_a.shape)} in any layout: "
                        + "; ".join(f"{name}: out [{', '.join(o)}] with lse [{', '.join(s)}]"
                                    for name, (o, s) in LAYOUTS.items()))
    if len(fits) > 1 and out_a.shape[1] != 1:  # H == M: the rows pair up differently (alike only when both are 1)
        raise CallError(f"layout: out_a {tuple(out_a.shape)} with lse {tuple(lse_a.shape)} fits both "
                        f"{' and '.join(map(repr, fits))} (H == M); pass layout=")
    return fits[0]


def _lse_shape(out: torch.Tensor, layout: str) -> tuple[int, ...] | None:
    out_dims, lse_dims = LAYOUTS[layout]
    if out.dim() != len(out_dims):
        return None
    sizes = dict(zip(out_dims, out.shape))
    return tuple(sizes[n] for n in lse_dims)


def _fits(out: torch.Tensor, lse: torch.Tensor, layout: str) -> bool:
    return _lse_shape(out, layout) == tuple(lse.shape)


def _rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of out ([R0, R1, R2, D]) or lse ([R0, R1, R2]) with rows in out's order; no copy."""
    is_lse = t.dim() == len(LAYOUTS[layout][1])
    if layout == "bhsd":
        return t
    if layout == "bshd":
        return t.permute(0, 2, 1) if is_lse else t
    return t.t()[None] if is_lse else t[None]  # thd: one "batch"


# ---------------------------------------------------------------- the merge, twice


def _merge_torch(out_a, out_b, out, lse_a, lse_b, lse, summed: bool) -> None:
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = torch.where(m == -torch.inf, 0.0, m)  # both empty: keep exp() away from -inf - -inf
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    weight = wa + wb
    lse.copy_(torch.where(weight > 0, m + torch.log(weight), -torch.inf))
    if summed:  # a side counts where it kept a key
        wa, wb = (la > -torch.inf).float(), (lb > -torch.inf).float()
    else:
        safe = torch.where(weight > 0, weight, 1.0)
        wa, wb = wa / safe, wb / safe
    # where() rather than a product, so that an empty side's out (NaN, say) cannot leak into the result
    merged = (torch.where(wa[..., None] > 0, out_a.float() * wa[..., None], 0.0)
              + torch.where(wb[..., None] > 0, out_b.float() * wb[..., None], 0.0))
    out.copy_(merged)


def _merge_triton(out_a, out_b, out, lse_a, lse_b, lse, summed: bool) -> None:
    r0, r1, r2, d = out.shape
    rows = r0 * r1 * r2
    block_d = triton.next_power_of_2(max(d, 1))
    block_r = max(1, min(64, 4096 // block_d))
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        out_a, out_b, out, lse_a, lse_b, lse, rows, r1, r2, d,
        *out_a.stride(), *out_b.stride(), *out.stride(), *lse_a.stride(), *lse_b.stride(), *lse.stride(),
        SUMMED=summed, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


@triton.jit
def _merge_kernel(oa, ob, o, la, lb, lo, rows, R1, R2, D,
                  oa_s0, oa_s1, oa_s2, oa_s3, ob_s0, ob_s1, ob_s2, ob_s3, o_s0, o_s1, o_s2, o_s3,
                  la_s0, la_s1, la_s2, lb_s0, lb_s1, lb_s2, lo_s0, lo_s1, lo_s2,
                  SUMMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """SUMMED: the outs add up (merge "sum"), else they are weighted by exp(lse_side - lse)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    live = r < rows
    r0, r1, r2 = r // (R1 * R2), (r // R2) % R1, r % R2
    lse_a = tl.load(la + r0 * la_s0 + r1 * la_s1 + r2 * la_s2, mask=live, other=-float("inf")).to(tl.float32)
    lse_b = tl.load(lb + r0 * lb_s0 + r1 * lb_s1 + r2 * lb_s2, mask=live, other=-float("inf")).to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    m = tl.where(m == -float("inf"), 0.0, m)  # both empty: keep exp() away from -inf - -inf
    wa = tl.exp(lse_a - m)
    wb = tl.exp(lse_b - m)
    weight = wa + wb
    tl.store(lo + r0 * lo_s0 + r1 * lo_s1 + r2 * lo_s2,
             tl.where(weight > 0, m + tl.log(tl.where(weight > 0, weight, 1.0)), -float("inf")), mask=live)
    if SUMMED:  # a side counts where it kept a key
        wa = tl.where(lse_a > -float("inf"), 1.0, 0.0)
        wb = tl.where(lse_b > -float("inf"), 1.0, 0.0)
    else:
        scale = 1.0 / tl.where(weight > 0, weight, 1.0)
        wa = wa * scale
        wb = wb * scale
    d = tl.arange(0, BLOCK_D)
    cols = live[:, None] & (d < D)[None, :]
    # An empty side's out is never loaded, so whatever it holds (NaN, say) cannot leak into the result.
    xa = tl.load(oa + (r0 * oa_s0 + r1 * oa_s1 + r2 * oa_s2)[:, None] + d[None, :] * oa_s3,
                 mask=cols & (wa > 0)[:, None], other=0.0).to(tl.float32)
    xb = tl.load(ob + (r0 * ob_s0 + r1 * ob_s1 + r2 * ob_s2)[:, None] + d[None, :] * ob_s3,
                 mask=cols & (wb > 0)[:, None], other=0.0).to(tl.float32)
    merged = xa * wa[:, None] + xb * wb[:, None]
    tl.store(o + (r0 * o_s0 + r1 * o_s1 + r2 * o_s2)[:, None] + d[None, :] * o_s3,
             merged.to(o.dtype.element_ty), mask=cols)
