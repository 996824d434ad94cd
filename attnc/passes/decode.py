"""Decode and serving: the plan of the split-KV kernel (codegen/triton/decode.py.j2) and its per-launch choices.

Decode reads a long K/V cache for one or a few query tokens per sequence: the work is memory bound and there
is too little of it per sequence to fill the GPU. Three things fix that:

- GQA packing: the query heads that share a K/V head become rows of one program (row = (head in group,
  query position)), so each K/V tile is read once for the whole group and the tensor-core tile has rows to
  fill at M = 1.
- split-KV: each row tile's key range is cut into `splits` contiguous runs of key tiles, one program each;
  every program writes its partial (out, lse) and a second small kernel merges them through the LSE.
- ragged / paged storage: sequence lengths and page ids are data on the device. The grid is sized by upper
  bounds known from shapes alone (no host sync) and a program past its sequence's end does nothing.

`decode_launch` is the per-launch choice: a pure function of the sizes known at launch and the SM count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from ..errors import CompileError
from ..ir import FP8_DTYPES, Paged, Ragged
from .plan import DecodePlan, KernelLaunch, KernelPlan, TileConfig
from .tiling import DTYPE_BITS, MIN_DOT_ROWS, LaunchTiles, next_pow2, prefill_tile, smem_capacity


@dataclass(frozen=True)
class DecodeRow:
    min_arch: int  # compute capability x 10; 0 matches the interpreter
    max_dtype_bits: int
    max_block_d: int
    tile: TileConfig
    paged_block_n: int | None = None  # BLOCK_N for a paged cache, where it differs from tile.block_n
    fp8_keys: bool = False  # matches only FP8 keys (`dequant k`), whose tiles stage in half the shared memory


# First matching row wins. Decode tiles are short in M (packed heads x a few positions) and take keys in
# BLOCK_N-wide steps with enough stages in flight to keep the memory system busy (two programs per SM fit).
DECODE_TUNED: tuple[DecodeRow, ...] = (
    # H100 sweep (benchmarks/sweep_decode.py, session 2): BLOCK_N=64 for contiguous K/V; paged K/V 128, which
    # led at every batch size swept there (B=8 2.26 TB/s against <= 2.02 at 64; B=64 2.88-2.90 against 2.39-2.52).
    DecodeRow(90, 16, 128, TileConfig(64, 64, 4, 3), paged_block_n=128),
    DecodeRow(80, 16, 128, TileConfig(64, 64, 4, 3)),
    DecodeRow(80, 16, 256, TileConfig(32, 32, 4, 2)),
    # MLA's 512-wide latent (D = DV = 512, with DR = 64 beside it): the H100 sweep of session 8 (bench_mla.py
    # --sweep, paged by 64, results/sweep-mla-*.jsonl): 64x64 at 8 warps and 2 stages won 4 of 5 points (H=64 B=768
    # 8k 1.67 TB/s, H=128 196-214 TFLOP/s), against 1.21 TB/s / 133-145 for 64x16 w8 s4, the compile-only choice
    # whose loops were free of spills (64x64 spills 31-71 instructions a loop, benchmarks/NOTES.md: they cost less
    # than the narrow tile's four times as many steps). 64 rows (64 heads packed) take two warpgroups that split
    # PV's 512 columns.
    # An FP8 latent: the same tile with one more stage, unmeasured (compile-only, benchmarks/NOTES.md): its
    # shared memory (222 KB) and bytes in flight (two e4m3 tiles) are the bf16 row's at 2 stages, which leave it
    # one FP8 tile in flight (185 KB).
    DecodeRow(90, 16, 512, TileConfig(64, 64, 8, 3), fp8_keys=True),
    DecodeRow(90, 16, 512, TileConfig(64, 64, 8, 2)),
    DecodeRow(80, 32, 128, TileConfig(32, 32, 4, 2)),
    DecodeRow(70, 32, 256, TileConfig(16, 32, 4, 1)),
    # The interpreter: narrow key tiles so that small test shapes still have several tiles to split.
    DecodeRow(0, 32, 1024, TileConfig(64, 16, 4, 1)),
)
MAX_SPLITS = 64
MIN_SPLIT_TILES = 4  # a split reads at least 4 key tiles (256 keys at BLOCK_N = 64): the merge stays small
PROGRAMS_PER_SM = 1  # split while the launch has fewer programs than SMs (H100 sweep: B=1 16 splits beat 32,
# B=8 2 beat 5, B=64 1 beat 2)
INTERPRETER_SMS = 2  # the interpreter runs one program at a time; 2 keeps single-program test launches split
COMBINE_TILE = 8192  # f32 partial-row elements an attn_combine program loads at once (64 a thread at 4 warps)


def plan_decode(plan: KernelPlan) -> KernelPlan:
    arch = plan.target.arch or 0
    bits = DTYPE_BITS[plan.dtype]
    t = plan.tiling
    widest = max(t.block_d, t.block_dv)
    fp8_keys = plan.spec.k.dtype in FP8_DTYPES
    row = next((r for r in DECODE_TUNED if arch >= r.min_arch and bits <= r.max_dtype_bits
                and widest <= r.max_block_d and (fp8_keys or not r.fp8_keys)), None)
    tile = row.tile if row else TileConfig(16, 16, 4, 1)
    if row and row.paged_block_n and isinstance(plan.spec.kv_storage, Paged):
        tile = replace(tile, block_n=row.paged_block_n)
    o = plan.options
    tile = replace(tile, block_n=o.block_n or tile.block_n, num_warps=o.num_warps or tile.num_warps,
                   num_stages=o.num_stages or (tile.num_stages if arch else 1))
    if o.num_splits is not None and o.num_splits < 1:
        raise CompileError(f"num_splits must be at least 1, got {o.num_splits}")
    while tile.num_stages > 1 and decode_smem_bytes(plan, tile) > smem_capacity(plan.target.arch):
        tile = replace(tile, num_stages=tile.num_stages - 1)
    return replace(plan, decode=DecodePlan(tile=tile, max_splits=MAX_SPLITS, min_split_tiles=MIN_SPLIT_TILES,
                                           dense_max_m=tile.block_m))


def dot_size(plan: KernelPlan, dot) -> int:
    """The head dim a dot product of the score sums over: the plan's D, or its own (bound by `dims`)."""
    dim = plan.spec.dot_dim(dot)
    return plan.head_dim if dim == "D" else plan.spec.dim_values[dim]


def tile_widths(plan: KernelPlan) -> tuple[int, int]:
    """The widths of a decode program's shared-memory tiles, (query and key side, value side): q's and k's with
    each latent dot product's tiles beside them, and v's unless the values are the keys, whose one tile serves
    QK^T and PV (MLA at D = 512, DR = 64 on sm_90: Triton's shared memory is within 1 KB of this count)."""
    t = plan.tiling
    keys = t.block_d + sum(max(16, next_pow2(dot_size(plan, d))) for d in plan.spec.dots if not d.is_qk)
    return keys, 0 if plan.spec.shares_kv else t.block_dv


def decode_smem_bytes(plan: KernelPlan, tile: TileConfig) -> int:
    """The decode program's shared memory: q's tile and, per side (keys, values), num_stages tiles that the tensor
    cores read where they land, in q's dtype; an FP8 side's tiles are converted to q's dtype through registers, so
    they stage num_stages - 1 tiles of one byte an element (none held for the tile in use) beside one converted
    tile (the keys' side follows k's dtype; kr's tile goes with it). MLA at D = 512, DR = 64, 64x64 on sm_90
    (Triton 3.6): bf16 at 2 stages 222 KB, FP8 at 3 stages 222 KB and at 2 185 KB, each within 2 KB of this count
    (the page ids' buffers)."""
    keys, values = tile_widths(plan)
    q_bytes = DTYPE_BITS[plan.dtype] // 8
    total = tile.block_m * keys * q_bytes
    for width, decl in ((keys, plan.spec.k), (values, plan.spec.v)):
        staged = tile.num_stages - 1 + q_bytes if decl.dtype in FP8_DTYPES else tile.num_stages * q_bytes
        total += tile.block_n * width * staged
    return total


@dataclass(frozen=True)
class DecodeLaunch:
    tiles: LaunchTiles  # rows per program (config.block_m = pack * block_mq), keys per step, warps, stages
    splits: int  # programs per row tile's key range; 1: the kernel writes out and lse itself
    q_programs: int  # grid axis 0: row tiles (an upper bound for a ragged q)
    head_programs: int  # grid axis 1: (B x) H // pack
    search_steps: int  # a ragged q: binary-search steps to find a program's sequence
    decode: KernelLaunch  # attn_decode's launch
    combine: KernelLaunch | None  # attn_combine's, which merges the splits (None: one split)
    # a persistent launch's programs (latent_decode.balanced_shares; grid axis 0, one head program): 0 for none
    programs: int = 0

    @property
    def combine_rows(self) -> int:
        """attn_combine's BLOCK_R: workspace rows per program."""
        return self.combine.keywords["BLOCK_R"]


def decode_launch(plan: KernelPlan, sizes: Mapping[str, int], sm_count: int) -> DecodeLaunch | None:
    """The decode kernel's launch for these sizes (B, H, HKV, the capacities M and N, and T, TK for ragged
    storage); None for a dense spec whose launch the prefill kernel serves: M past the decode tile, or no split
    with M > 1 or a data-dependent mask. A dense M = 1 launch without splits stays here (H100, B=64: 3.02
    TB/s against 2.73 for the prefill kernel).

    Rows: a sequence is expected to have m = M query rows (ceil(T / B) for a ragged q). When m fits the decode
    tile, the group's heads are packed: positions = next_pow2(m), pack = the largest power of two dividing
    H // HKV with pack * positions <= the tile's rows; else the prefill tile without packing. A ragged q gets
    (T + B * (BLOCK_MQ - 1)) // BLOCK_MQ row-tile programs: sequence b's tiles start at
    (cu[b] + b * (BLOCK_MQ - 1)) // BLOCK_MQ, which leaves room for each sequence's last partial tile.

    Splits: with n the expected keys per sequence (N; TK / B for ragged k/v; the paged capacity MAXP * PAGE,
    since the lengths are data) and key_tiles = ceil(n / BLOCK_N),
        splits = clamp(floor(PROGRAMS_PER_SM * SMs / programs), 1, min(max_splits, key_tiles // min_split_tiles))
    then evened out to ceil(key_tiles / ceil(key_tiles / splits)), where programs = row tiles x head programs
    (x B): split only until the GPU has about one program per SM, and never into runs too short to pay for
    the merge. PlanOptions(num_splits=...) fixes the count (at most one split per key tile).

    Stages: the plan's num_stages - 1 is the number of K/V tiles in flight; `pipeline_stages` turns it into
    Triton's num_stages (more for a paged cache). The merge (attn_combine) takes all splits of its rows in one
    load where they fit in COMBINE_TILE elements (`combine_kernel`)."""
    d = plan.decode
    b, heads, group = sizes["B"], sizes["H"], sizes["H"] // sizes["HKV"]
    ragged_q = plan.spec.q_storage is not None
    m = -(-sizes["T"] // b) if ragged_q else sizes["M"]
    prefill_serves = not plan.spec.decode_only  # a dense spec's launch may go to the prefill kernel
    if prefill_serves and m > d.dense_max_m:
        return None
    tiles = decode_tiles(plan, m, group)
    block_mq = tiles.block_mq
    if ragged_q:
        q_programs = (sizes["T"] + b * (block_mq - 1)) // block_mq
        head_programs = heads // tiles.pack
        programs = b * -(-m // block_mq) * head_programs
    else:
        q_programs = -(-sizes["M"] // block_mq)
        head_programs = b * (heads // tiles.pack)
        programs = q_programs * head_programs
    n = -(-sizes["TK"] // b) if isinstance(plan.spec.kv_storage, Ragged) else sizes["N"]
    splits = split_count(plan, programs, -(-n // tiles.config.block_n), sm_count)
    if splits == 1 and prefill_serves and (m > 1 or plan.masks.data_dependent):
        return None  # the prefill kernel: measured only at M = 1 to lose to this one; its tile summary skips tiles
    return DecodeLaunch(tiles, splits, q_programs, head_programs, max(0, b - 1).bit_length(),
                        decode_kernel(plan, tiles, splits > 1),
                        combine_kernel(plan, splits) if splits > 1 else None)


def split_count(plan: KernelPlan, programs: int, key_tiles: int, sm_count: int) -> int:
    """Splits of each row tile's key_tiles for a launch of `programs` row tiles (decode_launch's rule)."""
    d = plan.decode
    if plan.options.num_splits is not None:
        return max(1, min(plan.options.num_splits, key_tiles))
    wanted = PROGRAMS_PER_SM * sm_count // max(programs, 1)
    splits = max(1, min(wanted, d.max_splits, key_tiles // d.min_split_tiles))
    return -(-key_tiles // -(-key_tiles // splits)) if key_tiles else 1


def decode_tiles(plan: KernelPlan, m: int, group: int) -> LaunchTiles:
    """The decode kernel's tile for m query rows per sequence and H // HKV = group: the group's heads packed
    into the rows while m fits the decode tile, else the prefill tile without packing; Triton's num_stages
    from `pipeline_stages`."""
    d = plan.decode
    positions = next_pow2(max(m, 1))
    if positions <= d.tile.block_m:
        pack = 1
        if plan.heads.pack:
            while group % (pack * 2) == 0 and pack * 2 * positions <= d.tile.block_m:
                pack *= 2
        block_m = max(MIN_DOT_ROWS, pack * positions)
        tiles = LaunchTiles(replace(d.tile, block_m=block_m), pack, block_m // pack)
    else:
        c = prefill_tile(plan.tiling, m)
        tiles = LaunchTiles(c, 1, c.block_m)
    paged = isinstance(plan.spec.kv_storage, Paged)
    return replace(tiles, config=replace(tiles.config, num_stages=pipeline_stages(tiles.config.num_stages, paged)))


def decode_kernel(plan: KernelPlan, tiles: LaunchTiles, split: bool) -> KernelLaunch:
    c = tiles.config
    return KernelLaunch("attn_decode", (("BLOCK_M", c.block_m), ("BLOCK_N", c.block_n), ("BLOCK_MQ", tiles.block_mq),
                                        ("PACK", tiles.pack), ("SPLIT", split), ("UPCAST", upcast(plan)),
                                        ("num_warps", c.num_warps), ("num_stages", c.num_stages)))


def combine_kernel(plan: KernelPlan, splits: int) -> KernelLaunch:
    """attn_combine for `splits` partial results: every split at once while a row of them fits in COMBINE_TILE
    (always at MAX_SPLITS and BLOCK_DV <= 128), and as many rows per program as fit (rows past the end are
    masked, so the choice needs no row count and the set of combine kernels stays small)."""
    block_dv = plan.tiling.block_dv
    block_s = min(next_pow2(splits), max(1, COMBINE_TILE // block_dv))
    block_r = max(1, COMBINE_TILE // (block_s * block_dv))
    return KernelLaunch("attn_combine", (("BLOCK_R", block_r), ("BLOCK_S", block_s), ("num_warps", 4)))


def upcast(plan: KernelPlan) -> bool:
    """The interpreter's bf16 is wrong: its kernels load bf16 and compute in f32."""
    return plan.target.arch is None and plan.dtype == "bf16"


def workspace_rows(spec, sizes: Mapping[str, int]) -> int:
    """Rows of the split workspace: the packed tokens of a ragged q, else (b, i) pairs."""
    return sizes["M"] * (1 if spec.q_storage is not None else sizes["B"])


def pipeline_stages(stages: int, paged: bool) -> int:
    """Triton's num_stages that keeps stages - 1 K/V tiles in flight. Triton's pipeliner shares num_stages - 1
    among the loads of a chain that ends in a dot (AssignLatencies: (num_stages - 1) // chain length each); a
    paged K/V load waits on its page-id load, a chain of two, so it needs 2 * (stages - 1) + 1 (sm_90 TTGIR:
    paged at num_stages 3 double-buffers nothing, 39 KB of shared memory; at 5 it matches dense at 3, 72 KB)."""
    return 2 * (stages - 1) + 1 if paged and stages > 1 else stages
