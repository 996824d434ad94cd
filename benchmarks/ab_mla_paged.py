"""Paged against contiguous MLA decode (issue 14): bench_mla.py's two attnc runners alone (no peers, so no
compiled Flex), each checked against the float32 formula with NaN-poisoned outputs, then timed from CUDA graphs;
one JSON line per workload with both GB/s and paged / contiguous. The script's helpers come from this tree and
attnc from PYTHONPATH, so two checkouts A/B on one GPU (run the labels alternately, twice, for the spread):

    PYTHONPATH=OLD python benchmarks/ab_mla_paged.py --label old --out $OUT/ab_mla_paged.jsonl
    PYTHONPATH=$PWD python benchmarks/ab_mla_paged.py --label new --out $OUT/ab_mla_paged.jsonl
    TRITON_INTERPRET=1 python benchmarks/ab_mla_paged.py --smoke --out /tmp/ab.jsonl   # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import re

import torch

from bench_mla import GPU, SMOKE, SMOKE_DECODE, DecodeWorkload, attnc_runners, decode_inputs, decode_reference, measure

# 8k keys, where the issue measured paged at 0.87-0.88x of contiguous (B >= 64)
WORKLOADS = [DecodeWorkload(b, 8192, h) for h in (64, 128) for b in (64, 768)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="new")
    ap.add_argument("--out", required=True, help="JSON lines file, appended to")
    ap.add_argument("--only", default=None, help="regex over the workload names")
    ap.add_argument("--smoke", action="store_true", help="TRITON_INTERPRET=1 on a CPU: tiny f32 shapes")
    args = ap.parse_args()
    device, shapes = ("cpu", SMOKE) if args.smoke else ("cuda", GPU)
    for w in SMOKE_DECODE if args.smoke else WORKLOADS:
        if args.only and not re.search(args.only, w.name):
            continue
        x = decode_inputs(w, shapes, device)
        row = {"label": args.label, "workload": w.name, "bytes": w.bytes_read(shapes), "flops": w.flops(shapes),
               "results": {}}
        measure(attnc_runners(shapes, x), decode_reference(x, shapes.D), device, row)
        contiguous, paged = (row["results"][n].get("gb_s") for n in ("attnc", f"attnc-paged{shapes.page}"))
        row["paged_over_contiguous"] = paged / contiguous if paged and contiguous else None
        errors = {n: r["error"] for n, r in row["results"].items() if "error" in r}
        print(f"{args.label:>5} {w.name:<26} contiguous {contiguous or 0:8.4g} GB/s  paged {paged or 0:8.4g} GB/s  "
              f"ratio {row['paged_over_contiguous'] or 0:.3f}{'  ' + json.dumps(errors) if errors else ''}", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
