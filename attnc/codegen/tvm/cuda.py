"""A KernelPlan -> a TensorIR PrimFunc for NVIDIA GPUs: FlashAttention-2 on tensor cores, built with TVM's
IR builder and TVM's `ptx_ldmatrix` / `ptx_mma` builtins (mma.sync m16n8k16, f16 or bf16 in, f32 accumulate).

Work split: one thread block per (query tile, head, batch), heaviest query tiles first (causal rows late in
the sequence have the most keys). Each of the block's warps owns 16 query rows for the whole key loop, so
the online softmax never leaves registers:
- Q is staged through shared memory once and kept as A fragments (ldmatrix).
- Per key tile, K and V are staged in shared memory (rows padded by 8 elements: ldmatrix reads 8 rows of
  16 bytes, and a 16-byte pad puts them in distinct bank groups), S = Q K^T runs on tensor cores with K read
  by ldmatrix (K's rows are already the "col" B operand), P V with V read by ldmatrix.trans.
- A thread holds rows g and g + 8 of its warp's 16 (g = lane / 4), two adjacent columns per 8-wide tile:
  row max and row sum need only the 4 threads of a quad (two xor shuffles). The S accumulators of two
  adjacent 8-key tiles are, element for element, the A fragment of P for the 16-key step of P V.
- The key loop runs over the tiles the mask analysis leaves (the same formula as the CPU kernel); only
  partial tiles evaluate masks.
Q/K/V rows past M or N and padded head-dim columns are staged as zeros, so no garbage meets P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...errors import CompileError
from ...passes import KernelPlan
from .emit import F32, LN2, Emitter, f32
from .gpu import block_key_tiles, build_gpu_primfunc, gpu_schedule, i32, query_tile_grid, sync
from .kernel import TIR_DTYPES, Args, by_tile_kind, logit2

NEG_INF = -math.inf
MMA_TYPES = {"f16": "fp16", "bf16": "bf16"}  # ptx_mma operand type names
WARP = 32
PAD = 8  # elements added to each shared-memory row (module doc)


@dataclass(frozen=True)
class CudaSchedule:
    warps: int  # each owns 16 query rows
    block_n: int  # keys per step; a multiple of 16

    @property
    def block_m(self) -> int:
        return 16 * self.warps

    @property
    def threads(self) -> int:
        return WARP * self.warps


def cuda_schedule(plan: KernelPlan) -> CudaSchedule:
    """Registers bound the tile: a thread keeps D/2 Q values, DV/2 output and block_n/2 score accumulators.
    PlanOptions' num_warps (16 query rows each) and block_n (a multiple of 16) override the default."""
    widest = max(_round16(plan.head_dim), _round16(plan.value_dim))
    warps = plan.options.num_warps or 4
    block_n = plan.options.block_n or (64 if widest <= 128 else 32)
    if warps not in (1, 2, 4, 8) or block_n % 16 or not 16 <= block_n <= 128:
        raise CompileError(f"attention {plan.spec.name!r}: the TVM CUDA kernel takes num_warps in 1, 2, 4, 8 and "
                           f"block_n a multiple of 16 up to 128 (got num_warps={warps}, block_n={block_n})")
    return CudaSchedule(warps=warps, block_n=block_n)


def _round16(x: int) -> int:
    return -(-x // 16) * 16


def build_cuda_kernel(plan: KernelPlan, name: str = "attn"):
    """(schedule, PrimFunc) for CUDA: the tensor-core kernel for f16 / bf16, the plain GPU kernel (gpu.py) for
    the dtypes tensor cores do not take (f32 computes in f32 FMAs)."""
    if plan.dtype in MMA_TYPES:
        sched = cuda_schedule(plan)
        return sched, build_cuda_primfunc(plan, sched, name)
    sched = gpu_schedule(plan)
    return sched, build_gpu_primfunc(plan, sched, name)


def build_cuda_primfunc(plan: KernelPlan, sched: CudaSchedule, name: str = "attn") -> tir.PrimFunc:
    if plan.dtype not in MMA_TYPES:
        raise CompileError(f"attention {plan.spec.name!r}: the TVM CUDA kernel runs on tensor cores, which take "
                           f"f16 or bf16 q/k/v (got {plan.dtype}); build_cuda_kernel runs other dtypes on the "
                           f"plain GPU kernel")
    spec, score = plan.spec, plan.score
    bm, bn, threads = sched.block_m, sched.block_n, sched.threads
    dp, dvp = _round16(plan.head_dim), _round16(plan.value_dim)
    k_stride, v_stride = dp + PAD, dvp + PAD
    v_base = bn * k_stride  # a stage: K then V; two stages (double buffering), Q uses stage 0 before the loop
    stage_elems = v_base + bn * v_stride
    smem_elems = max(bm * k_stride, 2 * stage_elems)
    dtype, mma_type = TIR_DTYPES[plan.dtype], MMA_TYPES[plan.dtype]

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan)
            s = a.sizes
            with query_tile_grid(s, bm, threads) as (b, h, i0, kvh, tx):
                warp = T.Bind(tir.truncdiv(tx, WARP))
                lane = T.Bind(tir.truncmod(tx, WARP))
                g, t = T.Bind(tir.truncdiv(lane, 4)), T.Bind(tir.truncmod(lane, 4))
                row0 = T.Bind(i0 + warp * 16 + g)  # this thread's rows: row0 and row0 + 8

                smem = T.alloc_buffer((smem_elems,), dtype, scope="shared.dyn")  # > 48 KiB: dynamic
                q_frag = T.alloc_buffer((dp // 16 * 8,), dtype, scope="local")
                b_frag = T.alloc_buffer((8,), dtype, scope="local")  # ldmatrix.x4: 4 registers of 2 elements
                acc_s = T.alloc_buffer((bn // 8 * 4,), F32, scope="local")
                p_frag = T.alloc_buffer((bn // 8 * 4,), dtype, scope="local")
                acc_o = T.alloc_buffer((dvp // 8 * 4,), F32, scope="local")
                m_run, l_run = T.alloc_buffer((2,), F32, scope="local"), T.alloc_buffer((2,), F32, scope="local")
                m_new, safe = T.alloc_buffer((2,), F32, scope="local"), T.alloc_buffer((2,), F32, scope="local")
                alpha = T.alloc_buffer((2,), F32, scope="local")

                def scope(index, qk=None):
                    return a.scope({"b": b, "h": h, **index}, qk)

                t_start, f_start, f_end, t_end = block_key_tiles(plan, a, b, h, i0, tx, bm, bn)

                # -- Q fragments, and the running max / sum / output
                _stage(smem, 0, k_stride, bm, plan.head_dim, dp, threads, tx, a.q, lambda r: (b, h, i0 + r),
                       s["M"], i0)
                _commit_async()
                _wait_async(0)
                sync()
                for kd in range(dp // 16):
                    _ldmatrix(q_frag, kd * 8, smem, (warp * 16 + tir.truncmod(lane, 16)) * k_stride + kd * 16
                              + tir.truncdiv(lane, 16) * 8, trans=False)
                with T.unroll(0, dvp // 8 * 4) as e:
                    T.buffer_store(acc_o, f32(0), [e])
                for r in _lanes(2):
                    if score.sink2 is None:
                        T.buffer_store(m_run, f32(NEG_INF), [r])
                        T.buffer_store(l_run, f32(0), [r])
                    else:  # the sink starts the row (counted once per quad: the quad's sums are added at the end)
                        sink = T.Bind(Emitter(spec, scope({"i": row0 + 8 * r}), True).float(score.sink2))
                        T.buffer_store(m_run, sink, [r])
                        T.buffer_store(l_run, tir.Select(tir.And(t == 0, sink != f32(NEG_INF)), f32(1), f32(0)),
                                       [r])

                def stage_kv(tile, into):
                    """Start copying key tile `tile` into stage `into` (cp.async: it lands while we compute)."""
                    j_first = tile * bn
                    _stage(smem, into * stage_elems, k_stride, bn, plan.head_dim, dp, threads, tx, a.k,
                           lambda r: (b, kvh, j_first + r), s["N"], j_first)
                    _stage(smem, into * stage_elems + v_base, v_stride, bn, plan.value_dim, dvp, threads, tx, a.v,
                           lambda r: (b, kvh, j_first + r), s["N"], j_first)
                    _commit_async()

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
                    k_at, v_at = T.Bind(cur * stage_elems), T.Bind(cur * stage_elems + v_base)
                    with T.unroll(0, bn // 8 * 4) as e:
                        T.buffer_store(acc_s, f32(0), [e])
                    for kd in range(dp // 16):
                        for n16 in range(bn // 16):
                            key = n16 * 16 + tir.truncdiv(lane, 16) * 8 + tir.truncmod(lane, 8)
                            col = kd * 16 + tir.truncmod(tir.truncdiv(lane, 8), 2) * 8
                            _ldmatrix(b_frag, 0, smem, k_at + key * k_stride + col, trans=False)
                            _mma(mma_type, q_frag, kd * 8, b_frag, 0, acc_s, 2 * n16 * 4)
                            _mma(mma_type, q_frag, kd * 8, b_frag, 4, acc_s, (2 * n16 + 1) * 4)

                    def logits(masked: bool):
                        with T.unroll(0, bn // 8) as nt:
                            with T.unroll(0, 4) as c:
                                e = nt * 4 + c
                                j = j0 + nt * 8 + t * 2 + tir.truncmod(c, 2)
                                em = Emitter(spec, scope({"i": row0 + tir.truncdiv(c, 2) * 8, "j": j}, acc_s[e]), True)
                                T.buffer_store(acc_s, logit2(plan, em, j, masked), [e])

                    by_tile_kind(plan, kt, f_start, f_end, logits)

                    # -- online softmax: m_run stays -inf while a row has kept nothing; `safe` avoids -inf - -inf
                    for r in _lanes(2):
                        T.buffer_store(m_new, m_run[r], [r])
                    with T.unroll(0, bn // 8) as nt:
                        with T.unroll(0, 4) as c:
                            r = tir.truncdiv(c, 2)
                            T.buffer_store(m_new, tir.max(m_new[r], acc_s[nt * 4 + c]), [r])
                    for r in _lanes(2):
                        for mask in (1, 2):
                            T.buffer_store(m_new, tir.max(m_new[r], _shfl_xor(m_new[r], mask)), [r])
                        T.buffer_store(safe, tir.Select(m_new[r] == f32(NEG_INF), f32(0), m_new[r]), [r])
                        T.buffer_store(alpha, tir.exp2(m_run[r] - safe[r]), [r])
                        T.buffer_store(m_run, m_new[r], [r])
                        T.buffer_store(l_run, l_run[r] * alpha[r], [r])
                    with T.unroll(0, dvp // 8) as nt:
                        with T.unroll(0, 4) as c:
                            T.buffer_store(acc_o, acc_o[nt * 4 + c] * alpha[tir.truncdiv(c, 2)], [nt * 4 + c])
                    with T.unroll(0, bn // 8) as nt:
                        with T.unroll(0, 4) as c:
                            r = tir.truncdiv(c, 2)
                            p = tir.exp2(acc_s[nt * 4 + c] - safe[r])
                            T.buffer_store(acc_s, p, [nt * 4 + c])
                            T.buffer_store(l_run, l_run[r] + acc_s[nt * 4 + c], [r])
                            T.buffer_store(p_frag, tir.Cast(dtype, acc_s[nt * 4 + c]), [nt * 4 + c])

                    for k16 in range(bn // 16):
                        for n16 in range(dvp // 16):
                            key = k16 * 16 + tir.truncmod(tir.truncdiv(lane, 8), 2) * 8 + tir.truncmod(lane, 8)
                            col = n16 * 16 + tir.truncdiv(lane, 16) * 8
                            _ldmatrix(b_frag, 0, smem, v_at + key * v_stride + col, trans=True)
                            _mma(mma_type, p_frag, k16 * 8, b_frag, 0, acc_o, 2 * n16 * 4)
                            _mma(mma_type, p_frag, k16 * 8, b_frag, 4, acc_o, (2 * n16 + 1) * 4)
                    sync()  # this stage is read: the next step may stage into it

                # -- out = acc / l (0 for a row with nothing kept), lse = (m + log2 l) ln 2
                for r in _lanes(2):
                    for mask in (1, 2):
                        T.buffer_store(l_run, l_run[r] + _shfl_xor(l_run[r], mask), [r])
                    row = row0 + 8 * r
                    with T.If(row < s["M"]):
                        with T.Then():
                            inv = T.Bind(tir.Select(l_run[r] > f32(0), f32(1) / l_run[r], f32(0)))
                            _store_row(a.out, acc_o, inv, b, h, row, r, t, plan.value_dim)
                            if a.lse is not None:
                                with T.If(t == 0):
                                    with T.Then():
                                        lse = tir.Select(l_run[r] > f32(0),
                                                         (m_run[r] + tir.log2(l_run[r])) * f32(LN2), f32(NEG_INF))
                                        T.buffer_store(a.lse, lse, [b, h, row])
    return ib.get()


def _store_row(out, acc_o, inv, b, h, row, r: int, t, width: int) -> None:
    """This thread's two adjacent columns of each 8-wide tile of row `row`."""
    with T.unroll(0, -(-width // 8)) as nt:
        for e in range(2):
            col = nt * 8 + t * 2 + e
            value = tir.Cast(out.dtype, acc_o[nt * 4 + r * 2 + e] * inv)
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
