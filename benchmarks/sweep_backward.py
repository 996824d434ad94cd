"""Sweep the backward's tiles (attnc/passes/tiling.py BACKWARD_TUNED) on the GPU: the dK/dV kernel's tile in the
atomic mode, then the dQ kernel's tile in the deterministic mode. Each config puts its row first in the table,
checks dq, dk and dv against float32 SDPA (math backend) with NaN-poisoned outputs, then times the backward
kernels alone (the forward runs once, outside the timer). One call of the device tool runs it end to end:

    python benchmarks/sweep_backward.py --out $OUT [--only REGEX] [--budget SECONDS]

`--gluon` also times, first and in the same process, the Gluon dK/dV kernel (PlanOptions(gluon_backward=True); kernel
"gluon", both modes, dQ by the dQ kernel, 32 and 64 query rows per slot: gluon_backward_block_m; kernel "gluon-dq",
atomic, dQ by its reduce-adds at 32 rows skewed and 64 rows split by columns) and the default backward of today's
BACKWARD_TUNED (kernel "template"). `--ds-under-dkdv` is that A/B alone, no tile sweep: per
workload the template's default (both modes), the Gluon kernel at the pass's query rows and the same with
PlanOptions(gluon_backward_ds_under_dkdv=True) (kernel "gluon-ds"; P^T and dS^T of the next tile under dV and dK),
and with PlanOptions(gluon_backward_dq_in_dkdv=True) (kernel "gluon-dq"; dQ by the Gluon kernel's TMA reduce-adds, no
dQ kernel), the Gluon rows in the atomic mode only (deterministic calls keep the dQ kernel).
Results stream to <out>/sweep-backward.jsonl; the best correct config per (workload, kernel) is printed last.
TFLOP/s count the backward as attnc.bench.BACKWARD_FLOPS times the forward. The winners go into BACKWARD_TUNED
by hand.

A/B against other modules in the same run: each `--baseline DIR` (repeatable) also times, first and with the first
tile of each list, the backward modules in DIR for the sweep's workloads (kernel "baseline", both modes; the row's
"modules" names DIR), e.g. an earlier attnc's, written on a CPU by `--write-baseline DIR` run from its tree:

    git archive <commit> attnc | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python3 benchmarks/sweep_backward.py --write-baseline benchmarks/results/bwd-baseline-<commit>
"""
from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import torch

import attnc
from attnc.backends import get_backend
from attnc.backends.triton import launch
from attnc.backends.triton.gradients import BackwardLauncher
from attnc.bench import BACKWARD_FLOPS, error_text, kept_pairs, log_row, prefill_workloads, sweep_parser
from attnc.dsl.signature import bind
from attnc.passes import PlanOptions, plan_kernel, tiling
from attnc.passes.grad import plan_backward
from attnc.passes.plan import TileConfig

# (block_m, block_n, num_warps, num_stages) per head dim, most promising first; the first is today's row (round 2,
# around round 1's winners: results/sweep-backward-*-round1.jsonl)
# (round 3: the dK/dV kernel's query loops free of branches, pipelined; compile-only, 64x128 w8 spills more than
# 32x128 w8 and than one stage: benchmarks/compile_backward_sm90.py with STATS=1)
DKDV = {
    64: [(32, 128, 4, 3), (64, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 4), (64, 64, 4, 4)],
    128: [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 1), (64, 128, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 8, 1), (64, 64, 8, 2), (128, 64, 8, 1), (64, 128, 8, 1), (64, 32, 8, 1)],
}
DQ = {
    64: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (64, 32, 4, 4)],
    128: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 3)],
    256: [(64, 64, 8, 1), (64, 64, 8, 2), (128, 64, 8, 1), (64, 64, 4, 1)],
}
NAMES = r"^(dense S=4096|causal S=4096|causal D=64 .*|causal D=256 .*)$"
CHECK_TOL = 3e-2  # relative Frobenius error of dq, dk, dv against float32 (bf16 inputs)
GLUON_AB = ("template", "gluon", "gluon-ds", "gluon-dq")  # the default's rows: today's table, the Gluon kernel beside it


def reference_grads(w, q, k, v, dout) -> list[torch.Tensor]:
    """dq, dk, dv in float32, one batch row at a time (GQA 32/8 at S=8192: 8.6 GB of weights per row)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for b in range(q.shape[0]):
        leaves = [t[b:b + 1].float().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel([SDPBackend.MATH]):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=w.causal,
                                                                   enable_gqa=w.H != w.HKV)
        rows.append(torch.autograd.grad(out, leaves, dout[b:b + 1].float()))
    return [torch.cat(grads) for grads in zip(*rows)]


def with_row(D: int, dkdv: tuple, dq: tuple, dq_kernel: bool = False):
    """BACKWARD_TUNED with a row for (sm_90, 16-bit, D) first."""
    row = tiling.BackwardRow(90, 16, D, TileConfig(*dkdv), TileConfig(*dq), dq_kernel=dq_kernel)
    return (row,) + tuple(r for r in tiling.BACKWARD_TUNED if r is not row)


def baseline_file(directory, w) -> Path:
    return Path(directory) / (re.sub(r"[^A-Za-z0-9]+", "_", w.name).strip("_") + ".py")


def workloads(args):
    return [w for w in prefill_workloads(False) if re.search(args.only or NAMES, w.name) and w.sdpa]


def plan_for(w, target, options=None):
    spec = replace(attnc.parse(w.spec)[0], returns_lse=True)
    return spec, plan_kernel(spec, target, w.D, w.D, options or PlanOptions())


def write_baseline(args) -> None:
    """The backward modules of this tree's code generator for the sweep's workloads, planned for sm_90."""
    from attnc.backends.triton.backward import generate_backward
    from attnc.passes import Target

    Path(args.write_baseline).mkdir(parents=True, exist_ok=True)
    for w in workloads(args):
        path = baseline_file(args.write_baseline, w)
        path.write_text(generate_backward(plan_for(w, Target("triton", "cuda", 90))[1]), encoding="utf-8")
        print(path)


def run(args) -> list[dict]:
    from triton.testing import do_bench

    t0 = time.time()
    original = tiling.BACKWARD_TUNED
    backend = get_backend("triton")
    work = workloads(args)
    log = Path(args.out) / "sweep-backward.jsonl"
    rows = []
    for w in work:
        gen = torch.Generator(device="cuda").manual_seed(4321)
        q, k, v, dout = (torch.randn(w.B, h, w.S, w.D, device="cuda", dtype=torch.bfloat16, generator=gen)
                         for h in (w.H, w.HKV, w.HKV, w.H))
        ref = reference_grads(w, q, k, v, dout)
        spec, plan = plan_for(w, backend.target(q.device))
        bound = bind(spec, q, k, v, dict(w.params))
        out, lse = backend.build(plan)(bound)
        flops = BACKWARD_FLOPS * 4.0 * w.B * w.H * w.D * kept_pairs(w)
        default_dkdv, default_dq = DKDV[w.D][0], DQ[w.D][0]
        trials = [("dkdv", c, default_dq, False) for c in DKDV[w.D]]
        trials += [("dq", default_dkdv, c, True) for c in DQ[w.D]]
        trials = [("baseline", default_dkdv, default_dq, d, m) for m in args.baseline for d in (False, True)] + [
            (*t, None) for t in trials]
        if args.ds_under_dkdv:  # the A/B alone
            trials = [("template", default_dkdv, default_dq, d, None) for d in (False, True)] + [
                (kernel, default_dkdv, default_dq, False, None) for kernel in ("gluon", "gluon-ds", "gluon-dq")]
        elif args.gluon:  # the Gluon dK/dV kernel first, then the template's default row (the first "dkdv" trial)
            trials = [("gluon", default_dkdv, default_dq, d, rows) for rows in (32, 64) for d in (False, True)] + [
                ("gluon-dq", default_dkdv, default_dq, False, rows) for rows in (32, 64)] + [
                ("template", default_dkdv, default_dq, d, None) for d in (False, True)] + (
                [] if args.no_tile_sweep else trials)
        # variant: a baseline's directory of modules, or the Gluon kernel's query rows per ring slot
        for kernel, dkdv, dq, deterministic, variant in trials:
            if time.time() - t0 > args.budget:
                print(f"budget of {args.budget}s spent")
                return rows
            row = {"workload": w.name, "D": w.D, "kernel": kernel, "deterministic": deterministic,
                   "dkdv": list(dkdv), "dq": list(dq)}
            # "gluon" and "template": today's table (its dq_kernel flag too), the Gluon kernel against the default
            tiling.BACKWARD_TUNED = original if kernel in GLUON_AB else with_row(w.D, dkdv, dq, args.dq_kernel)
            try:
                if kernel == "baseline":
                    row["modules"] = Path(variant).name
                    module = launch.import_source(baseline_file(variant, w), f"baseline_{len(rows)}")
                    # modules written before DKDV_HEADS loop over a GQA group in one program per K/V head
                    module.DKDV_HEADS = getattr(module, "DKDV_HEADS", "HKV")
                    backward = BackwardLauncher(plan, module)
                elif kernel in ("gluon", "gluon-ds", "gluon-dq"):
                    options = PlanOptions(gluon_backward=True, gluon_backward_block_m=variant,
                                          gluon_backward_ds_under_dkdv=kernel == "gluon-ds" or None,
                                          gluon_backward_dq_in_dkdv=kernel == "gluon-dq" or None)
                    gluon_plan = plan_for(w, plan.target, options)[1]
                    row["block_m"] = variant or plan_backward(gluon_plan).gluon_dkdv.block_m
                    backward = backend.build_backward(gluon_plan)
                    # whether this launch runs the Gluon kernel, not the template's it falls back to
                    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # the atomic mode's
                    row["gluon_ran"] = bool(backward.gluon_dkdv and backward.gluon_dkdv.covers(
                        q, k, v, dout, lse, dq, deterministic))
                else:
                    backward = backend.build_backward(plan)
                fn = lambda: backward(bound, out, lse, dout, None, deterministic)
                tc = time.time()
                with launch.poisoned_outputs():
                    grads = fn()
                    torch.cuda.synchronize()
                row["compile_s"] = round(time.time() - tc, 2)
                errs = [float((grads[n].float() - r).norm() / r.norm()) for n, r in zip("qkv", ref)]
                row["rel_err"] = errs
                if max(errs) < CHECK_TOL:
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = error_text(e, -1, 300)
            finally:
                tiling.BACKWARD_TUNED = original
            rows.append(row)
            log_row(row, log)
    return rows


def main() -> None:
    ap = sweep_parser(__doc__, 400.0)
    ap.add_argument("--baseline", action="append", default=[], help="a directory of modules to time too")
    ap.add_argument("--write-baseline", default=None, help="write this tree's modules for the workloads; no GPU")
    ap.add_argument("--dq-kernel", action="store_true",
                    help="the swept rows keep dQ in the dQ kernel where atomics are allowed (BackwardRow.dq_kernel, "
                         "today's default at every D); without it the atomic mode adds dQ by atomics")
    ap.add_argument("--gluon", action="store_true",
                    help="time the Gluon dK/dV kernel too (PlanOptions(gluon_backward))")
    ap.add_argument("--no-tile-sweep", action="store_true",
                    help="with --gluon: the Gluon and template rows alone, no tile sweep")
    ap.add_argument("--ds-under-dkdv", action="store_true",
                    help="only the A/B: template, Gluon, Gluon with PlanOptions(gluon_backward_ds_under_dkdv), "
                         "Gluon with PlanOptions(gluon_backward_dq_in_dkdv)")
    args = ap.parse_args()
    if args.write_baseline:
        write_baseline(args)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = run(args)
    print("\nbest correct config per workload and kernel (BM, BN, warps, stages):")
    for name, kernel in dict.fromkeys((r["workload"], r["kernel"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["kernel"]) == (name, kernel)]
        ok = sorted((r for r in mine if "tflops" in r), key=lambda r: -r["tflops"])
        def label(r):
            mode = "det" if r["deterministic"] else "atomic"
            if kernel in GLUON_AB:
                return f"{kernel}{'-' + str(r['block_m']) if kernel != 'template' else ''}:{mode}"
            return f"{r['modules']}:{mode}" if kernel == "baseline" else r[kernel]

        line = ", ".join(f"{label(r)}={r['tflops']:.0f}" for r in ok)
        print(f"{name:22s} {kernel:4s} {line}; failed {len(mine) - len(ok)}")
        for r in mine:
            if "tflops" not in r:
                print(f"    {label(r)}: {r.get('error') or 'rel_err %s' % r['rel_err']}")


if __name__ == "__main__":
    main()
