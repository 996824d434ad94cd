"""What the front-ends add to a cache hit, on CPU: per-call host time of an `attnc.compile` kernel called directly,
the `@attnc.attention` decorator and `attnc.flex_attention`, on one tiny problem, with Triton's launcher stubbed so
that only Python runs. Each front-end is compared with its own kernel (the Kernel it hands the call to), called
directly on the same tensors; the difference is the front-end's cost. Runners take turns in short rounds and each
reports its fastest round (attnc.bench.host_us_interleaved): another process's load only adds time, so on a shared
machine the minimum is the steadiest figure.

Runs on Triton's interpreter: the first calls compile and run for real, later ones take the GPU's prepared launch
path up to Triton's launcher, which does nothing here. tests/test_host_overhead.py bounds the same figures.

    python benchmarks/host_overhead_wrappers.py [--calls 500] [--rounds 40] [--profile kernel|decorator|flex]
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

if __name__ == "__main__":  # run as a script: Triton's interpreter, switched on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import attnc  # noqa: E402
import attnc.backends.triton.launch as launch  # noqa: E402
from attnc.bench import host_us_interleaved  # noqa: E402

SOFTCAP = """
attention softcap {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    param cap: f32 = 30.0
    score = qk * rsqrt(D)
    score = cap * tanh(score / cap)
    mask causal
    return softmax(score) @ v
}
"""


def softcap_decorated():
    """SOFTCAP through the decorator (the same key for f32 tensors of one head count)."""
    @attnc.attention
    def softcap(q, k, v, *, cap: float = 30.0):
        s = (q @ k) * q.D ** -0.5
        s = cap * attnc.tanh(s / cap)
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    return softcap


class NoLaunch:
    """Triton's launcher, stubbed: a prepared launch does all its per-call work but the launch itself."""

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        pass


def stub_launches(setattr_: Callable = setattr) -> None:
    """Makes every kernel built from here on prepare its launches (the interpreter's JIT launch returns no compiled
    kernel, which would send every call through it) and replay them into NoLaunch. `setattr_`: pytest's
    monkeypatch.setattr, to undo it after a test."""
    setattr_(launch, "direct_launch", lambda compiled, device: NoLaunch())


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def runners(q, k, v) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (the front-end's call, the same call on the Kernel it hands the call to; None for a Kernel), each
    called until its launch is prepared."""
    from attnc.dsl.flex import _CALLS

    kernel = attnc.compile(attnc.parse(SOFTCAP)[0])
    softcap = softcap_decorated()
    cap = 20.0

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    mask = attnc.create_block_mask(causal, None, None, q.shape[2], k.shape[2])

    def flex():
        return attnc.flex_attention(q, k, v, score_mod=score_mod, block_mask=mask)

    for fn in (lambda: kernel(q, k, v, cap=20.0), lambda: softcap(q, k, v, cap=20.0), flex):
        fn(), fn()  # builds, then prepares the launch
    ((_, decorated, _),) = softcap._calls.values()
    (flexed,) = [hit.kernel for hit in _CALLS.values() if hit.state is not None and hit.state.mod() is score_mod]
    assert kernel._prepared, "the kernel's calls do not take a prepared launch"
    return {
        "kernel": (lambda: kernel(q, k, v, cap=20.0), None),
        "decorator": (lambda: softcap(q, k, v, cap=20.0), lambda: decorated(q, k, v, cap=20.0)),
        "flex": (flex, lambda: flexed(q, k, v)),
    }


def timed(fns: dict[str, tuple[Callable, Callable | None]], calls: int, rounds: int) -> dict[str, float]:
    """us per call of every runner and of each front-end's kernel ("<name>'s kernel"), fastest round."""
    named = {}
    for name, (front, kernel) in fns.items():
        named[name] = front
        if kernel is not None:
            named[f"{name}'s kernel"] = kernel
    return host_us_interleaved(named, calls, rounds, statistic=min)


LABELS = {"kernel": "attnc.compile kernel", "decorator": "@attnc.attention", "flex": "attnc.flex_attention"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--profile", choices=list(LABELS), help="cProfile one runner instead (its timings are skewed: "
                                                             "the profiler costs more than a small call)")
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
    us = timed(fns, args.calls, args.rounds)
    print(f"torch {torch.__version__}, CPU, launch stubbed; us per call, fastest of {args.rounds} rounds of "
          f"{args.calls} calls")
    for name, label in LABELS.items():
        line = f"{label:28s} {us[name]:7.2f}"
        if f"{name}'s kernel" in us:
            direct = us[f"{name}'s kernel"]
            line += f"   its Kernel called directly {direct:7.2f}   the front-end adds {us[name] - direct:5.2f}"
        print(line)


if __name__ == "__main__":
    main()
