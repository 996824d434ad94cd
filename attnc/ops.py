"""The operator table: every operator and function of the expression language, declared once.

An entry says what its operator *means*, for every stage that needs it:
- its type rule: what each operand must be (`operands`) and what kind the result has (`result`);
- `python`: its value on Python scalars (constant folding);
- `torch`: its float64 / int64 / bool reference semantics on torch tensors (`attnc.reference`);
- `triton` and `tvm`: how each backend renders it, as a format string or function over the operands'
  already-converted code (no backend is imported here: the backend passes its own namespace in);
- `derivative`: d(result)/d(operand) for each operand, as IR built from the operands and the result, for the
  backward pass (None where there is none: boolean operands and results).

Node kinds (Num, IndexVar, Lookup, ...) are dispatched structurally by each stage; the meaning of `+`, `%`,
`tanh`, `min`, `where`, ... is read from OPS. Adding a function is one entry here plus its tests: the parser,
checker, tracers and both backends take function names from this table. The syntax of the binary operators
(their tokens and precedence) lives with the grammar and the printer (dsl/attn.lark, ir.py).

Operands are converted before an entry sees them: "bool" operands are booleans; the others share one
computation kind, float when the result is "float" (`/` and the float functions), else their common kind
(booleans count as ints where a number is needed). Kinds are 'int', 'float' and 'bool'.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

from .ir import (
    QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Unary, children, dtype_kind,
    promote,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Formula:
    """A float function written over a small math interface `m`, so that one formula renders on every backend
    that provides it: m.const(c), m.add/sub/mul/div(a, b), m.neg(a), m.abs(a), m.min/max(a, b), m.exp2(a),
    m.lt(a, b) (a boolean), m.select(cond, a, b), and m.let(a) (a name for a, computed once). Each backend
    binds the argument to a name before calling `build(m, x)`."""

    build: Callable


@dataclass(frozen=True)
class Op:
    name: str  # the operator's token ("+", "and") or function name ("tanh"); "neg" and "not" for Unary
    node: type  # the IR node that carries it: Unary, Binary or Call
    operands: tuple[str, ...]  # per operand: "number", "integer" (an int or a boolean), "bool", or "any" (a
    # number or a boolean, see `same`)
    result: str  # "bool", "float", or "common": the common kind of the non-"bool" operands
    python: Callable  # fold: Python scalars -> scalar; may raise ZeroDivisionError, ValueError, OverflowError
    torch: Callable  # reference: (torch module, *tensors) -> tensor; ZeroDivisionError for an integer % 0
    triton: str | Callable | Formula  # "{0} + {1}" (exp2 named {exp2}), or fn(t, *codes) -> code (see emit.py)
    tvm: Callable | Formula  # fn(m, *PrimExprs) -> PrimExpr; m: the TVM emitter's math namespace (tir, exp2, ...)
    derivative: tuple[Callable | None, ...] | None  # per operand: fn(args, result) -> IR of d result / d operand
    about_derivative: str = ""  # what the derivative rule means where it is not the textbook one
    tvm_native: str | None = None  # the TVM intrinsic (tir.<name>) used where the target has fast math (GPUs)
    label: str = ""  # how messages name it; default `+` for operators, the name for functions
    same: str = ""  # the message when the "any" operands are not both numbers or both booleans ({a}, {b})
    span: Callable | None = None  # Triton's int32 interval rule: operand ranges -> result range, or None
    linearity: str = ""  # "additive" (+, -, neg: linear in every operand) or "product" (*): for mask analysis
    labels: tuple[str, ...] = ()  # how messages name each operand, where not by `what` (where's condition)
    # the rendering of GPU kernels whose plan takes hardware approximations (TritonOptions.approx_functions): a
    # common.j2 function of one inline-PTX instruction
    triton_approx: str | None = None

    @property
    def arity(self) -> int:
        return len(self.operands)

    @property
    def what(self) -> str:
        return self.label or (f"`{self.name}`" if self.node is not Call else self.name)

    def operand_label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else self.what


# ---------------------------------------------------------------- IR builders (derivative rules)


def _f(value: float) -> Num:
    return Num(float(value), True)


def _add(a: Expr, b: Expr) -> Expr:
    return Binary("+", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    return Binary("-", a, b)


def _mul(a: Expr, b: Expr) -> Expr:
    return Binary("*", a, b)


def _div(a: Expr, b: Expr) -> Expr:
    return Binary("/", a, b)


def _where(c: Expr, a: Expr, b: Expr) -> Expr:
    return Call("where", (c, a, b))


def _step(c: Expr) -> Expr:
    """1.0 where c holds, else 0.0."""
    return _where(c, _f(1.0), _f(0.0))


def _min_max_derivative(first: bool, op: str) -> Callable:
    """torch's rule for minimum/maximum: the chosen operand gets the gradient, ties split it in half."""
    def rule(args, _result):
        a, b = args if first else args[::-1]
        return _where(Binary(op, a, b), _f(1.0), _where(Binary("==", a, b), _f(0.5), _f(0.0)))
    return rule


def _one(_args, _result) -> Expr:
    return _f(1.0)


def _zero(_args, _result) -> Expr:
    return _f(0.0)


# ---------------------------------------------------------------- Python (folding) and torch (reference) helpers


def _py_promoted(fn: Callable) -> Callable:
    """min/max/where's branches on Python scalars, promoted to float as the reference does when either side is."""
    def apply(a, b):
        if isinstance(a, float) or isinstance(b, float):
            a, b = float(a), float(b)
        return fn(a, b)
    return apply


def _py_where(c, a, b):
    return _py_promoted(lambda x, y: x if c else y)(a, b)


def _py_float(fn: Callable) -> Callable:
    return lambda x: fn(float(x))


def _torch_remainder(t, a, b):
    if not b.is_floating_point() and bool((b == 0).any()):
        raise ZeroDivisionError("integer modulo by zero")
    return t.remainder(a, b)


def _torch_floor_divide(t, a, b):
    if bool((b == 0).any()):
        raise ZeroDivisionError("integer division by zero")
    return t.div(a, b, rounding_mode="floor")


# ---------------------------------------------------------------- backend renderings


# An integer `%` or `//` by zero gives 0 in the kernels (a divisor from a param or table value, or from sizes folded
# at compile time): x86's division traps on it, which would kill the process. The reference raises instead.


def _triton_remainder(t, x: str, y: str) -> str:
    """Floored remainder: a float formula, or C's remainder (the sign of x) moved to the sign of y; x % 1 is the
    0 a zero divisor gives."""
    if t.kind == "float":
        return f"{x} - {y} * tl.floor({x} / {y})"
    y = _triton_nonzero(t, y)
    rem, fix = _c_rounding_fix(t, x, y)
    return f"tl.where({fix}, {rem} + {y}, {rem})"


def _triton_floor_divide(t, x: str, y: str) -> str:
    """Floored quotient of integers: C's quotient rounds toward zero, one too high where the fix applies."""
    divisor = t.literal(1)
    if divisor == 0:
        return f"({x}) * 0"  # x's shape
    safe = _triton_nonzero(t, y)
    _, fix = _c_rounding_fix(t, x, safe)
    quotient = f"{x} // {safe} - tl.where({fix}, 1, 0)"
    return quotient if divisor is not None else f"tl.where({y} == 0, 0, {quotient})"


def _triton_nonzero(t, y: str) -> str:
    """The divisor y, 1 where it is 0."""
    divisor = t.literal(1)
    if divisor is not None:
        return y if divisor != 0 else "1"
    return t.let(f"tl.where({y} == 0, 1, {y})")


def _c_rounding_fix(t, x: str, y: str) -> tuple[str, str]:
    """C's remainder of x by y, and where C's and Python's division differ: a non-zero remainder whose sign is
    not y's."""
    rem = t.let(f"{x} % {y}")
    divisor = t.literal(1)
    if divisor is not None:
        return rem, (f"{rem} < 0" if divisor > 0 else f"{rem} > 0")
    return rem, f"({rem} != 0) & (({rem} < 0) != ({y} < 0))"


def _tvm_remainder(m, a, b):
    return a - b * m.tir.floor(a / b) if m.kind == "float" else m.tir.floormod(a, _tvm_nonzero(m, b))


def _tvm_floor_divide(m, a, b):
    if isinstance(b, m.tir.IntImm):
        return m.tir.floordiv(a, b) if b.value != 0 else m.tir.const(0, str(b.ty))
    return m.tir.floordiv(a * _tvm_is_nonzero(m, b), _tvm_nonzero(m, b))  # 0 // 1 where b is 0


def _tvm_nonzero(m, b):
    """The divisor b, 1 where it is 0. Arithmetic, not a select: where a select of the result dropped the quotient
    by 0, LLVM saw through a select on the divisor and divided by the 0 it guarded against."""
    if isinstance(b, m.tir.IntImm):
        return b if b.value != 0 else m.tir.const(1, str(b.ty))
    return b + (1 - _tvm_is_nonzero(m, b))


def _tvm_is_nonzero(m, b):
    return m.tir.Cast(str(b.ty), b != m.tir.const(0, str(b.ty)))


def _horner(m, x, coeffs: Sequence[float]):
    acc = m.const(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = m.add(m.mul(acc, x), m.const(c))
    return acc


def _signed(m, x, magnitude):
    """magnitude with x's sign (NaN where x is NaN, through the magnitude)."""
    value = m.let(magnitude)
    return m.select(m.lt(x, m.const(0.0)), m.neg(value), value)


# tanh(x) = x + x^3 P(x^2) for |x| <= 0.625 (P: a degree-4 minimax fit, relative error 4.4e-9), else
# sign(x) (1 - 2 / (2^(2|x| log2 e) + 1)), which no longer cancels there. At most 1.7 ulp in f32 with an exact
# exp2, a little more with TVM's polynomial exp2 (tests/test_ops.py measures both). NaN fails `0.625 < |x|` and
# takes the polynomial, so it propagates whatever exp2 makes of it.
_TANH_SMALL = 0.625
_TANH_POLY = (-0.3333328193468701, 0.13331441985218803, -0.05373969620239052, 0.02063902225394337,
              -0.0057049108349370116)


def _tanh(m, x):
    a = m.let(m.abs(x))
    s = m.let(m.mul(x, x))
    small = m.add(x, m.mul(m.mul(x, s), _horner(m, s, _TANH_POLY)))
    e = m.exp2(m.mul(a, m.const(2.0 * LOG2E)))
    large = _signed(m, x, m.sub(m.const(1.0), m.div(m.const(2.0), m.add(e, m.const(1.0)))))
    return m.select(m.lt(m.const(_TANH_SMALL), a), large, small)


# erf(x) = x + x (P(x^2) - 1) for |x| <= 0.9 (P: a degree-6 fit of erf(x)/x, relative error 3e-10), else
# sign(x) (1 - 2^Q(t)) with t = min(|x|, 4) and Q a degree-8 fit of log2(erfc(t)) on [0.9, 4] (absolute error
# 1.7e-8; erf(t) rounds to 1 in f32 from 3.92 on). At most 1.7 ulp in f32 with an exact exp2. NaN fails
# `0.9 < |x|` and takes the polynomial, so it propagates.
_ERF_SMALL = 0.9
_ERF_POLY = (0.1283791667643492, -0.3761263497957231, 0.11283715027972231, -0.026860508167283796,
             0.005203858368002658, -0.0008175629668938522, 8.513060681365001e-05)
_ERFC_LOG2_POLY = (0.000424535261104689, -1.6304350489863093, -0.9117766221410196, -0.1585884266725819,
                   0.03799410151273429, -0.006824336395605173, 0.0008522181424649457, -6.543238171867915e-05,
                   2.311881774840842e-06)


def _erf(m, x):
    a = m.let(m.abs(x))
    small = m.add(x, m.mul(x, _horner(m, m.let(m.mul(x, x)), _ERF_POLY)))
    t = m.let(m.min(a, m.const(4.0)))
    large = _signed(m, x, m.sub(m.const(1.0), m.exp2(_horner(m, t, _ERFC_LOG2_POLY))))
    return m.select(m.lt(m.const(_ERF_SMALL), a), large, small)


TANH = Formula(_tanh)
ERF = Formula(_erf)


# ---------------------------------------------------------------- int32 ranges (Triton)


def _fit(span):
    return span if span is not None and -2**31 <= span[0] and span[1] <= 2**31 - 1 else None


def _known(fn: Callable) -> Callable:
    """A range rule that gives None (unknown: int64) when an operand's range is unknown."""
    return lambda *spans: None if None in spans else fn(*spans)


def _product(a, b):
    corners = [x * y for x in a for y in b]
    return _fit((min(corners), max(corners)))


def _remainder_span(_a, b):
    """Floored remainder by a constant c: within (-|c|, |c|)."""
    if b[0] == b[1] != 0 and abs(b[0]) <= 2**30:
        c = abs(b[0])
        return (-(c - 1), c - 1)
    return None


def _quotient_span(a, b):
    """Floored quotient by a constant: monotonic in the dividend."""
    if b[0] == b[1] != 0:
        return _fit(tuple(sorted((a[0] // b[0], a[1] // b[0]))))
    return None


def _hull(*spans):
    return (min(s[0] for s in spans), max(s[1] for s in spans))


# ---------------------------------------------------------------- the table

_NUM2 = ("number", "number")


def _compare(name: str, fn: Callable, tvm: str, operands=_NUM2, same: str = "") -> Op:
    return Op(name, Binary, operands, "bool", fn, lambda t, a, b: fn(a, b), f"{{0}} {name} {{1}}",
              lambda m, a, b: getattr(m.tir, tvm)(a, b), None, "a boolean result: no derivative", same=same)


def _unary_float(name: str, python: Callable, triton: str | Formula, tvm: Callable | Formula, derivative: Callable,
                 native: str | None = None, about: str = "", approx: str | None = None) -> Op:
    return Op(name, Call, ("number",), "float", python, lambda t, x: getattr(t, name)(x), triton, tvm,
              (derivative,), about, tvm_native=native, triton_approx=approx)


_EQUALITY = "`{op}` compares {a} with {b}"

OPS: tuple[Op, ...] = (
    # -- unary operators
    Op("neg", Unary, ("number",), "common", operator.neg, lambda t, a: -a, "-{0}", lambda m, a: -a,
       (lambda args, r: _f(-1.0),), label="unary `-`",
       span=_known(lambda a: _fit((-a[1], -a[0]))), linearity="additive"),
    Op("not", Unary, ("bool",), "bool", operator.not_, lambda t, a: t.logical_not(a), "{0} == 0",
       lambda m, a: m.tir.Not(a), None, "a boolean: no derivative", label="`not`"),
    # -- arithmetic
    Op("+", Binary, _NUM2, "common", operator.add, lambda t, a, b: t.add(a, b), "{0} + {1}",
       lambda m, a, b: m.tir.Add(a, b), (_one, _one),
       span=_known(lambda a, b: _fit((a[0] + b[0], a[1] + b[1]))), linearity="additive"),
    Op("-", Binary, _NUM2, "common", operator.sub, lambda t, a, b: t.sub(a, b), "{0} - {1}",
       lambda m, a, b: m.tir.Sub(a, b), (_one, lambda args, r: _f(-1.0)),
       span=_known(lambda a, b: _fit((a[0] - b[1], a[1] - b[0]))), linearity="additive"),
    Op("*", Binary, _NUM2, "common", operator.mul, lambda t, a, b: t.mul(a, b), "{0} * {1}",
       lambda m, a, b: m.tir.Mul(a, b), (lambda args, r: args[1], lambda args, r: args[0]),
       span=_known(_product), linearity="product"),
    Op("/", Binary, _NUM2, "float", operator.truediv, lambda t, a, b: t.true_divide(a, b), "{0} / {1}",
       lambda m, a, b: m.tir.Div(a, b), (lambda args, r: _div(_f(1.0), args[1]), lambda args, r: _div(Unary(
           "neg", r), args[1]))),
    Op("%", Binary, _NUM2, "common", operator.mod, _torch_remainder, _triton_remainder, _tvm_remainder,
       (_one, lambda args, r: Unary("neg", Call("floor", (_div(args[0], args[1]),)))),
       "floored: a - b floor(a / b), so 1 and -floor(a / b) almost everywhere (torch.remainder's rule); "
       "undefined where the quotient is a whole number",
       span=_known(_remainder_span)),
    Op("//", Binary, ("integer", "integer"), "common", operator.floordiv, _torch_floor_divide, _triton_floor_divide,
       _tvm_floor_divide, (_zero, _zero), "floored division of integers: piecewise constant",
       span=_known(_quotient_span)),
    # -- comparisons and logic: boolean results
    _compare("<", operator.lt, "LT"), _compare("<=", operator.le, "LE"),
    _compare(">", operator.gt, "GT"), _compare(">=", operator.ge, "GE"),
    _compare("==", operator.eq, "EQ", ("any", "any"), _EQUALITY),
    _compare("!=", operator.ne, "NE", ("any", "any"), _EQUALITY),
    Op("and", Binary, ("bool", "bool"), "bool", lambda a, b: bool(a and b), lambda t, a, b: t.logical_and(a, b),
       "{0} & {1}", lambda m, a, b: m.tir.And(a, b), None, "booleans: no derivative"),
    Op("or", Binary, ("bool", "bool"), "bool", lambda a, b: bool(a or b), lambda t, a, b: t.logical_or(a, b),
       "{0} | {1}", lambda m, a, b: m.tir.Or(a, b), None, "booleans: no derivative"),
    # -- float functions
    _unary_float("exp", _py_float(math.exp), "tl.exp({0})", lambda m, x: m.exp(x), lambda args, r: r, "exp"),
    _unary_float("exp2", lambda x: 2.0 ** float(x), "{exp2}({0})", lambda m, x: m.exp2(x),
                 lambda args, r: _mul(r, _f(LN2)), "exp2"),
    _unary_float("log", _py_float(math.log), "tl.log({0})", lambda m, x: m.tir.log(x),
                 lambda args, r: _div(_f(1.0), args[0])),
    _unary_float("log2", _py_float(math.log2), "tl.log2({0})", lambda m, x: m.tir.log2(x),
                 lambda args, r: _div(_f(1.0 / LN2), args[0])),
    _unary_float("sqrt", _py_float(math.sqrt), "tl.sqrt({0})", lambda m, x: m.tir.sqrt(x),
                 lambda args, r: _div(_f(0.5), r)),
    _unary_float("rsqrt", lambda x: 1.0 / math.sqrt(x), "tl.rsqrt({0})",
                 lambda m, x: m.const(1.0) / m.tir.sqrt(x), lambda args, r: _div(_mul(_f(-0.5), r), args[0]),
                 "rsqrt"),
    # tanh has no native TVM rendering: CUDA's fast-math tanhf may be the 2^-11 hardware approximation, which only
    # half-precision Triton kernels take (tanh.approx.f32, FlashAttention's softcap; passes/tiling.py).
    _unary_float("tanh", _py_float(math.tanh), TANH, TANH, lambda args, r: _sub(_f(1.0), _mul(r, r)),
                 approx="tanh_approx({0})"),
    _unary_float("sigmoid", lambda x: 1.0 / (1.0 + math.exp(-x)), "tl.sigmoid({0})",
                 lambda m, x: m.const(1.0) / (m.const(1.0) + m.exp(-x)), lambda args, r: _mul(r, _sub(_f(1.0), r)),
                 "sigmoid"),
    _unary_float("erf", _py_float(math.erf), ERF, ERF,
                 lambda args, r: _mul(_f(2.0 / math.sqrt(math.pi)),
                                      Call("exp", (Unary("neg", _mul(args[0], args[0])),))),
                 "erf"),
    _unary_float("sin", _py_float(math.sin), "tl.sin({0})", lambda m, x: m.tir.sin(x),
                 lambda args, r: Call("cos", args)),
    _unary_float("cos", _py_float(math.cos), "tl.cos({0})", lambda m, x: m.tir.cos(x),
                 lambda args, r: Unary("neg", Call("sin", args))),
    _unary_float("floor", lambda x: float(math.floor(x)), "tl.floor({0})", lambda m, x: m.tir.floor(x), _zero,
                 about="zero almost everywhere (undefined at whole numbers)"),
    # -- functions of numbers that keep the operands' kind
    Op("abs", Call, ("number",), "common", abs, lambda t, x: t.abs(x), "tl.abs({0})", lambda m, x: m.tir.abs(x),
       (lambda args, r: _where(Binary(">", args[0], Num(0, False)), _f(1.0),
                               _where(Binary("<", args[0], Num(0, False)), _f(-1.0), _f(0.0))),),
       "sign(x), 0 at 0 (torch's rule)", span=_known(lambda a: _fit((0, max(abs(a[0]), abs(a[1])))))),
    Op("min", Call, _NUM2, "common", _py_promoted(min), lambda t, a, b: t.minimum(a, b), "tl.minimum({0}, {1})",
       lambda m, a, b: m.tir.min(a, b), (_min_max_derivative(True, "<"), _min_max_derivative(False, "<")),
       "the smaller operand's is 1, the other's 0; ties give each 0.5 (torch's rule)", span=_known(_hull)),
    Op("max", Call, _NUM2, "common", _py_promoted(max), lambda t, a, b: t.maximum(a, b), "tl.maximum({0}, {1})",
       lambda m, a, b: m.tir.max(a, b), (_min_max_derivative(True, ">"), _min_max_derivative(False, ">")),
       "the larger operand's is 1, the other's 0; ties give each 0.5 (torch's rule)", span=_known(_hull)),
    Op("where", Call, ("bool", "any", "any"), "common", _py_where, lambda t, c, a, b: t.where(c, a, b),
       "tl.where({0}, {1}, {2})", lambda m, c, a, b: m.tir.Select(c, a, b),
       (None, lambda args, r: _step(args[0]), lambda args, r: _step(Unary("not", args[0]))),
       "the condition is a boolean: none", labels=("where's condition",),
       same="where's branches must both be numbers or both booleans, got {a} and {b}", span=lambda _c, a, b: None if None in (a, b) else _hull(a, b)),
)
_BY_NODE = {(op.node, op.name): op for op in OPS}
FUNCTIONS: tuple[str, ...] = tuple(op.name for op in OPS if op.node is Call)
UNARY_FUNCTIONS: tuple[str, ...] = tuple(op.name for op in OPS if op.node is Call and op.arity == 1)


def function(name: str) -> Op | None:
    """The table entry of a function name, or None if the language has no such function."""
    return _BY_NODE.get((Call, name))


def op_of(e: Expr) -> Op:
    """The table entry of a Unary, Binary or Call node."""
    name = e.fn if isinstance(e, Call) else e.op
    try:
        return _BY_NODE[type(e), name]
    except KeyError:
        raise TypeError(f"not an operator of the language: {name!r} in {type(e).__name__}") from None


# ---------------------------------------------------------------- kinds


def numeric(kind: str | None) -> str | None:
    """Booleans count as ints where a number is needed."""
    return "int" if kind == "bool" else kind


def compute_kind(op: Op, kinds: Sequence[str]) -> str:
    """The kind the non-"bool" operands are converted to before `op` applies: float for float results, else
    their common kind ("number" operands count booleans as ints; "any" operands keep them)."""
    if op.result == "float":
        return "float"
    shared = [numeric(k) if role in ("number", "integer") else k for role, k in zip(op.operands, kinds)
              if role != "bool"]
    kind = shared[0] if shared else "bool"  # logic: booleans only
    for k in shared[1:]:
        kind = promote(kind, k)
    return kind


def result_kind(op: Op, kinds: Sequence[str]) -> str:
    return op.result if op.result != "common" else compute_kind(op, kinds)


class Kinds:
    """'int', 'float' or 'bool' of the expressions of one checked spec, each distinct node typed once (so
    typing is linear in the size of the expression DAG). Misuse is the checker's to report."""

    def __init__(self, spec: Attention):
        self.spec = spec
        self._memo: dict[Expr, str] = {}

    def __call__(self, e: Expr) -> str:
        kind = self._memo.get(e)
        if kind is None:
            kind = self._memo[e] = self._kind(e)
        return kind

    def assume(self, e: Expr, kind: str) -> None:
        """Type `e` as `kind`: a placeholder a pass puts in an expression (grad.WEIGHT is a float)."""
        self._memo[e] = kind

    def _kind(self, e: Expr) -> str:
        if isinstance(e, Num):
            return "bool" if isinstance(e.value, bool) else "float" if e.is_float else "int"
        if isinstance(e, (IndexVar, SizeRef)):
            return "int"
        if isinstance(e, QK):
            return "float"
        if isinstance(e, ParamRef):
            p = self.spec.param(e.name)
            return dtype_kind(p.dtype) if p else "float"
        if isinstance(e, Lookup):
            t = self.spec.input(e.tensor)
            return dtype_kind(t.dtype) if t else "float"
        if isinstance(e, (Unary, Binary, Call)):
            return result_kind(op_of(e), [self(x) for x in children(e)])
        raise TypeError(f"not an IR expression: {e!r}")


def expr_type(e: Expr, spec: Attention) -> str:
    """The kind of one expression of a checked spec (use a Kinds to type many)."""
    return Kinds(spec)(e)
