"""MLA's non-absorbed prefill (D = 192, DV = 128, causal) with D in chunks (128 + 64, one dot each) against D padded to
256, in one process on one GPU: bench_mla.py's prefill workloads (and dense D = 128 at the same B, H, S for scale),
each runner checked against the float32 formula with NaN-poisoned outputs, then timed from CUDA graphs; one JSON
line per workload. Runners (PlanOptions):

    gluon             gluon=True: the Gluon warpgroup kernel, the default path from M = 4096 (pads D to 256)
    padded            gluon=False, chunk_head_dim=False: the Triton template as main builds it (D padded to 256)
    chunked           gluon=False: the Triton template with D in chunks (this change), the plan's tile
    chunked-128x128   the same at BM = BN = 128, 8 warps (chunks fit 2 stages there; padded D fits 1)

    PYTHONPATH=$PWD python benchmarks/ab_prefill192.py --out $OUT/ab_prefill192.jsonl
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/ab_prefill192.py --smoke --out /tmp/ab.jsonl  # CPU, tiny
"""
from __future__ import annotations

import argparse
import json
import re

import torch

import attnc
from attnc.passes import PlanOptions
from bench_mla import GPU, SMOKE, PrefillWorkload, measure, prefill_reference, prefill_spec, prefill_workloads

RUNNERS = {
    "gluon": PlanOptions(gluon=True),
    "padded": PlanOptions(gluon=False, chunk_head_dim=False),
    "chunked": PlanOptions(gluon=False),
    "chunked-128x128": PlanOptions(gluon=False, block_m=128, block_n=128, num_warps=8),
}
SMOKE_WORKLOADS = (PrefillWorkload(1, 2, 40, 48, 32), PrefillWorkload(1, 2, 40, 32, 32))  # 48 = 32 + 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines file, appended to")
    ap.add_argument("--only", default=None, help="regex over the workload names")
    ap.add_argument("--smoke", action="store_true", help="TRITON_INTERPRET=1 on a CPU: tiny f32 shapes")
    args = ap.parse_args()
    device, shapes = ("cpu", SMOKE) if args.smoke else ("cuda", GPU)
    for w in SMOKE_WORKLOADS if args.smoke else prefill_workloads(quick=False):
        if args.only and not re.search(args.only, w.name):
            continue
        gen = torch.Generator(device=device).manual_seed(w.S * 31 + w.D)
        q, k = (torch.randn(w.B, w.H, w.S, w.D, device=device, dtype=shapes.dtype, generator=gen) for _ in range(2))
        v = torch.randn(w.B, w.H, w.S, w.DV, device=device, dtype=shapes.dtype, generator=gen)
        spec = prefill_spec(w, shapes)
        kernels = {name: attnc.compile(spec, backend="triton", options=o) for name, o in RUNNERS.items()}
        row = {"workload": w.name, "flops": w.flops, "results": {}}
        measure({f"attnc-{name}": (lambda kern=kern: kern(q, k, v)) for name, kern in kernels.items()},
                prefill_reference(q, k, v), device, row)
        tflops = {name: r.get("tflops") for name, r in row["results"].items()}
        errors = {name: r["error"] for name, r in row["results"].items() if "error" in r}
        print(f"{w.name:<44} " + "  ".join(f"{n[6:]} {t or 0:6.1f}" for n, t in tflops.items())
              + (f"  {json.dumps(errors)}" if errors else ""), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
