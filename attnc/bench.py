"""Side-by-side GPU benchmark: attnc against SDPA (flash, cuDNN, efficient) and compiled FlexAttention.

Every runner sees the same inputs in the same process; each output is checked against the others before any
timing counts. Times are the median of `triton.testing.do_bench`; FLOPs count only kept (query, key) pairs.
Results go to `<out>/<device>-<date>.json` plus PNG plots; `attnc bench` and `benchmarks/run.py` call `main`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import attnc

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


def _spec(name: str, D: int, gqa: bool, body: str, params: str = "", inputs: str = "") -> str:
    kv = "HKV" if gqa else "H"
    return (
        f"attention {name} {{\n"
        f"    q: bf16[B, H, M, D]  k: bf16[B, {kv}, N, D]  v: bf16[B, {kv}, N, D]\n"
        f"{params}{inputs}{body}"
        f"    return softmax(score) @ v\n}}\n"
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
                                _spec(f"bench_{tag}", 128, False, body), causal=causal,
                                flex=(lambda x: (None, _causal_mask)) if causal else (lambda x: (None, None))))
    S8 = 4096 if quick else 8192
    causal_body = "    mask i >= j\n"
    out.append(Workload(f"gqa 32/8 causal S={S8}", "gqa", 2, 32, 8, S8, 128,
                        _spec("bench_gqa", 128, True, causal_body), causal=True,
                        flex=lambda x: (None, _causal_mask)))
    out.append(Workload(f"window 1024 S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_window", 128, False, causal_body + "    mask i - j < window\n",
                              params="    param window: i32 = 1024\n"),
                        causal=True, window=1024, sdpa=False, params={"window": 1024},
                        flex=lambda x: (None, _window_mask(1024))))
    out.append(Workload(f"softcap 30 S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_softcap", 128, False,
                              "    score = cap * tanh(score / cap)\n" + causal_body,
                              params="    param cap: f32 = 30.0\n"),
                        causal=True, sdpa=False, params={"cap": 30.0},
                        flex=lambda x: (_softcap_mods(30.0), _causal_mask)))
    out.append(Workload(f"alibi S={S8}", "variants", 2, 16, 16, S8, 128,
                        _spec("bench_alibi", 128, False,
                              "    score = score + slopes[h] * (j - i)\n" + causal_body,
                              inputs="    input slopes: f32[H]\n"),
                        causal=True, sdpa=False, inputs=_alibi_inputs,
                        flex=lambda x: (_alibi_mods(x["slopes"]), _causal_mask)))
    for D in (64, 256):
        out.append(Workload(f"causal D={D} S={S8}", "headdim", 2, 16, 16, S8, D,
                            _spec(f"bench_d{D}", D, False, causal_body), causal=True,
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


def _attnc_runner(w: Workload, q, k, v, extra):
    spec = attnc.parse(w.spec)[0]
    kern = attnc.compile(spec)
    kwargs = {**w.params, **extra}
    return lambda: kern(q, k, v, **kwargs)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_workload(w: Workload, device: str, check_tol: float = 2e-2) -> dict:
    from triton.testing import do_bench

    gen = torch.Generator(device=device).manual_seed(hash(w.name) & 0xFFFF)
    mk = lambda h: torch.randn(w.B, h, w.S, w.D, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, v = mk(w.H), mk(w.HKV), mk(w.HKV)
    extra = w.inputs(w.B, w.H, w.S, device) if w.inputs else {}
    flops = 4.0 * w.B * w.H * w.D * kept_pairs(w)
    row: dict = {"workload": w.name, "group": w.group, "B": w.B, "H": w.H, "HKV": w.HKV, "S": w.S, "D": w.D,
                 "flops": flops, "results": {}}
    timings: dict = {}
    makers = {
        "attnc": lambda: _attnc_runner(w, q, k, v, extra),
        "sdpa-cudnn": lambda: _sdpa_runner("CUDNN_ATTENTION")(w, q, k, v, extra),
        "sdpa-flash": lambda: _sdpa_runner("FLASH_ATTENTION")(w, q, k, v, extra),
        "sdpa-efficient": lambda: _sdpa_runner("EFFICIENT_ATTENTION")(w, q, k, v, extra),
        "flex": lambda: _flex_runner(w, q, k, v, extra, timings),
    }
    outputs = {}
    for name, make in makers.items():
        try:
            fn = make()
            if fn is None:
                continue
            outputs[name] = (fn, fn())
        except Exception as e:  # a peer that cannot run this workload is reported, not fatal
            row["results"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    # Correctness first: every output against the first peer that ran (or attnc when no peer ran).
    names = list(outputs)
    anchor = next((n for n in names if n != "attnc"), names[0] if names else None)
    for name, (fn, out) in outputs.items():
        err = _rel_err(out, outputs[anchor][1]) if anchor and name != anchor else 0.0
        res = {"rel_err_vs": anchor, "rel_err": err}
        if not math.isfinite(err) or err > check_tol:
            res["error"] = f"wrong result: rel err {err:.3g} vs {anchor}"
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            res["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            res["ms"] = ms
            res["tflops"] = flops / (ms * 1e-3) / 1e12
        row["results"][name] = res
    row.update(timings)
    return row


def host_us_per_call(fn, calls: int = 10, rounds: int = 300) -> float:
    """Median host time of one call: `calls` back-to-back calls timed between synchronizations, so the GPU
    queue never fills and the time is the host's alone."""
    return host_us_interleaved({"fn": fn}, calls, rounds)["fn"]


def host_us_interleaved(fns: dict, calls: int = 10, rounds: int = 300) -> dict[str, float]:
    """host_us_per_call of each function, measured in turn within every round, so a change of the host's speed
    during the measurement (the first one timed in a process ran 20 us where a later one ran 16) reaches all
    of them alike."""
    for fn in fns.values():
        for _ in range(50):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return {name: statistics.median(t) for name, t in times.items()}


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
    """First call of a never-seen variant (fresh constant): attnc compile+run vs FlexAttention's."""
    c = round(random.uniform(10.0, 60.0), 6)
    q, k, v = (torch.randn(1, 8, 1024, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    spec = attnc.parse(_spec("bench_cold", 128, False, f"    score = {c} * tanh(score / {c})\n    mask i >= j\n"))[0]
    t0 = time.perf_counter()
    attnc.compile(spec)(q, k, v)
    torch.cuda.synchronize()
    ours = time.perf_counter() - t0
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
    return {"attnc_s": ours, "flex_s": theirs}


# ---------------------------------------------------------------- report


def environment(device: str) -> dict:
    import triton

    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "capability": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "attnc": attnc.__version__,
            "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds")}


PEERS = ("attnc", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex")


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
                cells.append(f"{r['tflops']:.0f}")
                if p != "attnc":
                    best = max(best, r["tflops"])
            else:
                cells.append("err")
        ours = row["results"].get("attnc", {}).get("tflops")
        table.add_row(row["workload"], *cells, f"{ours / best:.2f}×" if ours and best else "—")
    Console().print(table)
    for key in ("host", "cold_compile"):
        if key in report:
            Console().print(f"{key}: {json.dumps(report[key])}")
    for row in report["rows"]:
        for p, r in row["results"].items():
            if "error" in r:
                Console().print(f"[yellow]{row['workload']} / {p}: {r['error']}")


def plot(report: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = sorted({r["group"] for r in report["rows"]})
    for metric, ylabel, suffix in (("tflops", "TFLOP/s", "tflops"), ("peak_extra_bytes", "peak extra MiB", "memory")):
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
        for ax, g in zip(axes[0], groups):
            rows = [r for r in report["rows"] if r["group"] == g]
            for p in PEERS:
                pts = [(r["workload"], r["results"].get(p, {}).get(metric)) for r in rows]
                pts = [(x, y / 2**20 if metric != "tflops" else y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_title(g)
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{report['env']['device']} — {ylabel}")
        fig.tight_layout()
        path = out_dir / f"{stem}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from .cli import bench_arguments

    ap = argparse.ArgumentParser(prog="attnc bench", description=__doc__.splitlines()[0])
    bench_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise attnc.CallError("attnc bench needs a CUDA GPU; on a CPU use benchmarks/bench_cpu.py")
    device = "cuda"
    report = {"env": environment(device), "rows": []}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', report['env']['device']).strip('-').lower()}-{report['env']['date'][:10]}"
    save = lambda: (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))  # after every row:
    for w in prefill_workloads(args.quick):  # a run cut short still leaves what it measured
        if args.only and not re.search(args.only, w.name):
            continue
        report["rows"].append(run_workload(w, device))
        torch.cuda.empty_cache()
        save()
    if not args.only:
        report["host"] = host_overhead(device)
        report["cold_compile"] = cold_compile(device)
        save()
    plot(report, out_dir, stem)
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
