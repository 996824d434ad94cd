"""Mask analysis: which keys each query row can keep, as loop bounds the kernel evaluates at run time.

A conjunct that is an interval in j -- `j OP t` after moving terms, with j's coefficient +-1 and t any integer
expression free of j (so i, h, b, sizes, params and lookups at i may appear: causal, sliding windows, prefixes,
per-head windows, valid lengths) -- gives exact bounds. A conjunct without j (a row condition) keeps a whole
row or none of it. Everything else is evaluated element-wise on partial tiles; where it is an `or`/`and` of
intervals (prefix-LM) its interval hull still narrows the loop. Dilation (`(i - j) % d == 0`) has no hull of
its own but the windows it comes with bound the loop.

The kernel turns the per-row bounds of a query tile into key-tile ranges with `key_tiles` (mirrored in the
generated code): tiles outside the hull never run, tiles inside every row's exact range are full (no mask).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Sequence

from ..ir import COMPARE_OPS, QK, Attention, Binary, Call, Expr, IndexVar, Lookup, Num, SizeRef, Unary, children, walk
from ..ops import expr_type, op_of
from .fold import Scalar, evaluate, fold
from .plan import KernelPlan, KeyRange, MaskPlan, QueryRange

_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_ZERO, _ONE = Num(0, False), Num(1, False)


def analyze_masks(plan: KernelPlan) -> KernelPlan:
    spec = plan.spec
    exact_lower, exact_upper, hull_lower, hull_upper, evaluated = [], [], [], [], []
    for conjunct in spec.masks:
        exact = key_range(conjunct, spec)
        if exact is not None:
            exact_lower += exact.lower
            exact_upper += exact.upper
            continue
        evaluated.append(conjunct)
        hull = interval_hull(conjunct, spec)
        if hull is not None:
            hull_lower += hull.lower
            hull_upper += hull.upper
    exact = KeyRange(_unique(exact_lower), _unique(exact_upper))
    hull_lower = [e for e in hull_lower if e != _ZERO]  # 0 is the implicit lower bound
    hull = KeyRange(_unique(exact_lower + hull_lower), _unique(exact_upper + hull_upper))
    masks = MaskPlan(exact, hull, tuple(evaluated), any(_reads_tensor_at_ij(c) for c in evaluated))
    return replace(plan, masks=masks)


def query_range(masks: MaskPlan) -> QueryRange:
    """The hull's per-row key bounds inverted, where they are i + r or free of i (plan.QueryRange)."""
    found, inverted = _inverted(masks.hull)
    return QueryRange(**found, per_tile_check=masks.data_dependent or not inverted)


def full_query_range(masks: MaskPlan) -> QueryRange | None:
    """The exact per-row key bounds inverted (plan.BackwardPlan.full_queries); None where some exact bound is not
    i + r or free of i, or an evaluated mask applies (no tile is full then)."""
    found, inverted = _inverted(masks.exact)
    return QueryRange(**found) if inverted and not masks.evaluated else None


def _inverted(bounds: KeyRange) -> tuple[dict[str, tuple[Expr, ...]], bool]:
    """The r of each bound i + r and the bounds free of i, by side (QueryRange's fields), and whether every bound
    was one of the two."""
    found: dict[str, list[Expr]] = {"from_upper": [], "from_lower": [], "upper_free": [], "lower_free": []}
    inverted = True
    for side, sides in (("upper", bounds.upper), ("lower", bounds.lower)):
        for bound in sides:
            form = linear_in_j(bound, "i")
            coeff, rest = form if form is not None else (None, None)
            if coeff == 0:
                found[f"{side}_free"].append(bound)
            elif coeff == 1:
                found[f"from_{side}"].append(fold(rest if rest is not None else _ZERO, {}))
            else:
                inverted = False
    return {name: _unique(exprs) for name, exprs in found.items()}, inverted


def key_range(conjunct: Expr, spec: Attention) -> KeyRange | None:
    """The exact keys `conjunct` keeps, as bounds on j; None when it is not an interval in j."""
    if _free_of_j(conjunct):
        # A row condition: every key or none. upper = where(cond, N, 0) empties the row when it fails.
        return KeyRange(upper=(Call("where", (conjunct, SizeRef("N"), _ZERO)),))
    if not (isinstance(conjunct, Binary) and conjunct.op in COMPARE_OPS and conjunct.op != "!="):
        return None
    lhs, rhs = linear_in_j(conjunct.lhs), linear_in_j(conjunct.rhs)
    if lhs is None or rhs is None:
        return None
    coeff, rest = lhs[0] - rhs[0], _sub(lhs[1], rhs[1])  # coeff * j + rest OP 0
    if coeff not in (1, -1) or (rest is not None and expr_type(rest, spec) != "int"):
        return None
    op = conjunct.op
    if coeff == 1:  # j + rest OP 0  <=>  j OP -rest
        bound = _neg(rest)
    else:  # -j + rest OP 0  <=>  j OP' rest
        op, bound = _FLIP[op], (rest if rest is not None else _ZERO)
    bound = fold(bound, {})
    plus_one = fold(Binary("+", bound, _ONE), {})
    return {
        "<": KeyRange(upper=(bound,)),
        "<=": KeyRange(upper=(plus_one,)),
        ">": KeyRange(lower=(plus_one,)),
        ">=": KeyRange(lower=(bound,)),
        "==": KeyRange(lower=(bound,), upper=(plus_one,)),
    }[op]


def interval_hull(e: Expr, spec: Attention) -> KeyRange | None:
    """A range containing every key `e` keeps (None: no useful bound). Each distinct node is looked at once and
    its bounds listed once, so an `and`/`or` that reuses itself (`keep = keep | keep`, repeated) stays linear."""
    memo: dict[Expr, KeyRange | None] = {}

    def hull(node: Expr) -> KeyRange | None:
        if node not in memo:
            memo[node] = _hull(node, hull, spec)
        return memo[node]

    return hull(e)


def _hull(e: Expr, hull, spec: Attention) -> KeyRange | None:
    exact = key_range(e, spec)
    if exact is not None:
        return exact
    if isinstance(e, Binary) and e.op == "and":
        parts = [r for r in (hull(e.lhs), hull(e.rhs)) if r is not None]
        return KeyRange(_unique(sum((r.lower for r in parts), ())), _unique(sum((r.upper for r in parts), ()))) \
            if parts else None
    if isinstance(e, Binary) and e.op == "or":
        a, b = hull(e.lhs), hull(e.rhs)
        if a is None or b is None:
            return None
        lower = Call("min", (_max_of(a.lower, _ZERO), _max_of(b.lower, _ZERO)))
        upper = Call("max", (_min_of(a.upper, SizeRef("N")), _min_of(b.upper, SizeRef("N"))))
        return KeyRange((fold(lower, {}),), (fold(upper, {}),))
    return None


def linear_in_j(e: Expr, var: str = "j") -> tuple[int, Expr | None] | None:
    """`e` as (c, rest) with e == c * j + rest and rest free of j (None for 0); None if not of that form.
    Which operators keep the form is the operator table's `linearity`: an additive operator (+, -, unary -)
    combines its operands' forms with its constant derivatives (+-1), and a product scales one by an integer
    literal. Each distinct node is analyzed once. `var`: another index variable in place of j."""
    free = _FreeOf(var)
    memo: dict[Expr, tuple[int, Expr | None] | None] = {}

    def form(node: Expr) -> tuple[int, Expr | None] | None:
        if node not in memo:
            memo[node] = _linear_form(node, form, free)
        return memo[node]

    return form(e)


def _linear_form(e: Expr, form, free: "_FreeOf") -> tuple[int, Expr | None] | None:
    if free(e):
        return 0, e
    if isinstance(e, IndexVar):  # the variable itself (other index variables are free of it)
        return 1, None
    if not isinstance(e, (Unary, Binary, Call)):
        return None
    op, args = op_of(e), children(e)
    if op.linearity == "additive":
        parts = [form(x) for x in args]
        if None in parts:
            return None
        signs = [int(evaluate(rule(args, e), {})) for rule in op.derivative]
        rest = None
        for sign, (_, term) in zip(signs, parts):
            if term is not None:
                rest = _add(rest, term) if sign > 0 else _sub(rest, term)
        return sum(sign * coeff for sign, (coeff, _) in zip(signs, parts)), rest
    if op.linearity == "product":
        for factor, other in ((args[0], args[1]), (args[1], args[0])):
            if isinstance(factor, Num) and not factor.is_float and not isinstance(factor.value, bool):
                inner = form(other)
                if inner is None:
                    return None
                rest = None if inner[1] is None else Binary("*", factor, inner[1])
                return factor.value * inner[0], rest
    return None


# ---------------------------------------------------------------- the tile ranges (the kernel's formula)


def row_bounds(r: KeyRange, env: Mapping[str, Scalar], lookup=None) -> tuple[int, int]:
    """[lo, hi) of one row: env gives i, h, b, sizes (N among them) and params."""
    lo = max([0] + [int(evaluate(e, env, lookup)) for e in r.lower])
    hi = min([env["N"]] + [int(evaluate(e, env, lookup)) for e in r.upper])
    return lo, hi


def key_tiles(masks: MaskPlan, rows: Sequence[Mapping[str, Scalar]], block_n: int,
              lookup: Callable | None = None) -> tuple[int, int, int, int]:
    """(t_start, f_start, f_end, t_end) for the valid rows of one query tile: the key loop runs over tiles
    [t_start, t_end); tiles [f_start, f_end) hold only keys every row's exact range keeps. The generated
    kernel computes the same with vector min/max over the tile's rows."""
    hull = [row_bounds(masks.hull, env, lookup) for env in rows]
    exact = [row_bounds(masks.exact, env, lookup) for env in rows]
    nonempty = [(lo, hi) for lo, hi in hull if hi > lo]
    if not nonempty:
        return 0, 0, 0, 0
    t_start = min(lo for lo, _ in nonempty) // block_n
    t_end = -(-max(hi for _, hi in nonempty) // block_n)
    f_start = -(-max(lo for lo, _ in exact) // block_n)
    f_end = min(hi for _, hi in exact) // block_n
    f_start = min(max(f_start, t_start), t_end)
    f_end = min(max(f_end, f_start), t_end)
    return t_start, f_start, f_end, t_end


# ---------------------------------------------------------------- helpers


def _free_of_j(e: Expr) -> bool:
    return _FreeOf("j")(e)


class _FreeOf:
    """Whether expressions are free of one index variable and of qk, each distinct node looked at once."""

    def __init__(self, var: str):
        self.var = var
        self.memo: dict[Expr, bool] = {}

    def __call__(self, e: Expr) -> bool:
        if e not in self.memo:
            self.memo[e] = not (isinstance(e, QK) or (isinstance(e, IndexVar) and e.name == self.var)) \
                and all(self(c) for c in children(e))
        return self.memo[e]


def _reads_tensor_at_ij(e: Expr) -> bool:
    return any(isinstance(n, Lookup) and any(isinstance(x, IndexVar) and x.name in "ij"
                                             for idx in n.indices for x in walk(idx))
               for n in walk(e))


def _neg(e: Expr | None) -> Expr:
    if e is None:
        return _ZERO
    if isinstance(e, Unary) and e.op == "neg":
        return e.operand
    if isinstance(e, Binary) and e.op == "-":
        return Binary("-", e.rhs, e.lhs)
    return fold(Unary("neg", e), {})


def _add(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return b if a is None else a
    return Binary("+", a, b)


def _sub(a: Expr | None, b: Expr | None) -> Expr | None:
    if b is None:
        return a
    return _neg(b) if a is None else Binary("-", a, b)


def _max_of(exprs: tuple[Expr, ...], start: Expr) -> Expr:
    for e in exprs:
        start = Call("max", (start, e))
    return start


def _min_of(exprs: tuple[Expr, ...], start: Expr) -> Expr:
    for e in exprs:
        start = Call("min", (start, e))
    return start


def _unique(exprs: list[Expr]) -> tuple[Expr, ...]:
    return tuple(dict.fromkeys(exprs))
