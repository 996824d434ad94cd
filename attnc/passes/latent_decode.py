"""Hopper staging of latent-attention (MLA) decode: whether it runs the Gluon warpgroup kernel
(backends/triton/gluon_decode.py.j2), its layout, and the launch of a call. A pure function of the plan.

Why a kernel of its own: the Triton decode kernel at 64 rows and 8 warps lays QK^T out so that both warpgroups
compute the same 64 x BLOCK_N scores (1.53x the useful MMA work), fits 16 keys a step without spills, overlaps
nothing and stages nothing ahead of the tensor cores (benchmarks/NOTES.md, "MLA decode on sm_90"). The layout is
FlashMLA's (sm_90): per program the query heads of one position (64 rows, one wgmma M), one producer warp that
TMA-loads each key tile's latent [BN, 512] in column chunks and its rope part [BN, 64] into a ring, and two
consumer warpgroups:
    score warpgroup   S = q_nope ckv^T + q_pe kr^T once per tile (five chained wgmmas, K = 4 x 128 + 64), the
                      masks and the online softmax, then P (bf16) and the row rescale alpha into shared memory, and
                      its half of P V (DV columns 0-255)
    value warpgroup   waits for P, rescales its accumulator by alpha and multiplies P by columns 256-511
Per (row, key) the tensor cores do 576 multiply-adds for QK^T and 512 for P V, each once: 1088, where the Triton
kernel does 1664. The other split considered, QK^T's depth halved across the warpgroups with the partial scores
summed through shared memory, balances the two warpgroups' issue but exchanges a [64, BN] f32 tile a step (4x P's
bytes) and, beside Q and two 64-key latent slots (221 KB), does not fit at BN = 64; the tensor cores are one
resource per SM either way, and the value warpgroup's P V of tile j overlaps the score warpgroup's QK^T of tile j+1.

Shared memory (bf16): Q 64 x 576 (72 KB), the ring stages x BN x 576, P 64 x BN, the row scales: BN = 64 fits two
stages (230656 B of 232448, FlashMLA's), BN = 32 fits four. Registers: each warpgroup holds a 64 x 256 f32
accumulator (128 a thread), the score warpgroup the [64, BN] scores beside it.

An FP8 latent (the latent and its rope part both f8e4m3, `dequant` scales folded into the scores and the output
rows by passes/dequant.py) adds a fourth partition: the producer lands e4m3 tiles in a ring of their own and a
converter warpgroup writes each as q's dtype into the ring the two warpgroups read, so the conversion is off their
critical path (the Triton kernel converts through registers between its MMAs). It needs 32-key tiles: two
converted slots and four e4m3 ones fit beside Q (226560 B).

Quantised queries over an FP8 latent (`quantize q, qr to f8e4m3`, FlashMLA's FP8 form): the score warpgroup
quantises Q and the rope query to e4m3 once per program, in place in Q's shared memory, and issues QK^T and the rope
dot as fp8 x fp8 wgmma straight on the e4m3 slots the producer landed, the scores times each row's scale; the
converter converts only the latent's 512 columns, which P V reads, and the score warpgroup releases an e4m3 slot
beside it (218368 B at four e4m3 slots, 226560 B without).

The converter's throughput (benchmarks/NOTES.md, "Issue 14: the FP8 converter's throughput"; PlanOptions):
    fp8_conflict_free_converter  8 e4m3 a thread (at 16, its stores into the 128-byte swizzled slot conflict 2-way):
                                 the default since the H100 measured it 4-11% faster in bytes/s, contiguous and
                                 paged, with and without quantised queries (session 13); False: 16 a thread.
                                 The two options below use it too (each within ±3% of it on the H100: opt-in)
    fp8_converter_warpgroups=2   two converter warpgroups, each converting half of every slot's latent chunks; for
                                 registers the launch's maxnreg falls to 96: budgets
                                 of 40 a converter and 160 for the value warpgroup leave the score warpgroup 216
                                 (the rope part, where QK^T reads converted slots, by the second)
    fp8_f16_values=True          with quantised queries and q in bf16: P V in f16, the converted slots and P, so the
                                 conversion is one instruction a pair of e4m3 (bf16 takes four: via f16 and f32).
                                 Exact or finer than bf16: every e4m3 value (|x| <= 448, 3 mantissa bits, the least
                                 2^-9) is an f16 value, the dequant scale is applied to the f32 output rows; P lies
                                 in [0, 1] (exp of the score less the running max) and f16 rounds it within 2^-11 p
                                 (bf16: 2^-9 p) or, below f16's normals, within 2^-25: P V's error is at most
                                 (2^-11 + N 2^-25) of the row sum l >= 1 over N keys, bf16's 2^-9, so finer up to
                                 N = 49152 keys. QK^T (fp8 x fp8 on the e4m3 slots) and out (q's dtype) do not change.

The kernel covers one query position per program (q_programs = M: a longer M reads the latent once per position),
q and the rope query in one of f16/bf16, the latent and its rope part in q's dtype or both f8e4m3, the latent 512
wide, a rope part up to 64, softmax without a sink, contiguous storage or pages holding whole key tiles (PAGE bound
by `dims`, a multiple of BN). Everything else keeps the Triton decode kernel. Where it qualifies it is the default
(PlanOptions(gluon=False) keeps the Triton kernel): on the H100 (session 10, benchmarks/NOTES.md) it ran 1.35-1.92x
the Triton kernel's bytes/s at 64 heads and 2.06-2.44x at 128, bf16, contiguous and paged, and 2.3-3.1x over an FP8
latent, its GPU tests right against the float64 reference.

Schedule: one program per (position, head group, split) by latent_splits, or with PlanOptions(mla_persistent=True)
FlashMLA's persistent one (its get_mla_metadata): a program per SM, each taking an equal share (within one tile) of
the key tiles of all (sequence, position, head group) items laid end to end (balanced_shares), so the shares cross
sequence boundaries. The producer streams the tiles of a share's segments through one ring without draining it
(Q reloads at a segment boundary, once both warpgroups stored the last segment's out through Q's buffer); a segment
holding its item's every tile writes out and lse itself, the pieces of an item cut by a share boundary write f32
partials to workspace rows `program + item` (consecutive for an item's pieces) that attn_combine's scheduled form
merges, for the cut items only. The metadata is the items' cumulative tile counts (torch ops on the device, no host
sync: CUDA-graph capturable); every partition walks its share from them. It covers one query position (M = 1: the
split rule serves longer M) over a latent in q's dtype (the FP8 converter keeps the split rule) under masks
without lower bounds (tiles past a row's range are masked, never skipped).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ..errors import CompileError
from ..ir import Paged, Ragged
from .decode import DecodeLaunch, combine_kernel, dot_size, split_count
from .plan import KernelLaunch, KernelPlan, LatentDecodeLayout, TileConfig, WarpgroupPlan
from .tiling import DTYPE_BITS, LaunchTiles, next_pow2, smem_capacity
from .warpgroups import BARRIER_BYTES, GLUON_DTYPES, max_registers, unavailable_arch

LATENT_DIM = 512  # D = DV: the latent's width (DeepSeek-V2/V3's kv_lora_rank)
LATENT_CHUNK = 128  # one TMA box, one QK^T wgmma's K and one P V accumulator's N
MAX_ROPE = 64
ROWS = 64  # query heads per program: one wgmma M, each warpgroup's accumulator rows
KEY_TILES = (32, 64)  # PlanOptions.warpgroup_block_n for this kernel
DEFAULT_BLOCK_N = 64  # FlashMLA's: one page of 64 slots a tile, two stages
MAX_STAGES = 4
# The split-KV time model (`latent_splits`), fit to the H100 sweep of forced split counts against this kernel
# (benchmarks/results/mla-splits-*-s11.json; bf16, pages of 64): a program streams its latent at ~39 GB/s after
# ~12 us of Q load and pipeline fill; all programs together at ~2.7 TB/s; a split launch writes a float32 [rows, DV]
# partial per split, which attn_combine reads back, plus ~10 us for the merge's launch and its tail.
PROGRAM_START_US = 12.0
PROGRAM_BYTES_PER_US = 39e3
HBM_BYTES_PER_US = 2.7e6
MERGE_US = 10.0
FP8_MMA_K = 32  # an fp8 x fp8 wgmma's K: the rope dot's width at least, where QK^T runs in e4m3
CONVERTER_WARPGROUPS = (1, 2)  # PlanOptions.fp8_converter_warpgroups
# PlanOptions.fp8_float32_sum_every: 0 (the default: the tensor cores' own sums, FlashMLA's; on the H100 21-32% more
# tokens/s than 32 and within bf16's tolerance, benchmarks/NOTES.md session 16), or a run of an fp8 wgmma's K (32)
# up to a chunk's (LATENT_CHUNK)
FLOAT32_SUM_RUNS = (0, 32, 64, 128)
# setmaxnreg budgets beside the converter(s): the value warpgroup's 128-register accumulator and a row vector, each
# converter's loads and conversions; the score warpgroup keeps what the file leaves (score_registers), at least
# SCORE_REGS: its accumulator, the [64, BN] scores and the softmax state (ptxas, two converters: 376-464 B of spills
# at 168, none at 216; a converter's 2 chunks a tile fit in 40 in bf16 and in f16)
CONVERTER_REGS = {1: (160, 96), 2: (160, 40)}  # converter warpgroups -> (value warpgroup, each converter)
SCORE_REGS = 216


def unavailable(plan: KernelPlan) -> str:
    """Why the plan cannot run the Gluon MLA decode kernel ("" where it can)."""
    spec = plan.spec
    why = unavailable_arch(plan.target.arch, "the Gluon decode kernel")
    if why:
        return why
    rope = [d for d in spec.dots if not d.is_qk]
    if not spec.shares_kv or len(rope) != 1:
        return "not latent attention whose values are the keys, with one dot product beside q @ k"
    if spec.q_storage is not None or isinstance(spec.kv_storage, Ragged):
        return "ragged storage runs the Triton decode kernel"
    dot = rope[0]
    queries = {spec.q.dtype, spec.input(dot.query).dtype}
    keys = {spec.k.dtype, spec.input(dot.key).dtype}
    if len(queries) > 1 or plan.dtype not in GLUON_DTYPES:
        return f"q and the rope query are {'/'.join(sorted(queries))}: the kernel takes one of " \
               f"{', '.join(GLUON_DTYPES)}"
    if keys != {plan.dtype} and keys != {"f8e4m3"}:
        return f"the latent and its rope part are {'/'.join(sorted(keys))}: the kernel takes both in q's dtype, or " \
               f"both f8e4m3 (converted in shared memory)"
    quantized = {d.tensor for d in spec.quantize}
    if quantized and (quantized != {"q", dot.query} or keys != {"f8e4m3"}):
        return f"quantised queries ({', '.join(sorted(quantized))}): the kernel quantises q and the rope query " \
               f"both, over an f8e4m3 latent and rope part (fp8 x fp8 QK^T)"
    if plan.head_dim != LATENT_DIM or plan.value_dim != LATENT_DIM:
        return f"D={plan.head_dim} DV={plan.value_dim}: the kernel's latent is {LATENT_DIM} wide"
    size = dot_size(plan, dot)
    if size > MAX_ROPE or size % 8:
        return f"a rope part of {size} columns: the kernel takes up to {MAX_ROPE}, a multiple of 8 (TMA rows)"
    if quantized and next_pow2(size) < FP8_MMA_K:
        return f"a rope part of {size} columns with quantised queries: an fp8 x fp8 wgmma sums {FP8_MMA_K} at a time"
    n = spec.normalizer
    if not (n.normalized and n.weight == "exp") or n.sink is not None:
        # the value warpgroup applies the score warpgroup's running-max rescale (alpha) to its half of the rows
        return f"{n.name}{' with a sink' if n.sink is not None else ''}: the kernel takes normalised exp weights " \
               f"without a sink"
    if isinstance(spec.kv_storage, Paged):
        page = spec.dim_values.get("PAGE")
        block_n = plan.options.warpgroup_block_n or default_block_n(plan)
        if not page or page % block_n:
            return f"pages of {page or 'PAGE (unbound)'} slots: the kernel reads one page id a key tile, so PAGE " \
                   f"must be bound by `dims` to a multiple of {block_n}"
    return ""


def unavailable_persistent(plan: KernelPlan) -> str:
    """Why the Gluon kernel cannot take the persistent schedule ("" where it can)."""
    if plan.spec.dequant:
        return "an FP8 latent: its converter warpgroup steps through one split's tiles"
    if plan.masks.evaluated or plan.masks.exact.lower:
        return "a mask with lower bounds or evaluated on every tile: a share counts every tile from key 0"
    return ""


def persistent_latent(plan: KernelPlan) -> bool:
    """Whether the plan runs the Gluon MLA decode kernel on the persistent schedule."""
    staged = plan.decode.warpgroups if plan.decode else None
    return bool(staged and staged.path == "gluon" and staged.layout and staged.layout.persistent)


@dataclass(frozen=True)
class Segment:
    """A program's run of one item's key tiles [first, end): item = (b * M + m) * head_groups + hp. `whole`: every
    tile of the item, so the program writes out and lse; else a cut piece, written as a partial to workspace row
    `slot` (program + item: an item's pieces take consecutive rows, and no two segments share one)."""

    item: int
    first: int
    end: int
    slot: int
    whole: bool


def item_tiles(lengths: Sequence[int], capacity: int, block_n: int, items_per_sequence: int) -> list[int]:
    """Key tiles of each item: its sequence's length clamped to [0, capacity] (lengths are untrusted) in tiles of
    block_n; a bad length that clamps to nothing keeps one tile, so a program reaches it and flags it."""
    tiles = []
    for n in lengths:
        kept = min(max(n, 0), capacity)
        tiles += [max(-(-kept // block_n), int(kept != n))] * items_per_sequence
    return tiles


def share_start(total: int, programs: int, p: int) -> int:
    """The first tile of program p's share of `total` tiles: shares differ by at most one tile, and with fewer tiles
    than programs the first `total` programs take one each (no empty share between two pieces of an item)."""
    used = max(min(programs, total), 1)
    return min(p * total // used, total)


def tile_owner(tile: int, total: int, programs: int) -> int:
    """The program whose share holds `tile` (the largest p with share_start(p) <= tile)."""
    return ((tile + 1) * min(programs, total) - 1) // total


def share_pieces(item_tiles: int, items: int, programs: int) -> tuple[int, int]:
    """The most key tiles a program's share holds, and the cut segments (partials) of all shares, for `items` items
    of `item_tiles` key tiles each cut into `programs` shares."""
    total, most, cuts = item_tiles * items, 0, 0
    for p in range(programs):
        a, b = share_start(total, programs, p), share_start(total, programs, p + 1)
        if a == b:
            continue
        most = max(most, b - a)
        if a // item_tiles == (b - 1) // item_tiles:
            cuts += int(a % item_tiles != 0 or b % item_tiles != 0)
        else:
            cuts += int(a % item_tiles != 0) + int(b % item_tiles != 0)
    return most, cuts


def persistent_programs(plan: KernelPlan, item_tiles: int, items: int, sm_count: int) -> int:
    """Programs of a persistent launch: the count up to one per SM with the least modelled time (modelled_us, the
    split rule's model: one wave, the fullest share's tiles, a partial per cut segment), for items of the
    capacity's length; the more programs on a tie (where HBM bounds the time), never more than tiles. A cut costs
    its float32 partial and the merge, more than the tiles it spreads at short lengths: B = 64 sequences of 64 heads
    and 1k / 2k keys take 64 programs of one whole sequence each (the H100 ran the unsplit launch fastest), B = 768
    of 128 heads (1536 items of 16 tiles at 1k keys) 128 programs of 12 whole items each, one long sequence many
    pieces."""
    if item_tiles <= 0 or items <= 0:
        return max(1, min(sm_count, items))

    def time(programs: int) -> tuple[float, int]:
        most, cuts = share_pieces(item_tiles, items, programs)
        return modelled_us(plan, 1, most, item_tiles * items, cuts), -programs

    return min(range(1, min(sm_count, item_tiles * items) + 1), key=time)  # a program a tile at most


def balanced_shares(tiles: Sequence[int], programs: int) -> list[list[Segment]]:
    """Each program's segments: the items' tiles laid end to end, cut into `programs` contiguous shares (the
    kernel's walk, gluon_decode.py.j2 `segments`; the combine finds an item's pieces by tile_owner)."""
    cumulative = [0]
    for t in tiles:
        cumulative.append(cumulative[-1] + t)
    total = cumulative[-1]
    shares = []
    for p in range(programs):
        pos, end, item, segments = share_start(total, programs, p), share_start(total, programs, p + 1), 0, []
        while pos < end:
            while cumulative[item + 1] <= pos:  # items without tiles
                item += 1
            stop = min(cumulative[item + 1], end)
            segments.append(Segment(item, pos - cumulative[item], stop - cumulative[item], p + item,
                                    pos == cumulative[item] and stop == cumulative[item + 1]))
            pos = stop
        shares.append(segments)
    return shares


def default_block_n(plan: KernelPlan) -> int:
    """64 keys a tile (FlashMLA's), 32 for an FP8 latent: its e4m3 slots and two converted slots must fit beside Q."""
    return 32 if plan.spec.dequant else DEFAULT_BLOCK_N


def layout_bytes(block_n: int, stages: int, rope: int, q_bytes: int, fp8_stages: int = 0,
                 fp8_queries: bool = False) -> int:
    """Shared memory of a layout: Q and each ring slot hold 576 columns (latent and rope), P [ROWS, BN], the row
    scales (f32) and the mbarriers; an FP8 latent's e4m3 slots (one byte an element) beside the converted ring, whose
    slots hold the latent alone where QK^T reads the e4m3 slots (`fp8_queries`: the e4m3 Q overwrites the Q loaded
    in q's dtype, in place)."""
    columns = LATENT_DIM + rope
    converted = LATENT_DIM if fp8_queries else columns
    return ((ROWS * columns + stages * block_n * converted + ROWS * block_n) * q_bytes
            + fp8_stages * block_n * columns + ROWS * 4 + BARRIER_BYTES)


def choose_layout(plan: KernelPlan, stages: int | None = None) -> LatentDecodeLayout:
    """The layout: the key tile PlanOptions.warpgroup_block_n gives (else default_block_n) and the most ring stages,
    up to MAX_STAGES, that fit (`stages` forces a count: compile-only A/B runs). An FP8 latent converts into two
    slots (the converter fills one while the consumers read the other) and lands in the most e4m3 slots that fit."""
    block_n = plan.options.warpgroup_block_n or default_block_n(plan)
    if block_n not in KEY_TILES:
        raise CompileError(f"warpgroup_block_n for the MLA decode kernel must be one of "
                           f"{', '.join(map(str, KEY_TILES))}, got {block_n!r}")
    rope = max(16, next_pow2(dot_size(plan, next(d for d in plan.spec.dots if not d.is_qk))))
    q_bytes = DTYPE_BITS[plan.dtype] // 8
    capacity = smem_capacity(plan.target.arch)
    fp8 = bool(plan.spec.dequant)
    fp8_queries = bool(plan.spec.quantize)  # only over an FP8 latent (unavailable)

    def fits(s: int) -> bool:
        return layout_bytes(block_n, 2 if fp8 else s, rope, q_bytes, s if fp8 else 0, fp8_queries) <= capacity

    fit = max((s for s in range(1, MAX_STAGES + 1) if fits(s)), default=0)
    asked, stages = stages, stages or fit
    if stages < 2 or stages > fit:
        raise CompileError(f"the MLA decode kernel at {block_n} keys a tile fits {fit} ring stage(s)"
                           f"{' of e4m3 tiles beside two converted ones' if fp8 else ''} in {capacity} B of shared "
                           f"memory; it needs 2 or more{f' (asked {asked})' if asked else ''}")
    chunks = (LATENT_CHUNK,) * (LATENT_DIM // LATENT_CHUNK)
    if not fp8:
        return LatentDecodeLayout(ROWS, block_n, stages, chunks, rope, layout_bytes(block_n, stages, rope, q_bytes))
    converters = plan.options.fp8_converter_warpgroups or 1
    if converters not in CONVERTER_WARPGROUPS:
        raise CompileError(f"fp8_converter_warpgroups for the MLA decode kernel must be one of "
                           f"{', '.join(map(str, CONVERTER_WARPGROUPS))}, got {converters!r}")
    value_regs, converter_regs = CONVERTER_REGS[converters]
    smem = layout_bytes(block_n, 2, rope, q_bytes, stages, fp8_queries)
    # P V in f16 where QK^T does not read the converted slots (quantised queries) and q is bf16 (f16 q: already)
    f16_values = bool(plan.options.fp8_f16_values) and fp8_queries and plan.dtype == "bf16"
    conflict_free = plan.options.fp8_conflict_free_converter
    if conflict_free is False and (converters > 1 or f16_values):
        raise CompileError("fp8_converter_warpgroups=2 and fp8_f16_values use the conflict-free converter: "
                           "fp8_conflict_free_converter=False cannot go with them")
    vector = 16 if conflict_free is False else 8
    sum_every = FLOAT32_SUM_RUNS[0] if plan.options.fp8_float32_sum_every is None else plan.options.fp8_float32_sum_every
    if sum_every not in FLOAT32_SUM_RUNS:
        raise CompileError(f"fp8_float32_sum_every for the MLA decode kernel must be one of "
                           f"{', '.join(map(str, FLOAT32_SUM_RUNS))} (0: the tensor cores' accumulator over all "
                           f"{LATENT_DIM} columns), got {sum_every!r}")
    layout = LatentDecodeLayout(ROWS, block_n, 2, chunks, rope, smem, fp8_stages=stages, fp8_queries=fp8_queries,
                                value_regs=value_regs, converter_regs=converter_regs,
                                converter_warpgroups=converters, converter_vector=vector, f16_values=f16_values,
                                fp8_float32_sum_every=sum_every if fp8_queries else 0)
    if score_registers(layout) < SCORE_REGS:  # a guard for edits of the budgets above
        raise CompileError(f"{converters} converter warpgroup(s) of {converter_regs} registers and a value warpgroup "
                           f"of {value_regs} leave the score warpgroup {score_registers(layout)}, under {SCORE_REGS}")
    return layout


def score_registers(w: LatentDecodeLayout) -> int:
    """The score warpgroup's setmaxnreg budget as Triton 3.6 sets it: the launch's maxnreg over every warpgroup (the
    producer warp's counts as one: setmaxnreg's unit) less the other partitions' budgets. maxnreg rounds down to
    8, so five warpgroups (two converters) pool 96 x 5 = 480 a thread of the file's 512."""
    groups = w.consumers + -(-w.producer_warps // 4) + w.converter_warps // 4
    others = w.value_regs + w.converter_warpgroups * w.converter_regs + -(-w.producer_warps // 4) * w.producer_regs
    return max_registers(w, w.converter_warps) * groups - others


def stage_latent_decode(plan: KernelPlan) -> KernelPlan:
    """DecodePlan.warpgroups: "gluon" where the kernel qualifies unless PlanOptions(gluon=False), else "triton" and
    why (the layout is set wherever it qualifies, so `attnc show --emit plan` shows it)."""
    if not plan.spec.is_latent:
        return plan
    why = unavailable(plan)
    if why:
        return replace(plan, decode=replace(plan.decode, warpgroups=WarpgroupPlan("triton", why)))
    layout = choose_layout(plan)
    schedule = "latent_splits' splits (PlanOptions(mla_persistent=True): a persistent, balanced schedule)"
    if plan.options.mla_persistent:
        why = unavailable_persistent(plan)
        layout = replace(layout, persistent=not why)
        schedule = f"latent_splits' splits: PlanOptions(mla_persistent=True) does not apply, {why}" if why else \
            "persistent, balanced shares (PlanOptions(mla_persistent=True))"
    if plan.options.gluon is False:
        staged = WarpgroupPlan("triton", "the Gluon MLA decode kernel qualifies: PlanOptions(gluon=False)", layout)
    else:
        staged = WarpgroupPlan("gluon", f"one query position per program, the latent read once for QK^T and P V; "
                                        f"{schedule} (PlanOptions(gluon=False): the Triton decode kernel)", layout)
    return replace(plan, decode=replace(plan.decode, warpgroups=staged))


def gluon_decode_kernel(plan: KernelPlan, tiles: LaunchTiles, split: bool) -> KernelLaunch:
    """attn_decode_gluon for a launch of `tiles`: its key tile and ring are module constants; a launch passes the
    heads per program (PACK), one position (BLOCK_MQ), whether it writes partial results, and the options."""
    w = plan.decode.warpgroups.layout
    return KernelLaunch("attn_decode_gluon", (("BLOCK_MQ", tiles.block_mq), ("PACK", tiles.pack), ("SPLIT", split),
                                              ("num_warps", w.consumer_warps),
                                              ("maxnreg", max_registers(w, w.converter_warps))))


def latent_tiles(plan: KernelPlan, group: int) -> LaunchTiles:
    """A program's tiles for H // HKV = group: the most heads of the group up to ROWS (a power of two dividing
    it) as its rows (rows past them idle), one position."""
    w = plan.decode.warpgroups.layout
    pack = 1
    while group % (pack * 2) == 0 and pack * 2 <= w.block_m:
        pack *= 2
    return LaunchTiles(TileConfig(pack, w.block_n, w.consumer_warps, w.stages), pack, 1)


def latent_kernels(plan: KernelPlan, groups: list[int]) -> list[KernelLaunch]:
    """Every attn_decode_gluon launch a call whose H // HKV is one of `groups` can select (the kernel list's share,
    passes/kernels.py): each heads-per-program count, split or not; a persistent layout's unsplit, and its merge."""
    packs = dict.fromkeys(latent_tiles(plan, g) for g in groups)
    if plan.decode.warpgroups.layout.persistent:  # one launch a call, its merge scheduled (M > 1: the Triton kernel)
        return [gluon_decode_kernel(plan, tiles, False) for tiles in packs] + [scheduled_combine_kernel(plan)]
    return [gluon_decode_kernel(plan, tiles, split) for tiles in packs for split in (False, True)]


def scheduled_combine_kernel(plan: KernelPlan) -> KernelLaunch:
    """attn_combine_scheduled, the persistent launch's merge: attn_combine's tiles for two pieces an item (a share
    boundary cuts an item in two, mostly)."""
    return replace(combine_kernel(plan, 2), function="attn_combine_scheduled")


def modelled_us(plan: KernelPlan, waves: int, program_tiles: float, key_tiles: int, partials: int) -> float:
    """A Gluon MLA decode launch's modelled time (PROGRAM_START_US...): `waves` of programs each starting and then
    streaming at most `program_tiles` key tiles, but no faster than HBM streams all `key_tiles`; `partials` float32
    [ROWS, DV] partial results written and read back, plus the merge's launch where there are any."""
    w = plan.decode.warpgroups.layout
    tile_bytes = w.block_n * (LATENT_DIM + w.rope) * (1 if w.fp8_stages else 2)  # e4m3 or 16-bit
    alone = waves * PROGRAM_START_US + program_tiles * tile_bytes / PROGRAM_BYTES_PER_US
    time = max(alone, key_tiles * tile_bytes / HBM_BYTES_PER_US)
    return time + (MERGE_US + partials * 2 * ROWS * LATENT_DIM * 4 / HBM_BYTES_PER_US if partials else 0.0)


def latent_splits(plan: KernelPlan, programs: int, key_tiles: int, sm_count: int) -> int:
    """Splits of each program's key tiles: the count with the least modelled time (modelled_us), at most
    the Triton decode kernel's (split_count) and never more programs than SMs. The partials of a split cost
    ROWS x 512 x 4 bytes written and read per split and program, which at 64 heads and 1k keys is 44% of the
    latent's bytes: the H100 sweep ran B = 64 sequences of 1k / 2k keys (64 programs) fastest unsplit (42.6 / 70.8
    us against 56.2 / 81.0 at two splits, where split_count chose two), and 8k keys at two splits (228 against
    240); one sequence of thousands of keys still splits many ways. PlanOptions(num_splits=...) fixes the count."""
    most = split_count(plan, programs, key_tiles, sm_count)
    if plan.options.num_splits is not None or most == 1:
        return most

    def time(splits: int) -> float:
        waves = -(-programs * splits // sm_count)
        return modelled_us(plan, waves, waves * key_tiles / splits, programs * key_tiles,
                           programs * splits if splits > 1 else 0)

    return min(range(1, most + 1), key=time)


def latent_launch(plan: KernelPlan, sizes: Mapping[str, int], sm_count: int) -> DecodeLaunch:
    """The Gluon decode kernel's launch for these sizes: one position per program (grid axis 0: M x splits), the
    group's heads as latent_tiles packs them as its rows, the key range split as the Triton decode kernel splits it
    (latent_splits) for tiles of the layout's BN; a persistent layout's one-position call: up to a program per SM
    (persistent_programs; DecodeLaunch.programs), binary-search steps over the items' cumulative tiles."""
    w = plan.decode.warpgroups.layout
    tiles = latent_tiles(plan, sizes["H"] // sizes["HKV"])
    pack = tiles.pack
    head_programs = sizes["B"] * (sizes["H"] // pack)
    key_tiles = -(-sizes["N"] // w.block_n)
    if w.persistent and sizes["M"] == 1:
        # up to a program per SM; attn_combine_scheduled merges the items cut by a share boundary
        programs = persistent_programs(plan, key_tiles, head_programs, sm_count)
        return DecodeLaunch(tiles, 1, programs, 1, head_programs.bit_length(), gluon_decode_kernel(plan, tiles, False),
                            scheduled_combine_kernel(plan), programs=programs)
    splits = latent_splits(plan, sizes["M"] * head_programs, key_tiles, sm_count)
    return DecodeLaunch(tiles, splits, sizes["M"], head_programs, 0, gluon_decode_kernel(plan, tiles, splits > 1),
                        combine_kernel(plan, splits) if splits > 1 else None)
