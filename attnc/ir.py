"""The shared vocabulary: frozen IR nodes, the canonical printer and the stable key.

Every front-end (text, decorator, flex mods) produces an `Attention`; every later stage reads one. The normalizer
is a node too (`Normalizer`: softmax, sigmoid) whose parts (weight map, row normalisation, merge, lse) are data:
stages ask it instead of assuming one, and each backend lowers it in one module (codegen/*/normalize.py).
Nodes are frozen dataclasses with tuple children and structural equality; `span` is carried for
error messages but excluded from equality, hashing and the key. Expressions are DAGs (`score = score + score`
shares its operand): each node hashes once, when it is built, and equality and `walk` visit each distinct
node once, so that nothing is exponential in the depth of the sharing. What each operator means is in
ops.py; the syntax of the operators (their precedence) is here and in dsl/attn.lark.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import cache, cached_property
from typing import Callable, ClassVar, Union

from .errors import Span

# Sizes with a fixed meaning; any other size name is free (bound by `dims` or by a tensor's shape).
ROLES = ("B", "H", "HKV", "M", "N", "D", "DV")
# Packed and paged storage (Ragged, Paged below; docs/serving.md) add the sizes T and TK (tokens of q and of k/v
# packed along one axis), B1 = B + 1 (sequence offsets), PAGES pages of PAGE slots and MAXP block-table entries
# per sequence; outside such a spec these are free size names.
# Index variables: batch, query head, query position, key position.
INDEX_VARS = ("b", "h", "i", "j")
# Element types a tensor may have; q/k/v take only the floating ones attention runs in.
# FP8 K/V caches: k, v and key-side tensors of dot products may be stored in 8 bits, each with a dequant scale
# (`dequant k by k_scale`); q and everything else keep their types.
FP8_DTYPES = ("f8e4m3", "f8e5m2")
TENSOR_DTYPES = ("f16", "bf16", "f32", "f64", "i8", "i16", "i32", "i64", "bool", *FP8_DTYPES)
QKV_DTYPES = ("f16", "bf16", "f32")
PARAM_DTYPES = ("i32", "f32", "bool")
# What a number in a spec may be: the kernels compute integers in 64 bits and floats in float32 (where inf and
# nan are numbers too).
INT64 = (-(2**63), 2**63 - 1)
FLOAT32_MAX = 3.4028234663852886e38


def representable(value: Union[int, float, bool], is_float: bool) -> bool:
    if isinstance(value, bool):
        return True
    if not is_float:
        return INT64[0] <= value <= INT64[1]
    return not math.isfinite(value) or abs(value) <= FLOAT32_MAX
# The binary operators of the syntax, by precedence class (their meaning: ops.OPS; functions: ops.FUNCTIONS).
ARITH_OPS = ("+", "-", "*", "/", "//", "%")  # `//`: floored division of integers (Python's)
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
LOGIC_OPS = ("and", "or")


def _span() -> Span | None:
    return field(default=None, compare=False, hash=False, repr=False, kw_only=True)


# ---------------------------------------------------------------- expressions


class Node:
    """Base of the expression nodes: a hash computed once, from the cached hashes of the children, and
    equality that visits each pair of distinct nodes once (identical children compare in O(1))."""

    def __post_init__(self):
        compared = (getattr(self, name) for name in _compared(type(self)))
        object.__setattr__(self, "_hash", hash((type(self).__name__, *compared)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return self._hash == other._hash and _same(self, other)


@cache
def _compared(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.compare)


def _same(a: Node, b: Node) -> bool:
    """Structural equality of two expression DAGs, each pair of nodes compared once."""
    proven: set[tuple[int, int]] = set()
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if x is y or (id(x), id(y)) in proven:
            continue
        if type(x) is not type(y) or x._hash != y._hash:
            return False
        proven.add((id(x), id(y)))  # optimistic: any difference below fails the whole comparison
        for name in _compared(type(x)):
            u, v = getattr(x, name), getattr(y, name)
            pairs = zip(u, v) if isinstance(u, tuple) and isinstance(v, tuple) and len(u) == len(v) else ((u, v),)
            for p, q in pairs:
                if isinstance(p, Node):
                    stack.append((p, q))
                elif p is not q and (type(p) is not type(q) or p != q):  # True == 1 in Python, not here
                    return False
    return True


def _expr_node(cls):
    """A frozen expression dataclass that keeps Node's hashing and equality."""
    return dataclass(frozen=True, eq=False)(cls)


@_expr_node
class Num(Node):
    """A literal. `is_float` keeps 1 and 1.0 apart (Python's 1 == 1.0 would merge them); Node's equality keeps
    true and 1 apart."""

    value: Union[int, float, bool]
    is_float: bool
    span: Span | None = _span()


@_expr_node
class IndexVar(Node):
    name: str  # one of INDEX_VARS
    span: Span | None = _span()


@_expr_node
class SizeRef(Node):
    name: str  # a role in ROLES or a free size name
    span: Span | None = _span()


@_expr_node
class ParamRef(Node):
    name: str
    span: Span | None = _span()


@_expr_node
class QK(Node):
    """query[b, h, i, :] . key[b, kvh, j, :] in float32 (float64 in the reference): `qk` (q and k), or a dot
    product `query @ key` of another query-side and key-side pair (multi-head latent attention: `qr @ kr`, the
    decoupled RoPE part). A query-side tensor is q or an input with q's shape and a head dim of its own; a key-side
    one is k or an input with k's shape (and storage) and that head dim (dsl/check.py, `dot_operand`)."""

    query: str = "q"
    key: str = "k"
    span: Span | None = _span()

    @property
    def is_qk(self) -> bool:
        return (self.query, self.key) == ("q", "k")


@_expr_node
class Lookup(Node):
    tensor: str
    indices: tuple["Expr", ...]
    span: Span | None = _span()


@_expr_node
class Unary(Node):
    op: str  # "neg" | "not"
    operand: "Expr"
    span: Span | None = _span()


@_expr_node
class Binary(Node):
    op: str  # ARITH_OPS, COMPARE_OPS or LOGIC_OPS
    lhs: "Expr"
    rhs: "Expr"
    span: Span | None = _span()


@_expr_node
class Call(Node):
    fn: str  # one of ops.FUNCTIONS
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


def with_children(e: Expr, new: tuple[Expr, ...]) -> Expr:
    """`e` with its children (`children(e)`, in order) replaced by `new`."""
    if isinstance(e, Lookup):
        return replace(e, indices=new)
    if isinstance(e, Unary):
        return replace(e, operand=new[0])
    if isinstance(e, Binary):
        return replace(e, lhs=new[0], rhs=new[1])
    if isinstance(e, Call):
        return replace(e, args=new)
    return e


def walk(e: Expr):
    """Every distinct node of `e` once (a shared subexpression is not walked again), parents first."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(reversed(children(node)))


def post_order(e: Expr, seen: set[int] | None = None):
    """Every distinct node of `e` once, children first; nodes whose id is in `seen` (shared by several calls) are
    skipped, with their children."""
    seen = set() if seen is None else seen
    stack = [(e, False)]
    while stack:
        node, ready = stack.pop()
        if ready:
            yield node
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(children(node)))


def depth(e: Expr, memo: dict[int, int] | None = None) -> int:
    """How many levels deep `e` nests (a leaf is 1), in time linear in its DAG; `memo` (depths by node id) may be
    shared by several calls on expressions that share nodes."""
    memo = {} if memo is None else memo
    stack = [(e, False)]
    while stack:
        node, ready = stack.pop()
        if ready:
            memo[id(node)] = 1 + max((memo[id(c)] for c in children(node)), default=0)
        elif id(node) not in memo:
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in memo)
    return memo[id(e)]


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


# ---------------------------------------------------------------- normalizers


@dataclass(frozen=True)
class Normalizer:
    """`return NAME(score[, sink=...]) @ v`: how the weights p_j of a row come from its scores s_j over the kept
    keys j. A kind of normalizer is its parts, as data; every stage (checker, reference, passes, each backend's
    lowering, the split-KV and `merge_states` merges) reads these instead of assuming one kind:
      weight      the elementwise map w_j = f(s_j), a function of UNARY_FUNCS;
      normalized  True: rows are normalised, p_j = w_j / (sum_k w_k [+ exp(sink)]), computed with a running max
                  and sum over the key tiles; False: p_j = w_j;
      merge       (derived) how results over two disjoint key sets combine: "lse" (each out weighted by
                  exp(lse_part - lse)) for normalised rows, "sum" (outs added) otherwise;
      takes_sink  whether `sink=` (a per-row logit that joins the denominator only) is allowed.
    lse is the same for every kind: log(sum_j w_j) over the kept keys (plus exp(sink)), -inf for a row that keeps
    no key (and has no sink). So the lse of a union of key sets is the logaddexp of the parts' lse, whichever the
    merge of the outs.
    """

    sink: Expr | None = None
    span: Span | None = _span()

    name: ClassVar[str]
    weight: ClassVar[str]
    normalized: ClassVar[bool]
    takes_sink: ClassVar[bool]

    @property
    def merge(self) -> str:
        return "lse" if self.normalized else "sum"


@dataclass(frozen=True)
class Softmax(Normalizer):
    """p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink)); lse is the row's log-sum-exp."""

    name = "softmax"
    weight = "exp"
    normalized = True
    takes_sink = True


@dataclass(frozen=True)
class Sigmoid(Normalizer):
    """Sigmoid attention: p_j = sigmoid(s_j), no row normalisation (a bias such as `- log(N)` is written in the
    score); lse = log(sum_j sigmoid(s_j)), the log of the row's total weight. The kernels keep no running max
    (every weight is in (0, 1)) and sum the weights in float32: a row whose weights all lie below float32's range
    (every score under about -87) gets out = 0, as small as the true value, and lse = -inf."""

    name = "sigmoid"
    weight = "sigmoid"
    normalized = False
    takes_sink = False


NORMALIZERS: dict[str, type[Normalizer]] = {n.name: n for n in (Softmax, Sigmoid)}
DEFAULT_NORMALIZER: type[Normalizer] = Softmax  # where a front-end names none (FlexAttention, make_attention)


def print_normalizer(n: Normalizer, expr: Callable[[Expr], str] = None) -> str:
    sink = "" if n.sink is None else f", sink={(expr or print_expr)(n.sink)}"
    return f"{n.name}(score{sink})"


def return_text(n: Normalizer | None = None, returns_lse: bool = False, expr: Callable[[Expr], str] = None,
                value: str = "v") -> str:
    """The `return` statement of a spec with normalizer `n` (the default one when None); `expr` prints the sink;
    `value`: the value tensor (k where keys and values share storage)."""
    return f"return {print_normalizer(n or DEFAULT_NORMALIZER(), expr)} @ {value}{', lse' if returns_lse else ''}"


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


@dataclass(frozen=True)
class Dequant:
    """`dequant k by k_scale`: the FP8 tensor `tensor` (k, v, or a key-side tensor of a dot product) holds its
    values divided by `scale`, an f32 param (one scale for the tensor) or an input f32[HKV] (one per K/V head):
    the value of an element of K/V head kvh is tensor[...] * scale (or scale[kvh])."""

    tensor: str
    scale: str
    span: Span | None = _span()


# `quantize q to f8e4m3`: the one target dtype of query quantisation, and the largest magnitude it holds
QUANTIZE_DTYPES = {"f8e4m3": 448.0}
# A quantised row's absolute maximum is taken as at least this, so its scale (max / 448) is float32's smallest
# normal number or more: an all-zero row gets a scale, and no GPU flushes it to zero (subnormals) and divides by it
QUANTIZE_TINY = 448.0 * 2.0 ** -126


@dataclass(frozen=True)
class Quantize:
    """`quantize q, qr to f8e4m3`: the query-side tensor `tensor` (q, or the query side of a dot product) is read
    quantised per row: each (b, i, h) row x, with a = max(amax(|x|), QUANTIZE_TINY), becomes
    float(e4m3(x * (448 / a))) * (a / 448), in float32 arithmetic (docs/mla.md): a multiply per element, not a
    division, so that the GPU's kernels compute exactly this. The scores then carry e4m3's rounding of the queries, as an FP8 x FP8
    QK^T does (FlashMLA's FP8 decode)."""

    tensor: str
    dtype: str
    span: Span | None = _span()


Storage = Union[Ragged, Paged]  # how the sequences of q (Ragged only) or of k and v are stored; None: dense


# The most query or key positions a sequence (M and N, ragged and paged capacities included) may have: kernels index
# positions in int32, where sums and differences of two positions and of M and N still fit (bind() checks the sizes).
POSITION_LIMIT = 2 ** 30


def storage_capacities(q_storage: Storage | None, kv_storage: Storage | None, sizes: dict) -> None:
    """Set M and N of ragged or paged storage, which no tensor's shape holds, to their capacities: M = T (the
    packed query tokens), N = MAXP * PAGE (paged) or TK (packed keys); each sequence takes its own length within
    them. `sizes` maps size names to ints (a call) or to symbolic sizes (a kernel)."""
    if q_storage is not None:
        sizes["M"] = sizes["T"]
    if isinstance(kv_storage, Paged):
        sizes["N"] = sizes["MAXP"] * sizes["PAGE"]
    elif kv_storage is not None:
        sizes["N"] = sizes["TK"]


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
    normalizer: Normalizer = field(default_factory=DEFAULT_NORMALIZER)
    returns_lse: bool = False
    span: Span | None = _span()
    # Dense (None) unless a `ragged` / `paged` statement says otherwise. Their index tensors are also in `inputs`.
    q_storage: Ragged | None = None
    kv_storage: Storage | None = None
    dequant: tuple[Dequant, ...] = ()  # FP8 tensors and their scales, sorted by tensor
    quantize: tuple[Quantize, ...] = ()  # query-side tensors read quantised per row, sorted by tensor

    @cached_property
    def canonical(self) -> str:
        return print_attention(self)

    @property
    def canonical_parses(self) -> bool:
        """Whether `canonical` is spec text, as it is unless its expressions share in a way only a listing of
        numbered subexpressions writes linearly (print_attention)."""
        return self.canonical.endswith("}\n")

    @cached_property
    def key(self) -> str:
        """Hex SHA-256 of the canonical form without the name: spans, comments, equivalent spellings and the
        label a front-end gives the variant do not change it, so the same math shares one cached kernel. The
        expressions enter as lists of their distinct subexpressions, so the key takes time linear in the size of
        the expression DAG (the canonical text of `score = score + score` repeated doubles per line)."""
        numbering = Numbering()
        anonymous = print_attention(replace(self, name="_"), numbering)  # expressions as %n, listed after
        return hashlib.sha256((anonymous + numbering.listing()).encode()).hexdigest()

    @property
    def dim_values(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def is_gqa_shape(self) -> bool:
        """True when K/V have their own head count (HKV, or one head without an axis); H == HKV is still checked at
        call time."""
        return "HKV" in self.k.shape or self.one_kv_head

    @property
    def one_kv_head(self) -> bool:
        """k without a head axis: one K/V head (HKV = 1), which every query head reads (MLA's latent cache; the
        checker allows it where the values are the keys)."""
        return not {"H", "HKV"} & set(self.k.shape)

    @property
    def value_dim(self) -> str:
        return "DV" if "DV" in self.v.shape else "D"

    @property
    def shares_kv(self) -> bool:
        """`return softmax(score) @ k`: the values are the keys (MLA's latent cache), one tensor read once; `v` is
        k's declaration and a call passes no v."""
        return self.v.name == self.k.name

    @cached_property
    def dots(self) -> tuple[QK, ...]:
        """The dot products the score reads, `qk` (when read) first, then in order of their printed form."""
        found = {n for n in walk(self.score) if isinstance(n, QK)}
        return tuple(sorted(found, key=lambda n: (not n.is_qk, print_expr(n))))

    def dot_dim(self, dot: QK) -> str:
        """The head dim a dot product sums over: D for qk, else the size in the D slot of its query-side tensor."""
        query = self.q if dot.query == self.q.name else self.input(dot.query)
        return query.shape[self.q.shape.index("D")]

    @property
    def decode_only(self) -> bool:
        """Whether every launch runs the decode kernel (passes/decode.py): ragged or paged storage, and latent
        attention, whose extra dot products and shared K/V only that kernel reads."""
        return self.q_storage is not None or self.kv_storage is not None or self.decode_kernel_only

    @property
    def decode_kernel_only(self) -> bool:
        """Whether only the decode kernel implements the spec at all: latent attention, FP8 K/V (its loads
        dequantise; the prefill, Gluon, backward and TVM kernels have no such loads) and quantised queries (its
        query loads quantise)."""
        return self.is_latent or bool(self.dequant) or bool(self.quantize)

    def quantized(self, tensor: str) -> Quantize | None:
        """How the query-side tensor `tensor` is quantised (`quantize ... to DTYPE`), or None."""
        return next((d for d in self.quantize if d.tensor == tensor), None)

    def scale_of(self, tensor: str) -> Expr | None:
        """The dequant scale of `tensor` as an expression of the query row (the scale of the K/V head that row h
        reads), or None where the tensor is not dequantised."""
        d = next((d for d in self.dequant if d.tensor == tensor), None)
        if d is None:
            return None
        if self.param(d.scale) is not None:
            return ParamRef(d.scale)
        return Lookup(d.scale, (Binary("//", IndexVar("h"), Binary("//", SizeRef("H"), SizeRef("HKV"))),))

    @property
    def is_latent(self) -> bool:
        """Multi-head latent attention: a dot product other than qk, or keys that are the values."""
        return self.shares_kv or any(not d.is_qk for d in self.dots)

    def param(self, name: str) -> ParamDecl | None:
        return next((p for p in self.params if p.name == name), None)

    def input(self, name: str) -> TensorDecl | None:
        return next((t for t in self.inputs if t.name == name), None)


def split_conjuncts(e: Expr) -> list[Expr]:
    """The operands of a chain of `and`s, left to right, each distinct one once (a shared `and` is split once)."""
    found: dict[Expr, None] = {}
    seen: set[int] = set()
    stack = [e]
    while stack:
        node = stack.pop()
        if isinstance(node, Binary) and node.op == "and":
            if id(node) not in seen:
                seen.add(id(node))
                stack += (node.rhs, node.lhs)
        else:
            found.setdefault(node)
    return list(found)


# A mask whose tree (shared subexpressions counted at each use) exceeds this many nodes is ordered by its
# listing of distinct subexpressions rather than its printed text, which grows with the tree.
_PRINTABLE_NODES = 100_000


def _order_key(e: Expr) -> tuple[int, str]:
    """A canonical sort key of `e` computed in time linear in its DAG: its printed form where that is small."""
    _, sizes, _ = _tree_counts(e)
    if sizes[id(e)] <= _PRINTABLE_NODES:
        return 0, print_expr(e)
    numbering = Numbering()
    return 1, numbering(e) + "\n" + numbering.listing()


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
    dequant=(),
    quantize=(),
) -> Attention:
    """Canonical form: whatever the spelling, the same meaning gives an equal node and the same key.
    The index tensors a storage names join `inputs` unless an input of that name is given."""
    flat: dict[tuple[int, str], Expr] = {}
    for m in masks:
        for c in split_conjuncts(m):
            flat.setdefault(_order_key(c), c)
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
        normalizer=DEFAULT_NORMALIZER() if normalizer is None else normalizer,
        returns_lse=returns_lse,
        span=span,
        q_storage=q_storage,
        kv_storage=kv_storage,
        dequant=tuple(sorted(dequant, key=lambda d: d.tensor)),
        quantize=tuple(sorted(quantize, key=lambda d: d.tensor)),
    )


def with_name(a: Attention, name: str) -> Attention:
    return replace(a, name=name)


# ---------------------------------------------------------------- types


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


def _wrap(e: Expr, min_prec: int, names: dict) -> str:
    if e in names:
        return names[e]
    text = print_expr(e, names)
    return f"({text})" if _prec(e) < min_prec else text


def print_expr(e: Expr, names: dict | None = None) -> str:
    """`e` as written in a spec (a tree: a shared subexpression is written at each use); the subexpressions that
    `names` maps (node -> name) are written as that name."""
    names = {} if names is None else names
    if isinstance(e, Num):
        return format_number(e.value, e.is_float)
    if isinstance(e, (IndexVar, SizeRef, ParamRef)):
        return e.name
    if isinstance(e, QK):
        return "qk" if e.is_qk else f"{e.query} @ {e.key}"
    if isinstance(e, Lookup):
        return f"{e.tensor}[{', '.join(_wrap(x, 0, names) for x in e.indices)}]"
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(_wrap(x, 0, names) for x in e.args)})"
    if isinstance(e, Unary):
        if e.op == "not":
            return f"not {_wrap(e.operand, _PREC['not'], names)}"
        return f"-{_wrap(e.operand, _UNARY_PREC, names)}"
    if isinstance(e, Binary):
        p = _PREC[e.op]
        if e.op in COMPARE_OPS:  # comparisons do not chain: parenthesize equal precedence on both sides
            return f"{_wrap(e.lhs, p + 1, names)} {e.op} {_wrap(e.rhs, p + 1, names)}"
        return f"{_wrap(e.lhs, p, names)} {e.op} {_wrap(e.rhs, p + 1, names)}"  # left-associative
    raise TypeError(f"not an IR expression: {e!r}")


# An expression is printed as written while its tree (shared subexpressions counted at each use) has at most
# _TREE_NODES nodes or at most _TREE_RATIO times its distinct nodes (names and numbers repeat in any spec); beyond
# that its text would grow with the tree, not with the DAG.
_TREE_NODES = 1000
_TREE_RATIO = 4


def _tree_counts(e: Expr) -> tuple[list[Expr], dict[int, int], dict[int, int]]:
    """The distinct nodes of `e` (children first), the tree size of each and how often each occurs in the tree of
    `e`, by node id; linear in the DAG (exact integers: a chain of 100 doubling lines counts 2^100)."""
    nodes = list(post_order(e))
    sizes: dict[int, int] = {}
    for node in nodes:
        sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children(node))
    uses = dict.fromkeys(sizes, 0)
    uses[id(e)] = 1
    for node in reversed(nodes):  # parents first: a node's count is final before it passes it on
        for c in children(node):
            uses[id(c)] += uses[id(node)]
    return nodes, sizes, uses


def _writable(tree_nodes: int, distinct_nodes: int) -> bool:
    return tree_nodes <= max(_TREE_NODES, _TREE_RATIO * distinct_nodes)


def score_lines(score: Expr) -> list[str] | None:
    """The score as the right-hand sides of `score = ...` lines, each line's `score` being the value of the line
    before, so that its text grows with its DAG: one line while its tree is small (`_writable`); else a chain, as
    one writes a score that reuses itself (`score = score + score`), that names a reused subexpression on each
    line while there is one. None where the sharing is not such a chain."""
    chain: list[tuple[Expr, Expr | None]] = []  # (a line's value, the node its `score` stands for), last line first
    top, chaining = score, None
    while True:
        nodes, sizes, uses = _tree_counts(top)
        chaining = not _writable(sizes[id(top)], len(nodes)) if chaining is None else chaining
        # the subexpression whose uses save the most nodes when named
        named = max((n for n in nodes if n is not top and children(n)), default=None,
                    key=lambda n: uses[id(n)] * (sizes[id(n)] - 1))
        if _writable(sizes[id(top)], len(nodes)) and not (chaining and named is not None and uses[id(named)] > 1):
            chain.append((top, None))
            break
        if named is None or not _writable(sizes[id(top)] - uses[id(named)] * (sizes[id(named)] - 1), len(nodes)):
            return None
        chain.append((top, named))
        top = named
    return [print_expr(value, {} if named is None else {named: "score"}) for value, named in reversed(chain)]


def _print_decl(t: TensorDecl) -> str:
    return f"{t.name}: {t.dtype}[{', '.join(t.shape)}]"


def print_storage(targets: str, s: Storage) -> str:
    if isinstance(s, Paged):
        return f"paged {targets} by {s.table}, {s.lengths}"
    return f"ragged {targets} by {s.offsets}"


def kv_targets(a: Attention) -> str:
    """The tensors a `paged` / `ragged` statement of the keys names: `k, v`, or `k` where they share storage."""
    return "k" if a.shares_kv else "k, v"


def print_attention(a: Attention, expr: Callable[[Expr], str] | None = None) -> str:
    """Canonical text of a spec, in time and size linear in its expression DAGs; `expr` prints the expressions.
    By default it is the text a person would write, which parses back to an equal `Attention`: a score that
    reuses itself is written as a chain of `score = ...` lines (`score_lines`). An expression whose sharing no
    such text writes linearly (a mask or a sink that reuses a subexpression many times, as a Python front-end may
    build one) is written as %n, and its distinct subexpressions are listed after the block; that text does not
    parse (`Attention.canonical_parses` tells)."""
    numbering = Numbering()
    scores = [expr(a.score)] if expr else (score_lines(a.score) or [numbering.readable(a.score)])
    expr = expr or numbering.readable
    lines = [f"attention {a.name} {{"]
    if a.dims:
        lines.append("    dims " + ", ".join(f"{n} = {v}" for n, v in a.dims))
    for t in (a.q, a.k) if a.shares_kv else (a.q, a.k, a.v):
        lines.append(f"    {_print_decl(t)}")
    declared = set()  # inputs a storage statement declares are printed as that statement
    for targets, storage in (("q", a.q_storage), (kv_targets(a), a.kv_storage)):
        if storage is not None:
            lines.append(f"    {print_storage(targets, storage)}")
            declared |= set(storage.declares())
    for d in a.dequant:
        lines.append(f"    dequant {d.tensor} by {d.scale}")
    for dtype in sorted({d.dtype for d in a.quantize}):
        lines.append(f"    quantize {', '.join(d.tensor for d in a.quantize if d.dtype == dtype)} to {dtype}")
    for p in a.params:
        default = "" if p.default is None else f" = {format_number(p.default, p.dtype == 'f32')}"
        lines.append(f"    param {p.name}: {p.dtype}{default}")
    for t in a.inputs:
        if t in declared:
            continue
        lines.append(f"    input {_print_decl(t)}")
    lines += [f"    score = {text}" for text in scores]
    for m in a.masks:
        lines.append(f"    mask {expr(m)}")
    lines.append(f"    {return_text(a.normalizer, a.returns_lse, expr, a.v.name)}")
    lines.append("}")
    return "\n".join(lines) + "\n" + numbering.listing()


def linear_repr(value) -> str:
    """repr() of a dataclass holding expressions (a plan), in time linear in their DAGs: each expression is
    written as %n, and the distinct subexpressions are listed after."""
    numbering = Numbering()

    def text(x) -> str:
        if isinstance(x, Node):
            return numbering(x)
        if is_dataclass(x) and not isinstance(x, type):
            parts = (f"{f.name}={text(getattr(x, f.name))}" for f in fields(x) if f.repr)
            return f"{type(x).__qualname__}({', '.join(parts)})"
        if isinstance(x, (tuple, list)):
            inner = ", ".join(text(y) for y in x)
            return f"({inner},)" if isinstance(x, tuple) and len(x) == 1 else \
                (f"({inner})" if isinstance(x, tuple) else f"[{inner}]")
        if isinstance(x, dict):
            return "{" + ", ".join(f"{text(k)}: {text(v)}" for k, v in x.items()) + "}"
        return repr(x)

    body = text(value)
    return body + "\n" + numbering.listing()


class Numbering:
    """Expressions as references %n into one list of distinct subexpressions (structurally equal ones share a
    number), each written over its operands' numbers: a canonical form linear in the size of the DAG."""

    def __init__(self):
        self.numbers: dict[Expr, int] = {}
        self.lines: list[str] = []

    def __call__(self, e: Expr) -> str:
        stack = [(e, False)]
        while stack:
            node, ready = stack.pop()
            if node in self.numbers:
                continue
            if not ready:
                stack.append((node, True))
                stack.extend((c, False) for c in reversed(children(node)))
                continue
            self.numbers[node] = len(self.lines)
            self.lines.append(self._text(node))
        return f"%{self.numbers[e]}"

    def _text(self, e: Expr) -> str:
        ref = [f"%{self.numbers[c]}" for c in children(e)]
        if isinstance(e, Lookup):
            return f"{e.tensor}[{', '.join(ref)}]"
        if isinstance(e, Call):
            return f"{e.fn}({', '.join(ref)})"
        if isinstance(e, Unary):
            return f"{e.op} {ref[0]}"
        if isinstance(e, Binary):
            return f"{ref[0]} {e.op} {ref[1]}"
        return print_expr(e)  # a leaf

    def readable(self, e: Expr) -> str:
        """`e` as written (print_expr) where its tree is small, else its number: text linear in the DAG."""
        nodes, sizes, _ = _tree_counts(e)
        return print_expr(e) if _writable(sizes[id(e)], len(nodes)) else self(e)

    def listing(self, indent: str = "") -> str:
        return "".join(f"{indent}%{n} = {line}\n" for n, line in enumerate(self.lines))


def expr_key(e: Expr) -> str:
    """Hex SHA-256 of `e`'s structure (spans aside), in time linear in its DAG: a key for caches that a tracer
    such as torch.compile's Dynamo may walk, which would hash an expression as a tree, node by node."""
    numbering = Numbering()
    root = numbering(e)
    return hashlib.sha256((root + "\n" + numbering.listing()).encode()).hexdigest()
