"""Varlen prefill benchmark: packed variable-length batches (FlashAttention's varlen layout), causal, attnc
against FA2's varlen kernel (torch's `aten._flash_attention_forward` with cumulative sequence lengths, the kernel
SDPA's flash backend runs) and compiled FlexAttention with a document mask, in one process on the same inputs.

Workloads: 16k packed tokens, bf16, D = 128, 16 heads (and 32q/8kv GQA), sequence lengths drawn once from a
seeded generator in three mixes (many short, mixed, few long). Every output is checked against FA2's (or the
first peer that ran) before any timing counts; times are the median of triton.testing.do_bench; FLOPs count
only kept (query, key) pairs: 4 * D * H * sum(L * (L + 1) / 2). create_block_mask's time is reported
separately. Results: `<out>/varlen-<device>-<date>.json`.

    python benchmarks/bench_varlen.py --out benchmarks/results [--only mixed]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

import attnc
from attnc.bench import checked_runners, compiled_flex_attention, print_errors, run_report

HEAD_DIM, TOTAL_TOKENS = 128, 16384
CHECK_TOL = 2e-2  # relative Frobenius error against the anchor
SPEC = """attention varlen_prefill {
    q: bf16[T, H, D]  k: bf16[TK, HKV, D]  v: bf16[TK, HKV, D]
    ragged q by cu_seqlens_q
    ragged k, v by cu_seqlens_k
    mask causal
    return softmax(score) @ v
}"""


@dataclass(frozen=True)
class VarlenWorkload:
    mix: str  # the length distribution's name
    low: int  # sequence lengths drawn uniformly from [low, high]
    high: int
    H: int = 16
    HKV: int = 16

    @property
    def name(self) -> str:
        heads = f"{self.H}q/{self.HKV}kv" if self.HKV != self.H else f"H={self.H}"
        return f"varlen {self.mix} {self.low}-{self.high} {heads}"

    def lengths(self) -> list[int]:
        """Lengths summing to TOTAL_TOKENS, the same on every run (a fixed seed per workload)."""
        gen = torch.Generator().manual_seed(self.low * 7919 + self.high)
        out, left = [], TOTAL_TOKENS
        while left > 0:
            n = int(torch.randint(self.low, self.high + 1, (1,), generator=gen))
            out.append(min(n, left))
            left -= out[-1]
        return out


WORKLOADS = (
    VarlenWorkload("short", 64, 1024),
    VarlenWorkload("mixed", 256, 4096),
    VarlenWorkload("long", 2048, 8192),
    VarlenWorkload("mixed", 256, 4096, H=32, HKV=8),
)


def kept_pairs(lengths: list[int]) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def runners(w: VarlenWorkload, q, k, v, cu: torch.Tensor, lengths: list[int], timings: dict) -> dict:
    made = {}
    kern = attnc.compile(attnc.parse(SPEC)[0])
    made["attnc"] = lambda: kern(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    longest = max(lengths)
    group = w.H // w.HKV

    def fa2():
        # FA2's varlen takes K/V with their own head count (GQA inside the kernel).
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False)[0]
    made["fa2-varlen"] = fa2

    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, TOTAL_TOKENS, TOTAL_TOKENS, device=q.device)
    torch.cuda.synchronize()
    timings["create_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
    flex = compiled_flex_attention()
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))  # [1, heads, T, D]
    made["flex"] = lambda: flex(qf, kf, vf, block_mask=block_mask, enable_gqa=group > 1).squeeze(0).transpose(0, 1)
    return made


def run_workload(w: VarlenWorkload, device: str) -> dict:
    from triton.testing import do_bench

    lengths = w.lengths()
    gen = torch.Generator(device=device).manual_seed(len(lengths))
    q = torch.randn(TOTAL_TOKENS, w.H, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(TOTAL_TOKENS, w.HKV, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    flops = 4 * HEAD_DIM * w.H * kept_pairs(lengths)
    row = {"workload": w.name, "mix": w.mix, "low": w.low, "high": w.high, "H": w.H, "HKV": w.HKV,
           "D": HEAD_DIM, "sequences": len(lengths), "tokens": TOTAL_TOKENS, "flops": flops, "results": {}}
    timings = {}
    made = runners(w, q, k, v, cu, lengths, timings)
    for name, fn in checked_runners(made, ("fa2-varlen", "flex"), CHECK_TOL, row["results"]).items():
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        row["results"][name].update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
    row.update(timings)
    return row


PEERS = ("attnc", "fa2-varlen", "flex")


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    table = Table(title=f"{env['device']} · torch {env['torch']} · triton {env['triton']} · varlen causal "
                        f"prefill, bf16, D={HEAD_DIM}, {TOTAL_TOKENS} tokens: TFLOP/s")
    for col in ("workload", "sequences", *PEERS, "attnc / FA2", "attnc / Flex"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for row in report["rows"]:
        tf = {p: row["results"].get(p, {}).get("tflops") for p in PEERS}
        cells = [f"{tf[p]:.0f}" if tf[p] else ("err" if p in row["results"] else "—") for p in PEERS]
        ratios = [f"{tf['attnc'] / tf[p]:.2f}×" if tf["attnc"] and tf[p] else "—" for p in ("fa2-varlen", "flex")]
        table.add_row(row["workload"], str(row["sequences"]), *cells, *ratios)
    Console().print(table)
    print_errors(report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON file")
    ap.add_argument("--only", default=None, help="regex: run only workloads whose name matches")
    args = ap.parse_args(argv)
    report, path = run_report("bench_varlen", WORKLOADS, run_workload, args.out, "varlen-", args.only)
    print_table(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
