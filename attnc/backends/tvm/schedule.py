"""The CPU kernel's schedules (kernel.py lowers a plan with one): plain data, so the kernel cache key, which holds
the schedule, is computed without TVM."""
from __future__ import annotations

from dataclasses import dataclass

from ...ir import IndexVar, walk
from .host import host_cpu

# Key tiles per block of a backward key task (backward._key_task): 256 keys of K, V and dK, dV accumulators at D = 128
KEY_TILES = 4


@dataclass(frozen=True)
class CpuSchedule:
    vector: int  # float32 SIMD lanes
    block_m: int  # query rows per task; a multiple of `vector` (lanes run over rows in S^T)
    block_n: int  # keys per step; a multiple of kv_rows
    kv_rows: int  # keys per register tile of S^T (kv_rows x block_m accumulators)
    out_rows: int  # query rows per register tile of P V; divides block_m
    out_cols: int  # value columns per register tile of P V (the last one may be narrower)
    claim_tasks: bool = False  # hand tasks out at run time (x86: `lock bts`; kernel.claimed_tasks), else static ranges
    summary: bool = False  # data-dependent masks: skip key tiles by a tile summary (kernel.tile_summary_primfunc)
    pack: int = 1  # GQA: query heads of one K/V head sharing a task's rows (block_m / pack rows each; a power of 2)

    def __post_init__(self):
        assert self.block_m % self.vector == 0 and self.block_n % self.kv_rows == 0
        assert self.block_m % self.out_rows == 0 and self.block_n % self.out_rows == 0
        assert self.block_m * 4 < 1024 and self.out_cols * 4 < 1024  # each register row on the stack: module doc
        assert self.block_m % self.pack == 0 and self.pack & (self.pack - 1) == 0


def prefill_schedule(vector: int) -> CpuSchedule:
    """Four vectors of query rows per task and 4 keys per S^T register tile: 16 accumulators either way, but each
    broadcast K element now feeds four vector FMAs instead of two. Quiet machine, 2 threads, fp32 (session 3,
    against two vectors and 8 keys): dense D=128 S=4096 1.05x torch's SDPA instead of 0.96x, D=64 +2-7%,
    causal within 1% or better. (Four vectors with 8 keys, 32 accumulators, had measured 5-40% slower.)"""
    return CpuSchedule(vector, block_m=4 * vector, block_n=64, kv_rows=4, out_rows=4, out_cols=4 * vector,
                       claim_tasks=host_cpu().x86)


def decode_schedule(vector: int, pack: int = 1) -> CpuSchedule:
    """Few query rows (decode): one vector of rows per task, so no work goes to padding rows; `pack` heads of a GQA
    group share it (decode_pack)."""
    return CpuSchedule(vector, block_m=vector, block_n=64, kv_rows=8, out_rows=4, out_cols=4 * vector,
                       claim_tasks=host_cpu().x86, pack=pack)


def decode_pack(vector: int, rows: int, group: int) -> int:
    """Heads packed into a decode task of `vector` rows, for `rows` query rows per sequence and H / HKV = group: the
    largest power of two dividing the group whose heads' rows (each padded to a power of two) fit the vector, as the
    Triton decode kernel packs them (passes/decode.py, decode_tiles)."""
    positions, pack = 1, 1
    while positions < rows:
        positions *= 2
    while group % (2 * pack) == 0 and 2 * pack * positions <= vector:
        pack *= 2
    return pack


def uses_summary(plan, sched: CpuSchedule) -> bool:
    """Whether the kernel of `sched` reads a tile summary: the prefill schedule of data-dependent masks (decode
    schedules, a vector of rows, evaluate them on every tile, as the Triton decode kernel does)."""
    return sched.summary and plan.masks.data_dependent


def summary_uses_h(plan) -> bool:
    """Whether the tile summary differs per head (a mask reads h); else the heads share one."""
    return any(isinstance(n, IndexVar) and n.name == "h" for m in plan.spec.masks for n in walk(m))
