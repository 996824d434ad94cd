"""Tiling, GQA head sharing and pipeline staging: the passes that pick shapes, plus the per-launch choice."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .plan import HeadSharing, KernelPlan, TileConfig, Tiling, TritonOptions


@dataclass(frozen=True)
class Row:
    """What a row of a tuned table matches: the first row whose bounds hold wins (`first_row`)."""

    min_arch: int  # compute capability x 10; 0 matches the interpreter / no GPU
    max_dtype_bits: int
    max_block_d: int  # the wider of D and DV, padded to a power of two (also where the prefill takes D in chunks)


@dataclass(frozen=True)
class TunedRow(Row):
    prefill: TileConfig
    decode: TileConfig  # decode.block_m is the most rows (positions x packed heads) a decode program takes
    short: TileConfig | None = None  # the prefill tile for short sequences: M up to short_max_m
    short_max_m: int = 0
    masked: bool | None = None  # True: rows whose key range is bounded (causal, window); None: any
    banded: bool | None = None  # True: rows with a lower key bound too (sliding window, chunks); None: any
    tma: bool = False  # Hopper: K/V through tensor descriptors
    # Hopper: asks Triton to warp-specialize the full-tile loop (with tma), which keeps full and partial tiles in
    # loops of their own. Triton 3.6 leaves this kernel's loop unspecialized (benchmarks/NOTES.md, session 3), so
    # there the flag selects that two-loop form, which measured fastest for D=64.
    warp_specialize: bool = False


# First matching row wins: newest arch first, then the narrowest dtype and head dim. The performance work
# retunes these numbers; nothing else in the compiler hard-codes a tile size.
TUNED: tuple[TunedRow, ...] = (
    # H100 sweep of 2026-11-21 (benchmarks/NOTES.md): the winners for dense, causal, GQA, softcap and ALiBi;
    # causal and the 1024 window were within 4% of them with BN=64 and no TMA.
    TunedRow(90, 16, 64, TileConfig(128, 128, 4, 3), TileConfig(64, 64, 4, 3), tma=True, warp_specialize=True),
    # Banded rows (window 1024, S=8192; sweep of session 2): 64x64 tiles 356 TFLOP/s against 292 for 128x64 and
    # 313 for 128x128: a band has partial tiles at both ends, and their waste, (W + BM + BN) / W, shrinks.
    TunedRow(90, 16, 128, TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3), banded=True, tma=True),
    # M regimes (H100 sweeps and autotune runs, benchmarks/NOTES.md): short causal rows ran 64x64 tiles at 297
    # TFLOP/s (S=1k) and 410 (S=4k) against 241 and 403 for 128x128; dense S=1k 387 against 368.
    TunedRow(90, 16, 128, TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3), masked=True, tma=True,
             short=TileConfig(64, 64, 4, 3), short_max_m=4096),
    TunedRow(90, 16, 128, TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3), tma=True,
             short=TileConfig(64, 64, 4, 3), short_max_m=1024),
    TunedRow(90, 16, 256, TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 2), tma=True),
    TunedRow(90, 32, 128, TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2)),
    TunedRow(90, 32, 256, TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)),
    TunedRow(80, 16, 64, TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    TunedRow(80, 16, 128, TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2)),
    TunedRow(80, 16, 256, TileConfig(64, 32, 4, 1), TileConfig(32, 32, 4, 1)),
    TunedRow(80, 32, 256, TileConfig(32, 32, 4, 1), TileConfig(16, 32, 4, 1)),
    TunedRow(70, 32, 256, TileConfig(32, 32, 4, 1), TileConfig(16, 32, 4, 1)),
    # The Triton interpreter: few, wide tiles keep it fast; 32 still gives several tiles on test shapes.
    TunedRow(0, 32, 1024, TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)),
)


@dataclass(frozen=True)
class BackwardRow(Row):
    dkdv: TileConfig  # block_m: query rows per step; block_n: the keys a program holds
    dq: TileConfig  # block_m: the query rows a program holds; block_n: keys per step
    # dQ by the dQ kernel also where atomics are allowed: it measured faster than the dK/dV kernel's atomic adds
    dq_kernel: bool = False


# The backward's tiles (plan.BackwardPlan), first matching row wins. The sm_90 rows are the H100 sweeps of sessions
# 8 and 9 (benchmarks/sweep_backward.py, backward kernels alone, bf16, TFLOP/s of 2.5x the forward's FLOPs; results/
# sweep-backward-*.jsonl). With the dK/dV query loops free of branches (session 9), D=128 S=4k dense / causal: dQ by
# the dQ kernel (64x32 w4 s3) 321 / 276 against atomics 268 / 229 with the same dK/dV tile (64x128 w8 s2; 32x128 w8
# s3 285 / 236 atomic); D=64 S=8k causal 299 against 239 (dK/dV 32x128 w4 s3). Session 8's loops with a branch:
# 249 / 211 / 252 / 187. Session 10, one program per query head and dV's dot before dP's (results/
# sweep-bwd-s10-*.jsonl, same run against session 9's modules): dQ kernel dense / causal / GQA 32/8 347 / 316 / 342
# (was 317 / 271 / 299), D=64 causal 323 (301); D=256 spills more, its atomics fell to 106 (172), so it takes
# the dQ kernel at 128x64: 164. q, dO and dQ (dK/dV
# kernel) go through tensor descriptors where the layouts allow. The dK/dV kernel holds a key tile with its dK and
# dV accumulators in registers and steps through query rows; the dQ kernel is its transpose. Other rows:
# FlashAttention-2's shapes, not timed.
BACKWARD_TUNED: tuple[BackwardRow, ...] = (
    BackwardRow(90, 16, 64, TileConfig(32, 128, 4, 3), TileConfig(64, 64, 4, 3), dq_kernel=True),
    BackwardRow(90, 16, 128, TileConfig(64, 128, 8, 2), TileConfig(64, 32, 4, 3), dq_kernel=True),
    BackwardRow(90, 16, 256, TileConfig(64, 64, 8, 1), TileConfig(128, 64, 8, 1), dq_kernel=True),
    BackwardRow(80, 16, 128, TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    BackwardRow(80, 16, 256, TileConfig(32, 64, 4, 1), TileConfig(64, 32, 4, 1)),
    BackwardRow(80, 32, 128, TileConfig(32, 64, 4, 1), TileConfig(64, 32, 4, 1)),
    BackwardRow(70, 32, 256, TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 1)),
    # The interpreter: small tiles, so that test shapes have several tiles, and partial ones, both ways.
    BackwardRow(0, 32, 1024, TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 1)),
)
# The backward's row kernel (delta, sink gradients): memory-bound, narrow enough that its O and dO rows of up to
# 256 floats stay in registers.
PREP_TILE = TileConfig(32, 16, 4, 1)
DECODE_MAX_M = 16
NARROW_TILE_CLASS_KEYS = 32  # narrow_tile_class_loop's key tile on sm_90
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows
MIN_DOT_K = 16  # and a reduction of at least 16
MAX_D_CHUNKS = 2  # head_dim_chunks
DTYPE_BITS = {"f16": 16, "bf16": 16, "f32": 32}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def first_row(table, plan: KernelPlan, fits=lambda row: True):
    """The first row of a tuned table that matches the plan's arch, dtype and head dims (and `fits`); None where
    nothing is tuned this wide."""
    arch, bits = plan.target.arch or 0, DTYPE_BITS[plan.dtype]
    return next((r for r in table if arch >= r.min_arch and bits <= r.max_dtype_bits
                 and widest_block(plan) <= r.max_block_d and fits(r)), None)


def widest_block(plan: KernelPlan) -> int:
    return max(16, next_pow2(plan.head_dim), next_pow2(plan.value_dim))


def tuned_row(plan: KernelPlan) -> TunedRow:
    """The first TUNED row for the plan's arch, dtype, head dims and mask class."""
    m = plan.masks
    masked = m is not None and bool(m.hull.lower or m.hull.upper or m.evaluated)
    banded = m is not None and bool(m.hull.lower)
    row = first_row(TUNED, plan, lambda r: r.masked in (None, masked) and r.banded in (None, banded))
    # nothing tuned this wide: the smallest tiles, which fit everywhere
    return row or TunedRow(0, DTYPE_BITS[plan.dtype], widest_block(plan), TileConfig(32, 16, 4, 1),
                           TileConfig(16, 16, 4, 1))


def backward_tiles(plan: KernelPlan) -> tuple[TileConfig, TileConfig, bool]:
    """(dK/dV tile, dQ tile, dq_kernel) from BACKWARD_TUNED for the plan's arch, dtype and head dims."""
    row = first_row(BACKWARD_TUNED, plan)
    # nothing tuned this wide: the smallest tiles, which fit everywhere
    return (row.dkdv, row.dq, row.dq_kernel) if row else (TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1), False)


def head_dim_chunks(head_dim: int) -> tuple[int, ...]:
    """D as the powers of two the Triton prefill's QK^T takes one dot each over, widest first: a D that is the
    sum of two powers of two of at least MIN_DOT_K (192 = 128 + 64, 96 = 64 + 32, 80 = 64 + 16) in those two
    chunks, so no padded column is loaded or multiplied (MLA's D = 192 padded to 256 multiplies 1.33x the useful
    QK^T FLOPs); any other D as one chunk, padded to a power of two. Three chunks (112 = 64 + 32 + 16) are not
    timed yet."""
    parts = tuple(1 << b for b in reversed(range(head_dim.bit_length())) if head_dim >> b & 1)
    if len(parts) == MAX_D_CHUNKS and parts[-1] >= MIN_DOT_K:
        return parts
    return (max(MIN_DOT_K, next_pow2(head_dim)),)


def choose_tiles(plan: KernelPlan) -> KernelPlan:
    block_d, block_dv = max(16, next_pow2(plan.head_dim)), max(16, next_pow2(plan.value_dim))
    d_chunks = (block_d,) if plan.options.chunk_head_dim is False else head_dim_chunks(plan.head_dim)
    row = tuned_row(plan)
    o = plan.options
    prefill = TileConfig(o.block_m or row.prefill.block_m, o.block_n or row.prefill.block_n,
                         o.num_warps or row.prefill.num_warps, row.prefill.num_stages)
    decode = replace(row.decode, block_n=o.block_n or row.decode.block_n)
    # A tile the user set applies to every M: no short-sequence regime then.
    user_tile = o.block_m or o.block_n or o.num_warps
    short = None if user_tile else row.short
    return replace(plan, tiling=Tiling(block_d, block_dv, prefill, decode, DECODE_MAX_M, d_chunks, short,
                                       row.short_max_m if short else 0))


def share_kv_heads(plan: KernelPlan) -> KernelPlan:
    pack = plan.spec.is_gqa_shape if plan.options.pack_heads is None else plan.options.pack_heads
    return replace(plan, heads=HeadSharing(pack=pack, max_rows=plan.tiling.decode.block_m))


def stage_pipeline(plan: KernelPlan) -> KernelPlan:
    t, o, arch = plan.tiling, plan.options, plan.target.arch
    bytes_per = DTYPE_BITS[plan.dtype] // 8

    def fit(c: TileConfig, block_d: int) -> TileConfig:
        stages = o.num_stages or (c.num_stages if arch else 1)
        cap = smem_capacity(arch)
        while stages > 1 and smem_bytes(c.block_m, c.block_n, block_d, t.block_dv, stages, bytes_per) > cap:
            stages -= 1
        return replace(c, num_stages=stages)

    narrow = (arch or 0) >= 90 and narrow_tile_class_loop(plan)
    descriptors = (arch or 0) >= 90 and not narrow
    row = tuned_row(plan)
    tma = descriptors and (row.tma if o.tma is None else o.tma)
    ws = descriptors and (row.warp_specialize if o.warp_specialize is None else o.warp_specialize)

    def keys(c: TileConfig) -> TileConfig:  # narrow_tile_class_loop says why
        return replace(c, block_n=min(c.block_n, NARROW_TILE_CLASS_KEYS)) if narrow and not o.block_n else c

    # the prefill tiles hold D's chunks (t.prefill_d columns of q and k), the decode tile D padded
    tiling = replace(t, prefill=fit(keys(t.prefill), t.prefill_d), decode=fit(t.decode, t.block_d),
                     short=t.short and fit(keys(t.short), t.prefill_d))
    # the approximations' 2^-11 next to half-precision P's own rounding (2^-9 bf16, 2^-11 f16); f32 keeps the formulas
    approx = arch is not None and plan.dtype in ("bf16", "f16") and o.approx_functions is not False
    # Warp specialization implies descriptors: Triton 3.6's pass fails on the pointer-load loop.
    return replace(plan, tiling=tiling, triton=TritonOptions(dot_precision="ieee", tma=tma or ws, warp_specialize=ws,
                                                             approx_functions=approx))


def narrow_tile_class_loop(plan: KernelPlan) -> bool:
    """A data-dependent mask (the tile-class loop) with K or V rows under 128 bytes. On the H100 with Triton 3.6
    the descriptor loads of that loop read shared memory out of bounds in the PV dot (DV=32 bf16, property seed
    1004: compute-sanitizer, session 8; wrong numbers, then an illegal address), so such plans load by pointers.
    Pointer loads alone still gave the wrong numbers at the 128x128 tile (session 9); key tiles of 32 (or query
    tiles of 32) gave the right ones, so such plans also take at most NARROW_TILE_CLASS_KEYS keys a tile. A chunk
    of D (Tiling.d_chunks) is a K row of its own descriptor."""
    t, m = plan.tiling, plan.masks
    return m is not None and m.data_dependent and min(*t.d_chunks, t.block_dv) * DTYPE_BITS[plan.dtype] // 8 < 128


def smem_capacity(arch: int | None) -> int:
    """Shared memory per block in bytes (the interpreter has no limit)."""
    if arch is None:
        return 1 << 30
    if arch >= 90:
        return 232448
    if arch in (86, 87, 89):
        return 101376
    return 166912 if arch >= 80 else 98304


def smem_bytes(block_m: int, block_n: int, block_d: int, block_dv: int, stages: int, bytes_per: int) -> int:
    """Q tile plus `stages` buffered K and V tiles."""
    return (block_m * block_d + stages * block_n * (block_d + block_dv)) * bytes_per


@dataclass(frozen=True)
class LaunchTiles:
    config: TileConfig
    pack: int  # query heads per program (1: no packing)
    block_mq: int  # query positions per program: config.block_m == pack * block_mq


def prefill_tile(t: Tiling, m: int) -> TileConfig:
    """The prefill tile for M queries: the short-sequence one up to short_max_m, else the long one."""
    return t.short if t.short is not None and m <= t.short_max_m else t.prefill


def launch_tiles(plan: KernelPlan, m: int, group: int) -> LaunchTiles:
    """The tile for one launch, from M and the GQA group size H // HKV (both runtime values; memoize by them)."""
    t = plan.tiling
    if m > t.decode_max_m:
        c = prefill_tile(t, m)
        return LaunchTiles(c, 1, c.block_m)
    positions = next_pow2(max(m, 1))
    pack = 1
    if plan.heads.pack:
        while group % (pack * 2) == 0 and pack * 2 * positions <= plan.heads.max_rows:
            pack *= 2
    block_m = max(MIN_DOT_ROWS, pack * positions)
    return LaunchTiles(replace(t.decode, block_m=block_m), pack, block_m // pack)
