"""Evaluating IR expressions on Python scalars, and the constant-folding pass built on it."""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Callable, Mapping, Union

from ..ir import Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Softmax, Unary, QK

Scalar = Union[int, float, bool]

_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
            "!=": operator.ne}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
          "%": operator.mod}
_FLOAT_FUNCS: Mapping[str, Callable[[float], float]] = {
    "exp": math.exp, "exp2": lambda x: 2.0 ** x, "log": math.log, "log2": math.log2, "sqrt": math.sqrt,
    "rsqrt": lambda x: 1.0 / math.sqrt(x), "tanh": math.tanh, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
    "floor": lambda x: float(math.floor(x)),
}


class NotConstant(Exception):
    """The expression needs something the environment does not give."""


def evaluate(e: Expr, env: Mapping[str, Scalar], lookup: Callable[[str, tuple], Scalar] | None = None) -> Scalar:
    """`e` with Python semantics (floored `%` and `//`, true `/`), names from `env` (index variables, sizes, params),
    tensor lookups through `lookup(tensor, indices)`. Raises NotConstant for anything missing."""
    if isinstance(e, Num):
        return e.value
    if isinstance(e, (IndexVar, SizeRef, ParamRef)):
        if e.name not in env:
            raise NotConstant(e.name)
        return env[e.name]
    if isinstance(e, QK):
        raise NotConstant("qk")
    if isinstance(e, Lookup):
        if lookup is None:
            raise NotConstant(e.tensor)
        return lookup(e.tensor, tuple(int(evaluate(x, env, lookup)) for x in e.indices))
    if isinstance(e, Unary):
        x = evaluate(e.operand, env, lookup)
        return (not x) if e.op == "not" else -x
    if isinstance(e, Binary):
        a = evaluate(e.lhs, env, lookup)
        if e.op in ("and", "or"):
            b = evaluate(e.rhs, env, lookup)
            return bool(a and b) if e.op == "and" else bool(a or b)
        b = evaluate(e.rhs, env, lookup)
        if e.op in _COMPARE:
            return _COMPARE[e.op](a, b)
        if e.op in ("/", "//", "%") and b == 0:
            raise NotConstant("division by zero")
        return _ARITH[e.op](a, b)
    if isinstance(e, Call):
        args = [evaluate(x, env, lookup) for x in e.args]
        if e.fn in _FLOAT_FUNCS:
            try:
                return _FLOAT_FUNCS[e.fn](float(args[0]))
            except (ValueError, OverflowError, ZeroDivisionError) as err:
                raise NotConstant(f"{e.fn}: {err}") from None
        if e.fn == "abs":
            return abs(args[0])
        if e.fn in ("min", "max", "where"):
            a, b = args[1:] if e.fn == "where" else args
            if isinstance(a, float) or isinstance(b, float):  # promote as the reference does
                a, b = float(a), float(b)
            if e.fn == "where":
                return a if args[0] else b
            return min(a, b) if e.fn == "min" else max(a, b)
    raise TypeError(f"not an IR expression: {e!r}")


def to_num(value: Scalar) -> Num:
    if isinstance(value, bool):
        return Num(value, False)
    return Num(value, isinstance(value, float))


def fold(e: Expr, env: Mapping[str, Scalar]) -> Expr:
    """`e` with the names in `env` substituted and every constant subexpression computed."""
    if isinstance(e, (SizeRef, ParamRef, IndexVar)) and e.name in env:
        return to_num(env[e.name])
    if isinstance(e, Unary):
        operand = fold(e.operand, env)
        e = replace(e, operand=operand)
    elif isinstance(e, Binary):
        e = replace(e, lhs=fold(e.lhs, env), rhs=fold(e.rhs, env))
    elif isinstance(e, Call):
        e = replace(e, args=tuple(fold(x, env) for x in e.args))
    elif isinstance(e, Lookup):
        return replace(e, indices=tuple(fold(x, env) for x in e.indices))
    else:
        return e
    if all(isinstance(c, Num) for c in _operands(e)):
        try:
            value = evaluate(e, {})
        except NotConstant:
            return e
        if isinstance(value, float) and not math.isfinite(value) and not math.isinf(value):
            return e  # NaN: leave it to the kernel, which computes the same
        return to_num(value)
    return e


def _operands(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.lhs, e.rhs)
    return e.args


def fold_spec(spec: Attention, sizes: Mapping[str, int]) -> Attention:
    """The spec with compile-time sizes substituted into score, masks and sink, and constants folded.
    Masks that fold to `true` are dropped; declarations are unchanged."""
    masks = tuple(m for m in (fold(m, sizes) for m in spec.masks) if m != Num(True, False))
    sink = spec.normalizer.sink
    return replace(spec, score=fold(spec.score, sizes), masks=masks,
                   normalizer=Softmax(None if sink is None else fold(sink, sizes)))
