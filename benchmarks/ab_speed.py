"""Speed of two attnc checkouts on the same GPU, one process each, on the same workloads and seeds: what a
refactor must leave unchanged. Uses only `attnc.parse` and `attnc.compile`, which every version has.

    PYTHONPATH=OLD python benchmarks/ab_speed.py --label old --out $OUT/ab.jsonl
    PYTHONPATH=NEW python benchmarks/ab_speed.py --label new --out $OUT/ab.jsonl

Each call appends one JSON line per workload (median of triton.testing.do_bench, ms, and TFLOP/s or GB/s);
run the two labels alternately, twice, to see the spread between runs of the same code.
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import attnc

HEAD = "q: bf16[B, H, M, D]  k: bf16[B, HKV, N, D]  v: bf16[B, HKV, N, D]"
# (name, spec body, B, H, HKV, M, N, D, kept fraction of the M x N pairs)
WORKLOADS = [
    ("dense S=4k", "", 4, 16, 16, 4096, 4096, 128, 1.0),
    ("causal S=4k", "mask causal", 4, 16, 16, 4096, 4096, 128, 0.5),
    ("causal S=16k", "mask causal", 1, 16, 16, 16384, 16384, 128, 0.5),
    ("gqa 32/8 causal S=8k", "mask causal", 2, 32, 8, 8192, 8192, 128, 0.5),
    ("softcap 30 causal S=8k", "score = 30.0 * tanh(qk * rsqrt(D) / 30.0)\n mask causal", 2, 16, 16, 8192, 8192,
     128, 0.5),
    ("causal D=64 S=8k", "mask causal", 2, 16, 16, 8192, 8192, 64, 0.5),
    ("decode B=64 KV=16k", "", 64, 32, 8, 1, 16384, 128, None),
    ("decode B=1 KV=32k", "", 1, 32, 8, 1, 32768, 128, None),
]
PAGED_HEAD = "q: bf16[B, M, H, D]  k: bf16[PAGES, PAGE, HKV, D]  v: bf16[PAGES, PAGE, HKV, D]\n paged k, v by block_table, kv_len"
# (name, B, H, HKV, keys per sequence, PAGE): vLLM's pool with a shuffled block table, as bench_decode.py
PAGED_WORKLOADS = [
    ("paged16 decode B=64 KV=16k", 64, 32, 8, 16384, 16),
    ("paged64 decode B=8 KV=16k", 8, 32, 8, 16384, 64),
    ("paged16 decode B=1 KV=32k", 1, 32, 8, 32768, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    with open(args.out, "a") as out:
        def record(name: str, ms: float, rate: float, unit: str) -> None:
            row = {"label": args.label, "workload": name, "ms": ms, unit: rate, "device": device,
                   "attnc": attnc.__version__, "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")

        for name, body, b, h, hkv, m, n, d, kept in WORKLOADS:
            spec = attnc.parse(f"attention ab {{ {HEAD}\n {body}\n return softmax(score) @ v }}")[0]
            kern = attnc.compile(spec)
            torch.manual_seed(0)
            q = torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            kern(q, k, v)
            ms = do_bench(lambda: kern(q, k, v), warmup=50, rep=300, return_mode="median")
            if kept is None:  # decode: K/V bytes read per second
                record(name, ms, 2 * b * hkv * n * d * 2 / (ms * 1e-3) / 1e9, "GB/s")
            else:
                record(name, ms, 4 * b * h * m * n * d * kept / (ms * 1e-3) / 1e12, "TFLOP/s")
        for name, b, h, hkv, n, page in PAGED_WORKLOADS:
            kern = attnc.compile(attnc.parse(f"attention ab {{ {PAGED_HEAD}\n return softmax(score) @ v }}")[0])
            gen = torch.Generator(device="cuda").manual_seed(0)
            pages = b * n // page
            q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(pages, page, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            table = torch.randperm(pages, device="cuda", generator=gen).view(b, n // page).int()
            lengths = torch.full((b,), n, device="cuda", dtype=torch.int32)
            kern(q, k, v, block_table=table, kv_len=lengths)
            ms = do_bench(lambda: kern(q, k, v, block_table=table, kv_len=lengths), warmup=50, rep=300,
                          return_mode="median")
            record(name, ms, 2 * b * hkv * n * 128 * 2 / (ms * 1e-3) / 1e9, "GB/s")

if __name__ == "__main__":
    main()
