"""The shared vocabulary: frozen IR nodes, the canonical printer and the stable key.

Every front-end (text, decorator, flex mods) produces an `Attention`; every later stage reads one.
Nodes are frozen dataclasses with tuple children and structural equality; `span` is carried for
error messages but excluded from equality, hashing and the key.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Union

from .errors import Span

# Sizes with a fixed meaning; any other size name is free (bound by `dims` or by a tensor's shape).
ROLES = ("B", "H", "HKV", "M", "N", "D", "DV")
# Packed and paged storage (Ragged, Paged below; docs/serving.md) add the sizes T and TK (tokens of q and of k/v
# packed along one axis), B1 = B + 1 (sequence offsets), PAGES pages of PAGE slots and MAXP block-table entries
# per sequence; outside such a spec these are free size names.
# Index variables: batch, query head, query position, key position.
INDEX_VARS = ("b", "h", "i", "j")
# Element types a tensor may have; q/k/v take only the floating ones attention runs in.
TENSOR_DTYPES = ("f16", "bf16", "f32", "f64", "i8", "i16", "i32", "i64", "bool")
QKV_DTYPES = ("f16", "bf16", "f32")
PARAM_DTYPES = ("i32", "f32", "bool")
UNARY_FUNCS = ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "floor")
BINARY_FUNCS = ("min", "max")
FUNCS = UNARY_FUNCS + BINARY_FUNCS + ("where",)
ARITH_OPS = ("+", "-", "*", "/", "//", "%")  # `//`: floored division of integers (Python's)
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
LOGIC_OPS = ("and", "or")


def _span() -> Span | None:
    return field(default=None, compare=False, hash=False, repr=False, kw_only=True)


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    """A literal. `is_float` keeps 1 and 1.0 apart (Python's 1 == 1.0 would merge them)."""

    value: Union[int, float, bool]
    is_float: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class IndexVar:
    name: str  # one of INDEX_VARS
    span: Span | None = _span()


@dataclass(frozen=True)
class SizeRef:
    name: str  # a role in ROLES or a free size name
    span: Span | None = _span()


@dataclass(frozen=True)
class ParamRef:
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class QK:
    """q[b, h, i, :] . k[b, kvh, j, :] in float32 (float64 in the reference)."""

    span: Span | None = _span()


@dataclass(frozen=True)
class Lookup:
    tensor: str
    indices: tuple["Expr", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Unary:
    op: str  # "neg" | "not"
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Binary:
    op: str  # ARITH_OPS, COMPARE_OPS or LOGIC_OPS
    lhs: "Expr"
    rhs: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    fn: str  # one of FUNCS
    args: tuple["Expr", ...]
    span: Span | None = _span()


Expr = Union[Num, IndexVar, SizeRef, ParamRef, QK, Lookup, Unary, Binary, Call]


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Lookup):
        return e.indices
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.lhs, e.rhs)
    if isinstance(e, Call):
        return e.args
    return ()


def walk(e: Expr):
    """Every node of `e`, parents before children."""
    stack = [e]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class TensorDecl:
    """A tensor argument. The order of `shape` is the memory layout: [B, H, M, D] is BHSD."""

    name: str
    dtype: str
    shape: tuple[str, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class ParamDecl:
    """A runtime scalar passed by name; changing its value never recompiles."""

    name: str
    dtype: str  # one of PARAM_DTYPES
    default: Union[int, float, bool, None] = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Softmax:
    """softmax over the kept keys; `sink` is a per-head logit that joins the denominator only."""

    sink: Expr | None = None
    span: Span | None = _span()


Normalizer = Softmax


@dataclass(frozen=True)
class Ragged:
    """`ragged q by OFFSETS` / `ragged k, v by OFFSETS`: sequences packed along one axis (q [T, H, D], k and v
    [TK, HKV, D]); sequence b is the rows OFFSETS[b] .. OFFSETS[b + 1] - 1 (FlashAttention's cu_seqlens)."""

    offsets: str  # an input i32[B1], B1 = B + 1: starts at 0, never decreases, ends at T (or TK)
    span: Span | None = _span()

    def declares(self) -> tuple[TensorDecl, ...]:
        return (TensorDecl(self.offsets, "i32", ("B1",), span=self.span),)


@dataclass(frozen=True)
class Paged:
    """`paged k, v by TABLE, LENGTHS`: K/V in a pool of pages (k, v [PAGES, PAGE, HKV, D]). Sequence b has
    LENGTHS[b] keys; key j is slot j % PAGE of page TABLE[b, j // PAGE] (vLLM's block table)."""

    table: str  # an input i32[B, MAXP]
    lengths: str  # an input i32[B]
    span: Span | None = _span()

    def declares(self) -> tuple[TensorDecl, ...]:
        return (TensorDecl(self.table, "i32", ("B", "MAXP"), span=self.span),
                TensorDecl(self.lengths, "i32", ("B",), span=self.span))


Storage = Union[Ragged, Paged]  # how the sequences of q (Ragged only) or of k and v are stored; None: dense


def default_score() -> Expr:
    return Binary("*", QK(), Call("rsqrt", (SizeRef("D"),)))


def causal_mask() -> Expr:
    """`mask causal`: bottom-right aligned, so a decode query (M = 1) sees every key."""
    return Binary(">=", Binary("+", IndexVar("i"), Binary("-", SizeRef("N"), SizeRef("M"))), IndexVar("j"))


@dataclass(frozen=True)
class Attention:
    """One attention variant. Build it with `make_attention`, which puts it in canonical form."""

    name: str
    q: TensorDecl
    k: TensorDecl
    v: TensorDecl
    dims: tuple[tuple[str, int], ...] = ()  # sizes bound at compile time, sorted by name
    params: tuple[ParamDecl, ...] = ()  # sorted by name
    inputs: tuple[TensorDecl, ...] = ()  # extra tensors, sorted by name
    score: Expr = field(default_factory=default_score)
    masks: tuple[Expr, ...] = ()  # conjunction; split at `and`, deduplicated, sorted by printed form
    normalizer: Normalizer = field(default_factory=Softmax)
    returns_lse: bool = False
    span: Span | None = _span()
    # Dense (None) unless a `ragged` / `paged` statement says otherwise. Their index tensors are also in `inputs`.
    q_storage: Ragged | None = None
    kv_storage: Storage | None = None

    @cached_property
    def canonical(self) -> str:
        return print_attention(self)

    @cached_property
    def key(self) -> str:
        """Hex SHA-256 of the canonical text without the name: spans, comments, equivalent spellings and the
        label a front-end gives the variant do not change it, so the same math shares one cached kernel."""
        anonymous = print_attention(replace(self, name="_"))
        return hashlib.sha256(anonymous.encode()).hexdigest()

    @property
    def dim_values(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def is_gqa_shape(self) -> bool:
        """True when K/V have their own head count (HKV); H == HKV is still checked at call time."""
        return "HKV" in self.k.shape

    @property
    def value_dim(self) -> str:
        return "DV" if "DV" in self.v.shape else "D"

    def param(self, name: str) -> ParamDecl | None:
        return next((p for p in self.params if p.name == name), None)

    def input(self, name: str) -> TensorDecl | None:
        return next((t for t in self.inputs if t.name == name), None)


def split_conjuncts(e: Expr) -> list[Expr]:
    if isinstance(e, Binary) and e.op == "and":
        return split_conjuncts(e.lhs) + split_conjuncts(e.rhs)
    return [e]


def make_attention(
    name: str,
    q: TensorDecl,
    k: TensorDecl,
    v: TensorDecl,
    *,
    dims=(),
    params=(),
    inputs=(),
    score: Expr | None = None,
    masks=(),
    normalizer: Normalizer | None = None,
    returns_lse: bool = False,
    span: Span | None = None,
    q_storage: Ragged | None = None,
    kv_storage: Storage | None = None,
) -> Attention:
    """Canonical form: whatever the spelling, the same meaning gives an equal node and the same key.
    The index tensors a storage names join `inputs` unless an input of that name is given."""
    flat: dict[str, Expr] = {}
    for m in masks:
        for c in split_conjuncts(m):
            flat.setdefault(print_expr(c), c)
    inputs = list(inputs)
    for storage in (q_storage, kv_storage):
        for decl in storage.declares() if storage is not None else ():
            if all(t.name != decl.name for t in inputs):
                inputs.append(decl)
    return Attention(
        name=name,
        q=q,
        k=k,
        v=v,
        dims=tuple(sorted(dict(dims).items())),
        params=tuple(sorted(params, key=lambda p: p.name)),
        inputs=tuple(sorted(inputs, key=lambda t: t.name)),
        score=default_score() if score is None else score,
        masks=tuple(flat[key] for key in sorted(flat)),
        normalizer=Softmax() if normalizer is None else normalizer,
        returns_lse=returns_lse,
        span=span,
        q_storage=q_storage,
        kv_storage=kv_storage,
    )


def with_name(a: Attention, name: str) -> Attention:
    return replace(a, name=name)


# ---------------------------------------------------------------- types


def expr_type(e: Expr, spec: Attention) -> str:
    """'int', 'float' or 'bool' for an expression of a checked spec (the checker reports misuse)."""
    if isinstance(e, Num):
        if isinstance(e.value, bool):
            return "bool"
        return "float" if e.is_float else "int"
    if isinstance(e, (IndexVar, SizeRef)):
        return "int"
    if isinstance(e, QK):
        return "float"
    if isinstance(e, ParamRef):
        p = spec.param(e.name)
        return dtype_kind(p.dtype) if p else "float"
    if isinstance(e, Lookup):
        t = spec.input(e.tensor)
        return dtype_kind(t.dtype) if t else "float"
    if isinstance(e, Unary):
        return "bool" if e.op == "not" else expr_type(e.operand, spec)
    if isinstance(e, Binary):
        if e.op in COMPARE_OPS or e.op in LOGIC_OPS:
            return "bool"
        if e.op == "/":
            return "float"
        return promote(expr_type(e.lhs, spec), expr_type(e.rhs, spec))
    if isinstance(e, Call):
        if e.fn in ("min", "max"):
            return promote(expr_type(e.args[0], spec), expr_type(e.args[1], spec))
        if e.fn == "where":
            return promote(expr_type(e.args[1], spec), expr_type(e.args[2], spec))
        if e.fn == "abs":
            return expr_type(e.args[0], spec)
        return "float"
    raise TypeError(f"not an IR expression: {e!r}")


def dtype_kind(dtype: str) -> str:
    if dtype == "bool":
        return "bool"
    return "int" if dtype.startswith("i") else "float"


def promote(a: str, b: str) -> str:
    if a == b:
        return a
    if "float" in (a, b):
        return "float"
    return "int"  # int with bool counts as int


# ---------------------------------------------------------------- canonical printer

# Binding strength for the printer; the grammar (dsl/attn.lark) uses the same order.
_PREC = {"or": 1, "and": 2, "not": 3, **{op: 4 for op in COMPARE_OPS}, "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6}
_UNARY_PREC = 7
_ATOM_PREC = 8


def format_number(value: Union[int, float, bool], is_float: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if not is_float:
        return str(int(value))
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(float(value))
    return text if any(ch in text for ch in ".enN") else text + ".0"


def _prec(e: Expr) -> int:
    if isinstance(e, Binary):
        return _PREC[e.op]
    if isinstance(e, Unary):
        return _PREC["not"] if e.op == "not" else _UNARY_PREC
    if isinstance(e, Num) and not isinstance(e.value, bool) and e.value < 0:
        return _UNARY_PREC
    return _ATOM_PREC


def _wrap(e: Expr, min_prec: int) -> str:
    text = print_expr(e)
    return f"({text})" if _prec(e) < min_prec else text


def print_expr(e: Expr) -> str:
    if isinstance(e, Num):
        return format_number(e.value, e.is_float)
    if isinstance(e, (IndexVar, SizeRef, ParamRef)):
        return e.name
    if isinstance(e, QK):
        return "qk"
    if isinstance(e, Lookup):
        return f"{e.tensor}[{', '.join(print_expr(x) for x in e.indices)}]"
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(print_expr(x) for x in e.args)})"
    if isinstance(e, Unary):
        if e.op == "not":
            return f"not {_wrap(e.operand, _PREC['not'])}"
        return f"-{_wrap(e.operand, _UNARY_PREC)}"
    if isinstance(e, Binary):
        p = _PREC[e.op]
        if e.op in COMPARE_OPS:  # comparisons do not chain: parenthesize equal precedence on both sides
            return f"{_wrap(e.lhs, p + 1)} {e.op} {_wrap(e.rhs, p + 1)}"
        return f"{_wrap(e.lhs, p)} {e.op} {_wrap(e.rhs, p + 1)}"  # left-associative
    raise TypeError(f"not an IR expression: {e!r}")


def _print_decl(t: TensorDecl) -> str:
    return f"{t.name}: {t.dtype}[{', '.join(t.shape)}]"


def print_storage(targets: str, s: Storage) -> str:
    if isinstance(s, Paged):
        return f"paged {targets} by {s.table}, {s.lengths}"
    return f"ragged {targets} by {s.offsets}"


def print_attention(a: Attention) -> str:
    """Canonical text of a spec; it parses back to an equal `Attention`."""
    lines = [f"attention {a.name} {{"]
    if a.dims:
        lines.append("    dims " + ", ".join(f"{n} = {v}" for n, v in a.dims))
    for t in (a.q, a.k, a.v):
        lines.append(f"    {_print_decl(t)}")
    declared = set()  # inputs a storage statement declares are printed as that statement
    for targets, storage in (("q", a.q_storage), ("k, v", a.kv_storage)):
        if storage is not None:
            lines.append(f"    {print_storage(targets, storage)}")
            declared |= set(storage.declares())
    for p in a.params:
        default = "" if p.default is None else f" = {format_number(p.default, p.dtype == 'f32')}"
        lines.append(f"    param {p.name}: {p.dtype}{default}")
    for t in a.inputs:
        if t in declared:
            continue
        lines.append(f"    input {_print_decl(t)}")
    lines.append(f"    score = {print_expr(a.score)}")
    for m in a.masks:
        lines.append(f"    mask {print_expr(m)}")
    sink = "" if a.normalizer.sink is None else f", sink={print_expr(a.normalizer.sink)}"
    lse = ", lse" if a.returns_lse else ""
    lines.append(f"    return softmax(score{sink}) @ v{lse}")
    lines.append("}")
    return "\n".join(lines) + "\n"
