"""IR expressions -> Triton code, one assignment per node, hoisted to where it is invariant.

Every value has a *level*: scalar (per program: sizes, params, b), row ([BLOCK_M]: i, h), col ([BLOCK_N]: j)
or tile ([BLOCK_M, BLOCK_N]: qk). A `Layout` says where each level goes: in the query-major kernels (forward,
dQ) scalar and row values are emitted once into the kernel's prologue and col and tile values into the current
scope (a loop body); the key-major dK/dV kernel holds one key tile and loops over query tiles, so there col values
are the invariant ones and its tile is [BLOCK_N, BLOCK_M]. Operands of mixed levels are broadcast with [:, None] /
[None, :]. Semantics follow the reference: ints are int64 with floored `%` and `//`, `/` is true division, booleans
count as ints in arithmetic, and int/float mixes compute in float32. Integer results that provably fit int32
(from the known ranges of positions and literals) stay int32, which keeps per-element tile math cheap; any
other integer arithmetic widens its operands to int64 first. Positions i and j are below ir.POSITION_LIMIT, and the
sequence lengths M and N at most it (bind() checks), so position arithmetic such as ALiBi's j - (i + N - M) stays
int32.
Each operator's rendering and int32 range rule come from the operator table (ops.py); a shared subexpression
is emitted once.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

from ...ir import (POSITION_LIMIT, QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef,
                   Unary, children)
from ...ops import Formula, Kinds, Op, compute_kind, op_of
from .. import names

SCALAR, ROW, COL, TILE = 0, 1, 2, 3

# The base-2 exponential a module calls. On a GPU it is inline PTX (the instruction libdevice's would become), so a
# kernel that calls no libdevice function compiles without linking libdevice, and divisions go through the
# one-instruction reciprocal (common.j2's rcp_approx); the interpreter runs no inline assembly.
PORTABLE_EXP2, PTX_EXP2 = "tl.exp2", "ex2_approx"


def exp2_for(arch) -> str:
    """The exp2 of a kernel for `arch` (a Target's; None: the interpreter)."""
    return PORTABLE_EXP2 if arch is None else PTX_EXP2


def reciprocal(exp2: str, x: str) -> str:
    """1 / x in a module whose exp2 is `exp2`: IEEE division, or on a GPU rcp.approx (for values where its flush of
    subnormals and its ulp do no harm)."""
    return f"1.0 / ({x})" if exp2 == PORTABLE_EXP2 else f"rcp_approx({x})"


def divide(exp2: str, a: str, b: str, broadcast: str = "") -> str:
    """a / b in a module whose exp2 is `exp2`, b's value then indexed by `broadcast` (`[:, None]`: a row vector over a
    tile): IEEE division in the interpreter; on a GPU a times b's reciprocal, one instruction a b where Triton's `/`
    (div.full.f32) takes three more an element."""
    if exp2 == PORTABLE_EXP2:
        return f"{a} / {b}{broadcast}"
    return f"{a} * {reciprocal(exp2, b)}{broadcast}"


def dot_tile(spec: Attention, dot: QK) -> str:
    """The name of a dot product's score tile: qk, or qk_n for the n-th of the spec's dot products (latent
    attention's `qr @ kr`; only the decode template computes those)."""
    return "qk" if dot.is_qk else f"qk_{spec.dots.index(dot)}"

_INT32 = (-2 ** 31, 2 ** 31 - 1)
_POSITIONS = {"i", "j"}
_LENGTHS = {"M", "N"}  # the sizes of the position axes (a ragged or paged sequence's own, in-kernel, at most them)


@dataclass(frozen=True)
class Layout:
    """How a kernel holds the levels: each index variable's code and level, the scope each level's values are
    emitted into (per level SCALAR, ROW, COL, TILE: 0 the prologue, 1 the first scope opened, -1 the innermost),
    and the tile's axes (`keys_major`: [BLOCK_N, BLOCK_M], a row value broadcasting as [None, :])."""

    index: tuple[tuple[str, str, int], ...]  # (index variable, code, level)
    scopes: tuple[int, int, int, int]
    keys_major: bool = False

    def broadcast(self, level: int) -> str:
        """The suffix that broadcasts a row or col vector against a tile."""
        return "[:, None]" if (level == ROW) != self.keys_major else "[None, :]"

    @property
    def tile_shape(self) -> str:
        return "[BLOCK_N, BLOCK_M]" if self.keys_major else "[BLOCK_M, BLOCK_N]"

    def valid(self, level: int) -> str:
        """Code for the positions a value of `level` holds that are inside the sequences (row_valid, col_valid)."""
        if level == TILE:
            return f"row_valid{self.broadcast(ROW)} & col_valid{self.broadcast(COL)}"
        return {ROW: "row_valid", COL: "col_valid"}[level]


# The forward and dQ kernels: a program holds query rows (packed heads among them) and loops over key tiles.
QUERY_MAJOR = Layout((("b", "b", SCALAR), ("h", "h_row", ROW), ("i", "i_row", ROW), ("j", "j_col", COL)),
                     (0, 0, -1, -1))
# The dK/dV kernel: a program holds one key tile and loops over the group's heads (the prologue, scope 0, is
# emitted per head, so h is a scalar and col values are hoisted to it) and over query tiles (scope 1: the rows).
KEY_MAJOR = Layout((("b", "b", SCALAR), ("h", "h", SCALAR), ("i", "i_row", ROW), ("j", "j_col", COL)),
                   (0, 1, 0, -1), keys_major=True)


@dataclass(frozen=True)
class Vectors:
    """How a generated module spells a new vector or tile. Triton infers layouts; Gluon names them: its kernel
    functions bind ROW, COL and TILE to the layouts of their [BLOCK_M], [BLOCK_N] and [BLOCK_M, BLOCK_N] values."""

    gluon: bool = False

    def _layout(self, shape: str) -> str:
        return {"[BLOCK_M]": "ROW", "[BLOCK_N]": "COL"}.get(shape, "TILE")

    def zeros(self, shape: str, dtype: str) -> str:
        return f"gl.zeros({shape}, {dtype}, {self._layout(shape)})" if self.gluon else f"tl.zeros({shape}, {dtype})"

    def full(self, shape: str, value: str, dtype: str) -> str:
        if self.gluon:
            return f"gl.full({shape}, {value}, {dtype}, {self._layout(shape)})"
        return f"tl.full({shape}, {value}, {dtype})"

    def scalar(self, value: str, dtype: str) -> str:
        """A 0-d tensor (Gluon's takes its default layout)."""
        return f"gl.full([], {value}, {dtype})" if self.gluon else f"tl.full([], {value}, {dtype})"

    def arange(self, size: str) -> str:
        return f"gl.arange(0, {size}, layout={self._layout(f'[{size}]')})" if self.gluon else f"tl.arange(0, {size})"


TRITON_VECTORS = Vectors()
GLUON_VECTORS = Vectors(gluon=True)


@dataclass(frozen=True)
class Value:
    code: str  # a name or a literal
    level: int
    kind: str  # "int" | "float" | "bool"
    literal: bool = False
    span: tuple[int, int] | None = None  # ints: [lo, hi] when the code is int32 and provably in it; else int64


class Emitter:
    def __init__(self, spec: Attention, exp2: str = PORTABLE_EXP2, layout: Layout = QUERY_MAJOR,
                 vectors: Vectors = TRITON_VECTORS, approx: Iterable[str] = ()):
        self.spec = spec
        self.exp2 = exp2  # the base-2 exponential's name in the kernel module (exp2 and the formulas use it)
        # the functions rendered as their one-instruction approximation (Op.triton_approx: inline PTX, so only
        # beside the PTX exp2; KernelPlan.approximated)
        self.approx = frozenset(approx) if exp2 == PTX_EXP2 else frozenset()
        self.layout = layout
        self.vectors = vectors
        self._index = {name: (code, level) for name, code, level in layout.index}
        self.kinds = Kinds(spec)
        self.prologue: list[str] = []
        # scopes[0] is the prologue; each scope has its lines and a memo (CSE) that inner scopes see.
        self._scopes: list[tuple[list[str], dict[Expr, Value]]] = [(self.prologue, {})]
        self._count = 0

    @contextmanager
    def scope(self):
        """A loop-body scope: col/tile values emitted inside land in the yielded list."""
        lines: list[str] = []
        self._scopes.append((lines, {}))
        try:
            yield lines
        finally:
            self._scopes.pop()

    # -- public helpers

    def bind(self, e: Expr, code: str, level: int, kind: str) -> None:
        """Let `e` (a placeholder such as grad.WEIGHT) stand for `code` in the current scope."""
        self.kinds.assume(e, kind)
        self._scopes[-1][1][e] = Value(code, level, kind)

    def value(self, e: Expr) -> Value:
        for _, memo in reversed(self._scopes):
            if e in memo:
                return memo[e]
        v = self._emit(e)
        if not v.literal and v.code.startswith("x"):
            self._target(v.level)[1][e] = v
        return v

    def _target(self, level: int) -> tuple[list[str], dict[Expr, Value]]:
        return self._scopes[self.layout.scopes[level]]

    def at(self, v: Value, level: int) -> str:
        """v's code broadcast to `level` (scalars and literals broadcast by themselves)."""
        if v.level == level or v.level == SCALAR:
            return v.code
        if level == TILE and v.level in (ROW, COL):
            return f"{v.code}{self.layout.broadcast(v.level)}"
        raise AssertionError(f"cannot broadcast level {v.level} to {level}")

    def as_float(self, v: Value, level: int) -> str:
        code = self.at(v, level)
        if v.literal and v.kind != "float":
            return repr(float(_literal_value(v)))
        return code if v.kind == "float" else f"{code}.to(tl.float32)"

    def as_int(self, v: Value, level: int, wide: bool = False) -> str:
        """A bool operand of arithmetic counts as an int; `wide`: as int64 (literals convert by themselves)."""
        code = self.at(v, level)
        if v.literal:
            return str(int(_literal_value(v))) if v.kind == "bool" else code
        if v.kind == "bool" or wide:
            dtype = "tl.int64" if wide else "tl.int32"
            # scalars may arrive as Python ints (specialized or interpreted arguments): tl.cast takes both
            return f"tl.cast({code}, {dtype})" if v.level == SCALAR else f"{code}.to({dtype})"
        return code

    # -- emission

    def _assign(self, code: str, level: int, kind: str, span: tuple[int, int] | None = None) -> Value:
        name = f"x{self._count}"
        self._count += 1
        self._target(level)[0].append(f"{name} = {code}")
        return Value(name, level, kind, span=span)

    def _emit(self, e: Expr) -> Value:
        kind = self.kinds(e)
        if isinstance(e, Num):
            return Value(_literal(e), SCALAR, kind, literal=True, span=_literal_span(e))
        if isinstance(e, IndexVar):
            name, level = self._index[e.name]
            return Value(name, level, "int", span=(0, POSITION_LIMIT - 1) if e.name in _POSITIONS else None)
        if isinstance(e, SizeRef):
            return Value(names.size(e.name), SCALAR, "int", span=(0, POSITION_LIMIT if e.name in _LENGTHS else _INT32[1]))
        if isinstance(e, ParamRef):
            return Value(names.param(e.name), SCALAR, kind)
        if isinstance(e, QK):
            return Value(dot_tile(self.spec, e), TILE, "float")
        if isinstance(e, Lookup):
            return self._lookup(e, kind)
        if isinstance(e, (Unary, Binary, Call)):
            return self._operator(op_of(e), [self.value(x) for x in children(e)], kind)
        raise TypeError(f"not an IR expression: {e!r}")

    def element(self, e: Lookup, strides: list[str]) -> tuple[str, list[str], int]:
        """The element `e` reads, in a tensor of e's table shape with `strides`: (its int64 offset, the checks that
        keep it inside the sequences and the table, the level)."""
        idx = [self.value(x) for x in e.indices]
        level = _join(*idx)
        dims = self.spec.input(e.tensor).shape
        terms, checks = [], [self.layout.valid(level)] if level != SCALAR else []
        for axis, (v, x) in enumerate(zip(idx, e.indices)):
            code = self.as_int(v, level, wide=True)  # int32 positions, params, sizes: widen before scaling
            terms.append(f"{code} * {strides[axis]}")
            if not _in_range_by_construction(x, dims[axis]):
                # An index out of the table's bounds reads 0, never outside the tensor: the language's rule
                # (dsl/reference.py), which validate mode checks on the host.
                checks.append(f"({code} >= 0) & ({code} < {names.size(dims[axis])})")
        return " + ".join(terms), checks, level

    def _lookup(self, e: Lookup, kind: str) -> Value:
        offset, checks, level = self.element(e, [names.stride(e.tensor, a) for a in range(len(e.indices))])
        mask = f", mask={' & '.join(checks)}, other=0" if checks else ""
        load = f"tl.load({names.tensor(e.tensor)} + {offset}{mask})"
        if kind == "float":
            load += ".to(tl.float32)"  # f16/bf16/f64 tables compute in f32 (bf16 loads need it in the interpreter)
        return self._assign(load, level, kind)

    def _operator(self, op: Op, args: list[Value], kind: str) -> Value:
        """One operator node: operands converted to the kind it computes in (ints: int32 where the result's range
        is known to fit, else int64), then the table's rendering."""
        level = _join(*args)
        compute = compute_kind(op, [v.kind for v in args])
        span = None
        if kind == "int" and op.span is not None:
            span = op.span(*(_span(v) for v in args))
        codes = []
        for role, v in zip(op.operands, args):
            if role == "bool" or compute == "bool":
                codes.append(self.at(v, level))
            elif compute == "float":
                codes.append(self.as_float(v, level))
            else:  # comparisons of ints need no widening: int32 against int64 promotes by itself
                codes.append(self.as_int(v, level, wide=kind == "int" and span is None))
        render = _Rendering(self, level, kind, span, args, compute)
        if op.name in self.approx:
            code = op.triton_approx.format(*codes)
        elif isinstance(op.triton, Formula):
            code = render.formula(op.triton, codes[0])
        elif callable(op.triton):
            code = op.triton(render, *codes)
        else:
            code = op.triton.format(*codes, exp2=self.exp2)
        return self._assign(code, level, kind, span)


class _Rendering:
    """What a table rendering sees of the node it renders: the kind it computes in, `let` (an intermediate
    value named once), `literal` (an operand's value when it is a literal), `exp2`, and the math interface of
    ops.Formula over Triton code."""

    def __init__(self, em: Emitter, level: int, kind: str, span, args: list[Value], compute: str):
        self.em, self.level, self.span, self.args = em, level, span, args
        self.result_kind = kind
        self.kind = compute

    def let(self, code: str) -> str:
        return self.em._assign(code, self.level, self.result_kind, self.span).code

    def literal(self, index: int):
        v = self.args[index]
        return _literal_value(v) if v.literal else None

    def formula(self, formula: Formula, x: str) -> str:
        return formula.build(self, x if x.isidentifier() else self.let(x))

    # -- ops.Formula's math interface (float32 operands)
    add, sub, mul, lt = (lambda self, a, b, op=op: f"({a} {op} {b})" for op in "+-*<")

    def div(self, a: str, b: str) -> str:
        """A formula's division; on a GPU (the inline-PTX exp2) by the one-instruction reciprocal: the formulas divide
        by values at least 1 (tanh's 2 / (e + 1)), where rcp.approx's flush of subnormals and its ulp do no harm."""
        return f"({divide(self.em.exp2, a, b)})"

    def const(self, c: float) -> str:
        return repr(float(c))

    def neg(self, a: str) -> str:
        return f"(-{a})"

    def abs(self, a: str) -> str:
        return f"tl.abs({a})"

    def min(self, a: str, b: str) -> str:
        return f"tl.minimum({a}, {b})"

    def max(self, a: str, b: str) -> str:
        return f"tl.maximum({a}, {b})"

    def exp2(self, a: str) -> str:
        return f"{self.em.exp2}({a})"

    def select(self, cond: str, a: str, b: str) -> str:
        return f"tl.where({cond}, {a}, {b})"


def _span(v: Value) -> tuple[int, int] | None:
    """The int32 range of an int or bool operand, None when it may be int64 (or is a param or size)."""
    if v.kind == "bool":
        return (0, 1)
    return v.span if v.kind == "int" else None


def _fit(span: tuple[int, int] | None) -> tuple[int, int] | None:
    return span if span is not None and _INT32[0] <= span[0] and span[1] <= _INT32[1] else None


def _literal_span(e: Num) -> tuple[int, int] | None:
    if e.is_float:
        return None
    return _fit((int(e.value), int(e.value)))


def _in_range_by_construction(index: Expr, dim: str) -> bool:
    """b < B, h < H, and i < M / j < N on the rows and columns the load mask keeps."""
    return isinstance(index, IndexVar) and (index.name, dim) in (("b", "B"), ("h", "H"), ("i", "M"), ("j", "N"))


def _join(*values: Value) -> int:
    level = SCALAR
    for v in values:
        level |= v.level
    return level


def _literal_value(v: Value):
    if v.kind == "bool":
        return v.code == "True"
    text = v.code.strip("()")
    return int(text) if v.kind == "int" else float(text)


def _literal(e: Num) -> str:
    if isinstance(e.value, bool):
        return "True" if e.value else "False"
    if e.is_float:
        if math.isinf(e.value):
            return "INF" if e.value > 0 else "(-INF)"
        text = repr(float(e.value))
    else:
        text = str(int(e.value))
    return f"({text})" if text.startswith("-") else text
