"""attnc's TVM CPU kernels side by side with torch's CPU scaled_dot_product_attention.

Same machine, same inputs, same thread count (torch.set_num_threads and TVM_NUM_THREADS), fp32, B=1, H=8.
Runs are interleaved (attnc, torch, attnc, ...) and the minimum of each is reported, so load from other
processes affects both sides alike. Prints a table and writes benchmarks/results/cpu-<date>.json.

    python benchmarks/bench_cpu.py [--threads N] [--seqs 512,1024,2048,4096] [--dims 64,128] [--reps 10]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

SPEC = """
attention bench_{name} {{
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    {mask}
    return softmax(score) @ v
}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seqs", default="512,1024,2048,4096")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    import torch

    import attnc
    from attnc.codegen.tvm.host import host_cpu

    torch.set_num_threads(args.threads)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for causal in (False, True):
        spec = attnc.parse(SPEC.format(name="causal" if causal else "dense",
                                       mask="mask causal" if causal else ""))[0]
        kernel = attnc.compile(spec, backend="tvm")
        for d in (int(x) for x in args.dims.split(",")):
            for s in (int(x) for x in args.seqs.split(",")):
                q, k, v = (torch.randn(1, args.heads, s, d) for _ in range(3))
                want = sdpa(q, k, v, is_causal=causal)
                err = (kernel(q, k, v) - want).abs().max().item()
                t_attnc, t_torch = interleaved(lambda: kernel(q, k, v), lambda: sdpa(q, k, v, is_causal=causal),
                                               args.reps)
                flops = 4 * args.heads * s * s * d * (0.5 if causal else 1.0)
                rows.append({"causal": causal, "S": s, "D": d, "attnc_ms": t_attnc * 1e3, "torch_ms": t_torch * 1e3,
                             "speedup": t_torch / t_attnc, "attnc_gflops": flops / t_attnc / 1e9,
                             "max_abs_err_vs_torch": err})
                r = rows[-1]
                print(f"{'causal' if causal else 'dense ':6s} S={s:5d} D={d:3d}  attnc {r['attnc_ms']:8.2f} ms  "
                      f"torch {r['torch_ms']:8.2f} ms  x{r['speedup']:.2f}  ({r['attnc_gflops']:.0f} GFLOP/s, "
                      f"err {err:.1e})", flush=True)
    cpu = host_cpu()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
        "heads": args.heads, "batch": 1, "dtype": "f32", "reps": args.reps, "statistic": "min, interleaved",
        "cpu": {"llvm_mcpu": cpu.mcpu, "vector_lanes": cpu.vector, "model": _cpu_model(),
                "logical_cores": os.cpu_count()},
        "versions": {"attnc": attnc.__version__, "torch": torch.__version__, "tvm": _tvm_version(),
                     "python": platform.python_version()},
        "rows": rows,
    }
    out = Path(args.out) / f"cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    worst = min(r["speedup"] for r in rows)
    print(f"worst speedup x{worst:.2f}; wrote {out}")


def interleaved(a, b, reps: int) -> tuple[float, float]:
    a(), b()  # warm up (first call builds / loads the kernel)
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(ta), min(tb)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


if __name__ == "__main__":
    main()
