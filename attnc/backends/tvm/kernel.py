"""A KernelPlan -> a TensorIR PrimFunc for CPUs (LLVM), built with TVM's IR builder.

One parallel task per (batch, head, query tile), handed out to threads at run time on x86 (claimed_tasks;
static ranges elsewhere). Per task the flash algorithm runs over the key tiles the mask analysis leaves
(`passes.masks.key_tiles`, mirrored here in TIR): tiles outside the loop hull never run, full tiles evaluate no
mask, partial tiles evaluate every mask element-wise. The normalizer (its lowering: normalize.py) runs in base 2
on the plan's `logits2`.

The CPU schedule (why the loops look as they do):
- Scores are computed transposed, S^T[j, i] = sum_d k[j, d] * Q^T[d, i], with the query tile packed as Q^T
  once per task: the vector lanes run over query rows, each k element is a broadcast, and the row max /
  row sum of the normalizer become vertical (lane-wise) reductions over j, with no shuffles.
- Register tiles (`kv_rows` x `block_m` scores, `out_rows` x `out_cols` outputs) are separate small buffers:
  TVM places constant-size "global" allocations under 1 KiB on the stack, where LLVM keeps them in
  registers; larger ones, and "local" ones, go to the workspace allocator and every update goes to memory.
- The logits (score expression, masks on partial tiles) and the running max are taken from the S^T
  register tile before it is stored, so the scores go through memory once.
- P V accumulates into the output tile with the lanes over value columns (contiguous rows of v); the
  rescale by exp2(m_old - m_new) is folded into loading the register tile.
- exp2 is a vectorizable polynomial (emit.exp2_nonpositive where the argument is never positive: logit - max).

Ragged and paged storage (serving.py): a task's sequence, rows and sizes come from the offsets or lengths, keys
are read through the block table or the offsets, and the index data is checked, clamped and flagged there. Decode
schedules pack a GQA group's heads into a task's rows (CpuSchedule.pack); data-dependent masks get a tile summary
(tile_summary_primfunc) that the prefill schedule reads to skip empty key tiles and the mask on full ones.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ... import index_data
from ...ir import Paged, SizeRef, storage_capacities, walk
from ...passes import KernelPlan
from .. import names
from .emit import F32, F64, I32, I64, Emitter, Scope, exp2_nonpositive, f32, registers, vectorized
from .normalize import lower as lower_normalizer
from .schedule import CpuSchedule, summary_uses_h, uses_summary
from .serving import ERRORS, SITE, Rows, Sequences, is_serving

# TIR dtypes of the spec's tensor element types. bool tables are passed as uint8 views (DLPack bool and TVM
# bool buffers disagree on the element type); params arrive as int32 / float32 scalars (bool as 0 / 1).
TIR_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": F32, "f64": F64, "i8": "int8", "i16": "int16",
              "i32": I32, "i64": I64, "bool": "uint8"}
PARAM_DTYPES = {"i32": I32, "f32": F32, "bool": I32}
NEG_INF = -math.inf
SUMMARY = "summary"  # the tile classes of data-dependent masks: 0 nothing kept, 1 all kept, 2 some


def parameter_names(spec, summary: bool = False) -> tuple[str, ...]:
    """The compiled function's parameters in call order (Args declares them; sizes and strides are not
    parameters: TVM reads them from the tensors). `summary`: the prefill schedule of data-dependent masks."""
    return ("q", "k", "v", "out", *(["lse"] if spec.returns_lse else []),
            *(names.tensor(t.name) for t in spec.inputs), *(names.param(p.name) for p in spec.params),
            *([SUMMARY] if summary else []), *([ERRORS, SITE] if is_serving(spec) else []))


def size_vars(plan: KernelPlan) -> dict[str, tir.PrimExpr]:
    """Every size the spec names, as a constant where the plan fixes it (D, DV, `dims`), else an int32 variable
    that TVM binds from the first buffer shaped by it."""
    spec = plan.spec
    fixed = {**spec.dim_values, "D": plan.head_dim, "DV": plan.value_dim}
    used = dict.fromkeys(n for t in (spec.q, spec.k, spec.v, *spec.inputs) for n in t.shape)
    for e in (spec.score, *spec.masks, *([spec.normalizer.sink] if spec.normalizer.sink else [])):
        used.update(dict.fromkeys(n.name for n in walk(e) if isinstance(n, SizeRef)))
    # Ragged and paged storage: B, M and N that no tensor's shape holds are derived (dsl/signature.py's rule):
    # B from the offsets, M and N the capacities (each task takes its sequence's own, serving.Sequences.rows).
    shaped = {n for t in (spec.q, spec.k, spec.v, *spec.inputs) for n in t.shape}
    sizes = {n: tir.IntImm(I32, fixed[n]) if n in fixed else tir.Var(names.size(n), I32) for n in used
             if n in shaped or n not in ("B", "M", "N")}
    if "B" not in sizes:
        sizes["B"] = sizes["B1"] - 1
    storage_capacities(spec.q_storage, spec.kv_storage, sizes)
    sizes.setdefault("HKV", sizes["H"])
    sizes.setdefault("DV", sizes["D"])
    return sizes


def buffer_arg(name: str, shape, dtype: str, strides: str = "unit_last",
               stride_names: list[str] | None = None) -> tir.Buffer:
    """The next PrimFunc parameter, a tensor: `unit_last` any strides but a unit last one (vector loads along the
    head dim; the launcher copies otherwise), `any` any strides, `compact` contiguous (attnc's own buffers, whose
    addresses TVM then computes from the shape). `stride_names`: its stride variables' (default {name}_s{axis})."""
    handle = T.arg(name, T.handle())
    if strides == "compact":
        return IRBuilder.name(name, T.match_buffer(handle, shape, dtype))
    stride_vars = [tir.Var(n, I32) for n in stride_names or (f"{name}_s{a}" for a in range(len(shape)))]
    if strides == "unit_last":
        stride_vars[-1] = 1
    return IRBuilder.name(name, T.match_buffer(handle, shape, dtype, strides=stride_vars))  # named in sources


def qkv_shapes(s: dict, spec=None) -> dict[str, list]:
    """q, k, v and out as canonical_view gives them, from size_vars: [B, heads, sequence, head dim]; a ragged q
    (and out) [H, T, D], ragged k and v [HKV, TK, D], paged ones [PAGES, HKV, PAGE, D]."""
    q = [s["H"], s["T"]] if spec is not None and spec.q_storage is not None else [s["B"], s["H"], s["M"]]
    kv = [s["B"], s["HKV"], s["N"]]
    if spec is not None and isinstance(spec.kv_storage, Paged):
        kv = [s["PAGES"], s["HKV"], s["PAGE"]]
    elif spec is not None and spec.kv_storage is not None:
        kv = [s["HKV"], s["TK"]]
    return {"q": q + [s["D"]], "k": kv + [s["D"]], "v": kv + [s["DV"]], "out": q + [s["DV"]], "lse": q}


def input_args(spec, s: dict) -> dict[str, tir.Buffer]:
    """The spec's input tables as parameters names.tensor(name) (read through the emitter's lookups: any
    strides)."""
    return {t.name: buffer_arg(names.tensor(t.name), [s[n] for n in t.shape], TIR_DTYPES[t.dtype], "any",
                               [names.stride(t.name, a) for a in range(len(t.shape))])
            for t in spec.inputs}


def param_args(spec) -> dict[str, tir.Var]:
    return {p.name: T.arg(names.param(p.name), tir.Var(names.param(p.name), PARAM_DTYPES[p.dtype]))
            for p in spec.params}


class Args:
    """The PrimFunc's parameters (parameter_names): q, k, v, out, [lse], input tables, params, then [the tile
    summary] (`summary`: int8 [summary rows, key tiles], tile_summary_primfunc) and for ragged or paged storage
    the error buffer and the spec's site number (serving.py)."""

    def __init__(self, plan: KernelPlan, summary: bool = False, outputs: bool = True):
        """`outputs` False: the tile summary's parameters, which leave out out, lse and the error buffer."""
        spec = plan.spec
        self.sizes = s = size_vars(plan)
        shapes = qkv_shapes(s, spec)
        dtype = TIR_DTYPES[plan.dtype]
        self.q, self.k, self.v = (buffer_arg(name, shapes[name], dtype) for name in ("q", "k", "v"))
        self.out = buffer_arg("out", shapes["out"], dtype) if outputs else None
        self.lse = buffer_arg("lse", shapes["lse"], F32) if spec.returns_lse and outputs else None
        self.inputs = input_args(spec, s)
        self.params = param_args(spec)
        self.summary = buffer_arg(SUMMARY, [tir.Var("summary_rows", I32), tir.Var("key_tiles", I32)], "int8",
                                  "compact") if summary else None
        self.errors = self.site = None
        if is_serving(spec) and outputs:
            self.errors = buffer_arg(ERRORS, [index_data.SLOTS], I64, "compact")
            self.site = T.arg(SITE, tir.Var(SITE, I32))

    def scope(self, index, qk=None, sizes: dict | None = None) -> Scope:
        """`sizes`: a task's own (serving.Rows.sizes: M and N of its sequence), else the call's."""
        return Scope(index, self.sizes if sizes is None else sizes, self.params, self.inputs, qk)


def build_primfunc(plan: KernelPlan, sched: CpuSchedule, name: str = "attn") -> tir.PrimFunc:
    summary = uses_summary(plan, sched)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan, summary)
            s = a.sizes
            rows_per_head = sched.block_m // sched.pack
            seqs = Sequences(plan, a, rows_per_head)
            seqs.prologue(record_violations=True)
            q_tiles = T.Bind(tir.floordiv(s["M"] + rows_per_head - 1, rows_per_head))
            tasks = T.Bind(seqs.task_count(tir.truncdiv(s["H"], sched.pack), q_tiles))
            # per task: the last bad block-table entry its key tiles read (-1: none), and its sequence
            bad = (T.alloc_buffer((tasks,), I32), T.alloc_buffer((tasks,), I32)) if seqs.paged else None
            parallel_tasks(sched, tasks, lambda task, scratch: _attention_task(plan, sched, a, seqs, task, q_tiles,
                                                                               scratch, bad),
                           lambda: _tile_scratch(plan, sched))
            if bad is not None:
                seqs.epilogue(*bad, tasks)
    return ib.get()


def summary_heads(plan: KernelPlan, s: dict):
    """Heads with a tile summary of their own: H where a mask reads h, else 1 (the heads share one)."""
    return s["H"] if summary_uses_h(plan) else tir.IntImm(I32, 1)


def tile_summary_primfunc(plan: KernelPlan, sched: CpuSchedule, name: str) -> tir.PrimFunc:
    """The tile classes of data-dependent masks (MaskPlan.data_dependent) for the kernel of `sched`, taking the
    same arguments: summary[row, kt] for each task's query tile (heads sharing a row where no mask reads h) and
    each key tile in its loop range: 0 where no valid element is kept, 1 where every valid element passes the
    evaluated conjuncts (with the exact ranges' full tiles, no mask at all), else 2. As the Triton backend's
    tile_summary kernel; the launcher reuses it while the mask tensors, sizes and params are unchanged."""
    masks, bm, bn = plan.masks, sched.block_m, sched.block_n
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan, summary=True, outputs=False)
            s = a.sizes
            seqs = Sequences(plan, a, bm)
            seqs.prologue(record_violations=False)
            q_tiles = T.Bind(tir.floordiv(s["M"] + bm - 1, bm))
            heads = T.Bind(summary_heads(plan, s))
            with T.parallel(0, seqs.task_count(heads, q_tiles)) as task:
                r = seqs.rows(task, heads, q_tiles)
                with T.If(r.rows > 0):
                    with T.Then():
                        n = r.sizes["N"]
                        bounds = T.alloc_buffer((4,), I64)
                        exact = T.alloc_buffer((2, bm), I64)  # each row's exact [lo, hi)
                        counts = T.alloc_buffer((2,), I32)  # kept, dropped
                        init_bounds(bounds, tir.Cast(I64, n))
                        with T.serial(0, r.rows) as i, registers():
                            row = [T.Bind(x) for x in row_bounds(Emitter(plan.spec, a.scope(
                                {"b": r.b, "h": r.h, "i": r.i0 + i}, sizes=r.sizes)), masks, tir.Cast(I64, n))]
                            reduce_bounds(bounds, row)
                            T.buffer_store(exact, row[2], [0, i])
                            T.buffer_store(exact, row[3], [1, i])
                        t_start, _, _, t_end = key_tiles(bounds, bn)
                        with T.serial(t_start, t_end) as kt:
                            T.buffer_store(counts, 0, [0])
                            T.buffer_store(counts, 0, [1])
                            with T.serial(0, r.rows) as i, registers():
                                with T.serial(0, tir.min(bn, n - kt * bn)) as jj:
                                    j = T.Bind(kt * bn + jj)
                                    em = Emitter(plan.spec, a.scope({"b": r.b, "h": r.h, "i": r.i0 + i, "j": j},
                                                                    sizes=r.sizes))
                                    passed = T.Bind(_all(em.bool(c) for c in masks.evaluated))
                                    wide = tir.Cast(I64, j)
                                    in_range = tir.And(wide >= exact[0, i], wide < exact[1, i])
                                    T.buffer_store(counts, counts[0] + tir.Cast(I32, tir.And(in_range, passed)), [0])
                                    T.buffer_store(counts, counts[1] + tir.Cast(I32, tir.Not(passed)), [1])
                            T.buffer_store(a.summary, tir.Cast("int8", tir.Select(
                                counts[0] == 0, 0, tir.Select(counts[1] == 0, 1, 2))), [task, kt])
    return ib.get()


def _all(conditions) -> tir.PrimExpr:
    result = None
    for c in conditions:
        result = c if result is None else tir.And(result, c)
    return result


def parallel_tasks(sched: CpuSchedule, tasks, run, scratch) -> None:
    """run(task, scratch buffers) for every task, in parallel: claimed at run time (claimed_tasks) or in static
    ranges."""
    if not sched.claim_tasks:
        with T.parallel(0, tasks) as task:
            run(task, scratch())
    else:
        claimed_tasks(tasks, run, scratch)


def claimed_tasks(tasks, run, scratch) -> None:
    """Tasks handed out at run time. TVM splits a parallel loop into one static range per thread, so a thread
    that is preempted (a busy core on a shared machine, or torch's OpenMP workers spinning after an op) stalls
    the whole call. Here every task has a claim bit, set with x86's `lock bts` (which returns the old bit), and
    a slot of the parallel loop whose own task is still unclaimed runs it, then claims forward (its following
    tasks, usually its own slots' next ones) and, when the next one is taken, the highest unclaimed tasks from
    the top down: a thread that finishes early takes over the tail of a slow thread's range. Every slot tries its
    own task, so every task runs exactly once whatever the claim order; the scan's plain loads of claim words
    only skip full words (bits are only ever set) and never decide alone that a task is done."""
    claims = T.alloc_buffer((tir.truncdiv(tasks + 31, 32),), I32)
    with T.serial(0, tir.truncdiv(tasks + 31, 32)) as w:
        T.buffer_store(claims, 0, [w])

    def claim(task):  # true when this thread set the task's bit
        return tir.call_llvm_intrin("int8", "llvm.x86.atomic.bts.rm", tir.address_of(claims[0]),
                                    task) == tir.const(0, "int8")

    with T.parallel(0, tasks) as slot:
        with T.If(claim(slot)):
            with T.Then():
                buffers = scratch()  # once per active slot (about one per thread), not once per task
                cursor = T.alloc_buffer((3,), I32)  # the task to run (-1: none), the steal scan's position, forward?
                for index, value in enumerate((slot, tasks - 1, 1)):
                    T.buffer_store(cursor, value, [index])
                with T.While(cursor[0] >= 0):
                    done = T.Bind(cursor[0])
                    run(done, buffers)
                    T.buffer_store(cursor, -1, [0])
                    with T.If(tir.And(cursor[2] == 1, done + 1 < tasks)):
                        with T.Then():
                            with T.If(claim(done + 1)):
                                with T.Then():
                                    T.buffer_store(cursor, done + 1, [0])
                    with T.If(cursor[0] < 0):
                        with T.Then():
                            T.buffer_store(cursor, 0, [2])
                    with T.While(tir.And(cursor[0] < 0, cursor[1] >= 0)):
                        at = T.Bind(cursor[1])
                        with T.If(claims[tir.shift_right(at, 5)] == -1):
                            with T.Then():  # all 32 tasks of this word are taken
                                T.buffer_store(cursor, tir.shift_right(at, 5) * 32 - 1, [1])
                            with T.Else():
                                with T.If(claim(at)):
                                    with T.Then():
                                        T.buffer_store(cursor, at, [0])
                                T.buffer_store(cursor, at - 1, [1])


def _tile_scratch(plan: KernelPlan, sched: CpuSchedule) -> dict:
    bm, bn = sched.block_m, sched.block_n
    paged = isinstance(plan.spec.kv_storage, Paged)
    return {"q_t": T.alloc_buffer((plan.head_dim, bm), F32), "s_t": T.alloc_buffer((bn, bm), F32),
            "acc": T.alloc_buffer((bm, plan.value_dim), F32),
            **{name: T.alloc_buffer((bm,), F32) for name in ("m_run", "l_run", "m_new", "alpha", "m_safe")},
            "bounds": T.alloc_buffer((4,), I64),  # hull lo / hi, exact max-lo / min-hi over the tile's rows
            # a paged cache: each key's page and slot in the current key tile, the last bad block-table entry read
            **({"key_page": T.alloc_buffer((bn,), I32), "key_slot": T.alloc_buffer((bn,), I32),
                "worst": T.alloc_buffer((1,), I32)} if paged else {})}


@dataclass(frozen=True)
class Places:
    """Where a task's rows and keys live: index tuples into q (and out), lse, and k / v."""

    q: Callable  # q(h, i) for row i (any i < M) of head h of the sequence
    lse: Callable  # lse(h, i)
    key: Callable  # key(jj, j) for key j = j0 + jj of the current key tile (j < N)


def _places(seqs: Sequences, r: Rows, kvh, scratch: dict) -> Places:
    if seqs.ragged_q:
        def q_place(h, i): return (h, r.q_row0 + i)
    else:
        def q_place(h, i): return (r.b, h, i)
    if seqs.paged:
        key_page, key_slot = scratch["key_page"], scratch["key_slot"]

        def key(jj, j): return (key_page[jj], kvh, key_slot[jj])
    elif seqs.ragged_kv:
        def key(jj, j): return (kvh, r.k_row0 + j)
    else:
        def key(jj, j): return (r.b, kvh, j)
    return Places(q_place, q_place, key)


def _attention_task(plan: KernelPlan, sched: CpuSchedule, a: Args, seqs: Sequences, task, q_tiles, scratch: dict,
                    bad) -> None:
    """One task (serving.Sequences.rows): its query tile against every key tile it keeps; with a paged cache
    it notes the last bad block-table entry it read into bad[0][task] (its sequence into bad[1][task])."""
    r = seqs.rows(task, tir.truncdiv(a.sizes["H"], sched.pack), q_tiles)
    if bad is not None:
        T.buffer_store(scratch["worst"], -1, [0])
    with T.If(r.rows > 0):
        with T.Then():
            summary_row = seqs.summary_row(r, summary_heads(plan, a.sizes), q_tiles) if a.summary is not None \
                else None
            _attention_tile(plan, sched, a, seqs, r, summary_row, scratch)
    if bad is not None:
        T.buffer_store(bad[0], scratch["worst"][0], [task])
        T.buffer_store(bad[1], r.b, [task])


def _attention_tile(plan: KernelPlan, sched: CpuSchedule, a: Args, seqs: Sequences, r: Rows, summary_row,
                    scratch: dict) -> None:
    """The query tile of `r` (at least one row) against every key tile it keeps. With the GQA group's heads packed
    (sched.pack > 1), lane l of the tile is row r.i0 + l % (block_m / pack) of head pack * r.h + l // (block_m /
    pack): each K/V tile is read once for the packed heads."""
    spec, score = plan.spec, plan.score
    norm = lower_normalizer(spec.normalizer)
    bm, bn = sched.block_m, sched.block_n
    d_model, dv_model = plan.head_dim, plan.value_dim
    s = a.sizes
    b, i0, rows = r.b, r.i0, r.rows
    m, n = r.sizes["M"], r.sizes["N"]
    pack, per_head = sched.pack, bm // sched.pack
    h = T.Bind(r.h * pack)  # the first packed head

    def lane_h(lane):  # a lane's head and row (per_head is a power of two: a shift and a mask)
        return h + tir.truncdiv(lane, per_head) if pack > 1 else h

    def lane_i(lane):
        return i0 + (tir.truncmod(lane, per_head) if pack > 1 else lane)

    # the lanes that hold rows: the first `rows` (pack = 1), or those of each packed head's first `rows`
    lanes = bm if pack > 1 else rows

    def live(lane):
        return tir.truncmod(lane, per_head) < rows if pack > 1 else None
    n_i64 = tir.Cast(I64, n)
    q_t, s_t, acc, bounds = scratch["q_t"], scratch["s_t"], scratch["acc"], scratch["bounds"]
    m_run, l_run, m_new = scratch["m_run"], scratch["l_run"], scratch["m_new"]
    alpha, m_safe = scratch["alpha"], scratch["m_safe"]
    # Indices are non-negative: truncated division is one instruction (floored division by a
    # runtime value expands into selects, which once made LLVM take seconds on the GQA kernels).
    kvh = T.Bind(tir.truncdiv(h, tir.truncdiv(s["H"], s["HKV"])))
    places = _places(seqs, r, kvh, scratch)

    def scope(lane, j=None, qk=None) -> Scope:
        return a.scope({"b": b, "h": lane_h(lane), "i": lane_i(lane), **({} if j is None else {"j": j})}, qk,
                       r.sizes)

    # -- which key tiles run, and which of them are full (passes.masks.key_tiles)
    init_bounds(bounds, n_i64)
    with T.serial(0, lanes) as i:
        with _only_if(live(i)), registers():
            row = row_bounds(Emitter(spec, scope(i)), plan.masks, n_i64)
            reduce_bounds(bounds, [T.Bind(x) for x in row])
    t_start, f_start, f_end, t_end = key_tiles(bounds, bn)

    # -- Q^T, and the running max / sum / output
    with T.serial(0, bm) as i:
        with T.serial(0, d_model) as d:
            T.buffer_store(q_t, tir.Cast(F32, a.q[(*places.q(lane_h(i), tir.min(lane_i(i), m - 1)), d)]), [d, i])
        with T.vectorized(0, dv_model) as d:
            T.buffer_store(acc, f32(0), [i, d])
    def row_start(i):
        if score.sink2 is None:
            T.buffer_store(m_run, f32(NEG_INF), [i])
            T.buffer_store(l_run, f32(0), [i])
        else:  # the sink starts the row: max = sink, sum = exp2(sink - sink)
            sink = Emitter(spec, scope(i)).float(score.sink2)
            T.buffer_store(m_run, sink, [i])
            T.buffer_store(l_run, tir.Select(sink == f32(NEG_INF), f32(0), f32(1)), [i])
    vectorized(bm, row_start)

    with T.serial(t_start, t_end) as kt:
        with _kept_tile(a, summary_row, kt):
            j0 = T.Bind(kt * bn)
            if seqs.paged:
                seqs.map_pages(r, j0, bn, scratch["key_page"], scratch["key_slot"], scratch["worst"])
            if norm.running_max:
                with T.vectorized(0, bm) as i:
                    T.buffer_store(m_new, m_run[i], [i])
            row_max = m_new if norm.running_max else None
            by_tile_kind(plan, kt, f_start, f_end,
                         lambda masked: _scores(sched, plan, a, places, scope, q_t, s_t, row_max, n, j0, masked),
                         None if summary_row is None else a.summary[summary_row, kt])
            if norm.running_max:
                # m_run stays -inf while a row has kept nothing (a finite stand-in would lose the mass of
                # later logits far below it); `m_safe` is what gets subtracted, so -inf - -inf never occurs.
                with T.vectorized(0, bm) as i:
                    T.buffer_store(m_safe, tir.Select(m_new[i] == f32(NEG_INF), f32(0), m_new[i]), [i])
                    T.buffer_store(alpha, exp2_nonpositive(m_run[i] - m_safe[i]), [i])
                    T.buffer_store(m_run, m_new[i], [i])
                    T.buffer_store(l_run, l_run[i] * alpha[i], [i])
            with T.serial(0, bn) as jj:
                with T.vectorized(0, bm) as i:
                    T.buffer_store(s_t, norm.weight(s_t[jj, i], m_safe[i], False), [jj, i])
                    T.buffer_store(l_run, l_run[i] + s_t[jj, i], [i])
            _accumulate(sched, a, places, s_t, acc, alpha if norm.running_max else None, j0, tir.min(bn, n - j0),
                        dv_model, lanes)

    # -- out = acc scaled as the normalizer says (0 for a row with nothing kept), lse = ln of the total weight;
    # rows that bad index data reached are NaN
    poison = r.poison
    if seqs.paged:
        poison = tir.Or(poison, scratch["worst"][0] >= 0)
    nan = tir.reinterpret(F32, tir.const(0x7FC00000, I32))
    with T.serial(0, lanes) as i:
        with _only_if(live(i)):
            inv = T.Bind(norm.out_scale(l_run[i]))
            with T.vectorized(0, dv_model) as d:
                value = acc[i, d] * inv
                T.buffer_store(a.out, tir.Cast(a.out.dtype, value if poison is None else
                                               tir.Select(poison, nan, value)), [*places.q(lane_h(i), lane_i(i)), d])
            if a.lse is not None:
                value = norm.lse(m_run[i], l_run[i])
                T.buffer_store(a.lse, value if poison is None else tir.Select(poison, nan, value),
                               list(places.lse(lane_h(i), lane_i(i))))


@contextmanager
def _only_if(condition):
    """The block runs where `condition` holds (None: always)."""
    if condition is None:
        yield
        return
    with T.If(condition):
        with T.Then():
            yield


@contextmanager
def _kept_tile(a: Args, summary_row, kt):
    """The key tile's body runs unless the tile summary says it keeps nothing."""
    if summary_row is None:
        yield
        return
    with T.If(a.summary[summary_row, kt] != 0):
        with T.Then():
            yield


def key_tiles(bounds, bn: int):
    """(t_start, f_start, f_end, t_end) as bound variables, from a tile's reduced row bounds [hull lo, hull hi,
    max exact lo, min exact hi] (int64): passes.masks.key_tiles in TIR."""
    any_keys = bounds[1] > bounds[0]
    zero = tir.const(0, I64)
    t_start = T.Bind(tir.Cast(I32, tir.Select(any_keys, tir.floordiv(bounds[0], bn), zero)))
    t_end = T.Bind(tir.Cast(I32, tir.Select(any_keys, tir.floordiv(bounds[1] + bn - 1, bn), zero)))
    f_start = T.Bind(tir.min(tir.max(tir.Cast(I32, tir.floordiv(bounds[2] + bn - 1, bn)), t_start), t_end))
    f_end = T.Bind(tir.min(tir.max(tir.Cast(I32, tir.floordiv(bounds[3], bn)), f_start), t_end))
    return t_start, f_start, f_end, t_end


def row_bounds(em: Emitter, masks, n_keys):
    """[hull lo, hull hi, exact lo, exact hi] of the row `em` stands for (int64 expressions)."""
    zero = tir.const(0, I64)
    return (_bound(em, masks.hull.lower, tir.max, zero), _bound(em, masks.hull.upper, tir.min, n_keys),
            _bound(em, masks.exact.lower, tir.max, zero), _bound(em, masks.exact.upper, tir.min, n_keys))


def reduce_bounds(bounds, row) -> None:
    """Fold one row's bounds into the tile's: hull over rows that keep a key, exact ranges intersected."""
    lo, hi, exact_lo, exact_hi = row
    with T.If(hi > lo):
        with T.Then():
            T.buffer_store(bounds, tir.min(bounds[0], lo), [0])
            T.buffer_store(bounds, tir.max(bounds[1], hi), [1])
    T.buffer_store(bounds, tir.max(bounds[2], exact_lo), [2])
    T.buffer_store(bounds, tir.min(bounds[3], exact_hi), [3])


def init_bounds(bounds, n_keys) -> None:
    for index, value in enumerate((n_keys, tir.const(0, I64), tir.const(0, I64), n_keys)):
        T.buffer_store(bounds, value, [index])


def _bound(em: Emitter, exprs, combine, start):
    value = start
    for e in exprs:
        value = combine(value, em.int(e))
    return value


def by_tile_kind(plan: KernelPlan, kt, f_start, f_end, emit, tile_class=None) -> None:
    """emit(masked=True) for partial key tiles, emit(masked=False) for full ones ([f_start, f_end)); with
    element-wise mask conjuncts no tile is known to be full, unless a tile summary's class (`tile_class`, 1: the
    evaluated conjuncts keep every element) says so."""
    if plan.masks.evaluated and tile_class is None:
        emit(True)
        return
    partial = tir.Or(kt < f_start, kt >= f_end)
    with T.If(partial if tile_class is None else tir.Or(tile_class == 2, partial)):
        with T.Then():
            emit(True)
        with T.Else():
            emit(False)


def logit2(plan: KernelPlan, em: Emitter, j, masked: bool) -> tir.PrimExpr:
    """The base-2 logit of the element `em` stands for; on a partial tile -inf where a mask (or j < N) fails."""
    logit = em.float(plan.score.logits2)
    if not masked:
        return logit
    keep = j < em.scope.sizes["N"]
    for m in plan.spec.masks:
        keep = tir.And(keep, em.bool(m))
    return tir.Select(keep, logit, f32(NEG_INF))


def _scores(sched: CpuSchedule, plan: KernelPlan, a: Args, places: Places, scope, q_t, s_t, m_new, n, j0,
            masked: bool) -> None:
    """s_t[jj, :] = logits2 of q_t^T k[j0 + jj] (masked elements -inf on partial tiles), m_new <- the running
    row max (None: the normalizer keeps none). Keys past N read key N - 1 (they are masked). The logits are taken
    from the register tile, so the scores make one pass through memory."""
    last = n - 1

    def logits(jj, reg):
        def lane(i):
            j = j0 + jj
            em = Emitter(plan.spec, scope(i, j, qk=reg[i]))
            T.buffer_store(s_t, logit2(plan, em, j, masked), [jj, i])
            if m_new is not None:
                T.buffer_store(m_new, tir.max(m_new[i], s_t[jj, i]), [i])
        vectorized(sched.block_m, lane)

    transposed_product(sched, lambda jj, d: tir.Cast(F32, a.k[(*places.key(jj, tir.min(j0 + jj, last)), d)]),
                       lambda d, i: q_t[d, i], plan.head_dim, logits)


def _accumulate(sched: CpuSchedule, a: Args, places: Places, p_t, acc, alpha, j0, keys, dv_model: int, rows) -> None:
    """acc = acc * alpha + P V over the tile's `keys` valid keys (alpha None: acc + P V), for the register tiles
    holding the task's `rows` rows (the others are never stored)."""
    accumulate(sched, sched.block_m, dv_model, keys,
               lambda r, c: acc[r, c] if alpha is None else acc[r, c] * alpha[r], lambda jj, r: p_t[jj, r],
               lambda jj, c: tir.Cast(F32, a.v[(*places.key(jj, j0 + jj), c)]),
               lambda r, c, value: T.buffer_store(acc, value, [r, c]), rows)


def transposed_product(sched: CpuSchedule, row, column, length: int, consume) -> None:
    """The transposed register-tile product (module doc): for each register tile of kv_rows rows jj of the
    block_n-row block, reg[i] = sum_{d < length} row(jj, d) * column(d, i) over the block_m lanes i (each row
    element a broadcast), then consume(jj, reg)."""
    bm, rj = sched.block_m, sched.kv_rows
    with T.serial(0, sched.block_n // rj) as jo:
        regs = [T.alloc_buffer((bm,), F32) for _ in range(rj)]
        for reg in regs:
            with T.vectorized(0, bm) as i:
                T.buffer_store(reg, f32(0), [i])
        with T.serial(0, length) as d:
            for r, reg in enumerate(regs):
                element = row(jo * rj + r, d)
                with T.vectorized(0, bm) as i:
                    T.buffer_store(reg, reg[i] + element * column(d, i), [i])
        for r, reg in enumerate(regs):
            consume(jo * rj + r, reg)


def accumulate(sched: CpuSchedule, rows: int, cols: int, steps, load, weight, value, store, live_rows=None) -> None:
    """The accumulating register-tile product (module doc): store(r, c, load(r, c) + sum_{t < steps} weight(t, r)
    * value(t, c)) for r < rows, c < cols, one out_rows x out_cols register tile at a time (lanes over c, each
    weight a broadcast). `live_rows`: only the register tiles holding rows below it run (a decode task's few
    rows)."""
    rp = sched.out_rows
    for c0 in range(0, cols, sched.out_cols):
        width = min(sched.out_cols, cols - c0)
        with T.serial(0, rows // rp if live_rows is None else tir.truncdiv(live_rows + rp - 1, rp)) as io:
            regs = [T.alloc_buffer((width,), F32) for _ in range(rp)]
            for r, reg in enumerate(regs):
                with T.vectorized(0, width) as c:
                    T.buffer_store(reg, load(io * rp + r, c0 + c), [c])
            with T.serial(0, steps) as t:
                for r, reg in enumerate(regs):
                    w = weight(t, io * rp + r)
                    with T.vectorized(0, width) as c:
                        T.buffer_store(reg, reg[c] + w * value(t, c0 + c), [c])
            for r, reg in enumerate(regs):
                with T.vectorized(0, width) as c:
                    store(io * rp + r, c0 + c, reg[c])
