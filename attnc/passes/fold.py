"""Evaluating IR expressions on Python scalars, and the constant-folding pass built on it. Operators mean what
their entries in the operator table (ops.py) say; both walks visit each distinct node once."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Mapping, Union

from ..ir import (
    QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, ParamRef, SizeRef, Unary, children, representable,
)
from ..ops import op_of

Scalar = Union[int, float, bool]


class NotConstant(Exception):
    """The expression needs something the environment does not give."""


def evaluate(e: Expr, env: Mapping[str, Scalar], lookup: Callable[[str, tuple], Scalar] | None = None) -> Scalar:
    """`e` with Python semantics (floored `%` and `//`, true `/`), names from `env` (index variables, sizes, params),
    tensor lookups through `lookup(tensor, indices)`. Raises NotConstant for anything missing."""
    memo: dict[Expr, Scalar] = {}

    def value(node: Expr) -> Scalar:
        if node not in memo:
            memo[node] = _evaluate(node, value, env, lookup)
        return memo[node]

    return value(e)


def _evaluate(e: Expr, value: Callable[[Expr], Scalar], env: Mapping[str, Scalar], lookup) -> Scalar:
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
        return lookup(e.tensor, tuple(int(value(x)) for x in e.indices))
    if isinstance(e, (Unary, Binary, Call)):
        op = op_of(e)
        args = [value(x) for x in children(e)]
        try:
            return op.python(*args)
        except (ValueError, OverflowError, ZeroDivisionError) as err:
            raise NotConstant(f"{op.name}: {err}") from None
    raise TypeError(f"not an IR expression: {e!r}")


def to_num(value: Scalar) -> Num:
    if isinstance(value, bool):
        return Num(value, False)
    return Num(value, isinstance(value, float))


def fold(e: Expr, env: Mapping[str, Scalar], memo: dict[Expr, Expr] | None = None) -> Expr:
    """`e` with the names in `env` substituted and every constant subexpression computed. `memo` (results by
    node, for this `env`) may be shared by several calls; each distinct node is folded once."""
    memo = {} if memo is None else memo
    done = memo.get(e)
    if done is None:
        done = memo[e] = _fold(e, env, memo)
    return done


def _fold(e: Expr, env: Mapping[str, Scalar], memo: dict[Expr, Expr]) -> Expr:
    if isinstance(e, (SizeRef, ParamRef, IndexVar)) and e.name in env:
        return to_num(env[e.name])
    if isinstance(e, Lookup):
        return replace(e, indices=tuple(fold(x, env, memo) for x in e.indices))
    if not isinstance(e, (Unary, Binary, Call)):
        return e
    args = tuple(fold(x, env, memo) for x in children(e))
    if isinstance(e, Unary):
        e = replace(e, operand=args[0])
    elif isinstance(e, Binary):
        e = replace(e, lhs=args[0], rhs=args[1])
    else:
        e = replace(e, args=args)
    if all(isinstance(c, Num) for c in args):
        try:
            value = evaluate(e, {})
        except NotConstant:
            return e
        if isinstance(value, float) and math.isnan(value) or not representable(value, isinstance(value, float)):
            return e  # NaN, or no literal can hold it: the kernel computes the same (64-bit integers wrap)
        return to_num(value)
    return e


def fold_spec(spec: Attention, sizes: Mapping[str, int]) -> Attention:
    """The spec with compile-time sizes substituted into score, masks and sink, and constants folded.
    Masks that fold to `true` are dropped; declarations are unchanged."""
    memo: dict[Expr, Expr] = {}
    masks = tuple(m for m in (fold(m, sizes, memo) for m in spec.masks) if m != Num(True, False))
    sink = spec.normalizer.sink
    return replace(spec, score=fold(spec.score, sizes, memo), masks=masks,
                   normalizer=replace(spec.normalizer, sink=None if sink is None else fold(sink, sizes, memo)))
