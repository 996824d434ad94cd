"""IR expressions -> Triton code, one assignment per node, hoisted to where it is invariant.

Every value has a *level*: scalar (per program: sizes, params, b), row ([BLOCK_M]: i, h), col ([BLOCK_N]: j)
or tile ([BLOCK_M, BLOCK_N]: qk). Scalar and row values are emitted once into the kernel's prologue; col and
tile values into the current scope (a loop body). Operands of mixed levels are broadcast with [:, None] /
[None, :]. Semantics follow the reference: ints are int64 with floored `%`, `/` is true division, booleans
count as ints in arithmetic, and int/float mixes compute in float32.
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


class Emitter:
    def __init__(self, spec: Attention):
        self.spec = spec
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

    def as_int(self, v: Value, level: int) -> str:
        """A bool operand of arithmetic counts as an int."""
        code = self.at(v, level)
        if v.kind != "bool":
            return code
        return str(int(_literal_value(v))) if v.literal else f"{code}.to(tl.int64)"

    # -- emission

    def _assign(self, code: str, level: int, kind: str) -> Value:
        name = f"x{self._count}"
        self._count += 1
        lines = self._scopes[0][0] if level <= ROW else self._scopes[-1][0]
        lines.append(f"{name} = {code}")
        return Value(name, level, kind)

    def _emit(self, e: Expr) -> Value:
        kind = expr_type(e, self.spec)
        if isinstance(e, Num):
            return Value(_literal(e), SCALAR, kind, literal=True)
        if isinstance(e, IndexVar):
            name, level = _INDEX[e.name]
            return Value(name, level, "int")
        if isinstance(e, SizeRef):
            return Value(size_arg(e.name), SCALAR, "int")
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
            return self._assign(f"-{self.as_int(x, x.level)}", x.level, kind)
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
            code = self.at(v, level)
            if not v.literal and v.level == SCALAR and v.code != "b":  # int32 params/sizes: widen before scaling
                code = f"{code}.to(tl.int64)"
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
        if floats:
            x, y = self.as_float(a, level), self.as_float(b, level)
        elif e.op in ("==", "!=") and a.kind == b.kind == "bool":
            x, y = self.at(a, level), self.at(b, level)
        else:
            x, y = self.as_int(a, level), self.as_int(b, level)
        if e.op == "%":
            if floats:
                return self._assign(f"{x} - {y} * tl.floor({x} / {y})", level, "float")
            rem = self._assign(f"{x} % {y}", level, "int")  # C remainder: sign of x; Python's has y's sign
            if b.literal:
                fix = f"{rem.code} < 0" if _literal_value(b) > 0 else f"{rem.code} > 0"
            else:
                fix = f"({rem.code} != 0) & (({rem.code} < 0) != ({y} < 0))"
            return self._assign(f"tl.where({fix}, {rem.code} + {y}, {rem.code})", level, "int")
        return self._assign(f"{x} {e.op} {y}", level, kind)

    def _call(self, e: Call, kind: str) -> Value:
        args = [self.value(x) for x in e.args]
        level = _join(*args)
        if e.fn in _FLOAT_FUNCS:
            return self._assign(f"{_FLOAT_FUNCS[e.fn]}({self.as_float(args[0], level)})", level, "float")
        if e.fn == "tanh":  # libdevice tanh fails in the interpreter: tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1)
            x = self.as_float(args[0], level)
            return self._assign(f"1.0 - 2.0 / (tl.exp2({2 * math.log2(math.e)!r} * {x}) + 1.0)", level, "float")
        if e.fn == "abs":
            return self._assign(f"tl.abs({self.as_int(args[0], level)})", level, kind)
        operands = args[1:] if e.fn == "where" else args
        convert = {"float": self.as_float, "int": self.as_int, "bool": self.at}[kind]
        x, y = (convert(v, level) for v in operands)
        if e.fn == "where":
            return self._assign(f"tl.where({self.at(args[0], level)}, {x}, {y})", level, kind)
        return self._assign(f"tl.{'minimum' if e.fn == 'min' else 'maximum'}({x}, {y})", level, kind)


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
