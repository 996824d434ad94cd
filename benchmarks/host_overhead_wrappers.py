"""What the front-ends add to a cache hit, on CPU: per-call host time of an `attnc.compile` kernel called directly,
the `@attnc.attention` decorator and `attnc.flex_attention`, on one tiny problem, with the final launch stubbed so
that only Python runs. Each front-end is compared with its own kernel (the Kernel it hands the call to), called
directly on the same tensors; the difference is the front-end's cost. Runners take turns in short rounds and each
reports its fastest round: another process's load only adds time, so on a shared machine the minimum is the
steadiest figure.

Runs on Triton's interpreter (the prepared launch path is the GPU's, with Triton's launcher replaced by a no-op):

    python benchmarks/host_overhead_wrappers.py [--calls 500] [--rounds 40] [--profile kernel|decorator|flex]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

import attnc  # noqa: E402
import attnc.backends.triton.launch as launch  # noqa: E402

TINY = """
attention tiny {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    param cap: f32 = 30.0
    score = qk * rsqrt(D)
    score = cap * tanh(score / cap)
    mask causal
    return softmax(score) @ v
}
"""


class NoLaunch:
    """Triton's launcher, stubbed: the prepared launch does all its per-call work but the launch itself."""

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        pass


def stub_launches() -> None:
    """Makes every kernel built from here on prepare its launches (the interpreter returns no CompiledKernel) and
    replay them into NoLaunch."""
    stub = NoLaunch()
    launch.direct_launch = lambda compiled, device: stub


def runners(q, k, v) -> dict:
    """name -> (the front-end's call, the same call on the Kernel it hands the call to, or None for a Kernel)."""
    kernel = attnc.compile(attnc.parse(TINY)[0], backend="triton")

    @attnc.attention(backend="triton")
    def softcap(q, k, v, *, cap: float = 30.0):
        s = (q @ k) * q.D ** -0.5
        s = cap * attnc.tanh(s / cap)
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    cap = 30.0

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = attnc.create_block_mask(causal, None, None, q.shape[2], k.shape[2])
    options = {"backend": "triton"}

    def flex():
        return attnc.flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options)

    for fn in (lambda: kernel(q, k, v, cap=20.0), lambda: softcap(q, k, v, cap=20.0), flex):
        fn(), fn()  # builds, then prepares the launch
    (_, decorated), = softcap._compiled.values()
    from attnc.dsl.flex import _KERNELS

    (_, flexed), = [entry for entry in _KERNELS.values() if entry[0].name.startswith("score_mod")]
    for k_ in (kernel, decorated, flexed):
        assert len(k_._prepared) == 1, "a call did not take the prepared launch"
    return {
        "kernel": (lambda: kernel(q, k, v, cap=20.0), None),
        "decorator": (lambda: softcap(q, k, v, cap=20.0), lambda: decorated(q, k, v, cap=20.0)),
        "flex": (flex, lambda: flexed(q, k, v)),
    }


LABELS = {"kernel": "attnc.compile kernel", "decorator": "@attnc.attention", "flex": "attnc.flex_attention"}


def time_interleaved(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Each runner's us per call in its fastest round, the runners taking turns within each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter_ns() - start) / calls / 1e3)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--profile", choices=["kernel", "decorator", "flex"], help="cProfile one runner instead")
    args = ap.parse_args()
    stub_launches()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 128, 64) for _ in range(3))
    fns = runners(q, k, v)
    if args.profile:
        import cProfile
        import pstats

        fn = fns[args.profile][0]
        profile = cProfile.Profile()
        profile.runcall(lambda: [fn() for _ in range(args.calls * 10)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    timed = {name: fn for name, pair in fns.items() for name, fn in ((name, pair[0]), (f"{name}'s Kernel", pair[1]))
             if fn is not None}
    us = time_interleaved(timed, args.calls, args.rounds)
    print(f"torch {torch.__version__}, CPU, launch stubbed; us per call, fastest of {args.rounds} rounds of "
          f"{args.calls} calls")
    for name, label in LABELS.items():
        line = f"{label:28s} {us[name]:7.2f}"
        if f"{name}'s Kernel" in us:
            direct = us[f"{name}'s Kernel"]
            line += f"   its Kernel called directly {direct:7.2f}   the front-end adds {us[name] - direct:5.2f}"
        print(line)


if __name__ == "__main__":
    main()
