"""Ragged and paged storage in the CPU kernel (kernel.py; docs/serving.md): which rows and keys a task takes, and
the checks of the index data.

Tasks: with a dense q, one per (batch, head, query tile) as for dense specs; with a ragged q, one per (head,
row tile) where sequence b's row tiles start at (cu[b] + b * (block_m - 1)) // block_m (room for every
sequence's last partial tile, as in the Triton decode kernel), and a task finds its sequence by binary search over
the offsets. Inside a task, M and N are the sequence's own lengths (the expressions' sizes), i and j positions in
it.

Index data is untrusted (attnc/index_data.py), with the Triton serving kernel's rule: offsets are used clamped
into [0, total] (the first taken as 0, the last as the total), lengths clamped into [0, MAXP * PAGE], a bad page id
reads page 0; the rows that bad data reaches are NaN. Offsets that decrease anywhere make every row NaN (and no
key is read). A serial prologue, before the tasks, checks the offsets and lengths once and records their first
violation in the error buffer (backends/device_errors.py); each task notes the last bad block-table entry among
the key tiles it reads, and a serial epilogue records the first task's. Serial, so the records need no atomics.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx as tir
from tvm.script.ir_builder import tirx as T

from ... import index_data
from ...ir import Paged
from .emit import I32, I64

ERRORS, SITE = "errors", "err_site"  # the error buffer (int64 [index_data.SLOTS]) and the spec's site number


def is_serving(spec) -> bool:
    return spec.q_storage is not None or spec.kv_storage is not None


def boundary(offsets: tir.Buffer, k, n_seq, total):
    """(offset k as the kernel uses it, whether that changed it): k == 0 gives 0, k == n_seq the total, others
    clamped into [0, total]."""
    x = offsets[k]
    used = tir.Select(k == 0, tir.const(0, I32),
                      tir.Select(k == n_seq, total, tir.min(tir.max(x, tir.const(0, I32)), total)))
    return used, used != x


def record(errors: tir.Buffer, bad, site, tensor: int, kind: int, seq, index, value, limit, other) -> None:
    """Count a violation; the first one counted keeps its details (index_data's record). Serial code only."""
    with T.If(bad):
        with T.Then():
            with T.If(errors[index_data.COUNT] == tir.const(0, I64)):
                with T.Then():
                    for slot, x in ((index_data.SITE, site), (index_data.TENSOR, tensor), (index_data.KIND, kind),
                                    (index_data.SEQ, seq), (index_data.INDEX, index), (index_data.VALUE, value),
                                    (index_data.LIMIT, limit), (index_data.OTHER, other)):
                        T.buffer_store(errors, tir.const(x, I64) if isinstance(x, int) else tir.Cast(I64, x),
                                       [slot])
            T.buffer_store(errors, errors[index_data.COUNT] + tir.const(1, I64), [index_data.COUNT])


def settled(*values) -> list:
    """`values` (int32) bound through a small buffer: TVM's analyzer then sees loads, not the clamps and selects
    behind them, which it would otherwise simplify again wherever they are used (the ragged kernels compiled about
    2x slower)."""
    buf = T.alloc_buffer((len(values),), I32)
    for n, x in enumerate(values):
        T.buffer_store(buf, x, [n])
    return [T.Bind(buf[n]) for n in range(len(values))]


@dataclass
class Rows:
    """What one task takes: sequence b, query head h, its rows i0 .. i0 + rows - 1 of the sequence, the
    sequence's own sizes, and whether bad index data reached it (None: the spec has no index data)."""

    b: tir.PrimExpr
    h: tir.PrimExpr
    tile: tir.PrimExpr  # the task's query tile: of the sequence (dense q), or its row tile (ragged q)
    i0: tir.PrimExpr
    rows: tir.PrimExpr
    sizes: dict
    q_row0: tir.PrimExpr | None  # the sequence's first row in a ragged q (and out, lse)
    k_row0: tir.PrimExpr | None  # the sequence's first key in ragged k, v
    poison: tir.PrimExpr | None


class Sequences:
    """The storage of one spec in a CPU kernel: its tasks, each task's Rows, and the index-data checks."""

    def __init__(self, plan, a, block_m: int):
        spec = plan.spec
        self.spec, self.a, self.block_m = spec, a, block_m
        s = a.sizes
        self.ragged_q = spec.q_storage is not None
        self.paged = isinstance(spec.kv_storage, Paged)
        self.ragged_kv = spec.kv_storage is not None and not self.paged
        self.n_seq = s["B"]
        self.tensor_index = {t.name: n for n, t in enumerate(spec.inputs)}
        # (offsets name, total, is k's) of each distinct check: q's against T, k's against TK
        self.offsets = []
        if self.ragged_q:
            self.offsets.append((spec.q_storage.offsets, s["T"], 0))
        if self.ragged_kv and (spec.kv_storage.offsets, s["TK"]) not in [o[:2] for o in self.offsets]:
            self.offsets.append((spec.kv_storage.offsets, s["TK"], 1))
        self.errors = a.errors
        self.disorder = None

    # -- before the tasks

    def prologue(self, record_violations: bool) -> None:
        """Check the offsets (start, first decrease, end; the reference's order) and, with `record_violations`,
        record the first violation of each and of the lengths; bind `disorder`: some offsets decrease."""
        if not is_serving(self.spec):
            return
        a, n_seq = self.a, self.n_seq
        flags = T.alloc_buffer((2,), I32)  # any decrease; the first decrease of the current offsets
        T.buffer_store(flags, 0, [0])
        for name, total, is_kv in self.offsets:
            off = a.inputs[name]
            T.buffer_store(flags, n_seq + 1, [1])
            with T.serial(0, n_seq) as k:
                with T.If(tir.And(flags[1] > n_seq, off[k + 1] < off[k])):
                    with T.Then():
                        T.buffer_store(flags, k + 1, [1])
            at = T.Bind(tir.min(flags[1], n_seq))
            dropped = T.Bind(flags[1] <= n_seq)
            start, end = off[0], off[n_seq]
            bad_start = start != 0
            index = T.Bind(tir.Select(bad_start, 0, tir.Select(dropped, at, n_seq)))
            if record_violations:
                record(self.errors, tir.Or(tir.Or(bad_start, dropped), end != total), a.site, self.tensor_index[name],
                       tir.Select(bad_start, index_data.OFFSETS_START,
                                  tir.Select(dropped, index_data.OFFSETS_DECREASE, index_data.OFFSETS_END)),
                       tir.max(index - 1, 0), index, tir.Select(bad_start, start, tir.Select(dropped, off[at], end)),
                       total, tir.Select(dropped, off[tir.max(at - 1, 0)], is_kv))
            with T.If(dropped):
                with T.Then():
                    T.buffer_store(flags, 1, [0])
        if self.paged and record_violations:
            lengths = a.inputs[self.spec.kv_storage.lengths]
            cap = self.capacity()
            with T.serial(0, n_seq) as b:
                n = lengths[b]
                record(self.errors, tir.Or(n < 0, n > cap), a.site, self.tensor_index[self.spec.kv_storage.lengths],
                       index_data.LENGTH, b, b, n, cap, a.sizes["MAXP"])
        self.disorder = T.Bind(flags[0] != 0)

    def capacity(self):
        s = self.a.sizes
        return s["MAXP"] * s["PAGE"]

    # -- the tasks

    def task_count(self, heads, q_tiles):
        """Tasks over `heads` heads (H, or 1 for a tile summary the heads share)."""
        if self.ragged_q:
            return heads * self.q_programs()
        return self.n_seq * heads * q_tiles

    def q_programs(self):
        bm = self.block_m
        return tir.truncdiv(self.a.sizes["T"] + self.n_seq * (bm - 1), bm)

    def rows(self, task, heads, q_tiles) -> Rows:
        """The Rows of task number `task` among task_count(heads, q_tiles)."""
        a, s, bm = self.a, self.a.sizes, self.block_m
        sizes = dict(s)
        poison = None
        q_row0 = k_row0 = None
        if self.ragged_q:
            programs = self.q_programs()
            h = T.Bind(tir.truncdiv(task, programs))
            p = T.Bind(tir.truncmod(task, programs))
            off = a.inputs[self.spec.q_storage.offsets]
            total = s["T"]

            def first_tile(b):
                return tir.truncdiv(boundary(off, b, self.n_seq, total)[0] + b * (bm - 1), bm)

            search = T.alloc_buffer((2,), I32)  # [lo, hi): the last sequence whose tiles start at or before p
            T.buffer_store(search, 0, [0])
            T.buffer_store(search, self.n_seq, [1])
            with T.While(search[1] - search[0] > 1):
                mid = T.Bind(tir.truncdiv(search[0] + search[1], 2))
                with T.If(first_tile(mid) <= p):
                    with T.Then():
                        T.buffer_store(search, mid, [0])
                    with T.Else():
                        T.buffer_store(search, mid, [1])
            found = T.Bind(search[0])
            q_start, start_moved = boundary(off, found, self.n_seq, total)
            q_end, end_moved = boundary(off, found + 1, self.n_seq, total)
            q_start, q_end = T.Bind(q_start), T.Bind(q_end)
            poison = tir.Or(start_moved, end_moved)
            # without a partition of the rows, each task takes block_m rows by position (the tasks cover T), as NaN
            b, q_row0, sizes["M"], i0 = settled(
                tir.Select(self.disorder, 0, found), tir.Select(self.disorder, 0, q_start),
                tir.Select(self.disorder, total, tir.max(q_end - q_start, 0)),
                tir.Select(self.disorder, p, p - first_tile(found)) * bm)
            tile = p
        else:
            b = T.Bind(tir.truncdiv(task, heads * q_tiles))
            h = T.Bind(tir.truncmod(tir.truncdiv(task, q_tiles), heads))
            tile = T.Bind(tir.truncmod(task, q_tiles))
            i0 = T.Bind(tile * bm)
        if self.ragged_kv:
            off = a.inputs[self.spec.kv_storage.offsets]
            k_start, start_moved = boundary(off, b, self.n_seq, s["TK"])
            k_end, end_moved = boundary(off, b + 1, self.n_seq, s["TK"])
            k_row0, sizes["N"] = settled(k_start, tir.Select(self.disorder, 0, tir.max(k_end - k_start, 0)))
            moved = tir.Or(start_moved, end_moved)
            poison = moved if poison is None else tir.Or(poison, moved)
        elif self.paged:
            n = a.inputs[self.spec.kv_storage.lengths][b]
            (used,) = settled(tir.Select(self.disorder, 0, tir.min(tir.max(n, 0), self.capacity())))
            sizes["N"] = used
            poison = (n != used) if poison is None else tir.Or(poison, n != used)
        if is_serving(self.spec):
            poison = T.Bind(tir.Or(poison, self.disorder))
        rows = T.Bind(tir.min(bm, sizes["M"] - i0))
        return Rows(b, h, tile, i0, rows, sizes, q_row0, k_row0, poison)

    def summary_row(self, r: Rows, heads, q_tiles):
        """The tile summary's row of r's query tile, whose tasks are those of task_count(heads, q_tiles): heads is
        1 where the heads share the summary."""
        hh = tir.Select(heads == 1, 0, r.h)
        if self.ragged_q:
            return hh * self.q_programs() + r.tile
        return (r.b * heads + hh) * q_tiles + r.tile

    # -- the pages of a key tile

    def map_pages(self, r: Rows, j0, block_n: int, key_page, key_slot, worst) -> None:
        """key_page[jj], key_slot[jj]: where key j0 + jj lives (keys past N: the last key's place); a bad page id
        reads page 0 and puts its block-table entry into worst[0] (the largest seen)."""
        s = self.a.sizes
        table = self.a.inputs[self.spec.kv_storage.table]
        n = r.sizes["N"]
        with T.serial(0, block_n) as jj:
            j = T.Bind(j0 + jj)
            entry = T.Bind(tir.truncdiv(tir.min(j, n - 1), s["PAGE"]))
            page = T.Bind(table[r.b, entry])
            ok = tir.And(page >= 0, page < s["PAGES"])
            T.buffer_store(key_page, tir.Select(ok, page, 0), [jj])
            T.buffer_store(key_slot, tir.truncmod(tir.min(j, n - 1), s["PAGE"]), [jj])
            with T.If(tir.And(tir.Not(ok), j < n)):
                with T.Then():
                    T.buffer_store(worst, tir.max(worst[0], entry), [0])

    def epilogue(self, bad_entry: tir.Buffer, bad_seq: tir.Buffer, tasks) -> None:
        """Record the first task's bad block-table entry (bad_entry[task] >= 0)."""
        s, a = self.a.sizes, self.a
        table = a.inputs[self.spec.kv_storage.table]
        lengths = a.inputs[self.spec.kv_storage.lengths]
        with T.serial(0, tasks) as t:
            entry, b = bad_entry[t], bad_seq[t]
            n = tir.min(tir.max(lengths[b], 0), self.capacity())
            record(self.errors, entry >= 0, a.site, self.tensor_index[self.spec.kv_storage.table],
                   index_data.PAGE_ID, b, entry, table[b, entry], s["PAGES"], n)
