"""Where the Gluon MLA decode kernel with quantised queries is off (issue 14; benchmarks/NOTES.md, session 15): one
grid point (64 heads, 64 sequences of 300 keys, FP8 latent) with q and qr quantised together and apart, float32 sums
every 32 and 0, and without quantisation; for each, out's and lse's largest error against the quantised and the
unquantised float64 reference, the worst sequences and the per-head error of the worst. Last, the scores from
torch._scaled_mm (the same fp8 tensor cores, float32 out) with the rest in float64: on the CPU that is 0.0052 off
(out's bf16 rounding alone), so on the GPU its error beyond that is the fp8 MMA's and the kernel's beyond it the
kernel's own.

    python3 benchmarks/fp8_queries_error.py     # sm_90 GPU, Triton 3.6"""
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
import torch
import attnc
import bench_mla
from attnc.dsl.reference import quantize_rows
from attnc.ir import Quantize
from attnc.passes import PlanOptions
from test_mla_grid import Point, grid_call, grid_spec

S = bench_mla.GPU
layout, point = "contiguous", Point(64, 64)
fp8 = grid_spec(layout, "fp8", S)
q, k, kw = grid_call(layout, "fp8", S, point)
plain, plain_lse = attnc.reference(fp8, q, k, **kw)
QQ, QR = Quantize("q", "f8e4m3"), Quantize("qr", "f8e4m3")
runs = [("q+qr every32", (QQ, QR), 32), ("q+qr every0", (QQ, QR), 0), ("q only", (QQ,), 32), ("qr only", (QR,), 32),
        ("none (bf16 q)", (), None)]
for name, quantize, every in runs:
    t0 = time.time()
    spec = replace(fp8, name=f"{fp8.name}_{len(quantize)}{quantize[0].tensor if quantize else ''}", quantize=quantize)
    want, want_lse = attnc.reference(spec, q, k, **kw) if quantize else (plain, plain_lse)
    opts = PlanOptions(gluon=True) if every is None else PlanOptions(gluon=True, fp8_float32_sum_every=every)
    try:
        kern = attnc.compile(spec, backend="triton", options=opts)
        out, lse = kern(q, k, **kw)
        torch.cuda.synchronize()
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300]); continue
    e = (out.double() - want).abs()  # [B, M, H, DV]
    el = (lse.double() - want_lse).abs()
    per_b = e.flatten(1).amax(1)
    worst = per_b.argsort(descending=True)[:5].tolist()
    b = worst[0]
    idx = (e[b] == e[b].max()).nonzero()[0].tolist()
    print(f"{name}: out err {e.max():.4f} (mean {e.mean():.5f}) |want| {want.abs().max():.3f}; vs plain "
          f"{(out.double() - plain).abs().max():.4f}; ref vs plain {(want - plain).abs().max():.4f}; lse err {el.max():.5f} "
          f"(ref vs plain {(want_lse - plain_lse).abs().max():.5f}); worst seqs {worst} {[round(per_b[i].item(), 4) for i in worst]}; "
          f"at {idx} out {out[b][tuple(idx)].item():.4f} want {want[b][tuple(idx)].item():.4f}; per-head err of seq {b}: "
          f"{[round(x, 3) for x in e[b].flatten(0, -2).amax(-1)[:12].tolist()]}; {time.time() - t0:.0f} s", flush=True)

# The tensor cores' own fp8 x fp8 products and sums, through torch._scaled_mm (float32 out, no fast accumulation),
# with the rest of the step in float64: near the reference, the kernel's error is its own; as far off as the kernel,
# it is the fp8 MMA's arithmetic.
def scaled_mm_dots(a8: torch.Tensor, b8: torch.Tensor, fast: bool) -> torch.Tensor:
    """a8 [B, M, H, K] @ b8 [B, N, K]^T in float32 through torch._scaled_mm, per sequence: [B, M, H, N]."""
    one = torch.ones((), device=a8.device)
    n = b8.shape[1]
    pad = -n % 16
    out = []
    for i in range(a8.shape[0]):
        lhs = a8[i].reshape(-1, a8.shape[-1]).contiguous()
        rhs = torch.cat([b8[i], torch.zeros(pad, b8.shape[-1], dtype=b8.dtype, device=b8.device)]) if pad else b8[i]
        dots = torch._scaled_mm(lhs, rhs.contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                use_fast_accum=fast)
        out.append(dots[:, :n].reshape(*a8.shape[1:-1], n))
    return torch.stack(out).double()


spec = replace(fp8, name=f"{fp8.name}_q8", quantize=(QQ, QR))
want, _ = attnc.reference(spec, q, k, **kw)
(q8, qs), (qr8, qrs) = (quantize_rows(x, "f8e4m3") for x in (q, kw["qr"]))
values = k.double() * kw["ckv_scale"]
for fast in (False, True):
    try:
        s = (scaled_mm_dots(q8, k, fast) * qs.double() * kw["ckv_scale"]
             + scaled_mm_dots(qr8, kw["kr"], fast) * qrs.double() * kw["kr_scale"]) * kw["scale"]
    except Exception as e:
        print(f"torch._scaled_mm (fast accumulation {fast}) FAILED", type(e).__name__, str(e)[:200])
        continue
    p = torch.softmax(s, -1)
    out = torch.einsum("bmhn,bnd->bmhd", p, values).to(torch.bfloat16).double()
    print(f"torch._scaled_mm scores (fast accumulation {fast}), the rest in float64: out err "
          f"{(out - want).abs().max():.4f}", flush=True)
