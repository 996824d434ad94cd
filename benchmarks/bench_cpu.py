"""attnc's TVM CPU kernels side by side with torch's CPU scaled_dot_product_attention.

Same machine, same inputs, same thread count (torch.set_num_threads and TVM_NUM_THREADS), fp32, B=1, H=8.
Built for a shared machine whose load changes while it runs: each round times attnc and torch alternately
(a, b, a, b, ...), so both sides see the same load, and each side's time is the median over all rounds; the
speedup is the median of the per-round ratios (each round's own conditions). The load average before and after
each row, and the thread counts, go into the JSON. Prints a table and writes benchmarks/results/cpu-<date>.json.

    python benchmarks/bench_cpu.py [--threads N] [--seqs 512,1024,2048,4096] [--dims 64,128] [--rounds 7]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's attnc, whatever an editable install points at

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
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row (median over them)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of calls per side per round, at most")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    import torch

    import attnc
    from attnc.codegen.tvm.host import configure_threads, host_cpu

    torch.set_num_threads(args.threads)
    threads = {"requested": args.threads, "torch": torch.get_num_threads(), "tvm": configure_threads()}
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
                load_before = os.getloadavg()
                timing = interleaved(lambda: kernel(q, k, v), lambda: sdpa(q, k, v, is_causal=causal),
                                     args.rounds, args.budget)
                flops = 4 * args.heads * s * s * d * (0.5 if causal else 1.0)
                r = {"causal": causal, "S": s, "D": d, **timing, "attnc_gflops": flops / timing["attnc_ms"] / 1e6,
                     "max_abs_err_vs_torch": err, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
                rows.append(r)
                print(f"{'causal' if causal else 'dense ':6s} S={s:5d} D={d:3d}  attnc {r['attnc_ms']:8.2f} ms  "
                      f"torch {r['torch_ms']:8.2f} ms  x{r['speedup']:.2f} (rounds {r['speedup_min']:.2f}.."
                      f"{r['speedup_max']:.2f})  {r['attnc_gflops']:.0f} GFLOP/s  err {err:.1e}  "
                      f"load {load_before[0]:.2f}", flush=True)
    cpu = host_cpu()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": threads,
        "heads": args.heads, "batch": 1, "dtype": "f32", "rounds": args.rounds,
        "statistic": "interleaved rounds; times: median over every call; speedup: median of per-round "
                     "torch/attnc ratios of round medians",
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
    print(f"worst speedup x{worst:.2f}; load average now {os.getloadavg()[0]:.2f}; wrote {out}")


def interleaved(a, b, rounds: int, budget: float) -> dict:
    """Per round: calls alternate a, b, a, b, ... (as many pairs as fit `budget` seconds per side, at least 3,
    sized from the warm-up). Returns median times (ms) over all calls and the median per-round speedup."""
    start = time.perf_counter()
    a(), b()  # warm up (the first call builds / loads the kernel)
    per_pair = max(time.perf_counter() - start, 1e-6)
    pairs = max(3, min(50, int(budget / per_pair)))
    all_a, all_b, ratios = [], [], []
    for _ in range(rounds):
        ta, tb = [], []
        for _ in range(pairs):
            for fn, times in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        all_a += ta
        all_b += tb
        ratios.append(statistics.median(tb) / statistics.median(ta))
    return {"attnc_ms": statistics.median(all_a) * 1e3, "torch_ms": statistics.median(all_b) * 1e3,
            "attnc_min_ms": min(all_a) * 1e3, "torch_min_ms": min(all_b) * 1e3,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "calls_per_round": pairs}


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
