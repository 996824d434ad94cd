"""A KernelPlan -> a TensorIR PrimFunc for any GPU TVM generates code for (Metal, ROCm, OpenCL, WebGPU, and
CUDA for f32): plain FlashAttention-2 without tensor cores, built with TVM's IR builder.

The tensor-core kernel (cuda.py) uses PTX-only instructions (mma.sync, ldmatrix, cp.async); this one needs
only what every GPU backend has: a grid of thread blocks, shared (threadgroup / LDS / workgroup) memory and
barriers. One thread block per (query tile, head, batch), heaviest query tiles first; each thread owns one
query row for the whole key loop, so the normalizer's running state stays in the thread's registers with no
shuffles:
- per key tile the block stages K and V in shared memory as float32 (each thread copies a strided share),
- each thread computes its row's scores against the staged keys, its running max / sum and output row,
- the key loop runs over the tiles the mask analysis leaves (the same formula as the CPU and CUDA kernels);
  only partial tiles evaluate masks.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...passes import KernelPlan
from .emit import F32, I64, Emitter, f32, registers
from .kernel import Args, by_tile_kind, init_bounds, key_tiles, logit2, reduce_bounds, row_bounds
from .normalize import lower as lower_normalizer

NEG_INF = -math.inf
# Bytes of the staged K + V tile: half of Metal's 32 KiB of threadgroup memory, so two blocks fit per core.
SHARED_BUDGET = 16 * 1024


@dataclass(frozen=True)
class GpuSchedule:
    threads: int  # query rows per block: one row per thread
    block_n: int  # keys per staged tile


def gpu_schedule(plan: KernelPlan) -> GpuSchedule:
    per_key = 4 * (plan.head_dim + plan.value_dim)
    block_n = 64
    while block_n > 1 and block_n * per_key > SHARED_BUDGET:
        block_n //= 2
    return GpuSchedule(threads=64, block_n=block_n)


@contextmanager
def query_tile_grid(s: dict, block_m: int, threads: int):
    """The launch of both GPU kernels: a thread block per (batch, head, query tile of `block_m` rows), the last
    query tiles (the longest causal rows) first. Yields (b, h, first row i0, K/V head, thread index)."""
    q_tiles = tir.floordiv(s["M"] + block_m - 1, block_m)
    bz, by, bx, tx = (T.env_thread(t) for t in ("blockIdx.z", "blockIdx.y", "blockIdx.x", "threadIdx.x"))
    with T.launch_thread(bz, s["B"]), T.launch_thread(by, s["H"]), T.launch_thread(bx, q_tiles), \
            T.launch_thread(tx, threads):
        i0 = T.Bind((q_tiles - 1 - bx) * block_m)
        kvh = T.Bind(tir.truncdiv(by, tir.truncdiv(s["H"], s["HKV"])))
        yield bz, by, i0, kvh, tx


def build_gpu_primfunc(plan: KernelPlan, sched: GpuSchedule, name: str = "attn") -> tir.PrimFunc:
    spec, score = plan.spec, plan.score
    norm = lower_normalizer(spec.normalizer)
    bm, bn = sched.threads, sched.block_n
    d_model, dv_model = plan.head_dim, plan.value_dim
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan)
            s = a.sizes
            with query_tile_grid(s, bm, bm) as (b, h, i0, kvh, tx), registers("local"):
                row = T.Bind(i0 + tx)  # rows past M run along (they stage and sync) but store nothing
                k_tile = T.alloc_buffer((bn * d_model,), F32, scope="shared")
                v_tile = T.alloc_buffer((bn * dv_model,), F32, scope="shared")
                q_row = T.alloc_buffer((d_model,), F32, scope="local")
                acc = T.alloc_buffer((dv_model,), F32, scope="local")
                s_row = T.alloc_buffer((bn,), F32, scope="local")
                m_run, l_run, m_new, m_safe, alpha = (T.alloc_buffer((1,), F32, scope="local") for _ in range(5))
                at = i32(0)

                t_start, f_start, f_end, t_end = block_key_tiles(plan, a, b, h, i0, tx, bm, bn)

                with T.serial(0, d_model) as c:
                    T.buffer_store(q_row, tir.Cast(F32, a.q[b, h, tir.min(row, s["M"] - 1), c]), [c])
                with T.serial(0, dv_model) as c:
                    T.buffer_store(acc, f32(0), [c])
                if score.sink2 is None:
                    T.buffer_store(m_run, f32(NEG_INF), [at])
                    T.buffer_store(l_run, f32(0), [at])
                else:  # the sink starts the row: max = sink, sum = exp2(sink - sink)
                    sink = T.Bind(Emitter(spec, a.scope({"b": b, "h": h, "i": row}), True).float(score.sink2))
                    T.buffer_store(m_run, sink, [at])
                    T.buffer_store(l_run, tir.Select(sink == f32(NEG_INF), f32(0), f32(1)), [at])

                with T.serial(t_start, t_end) as kt:
                    j0 = T.Bind(kt * bn)
                    sync()  # every thread is done with the previous tile
                    _stage(k_tile, a.k, (b, kvh), j0, bn, d_model, bm, tx, s["N"])
                    _stage(v_tile, a.v, (b, kvh), j0, bn, dv_model, bm, tx, s["N"])
                    sync()
                    if norm.running_max:
                        T.buffer_store(m_new, m_run[at], [at])

                    def logits(masked: bool):
                        with T.serial(0, bn) as jj:
                            T.buffer_store(s_row, f32(0), [jj])
                            with T.serial(0, d_model) as c:
                                T.buffer_store(s_row, s_row[jj] + q_row[c] * k_tile[jj * d_model + c], [jj])
                            em = Emitter(spec, a.scope({"b": b, "h": h, "i": row, "j": j0 + jj}, s_row[jj]), True)
                            T.buffer_store(s_row, logit2(plan, em, j0 + jj, masked), [jj])
                            if norm.running_max:
                                T.buffer_store(m_new, tir.max(m_new[at], s_row[jj]), [at])

                    by_tile_kind(plan, kt, f_start, f_end, logits)
                    if norm.running_max:
                        # m_run stays -inf while the row has kept nothing; m_safe avoids -inf - -inf
                        T.buffer_store(m_safe, tir.Select(m_new[at] == f32(NEG_INF), f32(0), m_new[at]), [at])
                        T.buffer_store(alpha, tir.exp2(m_run[at] - m_safe[at]), [at])
                        T.buffer_store(m_run, m_new[at], [at])
                        T.buffer_store(l_run, l_run[at] * alpha[at], [at])
                        with T.serial(0, dv_model) as c:
                            T.buffer_store(acc, acc[c] * alpha[at], [c])
                    with T.serial(0, bn) as jj:
                        T.buffer_store(s_row, norm.weight(s_row[jj], m_safe[at], True), [jj])
                        T.buffer_store(l_run, l_run[at] + s_row[jj], [at])
                        with T.serial(0, dv_model) as c:
                            T.buffer_store(acc, acc[c] + s_row[jj] * v_tile[jj * dv_model + c], [c])

                # -- out = acc scaled as the normalizer says (0 for a row with nothing kept), lse
                with T.If(row < s["M"]):
                    with T.Then():
                        inv = T.Bind(norm.out_scale(l_run[at]))
                        with T.serial(0, dv_model) as c:
                            T.buffer_store(a.out, tir.Cast(a.out.dtype, acc[c] * inv), [b, h, row, c])
                        if a.lse is not None:
                            T.buffer_store(a.lse, norm.lse(m_run[at], l_run[at]), [b, h, row])
    return ib.get()


def _stage(tile, tensor, head, j0, rows: int, width: int, threads: int, tx, n_keys) -> None:
    """tile[r * width + c] = tensor[*head, j0 + r, c] as float32, 0 for keys past N; thread tx copies every
    threads-th element (consecutive threads, consecutive addresses)."""
    count = rows * width
    with T.serial(0, -(-count // threads)) as step:
        e = T.Bind(step * threads + tx)
        r, c = tir.truncdiv(e, width), tir.truncmod(e, width)
        with T.If(tir.And(e < count, j0 + r < n_keys)):
            with T.Then():
                T.buffer_store(tile, tir.Cast(F32, tensor[(*head, j0 + r, c)]), [e])
            with T.Else():
                with T.If(e < count):
                    with T.Then():
                        T.buffer_store(tile, f32(0), [e])


def block_key_tiles(plan: KernelPlan, a: Args, b, h, i0, tx, rows: int, bn: int):
    """(t_start, f_start, f_end, t_end) of the query tile [i0, i0 + rows) (passes.masks.key_tiles): thread
    tx < rows computes row i0 + tx's bounds into shared memory, then every thread reduces them."""
    s = a.sizes
    n_i64 = tir.Cast(I64, s["N"])
    tile_rows = T.alloc_buffer((4, rows), I64, scope="shared")
    bounds = T.alloc_buffer((4,), I64, scope="local")
    with T.If(tx < rows):
        with T.Then():
            with T.If(i0 + tx < s["M"]):
                with T.Then():
                    em = Emitter(plan.spec, a.scope({"b": b, "h": h, "i": i0 + tx}), True)
                    for c, x in enumerate(row_bounds(em, plan.masks, n_i64)):
                        T.buffer_store(tile_rows, x, [c, tx])
                with T.Else():  # past M: keeps nothing, narrows nothing
                    for c, x in enumerate((n_i64, tir.const(0, I64), tir.const(0, I64), n_i64)):
                        T.buffer_store(tile_rows, x, [c, tx])
    sync()
    init_bounds(bounds, n_i64)
    with T.serial(0, rows) as r:
        reduce_bounds(bounds, [T.Bind(tile_rows[i32(c), r]) for c in range(4)])
    return key_tiles(bounds, bn)


def i32(x: int) -> tir.IntImm:
    """An index constant (a Python int subscript makes a tensor-region load, not an element load)."""
    return tir.IntImm("int32", x)


def sync() -> None:
    """A block-wide barrier (shared memory writes before it are seen by every thread after it)."""
    T.evaluate(T.tvm_storage_sync("shared"))
