"""Sweep attnc's decode kernel (split-KV, packed GQA heads, contiguous and paged K/V) on the GPU: every
(workload, config) is checked against a float32 torch formula with NaN-poisoned outputs and workspace before it
is timed (a wrong config is reported, never timed). One call of the device tool runs it end to end:

    python benchmarks/sweep_decode.py --out $OUT --budget 150 [--only REGEX]
    TRITON_INTERPRET=1 python benchmarks/sweep_decode.py --out /tmp/sweep --smoke   # CPU: tiny shapes, 2 configs

Workloads: bench_decode.py's (32q/8kv heads, D = 128, bf16, one query token): B = 1 KV = 32k contiguous; B = 8 and
B = 64 at KV = 8k, contiguous and paged (pages of 16 and 64, shuffled block tables). A config is PlanOptions
(block_n, num_warps, num_stages, pack_heads) plus a split count; num_stages counts like the dense kernel's (K/V
tiles in flight + 1) and passes/decode.pipeline_stages maps it to Triton's for a paged cache. Kernel configs run
in rank order (the default first, then one knob changed, ...); within one, each workload tries the split rule's
count, its neighbours and 1, later configs only the rule's and the best split seen. Splits = 1 on a contiguous
cache is the decode kernel launched unsplit (path "forced"): attnc.compile sends it to the prefill kernel, which
the default config's record ("public", rule splits = 1 at B = 64) times. Compiles dominate (2-4 s each, cached
by Triton across split counts), so the budget cuts the tail of the ranking.

Output: one JSON record per line on stdout and in <out>/sweep_decode.jsonl (workload, config, launch as run,
rel_err, ms, K/V TB/s, ok); per workload, the default config's time split into the decode and the merge kernel
(CUDA graphs, so launch overhead does not count); last, the best correct config per workload next to the
default's, also in <out>/sweep_decode_summary.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import attnc
from attnc.bench import error_text
from attnc.dsl.signature import bind
from attnc.passes import PlanOptions
from attnc.passes.decode import decode_launch
from attnc.passes.tiling import launch_tiles
from attnc.backends.triton import launch, serving
from bench_decode import CONTIGUOUS, HEAD_DIM, HEADS, KV_HEADS, PAGED, paged_copy

CHECK_TOL = 1e-2  # relative Frobenius error of a bf16 output against the float32 formula


@dataclass(frozen=True)
class Workload:
    B: int
    L: int  # keys per sequence
    page: int = 0  # 0: contiguous [B, HKV, L, D]; else a paged pool with pages of this many slots

    @property
    def name(self) -> str:
        keys = f"{self.L // 1024}k" if self.L % 1024 == 0 else str(self.L)
        return f"B={self.B} KV={keys} " + (f"paged{self.page}" if self.page else "contiguous")


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    workloads: tuple[Workload, ...]


GPU_SHAPES = Shapes(HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, (
    Workload(1, 32768), Workload(8, 8192), Workload(64, 8192), Workload(8, 8192, 16), Workload(64, 8192, 16),
    Workload(8, 8192, 64), Workload(64, 8192, 64)))
SMOKE_SHAPES = Shapes(4, 2, 32, torch.float32, (Workload(1, 512), Workload(2, 256, 16)))


@dataclass(frozen=True)
class KernelConfig:
    """The PlanOptions knobs of the decode kernel; None keeps the plan's choice."""

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    pack_heads: bool | None = None

    def options(self, splits: int | None) -> PlanOptions:
        return PlanOptions(block_n=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages,
                           pack_heads=self.pack_heads, num_splits=splits)


DEFAULT = KernelConfig()
# The H100's decode tile is BN=64, 4 warps, 3 stages (passes/decode.py DECODE_TUNED). First the single changes
# most likely to matter for a memory-bound loop (tiles in flight, tile width), then the rest of the grid by the
# number of knobs changed.
LEADING = (DEFAULT, KernelConfig(64, 4, 4), KernelConfig(32, 4, 4), KernelConfig(128, 4, 3), KernelConfig(32, 4, 3),
           KernelConfig(64, 8, 3), KernelConfig(64, 2, 3), KernelConfig(128, 8, 3), KernelConfig(64, 4, 2),
           KernelConfig(64, 4, 3, False))
BASE = KernelConfig(64, 4, 3, True)


def ranked_configs() -> list[KernelConfig]:
    rest = [KernelConfig(bn, w, s, p) for bn, w, s, p in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4),
                                                                            (True, False))]
    changed = lambda c: sum(getattr(c, f) != getattr(BASE, f) for f in ("block_n", "num_warps", "num_stages",
                                                                        "pack_heads"))
    leading = {replace(BASE, **{k: v for k, v in asdict(c).items() if v is not None}) for c in LEADING}
    return list(LEADING) + sorted((c for c in rest if c not in leading), key=lambda c: (changed(c), not c.pack_heads))


# ---------------------------------------------------------------- inputs and the check


@dataclass
class Prepared:
    """One workload: its inputs as the spec takes them, the spec, the float32 reference and the bytes read."""

    w: Workload
    spec: attnc.Attention
    q: torch.Tensor  # as the spec takes it
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict
    want: torch.Tensor  # float32 [B, H, 1, D]
    kv_bytes: int

    def output(self, result) -> torch.Tensor:
        out = result[0] if isinstance(result, tuple) else result
        return out.transpose(1, 2) if self.w.page else out  # the paged spec's out is [B, M, H, D]


def spec_text(text: str, dtype: torch.dtype) -> str:
    return text if dtype == torch.bfloat16 else text.replace("bf16", "f32")  # the interpreter's bf16 is wrong


def prepare(w: Workload, shapes: Shapes, device: str) -> Prepared:
    gen = torch.Generator(device=device).manual_seed(w.B * 100003 + w.L + w.page)
    dt = shapes.dtype
    q = torch.randn(w.B, shapes.heads, 1, shapes.head_dim, device=device, dtype=dt, generator=gen)
    k, v = (torch.randn(w.B, shapes.kv_heads, w.L, shapes.head_dim, device=device, dtype=dt, generator=gen)
            for _ in range(2))
    want = reference(q, k, v)
    kv_bytes = 2 * k.numel() * k.element_size()
    if not w.page:
        return Prepared(w, attnc.parse(spec_text(CONTIGUOUS, dt))[0], q, k, v, {}, want, kv_bytes)
    kp, vp, table = paged_copy(k, v, w.page, gen)
    lengths = torch.full((w.B,), w.L, dtype=torch.int32, device=device)
    return Prepared(w, attnc.parse(spec_text(PAGED, dt))[0], q.transpose(1, 2), kp, vp,
                    {"block_table": table, "kv_len": lengths}, want, kv_bytes)


def reference(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float32, query head h reading K/V head h // (H / HKV); every key is kept
    (one query token at the end of the cache, bottom-right causal)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(b, h, 1, d, dtype=torch.float32, device=q.device)
    for i in range(b):  # one sequence at a time: float32 K/V of B = 64 would take 4 GB each
        qf = q[i].float().view(hkv, h // hkv, d)
        s = torch.einsum("hgd,hld->hgl", qf, k[i].float()) * d ** -0.5
        out[i] = torch.einsum("hgl,hld->hgd", torch.softmax(s, -1), v[i].float()).reshape(h, 1, d)
    return out


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def poisoned(fn, device: str):
    """fn() with every output and workspace allocation NaN-filled, so elements no kernel writes fail the check."""
    with launch.poisoned_outputs():
        result = fn()
        synchronize(device)
        return result


def check(p: Prepared, result) -> float:
    out = p.output(result).float()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - p.want).norm() / p.want.norm())


# ---------------------------------------------------------------- timing


def timer(device: str):
    """ms per call: the median of triton.testing.do_bench on the GPU; a host clock in the interpreter (smoke)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=60, return_mode="median")
    return host_timer


def graph_timer(device: str):
    """ms per call replayed from a CUDA graph (no launch overhead): for kernels shorter than a launch."""
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        return lambda fn: do_bench_cudagraph(fn, rep=30, return_mode="median")
    return host_timer


def host_timer(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- one config


def sm_count(device: str) -> int:
    return serving.sm_count(torch.device(device))


def bound_call(p: Prepared):
    return bind(p.spec, p.q, p.k, p.v, p.kwargs)


def rule_splits(p: Prepared, cfg: KernelConfig, device: str) -> int:
    """The split rule's count for this kernel config (the key tiles depend on BLOCK_N); 1 where it does not split."""
    kernel = attnc.compile(p.spec, options=cfg.options(None))
    plan = kernel.plan(device, p.q.shape[-1])
    go = decode_launch(plan, bound_call(p).sizes, sm_count(device))
    return go.splits if go else 1


def as_run(p: Prepared, kernel: attnc.Kernel, device: str, splits: int | None, forced: bool) -> tuple[dict, object]:
    """(what runs: kernel, tile, warps, Triton stages, pack, splits; a zero-argument call)."""
    plan = kernel.plan(device, p.q.shape[-1])
    bound = bound_call(p)
    if forced:  # the decode kernel unsplit on a contiguous cache: attnc.compile would run the prefill kernel
        two = decode_launch(replace(plan, options=replace(plan.options, num_splits=2)), bound.sizes, sm_count(device))
        go = replace(two, splits=1)
        fn = unsplit_call(p, serving.DecodeLauncher(plan), bound, go)
    else:
        go = decode_launch(plan, bound.sizes, sm_count(device))
        fn = lambda: kernel(p.q, p.k, p.v, **p.kwargs)
    if go is None:
        tiles = launch_tiles(plan, bound.sizes["M"], bound.sizes["H"] // bound.sizes["HKV"])
        what = {"kernel": "prefill", "splits": 1}
    else:
        tiles = go.tiles
        what = {"kernel": "decode", "splits": go.splits}
    c = tiles.config
    what.update(block_m=c.block_m, block_n=c.block_n, num_warps=c.num_warps, triton_stages=c.num_stages,
                pack=tiles.pack)
    return what, fn


def unsplit_call(p: Prepared, launcher: serving.DecodeLauncher, bound, go):
    """A call of `go` through the launcher: the first by bind()'s path, later ones replayed (PreparedDecode), so
    the host cost stays that of a serving call."""
    prepared = None

    def call():
        nonlocal prepared
        out = prepared(p.q, p.k, p.v, p.kwargs) if prepared else None
        if out is None:
            out, prepared = launcher.run(bound, go)
        return out
    return call


def run_config(p: Prepared, cfg: KernelConfig, splits: int | None, forced: bool, device: str, seen: set) -> dict | None:
    """One record; None when the launch it resolves to was already timed for this workload."""
    row = {"workload": p.w.name, "config": {k: v for k, v in asdict(cfg).items() if v is not None},
           "num_splits": splits, "path": "forced" if forced else "public"}
    try:
        kernel = attnc.compile(p.spec, options=cfg.options(None if forced else splits))
        what, fn = as_run(p, kernel, device, splits, forced)
        key = tuple(sorted(what.items()))
        if key in seen:
            return None
        seen.add(key)
        row["launch"] = what
        t = time.perf_counter()
        result = poisoned(fn, device)
        row["compile_s"] = round(time.perf_counter() - t, 2)
        err = check(p, result)
        row.update(rel_err=err, ok=err <= CHECK_TOL)
        if row["ok"]:
            ms = timer(device)(fn)
            row.update(ms=ms, tb_s=p.kv_bytes / (ms * 1e-3) / 1e12)
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=error_text(e, -1, 300))
    return row


def breakdown(p: Prepared, device: str, splits: int | None = None) -> dict:
    """The default config's time at `splits` (None: the rule's), whole (as called) and per kernel (decode, then
    the merge), each from a CUDA graph."""
    kernel = attnc.compile(p.spec, options=DEFAULT.options(splits))
    plan = kernel.plan(device, p.q.shape[-1])
    bound = bound_call(p)
    go = decode_launch(plan, bound.sizes, sm_count(device))
    row = {"workload": p.w.name, "breakdown": True, "num_splits": splits}
    bench = graph_timer(device)
    row["whole_ms"] = bench(lambda: kernel(p.q, p.k, p.v, **p.kwargs))
    if go is None:
        row["kernels"] = "prefill"
        return row
    launcher = serving.DecodeLauncher(plan)
    calls = launcher.calls(bound, go, *launcher.outputs(bound, go))
    for name, (fn, grid, args, meta) in zip(("decode", "combine"), calls):
        compiled = fn[grid](*args, **meta)
        # shared memory shows the K/V tiles in flight (32 KB each at BN = 64, D = 128, bf16); registers, occupancy
        row[f"{name}_smem"] = getattr(getattr(compiled, "metadata", None), "shared", None)
        row[f"{name}_regs"] = getattr(compiled, "n_regs", None)
        row[f"{name}_ms"] = bench(lambda fn=fn, grid=grid, args=args, meta=meta: fn[grid](*args, **meta))
    row.update(splits=go.splits, programs=go.q_programs * go.splits * go.head_programs)
    return row


def split_candidates(rule: int, key_tiles: int, first: bool, best: int | None) -> list[int]:
    """The rule's count first; on the first (default) config also 1, half, 1.5x and 2x (2 and 4 where the rule
    does not split); later the best so far."""
    values = [rule, 1, rule // 2, rule * 3 // 2, rule * 2] + ([2, 4] if rule == 1 else []) if first \
        else [rule, best or rule]
    return [s for s in dict.fromkeys(values) if 1 <= s <= key_tiles]


# ---------------------------------------------------------------- the sweep


def run(args) -> list[dict]:
    t0 = time.time()
    device = "cpu" if args.smoke else "cuda"
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    configs = ranked_configs()[:2] if args.smoke else ranked_configs()
    work = [w for w in shapes.workloads if not args.only or re.search(args.only, w.name)]
    prepared = [prepare(w, shapes, device) for w in work]
    log = Path(args.out) / "sweep_decode.jsonl"
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    seen = {p.w.name: set() for p in prepared}
    best_splits: dict[str, int] = {}
    for rank, cfg in enumerate(configs):
        for p in prepared:
            rule = rule_splits(p, cfg, device)
            block_n = (cfg.block_n or attnc.compile(p.spec).plan(device, p.q.shape[-1]).decode.tile.block_n)
            key_tiles = -(-p.w.L // block_n)
            for splits in split_candidates(rule, key_tiles, rank == 0, best_splits.get(p.w.name)):
                if time.time() - t0 > args.budget:
                    print(f"budget of {args.budget:.0f}s spent at config rank {rank}", flush=True)
                    return rows
                forced = splits == 1 and not p.w.page
                row = run_config(p, cfg, splits, forced, device, seen[p.w.name])
                if row is not None:
                    emit(row)
            if rank == 0:
                if not p.w.page:  # the default as attnc.compile runs it (the prefill kernel where the rule gives 1)
                    row = run_config(p, cfg, None, False, device, seen[p.w.name])
                    if row is not None:
                        emit(row)
                emit(breakdown(p, device))
                if rule_splits(p, cfg, device) == 1:  # and what the merge would cost at 2 splits
                    emit(breakdown(p, device, 2))
                done = [r for r in rows if r["workload"] == p.w.name and "tb_s" in r]
                if done:
                    best_splits[p.w.name] = max(done, key=lambda r: r["tb_s"])["launch"]["splits"]
    return rows


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name and not r.get("breakdown")]
        ok = [r for r in mine if "tb_s" in r]
        default = next((r for r in ok if not r["config"] and r["num_splits"] is None), None) or \
            next((r for r in ok if not r["config"] and r["path"] == "public"), None)
        best = max(ok, key=lambda r: r["tb_s"]) if ok else None
        splits = [r for r in rows if r["workload"] == name and r.get("breakdown")]
        summary[name] = {
            "default": default and {"tb_s": default["tb_s"], "launch": default["launch"]},
            "best": best and {"tb_s": best["tb_s"], "config": best["config"], "num_splits": best["num_splits"],
                              "path": best["path"], "launch": best["launch"]},
            "breakdown": splits,
            "failed": [{k: r.get(k) for k in ("config", "num_splits", "rel_err", "error")}
                       for r in mine if not r.get("ok")],
            "configs_timed": len(ok)}
    return summary


def print_summary(summary: dict) -> None:
    print("\nbest correct config per workload (K/V TB/s), next to the default's:")
    for name, s in summary.items():
        d, b = s["default"], s["best"]
        dtext = f"default {d['tb_s']:.3f} ({d['launch']['kernel']}, {d['launch']['splits']} splits)" if d \
            else "default —"
        btext = "best —"
        if b and d:
            run = b["launch"]
            btext = (f"best {b['tb_s']:.3f} = {b['tb_s'] / d['tb_s']:.3f}x: {b['config'] or 'default'} splits "
                     f"{run['splits']} [{b['path']}; BM{run['block_m']} BN{run['block_n']} w{run['num_warps']} "
                     f"triton stages {run['triton_stages']}]")
        print(f"{name:24s} {dtext}; {btext}; {s['configs_timed']} timed, {len(s['failed'])} failed")
        for split in s["breakdown"]:
            parts = (f" = decode {split['decode_ms'] * 1e3:.1f} + merge {split.get('combine_ms', 0) * 1e3:.1f} us "
                     f"({split['splits']} splits, {split['programs']} programs; decode kernel "
                     f"{split['decode_smem']} B shared, {split['decode_regs']} registers)") if "decode_ms" in split \
                else " (prefill kernel)"
            print(f"{'':24s} default config, kernels timed alone: {split['whole_ms'] * 1e3:.1f} us{parts}")
        for f in s["failed"]:
            why = f["error"] or f"rel_err {f['rel_err']:.3g}"
            print(f"{'':24s} failed {f['config']} splits {f['num_splits']}: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for sweep_decode.jsonl and the summary")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; no new config starts after it")
    ap.add_argument("--only", default=None, help="regex over workload names")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU with TRITON_INTERPRET=1: tiny f32 shapes and 2 configs, to check the script runs")
    args = ap.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise attnc.CallError("--smoke runs in Triton's interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        raise attnc.CallError("sweep_decode needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = summarize(run(args))
    (Path(args.out) / "sweep_decode_summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
