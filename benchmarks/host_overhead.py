"""Host time per call on a tiny problem (a cache hit) and cold compile of a new variant, on the GPU.

Host time: `--calls` back-to-back calls timed between synchronizations (so the GPU queue never fills and only
the host's time counts), median over `--rounds`; also the plain back-to-back rate. Runners: attnc.compile
kernels, the @attnc.attention decorator, attnc.flex_attention, SDPA (default backend selection) and
FlexAttention under torch.compile, all causal bf16 on the same tensors, each checked against SDPA first. The
attnc rows are broken down: the call key, the prepared launch without Triton's launcher, the launcher itself,
and the full path (bind + Triton's JIT launch) that a call with a new signature takes.

Cold compile: in a process where attnc has already run a kernel, `attnc.compile(spec)(q, k, v)` of a spec never
seen before (a fresh softcap constant), to the synchronized result, split into planning, code generation and
import, and Triton's compile; FlexAttention's first call of a new score_mod alongside.

    python benchmarks/host_overhead.py [--calls 10] [--rounds 300] [--no-flex]
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import attnc
import attnc.runtime.kernel as api
import attnc.backends.triton.launch as launch
from attnc.bench import host_us_per_call
from attnc.dsl.signature import bind

B, H, S, D = 1, 16, 128, 64
SPEC = """
attention tiny_{name} {{
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    score = qk * rsqrt(D)
    {score}
    mask causal
    return softmax(score) @ v
}}
"""


def host_us(fn, calls: int, rounds: int) -> tuple[float, float]:
    """(median host us per call with a sync every `calls` calls, us per call over 2000 unsynchronized calls)."""
    median = host_us_per_call(fn, calls, rounds)
    start = time.perf_counter()
    for _ in range(2000):
        fn()
    stream = (time.perf_counter() - start) / 2000 * 1e6
    torch.cuda.synchronize()
    return median, stream


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def runners(q, k, v, with_flex: bool) -> dict:
    kernel = attnc.compile(attnc.parse(SPEC.format(name="text", score=""))[0])

    @attnc.attention
    def tiny_decorated(q, k, v):
        return attnc.softmax((q @ k) * q.D ** -0.5, where=attnc.causal(q, k)) @ v

    block_mask = attnc.create_block_mask(causal_mask, None, None, S, S)
    out = {
        "attnc.compile kernel": lambda: kernel(q, k, v),
        "@attnc.attention": lambda: tiny_decorated(q, k, v),
        "attnc.flex_attention": lambda: attnc.flex_attention(q, k, v, block_mask=block_mask),
        "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.cache_size_limit = 64
        compiled = torch.compile(flex_attention)
        torch_mask = create_block_mask(causal_mask, None, None, S, S, device="cuda")
        out["FlexAttention (torch.compile)"] = lambda: compiled(q, k, v, block_mask=torch_mask)
    return out, kernel


def breakdown(kernel, q, k, v, calls: int, rounds: int) -> dict:
    """Where the attnc kernel's time goes; each part timed on its own."""
    (prepared,) = kernel._prepared.values()
    names = kernel._input_names
    parts = {"call_key": lambda: api.call_key(q, k, v, {}, names)}
    real = prepared.direct.launch
    prepared.direct.launch = lambda stream, grid, args: None
    parts["prepared launch, Triton's launcher stubbed"] = lambda: prepared(q, k, v, {})
    result = {name: host_us(fn, calls, rounds)[0] for name, fn in parts.items()}
    prepared.direct.launch = real
    args = prepared.args.copy()
    out = torch.empty_like(q)
    args[:5] = [t.data_ptr() for t in (q, k, v, out, out)]  # addresses, as the prepared launch passes them
    stream = prepared.direct.stream()
    result["Triton's launcher (compiled.run)"] = host_us(lambda: real(stream, prepared.grid, args), calls, rounds)[0]
    (impl,) = kernel._impls.values()
    result["full path: bind + Triton JIT launch"] = host_us(lambda: impl(bind(kernel.spec, q, k, v, {})),
                                                           calls, rounds)[0]
    return result


def cold_compile(q, k, v, with_flex: bool) -> dict:
    phases = {"plan": 0.0, "generate + import": 0.0, "triton compile": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - start
        return wrapper

    import triton.compiler

    real = api.plan_kernel, launch.load_module, triton.compiler.compile
    api.plan_kernel, launch.load_module = timed("plan", real[0]), timed("generate + import", real[1])
    triton.compiler.compile = timed("triton compile", real[2])  # JITFunction's binder imports it per kernel
    cap = round(random.uniform(10.0, 60.0), 6)
    spec = attnc.parse(SPEC.format(name="cold", score=f"score = {cap} * tanh(score / {cap})"))[0]
    start = time.perf_counter()
    attnc.compile(spec)(q, k, v)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    api.plan_kernel, launch.load_module, triton.compiler.compile = real
    result = {"attnc total": total, **{f"  {k}": t for k, t in phases.items()}}
    result["  rest (first launch: load, launcher)"] = total - sum(phases.values())
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        torch_mask = create_block_mask(causal_mask, None, None, S, S, device="cuda")
        compiled = torch.compile(flex_attention)
        start = time.perf_counter()
        compiled(q, k, v, score_mod=score_mod, block_mask=torch_mask)
        torch.cuda.synchronize()
        result["FlexAttention first call of a new score_mod"] = time.perf_counter() - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--no-flex", action="store_true", help="skip torch's FlexAttention")
    args = ap.parse_args()
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fns, kernel = runners(q, k, v, not args.no_flex)
    want = fns["SDPA"]().double()
    for name, fn in fns.items():
        err = (fn().double() - want).abs().max().item()
        assert err < 2e-2, f"{name} differs from SDPA by {err}"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}; "
          f"B={B} H={H} S={S} D={D} bf16 causal")
    print(f"{'host time per call (us)':44s} {'median':>8s} {'stream':>8s}")
    for name, fn in fns.items():
        median, stream = host_us(fn, args.calls, args.rounds)
        print(f"{name:44s} {median:8.1f} {stream:8.1f}")
    for name, us in breakdown(kernel, q, k, v, args.calls, args.rounds).items():
        print(f"  {name:42s} {us:8.1f}")
    print(f"{'cold compile of a new variant (s)':44s}")
    for name, s in cold_compile(q, k, v, not args.no_flex).items():
        print(f"{name:44s} {s:8.3f}")


if __name__ == "__main__":
    main()
