"""A KernelPlan -> a TensorIR PrimFunc for NVIDIA GPUs: FlashAttention-2 on tensor cores, built with TVM's
IR builder and TVM's `ptx_ldmatrix` / `ptx_mma` builtins (mma.sync m16n8k16, f16 or bf16 in, f32 accumulate).

Work split: one thread block per (query tile, head, batch), heaviest query tiles first (causal rows late in
the sequence have the most keys). Each of the block's warps owns 16 or 32 query rows (one or two m16 row
blocks) for the whole key loop, so the normalizer's running state (normalize.py) never leaves registers:
- Q is staged through shared memory once and kept as A fragments (ldmatrix), or, when registers are short,
  left in shared memory and re-read per 16-wide step of the head dim.
- Per key tile, K and V are staged in shared memory (rows padded by 8 elements: ldmatrix reads 8 rows of
  16 bytes, and a 16-byte pad puts them in distinct bank groups), double-buffered with cp.async, S = Q K^T
  runs on tensor cores with K read by ldmatrix (K's rows are already the "col" B operand), P V with V read by
  ldmatrix.trans. With two row blocks each K / V fragment feeds four mma.sync instead of two (FA2's split).
- A thread holds rows g and g + 8 of each of its warp's row blocks (g = lane / 4), two adjacent columns per
  8-wide tile: row max and row sum need only the 4 threads of a quad (two xor shuffles). The S accumulators
  of two adjacent 8-key tiles are, element for element, the A fragment of P for the 16-key step of P V.
- The key loop runs over the tiles the mask analysis leaves (the same formula as the CPU kernel); only
  partial tiles evaluate masks. When the score is c * qk, the scale can be folded into the exponent
  (exp2(c s - c m) as one FMA on the raw scores, as FA2 does) instead of scaling every score first.
Q/K/V rows past M or N and padded head-dim columns are staged as zeros, so no garbage meets P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...errors import CompileError
from ...ir import QK, Binary, Num
from ...passes import KernelPlan
from .emit import F32, Emitter, f32, registers
from .gpu import block_key_tiles, build_gpu_primfunc, gpu_schedule, i32, query_tile_grid, sync
from .kernel import TIR_DTYPES, Args, by_tile_kind, logit2
from .normalize import lower as lower_normalizer

NEG_INF = -math.inf
MMA_TYPES = {"f16": "fp16", "bf16": "bf16"}  # ptx_mma operand type names
WARP = 32
PAD = 8  # elements added to each shared-memory row (module doc)
# m16 row blocks per warp when PlanOptions.block_m does not say (head dims up to 128; wider takes 1). 2 is FA2's
# split: on the H100 (benchmarks/tvm_cuda_check.py, causal bf16 D=128) 4 warps x 32 rows with block_n 32 ran at
# 217 TFLOP/s against 211 for 16 rows with block_n 64 (and 183 for 32 rows with block_n 64, which spills).
DEFAULT_ROW_BLOCKS = 2
# Registers (of 255) the fragments and accumulators may take before Q moves to shared memory: ptxas adds
# ~90 for addresses, the running max / sum and the staging loops (236 in all at 4 warps, D=128, block_n=64).
FRAGMENT_REGISTERS = 160


@dataclass(frozen=True)
class CudaSchedule:
    warps: int
    block_n: int  # keys per step; a multiple of 16
    row_blocks: int = 1  # m16 row blocks per warp: 2 uses each K / V fragment for two row blocks
    q_in_registers: bool = True  # else Q's A fragments are re-read from shared memory at every key tile
    fold_scale: bool = False  # score = c * qk: exp2(c s - c m) as one FMA on raw scores

    @property
    def rows_per_warp(self) -> int:
        return 16 * self.row_blocks

    @property
    def block_m(self) -> int:
        return self.rows_per_warp * self.warps

    @property
    def threads(self) -> int:
        return WARP * self.warps


def cuda_schedule(plan: KernelPlan) -> CudaSchedule:
    """PlanOptions' num_warps (default 4), block_m (16 or 32 rows per warp; default DEFAULT_ROW_BLOCKS x 16)
    and block_n (a multiple of 16) override the defaults. Q stays in registers when the fragments fit
    (fragment_registers); the scale folds into the exponent when the score is c * qk."""
    widest = max(_round16(plan.head_dim), _round16(plan.value_dim))
    options = plan.options
    warps = options.num_warps or 4
    block_m = options.block_m or 16 * (DEFAULT_ROW_BLOCKS if widest <= 128 else 1) * warps
    rows, rest = divmod(block_m, warps)
    # block_n 32 at 32 rows per warp: at 64 the accumulators spill (ptxas, D=128); 16 rows per warp take 64
    block_n = options.block_n or (64 if widest <= 128 and rows == 16 else 32)
    if warps not in (1, 2, 4, 8) or block_n % 16 or not 16 <= block_n <= 128 or rest or rows not in (16, 32):
        raise CompileError(f"attention {plan.spec.name!r}: the TVM CUDA kernel takes num_warps in 1, 2, 4, 8, "
                           f"block_m of 16 or 32 rows per warp and block_n a multiple of 16 up to 128 (got "
                           f"num_warps={warps}, block_m={block_m}, block_n={block_n})")
    sched = CudaSchedule(warps=warps, block_n=block_n, row_blocks=rows // 16,
                         fold_scale=score_scale(plan) is not None)
    return replace(sched, q_in_registers=fragment_registers(plan, sched) <= FRAGMENT_REGISTERS)


def fragment_registers(plan: KernelPlan, sched: CudaSchedule) -> int:
    """32-bit registers a thread's Q fragments, output and score accumulators and P take (module doc)."""
    q = _round16(plan.head_dim) // 16 * 4
    out = _round16(plan.value_dim) // 8 * 4
    scores = sched.block_n // 8 * 4
    return sched.row_blocks * (q + out + scores + scores // 2)


def score_scale(plan: KernelPlan) -> float | None:
    """c where the base-2 logit is c * qk with c > 0 (max and scale commute), else None."""
    e = plan.score.logits2
    if e == QK():
        return 1.0
    if isinstance(e, Binary) and e.op == "*":
        for x, c in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
            if x == QK() and isinstance(c, Num) and c.value > 0:
                return float(c.value)
    return None


def _round16(x: int) -> int:
    return -(-x // 16) * 16


def kernel_schedule(plan: KernelPlan, schedule: CudaSchedule | None = None):
    """The schedule build_cuda_kernel uses: `schedule` (default cuda_schedule(plan)) for the tensor-core kernel of
    f16 / bf16, gpu_schedule(plan) for the plain GPU kernel of the dtypes tensor cores do not take."""
    return (schedule or cuda_schedule(plan)) if plan.dtype in MMA_TYPES else gpu_schedule(plan)


def build_cuda_kernel(plan: KernelPlan, name: str = "attn", schedule: CudaSchedule | None = None):
    """(schedule, PrimFunc) for CUDA: the tensor-core kernel for f16 / bf16, the plain GPU kernel (gpu.py)
    otherwise (f32 computes in f32 FMAs); the schedule is kernel_schedule(plan, schedule)."""
    sched = kernel_schedule(plan, schedule)
    build = build_cuda_primfunc if plan.dtype in MMA_TYPES else build_gpu_primfunc
    return sched, build(plan, sched, name)


def build_cuda_primfunc(plan: KernelPlan, sched: CudaSchedule, name: str = "attn") -> tir.PrimFunc:
    if plan.dtype not in MMA_TYPES:
        raise CompileError(f"attention {plan.spec.name!r}: the TVM CUDA kernel runs on tensor cores, which take "
                           f"f16 or bf16 q/k/v (got {plan.dtype}); build_cuda_kernel runs other dtypes on the "
                           f"plain GPU kernel")
    scale = score_scale(plan) if sched.fold_scale else None
    if sched.fold_scale and scale is None:
        raise CompileError(f"attention {plan.spec.name!r}: fold_scale needs a score of the form c * qk with c > 0 "
                           f"(got {plan.score.logits2}); build with fold_scale=False")
    # With the scale folded, scores stay raw: running max and masks work on qk, exp2 takes c * (s - m).
    logit_plan = plan if scale is None else replace(plan, score=replace(plan.score, logits2=QK()))

    def scaled(x):
        return x if scale is None else x * f32(scale)

    spec, sink2 = plan.spec, plan.score.sink2
    norm = lower_normalizer(spec.normalizer)
    rb, bn, threads = sched.row_blocks, sched.block_n, sched.threads
    bm, rows_per_warp = sched.block_m, sched.rows_per_warp
    dp, dvp = _round16(plan.head_dim), _round16(plan.value_dim)
    k_stride, v_stride = dp + PAD, dvp + PAD
    # Per row block: a thread's Q fragments, S accumulators (= P's A fragments) and output accumulators.
    q_block, s_block, o_block = dp // 16 * 8, bn // 8 * 4, dvp // 8 * 4
    # Shared memory: [Q (when it stays there)] then two K/V stages (double buffering), each K then V; Q in
    # registers is staged through stage 0 before the loop.
    q_elems = bm * k_stride
    kv_base = 0 if sched.q_in_registers else q_elems
    v_base = bn * k_stride
    stage_elems = v_base + bn * v_stride
    smem_elems = max(q_elems, 2 * stage_elems) if sched.q_in_registers else q_elems + 2 * stage_elems
    dtype, mma_type = TIR_DTYPES[plan.dtype], MMA_TYPES[plan.dtype]

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan)
            s = a.sizes
            with query_tile_grid(s, bm, threads) as (b, h, i0, kvh, tx), registers("local"):
                warp = T.Bind(tir.truncdiv(tx, WARP))
                lane = T.Bind(tir.truncmod(tx, WARP))
                g, t = T.Bind(tir.truncdiv(lane, 4)), T.Bind(tir.truncmod(lane, 4))
                warp_row = T.Bind(warp * rows_per_warp)  # the warp's first row in the tile
                row0 = T.Bind(i0 + warp_row + g)  # this thread's rows: row0 + 16 mb + 8 r (row index 2 mb + r)

                smem = T.alloc_buffer((smem_elems,), dtype, scope="shared.dyn")  # > 48 KiB: dynamic
                q_frag = T.alloc_buffer((rb * (q_block if sched.q_in_registers else 8),), dtype, scope="local")
                b_frag = T.alloc_buffer((8,), dtype, scope="local")  # ldmatrix.x4: 4 registers of 2 elements
                acc_s = T.alloc_buffer((rb * s_block,), F32, scope="local")
                p_frag = T.alloc_buffer((rb * s_block,), dtype, scope="local")
                acc_o = T.alloc_buffer((rb * o_block,), F32, scope="local")
                m_run, l_run, m_new, safe, alpha = (T.alloc_buffer((2 * rb,), F32, scope="local")
                                                    for _ in range(5))
                thread_rows = _lanes(2 * rb)

                def row_of(mb: int, half):  # the query row of row index 2 mb + half (half: 0, 1 or an expression)
                    return row0 + mb * 16 + half * 8

                def scope(index, qk=None):
                    return a.scope({"b": b, "h": h, **index}, qk)

                def q_fragments(kd: int, at: int) -> None:
                    """Q's A fragments of head-dim step kd for every row block, into q_frag[at + 8 mb:]."""
                    for mb in range(rb):
                        _ldmatrix(q_frag, at + mb * (q_block if sched.q_in_registers else 8), smem,
                                  (warp_row + mb * 16 + tir.truncmod(lane, 16)) * k_stride + kd * 16
                                  + tir.truncdiv(lane, 16) * 8, trans=False)

                t_start, f_start, f_end, t_end = block_key_tiles(plan, a, b, h, i0, tx, bm, bn)

                # -- Q, and the running max / sum / output
                _stage(smem, 0, k_stride, bm, plan.head_dim, dp, threads, tx, a.q, lambda r: (b, h, i0 + r),
                       s["M"], i0)
                _commit_async()  # with Q in shared memory the key loop's first wait covers this group too
                if sched.q_in_registers:
                    _wait_async(0)
                    sync()
                    for kd in range(dp // 16):
                        q_fragments(kd, kd * 8)
                with T.unroll(0, rb * o_block) as e:
                    T.buffer_store(acc_o, f32(0), [e])
                for r in thread_rows:
                    if sink2 is None:
                        T.buffer_store(m_run, f32(NEG_INF), [r])
                        T.buffer_store(l_run, f32(0), [r])
                    else:  # the sink starts the row (counted once per quad: the quad's sums are added at the end)
                        sink = T.Bind(Emitter(spec, scope({"i": row_of(r.value // 2, r.value % 2)}), True)
                                      .float(sink2))
                        T.buffer_store(m_run, sink if scale is None else sink * f32(1 / scale), [r])
                        T.buffer_store(l_run, tir.Select(tir.And(t == 0, sink != f32(NEG_INF)), f32(1), f32(0)),
                                       [r])

                def stage_kv(tile, into):
                    """Start copying key tile `tile` into stage `into` (cp.async: it lands while we compute)."""
                    j_first = tile * bn
                    at = kv_base + into * stage_elems
                    _stage(smem, at, k_stride, bn, plan.head_dim, dp, threads, tx, a.k,
                           lambda r: (b, kvh, j_first + r), s["N"], j_first)
                    _stage(smem, at + v_base, v_stride, bn, plan.value_dim, dvp, threads, tx, a.v,
                           lambda r: (b, kvh, j_first + r), s["N"], j_first)
                    _commit_async()

                if sched.q_in_registers:
                    sync()  # every warp holds its Q fragments: stage 0 may be overwritten
                with T.If(t_start < t_end):
                    with T.Then():
                        stage_kv(t_start, 0)
                with T.serial(t_start, t_end) as kt:
                    j0 = T.Bind(kt * bn)
                    cur = T.Bind(tir.truncmod(kt - t_start, 2))
                    with T.If(kt + 1 < t_end):
                        with T.Then():
                            stage_kv(kt + 1, 1 - cur)
                            _wait_async(1)  # all but the newest group: tile kt has landed
                        with T.Else():
                            _wait_async(0)
                    sync()
                    k_at = T.Bind(kv_base + cur * stage_elems)
                    v_at = T.Bind(k_at + v_base)
                    with T.unroll(0, rb * s_block) as e:
                        T.buffer_store(acc_s, f32(0), [e])
                    for kd in range(dp // 16):
                        if not sched.q_in_registers:
                            q_fragments(kd, 0)
                        for n16 in range(bn // 16):
                            key = n16 * 16 + tir.truncdiv(lane, 16) * 8 + tir.truncmod(lane, 8)
                            col = kd * 16 + tir.truncmod(tir.truncdiv(lane, 8), 2) * 8
                            _ldmatrix(b_frag, 0, smem, k_at + key * k_stride + col, trans=False)
                            for mb in range(rb):
                                q_at = mb * q_block + kd * 8 if sched.q_in_registers else mb * 8
                                for half in range(2):
                                    _mma(mma_type, q_frag, q_at, b_frag, 4 * half, acc_s,
                                         mb * s_block + (2 * n16 + half) * 4)

                    def logits(masked: bool):
                        if scale is not None and not masked:
                            return  # raw scores need no work on full tiles
                        with T.unroll(0, bn // 8) as nt:
                            with T.unroll(0, 4) as c:
                                j = j0 + nt * 8 + t * 2 + tir.truncmod(c, 2)
                                for mb in range(rb):
                                    e = mb * s_block + nt * 4 + c
                                    i = row_of(mb, tir.truncdiv(c, 2))
                                    em = Emitter(spec, scope({"i": i, "j": j}, acc_s[e]), True)
                                    T.buffer_store(acc_s, logit2(logit_plan, em, j, masked), [e])

                    by_tile_kind(plan, kt, f_start, f_end, logits)

                    if norm.running_max:
                        # -- the running max: m_run stays -inf while a row has kept nothing; `safe` avoids -inf - -inf
                        for r in thread_rows:
                            T.buffer_store(m_new, m_run[r], [r])
                        with T.unroll(0, bn // 8) as nt:
                            with T.unroll(0, 4) as c:
                                for mb in range(rb):
                                    r = 2 * mb + tir.truncdiv(c, 2)
                                    T.buffer_store(m_new, tir.max(m_new[r], acc_s[mb * s_block + nt * 4 + c]), [r])
                        for r in thread_rows:
                            for mask in (1, 2):
                                T.buffer_store(m_new, tir.max(m_new[r], _shfl_xor(m_new[r], mask)), [r])
                            T.buffer_store(safe, scaled(tir.Select(m_new[r] == f32(NEG_INF), f32(0), m_new[r])), [r])
                            T.buffer_store(alpha, tir.exp2(scaled(m_run[r]) - safe[r]), [r])
                            T.buffer_store(m_run, m_new[r], [r])
                            T.buffer_store(l_run, l_run[r] * alpha[r], [r])
                        with T.unroll(0, dvp // 8) as nt:
                            with T.unroll(0, 4) as c:
                                for mb in range(rb):
                                    e = mb * o_block + nt * 4 + c
                                    T.buffer_store(acc_o, acc_o[e] * alpha[2 * mb + tir.truncdiv(c, 2)], [e])
                    with T.unroll(0, bn // 8) as nt:
                        with T.unroll(0, 4) as c:
                            for mb in range(rb):
                                e = mb * s_block + nt * 4 + c
                                r = 2 * mb + tir.truncdiv(c, 2)
                                T.buffer_store(acc_s, norm.weight(scaled(acc_s[e]), safe[r], True), [e])
                                T.buffer_store(l_run, l_run[r] + acc_s[e], [r])
                                T.buffer_store(p_frag, tir.Cast(dtype, acc_s[e]), [e])

                    for k16 in range(bn // 16):
                        for n16 in range(dvp // 16):
                            key = k16 * 16 + tir.truncmod(tir.truncdiv(lane, 8), 2) * 8 + tir.truncmod(lane, 8)
                            col = n16 * 16 + tir.truncdiv(lane, 16) * 8
                            _ldmatrix(b_frag, 0, smem, v_at + key * v_stride + col, trans=True)
                            for mb in range(rb):
                                for half in range(2):
                                    _mma(mma_type, p_frag, mb * s_block + k16 * 8, b_frag, 4 * half, acc_o,
                                         mb * o_block + (2 * n16 + half) * 4)
                    sync()  # this stage is read: the next step may stage into it
                if not sched.q_in_registers:
                    _wait_async(0)  # a block that ran no key tile must not exit while Q's copy is landing

                # -- out = acc scaled as the normalizer says (0 for a row with nothing kept), lse from c m and l
                for r in thread_rows:
                    for mask in (1, 2):
                        T.buffer_store(l_run, l_run[r] + _shfl_xor(l_run[r], mask), [r])
                    mb, half = divmod(r.value, 2)
                    row = row_of(mb, half)
                    with T.If(row < s["M"]):
                        with T.Then():
                            inv = T.Bind(norm.out_scale(l_run[r]))
                            _store_row(a.out, acc_o, mb * o_block, inv, b, h, row, half, t, plan.value_dim)
                            if a.lse is not None:
                                with T.If(t == 0):
                                    with T.Then():
                                        T.buffer_store(a.lse, norm.lse(scaled(m_run[r]), l_run[r]), [b, h, row])
    return ib.get()


def _store_row(out, acc_o, at: int, inv, b, h, row, r: int, t, width: int) -> None:
    """This thread's two adjacent columns of each 8-wide tile of row `row` (row r of the row block whose
    accumulators start at acc_o[at])."""
    with T.unroll(0, -(-width // 8)) as nt:
        for e in range(2):
            col = nt * 8 + t * 2 + e
            value = tir.Cast(out.dtype, acc_o[at + nt * 4 + r * 2 + e] * inv)
            if width % 8:
                with T.If(col < width):
                    with T.Then():
                        T.buffer_store(out, value, [b, h, row, col])
            else:
                T.buffer_store(out, value, [b, h, row, col])


def _stage(smem, base, stride: int, rows: int, width: int, width_padded: int, threads: int, tx, tensor,
           index, extent, first) -> None:
    """smem[base + r * stride + c] = tensor[*index(r), c] for rows r of a rows x width_padded tile, zero for
    rows first + r >= extent and columns c >= width. Each thread moves 8 consecutive elements per step: one
    16-byte cp.async when width % 8 == 0 (zero-filled through its source size; the caller commits and waits;
    the launcher guarantees 16-byte aligned rows), else element by element."""
    chunks_per_row = width_padded // 8
    chunks = rows * chunks_per_row
    with T.serial(0, -(-chunks // threads)) as step:
        chunk = step * threads + tx
        r, c8 = tir.truncdiv(chunk, chunks_per_row), tir.truncmod(chunk, chunks_per_row) * 8
        ok = first + r < extent
        at = base + r * stride + c8

        def copy():
            if width % 8 == 0:
                inside = tir.And(ok, c8 < width)
                src = tensor.access_ptr("r", offset=_offset(tensor, (*index(tir.min(r, extent - 1 - first)),
                                                                      tir.min(c8, width - 8))))
                size = tir.Cast("uint32", tir.Select(inside, 16, 0))
                T.evaluate(T.ptx["cp.async.cg.shared.global"](smem.access_ptr("w", offset=at), src, 16, size))
            else:
                with T.serial(0, 8) as e:
                    with T.If(tir.And(ok, c8 + e < width)):
                        with T.Then():
                            T.buffer_store(smem, tensor[(*index(r), c8 + e)], [at + e])
                        with T.Else():
                            T.buffer_store(smem, tir.const(0, smem.dtype), [at + e])

        if chunks % threads:
            with T.If(chunk < chunks):
                with T.Then():
                    copy()
        else:
            copy()


def _offset(buffer, indices):
    """The element offset of buffer[indices] (strided)."""
    return sum((i * st for i, st in zip(indices[1:], buffer.strides[1:])), indices[0] * buffer.strides[0])


def _commit_async() -> None:
    T.evaluate(T.ptx["cp.async.commit_group"]())


def _wait_async(pending: int) -> None:
    T.evaluate(T.ptx["cp.async.wait_group"](pending))


def _lanes(n: int):
    return [i32(x) for x in range(n)]


def _shfl_xor(value, lane_mask: int):  # float32 values only
    return tir.call_intrin(F32, "tirx.tvm_warp_shuffle_xor", tir.const(0xFFFFFFFF, "uint32"), value,
                           lane_mask, WARP, WARP)


def _ldmatrix(frag, frag_offset, smem, smem_offset, trans: bool) -> None:
    """Four 8x8 b16 matrices from shared memory into `frag` (lane l gives the row address of matrix l / 8)."""
    T.evaluate(T.ptx_legacy.ldmatrix(trans, 4, ".b16", frag.data, frag_offset, smem.access_ptr("r"), smem_offset,
                                     dtype=smem.dtype))


def _mma(mma_type: str, a, a_offset, b, b_offset, c, c_offset) -> None:
    """c[c_offset:+4] += A (16x16, row) B (16x8, col): one m16n8k16 tensor-core step of the warp. Offsets count
    elements: A is 8 (4 registers), B 4 (2 registers), C 4 f32 values per thread."""
    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", mma_type, mma_type, "fp32", a.data, a_offset, b.data,
                                b_offset, c.data, c_offset, False, dtype=F32))
