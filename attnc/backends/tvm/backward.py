"""The backward of a planned forward for CPUs (LLVM): TensorIR functions built from the IR of passes/grad.py
through the forward's emitter, mask analysis and normalizer lowering, so no variant has backward code of its own.

Three functions, run one after the other (the launcher: backend.TvmBackward):
- `bwd_rows`, parallel over (batch, head, query tile): each query tile's key-tile range and full tiles
  (passes.masks.key_tiles, as the forward computes them), Q^T and dO^T packed in float32 with the query rows
  padded to whole tiles, the tile's rows of every split's dQ partial zeroed (a torch.zeros there would leave
  torch's OpenMP threads spinning on the cores bwd_keys needs: 1.8x slower at S = 512, benchmarks/NOTES.md session
  14), and per row the base-2 lse and the coefficient `coef` of the dS rule:
  dS = g (dP - coef), with g = P and coef = Delta - dlse (Delta = rowsum(dO * O)) for normalised rows, and
  g = f'(s) and coef = -dlse exp(-lse) otherwise (grad.py's module docstring).
- `bwd_keys`, parallel over (batch, K/V head, split): a split takes every S-th block of KEY_TILES key tiles (S
  splits; strided, so causal work is balanced) and, per block, loops over the query heads of its GQA group, the
  query tiles and the block's key tiles in their key ranges, recomputing the scores and P from lse:
      qk^T = K Q^T, dP^T = V dO^T, dS^T by the normalizer's rule, dqk^T = dS^T * d score/d qk,
      dV += P^T dO, dK += dqk^T Q (kept in the task's float32 accumulators), dQ += dqk K
  into its split's float32 partial of dQ. One pass, five products (FA2's separate dQ pass would recompute two);
  no atomics: every task writes its own dK / dV rows, its own dQ partial and its own partial of each table's
  gradient (float inputs the score or the sink reads), so results are deterministic by construction.
- `bwd_finish`: dQ as the sum of the split partials, and each table's gradient as the sum of the task partials,
  cast to the tensors' dtypes.

The products are the forward's two register-tile forms, with its prefill schedule (schedule.CpuSchedule):
transposed (lanes over query rows, a broadcast K or V element per step: kernel.transposed_product) and
accumulating (lanes over head-dim columns, a broadcast weight per step: kernel.accumulate). Padded query rows never
reach a result: the sums over query rows stop at the tile's valid rows, and dQ's padded rows are never read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...passes import KernelPlan
from ...passes.grad import Derivatives, TableGrad, derive, weight_derivative
from .. import names
from .emit import F32, F64, I32, I64, LOG2E, Emitter, Scope, exp2, f32, registers, vectorized
from .launch import FINISH, KEYS, ROWS
from .kernel import (TIR_DTYPES, accumulate, buffer_arg, by_tile_kind, claimed_tasks, init_bounds,
                     input_args, key_tiles, logit2, param_args, qkv_shapes, reduce_bounds, row_bounds, size_vars,
                     transposed_product)
from .normalize import lower as lower_normalizer
from .schedule import KEY_TILES, CpuSchedule

NEG_INF = -math.inf


def build_backward_primfuncs(plan: KernelPlan, sched: CpuSchedule) -> dict[str, tir.PrimFunc]:
    derivs = derive(plan.spec)
    return {ROWS: _rows_function(plan, sched), KEYS: _keys_function(plan, sched, derivs),
            FINISH: _finish_function(plan, derivs)}


class _Scratch:
    """The float32 buffers bwd_rows writes and bwd_keys reads, all compact, query rows padded to MP (QT tiles).
    Q^T and dO^T are stored a query tile at a time ([D, block_m] blocks): a pair's tile is one contiguous block (with
    whole rows of MP apart, its rows would fall into a few cache sets)."""

    def __init__(self, s: dict, block_m: int):
        mp, qt = tir.Var("MP", I32), tir.Var("QT", I32)
        b, h = s["B"], s["H"]
        self.q_t = buffer_arg("q_t", [b, h, qt, s["D"], block_m], F32, "compact")
        self.do_t = buffer_arg("do_t", [b, h, qt, s["DV"], block_m], F32, "compact")
        self.lse2 = buffer_arg("lse2", [b, h, mp], F32, "compact")  # lse * log2(e); 0 for a row that kept nothing
        self.coef = buffer_arg("coef", [b, h, mp], F32, "compact")  # the dS rule's row term; 0 on padded rows
        self.tiles = buffer_arg("tiles", [b, h, qt, 4], I32, "compact")  # key_tiles of each query tile
        self.query_tiles = qt
        self.sizes = s

    def dq_part(self) -> tir.Buffer:
        """The next parameter: dQ's float32 partial per split, [S, B, H, MP, D] (bwd_rows zeroes it)."""
        s = self.sizes
        return buffer_arg("dq_part", [tir.Var("S", I32), s["B"], s["H"], self.lse2.shape[2], s["D"]], F32, "compact")


def _table_partials(plan: KernelPlan, s: dict, tables: tuple[str, ...]) -> dict[str, tir.Buffer]:
    """Per key task a float64 partial of each table's gradient: a table element (an ALiBi slope) may sum a
    gradient term of every (query, key) pair of a head, and these cancel (a softmax row's dS sums to 0)."""
    tasks = tir.Var("TASKS", I32)
    return {name: buffer_arg(names.gradient_partials(name), [tasks, *(s[n] for n in plan.spec.input(name).shape)],
                             F64, "compact")
            for name in tables}


# ---------------------------------------------------------------- bwd_rows


def _rows_function(plan: KernelPlan, sched: CpuSchedule) -> tir.PrimFunc:
    spec = plan.spec
    bm = sched.block_m
    normalized = spec.normalizer.normalized
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(ROWS)
            s = size_vars(plan)
            shapes, dtype = qkv_shapes(s), TIR_DTYPES[plan.dtype]
            q = buffer_arg("q", shapes["q"], dtype)
            buffer_arg("k", shapes["k"], dtype)  # for its sizes (N, HKV), which the masks may read
            out = buffer_arg("out", shapes["out"], dtype)
            dout = buffer_arg("dout", shapes["out"], dtype)
            lse = buffer_arg("lse", [s["B"], s["H"], s["M"]], F32, "any")
            dlse = buffer_arg("dlse", [s["B"], s["H"], s["M"]], F32, "any")  # lse again where has_dlse is 0
            has_dlse = T.arg("has_dlse", tir.Var("has_dlse", I32))
            x = _Scratch(s, bm)
            dq_part = x.dq_part()
            inputs, params = input_args(spec, s), param_args(spec)
            n_i64 = tir.Cast(I64, s["N"])
            q_tiles = x.query_tiles
            with T.parallel(0, s["B"] * s["H"] * q_tiles) as task:
                b = T.Bind(tir.truncdiv(task, s["H"] * q_tiles))
                h = T.Bind(tir.truncmod(tir.truncdiv(task, q_tiles), s["H"]))
                qt = T.Bind(tir.truncmod(task, q_tiles))
                i0 = T.Bind(qt * bm)
                rows = T.Bind(tir.min(bm, s["M"] - i0))
                bounds = T.alloc_buffer((4,), I64)
                init_bounds(bounds, n_i64)
                with T.serial(0, rows) as r, registers():
                    em = Emitter(spec, Scope({"b": b, "h": h, "i": i0 + r}, s, params, inputs))
                    reduce_bounds(bounds, [T.Bind(e) for e in row_bounds(em, plan.masks, n_i64)])
                for slot, value in enumerate(key_tiles(bounds, sched.block_n)):
                    T.buffer_store(x.tiles, value, [b, h, qt, slot])
                # Q^T and dO^T a head-dim row at a time: the stores run along the rows (padded rows repeat the last
                # row, with dO = 0)
                with T.serial(0, plan.head_dim) as d:
                    with T.serial(0, bm) as r:
                        T.buffer_store(x.q_t, tir.Cast(F32, q[b, h, tir.min(i0 + r, s["M"] - 1), d]), [b, h, qt, d, r])
                with T.serial(0, plan.value_dim) as c:
                    with T.serial(0, bm) as r:
                        value = tir.Cast(F32, dout[b, h, tir.min(i0 + r, s["M"] - 1), c])
                        T.buffer_store(x.do_t, tir.Select(r < rows, value, f32(0)), [b, h, qt, c, r])
                with T.serial(0, dq_part.shape[0]) as split:
                    with T.serial(0, bm) as r:
                        with T.vectorized(0, plan.head_dim) as d:
                            T.buffer_store(dq_part, f32(0), [split, b, h, i0 + r, d])
                delta = T.alloc_buffer((1,), F32)
                with T.serial(0, bm) as r:
                    i = T.Bind(i0 + r)
                    row = T.Bind(tir.min(i, s["M"] - 1))
                    valid = r < rows
                    row_lse = lse[b, h, row]
                    kept = row_lse != f32(NEG_INF)
                    row_dlse = tir.Select(has_dlse != 0, dlse[b, h, row], f32(0))
                    T.buffer_store(x.lse2, tir.Select(kept, row_lse * f32(LOG2E), f32(0)), [b, h, i])
                    if normalized:  # coef = Delta - dlse
                        T.buffer_store(delta, f32(0), [0])
                        with T.serial(0, plan.value_dim) as c:
                            T.buffer_store(delta, delta[0] + tir.Cast(F32, dout[b, h, row, c])
                                           * tir.Cast(F32, out[b, h, row, c]), [0])
                        coef = delta[0] - row_dlse
                    else:  # coef = -dlse exp(-lse); no kept key: no term
                        coef = tir.Select(kept, -row_dlse * exp2(-row_lse * f32(LOG2E)), f32(0))
                    T.buffer_store(x.coef, tir.Select(valid, coef, f32(0)), [b, h, i])
    return ib.get()


# ---------------------------------------------------------------- bwd_keys


def _keys_function(plan: KernelPlan, sched: CpuSchedule, derivs: Derivatives) -> tir.PrimFunc:
    spec = plan.spec
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(KEYS)
            a = _KeyArgs(plan, sched, derivs)
            s = a.sizes
            tasks = T.Bind(s["B"] * s["HKV"] * a.splits)
            if not sched.claim_tasks:
                with T.parallel(0, tasks) as task:
                    _key_task(plan, sched, derivs, a, task, _key_scratch(plan, sched, derivs))
            else:
                claimed_tasks(tasks, lambda task, scratch: _key_task(plan, sched, derivs, a, task, scratch),
                              lambda: _key_scratch(plan, sched, derivs))
    return ib.get()


class _KeyArgs:
    """bwd_keys's parameters, in call order: q, k, v, dout, the _Scratch buffers, dq_part, dk, dv, the table
    partials, input tables, params."""

    def __init__(self, plan: KernelPlan, sched: CpuSchedule, derivs: Derivatives):
        self.sizes = s = size_vars(plan)
        shapes, dtype = qkv_shapes(s), TIR_DTYPES[plan.dtype]
        self.q, self.k, self.v = (buffer_arg(name, shapes[name], dtype) for name in ("q", "k", "v"))
        self.dout = buffer_arg("dout", shapes["out"], dtype)
        self.x = _Scratch(s, sched.block_m)
        self.dq_part = self.x.dq_part()
        self.splits = self.dq_part.shape[0]
        self.dk = buffer_arg("dk", shapes["k"], dtype)
        self.dv = buffer_arg("dv", shapes["v"], dtype)
        self.partials = _table_partials(plan, s, derivs.tables)
        self.inputs, self.params = input_args(plan.spec, s), param_args(plan.spec)

    def scope(self, index, qk=None) -> Scope:
        return Scope(index, self.sizes, self.params, self.inputs, qk)


def _key_scratch(plan: KernelPlan, sched: CpuSchedule, derivs: Derivatives) -> dict:
    bm, block_keys = sched.block_m, KEY_TILES * sched.block_n
    tiles = {"dk_acc": T.alloc_buffer((block_keys, plan.head_dim), F32),
             "dv_acc": T.alloc_buffer((block_keys, plan.value_dim), F32),
             **{name: T.alloc_buffer((sched.block_n, bm), F32) for name in ("qk_t", "weight_t", "ds_t")}}
    if derivs.score_tables:
        tiles["dsn_t"] = T.alloc_buffer((sched.block_n, bm), F32)  # dS itself (ds_t holds dS * d score/d qk)
    return tiles


def _key_task(plan: KernelPlan, sched: CpuSchedule, derivs: Derivatives, a: _KeyArgs, task, scratch: dict):
    """One task: the key blocks split, split + S, ... (KEY_TILES key tiles each) of (batch, K/V head), against
    every query tile that keeps them, for each query head of the group. A query tile's data is used for every key
    tile of the block before the next one is read: the block's K, V and accumulators and one query tile's Q^T, dO^T,
    Q, dO and dQ partial stay in L2."""
    s, bn = a.sizes, sched.block_n
    block_keys = KEY_TILES * bn
    splits = a.splits
    b = T.Bind(tir.truncdiv(task, s["HKV"] * splits))
    kvh = T.Bind(tir.truncmod(tir.truncdiv(task, splits), s["HKV"]))
    split = T.Bind(tir.truncmod(task, splits))
    group = T.Bind(tir.truncdiv(s["H"], s["HKV"]))
    key_blocks = T.Bind(tir.truncdiv(s["N"] + block_keys - 1, block_keys))
    dk_acc, dv_acc = scratch["dk_acc"], scratch["dv_acc"]
    with T.serial(0, tir.truncdiv(key_blocks - split + splits - 1, splits)) as step:
        kb = T.Bind(split + step * splits)
        for acc in (dk_acc, dv_acc):
            with T.serial(0, block_keys) as jj:
                with T.vectorized(0, acc.shape[1]) as c:
                    T.buffer_store(acc, f32(0), [jj, c])
        with T.serial(0, group) as g:
            h = T.Bind(kvh * group + g)
            with T.serial(0, a.x.query_tiles) as qt:
                t_start, f_start, f_end, t_end = (T.Bind(a.x.tiles[b, h, qt, slot]) for slot in range(4))
                i0 = T.Bind(qt * sched.block_m)
                rows = T.Bind(tir.min(sched.block_m, s["M"] - i0))
                with T.serial(0, KEY_TILES) as kk:
                    kt = T.Bind(kb * KEY_TILES + kk)
                    with T.If(tir.And(kt >= t_start, kt < t_end)):  # t_end <= the key tiles of N
                        with T.Then():
                            j0 = T.Bind(kt * bn)
                            tile = _Tile(b, h, kvh, qt, i0, j0, rows, T.Bind(tir.min(bn, s["N"] - j0)), kk * bn,
                                         split, kt, f_start, f_end)
                            _tile_pair(plan, sched, derivs, a, task, tile, scratch)
        jb = T.Bind(kb * block_keys)
        with T.serial(0, tir.min(block_keys, s["N"] - jb)) as jj:
            for acc, dst in ((dk_acc, a.dk), (dv_acc, a.dv)):
                with T.vectorized(0, acc.shape[1]) as c:
                    T.buffer_store(dst, tir.Cast(dst.dtype, acc[jj, c]), [b, kvh, jb + jj, c])
    if derivs.sink_tables:
        with T.If(split == 0):
            with T.Then():
                _sink_grads(plan, derivs, a, task, b, kvh, group)


@dataclass(frozen=True)
class _Tile:
    """Where one (query tile, key tile) pair lies: its rows i0 + [0, rows), keys j0 + [0, keys)."""

    b: tir.PrimExpr
    h: tir.PrimExpr
    kvh: tir.PrimExpr
    qt: tir.PrimExpr  # the query tile: rows i0 = qt * block_m on
    i0: tir.PrimExpr
    j0: tir.PrimExpr
    rows: tir.PrimExpr
    keys: tir.PrimExpr
    acc0: tir.PrimExpr  # the key tile's first row in the block's dK / dV accumulators
    split: tir.PrimExpr
    kt: tir.PrimExpr  # the key tile, and the full ones [f_start, f_end) of the query tile (kernel.by_tile_kind)
    f_start: tir.PrimExpr
    f_end: tir.PrimExpr


def _tile_pair(plan: KernelPlan, sched: CpuSchedule, derivs: Derivatives, a: _KeyArgs, task, t: _Tile,
               scratch: dict) -> None:
    """The five products of one pair and its table gradients. On partial tiles the masks are evaluated
    element-wise, as in the forward; only that step has a code path per tile kind (half the code to compile)."""
    spec, x = plan.spec, a.x
    norm = lower_normalizer(spec.normalizer)
    dweight = None if spec.normalizer.normalized else weight_derivative(spec.normalizer, spec.score)
    qk_t, weight_t, ds_t, dsn_t = scratch["qk_t"], scratch["weight_t"], scratch["ds_t"], scratch.get("dsn_t")
    b, h, kvh, i0, j0 = t.b, t.h, t.kvh, t.i0, t.j0
    last = a.sizes["N"] - 1  # keys past N read key N - 1: they are masked

    def store_scores(jj, reg):
        with T.vectorized(0, sched.block_m) as i:
            T.buffer_store(qk_t, reg[i], [jj, i])

    def weights_and_ds(jj, dp, masked: bool):
        """P and dS^T of one key row from its qk^T and dP^T rows."""
        j = j0 + jj

        def lane(i):
            em = Emitter(spec, a.scope({"b": b, "h": h, "i": i0 + i, "j": j}, qk=qk_t[jj, i]))
            T.buffer_store(weight_t, norm.weight(logit2(plan, em, j, masked), x.lse2[b, h, i0 + i], False), [jj, i])
            p = weight_t[jj, i]
            ds = (p if dweight is None else em.float(dweight)) * (dp[i] - x.coef[b, h, i0 + i])

            def kept(value):  # masked elements (P = 0) take no gradient, whatever d score/d qk is there
                return tir.Select(p == f32(0), f32(0), value) if masked else value

            if dsn_t is not None:
                T.buffer_store(dsn_t, kept(ds), [jj, i])
            T.buffer_store(ds_t, kept(ds * em.float(derivs.dqk)), [jj, i])
        vectorized(sched.block_m, lane)

    d_model, dv_model = plan.head_dim, plan.value_dim
    transposed_product(sched, lambda jj, d: tir.Cast(F32, a.k[b, kvh, tir.min(j0 + jj, last), d]),
                        lambda d, i: x.q_t[b, h, t.qt, d, i], d_model, store_scores)
    transposed_product(sched, lambda jj, c: tir.Cast(F32, a.v[b, kvh, tir.min(j0 + jj, last), c]),
                        lambda c, i: x.do_t[b, h, t.qt, c, i], dv_model,
                        lambda jj, dp: by_tile_kind(plan, t.kt, t.f_start, t.f_end,
                                                    lambda masked: weights_and_ds(jj, dp, masked)))
    dk_acc, dv_acc = scratch["dk_acc"], scratch["dv_acc"]
    accumulate(sched, sched.block_n, dv_model, t.rows, lambda r, c: dv_acc[t.acc0 + r, c],
               lambda step, r: weight_t[r, step], lambda step, c: tir.Cast(F32, a.dout[b, h, i0 + step, c]),
               lambda r, c, value: T.buffer_store(dv_acc, value, [t.acc0 + r, c]))
    accumulate(sched, sched.block_n, d_model, t.rows, lambda r, c: dk_acc[t.acc0 + r, c],
               lambda step, r: ds_t[r, step], lambda step, c: tir.Cast(F32, a.q[b, h, i0 + step, c]),
               lambda r, c, value: T.buffer_store(dk_acc, value, [t.acc0 + r, c]))
    accumulate(sched, sched.block_m, d_model, t.keys, lambda r, c: a.dq_part[t.split, b, h, i0 + r, c],
                lambda step, r: ds_t[step, r], lambda step, c: tir.Cast(F32, a.k[b, kvh, j0 + step, c]),
                lambda r, c, value: T.buffer_store(a.dq_part, value, [t.split, b, h, i0 + r, c]))
    if derivs.score_tables:
        with T.serial(0, t.keys) as jj:
            with T.serial(0, t.rows) as i, registers():
                ds = T.Bind(dsn_t[jj, i])
                with T.If(ds != f32(0)):
                    with T.Then():
                        em = Emitter(spec, a.scope({"b": b, "h": h, "i": i0 + i, "j": j0 + jj}, qk=qk_t[jj, i]))
                        for grad in derivs.score_tables:
                            _scatter(a.partials[grad.lookup.tensor], task, em, grad, ds)


def _sink_grads(plan: KernelPlan, derivs: Derivatives, a: _KeyArgs, task, b, kvh, group) -> None:
    """dsink = p_sink (dlse - Delta) = -p_sink coef per row of the group's heads, into the sink's tables."""
    x = a.x
    with T.serial(0, group) as g:
        h = T.Bind(kvh * group + g)
        with T.serial(0, a.sizes["M"]) as i, registers():
            em = Emitter(plan.spec, a.scope({"b": b, "h": h, "i": i}))
            dsink = T.Bind(-exp2(em.float(plan.score.sink2) - x.lse2[b, h, i]) * x.coef[b, h, i])
            for grad in derivs.sink_tables:
                _scatter(a.partials[grad.lookup.tensor], task, em, grad, dsink)


def _scatter(partial: tir.Buffer, task, em: Emitter, grad: TableGrad, upstream) -> None:
    """partial[task, lookup's indices] += upstream * d(score or sink)/d(the looked-up value), where the lookup lies
    inside its table (outside it reads the constant 0)."""
    indices, inside = em.place(grad.lookup)
    with T.If(inside):
        with T.Then():
            at = [task, *indices]
            T.buffer_store(partial, partial[tuple(at)] + tir.Cast(F64, upstream * em.float(grad.dscore)), at)


# ---------------------------------------------------------------- bwd_finish


def _finish_function(plan: KernelPlan, derivs: Derivatives) -> tir.PrimFunc:
    spec = plan.spec
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(FINISH)
            s = size_vars(plan)
            splits, mp = tir.Var("S", I32), tir.Var("MP", I32)
            dq_part = buffer_arg("dq_part", [splits, s["B"], s["H"], mp, s["D"]], F32, "compact")
            dq = buffer_arg("dq", qkv_shapes(s)["q"], TIR_DTYPES[plan.dtype])
            partials = _table_partials(plan, s, derivs.tables)
            grads = {name: buffer_arg(names.gradient(name), [s[n] for n in spec.input(name).shape],
                                      TIR_DTYPES[spec.input(name).dtype], "compact") for name in derivs.tables}
            with T.parallel(0, s["B"] * s["H"]) as bh:
                b = T.Bind(tir.truncdiv(bh, s["H"]))
                h = T.Bind(tir.truncmod(bh, s["H"]))
                total = T.alloc_buffer((plan.head_dim,), F32)
                with T.serial(0, s["M"]) as i:
                    with T.vectorized(0, plan.head_dim) as d:
                        T.buffer_store(total, dq_part[0, b, h, i, d], [d])
                    with T.serial(1, splits) as part:
                        with T.vectorized(0, plan.head_dim) as d:
                            T.buffer_store(total, total[d] + dq_part[part, b, h, i, d], [d])
                    with T.vectorized(0, plan.head_dim) as d:
                        T.buffer_store(dq, tir.Cast(dq.dtype, total[d]), [b, h, i, d])
            for name, grad in grads.items():
                _sum_partials(partials[name], grad)
    return ib.get()


def _sum_partials(partial: tir.Buffer, grad: tir.Buffer) -> None:
    """grad[x] = sum over tasks of partial[task, x], over every index x of grad (tables are small: serial)."""
    def nest(index: list) -> None:
        if len(index) < len(grad.shape):
            with T.serial(0, grad.shape[len(index)]) as axis:
                nest(index + [axis])
            return
        total = T.alloc_buffer((1,), F64)
        T.buffer_store(total, tir.const(0, F64), [0])
        with T.serial(0, partial.shape[0]) as task:
            T.buffer_store(total, total[0] + partial[tuple([task, *index])], [0])
        T.buffer_store(grad, tir.Cast(grad.dtype, total[0]), index)

    nest([])

