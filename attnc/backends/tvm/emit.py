"""IR expressions -> TIR expressions, and vectorizable float functions.

Semantics follow the reference (DESIGN.md): ints compute in int64 with floored `%`, `/` is true division,
booleans count as ints in arithmetic, int/float mixes and every float compute in float32. A lookup whose index
leaves the table reads 0, the language's rule (dsl/reference.py; validate mode checks it on the host): kernels
evaluate whole tiles, so masked-out elements may well form such indices.

LLVM keeps `exp2`, `tanh` and friends as scalar libm calls inside vectorized loops, so the float functions
the softmax needs are written here as polynomials over `exp2` that vectorize (one AVX-512 FMA chain each);
tanh and erf are the operator table's formulas (ops.Formula) over them. GPUs (`native_math`) use TVM's
intrinsics. Each operator's rendering comes from the operator table (ops.py). A float subexpression used more
than once, a formula's argument and its named parts, and exp2's argument are computed once (`bind`): in the CPU
kernels, which emit their scores through `vectorized` and `registers`, into a register buffer, so what TVM's
passes see is as large as the score's DAG, not its tree (40 lines of `score = score + score` or six nested tanh
build in seconds); in the GPU kernels, which emit under `registers("local")`, into a thread's registers.
Shared integer and boolean subexpressions (index math, masks) are bound the same way.
"""
from __future__ import annotations

import math
import operator
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...ir import QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Unary, children
from ...ops import Formula, Kinds, Op, compute_kind, function, op_of

F32, F64, I64, I32 = "float32", "float64", "int64", "int32"
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# 2**f on [-1/2, 1/2]: Taylor coefficients of exp(f ln 2); degree 6 keeps the relative error below 2e-7.
_EXP2_COEFFS = tuple(LN2**k / math.factorial(k) for k in range(7))


def f32(x: float) -> tir.PrimExpr:
    return tir.FloatImm(F32, float(x))


def exp2(x: tir.PrimExpr) -> tir.PrimExpr:
    """2**x for float32 x; results below 2**-126 flush to 0 (so exp2(-inf) == 0 exactly and no denormal, which
    x86 handles slowly, ever appears), inf from x = 128 on, NaN for NaN."""
    x = bind(x)
    clamped = bind(tir.max(tir.min(x, f32(128.0)), f32(-127.0)))
    whole = bind(tir.Cast(I32, tir.round(clamped)))
    frac = clamped - tir.Cast(F32, whole)
    poly = f32(_EXP2_COEFFS[-1])
    for c in reversed(_EXP2_COEFFS[:-1]):
        poly = poly * frac + f32(c)
    # 2**n built in the exponent bits, in two halves so that n = 128 gives inf and every half stays normal.
    half = tir.shift_right(whole, 1)
    value = poly * _pow2(half) * _pow2(whole - half)
    return _nan_through(x, tir.Select(x < f32(-126.0), f32(0.0), value))


def exp2_nonpositive(x: tir.PrimExpr) -> tir.PrimExpr:
    """2**x for float32 x <= 0 or -inf (the softmax's exp2(logit - max)): the exponent n = round(x) is added
    straight into the polynomial's exponent bits, which stays a normal float for n >= -125. Results below
    2**-125 are 0 (exp2(-inf) == 0 exactly), NaN for NaN. About 12 vector instructions against exp2's 19, and a
    compare and a blend each for NaN."""
    x = bind(x)
    clamped = bind(tir.max(x, f32(-127.0)))
    whole = bind(tir.round(clamped))
    poly = f32(_EXP2_COEFFS[-1])
    for c in reversed(_EXP2_COEFFS[:-1]):
        poly = poly * (clamped - whole) + f32(c)
    bits = tir.reinterpret(I32, poly) + tir.shift_left(tir.Cast(I32, whole), 23)
    return _nan_through(x, tir.Select(x < f32(-125.0), f32(0.0), tir.reinterpret(F32, bits)))


HELD = (F32, I64, "bool")  # the dtypes `bind` holds in register buffers: the emitter's three kinds


def bind(x: tir.PrimExpr) -> tir.PrimExpr:
    """x computed once, where x is more than a variable or constant: a statement emitted into the IR builder's
    current frame (every caller builds inside a statement that others may precede) stores it, and its uses read
    it back. Inside `vectorized` (and `registers`) a value of the emitter's kinds (float32, int64, bool) goes to
    a register buffer: TVM substitutes the value of a `Let` or `T.Bind` free of buffer loads into each use (its
    simplifier, and the analyzer of its LLVM code generator binds every let), so nested functions (each reading
    its argument several times) and chains of shared nodes, float, integer or boolean, grew exponentially as TVM
    saw them; a buffer load it never substitutes. Elsewhere (and for other dtypes: exp2's int32 exponent) a
    `T.Bind`."""
    if isinstance(x, (tir.Var, tir.FloatImm, tir.IntImm)):
        return x
    held = getattr(_HELD, "registers", None)
    return T.Bind(x) if held is None or x.ty not in HELD else held.hold(x)


class _Registers:
    """Where `bind` puts values: the next buffer of their dtype among `buffers` at `lane` (vectorized; a dry run
    with no buffers counts them), or without a lane a new one-element buffer in `scope`, allocated where the
    value is (scalar code)."""

    def __init__(self, buffers: dict | None = None, lane=None, scope: str = "global"):
        self.buffers, self.lane, self.scope = buffers, lane, scope
        self.used: dict[str, int] = {}  # buffers taken, by dtype

    def hold(self, x: tir.PrimExpr) -> tir.PrimExpr:
        dtype = str(x.ty)
        taken = self.used[dtype] = self.used.get(dtype, 0) + 1
        if self.lane is None:
            buffer, at = T.alloc_buffer((1,), dtype, scope=self.scope), tir.const(0, I32)
        elif self.buffers is None:  # vectorized's dry run, in a scratch builder
            buffer, at = tir.decl_buffer((1,), dtype, "dry"), self.lane
        else:
            buffer, at = self.buffers[dtype][taken - 1], self.lane
        T.buffer_store(buffer, x, [at])
        return tir.BufferLoad(buffer, [at])


_HELD = threading.local()  # .registers: where this thread's kernel builder binds values now (None: T.Bind)


@contextmanager
def _holding(registers: _Registers):
    outer = getattr(_HELD, "registers", None)
    _HELD.registers = registers
    try:
        yield registers
    finally:
        _HELD.registers = outer


def vectorized(extent: int, body) -> None:
    """`for i in T.vectorized(extent): body(i)` with the values `body` binds held in registers: one buffer of
    `extent` lanes each, allocated before the loop (TVM's vectorizer miscomputes a buffer allocated inside it).
    A dry run of `body` in a scratch builder counts them."""
    with IRBuilder(), T.prim_func(), T.vectorized(0, extent) as i, _holding(_Registers(lane=i)) as counter:
        body(i)
    buffers = {dtype: [T.alloc_buffer((extent,), dtype) for _ in range(count)]
               for dtype, count in counter.used.items()}
    with T.vectorized(0, extent) as i, _holding(_Registers(buffers, i)):
        body(i)


def registers(scope: str = "global"):
    """A context in which scalar (not vectorized) code binds values in one-element buffers of `scope`
    (bind): "global" on CPUs (a small constant allocation lives on the stack), "local" in a GPU thread."""
    return _holding(_Registers(scope=scope))


def _nan_through(x: tir.PrimExpr, value: tir.PrimExpr) -> tir.PrimExpr:
    """value, or x where x is NaN: the clamps above would turn a NaN into a number (LLVM's min and max keep the
    other operand), and a NaN score must stay NaN to the output, as in the reference. NaN is read from the bits:
    TVM folds x != x to false, and its isnan of a let-bound variable fails to vectorize."""
    magnitude = tir.bitwise_and(tir.reinterpret(I32, x), tir.const(0x7FFFFFFF, I32))
    return tir.Select(magnitude > tir.const(0x7F800000, I32), x, value)


def _pow2(n: tir.PrimExpr) -> tir.PrimExpr:
    return tir.reinterpret(F32, tir.shift_left(n + 127, 23))


def exp(x: tir.PrimExpr) -> tir.PrimExpr:
    return exp2(x * f32(LOG2E))


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
        self.native_math = native_math
        self.kinds = Kinds(spec)

    def float(self, e: Expr) -> tir.PrimExpr:
        return self._root(e, "float")

    def int(self, e: Expr) -> tir.PrimExpr:
        return self._root(e, "int")

    def bool(self, e: Expr) -> tir.PrimExpr:
        return self._root(e, "bool")

    def place(self, e: Lookup) -> tuple[list[tir.PrimExpr], tir.PrimExpr]:
        """The clamped indices of the lookup `e` and whether they lie inside its table (module function place)."""
        return place(self.scope.inputs[e.tensor], [self.int(index) for index in e.indices])

    def emit(self, e: Expr) -> tir.PrimExpr:
        """`e` as a TIR expression of dtype float32, int64 or bool (its kind from ops.Kinds)."""
        return self._root(e, self.kinds(e))

    def _root(self, e: Expr, want: str) -> tir.PrimExpr:
        return _as(_Build(self, _shared(e)).value(e), self.kinds(e), want)


class _Build:
    """One expression's emission: each node emitted once; nodes with several users bound (bind)."""

    def __init__(self, em: Emitter, shared: set[Expr]):
        self.em = em
        self.shared = shared
        self.memo: dict[Expr, tir.PrimExpr] = {}

    def value(self, e: Expr) -> tir.PrimExpr:
        done = self.memo.get(e)
        if done is None:
            done = self._emit(e)
            if e in self.shared:
                done = bind(done)
            self.memo[e] = done
        return done

    def _converted(self, e: Expr, want: str) -> tir.PrimExpr:
        return _as(self.value(e), self.em.kinds(e), want)

    def _emit(self, e: Expr) -> tir.PrimExpr:
        kind, scope = self.em.kinds(e), self.em.scope
        if isinstance(e, Num):
            if kind == "bool":
                return tir.const(bool(e.value), "bool")
            return f32(e.value) if kind == "float" else tir.const(int(e.value), I64)
        if isinstance(e, IndexVar):
            return tir.Cast(I64, scope.index[e.name])
        if isinstance(e, SizeRef):
            return tir.Cast(I64, scope.sizes[e.name])
        if isinstance(e, ParamRef):
            var = scope.params[e.name]
            decl = self.em.spec.param(e.name).dtype
            return {"bool": lambda: var != 0, "i32": lambda: tir.Cast(I64, var), "f32": lambda: var}[decl]()
        if isinstance(e, QK):
            return scope.qk
        if isinstance(e, Lookup):
            return self._lookup(e, kind)
        if isinstance(e, (Unary, Binary, Call)):
            return self._operator(op_of(e), children(e))
        raise TypeError(f"not an IR expression: {e!r}")

    def _lookup(self, e: Lookup, kind: str) -> tir.PrimExpr:
        table = self.em.scope.inputs[e.tensor]
        indices, ok = place(table, [self._converted(index, "int") for index in e.indices])
        value = tir.BufferLoad(table, indices)
        if kind == "bool":
            value, zero = value != tir.const(0, table.dtype), tir.const(False, "bool")
        else:
            dtype = F32 if kind == "float" else I64
            value, zero = tir.Cast(dtype, value), tir.const(0, dtype)
        return tir.Select(ok, value, zero)

    def _operator(self, op: Op, args: tuple[Expr, ...]) -> tir.PrimExpr:
        """Operands converted to the kind the operator computes in, then the table's rendering (TVM's intrinsic
        where the target has fast math and the table names one)."""
        compute = compute_kind(op, [self.em.kinds(a) for a in args])
        operands = [self._converted(a, "bool" if role == "bool" else compute) for a, role in zip(args, op.operands)]
        return render(op, operands, compute, self.em.native_math)


def place(table: tir.Buffer, xs: list[tir.PrimExpr]) -> tuple[list[tir.PrimExpr], tir.PrimExpr]:
    """Where a lookup with int64 indices `xs` reads `table`: the indices clamped into the table (int32), and
    whether every one was inside it (outside, the lookup reads 0 and takes no gradient)."""
    indices, ok = [], tir.const(True, "bool")
    for x, extent in zip(xs, table.shape):
        size = tir.Cast(I64, extent)
        inside = tir.And(x >= tir.const(0, I64), x < size)
        ok = inside if not indices else tir.And(ok, inside)
        indices.append(tir.Cast(I32, tir.max(tir.min(x, size - 1), tir.const(0, I64))))
    return indices, ok


def _shared(e: Expr) -> set[Expr]:
    """The operator and lookup nodes of `e` that more than one parent uses (structurally equal ones count as
    one): each is emitted once and bound (bind), whatever its kind. Integer and boolean ones are bound too: index
    math and masks that reuse themselves (`x = x + x`, repeated) grow as trees in TVM's passes like float ones,
    and nothing needs them as expressions (a lookup clamps its indices itself, tile skipping reads attnc's own
    mask analysis)."""
    uses: dict[Expr, int] = {}
    stack = [e]
    seen: set[Expr] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for c in children(node):
            uses[c] = uses.get(c, 0) + 1
            stack.append(c)
    return {n for n, count in uses.items() if count > 1 and isinstance(n, (Lookup, Unary, Binary, Call))}


def _as(x: tir.PrimExpr, have: str, want: str) -> tir.PrimExpr:
    if have == want:
        return x
    if want == "bool":
        return x != tir.const(0, F32 if have == "float" else I64)
    return tir.Cast(F32 if want == "float" else I64, x)


class _Math:
    """What a table rendering sees (ops.Op.tvm): `tir`, the kind the operator computes in, the float functions
    of the target (vectorizable polynomials on CPUs, intrinsics with `native`), and ops.Formula's interface."""

    tir = tir

    def __init__(self, kind: str, native: bool = False):
        self.kind = kind
        self.exp = tir.exp if native else exp
        self.exp2 = tir.exp2 if native else exp2

    def formula(self, formula: Formula, x: tir.PrimExpr) -> tir.PrimExpr:
        return formula.build(self, bind(x))

    let = staticmethod(bind)

    # ops.Formula's interface: TIR's functions and PrimExpr's operators
    const = staticmethod(f32)
    abs, min, max, select = (staticmethod(fn) for fn in (tir.abs, tir.min, tir.max, tir.Select))
    add, sub, mul, div, neg, lt = (staticmethod(fn) for fn in (operator.add, operator.sub, operator.mul,
                                                                operator.truediv, operator.neg, operator.lt))


def render(op: Op, operands: list[tir.PrimExpr], kind: str, native: bool = False) -> tir.PrimExpr:
    """`op` applied to operands already converted to `kind`, the kind it computes in."""
    if native and op.tvm_native:
        return getattr(tir, op.tvm_native)(*operands)
    math = _Math(kind, native)
    return math.formula(op.tvm, operands[0]) if isinstance(op.tvm, Formula) else op.tvm(math, *operands)


def float_function(name: str, x: tir.PrimExpr, native: bool = False) -> tir.PrimExpr:
    """The language's float function `name` (tanh, erf, ...) of a float32 PrimExpr, as the kernels compute it."""
    return render(function(name), [x], "float", native)
