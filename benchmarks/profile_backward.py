"""Where a training step's time goes on the GPU: host-bound or kernel-bound, and each kernel's share (issue 12,
causal S = 1k). For each workload of `attnc bench --backward` (default: dense and causal S = 1k, causal S = 4k,
window 1024 S = 8k) and each runner (attnc through autograd, as the bench; SDPA cuDNN beside it), one row:

  step_ms    the bench's number: triton.testing.do_bench over the whole fwd+bwd step (L2 flushed), median
  host_ms    the host's time per step alone (attnc.bench.host_us_per_call: calls timed between synchronizations)
  gpu_ms     the sum of the step's kernel times (torch.profiler, CUDA activity, mean over --steps steps)
  graph_ms   do_bench of the same step replayed from a CUDA graph (no host work): the GPU's floor for the step
  verdict    "host" where host_ms >= 0.9 * step_ms or graph_ms <= 0.8 * step_ms, else "gpu"

then, per attnc row, every kernel of the step with its grid, block, registers and shared memory (from the profiler's
trace) and its mean time. A row where step_ms ~ host_ms and graph_ms << step_ms is host-bound: the kernels are not
what to tune there. Results: <out>/profile-backward[-TAG].jsonl and the traces, trace-<workload>-<runner>.json.

    python benchmarks/profile_backward.py --out $OUT [--only REGEX] [--tag NAME] [--steps 20] [--no-graph]

A/B against another attnc in the same call: run it again with that tree first on PYTHONPATH and another --tag, e.g.
    git archive 95f97a6 attnc | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/profile_backward.py ...
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

DEFAULT_ONLY = r"^(dense S=1024|causal S=1024|causal S=4096|window 1024 S=8192)$"


def make_runners(w, device: str) -> dict:
    """The bench's own step functions (attnc.bench.backward), on the bench's inputs."""
    from attnc.bench import backward

    q, k, v, dout, extra = backward.workload_inputs(w, device)
    runners = {"attnc": backward.attnc_runner(w, q, k, v, dout, extra, "auto", False)}
    cudnn = backward.sdpa_runner(w, q, k, v, dout, "CUDNN_ATTENTION")
    if cudnn is not None:
        runners["sdpa-cudnn"] = cudnn
    return runners


def graph_ms(fn) -> float | None:
    """do_bench of `fn` replayed from a CUDA graph; None where the step cannot be captured (its error printed)."""
    from triton.testing import do_bench

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # a runner that cannot be captured is reported, not fatal
        print(f"    graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def kernel_table(fn, steps: int, trace: Path) -> list[dict]:
    """Each kernel the step launches: name, grid, block, registers, shared memory, launches per step and mean ms,
    from a torch.profiler trace of `steps` steps (written to `trace`)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels: dict[tuple, dict] = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memset", "gpu_memcpy"):
            continue
        a = e.get("args", {})
        key = (e["name"], str(a.get("grid")), str(a.get("block")))
        row = kernels.setdefault(key, {"kernel": e["name"][:60], "grid": a.get("grid"), "block": a.get("block"),
                                       "registers": a.get("registers per thread"),
                                       "shared_bytes": a.get("shared memory"), "launches": 0, "us": 0.0})
        row["launches"] += 1
        row["us"] += float(e.get("dur", 0.0))
    rows = []
    for row in kernels.values():
        rows.append({**row, "per_step": row["launches"] / steps, "ms_per_step": row.pop("us") / steps / 1e3})
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default=DEFAULT_ONLY, help="regex over the bench's workload names")
    parser.add_argument("--tag", default="", help="names this run's files and rows (an A/B's side)")
    parser.add_argument("--steps", type=int, default=20, help="steps under the profiler")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA graph replay")
    args = parser.parse_args()

    import triton
    from triton.testing import do_bench

    import attnc
    from attnc.bench import host_us_per_call, prefill_workloads

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    log = out / f"profile-backward{suffix}.jsonl"
    device = "cuda"
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"attnc from {Path(attnc.__file__).parent}")
    summary = []
    for w in prefill_workloads():
        if not re.search(args.only, w.name):
            continue
        for runner, fn in make_runners(w, device).items():
            fn()
            torch.cuda.synchronize()
            step = do_bench(fn, warmup=25, rep=100, return_mode="median")
            host = host_us_per_call(fn, calls=5, rounds=60) / 1e3
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{w.name}-{runner}{suffix}").strip("_")
            kernels = kernel_table(fn, args.steps, out / f"trace-{slug}.json")
            gpu = sum(k["ms_per_step"] for k in kernels)
            graph = None if args.no_graph else graph_ms(fn)
            host_bound = host >= 0.9 * step or (graph is not None and graph <= 0.8 * step)
            row = {"tag": args.tag, "workload": w.name, "runner": runner, "step_ms": step, "host_ms": host,
                   "gpu_ms": gpu, "graph_ms": graph, "verdict": "host" if host_bound else "gpu", "kernels": kernels}
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            summary.append(row)
            g = "-" if graph is None else f"{graph:.3f}"
            print(f"{w.name:20s} {runner:11s} step {step:.3f} ms  host {host:.3f}  gpu {gpu:.3f}  graph {g}  "
                  f"-> {row['verdict']}-bound")
            if runner == "attnc":
                for k in kernels:
                    print(f"    {k['ms_per_step']:.3f} ms x{k['per_step']:.0f} grid {k['grid']} block {k['block']} "
                          f"regs {k['registers']} smem {k['shared_bytes']}  {k['kernel']}")
    print(f"\n{'workload':20s} {'runner':11s} {'step':>7s} {'host':>7s} {'gpu':>7s} {'graph':>7s}  verdict")
    for r in summary:
        g = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
        print(f"{r['workload']:20s} {r['runner']:11s} {r['step_ms']:7.3f} {r['host_ms']:7.3f} {r['gpu_ms']:7.3f} "
              f"{g:>7s}  {r['verdict']}")
    print(f"wrote {log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
