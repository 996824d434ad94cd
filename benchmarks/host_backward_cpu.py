"""The host's time per training step of `attnc bench --backward`'s attnc runner, measured on a machine without a GPU
(issue 12, causal S = 1k): sm_90 plans, CPU tensors, and each kernel launch replaced by Triton's argument
specialization (what binaries.launch reads), so what is timed is attnc's Python and torch's custom-op and autograd
machinery, not Triton's C launcher, the CUDA allocator or the kernels. It prints the kernels a step launches (grid,
constexprs) and the host microseconds per step (min and median of rounds: other processes only add time).

    PYTHONPATH=$PWD python benchmarks/host_backward_cpu.py ["causal S=1024" ...] [--profile]

The GPU machines' Python ran 2-2.5x slower than this CPU machine's on the same path (call_key: 2.5-3 us there,
1.2 us here; benchmarks/NOTES.md), so a step's host time on the H100 is about 2-2.5x what this prints, plus ~10 us
per launch for Triton's launcher.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import attnc
from attnc.backends.triton import backend, binaries, gluon, launch as triton_launch
from attnc.bench import prefill_workloads
from attnc.bench.backward import workload_inputs
from attnc.passes import Target

BATCH = 2  # the host's work does not depend on B or S (allocations are lazy on the CPU)


class ReplayedLaunch:
    """Stands in for Triton's launcher of a prepared or replayed launch (launch.DirectLaunch): recorded, not run."""

    def __init__(self, fn, launches: list):
        self.name, self.launches = f"{getattr(fn, '__name__', fn)} (replayed)", launches

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        self.launches.append((self.name, tuple(grid), {}))


def stub_the_gpu(launches: list) -> None:
    """sm_90 plans on CPU tensors, the Gluon kernels allowed, launches recorded and not run; a launch that attnc
    replays without Triton's JIT (DirectLaunch) is recorded by ReplayedLaunch."""
    backend.TritonBackend.target = lambda self, device: Target("triton", "cuda", 90)
    gluon.unavailable_here = lambda: ""
    gluon.multiprocessors = lambda device: 132

    def launch(fn, grid, args, keywords):
        binaries.specialization(args)
        launches.append((getattr(fn, "__name__", fn), tuple(grid),
                         {k: v for k, v in keywords.items() if k.isupper() or k.startswith("num_")}))
        return fn  # what the launchers hand direct_launch

    binaries.launch = launch
    triton_launch.direct_launch = lambda fn, device: ReplayedLaunch(fn, launches)


def training_step(name: str):
    w = {w.name: w for w in prefill_workloads()}[name]
    kernel = attnc.compile(attnc.parse(w.spec)[0], backend="triton")
    q, k, v, dout, extra = workload_inputs(w, "cpu", BATCH)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    kwargs = {**w.params, **extra}
    return lambda: torch.autograd.grad(kernel(*leaves, **kwargs), leaves, dout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=["dense S=1024", "causal S=1024", "window 1024 S=8192"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="cProfile 100 steps of each, by own time")
    args = parser.parse_args()
    launches: list = []
    stub_the_gpu(launches)
    for name in args.workloads:
        step = training_step(name)
        step()
        launches.clear()
        step()
        print(f"{name}: {len(launches)} launches a step")
        for launch in launches:
            print("   ", *launch)
        per_step = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(20):
                step()
            per_step.append((time.perf_counter() - start) / 20 * 1e6)
        per_step.sort()
        print(f"{name}: host us per fwd+bwd step, launches stubbed: min {per_step[0]:.0f}, "
              f"median {per_step[len(per_step) // 2]:.0f}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(100):
                step()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
