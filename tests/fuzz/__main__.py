"""`python -m tests.fuzz --n 50000 [--seed 0] [--workers 2] [--out DIR] [--only 17,402]`: the spec fuzzer
(tests/fuzz/specs.py). Prints a summary and each finding (a traceback, a hang over 2 s of CPU per 32 KB of source,
a crashed worker) with the mutant that caused it; --out keeps the findings' sources. Exit status 1 when there are
any."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .specs import FINDINGS, LIMIT_CHARS, LIMIT_S, fuzz, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="how many mutants (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", help="comma-separated mutant indices to rerun")
    p.add_argument("--out", type=Path, help="a folder for the findings' sources")
    args = p.parse_args(argv)
    only = [int(x) for x in args.only.split(",")] if args.only else None
    start = time.monotonic()
    done = [0]

    def progress(outcome):
        done[0] += 1
        if outcome.result in FINDINGS:
            print(f"[{outcome.mutant.index}] {outcome.result} ({outcome.mutant.kind} {outcome.mutant.how}, "
                  f"{outcome.cpu_s:.1f} s)", file=sys.stderr, flush=True)
        if done[0] % 1000 == 0:
            print(f"{done[0]} mutants, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    outcomes = fuzz(args.n, args.seed, args.workers, only, progress)
    findings = [o for o in outcomes if o.result in FINDINGS]
    for o in findings:
        print(f"=== mutant {o.mutant.index} (seed {args.seed}): {o.result}, {o.mutant.kind} {o.mutant.how}, "
              f"{o.cpu_s:.2f} s CPU\n{o.detail.rstrip()}\n--- source (first 2000 characters)\n"
              f"{o.mutant.source[:2000]}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            suffix = ".attn" if o.mutant.kind == "text" else ".py"
            (args.out / f"mutant-{args.seed}-{o.mutant.index}{suffix}").write_bytes(
                o.mutant.source.encode("utf-8", "surrogatepass"))
    slowest = max(outcomes, key=lambda o: o.cpu_s, default=None)
    print(f"{len(outcomes)} mutants (seed {args.seed}) in {time.monotonic() - start:.0f} s: {summary(outcomes)}; "
          f"findings {len(findings)} (tracebacks, hangs over {LIMIT_S:.0f} s of CPU per {LIMIT_CHARS // 1024} KB of "
          f"source, crashes)"
          + (f"; slowest mutant {slowest.mutant.index}, {slowest.cpu_s:.2f} s" if slowest else ""))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
