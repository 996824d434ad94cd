"""The hardware tanh (PlanOptions.approx_functions, tanh.approx.f32) against the 1.7-ulp formula in one process on
one GPU: the error of out, lse and the gradients against attnc.reference (float64, autograd) at two score scales,
then the time of the forward and of the training step (fwd+bwd) at the benchmark's softcap row (B=2 H=16 S=8192
D=128 bf16, cap 30, causal). Prints a table and writes JSON lines to --out.

    python benchmarks/ab_approx.py --out $OUT/ab-approx.jsonl
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import attnc
from attnc.passes import PlanOptions

SPEC = """
attention softcap_ab {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    param cap: f32 = 30.0
    score = cap * tanh(qk * rsqrt(D) / cap)
    mask i >= j
    return softmax(score) @ v, lse
}
"""
# the default forward (the Triton template: warpgroups.slower_than_the_template) with either tanh, and the Gluon
# forward with the hardware tanh (the formula on its consumers' critical path made it 0.64-0.80x the template's)
VARIANTS = {"formula": PlanOptions(approx_functions=False), "tanh.approx": PlanOptions(),
            "tanh.approx gluon": PlanOptions(gluon=True)}


def errors(kernel, ref_spec, q_scale: float, cap: float, gen: torch.Generator) -> dict:
    """Largest error of out, lse, dq, dk, dv against autograd through the float64 reference (on float32 copies of
    the inputs, `ref_spec`), each over the reference's largest magnitude, on fresh inputs (B=1 H=8 S=2048 D=128)
    whose scores reach about q_scale standard deviations. The reference's loss adds the term of delta taken from
    the rounded out, as tests/test_backward_triton.py's reference_grads does."""
    shape = (1, 8, 2048, 128)
    q, k, v, dout = (torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(4))
    q = (q.float() * q_scale).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = kernel(*leaves, cap=cap)
    out.backward(dout)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attnc.reference(ref_spec, *ref_leaves, cap=cap)
    def delta(o):
        return (dout.double() * o.double()).sum(-1)
    loss = (ref_out * dout.double()).sum() + (ref_lse * (delta(ref_out.detach()) - delta(out.detach()))).sum()
    loss.backward()
    worst = {}
    for name, got, want in (("out", out, ref_out), ("lse", lse, ref_lse),
                            *((f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", leaves, ref_leaves))):
        want = want.detach().double()
        worst[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ab-approx.jsonl")
    args = ap.parse_args()
    spec, ref_spec = attnc.parse(SPEC)[0], attnc.parse(SPEC.replace("bf16", "f32"))[0]
    kernels = {name: attnc.compile(spec, options=o) for name, o in VARIANTS.items()}
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    for q_scale in (1.0, 8.0):
        for name, kernel in kernels.items():
            e = errors(kernel, ref_spec, q_scale, 30.0, torch.Generator(device="cuda").manual_seed(7))
            rows.append({"what": "error", "variant": name, "q_scale": q_scale, **e})
            print(f"error  q x{q_scale:<4} {name:17s} " + "  ".join(f"{k} {x:.2e}" for k, x in e.items()))
    B, H, S, D = 2, 16, 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(4))
    flops = 4 * B * H * D * (S * (S + 1) // 2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for name, kernel in kernels.items():
        fwd = do_bench(lambda: kernel(q, k, v, cap=30.0), warmup=25, rep=200, return_mode="median")

        def step():
            out, _ = kernel(*leaves, cap=30.0)
            return torch.autograd.grad(out, leaves, dout)

        both = do_bench(step, warmup=25, rep=200, return_mode="median")
        row = {"what": "time", "variant": name, "fwd_ms": fwd, "fwd_tflops": flops / fwd * 1e-9,
               "step_ms": both, "step_tflops": 3.5 * flops / both * 1e-9}
        rows.append(row)
        print(f"time   {name:17s} fwd {fwd:.3f} ms {row['fwd_tflops']:.0f} TFLOP/s   fwd+bwd {both:.3f} ms "
              f"{row['step_tflops']:.0f} TFLOP/s")
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({"device": torch.cuda.get_device_name(), **r}) + "\n")


if __name__ == "__main__":
    main()
