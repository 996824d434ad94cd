"""Side-by-side benchmarks. GPU: attnc against SDPA (flash, cuDNN, efficient), compiled FlexAttention and, where
installed, FlashInfer's FA3 prefill.
CPU (`--device cpu`): attnc's TVM kernels against torch's CPU scaled_dot_product_attention, dense and causal, and
serving rows (a paged decode, a varlen prefill) against SDPA called per sequence on its gathered pages or rows.

Every runner sees the same inputs in the same process; each output is checked against the others before any
timing counts. GPU times are the median of `triton.testing.do_bench`; FLOPs count only kept (query, key) pairs.
Results go to `<out>/<device>-<date>.json` (GPU: plus PNG plots; CPU: `cpu-<date>.json`); `attnc bench` and
`benchmarks/run.py` call `main`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import random
import re
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import attnc
from attnc.ir import return_text

# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One row of the table. `spec` is attnc text; `flex` builds FlexAttention's (score_mod, mask_mod)."""

    name: str
    group: str  # rows of one group share a plot (x axis: sequence length)
    B: int
    H: int
    HKV: int
    S: int
    D: int
    spec: str
    causal: bool = False
    window: int | None = None
    sdpa: bool = True  # SDPA can express it (dense or top-left causal, no score mod)
    flex: Callable | None = None  # extra inputs -> (score_mod, mask_mod) for FlexAttention
    params: dict = field(default_factory=dict)
    inputs: Callable | None = None  # (B, H, S, device) -> dict of extra tensors
    # FlashInfer's plan() arguments beyond the mask, heads and head dim (window_left comes from `window`);
    # None where FlashInfer cannot express the workload.
    flashinfer: dict | None = None


def _spec(name: str, D: int, gqa: bool, body: str, params: str = "", inputs: str = "") -> str:
    kv = "HKV" if gqa else "H"
    return (
        f"attention {name} {{\n"
        f"    q: bf16[B, H, M, D]  k: bf16[B, {kv}, N, D]  v: bf16[B, {kv}, N, D]\n"
        f"{params}{inputs}{body}"
        f"    {return_text()}\n}}\n"
    )


def kept_pairs(w: Workload) -> int:
    """Exact count of kept (query, key) pairs for the masks these workloads use (M == N == S)."""
    S = w.S
    if not w.causal:
        return S * S
    if w.window is None:
        return S * (S + 1) // 2
    W = w.window  # keys j with i - W < j <= i
    return sum(min(i + 1, W) for i in range(S))


def _softcap_mods(cap):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window_mask(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask_mod


def _alibi_mods(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return score_mod


def _alibi_inputs(B, H, S, device):
    return {"slopes": torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)}


def prefill_workloads(quick: bool = False) -> list[Workload]:
    """The workloads of the performance issue (bf16, head dim 128 unless stated, 16k tokens per batch)."""
    out = []
    seqs = (1024, 4096) if quick else (1024, 4096, 16384)
    for causal in (False, True):
        tag = "causal" if causal else "dense"
        body = "    mask i >= j\n" if causal else ""
        for S in seqs:
            out.append(Workload(f"{tag} S={S}", tag, 16384 // S, 16, 16, S, 128,
                                _spec(f"bench_{tag}", 128, False, body), causal=causal, flashinfer={},
                                flex=(lambda x: (None, _causal_mask)) if causal else (lambda x: (None, None))))
    S8 = 4096 if quick else 8192
    causal_body = "    mask i >= j\n"
    out.append(Workload(f"gqa 32/8 causal S={S8}", "gqa", 2, 32, 8, S8, 128,
                        _spec("bench_gqa", 128, True, causal_body), causal=True, flashinfer={},
                        flex=lambda x: (None, _causal_mask)))
    out.append(Workload(f"window 1024 S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_window", 128, False, causal_body + "    mask i - j < window\n",
                              params="    param window: i32 = 1024\n"),
                        causal=True, window=1024, sdpa=False, params={"window": 1024}, flashinfer={},
                        flex=lambda x: (None, _window_mask(1024))))
    out.append(Workload(f"softcap 30 S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_softcap", 128, False,
                              "    score = cap * tanh(score / cap)\n" + causal_body,
                              params="    param cap: f32 = 30.0\n"),
                        causal=True, sdpa=False, params={"cap": 30.0}, flashinfer={"logits_soft_cap": 30.0},
                        flex=lambda x: (_softcap_mods(30.0), _causal_mask)))
    out.append(Workload(f"alibi S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_alibi", 128, False,
                              "    score = score + slopes[h] * (j - i)\n" + causal_body,
                              inputs="    input slopes: f32[H]\n"),
                        causal=True, sdpa=False, inputs=_alibi_inputs, flashinfer={"pos_encoding_mode": "ALIBI"},
                        flex=lambda x: (_alibi_mods(x["slopes"]), _causal_mask)))
    for D in (64, 256):
        out.append(Workload(f"causal D={D} S={S8}", "headdim", 2, 16, 16, S8, D,
                            _spec(f"bench_d{D}", D, False, causal_body), causal=True, flashinfer={},
                            flex=lambda x: (None, _causal_mask)))
    return out


# ---------------------------------------------------------------- runners


def _sdpa_runner(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def make(w: Workload, q, k, v, extra):
        if not w.sdpa:
            return None

        def run():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=w.causal, enable_gqa=w.HKV != w.H)

        return run

    return make


@functools.lru_cache(maxsize=None)
def compiled_flex_attention(**compile_options):
    """FlexAttention as its users run it: `torch.compile(flex_attention)`, with dynamo's recompile limits raised.
    Every workload's shapes and mods are a new graph, and past the default limit (8) dynamo silently falls back
    to eager flex_attention, which materializes the scores (seen: 0.09 TB/s and an OOM at B=64 decode)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    return torch.compile(flex_attention, **compile_options)


def _flex_runner(w: Workload, q, k, v, extra, timings: dict):
    from torch.nn.attention.flex_attention import create_block_mask

    if w.flex is None:
        return None
    score_mod, mask_mod = w.flex(extra)
    block_mask = None
    if mask_mod is not None:
        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, w.S, w.S, device=q.device)
        torch.cuda.synchronize()
        timings["create_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
    fn = compiled_flex_attention()
    return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=w.HKV != w.H)


def to_ragged(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] as FlashInfer's ragged batch: [B * S, H, D], sequence after sequence (a copy)."""
    B, H, S, D = t.shape
    return t.transpose(1, 2).contiguous().view(B * S, H, D)


def from_ragged(t: torch.Tensor, batch: int) -> torch.Tensor:
    """FlashInfer's ragged [B * S, H, D] output as [B, H, S, D]: a view, so the timed call copies nothing."""
    tokens, H, D = t.shape
    return t.view(batch, tokens // batch, H, D).transpose(1, 2)


# Where `attnc bench` says how to install FlashInfer on the GPU machine.
FLASHINFER_SETUP = "README.md, section 'FlashInfer as a peer'"


def flashinfer_plan(w: Workload, extra: dict, alibi_slopes: Callable[[int], torch.Tensor]) -> tuple[str, dict] | str:
    """The FlashInfer backend and plan() keyword arguments that compute workload `w`'s math exactly, or why none do.
    `alibi_slopes(H)` is FlashInfer's own (flashinfer.utils.get_alibi_slopes): its ALiBi takes no slopes."""
    if w.flashinfer is None:
        return "FlashInfer cannot express this workload"
    plan = {"causal": w.causal, "sm_scale": w.D ** -0.5, **w.flashinfer}
    backend = "fa3"
    if plan.get("pos_encoding_mode") == "ALIBI":
        # FlashInfer sends any position encoding to FA2 (flashinfer/utils.py, is_fa3_backend_supported): its FA3
        # variants (attention/hopper/variants.cuh) have no ALiBi term. FA2 adds slopes[h] * (kv - q) after the scale,
        # as the spec does with the workload's slopes: run it only where the two sets are the same numbers.
        backend = "fa2"
        if not torch.allclose(extra["slopes"].cpu().float(), alibi_slopes(w.H).float(), rtol=1e-6, atol=0.0):
            return f"flashinfer's ALiBi slopes for {w.H} heads differ from the workload's"
    if w.window is not None:
        # attnc keeps keys with i - j < window; FlashInfer keeps q - kv <= window_left (attention/variants.cuh,
        # use_sliding_window; hopper/mainloop_mma.cuh, col_limit_left)
        plan["window_left"] = w.window - 1
    return backend, plan


def _flashinfer_runner(w: Workload, q, k, v, extra, timings: dict):
    """FlashInfer 0.5.0's prefill over a ragged batch of B sequences of S tokens (BatchPrefillWithRaggedKVCacheWrapper),
    the FA3 backend on sm_90 (ALiBi: FA2, flashinfer_plan). The tensors are converted to its layout once, here,
    outside the timed call."""
    if w.flashinfer is None:
        return None
    try:
        import flashinfer
    except ImportError as e:
        return (f"flashinfer not installed ({e}): carry flashinfer-python 0.5.0 and its wheels, install them and set "
                f"CUDA_HOME as in {FLASHINFER_SETUP}")
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "flashinfer's FA3 prefill needs an sm_90 GPU"
    chosen = flashinfer_plan(w, extra, flashinfer.utils.get_alibi_slopes)
    if isinstance(chosen, str):
        return chosen
    backend, plan = chosen
    indptr = torch.arange(w.B + 1, dtype=torch.int32, device=q.device) * w.S
    wrapper = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(
        torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device), "NHD", backend=backend)
    # the first plan() of a kernel variant JIT-builds it with nvcc (cached under ~/.cache/flashinfer)
    wrapper.plan(indptr, indptr, w.H, w.HKV, w.D, q_data_type=q.dtype, kv_data_type=k.dtype, **plan)
    timings["flashinfer_backend"] = backend
    q_r, k_r, v_r = (to_ragged(t) for t in (q, k, v))
    return lambda: from_ragged(wrapper.run(q_r, k_r, v_r), w.B)


def _attnc_runner(w: Workload, q, k, v, extra):
    spec = attnc.parse(w.spec)[0]
    kern = attnc.compile(spec)
    kwargs = {**w.params, **extra}
    return lambda: kern(q, k, v, **kwargs)


def attnc_gluon_runner(w: Workload, q, k, v, extra, options=None):
    """attnc with the Gluon warpgroup prefill forced (`options`, PlanOptions(gluon=True) by default; the `attnc`
    column takes it only where it measured faster); None where it would not run, since the template's row is
    attnc's then."""
    from ..backends.triton.gluon import unavailable_here
    from ..passes import PlanOptions

    kern = attnc.compile(attnc.parse(w.spec)[0], options=options or PlanOptions(gluon=True))
    if kern.plan(q.device, w.D).warpgroups.path != "gluon" or unavailable_here():
        return None
    kwargs = {**w.params, **extra}
    return lambda: kern(q, k, v, **kwargs)


def error_text(e: Exception, line: int = 0, width: int = 200) -> str:
    """An exception as one line of a result: its type and one line of its message (the first by default; sweeps take
    the last, where a Triton compile error names its cause)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[line][:width]}" if lines else type(e).__name__


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_workload(w: Workload, device: str, check_tol: float = 2e-2, makers: Callable | None = None) -> dict:
    """One row: the workload's inputs, and each runner of `makers` (runner_makers by default: its signature)
    checked, then timed (measure)."""
    gen = torch.Generator(device=device).manual_seed(hash(w.name) & 0xFFFF)
    mk = lambda h: torch.randn(w.B, h, w.S, w.D, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, v = mk(w.H), mk(w.HKV), mk(w.HKV)
    extra = w.inputs(w.B, w.H, w.S, device) if w.inputs else {}
    flops = 4.0 * w.B * w.H * w.D * kept_pairs(w)
    row: dict = {"workload": w.name, "group": w.group, "B": w.B, "H": w.H, "HKV": w.HKV, "S": w.S, "D": w.D,
                 "flops": flops, "results": {}}
    timings: dict = {}
    measure((makers or runner_makers)(w, q, k, v, extra, timings), row["results"], flops, check_tol)
    row.update(timings)
    return row


def runner_makers(w: Workload, q, k, v, extra: dict, timings: dict) -> dict[str, Callable]:
    """Each runner of PEERS, in order, as a maker for `measure`. The first peer that runs is the anchor the others
    are checked against: cuDNN, or FlexAttention where SDPA cannot express the workload (FlashInfer comes after
    both)."""
    return {
        "attnc": lambda: _attnc_runner(w, q, k, v, extra),
        "attnc-gluon": lambda: attnc_gluon_runner(w, q, k, v, extra),
        "sdpa-cudnn": lambda: _sdpa_runner("CUDNN_ATTENTION")(w, q, k, v, extra),
        "sdpa-flash": lambda: _sdpa_runner("FLASH_ATTENTION")(w, q, k, v, extra),
        "sdpa-efficient": lambda: _sdpa_runner("EFFICIENT_ATTENTION")(w, q, k, v, extra),
        "flex": lambda: _flex_runner(w, q, k, v, extra, timings),
        "flashinfer": lambda: _flashinfer_runner(w, q, k, v, extra, timings),
    }


def sweep_parser(doc: str, budget: float) -> argparse.ArgumentParser:
    """The arguments every tile sweep takes: where results go, which workloads, and the seconds after which no new
    config starts (so one device call finishes)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default=None, help="regex over workload names")
    ap.add_argument("--budget", type=float, default=budget, help="seconds; no new config starts after it")
    return ap


def log_row(row: dict, log: Path) -> None:
    """A sweep row as it finishes: printed, and appended to its JSON-lines log."""
    print(json.dumps(row), flush=True)
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def measure(makers: dict[str, Callable], results: dict, flops: float, check_tol: float) -> None:
    """Each runner made (a maker returns its fn, None where the runner cannot express the workload, or raises),
    then correctness first: every output against the first peer that ran (or attnc when no peer ran); the
    agreeing runners' peak extra memory over one call and median time (do_bench) go into results[name]."""
    from triton.testing import do_bench

    made = {}
    for name, make in makers.items():
        try:
            fn = make()
        except Exception as e:  # a peer that cannot run this workload is reported, not fatal
            fn = error_text(e)
        if fn is not None:
            made[name] = fn
    anchors = (*(n for n in made if not n.startswith("attnc")), "attnc")  # attnc's runners never judge each other
    for name, fn in checked_runners(made, anchors, check_tol, results).items():
        res = results[name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        res["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        res["ms"] = ms
        res["tflops"] = flops / (ms * 1e-3) / 1e12


def host_us_per_call(fn, calls: int = 10, rounds: int = 300) -> float:
    """Median host time of one call: `calls` back-to-back calls timed between synchronizations, so the GPU
    queue never fills and the time is the host's alone."""
    return host_us_interleaved({"fn": fn}, calls, rounds)["fn"]


def host_us_interleaved(fns: dict, calls: int = 10, rounds: int = 300,
                        statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """host_us_per_call of each function, measured in turn within every round, so a change of the host's speed
    during the measurement (the first one timed in a process ran 20 us where a later one ran 16) reaches all
    of them alike. `statistic` over the rounds: the median; `min` where other processes share the host (their
    load only adds time). Without a GPU nothing is synchronized."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for fn in fns.values():
        for _ in range(50):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    synchronize()
    return {name: statistic(t) for name, t in times.items()}


def host_us_against_sdpa(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(fn's, causal torch SDPA's) host us per call on these tensors, interleaved: SDPA is the yardstick the
    host-time tests compare with, since the same Python path costs 1.6x more on one GPU machine's host than on
    another's (18 vs 30 us measured)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    us = host_us_interleaved({"fn": fn, "sdpa": lambda: sdpa(q, k, v, is_causal=True)})
    return us["fn"], us["sdpa"]


def host_overhead(device: str, calls: int = 2000) -> dict:
    """Host time per call on a tiny problem (cache hit), for attnc, SDPA and compiled FlexAttention."""
    q, k, v = (torch.randn(1, 1, 64, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    spec = attnc.parse(_spec("bench_tiny", 64, False, ""))[0]
    kern = attnc.compile(spec)
    flex = compiled_flex_attention()
    runners = {
        "attnc": lambda: kern(q, k, v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "flex": lambda: flex(q, k, v),
    }
    out = {}
    for name, fn in runners.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        out[name] = {"host_us_per_call": host * 1e6}
    return out


def cold_compile(device: str) -> dict:
    """First call of a never-seen variant (fresh constant): attnc compile+run vs FlexAttention's; and attnc's time
    until every kernel of the variant is built, those compiled in the background included."""
    c = round(random.uniform(10.0, 60.0), 6)
    q, k, v = (torch.randn(1, 8, 1024, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    spec = attnc.parse(_spec("bench_cold", 128, False, f"    score = {c} * tanh(score / {c})\n    mask i >= j\n"))[0]
    t0 = time.perf_counter()
    attnc.compile(spec)(q, k, v)
    torch.cuda.synchronize()
    ours = time.perf_counter() - t0
    attnc.finish_compiles()  # a kernel compiling in the background (the Gluon kernel behind the template's first call)
    built = time.perf_counter() - t0
    from torch.nn.attention.flex_attention import create_block_mask

    # The constant is written into the mod's source: a captured Python float would be lifted by dynamo
    # into a CPU scalar tensor, which inductor's flex kernel cannot take.
    namespace: dict = {}
    exec(f"def score_mod(score, b, h, q_idx, kv_idx):\n    return {c!r} * torch.tanh(score / {c!r})\n",
         {"torch": torch}, namespace)
    score_mod = namespace["score_mod"]

    bm = create_block_mask(_causal_mask, None, None, 1024, 1024, device=device)
    flex = compiled_flex_attention()
    t0 = time.perf_counter()
    flex(q, k, v, score_mod=score_mod, block_mask=bm)
    torch.cuda.synchronize()
    theirs = time.perf_counter() - t0
    return {"attnc_s": ours, "attnc_built_s": built, "flex_s": theirs}


# ---------------------------------------------------------------- report


def environment(device: str) -> dict:
    import triton

    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "capability": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "attnc": attnc.__version__,
            "flashinfer": installed_version("flashinfer-python"),
            "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds")}


def installed_version(distribution: str) -> str | None:
    """The installed version of a peer's package, None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


PEERS = ("attnc", "attnc-gluon", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "flashinfer")


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    table = Table(title=f"{env['device']} · torch {env['torch']} · triton {env['triton']} · bf16 forward, TFLOP/s")
    table.add_column("workload")
    for p in PEERS:
        table.add_column(p, justify="right")
    table.add_column("attnc / best peer", justify="right")
    for row in report["rows"]:
        cells, best = [], 0.0
        for p in PEERS:
            r = row["results"].get(p)
            if r is None:
                cells.append("—")
            elif "tflops" in r:
                fa2 = p == "flashinfer" and row.get("flashinfer_backend") == "fa2"  # ALiBi: not the FA3 kernel
                cells.append(f"{r['tflops']:.0f}" + (" (fa2)" if fa2 else ""))
                if not p.startswith("attnc"):
                    best = max(best, r["tflops"])
            else:
                cells.append("err")
        ours = row["results"].get("attnc", {}).get("tflops")
        table.add_row(row["workload"], *cells, f"{ours / best:.2f}×" if ours and best else "—")
    Console().print(table)
    for key in ("host", "cold_compile"):
        if key in report:
            Console().print(f"{key}: {json.dumps(report[key])}")
    print_errors(report)


def print_row(row: dict) -> None:
    """One finished row, at once: the workload and each runner's TFLOP/s, time or peak memory."""
    from rich.console import Console

    cells = []
    for name, r in row["results"].items():
        if "error" in r:
            cells.append(f"{name} error")
        elif "tflops" in r:
            cells.append(f"{name} {r['tflops']:.0f} TFLOP/s")
        elif "ms" in r:
            cells.append(f"{name} {r['ms']:.3f} ms")
        elif "peak_extra_bytes" in r:
            cells.append(f"{name} {r['peak_extra_bytes'] / 2**20:.0f} MiB")
    Console(highlight=False).print(f"{row['workload']}: {', '.join(cells)}", markup=False)


def print_errors(report: dict) -> None:
    """Each runner that could not run a workload, or whose result failed the check, with its reason."""
    from rich.console import Console

    for row in report["rows"]:
        for p, r in row["results"].items():
            if "error" in r:
                Console().print(f"[yellow]{row['workload']} / {p}: {r['error']}")


# One colour per runner in every panel of every plot, so a runner is recognised at a glance across panels.
RUNNER_COLOURS = {
    "attnc": "#d62728",  # red
    "attnc-gluon": "#e377c2",  # pink: attnc's Gluon warpgroup prefill, forced
    "sdpa-cudnn": "#1f77b4",  # blue
    "sdpa-flash": "#2ca02c",  # green
    "sdpa-efficient": "#9467bd",  # purple
    "flex": "#ff7f0e",  # orange
    "flashinfer": "#000000",  # black: FlashInfer's FA3 prefill
    "torch": "#17becf",  # cyan: torch's CPU SDPA
    "sdpa": "#1f77b4",  # SDPA's default dispatch (memory scaling)
    "naive": "#7f7f7f",  # grey: softmax(q k^T) v with the scores in memory
}
_SPARE_COLOURS = ("#8c564b", "#bcbd22", "#393b79", "#637939", "#843c39")


def runner_colour(runner: str) -> str:
    """The runner's fixed colour (RUNNER_COLOURS); a runner not listed gets a spare colour chosen by its name."""
    return RUNNER_COLOURS.get(runner) or _SPARE_COLOURS[zlib.crc32(runner.encode()) % len(_SPARE_COLOURS)]


PANELS_PER_ROW = 4  # wider figures wrap: 8 panels in one row are too small to read


def draw_panels(panels: dict[str, dict[str, list[tuple]]], device: str, title: str, ylabel: str,
                xlabel: str | None = None, logx: bool = False, logy: bool = False):
    """A figure with one panel per entry of `panels` (panel title -> runner -> [(x, y), ...]); each runner in
    its own colour in every panel, and one legend for the figure, titled with the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cols = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols + 1.6, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    runners: list[str] = []
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for runner, pts in lines.items():
            if not pts:
                continue
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=runner_colour(runner), label=runner)
            runners += [runner] if runner not in runners else []
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        if xlabel:
            ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    handles = [Line2D([], [], color=runner_colour(r), marker="o", label=r) for r in runners]
    fig.legend(handles=handles, title=device, loc="center right", fontsize=8, title_fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_panels(report: dict, metric: str) -> dict[str, dict[str, list[tuple]]]:
    """The GPU report's `metric` ("tflops", or "peak_extra_bytes" in MiB) per workload group and runner."""
    scale = 1 if metric == "tflops" else 2**20
    panels = {}
    for group in sorted({r["group"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["group"] == group]
        panels[group] = {p: [(r["workload"], r["results"][p][metric] / scale)
                             for r in rows if metric in r["results"].get(p, {})] for p in PEERS}
    return panels


def plot(report: dict, out_dir: Path, stem: str) -> list[Path]:
    """The GPU report's TFLOP/s and peak extra memory, one panel per workload group."""
    paths = []
    for metric, ylabel, suffix in (("tflops", "TFLOP/s", "tflops"), ("peak_extra_bytes", "peak extra MiB", "memory")):
        fig = draw_panels(report_panels(report, metric), report["env"]["device"],
                          f"{report['env']['device']} — {ylabel}", ylabel)
        paths.append(save_figure(fig, out_dir / f"{stem}-{suffix}.png"))
    return paths


# ---------------------------------------------------------------- memory scaling (GPU)

MEMORY_SEQS = (1024, 2048, 4096, 8192, 16384, 32768)
MEMORY_HEADS, MEMORY_DIM = 16, 128


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as written in torch: the S x S scores (and their normalized weights) live in memory."""
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~keep, -math.inf)
    return (scores - scores.logsumexp(-1, keepdim=True)).exp() @ v


def memory_scaling(device: str, seqs=MEMORY_SEQS) -> list[dict]:
    """Peak memory one causal forward allocates beyond its inputs (B=1, 16 heads, D=128, bf16), per sequence
    length, for attnc, SDPA and the naive form; a runner out of memory is recorded as such. Needs a GPU."""
    spec = attnc.parse(_spec("bench_memory", MEMORY_DIM, False, "    mask i >= j\n"))[0]
    kern = attnc.compile(spec)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    runners = {"attnc": kern, "sdpa": lambda q, k, v: sdpa(q, k, v, is_causal=True), "naive": naive_attention}
    rows = []
    for s in seqs:
        q, k, v = (torch.randn(1, MEMORY_HEADS, s, MEMORY_DIM, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        row = {"S": s, "results": {}}
        for name, fn in runners.items():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                fn(q, k, v)
                torch.cuda.synchronize()
                row["results"][name] = {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base}
            except torch.cuda.OutOfMemoryError:
                row["results"][name] = {"error": "out of memory"}
        rows.append(row)
        print_row(row | {"workload": f"memory S={s}"})
        del q, k, v
    torch.cuda.empty_cache()
    return rows


def memory_panels(rows: list[dict]) -> dict[str, dict[str, list[tuple]]]:
    """memory_scaling's rows as one panel: MiB per runner and length; the panel's title names the runners that
    ran out of memory and the first length they failed at."""
    runners = list(dict.fromkeys(name for row in rows for name in row["results"]))
    lines = {r: [(row["S"], row["results"][r]["peak_extra_bytes"] / 2**20) for row in rows
                 if "peak_extra_bytes" in row["results"].get(r, {})] for r in runners}
    failed = {r: next((row["S"] for row in rows if "error" in row["results"].get(r, {})), None) for r in runners}
    oom = "; ".join(f"{r} out of memory from S={s}" for r, s in failed.items() if s is not None)
    return {f"causal, B=1, H={MEMORY_HEADS}, D={MEMORY_DIM}, bf16" + (f"\n({oom})" if oom else ""): lines}


def plot_memory_scaling(rows: list[dict], device: str, path: Path) -> Path:
    """Peak extra memory against sequence length, log-log, one line per runner (FlashTile's memory plot)."""
    fig = draw_panels(memory_panels(rows), device, "peak memory vs sequence length", "peak extra MiB",
                      "sequence length", logx=True, logy=True)
    return save_figure(fig, path)


def result_path(out: str | Path, env: dict, prefix: str = "") -> Path:
    """`<out>/<prefix><device>-<date>.json` (the folder made if missing): where a benchmark writes its report."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    return out_dir / f"{prefix}{device}-{env['date'][:10]}.json"


def checked_runners(made: dict, anchors: tuple[str, ...], tol: float, results: dict) -> dict:
    """Run each runner of `made` (name -> fn, or name -> the reason it cannot run) once and compare its output
    with the first of `anchors` that ran (relative Frobenius error). results[name] gets rel_err or the error;
    returned: name -> fn for the runners that agree, the ones worth timing."""
    outputs = {}
    for name, fn in made.items():
        if isinstance(fn, str):
            results[name] = {"error": fn}
            continue
        try:
            out = fn()
            if attnc.finish_compiles():  # checked and timed: the kernel built in the background, which runs now
                out = fn()
            outputs[name] = (fn, out)
        except Exception as e:  # noqa: BLE001  (a peer that cannot run this workload is reported)
            results[name] = {"error": error_text(e)}
    anchor = next((n for n in anchors if n in outputs), None)
    agreeing = {}
    for name, (fn, out) in outputs.items():
        err = _rel_err(_flat(out), _flat(outputs[anchor][1] if anchor else out))
        results[name] = {"rel_err_vs": anchor, "rel_err": err}
        if err <= tol:
            agreeing[name] = fn
        else:
            results[name]["error"] = f"wrong result: rel err {err:.3g} vs {anchor}"
    return agreeing


def run_report(bench: str, workloads, run_one, out: str | Path, prefix: str, only: str | None) -> tuple[dict, Path]:
    """A GPU benchmark's report: run_one(w, "cuda") for each workload whose name matches `only` (a regex), the
    JSON rewritten at result_path(out, env, prefix) after every row."""
    if not torch.cuda.is_available():
        raise attnc.CallError(f"{bench} needs a CUDA GPU")
    report = {"env": environment("cuda"), "rows": []}
    path = result_path(out, report["env"], prefix)
    for w in workloads:
        if only and not re.search(only, w.name):
            continue
        report["rows"].append(run_one(w, "cuda"))
        print_row(report["rows"][-1])
        torch.cuda.empty_cache()
        path.write_text(json.dumps(report, indent=1))  # after every row: a run cut short keeps what it measured
    return report, path


def run(args: argparse.Namespace) -> int:
    if getattr(args, "device", "cuda") == "cpu":
        return run_cpu(args)
    if not torch.cuda.is_available():
        raise attnc.CallError("attnc bench needs a CUDA GPU; on a CPU run `attnc bench --device cpu` (attnc's "
                              "TVM kernels against torch's CPU SDPA)")
    report, path = run_report("attnc bench", prefill_workloads(args.quick), run_workload, args.out, "", args.only)
    if not args.only:
        report["host"] = host_overhead("cuda")
        report["cold_compile"] = cold_compile("cuda")
        report["memory_scaling"] = memory_scaling("cuda", MEMORY_SEQS[:3] if args.quick else MEMORY_SEQS)
        path.write_text(json.dumps(report, indent=1))
        plot_memory_scaling(report["memory_scaling"], report["env"]["device"],
                            path.parent / f"{path.stem}-memory-scaling.png")
    plot(report, path.parent, path.stem)
    print_table(report)
    return 0



# ---------------------------------------------------------------- CPU (--device cpu)

CPU_SPEC = """
attention bench_cpu_{name} {{
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
{mask}    {returns}
}}
"""
CPU_HEADS = 8  # B = 1, H = 8: the issue's shapes
CPU_TOL = 1e-4  # relative (norm) error against torch's fp32 SDPA that still counts as the same result
# Before each block of calls the process pauses this long. After a call, torch's OpenMP workers spin for a few
# ms of CPU and TVM's workers yield-spin for longer: a block that starts inside the other library's spin shares
# a core with it (attnc at dense S=512 D=64, 2 threads: 4.6 ms right after an SDPA call, 2.4 ms after a pause).
SETTLE_S = 0.05


@dataclass(frozen=True)
class CpuWorkload:
    causal: bool
    D: int
    S: int

    @property
    def name(self) -> str:
        return f"{'causal' if self.causal else 'dense'} D={self.D} S={self.S}"

    @property
    def flops(self) -> float:
        """The forward's FLOPs over kept pairs (`--backward`: times 1 + BACKWARD_FLOPS)."""
        kept = self.S * (self.S + 1) // 2 if self.causal else self.S * self.S
        return 4.0 * CPU_HEADS * self.D * kept


BACKWARD_FLOPS = 2.5  # the backward counted as 2.5x the forward's FLOPs (FlashAttention's convention)


def cpu_workloads(seqs: list[int], dims: list[int], only: str | None = None) -> list[CpuWorkload]:
    rows = [CpuWorkload(causal, d, s) for causal in (False, True) for d in dims for s in seqs]
    return [w for w in rows if not only or re.search(only, w.name)]


def time_in_blocks(fns: dict[str, Callable], rounds: int, seconds: float) -> dict[str, list[list[float]]]:
    """Call times (s) of each function, per round. A round gives each function one block: a pause (SETTLE_S),
    an untimed call (it wakes the library's thread pool), then timed calls for about `seconds` (at least 3).
    The blocks alternate round by round, so a change of the machine's load reaches every function alike."""
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            fn()
            block: list[float] = []
            start = time.perf_counter()
            while len(block) < 3 or time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                fn()
                block.append(time.perf_counter() - t0)
            times[name].append(block)
    return times


def summarize_blocks(attnc_blocks: list[list[float]], torch_blocks: list[list[float]], flops: float) -> dict:
    """Times: the median over every timed call. Speedup: the median over rounds of torch's median / attnc's
    median in that round (each round's own machine conditions)."""
    ratios = [statistics.median(b) / statistics.median(a) for a, b in zip(attnc_blocks, torch_blocks)]
    ours = [t for block in attnc_blocks for t in block]
    theirs = [t for block in torch_blocks for t in block]
    return {"attnc_ms": statistics.median(ours) * 1e3, "torch_ms": statistics.median(theirs) * 1e3,
            "attnc_min_ms": min(ours) * 1e3, "torch_min_ms": min(theirs) * 1e3,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "attnc_gflops": flops / statistics.median(ours) / 1e9,
            "torch_gflops": flops / statistics.median(theirs) / 1e9,
            "calls_per_round": [len(block) for block in attnc_blocks]}


def cpu_environment(threads: int) -> dict:
    import tvm

    from ..backends.tvm.host import host_cpu

    cpu = host_cpu()
    return {"device": "cpu", "model": cpu.model, "llvm_mcpu": cpu.llvm_names()[0], "vector_lanes": cpu.vector,
            "logical_cores": os.cpu_count(), "threads": {"torch": torch.get_num_threads(), "tvm": threads},
            "torch": torch.__version__, "tvm": tvm.__version__, "attnc": attnc.__version__,
            "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "batch": 1, "heads": CPU_HEADS, "dtype": "f32",
            "method": f"per round one block of calls per side, each after a {SETTLE_S * 1e3:.0f} ms pause and an "
                      f"untimed call; times: median over every timed call; speedup: median over rounds of "
                      f"torch / attnc block medians"}


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise attnc.CallError(f"{option} {text}: expected positive integers separated by commas, e.g. "
                              f"{option} 512,1024")
    return values


def run_cpu(args: argparse.Namespace) -> int:
    """attnc's TVM kernels against torch's CPU SDPA, same inputs and thread count; writes cpu-<date>.json."""
    from ..backends.tvm.host import configure_threads

    if args.threads is not None and args.threads < 1:
        raise attnc.CallError(f"--threads {args.threads}: expected a positive thread count")
    seqs = _int_list(args.seqs, "--seqs")[:2] if args.quick else _int_list(args.seqs, "--seqs")
    dims = _int_list(args.dims, "--dims")
    rounds = min(args.rounds, 3) if args.quick else args.rounds
    if rounds < 1:
        raise attnc.CallError(f"--rounds {args.rounds}: expected at least 1")
    threads = configure_threads(args.threads)  # TVM's pool size, before its first parallel launch
    torch.set_num_threads(threads)
    backward = args.backward
    report = {"env": {**cpu_environment(threads), "pass": "forward+backward" if backward else "forward"}, "rows": []}
    if backward:
        report["env"]["flops"] = f"forward FLOPs over kept pairs x {1 + BACKWARD_FLOPS} (the backward as " \
                                 f"{BACKWARD_FLOPS}x the forward)"
    path = result_path(args.out, report["env"], "backward-" if backward else "")  # [backward-]cpu-<date>.json
    kernels = {causal: attnc.compile(attnc.parse(CPU_SPEC.format(name="causal" if causal else "dense",
                                                                 mask="    mask i >= j\n" if causal else "",
                                                                 returns=return_text(returns_lse=backward)))[0],
                                     backend="tvm")
               for causal in (False, True)}
    seconds = 0.1 if args.quick else 0.5

    def add_row(row: dict, fns: dict[str, Callable]) -> None:
        """Check attnc against torch, time both, and write the row out (a run cut short keeps its rows)."""
        err = _rel_err(*(_flat(fns[side]()) for side in ("attnc", "torch")))
        row["rel_err"] = err
        if not math.isfinite(err) or err > CPU_TOL:
            row["error"] = f"wrong result: rel err {err:.3g} vs torch"
        else:
            row["loadavg_before"] = os.getloadavg()
            blocks = time_in_blocks(fns, rounds, seconds)
            row.update(summarize_blocks(blocks["attnc"], blocks["torch"], row["flops"]), loadavg_after=os.getloadavg())
        report["rows"].append(row)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print_cpu_row(row)

    for w in cpu_workloads(seqs, dims, args.only):
        gen = torch.Generator().manual_seed(w.S * 1000 + w.D)
        q, k, v = (torch.randn(1, CPU_HEADS, w.S, w.D, generator=gen) for _ in range(3))
        fns = (cpu_training_runners if backward else cpu_forward_runners)(kernels[w.causal], w, q, k, v, gen)
        add_row({"workload": w.name, "causal": w.causal, "S": w.S, "D": w.D,
                 "flops": w.flops * (1 + BACKWARD_FLOPS if backward else 1)}, fns)
    if not backward:  # the serving kernels have no backward
        serving = {kind: attnc.compile(attnc.parse(text.format(returns=return_text()))[0], backend="tvm")
                   for kind, text in SERVING_SPECS.items()}
        for w in serving_workloads(seqs[:1] if args.quick else seqs, dims, args.only):
            fns, flops = serving_runners(serving[w.kind], w)
            add_row({"workload": w.name, "causal": True, "S": w.S, "D": w.D, "flops": flops, "panel": w.kind}, fns)
    print_cpu_table(report)
    plot_path = plot_cpu(report, path.with_suffix(".png"))
    print(f"wrote {path} and {plot_path}")
    return 0


def _flat(result) -> torch.Tensor:
    """A runner's result as one tensor: the training steps return their gradients as a tuple, concatenated only
    for the check (a torch.cat in the timed step is a copy no training step makes; on the CPU it runs on torch's
    thread pool, whose spinning threads then slow the next TVM call: benchmarks/NOTES.md, session 14)."""
    return torch.cat([t.flatten() for t in result]) if isinstance(result, tuple) else result


def cpu_forward_runners(kernel, w: CpuWorkload, q, k, v, gen) -> dict[str, Callable]:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"attnc": lambda: kernel(q, k, v), "torch": lambda: sdpa(q, k, v, is_causal=w.causal)}


def cpu_training_runners(kernel, w: CpuWorkload, q, k, v, gen) -> dict[str, Callable]:
    """Forward and backward of sum(out * dout), each returning (dq, dk, dv): attnc's TVM forward and its backward
    (Backend.build_backward) called directly, torch's SDPA through autograd."""
    from ..backends import get_backend
    from ..dsl.signature import bind

    sdpa = torch.nn.functional.scaled_dot_product_attention
    backward = get_backend("tvm").build_backward(kernel.plan("cpu", w.D))
    dout = torch.randn(q.shape, generator=gen)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def attnc_step():
        out, lse = kernel(q, k, v)
        grads = backward(bind(kernel.spec, q, k, v, {}), out, lse, dout, None, False)
        return tuple(grads[role] for role in "qkv")

    def torch_step():
        out = sdpa(*leaves, is_causal=w.causal)
        return torch.autograd.grad(out, leaves, dout)

    return {"attnc": attnc_step, "torch": torch_step}


# Serving rows (docs/serving.md): B sequences of S/2 to S keys (decode) or tokens (varlen prefill), H = CPU_HEADS
# query heads over SERVING_KV_HEADS K/V heads; torch gathers each sequence's pages, or slices its rows, and calls
# SDPA per sequence.
SERVING_SPECS = {
    "paged decode": """attention bench_cpu_paged_decode {{
    q: f32[B, M, H, D]  k: f32[PAGES, PAGE, HKV, D]  v: f32[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    mask causal
    {returns}
}}""",
    "varlen prefill": """attention bench_cpu_varlen {{
    q: f32[T, H, D]  k: f32[TK, HKV, D]  v: f32[TK, HKV, D]
    ragged q by cu_seqlens
    ragged k, v by cu_seqlens
    mask causal
    {returns}
}}""",
}
SERVING_BATCH = {"paged decode": 8, "varlen prefill": 4}
SERVING_KV_HEADS = 2
SERVING_PAGE = 16


@dataclass(frozen=True)
class ServingWorkload:
    kind: str  # a key of SERVING_SPECS
    D: int
    S: int  # the longest sequence

    @property
    def name(self) -> str:
        return f"{self.kind} D={self.D} S={self.S}"

    def lengths(self, gen: torch.Generator) -> list[int]:
        half = max(1, self.S // 2)
        return [half + int(x) for x in torch.randint(0, self.S - half + 1, (SERVING_BATCH[self.kind],), generator=gen)]


def serving_workloads(seqs: list[int], dims: list[int], only: str | None = None) -> list[ServingWorkload]:
    rows = [ServingWorkload(kind, d, s) for kind in SERVING_SPECS for d in dims for s in seqs]
    return [w for w in rows if not only or re.search(only, w.name)]


def serving_runners(kernel, w: ServingWorkload) -> tuple[dict[str, Callable], float]:
    """attnc's call and torch's (SDPA per sequence over its gathered pages or rows), on the same data; and the
    FLOPs over kept pairs."""
    gen = torch.Generator().manual_seed(w.S * 1000 + w.D + 7)
    lens = w.lengths(gen)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    h, hkv, d = CPU_HEADS, SERVING_KV_HEADS, w.D
    if w.kind == "paged decode":
        used = [-(-n // SERVING_PAGE) for n in lens]
        pages = sum(used)
        k, v = (torch.randn(pages, SERVING_PAGE, hkv, d, generator=gen) for _ in range(2))
        ids = torch.randperm(pages, generator=gen)
        table = torch.zeros(len(lens), max(used), dtype=torch.int32)
        at = 0
        for b, n in enumerate(used):
            table[b, :n] = ids[at:at + n]
            at += n
        kv_len = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(len(lens), 1, h, d, generator=gen)
        rows = [(table[b, :used[b]].long(), n) for b, n in enumerate(lens)]

        def torch_paged():  # 4-D [1, heads, rows, D] views: torch's CPU flash kernel (3-D ones take its math path)
            outs = [sdpa(q[b:b + 1].transpose(1, 2), k[own].flatten(0, 1)[None, :n].transpose(1, 2),
                         v[own].flatten(0, 1)[None, :n].transpose(1, 2), enable_gqa=True)
                    for b, (own, n) in enumerate(rows)]
            return torch.cat(outs).transpose(1, 2)

        fns = {"attnc": lambda: kernel(q, k, v, block_table=table, kv_len=kv_len), "torch": torch_paged}
        return fns, 4.0 * h * d * sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], heads, d, generator=gen) for heads in (h, hkv, hkv))
    offsets = torch.tensor(cu, dtype=torch.int32)

    def torch_varlen():
        return torch.cat([sdpa(q[None, a:e].transpose(1, 2), k[None, a:e].transpose(1, 2), v[None, a:e].transpose(1, 2),
                               is_causal=True, enable_gqa=True)[0].transpose(0, 1) for a, e in zip(cu, cu[1:])])

    fns = {"attnc": lambda: kernel(q, k, v, cu_seqlens=offsets), "torch": torch_varlen}
    return fns, 4.0 * h * d * sum(n * (n + 1) // 2 for n in lens)


def print_cpu_row(row: dict) -> None:
    """One finished CPU row, at once."""
    if "error" in row:
        print(f"{row['workload']}: {row['error']}", flush=True)
    else:
        print(f"{row['workload']}: attnc {row['attnc_ms']:.2f} ms, torch {row['torch_ms']:.2f} ms "
              f"({row['speedup']:.2f}x)", flush=True)


def plot_cpu(report: dict, path: Path) -> Path:
    """GFLOP/s against sequence length, one panel per mask and head dim, attnc and torch's SDPA."""
    env = report["env"]
    rows = [r for r in report["rows"] if "speedup" in r]
    panels = {}
    for row in sorted(rows, key=lambda r: (r.get("panel", ""), r["causal"], r["D"], r["S"])):
        panel = row.get("panel") or ("causal" if row["causal"] else "dense")
        lines = panels.setdefault(f"{panel} D={row['D']}", {"attnc": [], "torch": []})
        for runner in lines:
            lines[runner].append((row["S"], row[f"{runner}_gflops"]))
    device = f"{env['model'] or 'CPU'}, {env['threads']['tvm']} threads"
    what = " forward+backward (backward = 2.5x forward FLOPs)" if env.get("pass") == "forward+backward" else ""
    fig = draw_panels(panels or {"no timed rows": {}}, device, f"fp32, B=1, H={env['heads']}{what} — GFLOP/s",
                      "GFLOP/s", "sequence length", logx=True)
    return save_figure(fig, path)


def print_cpu_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    table = Table(title=f"{env['model']} ({env['llvm_mcpu']}) · {env['threads']['tvm']} threads · torch "
                        f"{env['torch']} · tvm {env['tvm']} · fp32, B=1, H={env['heads']} · {env['pass']}")
    for name in ("workload", "attnc ms", "torch ms", "attnc/torch", "rounds", "GFLOP/s", "rel err", "load"):
        table.add_column(name, justify="left" if name == "workload" else "right", no_wrap=True)
    for row in report["rows"]:
        if "error" in row:
            table.add_row(row["workload"], *["—"] * 5, f"{row['rel_err']:.1e}", "", style="red")
            continue
        table.add_row(row["workload"], f"{row['attnc_ms']:.2f}", f"{row['torch_ms']:.2f}",
                      f"{row['speedup']:.2f}×", f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}",
                      f"{row['attnc_gflops']:.0f}", f"{row['rel_err']:.1e}", f"{row['loadavg_before'][0]:.2f}",
                      style=None if row["speedup"] >= 1.0 else "yellow")
    console = Console(width=max(Console().width, 100))  # the table's width when printed to a file or pipe
    console.print(table)
    timed = [r for r in report["rows"] if "speedup" in r]
    if timed:
        worst = min(timed, key=lambda r: r["speedup"])
        console.print(f"worst attnc / torch: {worst['speedup']:.2f}× ({worst['workload']}); 1-minute load "
                        f"average now {os.getloadavg()[0]:.2f}")

