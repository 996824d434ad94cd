"""Sweep attnc's Triton prefill tiles on the GPU: every (workload, config) is checked against a float32
reference with NaN-poisoned outputs before it is timed. One call of the device tool runs it end to end:

    python benchmarks/sweep_triton.py --out $OUT [--only REGEX] [--budget SECONDS]

Configs run in rank order across all workloads (rank 0 for every workload, then rank 1, ...), so a budget cut
still leaves each workload its most promising configs. Results stream to <out>/sweep.jsonl; the best correct
config per workload is printed last. The winners go into attnc/passes/tiling.py's TUNED table by hand.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

import attnc
from attnc.bench import Workload, error_text, kept_pairs, log_row, prefill_workloads, sweep_parser
from attnc.passes import PlanOptions
from attnc.backends.triton import launch

# (block_m, block_n, num_warps, num_stages, tma, warp_specialize), most promising first
CONFIGS = {
    64: [(128, 128, 4, 3, True, True), (128, 64, 4, 3, False, False), (128, 128, 8, 3, False, False),
         (128, 128, 4, 2, True, True), (128, 64, 4, 3, True, True), (128, 128, 8, 3, True, False),
         (128, 64, 4, 4, False, False), (64, 64, 4, 4, False, False)],
    128: [(128, 128, 4, 2, True, True), (128, 64, 8, 3, False, False), (128, 128, 8, 2, False, False),
          (128, 64, 4, 3, True, True), (128, 128, 8, 3, True, False), (128, 128, 8, 2, True, True),
          (128, 64, 8, 3, True, False), (128, 128, 4, 3, True, True), (128, 64, 4, 4, False, False),
          (64, 64, 4, 3, False, False)],
    256: [(64, 64, 4, 2, False, False), (128, 64, 8, 2, False, False), (128, 64, 8, 2, True, True),
          (128, 64, 8, 2, True, False), (64, 64, 4, 2, True, True), (128, 32, 8, 2, False, False),
          (64, 64, 4, 3, False, False), (64, 32, 4, 3, False, False)],
}
SWEEP_NAMES = r"^(dense S=4096|causal S=4096|gqa .*|window .*|softcap .*|alibi .*|causal D=.*)$"


def reference(w: Workload, q, k, v, extra) -> torch.Tensor:
    """float32 attention one (batch, head) at a time, masks and score mods from the workload's flex mods."""
    score_mod, mask_mod = w.flex(extra)
    group = w.H // w.HKV
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    qi = torch.arange(w.S, device=q.device)[:, None]
    kj = torch.arange(w.S, device=q.device)[None, :]
    for b in range(w.B):
        for h in range(w.H):
            bt, ht = torch.tensor(b, device=q.device), torch.tensor(h, device=q.device)
            s = (q[b, h].float() @ k[b, h // group].float().T) * w.D ** -0.5
            if score_mod is not None:
                s = score_mod(s, bt, ht, qi, kj)
            if mask_mod is not None:
                s = s.masked_fill(~mask_mod(bt, ht, qi, kj), -math.inf)
            out[b, h] = torch.softmax(s, -1) @ v[b, h // group].float()
    return out


def poisoned_call(fn):
    """fn() with NaN-filled outputs, so elements the kernel never writes fail the check."""
    with launch.poisoned_outputs():
        out = fn()
        torch.cuda.synchronize()
        return out


def run(args) -> list[dict]:
    from triton.testing import do_bench

    t0 = time.time()
    names = args.only or SWEEP_NAMES
    work = [w for w in prefill_workloads(False) if re.search(names, w.name)]
    state = {}
    for w in work:
        gen = torch.Generator(device="cuda").manual_seed(1234)
        mk = lambda h: torch.randn(w.B, h, w.S, w.D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v = mk(w.H), mk(w.HKV), mk(w.HKV)
        extra = w.inputs(w.B, w.H, w.S, "cuda") if w.inputs else {}
        state[w.name] = (q, k, v, extra, reference(w, q, k, v, extra))
    log = Path(args.out) / "sweep.jsonl"
    rows = []
    ranks = len(args.configs) if args.configs else max(len(c) for c in CONFIGS.values())
    for rank in range(ranks):
        for w in work:
            configs = args.configs or CONFIGS[w.D]
            if rank >= len(configs):
                continue
            if time.time() - t0 > args.budget:
                print(f"budget of {args.budget}s spent at rank {rank}")
                return rows
            bm, bn, warps, stages, tma, ws = configs[rank]
            q, k, v, extra, ref = state[w.name]
            row = {"workload": w.name, "D": w.D, "config": [bm, bn, warps, stages, tma, ws]}
            try:
                opts = PlanOptions(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, tma=tma,
                                   warp_specialize=ws)
                kern = attnc.compile(attnc.parse(w.spec)[0], options=opts)
                fn = lambda: kern(q, k, v, **w.params, **extra)
                tc = time.time()
                out = poisoned_call(fn)
                row["compile_s"] = time.time() - tc
                finite = bool(torch.isfinite(out).all())
                err = float((out.float() - ref).norm() / ref.norm())
                row.update(finite=finite, rel_err=err)
                if finite and err < 2e-2:
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row.update(ms=ms, tflops=4.0 * w.B * w.H * w.D * kept_pairs(w) / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = error_text(e, -1, 300)
            rows.append(row)
            log_row(row, log)
    return rows


def main() -> None:
    ap = sweep_parser(__doc__, 330.0)
    ap.add_argument("--configs", type=json.loads, default=None,
                    help='JSON list of [BM, BN, warps, stages, tma, ws] for every workload, in place of CONFIGS')
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = run(args)
    print("\nbest correct config per workload (BM, BN, warps, stages, tma, ws):")
    for name in dict.fromkeys(r["workload"] for r in rows):
        ok = [r for r in rows if r["workload"] == name and "tflops" in r]
        bad = [r for r in rows if r["workload"] == name and "tflops" not in r]
        best = max(ok, key=lambda r: r["tflops"]) if ok else None
        line = ", ".join(f"{r['config']}={r['tflops']:.0f}" for r in sorted(ok, key=lambda r: -r["tflops"]))
        print(f"{name:24s} best {best['config'] if best else None}: {line}; failed {len(bad)}")
        for r in bad:
            print(f"    {r['config']}: {r.get('error') or ('rel_err %.3g finite %s' % (r['rel_err'], r['finite']))}")


if __name__ == "__main__":
    main()
