"""The Gluon prefill's variants side by side (issue 13), against the Triton template and cuDNN on attnc bench's
workloads, in one process on the same inputs, each output checked against cuDNN's before it is timed
(attnc.bench.run_workload):
- the consumer schedules pingpong / parallel / cooperative: whether pingpong beats parallel says whether the handoff
  orders the two consumers' MMAs at all (benchmarks/NOTES.md, the per-row floors: the Gluon rows sit near the floor
  without overlap);
- `--persistent`: a program per 128-row query tile against persistent programs (PlanOptions(gluon_persistent=True),
  a program per SM over the work tiles), on the dense and causal rows at S = 1k / 4k / 16k;
- `--dense-head-dims`: with `--persistent`, dense rows at D = 64 and 256 too (16k tokens a batch, S = 1k / 4k / 16k),
  which `attnc bench` has only causal: whether the default should run persistent programs there as at D = 128;
- `--weights-under-pv`: the default layout against PlanOptions(gluon_weights_under_pv=True) (P V reads P from shared
  memory and is waited for a step later, so the weights of a tile run under the last tile's P V: benchmarks/NOTES.md,
  issue 13), each with the default's choice of programs (persistent for causal), on the same rows.

    python3 benchmarks/gluon_schedules.py [--persistent [--dense-head-dims] | --weights-under-pv] [--only REGEX]
        [--out DIR]
    # sm_90 GPU, Triton 3.6"""
import argparse
import dataclasses

import attnc.bench as bench
from attnc.passes import PlanOptions
from attnc.passes.warpgroups import SCHEDULES

SCHEDULE_VARIANTS = {f"attnc-gluon-{s}": PlanOptions(gluon=True, warpgroup_schedule=s) for s in SCHEDULES}
PERSISTENT_VARIANTS = {"attnc-gluon": PlanOptions(gluon=True, gluon_persistent=False),
                       "attnc-gluon-persistent": PlanOptions(gluon=True, gluon_persistent=True)}
UNDER_PV_VARIANTS = {"attnc-gluon": PlanOptions(gluon=True),
                     "attnc-gluon-under-pv": PlanOptions(gluon=True, gluon_weights_under_pv=True)}


def gluon_makers(variants: dict):
    """run_workload's makers: cuDNN (the anchor), the Triton template, and the Gluon kernel under each of
    `variants` (runner name -> PlanOptions)."""
    def makers(w, q, k, v, extra, timings) -> dict:
        peers = bench.runner_makers(w, q, k, v, extra, timings)
        out = {"sdpa-cudnn": peers["sdpa-cudnn"], "attnc": peers["attnc"]}
        for name, options in variants.items():
            out[name] = lambda o=options: bench.attnc_gluon_runner(w, q, k, v, extra, o)
        return out
    return makers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--persistent", action="store_true", help="one-tile against persistent programs")
    mode.add_argument("--weights-under-pv", action="store_true", help="P in registers against P in shared memory")
    ap.add_argument("--dense-head-dims", action="store_true", help="with --persistent: dense rows at D = 64 and 256")
    ap.add_argument("--only", help="regex over attnc bench's workloads (default: dense and causal at 4k and 16k, "
                                   "with --persistent or --weights-under-pv at 1k, 4k and 16k)")
    args = ap.parse_args()
    if args.persistent:
        variants, name, prefix = PERSISTENT_VARIANTS, "gluon_persistent", "gluon-persistent-"
    elif args.weights_under_pv:
        variants, name, prefix = UNDER_PV_VARIANTS, "gluon_weights_under_pv", "gluon-under-pv-"
    else:
        variants, name, prefix = SCHEDULE_VARIANTS, "gluon_schedules", "gluon-schedules-"
    only = args.only or (r"^(dense|causal) S=(4096|16384)$" if variants is SCHEDULE_VARIANTS
                         else r"^(dense|causal) S=(1024|4096|16384)$")
    makers = gluon_makers(variants)
    workloads = bench.prefill_workloads()
    if args.dense_head_dims:
        dense = [w for w in workloads if w.group == "dense"]
        # the same spec: its D comes from the inputs, and a kernel is built per head dim
        workloads += [dataclasses.replace(w, name=f"dense D={d} S={w.S}", D=d) for d in (64, 256) for w in dense]
    report, path = bench.run_report(name, workloads,
                                    lambda w, device: bench.run_workload(w, device, makers=makers),
                                    args.out, prefix, only)  # prints each row as it finishes
    bench.print_errors(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
