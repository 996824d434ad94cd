"""MLA's non-absorbed prefill (D = 192, DV = 128, causal) with D in chunks (128 + 64, one dot each) against D padded to
256, in one process on one GPU: bench_mla.py's prefill workloads (and dense D = 128 at the same B, H, S for scale),
each runner checked against the float32 formula with NaN-poisoned outputs, then timed from CUDA graphs; one JSON
line per workload, which also records per runner the kernel that ran (Gluon or the template, and its layout).
Runners (PlanOptions):

    gluon-padded      gluon=True, chunk_head_dim=False: the Gluon warpgroup kernel as main builds it, the default path
                      from M = 4096 (D padded to 256, 64-key tiles)
    gluon-chunked     gluon=True: the Gluon kernel with Q and K in chunks (QK^T two chained wgmmas), 128-key tiles
    gluon-chunked-64  the same at 64-key tiles (warpgroup_block_n=64, 3 stages): chunks alone, without the wider tile
    padded            gluon=False, chunk_head_dim=False: the Triton template as main builds it (D padded to 256)
    chunked           gluon=False: the Triton template with D in chunks, the plan's tile
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
from attnc.backends.triton import gluon
from attnc.passes import PlanOptions
from attnc.passes.tiling import prefill_tile
from bench_mla import GPU, SMOKE, PrefillWorkload, measure, prefill_reference, prefill_spec, prefill_workloads

RUNNERS = {
    "gluon-padded": PlanOptions(gluon=True, chunk_head_dim=False),
    "gluon-chunked": PlanOptions(gluon=True),
    "gluon-chunked-64": PlanOptions(gluon=True, warpgroup_block_n=64),
    "padded": PlanOptions(gluon=False, chunk_head_dim=False),
    "chunked": PlanOptions(gluon=False),
    "chunked-128x128": PlanOptions(gluon=False, block_m=128, block_n=128, num_warps=8),
}
SMOKE_WORKLOADS = (PrefillWorkload(1, 2, 40, 48, 32), PrefillWorkload(1, 2, 40, 32, 32))  # 48 = 32 + 16


def kernel_that_runs(kern, q, k, v) -> str:
    """Which forward kernel one call of `kern` launches: the Gluon kernel (its layout) or the template (its tile),
    seen by the Gluon launcher's per-call choice, so a Gluon runner that fell back shows as the template."""
    plan = kern.plan(q.device, q.shape[-1], v.shape[-1])
    took = []
    covers = gluon.GluonLauncher.covers

    def counted(self, bound):
        took.append(covers(self, bound))
        return took[-1]

    gluon.GluonLauncher.covers = counted
    try:
        kern(q, k, v)
    finally:
        gluon.GluonLauncher.covers = covers
    if took == [True]:
        w = plan.warpgroups.layout
        return f"gluon BN={w.block_n} stages={w.stages} chunks={'+'.join(map(str, w.d_chunks))}"
    t = plan.tiling
    c = prefill_tile(t, q.shape[2])  # q is [B, H, M, D]
    return f"template {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} chunks={'+'.join(map(str, t.d_chunks))}"


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
        row = {"workload": w.name, "flops": w.flops, "results": {}, "kernels": {}}
        for name, kern in kernels.items():
            row["kernels"][name] = ran = kernel_that_runs(kern, q, k, v)
            print(f"  {name:<17} {ran}", flush=True)
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
