"""The Gluon prefill's consumer schedules side by side (issue 13): pingpong / parallel / cooperative against the
Triton template and cuDNN, on attnc bench's dense and causal workloads, in one process on the same inputs, each
output checked against cuDNN's before it is timed (attnc.bench.run_workload). Whether pingpong beats parallel says
whether the handoff orders the two consumers' MMAs at all (benchmarks/NOTES.md, the per-row floors: the Gluon rows
sit near the floor without overlap).

    python3 benchmarks/gluon_schedules.py [--only REGEX] [--out DIR]     # on an sm_90 GPU with Triton 3.6"""
import argparse

import attnc.bench as bench
from attnc.passes import PlanOptions
from attnc.passes.warpgroups import SCHEDULES


def schedule_makers(w, q, k, v, extra, timings) -> dict:
    """cuDNN (the anchor), the Triton template, and the Gluon kernel under each consumer schedule."""
    peers = bench.runner_makers(w, q, k, v, extra, timings)
    makers = {"sdpa-cudnn": peers["sdpa-cudnn"], "attnc": peers["attnc"]}
    for schedule in SCHEDULES:
        options = PlanOptions(gluon=True, warpgroup_schedule=schedule)
        makers[f"attnc-gluon-{schedule}"] = lambda o=options: bench.attnc_gluon_runner(w, q, k, v, extra, o)
    return makers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default=r"^(dense|causal) S=(4096|16384)$", help="regex over attnc bench's workloads")
    args = ap.parse_args()
    report, path = bench.run_report("gluon_schedules", bench.prefill_workloads(),
                                    lambda w, device: bench.run_workload(w, device, makers=schedule_makers),
                                    args.out, "gluon-schedules-", args.only)  # prints each row as it finishes
    bench.print_errors(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
