"""Decode benchmark: one query token per sequence against a long K/V cache, attnc against SDPA (cuDNN, flash)
and compiled FlexAttention decoding, in one process on the same inputs.

Workloads: B = 1, 8, 64 sequences, 32 query / 8 K/V heads, D = 128, bf16, KV = 4k / 8k / 16k / 32k keys; attnc
runs the cache contiguous ([B, HKV, L, D], the peers' layout) and paged (vLLM's [PAGES, PAGE, HKV, D] with
shuffled block tables, pages of 16 and 64). Every output is checked against SDPA's (or the first peer that
ran) before any timing counts; times are the median of triton.testing.do_bench, and again after an L2 flush by
reading (read_flush_ms: do_bench's flush writes, and the timed kernel pays for writing those lines back). The
figure of merit is K/V bytes read per second (2 * B * HKV * L * D * 2 bytes per call). Results: `<out>/decode-<device>-<date>.json`.

    python benchmarks/bench_decode.py --out benchmarks/results [--only 'B=64'] [--quick]
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass

import torch

import attnc
from attnc.bench import checked_runners, compiled_flex_attention, print_errors, run_report

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CHECK_TOL = 2e-2  # relative Frobenius error against the anchor
CONTIGUOUS = """attention decode_contiguous {
    q: bf16[B, H, M, D]  k: bf16[B, HKV, N, D]  v: bf16[B, HKV, N, D]
    mask causal
    return softmax(score) @ v
}"""
PAGED = """attention decode_paged {
    q: bf16[B, M, H, D]  k: bf16[PAGES, PAGE, HKV, D]  v: bf16[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    mask causal
    return softmax(score) @ v
}"""


@dataclass(frozen=True)
class DecodeWorkload:
    B: int
    L: int  # keys per sequence

    @property
    def name(self) -> str:
        return f"decode B={self.B} KV={self.L // 1024}k"

    @property
    def kv_bytes(self) -> int:
        return 2 * self.B * KV_HEADS * self.L * HEAD_DIM * 2


def workloads(quick: bool = False) -> list[DecodeWorkload]:
    lengths = (4096, 16384) if quick else (4096, 8192, 16384, 32768)
    return [DecodeWorkload(b, n) for b in (1, 8, 64) for n in lengths]


def paged_copy(k: torch.Tensor, v: torch.Tensor, page: int, gen: torch.Generator):
    """k, v [B, HKV, L, D] as pools [PAGES, PAGE, HKV, D] with a shuffled block table [B, L / PAGE]."""
    b, hkv, length, d = k.shape
    per_seq = length // page
    table = torch.randperm(b * per_seq, device=k.device, generator=gen).view(b, per_seq).int()
    pools = []
    for t in (k, v):
        pool = torch.empty(b * per_seq, page, hkv, d, dtype=t.dtype, device=t.device)
        pool[table.flatten().long()] = t.view(b, hkv, per_seq, page, d).permute(0, 2, 3, 1, 4).reshape(-1, page, hkv, d)
        pools.append(pool)
    return pools[0], pools[1], table


def runners(w: DecodeWorkload, q, k, v, gen) -> dict:
    """name -> a zero-argument callable returning out [B, H, 1, D]; a peer that cannot be set up is a str."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    made: dict = {}

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run

    made["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    made["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        flex = compiled_flex_attention(dynamic=False)
        offset = w.L - 1  # bottom-right causal: the new token sees the whole cache

        def keep(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(keep, None, None, 1, w.L, device=q.device)
        made["flex"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        made["flex"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    contiguous = attnc.compile(attnc.parse(CONTIGUOUS)[0])
    made["attnc"] = lambda: contiguous(q, k, v)
    lengths = torch.full((w.B,), w.L, dtype=torch.int32, device=q.device)
    q_bshd = q.transpose(1, 2)  # the paged spec takes q as [B, M, H, D]: the same tensor, viewed
    paged = attnc.compile(attnc.parse(PAGED)[0])
    for page in (16, 64):
        kp, vp, table = paged_copy(k, v, page, gen)
        made[f"attnc-paged{page}"] = (lambda kp=kp, vp=vp, table=table:
                                      paged(q_bshd, kp, vp, block_table=table, kv_len=lengths).transpose(1, 2))
    return made


def read_flush_ms(fn, reps: int = 200) -> float:
    """Median time of fn() after L2 is refilled by reading 256 MB. do_bench flushes L2 by writing zeros, and the
    timed kernel then writes those dirty lines back while it streams K/V: ~9 us at 134 MB of K/V on the H100
    (benchmarks/NOTES.md), a cost that depends on the flush, not on the kernel. Both figures are reported."""
    flush = _read_flush_buffer()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(10):
        fn()
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


@functools.lru_cache(maxsize=1)
def _read_flush_buffer() -> torch.Tensor:
    return torch.ones(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")


def run_workload(w: DecodeWorkload, device: str) -> dict:
    from triton.testing import do_bench

    gen = torch.Generator(device=device).manual_seed(w.B * 100003 + w.L)
    q = torch.randn(w.B, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(w.B, KV_HEADS, w.L, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    row = {"workload": w.name, **asdict(w), "H": HEADS, "HKV": KV_HEADS, "D": HEAD_DIM, "kv_bytes": w.kv_bytes,
           "results": {}}
    made = runners(w, q, k, v, gen)
    for name, fn in checked_runners(made, ("sdpa-flash", "sdpa-cudnn", "flex"), CHECK_TOL, row["results"]).items():
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        clean_ms = read_flush_ms(fn)
        row["results"][name].update(ms=ms, kv_tb_per_s=w.kv_bytes / (ms * 1e-3) / 1e12, read_flush_ms=clean_ms,
                                    read_flush_kv_tb_per_s=w.kv_bytes / (clean_ms * 1e-3) / 1e12)
    return row


PEERS = ("attnc", "attnc-paged16", "attnc-paged64", "sdpa-cudnn", "sdpa-flash", "flex")


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    table = Table(title=f"{env['device']} · torch {env['torch']} · triton {env['triton']} · decode, bf16, "
                        f"{HEADS}q/{KV_HEADS}kv heads, D={HEAD_DIM}: K/V TB/s")
    table.add_column("workload")
    for p in PEERS:
        table.add_column(p, justify="right")
    table.add_column("attnc / best peer", justify="right")
    table.add_column("read flush: attnc, best peer", justify="right")
    table.add_column("paged16 / contiguous", justify="right")
    for row in report["rows"]:
        r = row["results"]
        tb = {p: r.get(p, {}).get("kv_tb_per_s") for p in PEERS}
        best = max((tb[p] for p in PEERS if not p.startswith("attnc") and tb[p]), default=None)
        cells = [f"{tb[p]:.2f}" if tb[p] else ("err" if p in r else "—") for p in PEERS]
        ours, paged = tb["attnc"], tb["attnc-paged16"]
        clean = {p: r.get(p, {}).get("read_flush_kv_tb_per_s") for p in PEERS}
        clean_best = max((clean[p] for p in PEERS if not p.startswith("attnc") and clean[p]), default=None)
        table.add_row(row["workload"], *cells, f"{ours / best:.2f}×" if ours and best else "—",
                      f"{clean['attnc']:.2f}, {clean_best:.2f}" if clean["attnc"] and clean_best else "—",
                      f"{paged / ours:.2f}×" if ours and paged else "—")
    Console().print(table)
    print_errors(report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON file")
    ap.add_argument("--only", default=None, help="regex: run only workloads whose name matches")
    ap.add_argument("--quick", action="store_true", help="fewer cache lengths (a smoke run)")
    args = ap.parse_args(argv)
    report, path = run_report("bench_decode", workloads(args.quick), run_workload, args.out, "decode-", args.only)
    print_table(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
