"""IR expressions -> TIR expressions, and vectorizable float functions.

Semantics follow the reference (DESIGN.md): ints compute in int64 with floored `%` and `//`, `/` is true division,
booleans count as ints in arithmetic, int/float mixes and every float compute in float32. A lookup whose index
leaves the table reads 0 (the reference rejects such calls; kernels evaluate whole tiles, so masked-out
elements may still form such indices).

LLVM keeps `exp2`, `tanh` and friends as scalar libm calls inside vectorized loops, so the float functions
the softmax needs are written here as polynomials over `exp2` that vectorize (one AVX-512 FMA chain each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from tvm import tirx as tir

from ...ir import QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Unary, expr_type

F32, I64, I32 = "float32", "int64", "int32"
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# 2**f on [-1/2, 1/2]: Taylor coefficients of exp(f ln 2); degree 6 keeps the relative error below 2e-7.
_EXP2_COEFFS = tuple(LN2**k / math.factorial(k) for k in range(7))


def f32(x: float) -> tir.PrimExpr:
    return tir.FloatImm(F32, float(x))


def exp2(x: tir.PrimExpr) -> tir.PrimExpr:
    """2**x for float32 x; results below 2**-126 flush to 0 (so exp2(-inf) == 0 exactly and no denormal, which
    x86 handles slowly, ever appears), inf from x = 128 on."""
    clamped = tir.Var("e2x", F32)
    whole = tir.Var("e2n", I32)
    frac = clamped - tir.Cast(F32, whole)
    poly = f32(_EXP2_COEFFS[-1])
    for c in reversed(_EXP2_COEFFS[:-1]):
        poly = poly * frac + f32(c)
    # 2**n built in the exponent bits, in two halves so that n = 128 gives inf and every half stays normal.
    half = tir.shift_right(whole, 1)
    value = poly * _pow2(half) * _pow2(whole - half)
    value = tir.Let(clamped, tir.max(tir.min(x, f32(128.0)), f32(-127.0)),
                    tir.Let(whole, tir.Cast(I32, tir.round(clamped)), value))
    return tir.Select(x < f32(-126.0), f32(0.0), value)


def exp2_nonpositive(x: tir.PrimExpr) -> tir.PrimExpr:
    """2**x for float32 x <= 0 or -inf (the softmax's exp2(logit - max)): the exponent n = round(x) is added
    straight into the polynomial's exponent bits, which stays a normal float for n >= -125. Results below
    2**-125 are 0 (exp2(-inf) == 0 exactly). About 12 vector instructions against exp2's 19."""
    clamped = tir.Var("e2x", F32)
    whole = tir.Var("e2r", F32)
    poly = f32(_EXP2_COEFFS[-1])
    for c in reversed(_EXP2_COEFFS[:-1]):
        poly = poly * (clamped - whole) + f32(c)
    bits = tir.reinterpret(I32, poly) + tir.shift_left(tir.Cast(I32, whole), 23)
    value = tir.Let(clamped, tir.max(x, f32(-127.0)),
                    tir.Let(whole, tir.round(clamped), tir.reinterpret(F32, bits)))
    return tir.Select(x < f32(-125.0), f32(0.0), value)


def _pow2(n: tir.PrimExpr) -> tir.PrimExpr:
    return tir.reinterpret(F32, tir.shift_left(n + 127, 23))


def exp(x: tir.PrimExpr) -> tir.PrimExpr:
    return exp2(x * f32(LOG2E))


def sigmoid(x: tir.PrimExpr) -> tir.PrimExpr:
    return f32(1.0) / (f32(1.0) + exp(-x))


def tanh(x: tir.PrimExpr) -> tir.PrimExpr:
    return f32(1.0) - f32(2.0) / (exp2(x * f32(2.0 * LOG2E)) + f32(1.0))


_FLOAT_FUNCS = {
    "exp": exp, "exp2": exp2, "sigmoid": sigmoid, "tanh": tanh,
    "log": tir.log, "log2": tir.log2, "sqrt": tir.sqrt, "floor": tir.floor,
    "rsqrt": lambda x: f32(1.0) / tir.sqrt(x),
}
# GPUs evaluate these in hardware (SFU): TVM's CUDA/Metal/... intrinsics, no polynomial needed.
_NATIVE_FUNCS = {
    **_FLOAT_FUNCS, "exp": tir.exp, "exp2": tir.exp2, "tanh": tir.tanh, "sigmoid": tir.sigmoid,
    "rsqrt": tir.rsqrt,
}
_COMPARE = {"<": tir.LT, "<=": tir.LE, ">": tir.GT, ">=": tir.GE, "==": tir.EQ, "!=": tir.NE}


@dataclass(frozen=True)
class Scope:
    """What the names of an expression stand for at one place of the kernel."""

    index: Mapping[str, tir.PrimExpr]  # b, h, i, j (any int dtype); j may be absent (row bounds)
    sizes: Mapping[str, tir.PrimExpr]
    params: Mapping[str, tir.Var]
    inputs: Mapping[str, tir.Buffer]
    qk: tir.PrimExpr | None = None  # float32 q . k of the current element


class Emitter:
    def __init__(self, spec: Attention, scope: Scope, native_math: bool = False):
        self.spec = spec
        self.scope = scope
        self.funcs = _NATIVE_FUNCS if native_math else _FLOAT_FUNCS

    def float(self, e: Expr) -> tir.PrimExpr:
        return self._as(self.emit(e), expr_type(e, self.spec), "float")

    def int(self, e: Expr) -> tir.PrimExpr:
        return self._as(self.emit(e), expr_type(e, self.spec), "int")

    def bool(self, e: Expr) -> tir.PrimExpr:
        return self._as(self.emit(e), expr_type(e, self.spec), "bool")

    def emit(self, e: Expr) -> tir.PrimExpr:
        """`e` as a TIR expression of dtype float32, int64 or bool (its kind from ir.expr_type)."""
        kind = expr_type(e, self.spec)
        if isinstance(e, Num):
            if kind == "bool":
                return tir.const(bool(e.value), "bool")
            return f32(e.value) if kind == "float" else tir.const(int(e.value), I64)
        if isinstance(e, IndexVar):
            return tir.Cast(I64, self.scope.index[e.name])
        if isinstance(e, SizeRef):
            return tir.Cast(I64, self.scope.sizes[e.name])
        if isinstance(e, ParamRef):
            var = self.scope.params[e.name]
            decl = self.spec.param(e.name).dtype
            return {"bool": lambda: var != 0, "i32": lambda: tir.Cast(I64, var), "f32": lambda: var}[decl]()
        if isinstance(e, QK):
            return self.scope.qk
        if isinstance(e, Lookup):
            return self._lookup(e, kind)
        if isinstance(e, Unary):
            if e.op == "not":
                return tir.Not(self.bool(e.operand))
            return -self._as(self.emit(e.operand), expr_type(e.operand, self.spec), kind)
        if isinstance(e, Binary):
            return self._binary(e, kind)
        if isinstance(e, Call):
            return self._call(e, kind)
        raise TypeError(f"not an IR expression: {e!r}")

    def _as(self, x: tir.PrimExpr, have: str, want: str) -> tir.PrimExpr:
        if have == want:
            return x
        if want == "bool":
            return x != tir.const(0, F32 if have == "float" else I64)
        return tir.Cast(F32 if want == "float" else I64, x)

    def _lookup(self, e: Lookup, kind: str) -> tir.PrimExpr:
        table = self.scope.inputs[e.tensor]
        indices, inside = [], []
        for index, extent in zip(e.indices, table.shape):
            x = self.int(index)
            size = tir.Cast(I64, extent)
            inside.append(tir.And(x >= tir.const(0, I64), x < size))
            indices.append(tir.Cast(I32, tir.max(tir.min(x, size - 1), tir.const(0, I64))))
        value = tir.BufferLoad(table, indices)
        if kind == "bool":
            value, zero = value != tir.const(0, table.dtype), tir.const(False, "bool")
        else:
            dtype = F32 if kind == "float" else I64
            value, zero = tir.Cast(dtype, value), tir.const(0, dtype)
        ok = inside[0]
        for c in inside[1:]:
            ok = tir.And(ok, c)
        return tir.Select(ok, value, zero)

    def _binary(self, e: Binary, kind: str) -> tir.PrimExpr:
        lk, rk = expr_type(e.lhs, self.spec), expr_type(e.rhs, self.spec)
        if e.op in ("and", "or"):
            a, b = self.bool(e.lhs), self.bool(e.rhs)
            return tir.And(a, b) if e.op == "and" else tir.Or(a, b)
        a, b = self.emit(e.lhs), self.emit(e.rhs)
        if "float" in (lk, rk) or e.op == "/":
            common = "float"
        elif e.op in ("==", "!=") and lk == rk == "bool":
            common = "bool"
        else:
            common = "int"
        a, b = self._as(a, lk, common), self._as(b, rk, common)
        if e.op in _COMPARE:
            return _COMPARE[e.op](a, b)
        if e.op == "%":
            return a - b * tir.floor(a / b) if common == "float" else tir.floormod(a, b)
        if e.op == "//":  # integers only (the checker's rule)
            return tir.floordiv(a, b)
        return {"+": tir.Add, "-": tir.Sub, "*": tir.Mul, "/": tir.Div}[e.op](a, b)

    def _call(self, e: Call, kind: str) -> tir.PrimExpr:
        if e.fn in self.funcs:
            return self.funcs[e.fn](self.float(e.args[0]))
        if e.fn == "abs":
            return tir.abs(self._as(self.emit(e.args[0]), expr_type(e.args[0], self.spec), kind))
        operands = e.args[1:] if e.fn == "where" else e.args
        x, y = (self._as(self.emit(a), expr_type(a, self.spec), kind) for a in operands)
        if e.fn == "where":
            return tir.Select(self.bool(e.args[0]), x, y)
        return tir.min(x, y) if e.fn == "min" else tir.max(x, y)
