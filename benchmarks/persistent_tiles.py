"""The persistent Gluon forward at dense S = 1k (B = 16) and S = 4k (B = 4), 16 heads, D = 128, bf16: three launches
each, for a profiler to sample (issue 13: where ~2 key tiles' worth of time goes at every work-tile boundary;
benchmarks/NOTES.md, sessions 14-15). For example, on an sm_90 GPU with Triton 3.6:

    ncu --clock-control none -k regex:attn_fwd_gluon --launch-count 6 --set full --import-source yes \\
        -o /tmp/persistent python3 benchmarks/persistent_tiles.py"""
import torch

import attnc
from attnc.bench import prefill_workloads
from attnc.bench.backward import workload_inputs
from attnc.passes import PlanOptions

for name in ("dense S=1024", "dense S=4096"):
    w = next(x for x in prefill_workloads() if x.name == name)
    q, k, v, _, extra = workload_inputs(w, "cuda")
    kern = attnc.compile(attnc.parse(w.spec)[0], options=PlanOptions(gluon=True, gluon_persistent=True))
    print(name, kern.plan(q.device, w.D).warpgroups.path)
    for _ in range(3):
        kern(q, k, v, **w.params, **extra)
    torch.cuda.synchronize()
