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
"""
from __future__ import annotations

import math

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...ir import SizeRef, walk
from ...passes import KernelPlan
from .. import names
from .emit import F32, F64, I32, I64, Emitter, Scope, exp2_nonpositive, f32
from .normalize import lower as lower_normalizer
from .schedule import CpuSchedule

# TIR dtypes of the spec's tensor element types. bool tables are passed as uint8 views (DLPack bool and TVM
# bool buffers disagree on the element type); params arrive as int32 / float32 scalars (bool as 0 / 1).
TIR_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": F32, "f64": F64, "i8": "int8", "i16": "int16",
              "i32": I32, "i64": I64, "bool": "uint8"}
PARAM_DTYPES = {"i32": I32, "f32": F32, "bool": I32}
NEG_INF = -math.inf


def parameter_names(spec) -> tuple[str, ...]:
    """The compiled function's parameters in call order (Args declares them; sizes and strides are not
    parameters: TVM reads them from the tensors)."""
    return ("q", "k", "v", "out", *(["lse"] if spec.returns_lse else []),
            *(names.tensor(t.name) for t in spec.inputs), *(names.param(p.name) for p in spec.params))


def size_vars(plan: KernelPlan) -> dict[str, tir.PrimExpr]:
    """Every size the spec names, as a constant where the plan fixes it (D, DV, `dims`), else an int32 variable
    that TVM binds from the first buffer shaped by it."""
    spec = plan.spec
    fixed = {**spec.dim_values, "D": plan.head_dim, "DV": plan.value_dim}
    used = dict.fromkeys(n for t in (spec.q, spec.k, spec.v, *spec.inputs) for n in t.shape)
    for e in (spec.score, *spec.masks, *([spec.normalizer.sink] if spec.normalizer.sink else [])):
        used.update(dict.fromkeys(n.name for n in walk(e) if isinstance(n, SizeRef)))
    sizes = {n: tir.IntImm(I32, fixed[n]) if n in fixed else tir.Var(names.size(n), I32) for n in used}
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


def qkv_shapes(s: dict) -> dict[str, list]:
    """q, k, v and out as [B, heads, sequence, head dim] (canonical_view), from size_vars."""
    return {"q": [s["B"], s["H"], s["M"], s["D"]], "k": [s["B"], s["HKV"], s["N"], s["D"]],
            "v": [s["B"], s["HKV"], s["N"], s["DV"]], "out": [s["B"], s["H"], s["M"], s["DV"]]}


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
    """The PrimFunc's parameters (parameter_names): q, k, v, out, [lse], input tables, params."""

    def __init__(self, plan: KernelPlan):
        spec = plan.spec
        self.sizes = s = size_vars(plan)
        shapes = qkv_shapes(s)
        dtype = TIR_DTYPES[plan.dtype]
        self.q, self.k, self.v, self.out = (buffer_arg(name, shapes[name], dtype) for name in ("q", "k", "v", "out"))
        self.lse = buffer_arg("lse", [s["B"], s["H"], s["M"]], F32) if spec.returns_lse else None
        self.inputs = input_args(spec, s)
        self.params = param_args(spec)

    def scope(self, index, qk=None) -> Scope:
        return Scope(index, self.sizes, self.params, self.inputs, qk)


def build_primfunc(plan: KernelPlan, sched: CpuSchedule, name: str = "attn") -> tir.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            a = Args(plan)
            s = a.sizes
            q_tiles = T.Bind(tir.floordiv(s["M"] + sched.block_m - 1, sched.block_m))
            tasks = T.Bind(s["B"] * s["H"] * q_tiles)
            if not sched.claim_tasks:
                with T.parallel(0, tasks) as task:
                    _attention_tile(plan, sched, a, task, q_tiles, _tile_scratch(plan, sched))
            else:
                claimed_tasks(tasks, lambda task, scratch: _attention_tile(plan, sched, a, task, q_tiles, scratch),
                               lambda: _tile_scratch(plan, sched))
    return ib.get()


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
    return {"q_t": T.alloc_buffer((plan.head_dim, bm), F32), "s_t": T.alloc_buffer((bn, bm), F32),
            "acc": T.alloc_buffer((bm, plan.value_dim), F32),
            **{name: T.alloc_buffer((bm,), F32) for name in ("m_run", "l_run", "m_new", "alpha", "m_safe")},
            "bounds": T.alloc_buffer((4,), I64)}  # hull lo / hi, exact max-lo / min-hi over the tile's rows


def _attention_tile(plan: KernelPlan, sched: CpuSchedule, a: Args, task, q_tiles, scratch: dict) -> None:
    """One task: the query tile `task` (batch, head, tile index) against every key tile it keeps."""
    spec, score = plan.spec, plan.score
    norm = lower_normalizer(spec.normalizer)
    bm, bn = sched.block_m, sched.block_n
    d_model, dv_model = plan.head_dim, plan.value_dim
    s = a.sizes
    n_i64 = tir.Cast(I64, s["N"])
    q_t, s_t, acc, bounds = scratch["q_t"], scratch["s_t"], scratch["acc"], scratch["bounds"]
    m_run, l_run, m_new = scratch["m_run"], scratch["l_run"], scratch["m_new"]
    alpha, m_safe = scratch["alpha"], scratch["m_safe"]
    # Indices are non-negative: truncated division is one instruction (floored division by a
    # runtime value expands into selects, which once made LLVM take seconds on the GQA kernels).
    b = T.Bind(tir.truncdiv(task, s["H"] * q_tiles))
    h = T.Bind(tir.truncmod(tir.truncdiv(task, q_tiles), s["H"]))
    i0 = T.Bind(tir.truncmod(task, q_tiles) * bm)
    kvh = T.Bind(tir.truncdiv(h, tir.truncdiv(s["H"], s["HKV"])))
    rows = T.Bind(tir.min(bm, s["M"] - i0))

    # -- which key tiles run, and which of them are full (passes.masks.key_tiles)
    init_bounds(bounds, n_i64)
    with T.serial(0, rows) as r:
        row = row_bounds(Emitter(spec, a.scope({"b": b, "h": h, "i": i0 + r})), plan.masks, n_i64)
        reduce_bounds(bounds, [T.Bind(x) for x in row])
    t_start, f_start, f_end, t_end = key_tiles(bounds, bn)

    # -- Q^T, and the running max / sum / output
    with T.serial(0, bm) as i:
        with T.serial(0, d_model) as d:
            T.buffer_store(q_t, tir.Cast(F32, a.q[b, h, tir.min(i0 + i, s["M"] - 1), d]), [d, i])
        with T.vectorized(0, dv_model) as d:
            T.buffer_store(acc, f32(0), [i, d])
    with T.vectorized(0, bm) as i:
        if score.sink2 is None:
            T.buffer_store(m_run, f32(NEG_INF), [i])
            T.buffer_store(l_run, f32(0), [i])
        else:  # the sink starts the row: max = sink, sum = exp2(sink - sink)
            sink = Emitter(spec, a.scope({"b": b, "h": h, "i": i0 + i})).float(score.sink2)
            T.buffer_store(m_run, sink, [i])
            T.buffer_store(l_run, tir.Select(sink == f32(NEG_INF), f32(0), f32(1)), [i])

    with T.serial(t_start, t_end) as kt:
        j0 = T.Bind(kt * bn)
        if norm.running_max:
            with T.vectorized(0, bm) as i:
                T.buffer_store(m_new, m_run[i], [i])
        row_max = m_new if norm.running_max else None
        by_tile_kind(plan, kt, f_start, f_end,
                     lambda masked: _scores(sched, plan, a, q_t, s_t, row_max, b, h, kvh, i0, j0, masked))
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
        _accumulate(sched, a, s_t, acc, alpha if norm.running_max else None, b, kvh, j0, tir.min(bn, s["N"] - j0),
                    dv_model)

    # -- out = acc scaled as the normalizer says (0 for a row with nothing kept), lse = ln of the total weight
    with T.serial(0, rows) as i:
        inv = T.Bind(norm.out_scale(l_run[i]))
        with T.vectorized(0, dv_model) as d:
            T.buffer_store(a.out, tir.Cast(a.out.dtype, acc[i, d] * inv), [b, h, i0 + i, d])
        if a.lse is not None:
            T.buffer_store(a.lse, norm.lse(m_run[i], l_run[i]), [b, h, i0 + i])


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


def by_tile_kind(plan: KernelPlan, kt, f_start, f_end, emit) -> None:
    """emit(masked=True) for partial key tiles, emit(masked=False) for full ones ([f_start, f_end)); with
    element-wise mask conjuncts no tile is known to be full."""
    if plan.masks.evaluated:
        emit(True)
        return
    with T.If(tir.Or(kt < f_start, kt >= f_end)):
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


def _scores(sched: CpuSchedule, plan: KernelPlan, a: Args, q_t, s_t, m_new, b, h, kvh, i0, j0, masked: bool) -> None:
    """s_t[jj, :] = logits2 of q_t^T k[j0 + jj] (masked elements -inf on partial tiles), m_new <- the running
    row max (None: the normalizer keeps none). Keys past N read key N - 1 (they are masked). The logits are taken
    from the register tile, so the scores make one pass through memory."""
    last = a.sizes["N"] - 1

    def logits(jj, reg):
        with T.vectorized(0, sched.block_m) as i:
            j = j0 + jj
            em = Emitter(plan.spec, a.scope({"b": b, "h": h, "i": i0 + i, "j": j}, qk=reg[i]))
            T.buffer_store(s_t, logit2(plan, em, j, masked), [jj, i])
            if m_new is not None:
                T.buffer_store(m_new, tir.max(m_new[i], s_t[jj, i]), [i])

    transposed_product(sched, lambda jj, d: tir.Cast(F32, a.k[b, kvh, tir.min(j0 + jj, last), d]),
                       lambda d, i: q_t[d, i], plan.head_dim, logits)


def _accumulate(sched: CpuSchedule, a: Args, p_t, acc, alpha, b, kvh, j0, keys, dv_model: int) -> None:
    """acc = acc * alpha + P V over the tile's `keys` valid keys (alpha None: acc + P V)."""
    accumulate(sched, sched.block_m, dv_model, keys,
               lambda r, c: acc[r, c] if alpha is None else acc[r, c] * alpha[r], lambda jj, r: p_t[jj, r],
               lambda jj, c: tir.Cast(F32, a.v[b, kvh, j0 + jj, c]),
               lambda r, c, value: T.buffer_store(acc, value, [r, c]))


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


def accumulate(sched: CpuSchedule, rows: int, cols: int, steps, load, weight, value, store) -> None:
    """The accumulating register-tile product (module doc): store(r, c, load(r, c) + sum_{t < steps} weight(t, r)
    * value(t, c)) for r < rows, c < cols, one out_rows x out_cols register tile at a time (lanes over c, each
    weight a broadcast)."""
    rp = sched.out_rows
    for c0 in range(0, cols, sched.out_cols):
        width = min(sched.out_cols, cols - c0)
        with T.serial(0, rows // rp) as io:
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
