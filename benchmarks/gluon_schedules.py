"""The Gluon prefill's consumer schedules side by side (issue 13): pingpong / parallel / cooperative against the
Triton template and cuDNN on the same inputs in one process, each output checked against cuDNN's first. Whether
pingpong beats parallel says whether the handoff orders the two consumers' MMAs at all (benchmarks/NOTES.md, the
per-row floors: the Gluon rows sit near the floor without overlap).

    python3 benchmarks/gluon_schedules.py     # on an sm_90 GPU with Triton 3.6"""
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnc
from attnc.bench import error_text
from attnc.passes import PlanOptions

SPEC = """attention a {{
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    score = qk * rsqrt(D)
    {mask}
    return softmax(score) @ v
}}"""


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for causal in (False, True):
        for S in (4096, 16384):
            B, H, D = 16384 // S * 2, 16, 128
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            spec = attnc.parse(SPEC.format(mask="mask causal" if causal else ""))[0]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                                warmup=50, rep=300)
            row = {"cudnn": flops / cudnn / 1e9}
            for name, opts in [("template", PlanOptions(gluon=False))] + [
                    (s, PlanOptions(gluon=True, warpgroup_schedule=s)) for s in ("pingpong", "parallel", "cooperative")]:
                try:
                    kern = attnc.compile(spec, options=opts)
                    out = kern(q, k, v)
                    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
                    ms = triton.testing.do_bench(lambda: kern(q, k, v), warmup=50, rep=300)
                    path = kern.plan(q.device, D).warpgroups.path
                    row[name] = f"{flops / ms / 1e9:.0f} ({path}, err {err:.1e})"
                except Exception as e:
                    row[name] = error_text(e)
            print(f"{'causal' if causal else 'dense'} S={S} B={B} H={H} D={D}: cudnn {row.pop('cudnn'):.0f} TFLOP/s;",
                  "; ".join(f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
