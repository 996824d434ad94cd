"""Hopper pipeline staging: whether the forward prefill runs the Gluon warpgroup-specialized kernel, and its layout.

A pure function of the plan. The Gluon kernel (backends/triton/gluon.py.j2) covers dense storage, f16/bf16 q, k and
v, head dims up to 256 and sm_90 (warpgroup MMA exists there only); everything else keeps the Triton template,
and so do launches with M in the decode regime (the decode tile packs GQA heads). PlanOptions(gluon=True) takes
it wherever it qualifies, gluon=False never; by default (None) it runs where it beat the template on the H100
(`automatic_choice`, benchmarks/NOTES.md session 7).

The layouts follow FlashAttention-3 on an H100 (232,448 B of shared memory, 64K registers per SM, one program per
SM): 128 query rows in two consumer warpgroups of 64 rows at 240 registers per thread, one producer warp at 24.
A consumer holds per thread the fp32 accumulator (DV / 2 registers for 64 rows), the score tile (BN / 2) and P
(BN / 4, bf16); overlapping the next tile's QK^T with the weights keeps a second score tile live, which fits up to
DV = 128 with BN = 128. The ring depth is the most stages, up to MAX_STAGES, whose K/V tiles fit beside Q.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import CompileError
from ..ir import QK, Binary, Call, Expr, IndexVar, Lookup, Num, walk
from .plan import DkdvLayout, KernelPlan, WarpgroupLayout, WarpgroupPlan
from .tiling import DTYPE_BITS, smem_bytes, smem_capacity, widest_block

GLUON_ARCH = 90
GLUON_DTYPES = ("f16", "bf16")
MAX_HEAD_BLOCK = 256  # BLOCK_D and BLOCK_DV: one TMA box and one wgmma N each
MAX_STAGES = 4
# By default the Gluon kernel takes launches with M and N at least this long: on the H100 (Triton 3.6, bf16, D=128,
# 16k tokens a batch) it ran 0.82-0.94x the template at S = 1024, 1.02-1.08x at 4096 and 1.08-1.15x at 8192-16384
AUTO_MIN_LENGTH = 4096
# The default's persistent programs (persistent_by_default) take launches from this long: on the H100 (session 10,
# bf16, D = 128, 16k tokens a batch) causal S = 1k / 4k / 16k ran 331 / 465-471 / 532 TFLOP/s against the template's
# 301 / 427-429 / 515-516; session 19's dense S = 1k ran 528 against the template's 411.
PERSISTENT_MIN_LENGTH = 1024


def unavailable_arch(arch: int | None, kernel: str) -> str:
    """Why `kernel` (a Gluon warpgroup kernel) cannot run on `arch` ("" on sm_90)."""
    if arch is None:
        return f"no GPU: {kernel} needs sm_90"
    if arch != GLUON_ARCH:
        return f"sm_{arch}: warpgroup MMA is sm_90 only"
    return ""


def unavailable(plan: KernelPlan) -> str:
    """Why the plan cannot run the Gluon kernel ("" where it can)."""
    spec = plan.spec
    why = unavailable_arch(plan.target.arch, "the Gluon kernel")
    if why:
        return why
    if spec.q_storage is not None or spec.kv_storage is not None:
        return "ragged or paged storage runs the decode kernel"
    if spec.is_latent:
        return "latent attention (a second dot product, or values that are the keys) runs the decode kernel"
    if spec.dequant:
        return "FP8 K/V (dequant) runs the decode kernel"
    if spec.quantize:
        return "quantised queries (quantize) run the decode kernel"
    dtypes = {spec.q.dtype, spec.k.dtype, spec.v.dtype}
    if len(dtypes) > 1 or plan.dtype not in GLUON_DTYPES:
        return f"q, k, v are {'/'.join(sorted(dtypes))}: the Gluon kernel takes one of {', '.join(GLUON_DTYPES)}"
    if widest_block(plan) > MAX_HEAD_BLOCK:
        return f"D={plan.head_dim} DV={plan.value_dim}: the Gluon kernel takes head dims up to {MAX_HEAD_BLOCK}"
    if plan.tiling.block_dv > plan.tiling.block_d:
        return f"D={plan.head_dim} DV={plan.value_dim}: the output tile reuses Q's shared memory, so DV <= D"
    if plan.head_dim % 8 or plan.value_dim % 8:
        return f"D={plan.head_dim} DV={plan.value_dim}: TMA rows need head dims that are multiples of 8"
    return ""


def tile_work(plan: KernelPlan) -> int:
    """How much a key tile computes per element beyond qk's scale, each step a tile of registers of its own:
    2 for masks evaluated element by element or a score that reads a table at (i, j) (integer and gather work),
    1 for a score that depends on the key position otherwise (ALiBi's distance), 0 for neither."""
    def positions(e: Expr) -> set[str]:
        return {v.name for v in walk(e) if isinstance(v, IndexVar)}

    logits = plan.score.logits2
    if plan.masks.evaluated or any(isinstance(n, Lookup) and {"i", "j"} <= positions(n) for n in walk(logits)):
        return 2
    return 1 if "j" in positions(logits) else 0


def gluon_d_chunks(plan: KernelPlan) -> tuple[int, ...]:
    """Q's and K's column chunks in the Gluon kernel: the plan's (Tiling.d_chunks: 192 = 128 + 64) where out's tile
    fits in Q's first chunk, since out leaves through that buffer; else one chunk of D padded to block_d."""
    t = plan.tiling
    return t.d_chunks if t.block_dv <= t.d_chunks[0] else (t.block_d,)


def persistent_by_default(plan: KernelPlan) -> bool:
    """PlanOptions.gluon_persistent where it is None, at the head dims measured: under an upper key bound (query
    tiles of unequal work) up to D = 128 and at D = 256 in one chunk; without one at D = 128 (dense D = 64 keeps the
    template, D = 256 one-tile programs; MLA's D = 192 is not timed). On the H100 (session 19, three ring stages at
    D = 128, sections of L2_KV_BYTES; benchmarks/NOTES.md) persistent programs ran dense S = 1k / 4k / 16k at 528 /
    598 / 612 TFLOP/s against one-tile programs' 436 / 569 / 624, causal 1k / 4k / 16k at 413 / 562 / 618 against
    293 / 493 / 602, and causal D = 256 at 575-576 against 550-568: the producer loads the next tile's Q and first
    keys while the consumers finish a tile, which a one-tile program pays for at every query tile."""
    if plan.masks.exact.upper:
        return widest_block(plan) <= 128 or len(gluon_d_chunks(plan)) == 1
    return widest_block(plan) == 128


def choose_layout(plan: KernelPlan, persistent: bool) -> WarpgroupLayout:
    t = plan.tiling
    chunks = gluon_d_chunks(plan)
    # The widest tile a consumer's wgmmas take: a chunk of Q and K, or V and out (widest_block where D is one chunk).
    widest = max(chunks[0], t.block_dv)
    block_m = 128
    # Key tiles as wide as the consumers' 240 registers hold without spilling (ptxas, benchmarks/NOTES.md session 6):
    # per thread the score tile takes BN / 2 registers, the accumulator DV / 2, and per-element work a tile more.
    # D = 192 in chunks (tiles of 128 and 64, DV = 128) takes dense D = 128's 128 keys, and its ring of two stages
    # fits shared memory (48 KiB of Q and 2 x 80 KiB of K and V), where D padded to 256 would fit one.
    work = tile_work(plan)
    block_n = 128 if widest <= 128 else 64
    if work == 2 or (work and widest > 128):
        block_n //= 2
    block_n = plan.options.warpgroup_block_n or block_n
    if block_n not in KEY_TILES:
        raise CompileError(f"warpgroup_block_n must be one of {', '.join(map(str, KEY_TILES))}, got {block_n!r}")
    # Overlap keeps a second score tile live: it fits beside a 64-register accumulator (DV <= 128), not beside
    # per-element integer work at D >= 128.
    overlap = t.block_dv <= 128 and not (work == 2 and widest >= 128)
    bytes_per = DTYPE_BITS[plan.dtype] // 8
    columns = sum(chunks)  # of Q and K in shared memory

    def shared(stages: int, extra: int) -> int:  # Q, the ring, `extra` bytes and the mbarriers
        return smem_bytes(block_m, block_n, columns, t.block_dv, stages, bytes_per) + extra + BARRIER_BYTES

    # The weights under P V (where the layout overlaps and its P buffers fit beside two stages: not MLA's D = 192):
    # P in shared memory, two buffers per consumer's rows
    p_bytes = 2 * block_m * block_n * bytes_per
    under_pv = bool(plan.options.gluon_weights_under_pv) and overlap \
        and shared(2, p_bytes) <= smem_capacity(plan.target.arch)
    p_bytes = p_bytes if under_pv else 0
    # The ring: the most stages that fit beside Q, up to MAX_STAGES, and at most RING_BYTES of K and V in flight
    # (three 64 KiB stages at D = 128: RING_BYTES says why).
    slot = block_n * (columns + t.block_dv) * bytes_per
    stages = min(MAX_STAGES, max(2, RING_BYTES // slot))
    while stages > 1 and shared(stages, p_bytes) > smem_capacity(plan.target.arch):
        stages -= 1
    if stages < 2:  # with one slot a consumer would wait for tile j+1's K before it releases tile j's V
        raise CompileError(f"warpgroup_block_n={block_n}: two ring stages of {block_n} keys at D={plan.head_dim} "
                           f"DV={plan.value_dim} do not fit shared memory beside Q; pass a smaller one")
    schedule = plan.options.warpgroup_schedule or "pingpong"
    if schedule not in SCHEDULES:
        raise CompileError(f"warpgroup_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    # cooperative: one consumer partition whose 8 warps (two warpgroups) share the 128 rows of every step
    consumers, warps = (1, 8) if schedule == "cooperative" else (2, 4)
    layout = WarpgroupLayout(block_m, block_n, stages, consumers, warps, schedule, overlap, chunks,
                             weights_under_pv=under_pv)
    if persistent:
        # Persistent programs: every partition finds each work tile's key range itself, and the scalars the
        # partitions share (sizes, strides, the mask bounds' terms) are computed once before they split and stay live
        # into the producer, which spilled them at 24 registers (ptxas, sm_90a: 116 B at causal D = 128). 40 leave
        # both consumers 232: the launch's 12 warps at max_registers (168) hold 64,512 = 128 x (232 + 232 + 40).
        # Out through a buffer of its own where shared memory holds it beside Q and the ring (D = 64; at D = 128 the
        # third stage takes its place).
        out_buffer = shared(stages, p_bytes + block_m * t.block_dv * bytes_per) <= smem_capacity(plan.target.arch)
        layout = replace(layout, persistent=True, producer_regs=40, consumer_regs=232, out_buffer=out_buffer)
    return layout


SCHEDULES = ("pingpong", "parallel", "cooperative")
KEY_TILES = (32, 64, 128)  # PlanOptions.warpgroup_block_n: the key tiles the pass itself picks
BARRIER_BYTES = 1024  # mbarriers and the compiler's alignment padding
# K and V in flight in the ring: at D = 128 three stages of 128 keys (FlashAttention-3 runs two) ran 1.06-1.20x two on
# the H100 on every dense and causal row from S = 1k to 16k, one-tile and persistent (session 19, benchmarks/NOTES.md)
RING_BYTES = 192 * 1024
MAX_REGISTERS = 65536  # per SM on sm_90: the partitions' setmaxnreg budgets must fit in it together


def max_registers(w: WarpgroupLayout | DkdvLayout, extra_warps: int = 0) -> int:
    """maxnreg of the launch: the default partition (the first consumer) gets what the register file leaves after
    the workers' budgets, so the kernel-wide limit is the file split over all warps, warpgroups rounded up
    (`extra_warps`: further worker warpgroups, e.g. the MLA decode kernel's FP8 converter)."""
    warps = w.consumers * w.consumer_warps + 4 * -(-w.producer_warps // 4) + extra_warps
    return (MAX_REGISTERS // (32 * warps)) // 8 * 8


def slower_than_the_template(plan: KernelPlan, persistent: bool) -> str:
    """Why the default keeps the template for a plan the Gluon kernel qualifies for ("" where it does not): the
    kinds of spec where the template measured faster on the H100. Session 7 timed one-tile programs, slower at head
    dims below 128 and with key windows; persistent programs (causal) were faster at both in sessions 13 and 16
    (causal D = 64: 390 / 415 TFLOP/s against 372 / 374, window 1024: 397 / 408 against 376 / 384;
    benchmarks/NOTES.md, session 16). A function of qk kept the template (0.64x with tanh's formula on the consumers'
    critical path) until tanh ran as one instruction (approx_functions): 442 / 451 against 372 / 374 at softcap 30
    causal S = 8k (session 17)."""
    if widest_block(plan) < 128 and not (persistent and widest_block(plan) >= 64):
        return (f"D={plan.head_dim}: the template was faster on the H100 at head dims below 128 with one-tile programs "
                f"(0.94x); persistent ones were timed from D = 64")
    if plan.masks.evaluated:
        return "masks evaluated per element: the Gluon kernel reads no tile summary and evaluates every tile"
    if plan.masks.exact.lower and not persistent:
        return "a key window (a lower key bound): the template was faster on the H100 (0.95x)"
    approximated = plan.approximated()
    if any(isinstance(n, Call) and n.fn not in approximated and any(isinstance(x, QK) for x in walk(n))
           for n in walk(plan.score.logits2)):
        return ("a function of qk in the score without a one-instruction form (e.g. erf, or tanh over f32): the "
                "template was faster on the H100 (0.64x with tanh's formula)")
    return ""


def stage_warpgroups(plan: KernelPlan) -> KernelPlan:
    why = unavailable(plan)
    if why:
        return replace(plan, warpgroups=WarpgroupPlan("triton", why))
    persistent = plan.options.gluon_persistent
    persistent = persistent_by_default(plan) if persistent is None else persistent
    layout = choose_layout(plan, persistent)
    gluon = plan.options.gluon
    slower = "" if gluon else slower_than_the_template(plan, layout.persistent)
    if gluon is False or slower:
        why = "PlanOptions(gluon=False)" if gluon is False else f"{slower}; PlanOptions(gluon=True) selects it"
        return replace(plan, warpgroups=WarpgroupPlan("triton", f"the Gluon warpgroup kernel qualifies: {why}",
                                                      layout))
    decode = f"M > {plan.tiling.decode_max_m}"
    if gluon:
        return replace(plan, warpgroups=WarpgroupPlan(
            "gluon", f"prefill launches ({decode}); decode launches keep the Triton template", layout))
    shortest = PERSISTENT_MIN_LENGTH if persistent else AUTO_MIN_LENGTH
    return replace(plan, warpgroups=WarpgroupPlan(
        "gluon", f"prefill launches with M and N >= {shortest}, where it beat the template on the H100; "
        f"shorter ones keep the Triton template (PlanOptions(gluon=True): every prefill launch)", layout, shortest))


# The Gluon dK/dV kernel: a consumer warpgroup holds 64 keys (wgmma's M) with dK and dV in float32 registers,
# BLOCK_D / 2 + BLOCK_DV / 2 per thread, beside S^T and dP^T of a query tile (BLOCK_M / 2 each), P^T and dS^T, and
# the query rows' values broadcast along the tile's columns: BLOCK_M / 4 registers each. lse2 and delta come from
# shared memory where they are used (the producer writes them) and a masked dS needs no select, so 64 query rows
# (FlashAttention-3's, m64n64k16 wgmmas) run at D = 128 without spills in the loop for a plain score (dense, causal,
# GQA); a score transform or a lower key bound still spills there (softcap, window: 117-183 LDL+STL a step), and at
# D = 64 64 rows spill nothing unless masks are evaluated element by element (benchmarks/NOTES.md, session 20).
DKDV_KEYS = 128
DKDV_MAX_HEAD_BLOCK = 128  # dK and dV of 64 keys at D = 256 would take 256 of a thread's 240 registers
DKDV_ROW_TILES = (32, 64)  # PlanOptions.gluon_backward_block_m
DKDV_MAX_STAGES = 3
DKDV_MIN_DQ_HEAD_BLOCK = 64  # dq_in_dkdv: dQ^T's rows are the head dim, wgmma's M a warpgroup


def dkdv_by_default(plan: KernelPlan) -> bool:
    """Where PlanOptions.gluon_backward is None: the Gluon dK/dV kernel at 64 query rows with dQ split between its
    consumers (and dq_in_dkdv, block_m where those are None), for the plans the H100 measured it on. Session 20
    (sweep_backward.py --gluon, backward kernels alone, against the template): dense S = 1k / 4k / 16k 1.27 / 1.21 /
    1.52x, causal 1.06 / 1.21 / 1.29x, GQA 32/8 1.28x, all at D = 128 with a score of qk times a constant, rows
    normalized without a sink and no lower key bound or mask evaluated by element; causal D = 64 ran within 1.04x of the
    template, and the others spill at 64 rows by compile (unmeasured), so they keep the template."""
    logits = plan.score.logits2
    plain = (isinstance(logits, Binary) and logits.op == "*" and isinstance(logits.lhs, QK)
             and isinstance(logits.rhs, Num))
    normalizer = plan.spec.normalizer
    return (plain and widest_block(plan) == 128 and normalizer.normalized and normalizer.sink is None
            and not plan.masks.exact.lower and not plan.masks.evaluated)


def dkdv_layout(plan: KernelPlan, tables: bool, data_dependent: bool) -> tuple[DkdvLayout | None, str]:
    """The Gluon dK/dV kernel's layout for the plan's backward and why, or None and why the Triton template's kernel
    runs instead. `tables`: the score reads float inputs that get gradients (their adds stay in the template's kernel;
a sink's gradient is attn_bwd_prep's);
    `data_dependent`: the masks need the tile summary (the Gluon kernel reads none)."""
    options, by_default = plan.options, dkdv_by_default(plan)
    if not (by_default if options.gluon_backward is None else options.gluon_backward):
        return None, ("PlanOptions(gluon_backward=True) selects the Gluon dK/dV kernel (by default: D = 128, a score "
                      "of qk times a constant, rows normalized without a sink, no lower key bound or evaluated mask)")
    why = unavailable_arch(plan.target.arch, "the Gluon dK/dV kernel")
    spec = plan.spec
    if why:
        pass
    elif spec.q_storage is not None or spec.kv_storage is not None:
        why = "ragged storage: the template's dK/dV kernel finds each program's sequence"
    elif spec.decode_kernel_only:
        why = "latent attention, FP8 K/V and quantised queries have the template's backward"
    elif len({spec.q.dtype, spec.k.dtype, spec.v.dtype}) > 1 or plan.dtype not in GLUON_DTYPES:
        why = f"the Gluon dK/dV kernel takes q, k, v of one of {', '.join(GLUON_DTYPES)}"
    elif widest_block(plan) > DKDV_MAX_HEAD_BLOCK:
        why = (f"D={plan.head_dim} DV={plan.value_dim}: dK and dV of 64 keys in registers fit head dims up to "
               f"{DKDV_MAX_HEAD_BLOCK}")
    elif plan.head_dim % 8 or plan.value_dim % 8:
        why = f"D={plan.head_dim} DV={plan.value_dim}: TMA rows need head dims that are multiples of 8"
    elif data_dependent:
        why = "data-dependent masks: the Gluon dK/dV kernel reads no tile summary"
    elif tables:
        why = "the score reads float inputs that get gradients: their adds are the template's"
    if why:
        return None, f"{why}; the Triton template's dK/dV kernel runs"
    skew_asked = bool(options.gluon_backward_ds_under_dkdv)
    block_m = options.gluon_backward_block_m or (
        64 if (by_default and not skew_asked) or (widest_block(plan) <= 64 and tile_work(plan) < 2) else 32)
    if block_m not in DKDV_ROW_TILES:
        raise CompileError(f"gluon_backward_block_m must be one of {', '.join(map(str, DKDV_ROW_TILES))}, "
                           f"got {block_m!r}")
    # at 32 query rows dQ^T = K^T dS^T reads dS^T from the skew's buffers; its M is BLOCK_D, at least wgmma's 64 (else
    # the dQ kernel's). At 64 rows dQ = dS K unskewed, each consumer half of D's columns over both consumers' keys
    dq_asked = options.gluon_backward_dq_in_dkdv
    dq_in_dkdv = (by_default and block_m == 64 and not skew_asked if dq_asked is None else dq_asked) and (
        plan.tiling.block_d >= DKDV_MIN_DQ_HEAD_BLOCK)
    layout = DkdvLayout(block_m, DKDV_KEYS, DKDV_MAX_STAGES, ds_under_dkdv=(dq_in_dkdv and block_m < 64) or skew_asked,
                        dq_in_dkdv=dq_in_dkdv)
    # skewed (ds_under_dkdv), a consumer waits for tile m + 2's Q and dO before it releases tile m's slot: 3 slots
    fewest = 3 if layout.ds_under_dkdv else 2
    capacity = smem_capacity(plan.target.arch)
    while layout.stages > fewest and dkdv_shared_bytes(plan, layout) > capacity:
        layout = replace(layout, stages=layout.stages - 1)
    if dkdv_shared_bytes(plan, layout) > capacity:
        skew = "gluon_backward_dq_in_dkdv" if layout.dq_in_dkdv else "gluon_backward_ds_under_dkdv"
        raise CompileError(f"{skew} with gluon_backward_block_m={block_m} at D={plan.head_dim}: {fewest} stages "
                           f"take {dkdv_shared_bytes(plan, layout)} B of shared memory, more than the {capacity} B "
                           f"there are; use gluon_backward_block_m=32")
    return layout, (f"PlanOptions(gluon_backward=True): {layout.consumers} consumer warpgroups of "
                    f"{layout.keys_per_consumer} keys, {layout.block_m} query rows x {layout.stages} stages; "
                    + ("dQ by TMA reduce-add (the dQ kernel where deterministic)" if layout.dq_in_dkdv
                       else "dQ by the dQ kernel")
                    + ("; P^T and dS^T of the next tile under dV and dK" if layout.ds_under_dkdv else ""))


def dkdv_shared_bytes(plan: KernelPlan, layout: DkdvLayout) -> int:
    """Shared memory of the Gluon dK/dV kernel: K and V of the program's keys (loaded once), the ring of Q and dO,
    each slot's lse2 and delta rows, with `ds_under_dkdv` two buffers each of P^T and dS^T per consumer, with
    `dq_in_dkdv` a float32 dQ tile (the consumers' sum, or unskewed each consumer's columns, which TMA's reduce-add
    reads; unskewed two dS^T buffers a consumer), mbarriers."""
    t = plan.tiling
    bytes_per = DTYPE_BITS[plan.dtype] // 8
    grads = 2 * 2 * layout.block_n * layout.block_m * bytes_per if layout.ds_under_dkdv else (
        2 * layout.block_n * layout.block_m * bytes_per if layout.dq_in_dkdv else 0)  # the split's dS^T, 2 a consumer
    dq = layout.block_m * t.block_d * 4 if layout.dq_in_dkdv else 0
    rows = layout.stages * layout.block_m * 2 * 4  # each slot's lse2 and delta, float32
    return ((layout.block_n + layout.stages * layout.block_m) * (t.block_d + t.block_dv) * bytes_per + grads + dq
            + rows + BARRIER_BYTES)
