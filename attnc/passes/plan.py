"""The KernelPlan: everything a backend needs to generate one kernel, decided by the passes.

Backend-neutral fields come first; knobs only the Triton backend reads live in `TritonOptions`. Every record
is a frozen dataclass with tuple children, so a plan is hashable and its `repr` is a stable cache-key part.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Attention, Call, Expr, Numbering, linear_repr, walk
from ..ops import op_of


@dataclass(frozen=True)
class Target:
    """Where the kernel runs. `arch` is the CUDA compute capability times ten (90 = sm_90); None when there is
    no GPU (the Triton interpreter, or a CPU backend)."""

    backend: str  # "triton" | "tvm"
    device: str  # "cuda" | "cpu"
    arch: int | None = None


@dataclass(frozen=True)
class PlanOptions:
    """User overrides for the tiling and staging passes; None keeps the pass's choice."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    pack_heads: bool | None = None  # GQA: put the query heads of one K/V head into one program's rows
    tma: bool | None = None  # Hopper tensor descriptors for the K/V loads
    # Hopper: Triton's automatic warp specialization of the full-tile loop (needs tma); Triton 3.6 does not
    # specialize this kernel's loop, and there it only selects the two-loop kernel form (passes/tiling.py)
    warp_specialize: bool | None = None
    num_splits: int | None = None  # split-KV decode: programs per sequence's key range (None: passes/decode.py)
    # Hopper: the Gluon warpgroup-specialized prefill kernel (passes/warpgroups.py): True where the plan qualifies,
    # False never, None where it measured faster than the Triton template
    gluon: bool | None = None
    # its consumers: "pingpong" (two warpgroups, a partition each, 64 rows each, taking turns at the tensor
    # cores), "parallel" (the same without turns) or "cooperative" (one partition of two warpgroups sharing
    # every step); None: the pass's choice
    warpgroup_schedule: str | None = None
    warpgroup_block_n: int | None = None  # its key tile (32, 64 or 128; A/B runs); None: the pass's choice
    # its programs: True persistent (one per SM, each looping over work tiles; passes/warpgroups.py), False one
    # program per 128-row query tile; None: persistent where the mask leaves tiles unequal work (causal), as measured
    gluon_persistent: bool | None = None
    # its weights (the softmax) under P V: P goes through shared memory (two buffers a consumer), so a consumer waits for P V of
    # tile j-1 at the start of tile j+1 and its weights of tile j run while that P V does (ptxas otherwise waits for
    # it before the weights: benchmarks/NOTES.md, issue 13); where the layout overlaps (passes/warpgroups.py); False
    # or None: P in registers (the default: with it the H100 ran 0.79-0.87x, session 13)
    gluon_weights_under_pv: bool | None = None
    # the prefill's QK^T (the Triton template's and the Gluon kernel's) over D's power-of-two chunks (192 = 128 +
    # 64: passes/tiling.py head_dim_chunks); False pads D to a power of two as the other kernels do; None: chunks
    # where D has them
    chunk_head_dim: bool | None = None
    # GPU kernels over bf16 / f16 inputs: tanh by the tanh.approx.f32 instruction (relative error 2^-11, what
    # FlashAttention's softcap runs) in place of the 1.7-ulp formula, one MUFU instruction a score where the
    # formula takes two and ~15 more (passes/tiling.py); None: so, False: the formula
    approx_functions: bool | None = None
    # Hopper: the backward's dK/dV kernel in Gluon (passes/warpgroups.py dkdv_layout, FlashAttention-3's design)
    # where the plan qualifies; False: the Triton template's; None: the Gluon one at 64 query rows with dQ in it
    # where the H100 measured it faster (warpgroups.dkdv_by_default: D = 128, a plain score, softmax, no lower key
    # bound; 1.06-1.52x the template's backward, session 20), the template's elsewhere
    gluon_backward: bool | None = None
    # its query rows per ring slot (32 or 64; A/B runs); None: the pass's choice (passes/warpgroups.py)
    gluon_backward_block_m: int | None = None
    # its P^T and dS^T of query tile m + 1 computed while dV and dK of tile m run: a consumer issues S^T and dP^T of
    # the next tile ahead of this tile's dV and dK, which read P^T and dS^T from shared memory (two buffers each);
    # with them in registers ptxas waits for dP^T before the exponentials (benchmarks/NOTES.md, issue 12 bwdoverlap).
    # False or None: one tile at a time, P^T and dS^T in registers (the default: with it 0.85-0.89x, session 13)
    gluon_backward_ds_under_dkdv: bool | None = None
    # its dQ too, bulk-added into the float32 dQ by TMA's reduce-add (the template's atomic mode's buffer and
    # conversion), so the dQ kernel does not run (deterministic=True keeps it, and the template's dK/dV kernel): at
    # 64 query rows dQ = dS K, each consumer warpgroup half of D's columns (FlashAttention-3's split; 1.15-1.31x the
    # Gluon kernel with the dQ kernel at D = 128, session 20); at 32 rows, with the skew above, which it implies
    # there, dQ^T = K^T dS^T (0.83-0.97x, sessions 13 and 20). False: the dQ kernel's; None: as gluon_backward's default
    gluon_backward_dq_in_dkdv: bool | None = None
    # Hopper, the Gluon MLA decode kernel over an FP8 latent (passes/latent_decode.py): the conflict-free converter,
    # 8 e4m3 a thread (at 16, its stores conflict 2-way; 4-11% slower on the H100); None: it, False: 16 a thread
    fp8_conflict_free_converter: bool | None = None
    # ...warpgroups converting each e4m3 slot (1 or 2, each half of a slot's latent chunks); 2 uses the conflict-free
    # converter; None: 1
    fp8_converter_warpgroups: int | None = None
    # ...and with quantised queries and q in bf16, P V in f16 (P and the converted latent: e4m3 -> f16 is one
    # instruction a pair, bf16 four; both exact or finer in f16, latent_decode.py says why); uses the conflict-free
    # converter; None: bf16
    fp8_f16_values: bool | None = None
    # ...and with quantised queries, the fp8 x fp8 QK^T's products go into the tensor cores' accumulator in runs of
    # this many, each run added in float32 (32, 64 or 128: torch._scaled_mm's use_fast_accum=False is 32); 0 or
    # None: one accumulator over all 512 columns, the hardware's (on the H100 out 0.0086 off the reference where 32
    # is 0.0071, and 21-32% more tokens/s; session 16)
    fp8_float32_sum_every: int | None = None
    # Hopper MLA decode (the Gluon kernel, passes/latent_decode.py): True a program per SM, each taking an equal
    # share of all (sequence, head group)s' key tiles (latent_decode.balanced_shares); None or False one program per
    # (position, head group, split) by passes/decode.split_count (the default: with it 0.58-0.95x, session 13)
    mla_persistent: bool | None = None


@dataclass(frozen=True)
class KeyRange:
    """Per query row: keys j with max(0, *lower) <= j < min(N, *upper). Bounds are expressions of the row
    (i, h, b, sizes, params, lookups not at j) that the kernel evaluates before its key loop."""

    lower: tuple[Expr, ...] = ()
    upper: tuple[Expr, ...] = ()


@dataclass(frozen=True)
class MaskPlan:
    """The masks, split by how the kernel handles them.

    exact: the conjuncts that are intervals in j; a key tile inside every valid row's exact range (and past
        no evaluated conjunct) is *full*: no mask is evaluated there.
    hull: exact, narrowed by the interval hulls of the other conjuncts where they have one (`or` of
        intervals, e.g. prefix-LM); it bounds the key loop: tiles outside it never run.
    evaluated: conjuncts checked element by element on partial tiles (dilation, lookups at i/j, `or`).
    data_dependent: some evaluated conjunct reads a tensor at i or j; a generated tile-summary kernel then
        classes (query tile, key tile) blocks as empty / full / partial on the device.
    """

    exact: KeyRange = KeyRange()
    hull: KeyRange = KeyRange()
    evaluated: tuple[Expr, ...] = ()
    data_dependent: bool = False


@dataclass(frozen=True)
class ScorePlan:
    """The normalizer runs in base 2 (passes/score.py): `logits2` = score * log2(e) with the constant factor
    folded into qk's scale."""

    logits2: Expr
    sink2: Expr | None = None  # the sink's logit times log2(e)


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program (query heads x positions when heads are packed)
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class QueryRange:
    """The mask analysis transposed, for the backward's dK/dV kernel: which query rows can keep a key of the key
    tile [j0, j1), from the hull's per-row key bounds (MaskPlan.hull). An upper bound i + r keeps keys j < i + r, so
    it reaches the tile only from rows i >= j0 + 1 - r; a lower bound i + r (keys j >= i + r) only from rows
    i < j1 - r; a bound free of i keeps the tile's keys in every row or in none (upper u > j0, lower l < j1).
    Other bounds (i with another coefficient, or inside a lookup or a modulo) bound no rows: the kernel's per-tile
    check, the forward's rule, skips those tiles (`per_tile_check`, which data-dependent masks need as well).
    Without it, every query tile of the range runs, in loops free of branches (Triton pipelines those).

    BackwardPlan.full_queries reads the same fields the other way, for the exact bounds: the rows whose exact range
    holds every key of the tile are i >= j1 - r (upper), i <= j0 - r (lower), all where every free upper bound is
    >= j1 and every free lower bound <= j0, none otherwise."""

    from_upper: tuple[Expr, ...] = ()  # r of each upper bound i + r: rows i >= j0 + 1 - r
    from_lower: tuple[Expr, ...] = ()  # r of each lower bound i + r: rows i < j1 - r
    upper_free: tuple[Expr, ...] = ()  # upper bounds free of i: no row unless one is > j0
    lower_free: tuple[Expr, ...] = ()  # lower bounds free of i: no row unless one is < j1
    per_tile_check: bool = False  # a bound is neither, or the masks are data-dependent: check each query tile


@dataclass(frozen=True)
class DkdvLayout:
    """The Gluon dK/dV kernel's layout (FlashAttention-3's backward on sm_90): a program holds `block_n` keys of one
    query head, `consumers` warpgroups `block_n // consumers` of them each, with their dK and dV accumulators in
    registers; one producer warp TMA-loads K and V once, then each query tile's `block_m` rows of Q and dO into a
    ring of `stages` slots; per tile a consumer computes S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and
    dK += dS^T Q, all by async wgmma (P^T and dS^T from registers). dQ is the dQ kernel's. `ds_under_dkdv`: skewed by
    a tile, P^T and dS^T of tile m + 1 are computed under dV and dK of tile m, which read them from shared memory.
    `dq_in_dkdv`: dQ reduce-added into float32 dQ by TMA, at 32 query rows (skewed) as dQ^T = K^T dS^T of each tile
    beside dV and dK, at 64 unskewed as dQ = dS K (`split_dq`: each consumer half of D's columns over both consumers'
    keys, dS^T through shared memory, FlashAttention-3's split)."""

    block_m: int  # query rows per ring slot
    block_n: int  # keys per program, all consumers together
    stages: int
    consumers: int = 2
    consumer_warps: int = 4
    producer_warps: int = 1
    producer_regs: int = 24
    consumer_regs: int = 240
    ds_under_dkdv: bool = False
    dq_in_dkdv: bool = False

    @property
    def keys_per_consumer(self) -> int:
        return self.block_n // self.consumers

    @property
    def split_dq(self) -> bool:
        return self.dq_in_dkdv and not self.ds_under_dkdv


@dataclass(frozen=True)
class BackwardPlan:
    """The backward's kernels (passes/grad.py): the dK/dV kernel holds `dkdv.block_n` keys and steps through
    `dkdv.block_m` query rows at a time, over the rows `queries` leaves; the dQ kernel (deterministic backward)
    is shaped like the forward, `dq.block_m` query rows stepping through `dq.block_n` keys; the row kernel
    (delta, sink gradients) takes `prep.block_m` rows."""

    dkdv: TileConfig
    dq: TileConfig
    prep: TileConfig
    queries: QueryRange
    full_queries: QueryRange | None = None  # the exact bounds inverted (QueryRange); None: no tile is known full
    dq_kernel: bool = False  # dQ by the dQ kernel even where atomics are allowed (faster on this row)
    gluon_dkdv: DkdvLayout | None = None  # the Gluon dK/dV kernel's layout, where it runs (passes/warpgroups.py)
    gluon_reason: str = ""  # why it runs or, without a layout, why not

    def dq_by_kernel(self, deterministic: bool) -> bool:
        """Whether attn_bwd_dq writes dQ (else the dK/dV kernel adds it by atomics): always when deterministic."""
        return deterministic or self.dq_kernel


@dataclass(frozen=True)
class Tiling:
    block_d: int  # D padded to a power of two (loads are masked when D is not one)
    block_dv: int
    prefill: TileConfig
    decode: TileConfig  # for launches whose rows (M, times packed heads) fit in decode.block_m
    decode_max_m: int  # M up to this uses the decode config
    # The Triton prefill's column chunks of D: powers of two that sum to D, or (one chunk) block_d. qk is one dot
    # per chunk, so D = 192 loads and multiplies 128 + 64 columns, not 256 (passes/tiling.py `head_dim_chunks`).
    # The decode and backward kernels pad D to block_d; the Gluon kernel takes its own (WarpgroupLayout.d_chunks).
    d_chunks: tuple[int, ...]
    short: TileConfig | None = None  # the prefill tile for M up to short_max_m (an M regime of the tuned table)
    short_max_m: int = 0

    @property
    def prefill_d(self) -> int:
        """The q/k columns a Triton prefill tile loads: D where it is chunked, else block_d."""
        return sum(self.d_chunks)

    @property
    def configs(self) -> tuple[TileConfig, ...]:
        return (self.prefill, self.decode) + ((self.short,) if self.short else ())


@dataclass(frozen=True)
class HeadSharing:
    """GQA: with `pack`, one program takes the query heads that share a K/V head (up to the decode tile's rows),
    so each K/V tile is loaded once for all of them. Chosen per launch from M and H / HKV."""

    pack: bool
    max_rows: int  # packed heads x query positions per program


@dataclass(frozen=True)
class DecodePlan:
    """The decode / serving kernel (passes/decode.py): small-M launches with the GQA group's query heads packed
    into the rows, the key range split across programs and merged through LSE, ragged and paged storage."""

    tile: TileConfig  # block_m: the most packed rows (query heads x positions) a small-M program takes
    max_splits: int  # split-KV: at most this many programs share one row tile's keys
    min_split_tiles: int  # ... and each takes at least this many key tiles (the merge must pay for itself)
    dense_max_m: int  # dense specs launch here when M <= this and the launch splits its keys; 0: never
    # sm_90 latent attention (MLA): whether the Gluon warpgroup decode kernel runs, its LatentDecodeLayout and why
    # (passes/latent_decode.py); None where the pass did not run
    warpgroups: WarpgroupPlan | None = None


@dataclass(frozen=True)
class TritonOptions:
    """Knobs only the Triton backend reads (the performance work tunes them)."""

    dot_precision: str  # tl.dot input_precision for f32 inputs: "ieee" (exact) or "tf32"
    tma: bool = False
    warp_specialize: bool = False
    # functions with a one-instruction hardware approximation (ops.Op.triton_approx: tanh) run as that instruction
    approx_functions: bool = False


@dataclass(frozen=True)
class WarpgroupLayout:
    """Hopper pipeline staging of the Gluon prefill kernel (FlashAttention-3's design): one producer warp issues
    TMA loads of K and V tiles into a ring of `stages` shared-memory slots, each guarded by a ready and an empty
    mbarrier; `consumers` warpgroups of `consumer_warps` warps take `block_m // consumers` query rows each.
    pingpong: each consumer warpgroup is a partition of its own over its rows, and they take turns at issuing
    MMAs (an mbarrier pair hands the turn over), so one computes weights while the other's MMAs hold the tensor
    cores; parallel: the same partitions without the handoff (the warp schedulers interleave them);
    cooperative: one partition whose two warpgroups share every step.
    overlap: within a consumer, QK^T of tile j+1 and P V of tile j are in flight while the weights of j+1 are
    computed (both MMAs async wgmma); without it each async MMA is waited for at once. With P in registers ptxas
    moves the wait for P V ahead of the weights (SASS, benchmarks/NOTES.md issue 13); weights_under_pv keeps it after.
    persistent: one program per SM, each stepping through work tiles (batch, head, query tile) of a static
    schedule: units of two query tiles of a head (k and the k-th from the end: equal work under a causal mask), dealt
    to the programs in turn, in sections of heads whose K and V fit in L2 (FlashAttention-3's); the ring's phases run
    on across tiles, and the producer loads the next tile's first K and V while the consumers store out."""

    block_m: int  # query rows per program, all consumers together
    block_n: int  # keys per ring slot
    stages: int
    consumers: int
    consumer_warps: int
    schedule: str  # "pingpong" | "parallel" | "cooperative"
    overlap: bool
    # Q's and K's column chunks: QK^T is one async wgmma per chunk, each accumulating onto the last (Tiling.d_chunks
    # where out's tile fits in Q's first chunk, else one chunk of block_d: D padded)
    d_chunks: tuple[int, ...]
    producer_warps: int = 1
    producer_regs: int = 24  # registers per thread after setmaxnreg (the warp only issues TMA)
    consumer_regs: int = 240
    persistent: bool = False
    # persistent only, where shared memory holds it: out leaves through a buffer of its own, not Q's, so a
    # consumer's next Q loads during its epilogue (released after its last QK^T, not after its out store)
    out_buffer: bool = False
    # overlap only (PlanOptions.gluon_weights_under_pv): P V reads P from shared memory (two buffers a consumer), so the
    # wait for P V of tile j-1 moves to the start of tile j+1 and the weights of tile j run under it
    weights_under_pv: bool = False

    @property
    def rows_per_consumer(self) -> int:
        return self.block_m // self.consumers


@dataclass(frozen=True)
class LatentDecodeLayout:
    """Hopper staging of the Gluon MLA decode kernel (FlashMLA's design; passes/latent_decode.py): one producer warp
    TMA-loads each key tile's latent (keys and values at once) in `chunks` column chunks and its rope part (`rope`
    columns) into a ring of `stages` slots; a score warpgroup computes QK^T once per tile over every chunk and the
    rope part for all `block_m` rows, the weights, and hands P and the row rescale to the value warpgroup through
    shared memory; each of the two warpgroups then multiplies P by its half of the latent's columns."""

    block_m: int  # rows per program (query heads of one position): one wgmma M of 64 per warpgroup
    block_n: int  # keys per ring slot
    stages: int
    chunks: tuple[int, ...]  # the latent's column chunks: a TMA box, a QK^T wgmma and a [block_m, chunk] accumulator
    rope: int  # the rope dot's columns (DR padded to a power of two)
    smem: int  # shared bytes the layout counts (ring, Q, P, row scales, barriers)
    # An FP8 latent: the producer lands e4m3 tiles in a ring of fp8_stages slots and a converter warpgroup writes
    # them as q's dtype into the `stages` slots the consumers read (0: no converter, TMA fills those slots)
    fp8_stages: int = 0
    # Quantised queries over an FP8 latent (`quantize q, qr to f8e4m3`): the score warpgroup quantises Q to e4m3 in
    # its shared memory once and runs QK^T as fp8 x fp8 wgmma on the e4m3 slots; the converter converts only the
    # latent's columns, which P V reads
    fp8_queries: bool = False
    consumer_warps: int = 4
    producer_warps: int = 1
    producer_regs: int = 24
    consumer_regs: int = 240
    value_regs: int = 240  # the value warpgroup's (no score tile): less beside a converter
    converter_regs: int = 0  # each converter warpgroup's
    converter_warpgroups: int = 1  # with an FP8 latent: each converts its share of every slot's latent chunks
    converter_vector: int = 16  # e4m3 a converter thread loads and converts at a time (8: conflict-free stores)
    # P V in f16 (P and the converted slots) where q is bf16 and QK^T reads the e4m3 slots (fp8_queries)
    f16_values: bool = False
    # with fp8_queries: QK^T's products summed by the tensor cores in runs of this many, the runs added in float32
    # (Triton's max_num_imprecise_acc); 0: one run over every chunk
    fp8_float32_sum_every: int = 0
    # a program per SM over equal shares of every (sequence, head group)'s key tiles (latent_decode.balanced_shares)
    persistent: bool = False

    @property
    def converter_warps(self) -> int:
        return 4 * self.converter_warpgroups if self.fp8_stages else 0

    @property
    def consumers(self) -> int:
        return 2

    @property
    def value_chunks(self) -> int:
        """Latent chunks (accumulators) per warpgroup: each owns half of DV."""
        return len(self.chunks) // 2


@dataclass(frozen=True)
class WarpgroupPlan:
    """Which forward prefill kernel runs (passes/warpgroups.py): "gluon" (the warpgroup-specialized kernel of
    `layout`) or "triton" (the template), and why. `layout` is set wherever the plan qualifies, also while the
    option leaves the template in charge, so `attnc show --emit plan` shows what the Gluon kernel would run."""

    path: str  # "gluon" | "triton"
    reason: str
    layout: WarpgroupLayout | LatentDecodeLayout | None = None  # the decode kernel's: DecodePlan.warpgroups
    min_length: int = 0  # launches with M or N below this keep the template (and so does the decode regime)


@dataclass(frozen=True)
class KernelLaunch:
    """One compiled kernel a plan may launch: a generated function (`attn_fwd`, `tile_summary` of the prefill
    module; `attn_decode`, `attn_combine`, `attn_combine_scheduled` of the decode module; `attn_fwd_gluon` of the
    Gluon module; `attn_decode_gluon` of the Gluon MLA decode module) and its launch keywords (constexprs, then options:
    num_warps, num_stages or maxnreg) in the order the launcher passes them. The runtime launches only these, and
    an AOT build compiles exactly these."""

    function: str
    launch: tuple[tuple[str, int | bool], ...]

    @property
    def keywords(self) -> dict:
        return dict(self.launch)

    @property
    def module(self) -> str:
        if self.function == "attn_fwd_gluon":
            return "gluon"
        if self.function == "attn_decode_gluon":
            return "gluon_decode"
        return "decode" if self.function in ("attn_decode", "attn_combine", "attn_combine_scheduled") else "prefill"


@dataclass(frozen=True)
class KernelPlan:
    spec: Attention  # with compile-time sizes substituted and constants folded
    spec_key: str  # the key of the spec as written (before folding)
    target: Target
    head_dim: int  # D and DV are compile-time: the tile shapes depend on them
    value_dim: int
    options: PlanOptions = PlanOptions()
    masks: MaskPlan | None = None
    score: ScorePlan | None = None
    tiling: Tiling | None = None
    heads: HeadSharing | None = None
    triton: TritonOptions | None = None
    decode: DecodePlan | None = None
    warpgroups: WarpgroupPlan | None = None
    kernels: tuple[KernelLaunch, ...] = ()  # every kernel a launch of this plan may run (passes/kernels.py)
    value_scale: Expr | None = None  # FP8 values: their dequant scale, per query row (passes/dequant.py)

    @property
    def dtype(self) -> str:
        return self.spec.q.dtype

    def approximated(self) -> list[str]:
        """The score's functions that this plan's Triton kernels run as a hardware approximation (ops.Op.triton_approx
        under TritonOptions.approx_functions): the kernels with the inline-PTX exp2 (the prefill template, the Gluon
        kernels and the backward); the decode template's portable exp2 keeps the formulas."""
        if not (self.triton and self.triton.approx_functions):
            return []
        return sorted({n.fn for n in walk(self.spec.score) if isinstance(n, Call) and op_of(n).triton_approx})

    def __repr__(self) -> str:
        """Kernel keys and AOT manifests compare plans by this text: its expressions are numbered, so that it
        grows with the DAG of the score, not its tree."""
        return linear_repr(self)

    def describe(self) -> str:
        """Readable multi-line text (`attnc show --emit plan`), linear in the expression DAGs: an expression
        too large to write out is a %n listed at the end (ir.Numbering)."""
        numbering = Numbering()
        written = numbering.readable

        def bounds(r: KeyRange) -> str:
            lo = ", ".join(written(e) for e in r.lower) or "-"
            hi = ", ".join(written(e) for e in r.upper) or "-"
            return f"j >= max(0; {lo}), j < min(N; {hi})"

        lines = [f"plan {self.spec.name} [{self.spec_key[:12]}]",
                 f"  target     {self.target.backend} on {self.target.device}"
                 f"{'' if self.target.arch is None else f' sm_{self.target.arch}'}, dtype {self.dtype}, "
                 f"D={self.head_dim} DV={self.value_dim}"]
        if self.masks:
            m = self.masks
            lines += [f"  exact      {bounds(m.exact)}", f"  loop hull  {bounds(m.hull)}"]
            lines += [f"  evaluated  {written(e)}" for e in m.evaluated]
            if m.data_dependent:
                lines.append("  tile summary kernel: yes (data-dependent masks)")
        n = self.spec.normalizer
        lines.append(f"  normalizer {n.name}: weights {n.weight}(s), rows "
                     f"{'normalised' if n.normalized else 'not normalised'}, partial results merge by {n.merge}")
        if self.spec.dequant:
            lines.append("  dequant    " + ", ".join(f"{d.tensor} (FP8) by {d.scale}" for d in self.spec.dequant)
                         + ("" if self.value_scale is None else f"; out rows times {written(self.value_scale)}"))
        if self.spec.quantize:
            lines.append("  quantize   " + ", ".join(f"{d.tensor} rows to {d.dtype}" for d in self.spec.quantize)
                         + " (each row's scale multiplies its scores)")
        if self.score:
            lines.append(f"  logits2    {written(self.score.logits2)}")
            if self.score.sink2 is not None:
                lines.append(f"  sink2      {written(self.score.sink2)}")
        if self.tiling:
            t = self.tiling
            short = f"; M <= {t.short_max_m} {_tile(t.short)}" if t.short else ""
            chunked = (f" (prefill: D in chunks {'+'.join(map(str, t.d_chunks))}, one dot each; decode and backward "
                       f"pad to {t.block_d})") if len(t.d_chunks) > 1 else ""
            lines.append(f"  tiles      BLOCK_D={t.block_d}{chunked} BLOCK_DV={t.block_dv} prefill {_tile(t.prefill)}"
                         f"{short}; decode (M <= {t.decode_max_m}) {_tile(t.decode)}")
        if self.heads:
            lines.append(f"  gqa        pack heads: {self.heads.pack} (up to {self.heads.max_rows} rows)")
        if self.decode:
            d = self.decode
            lines.append(f"  decode     {_tile(d.tile)}; split-KV up to {d.max_splits} splits of >= "
                         f"{d.min_split_tiles} key tiles; dense M <= {d.dense_max_m}")
            if d.warpgroups:
                lines.append(f"  decode wg  {d.warpgroups.path} kernel: {d.warpgroups.reason}")
                if d.warpgroups.layout:
                    lines.append(f"  decode wg  {_latent(d.warpgroups.layout)}")
        if self.triton:
            o = self.triton
            lines.append(f"  triton     f32 dots {o.dot_precision}, tma {o.tma}, warp specialization {o.warp_specialize}"
                         + "".join(f", {fn} by hardware approximation (not in decode kernels)"
                                   for fn in self.approximated()))
        if self.warpgroups:
            w = self.warpgroups
            lines.append(f"  prefill    {w.path} kernel: {w.reason}")
            if w.layout:
                lines.append(f"  warpgroups {_warpgroups(w.layout)}")
        if self.kernels:
            counts: dict[str, int] = {}
            for k in self.kernels:
                counts[k.function] = counts.get(k.function, 0) + 1
            lines.append("  kernels    " + ", ".join(f"{name} x{n}" for name, n in counts.items())
                         + " (launch configs a call may select)")
        return "\n".join(lines) + ("\n" + numbering.listing("  ").rstrip("\n") if numbering.lines else "")


def _warpgroups(w: WarpgroupLayout) -> str:
    overlap = ("QK^T(j+1) and PV(j) async under the weights of j+1" if w.overlap
               else "QK^T and PV async, each waited for at once")
    chunks = f"; QK^T over D's chunks {'+'.join(map(str, w.d_chunks))}" if len(w.d_chunks) > 1 else ""
    return (f"producer {w.producer_warps} warp (TMA, {w.producer_regs} regs) -> ring of {w.stages} K/V stages "
            f"(mbarriers) -> {w.consumers} consumer warpgroup{'s' if w.consumers > 1 else ''} "
            f"x {w.consumer_warps} warps, {w.schedule} ({w.consumer_regs} regs), BM={w.block_m} "
            f"({w.rows_per_consumer} rows each) BN={w.block_n}; {overlap}{chunks}"
            + ("; persistent: a program per SM over the work tiles" if w.persistent else "")
            + (", out through a buffer of its own" if w.out_buffer else ""))


def _latent(w: LatentDecodeLayout) -> str:
    return (f"producer {w.producer_warps} warp (TMA) -> ring of {w.stages} stages of {w.block_n} keys (latent in "
            f"chunks {'+'.join(map(str, w.chunks))}, rope {w.rope}) -> score warpgroup (QK^T once, weights, P to "
            f"shared) + value warpgroup, each P V over {w.value_chunks} chunks; BM={w.block_m}, {w.smem} B shared"
            + (f"; FP8: {w.fp8_stages} e4m3 slots, a converter warpgroup writes the ring" if w.fp8_stages else "")
            + ("; quantised queries: QK^T fp8 x fp8 on the e4m3 slots, the ring holds the latent alone"
               if w.fp8_queries else "")
            + ("; persistent: a program per SM, equal shares of all key tiles, cut sequences merged by "
               "attn_combine_scheduled" if w.persistent else "; a program per (position, head group, split)"))


def _tile(c: TileConfig) -> str:
    return f"BM={c.block_m} BN={c.block_n} warps={c.num_warps} stages={c.num_stages}"
