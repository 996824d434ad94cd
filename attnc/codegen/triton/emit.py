"""IR expressions -> Triton code, one assignment per node, hoisted to where it is invariant.

Every value has a *level*: scalar (per program: sizes, params, b), row ([BLOCK_M]: i, h), col ([BLOCK_N]: j)
or tile ([BLOCK_M, BLOCK_N]: qk). Scalar and row values are emitted once into the kernel's prologue; col and
tile values into the current scope (a loop body). Operands of mixed levels are broadcast with [:, None] /
[None, :]. Semantics follow the reference: ints are int64 with floored `%` and `//`, `/` is true division, booleans
count as ints in arithmetic, and int/float mixes compute in float32. Integer results that provably fit int32
(from the known ranges of positions and literals) stay int32, which keeps per-element tile math cheap; any
other integer arithmetic widens its operands to int64 first. Positions i and j are below POSITION_LIMIT.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

from ...ir import QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Unary, expr_type

SCALAR, ROW, COL, TILE = 0, 1, 2, 3

_FLOAT_FUNCS = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
                "rsqrt": "tl.rsqrt", "sigmoid": "tl.sigmoid", "floor": "tl.floor"}
_INDEX = {"b": ("b", SCALAR), "h": ("h_row", ROW), "i": ("i_row", ROW), "j": ("j_col", COL)}
POSITION_LIMIT = 2 ** 30  # i and j are int32 in the kernel; sums and differences of two still fit
_INT32 = (-2 ** 31, 2 ** 31 - 1)
_POSITIONS = {"i", "j"}
_VALID = {ROW: "row_valid", COL: "col_valid", TILE: "row_valid[:, None] & col_valid[None, :]"}


def size_arg(name: str) -> str:
    return f"sz_{name}"


def param_arg(name: str) -> str:
    return f"p_{name}"


def input_arg(name: str) -> str:
    return f"t_{name}"


def stride_arg(tensor: str, axis: int) -> str:
    return f"t_{tensor}_s{axis}"


@dataclass(frozen=True)
class Value:
    code: str  # a name or a literal
    level: int
    kind: str  # "int" | "float" | "bool"
    literal: bool = False
    span: tuple[int, int] | None = None  # ints: [lo, hi] when the code is int32 and provably in it; else int64


class Emitter:
    def __init__(self, spec: Attention, exp2: str = "tl.exp2"):
        self.spec = spec
        self.exp2 = exp2  # the base-2 exponential's name in the kernel module (exp2 and tanh use it)
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

    def value(self, e: Expr) -> Value:
        for _, memo in reversed(self._scopes):
            if e in memo:
                return memo[e]
        v = self._emit(e)
        if not v.literal and v.code.startswith("x"):
            target = self._scopes[0] if v.level <= ROW else self._scopes[-1]
            target[1][e] = v
        return v

    def at(self, v: Value, level: int) -> str:
        """v's code broadcast to `level` (scalars and literals broadcast by themselves)."""
        if v.level == level or v.level == SCALAR:
            return v.code
        if v.level == ROW and level == TILE:
            return f"{v.code}[:, None]"
        if v.level == COL and level == TILE:
            return f"{v.code}[None, :]"
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
        lines = self._scopes[0][0] if level <= ROW else self._scopes[-1][0]
        lines.append(f"{name} = {code}")
        return Value(name, level, kind, span=span)

    def _int_operands(self, values: list[Value], level: int, span: tuple[int, int] | None) -> list[str]:
        """Operands of integer arithmetic whose result lies in `span` (None: unknown, so compute in int64)."""
        return [self.as_int(v, level, wide=span is None) for v in values]

    def _emit(self, e: Expr) -> Value:
        kind = expr_type(e, self.spec)
        if isinstance(e, Num):
            return Value(_literal(e), SCALAR, kind, literal=True, span=_literal_span(e))
        if isinstance(e, IndexVar):
            name, level = _INDEX[e.name]
            return Value(name, level, "int", span=(0, POSITION_LIMIT - 1) if e.name in _POSITIONS else None)
        if isinstance(e, SizeRef):
            return Value(size_arg(e.name), SCALAR, "int", span=(0, _INT32[1]))
        if isinstance(e, ParamRef):
            return Value(param_arg(e.name), SCALAR, kind)
        if isinstance(e, QK):
            return Value("qk", TILE, "float")
        if isinstance(e, Lookup):
            return self._lookup(e, kind)
        if isinstance(e, Unary):
            x = self.value(e.operand)
            if e.op == "not":
                return self._assign(f"{x.code} == 0", x.level, "bool")
            if kind == "float":
                return self._assign(f"-{x.code}", x.level, kind)
            span = _fit(_span(x) and (-_span(x)[1], -_span(x)[0]))
            return self._assign(f"-{self._int_operands([x], x.level, span)[0]}", x.level, kind, span)
        if isinstance(e, Binary):
            return self._binary(e, kind)
        if isinstance(e, Call):
            return self._call(e, kind)
        raise TypeError(f"not an IR expression: {e!r}")

    def _lookup(self, e: Lookup, kind: str) -> Value:
        idx = [self.value(x) for x in e.indices]
        level = _join(*idx)
        dims = self.spec.input(e.tensor).shape
        terms, checks = [], [_VALID[level]] if level != SCALAR else []
        for axis, (v, x) in enumerate(zip(idx, e.indices)):
            code = self.as_int(v, level, wide=True)  # int32 positions, params, sizes: widen before scaling
            terms.append(f"{code} * {stride_arg(e.tensor, axis)}")
            if not _in_range_by_construction(x, dims[axis]):
                # An index out of the table's bounds reads 0, never outside the tensor (the reference rejects it).
                checks.append(f"({code} >= 0) & ({code} < {size_arg(dims[axis])})")
        mask = f", mask={' & '.join(checks)}, other=0" if checks else ""
        load = f"tl.load({input_arg(e.tensor)} + {' + '.join(terms)}{mask})"
        if kind == "float":
            load += ".to(tl.float32)"  # f16/bf16/f64 tables compute in f32 (bf16 loads need it in the interpreter)
        return self._assign(load, level, kind)

    def _binary(self, e: Binary, kind: str) -> Value:
        a, b = self.value(e.lhs), self.value(e.rhs)
        level = _join(a, b)
        if e.op in ("and", "or"):
            return self._assign(f"{self.at(a, level)} {'&' if e.op == 'and' else '|'} {self.at(b, level)}", level,
                                "bool")
        floats = "float" in (a.kind, b.kind) or e.op == "/"
        span = None
        if floats:
            x, y = self.as_float(a, level), self.as_float(b, level)
        elif e.op in ("==", "!=") and a.kind == b.kind == "bool":
            x, y = self.at(a, level), self.at(b, level)
        elif kind == "bool":  # comparisons: int32 against int64 promotes by itself
            x, y = self.as_int(a, level), self.as_int(b, level)
        else:
            span = _arith_span(e.op, _span(a), _span(b))
            x, y = self._int_operands([a, b], level, span)
        if e.op == "%" and floats:
            return self._assign(f"{x} - {y} * tl.floor({x} / {y})", level, "float")
        if e.op in ("%", "//"):  # integers (the checker gives `//` nothing else)
            # C remainder and quotient round toward zero, Python's down: they differ where the remainder is
            # non-zero with a sign other than y's.
            rem = self._assign(f"{x} % {y}", level, "int", _arith_span("%", _span(a), _span(b)))
            if b.literal:
                fix = f"{rem.code} < 0" if _literal_value(b) > 0 else f"{rem.code} > 0"
            else:
                fix = f"({rem.code} != 0) & (({rem.code} < 0) != ({y} < 0))"
            if e.op == "%":
                return self._assign(f"tl.where({fix}, {rem.code} + {y}, {rem.code})", level, "int", span)
            return self._assign(f"{x} // {y} - tl.where({fix}, 1, 0)", level, "int", span)
        return self._assign(f"{x} {e.op} {y}", level, kind, span)

    def _call(self, e: Call, kind: str) -> Value:
        args = [self.value(x) for x in e.args]
        level = _join(*args)
        if e.fn in _FLOAT_FUNCS:
            fn = self.exp2 if e.fn == "exp2" else _FLOAT_FUNCS[e.fn]
            return self._assign(f"{fn}({self.as_float(args[0], level)})", level, "float")
        if e.fn == "tanh":  # libdevice tanh fails in the interpreter: tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1)
            x = self.as_float(args[0], level)
            return self._assign(f"1.0 - 2.0 / ({self.exp2}({2 * math.log2(math.e)!r} * {x}) + 1.0)", level, "float")
        if e.fn == "abs":
            if kind == "float":
                return self._assign(f"tl.abs({self.at(args[0], level)})", level, kind)
            a = _span(args[0])
            span = _fit(a and (0, max(abs(a[0]), abs(a[1]))))
            return self._assign(f"tl.abs({self._int_operands(args, level, span)[0]})", level, kind, span)
        operands = args[1:] if e.fn == "where" else args
        span = None
        if kind == "int":
            spans = [_span(v) for v in operands]
            span = None if None in spans else (min(s[0] for s in spans), max(s[1] for s in spans))
            x, y = self._int_operands(operands, level, span)
        else:
            convert = {"float": self.as_float, "bool": self.at}[kind]
            x, y = (convert(v, level) for v in operands)
        if e.fn == "where":
            return self._assign(f"tl.where({self.at(args[0], level)}, {x}, {y})", level, kind, span)
        return self._assign(f"tl.{'minimum' if e.fn == 'min' else 'maximum'}({x}, {y})", level, kind, span)


def _span(v: Value) -> tuple[int, int] | None:
    """The int32 range of an int or bool operand, None when it may be int64 (or is a param or size)."""
    if v.kind == "bool":
        return (0, 1)
    return v.span if v.kind == "int" else None


def _fit(span: tuple[int, int] | None) -> tuple[int, int] | None:
    return span if span is not None and _INT32[0] <= span[0] and span[1] <= _INT32[1] else None


def _arith_span(op: str, a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    """Interval arithmetic for + - * % //; None when an operand is unknown or the result may leave int32."""
    if a is None or b is None:
        return None
    if op == "+":
        return _fit((a[0] + b[0], a[1] + b[1]))
    if op == "-":
        return _fit((a[0] - b[1], a[1] - b[0]))
    if op == "*":
        corners = [x * y for x in a for y in b]
        return _fit((min(corners), max(corners)))
    if op == "%" and b[0] == b[1] != 0:  # floored remainder by a constant c: within (-|c|, |c|)
        c = abs(b[0])
        return (-(c - 1), c - 1) if c <= 2 ** 30 else None
    if op == "//" and b[0] == b[1] != 0:  # floored quotient by a constant: monotonic in the dividend
        lo, hi = sorted((a[0] // b[0], a[1] // b[0]))
        return _fit((lo, hi))
    return None


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
