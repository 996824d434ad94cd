"""Semantic checks: a parsed block becomes a checked `ir.Attention`, or every problem is reported at once.

Two entry points share one set of checks:
- `elaborate(block)` for the text front-end: resolves the names of a parsed block (parser.py builds it),
  inlines the sequential `score` rebinding and checks the result;
- `check_attention(spec)` for IR built any other way (the Python front-ends), so a spec that passes it
  prints to text that parses back.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Union

from .. import ir, ops
from ..errors import Diagnostic, Span, SpecError

# Words a declared name may not take: the keywords of attn.lark, plus `lse`, the name of the second output.
RESERVED = frozenset({
    "attention", "dims", "param", "input", "score", "mask", "return", "and", "or", "not",
    "inf", "true", "false", "qk", "causal", "lse", "paged", "ragged", "by", "dequant",
    "quantize", "to",
})
# Keywords of a kernel call that are not the spec's params or inputs (runtime/api.py, Kernel.__call__).
CALL_OPTIONS = frozenset({"validate"})

_DTYPE_ALIASES = {
    "float16": "f16", "half": "f16", "fp16": "f16", "bfloat16": "bf16", "float32": "f32", "float": "f32",
    "fp32": "f32", "float64": "f64", "double": "f64", "fp64": "f64", "int8": "i8", "int16": "i16",
    "int32": "i32", "int": "i32", "int64": "i64", "long": "i64", "boolean": "bool",
}
_INT32 = (-(2**31), 2**31 - 1)
# Expressions nest at most this many levels (the sequential `score` lines included): every walk of an expression
# below recurses once per level or so, and Python's stack holds about a thousand frames.
MAX_DEPTH = 100

_QKV = ("q", "k", "v")
# Per storage of q, k, v (dense unless a `ragged` / `paged` statement says otherwise): the names of the slots and,
# per tensor, the roles each slot may take. The order of a shape is its layout.
_LAYOUTS = {
    "dense": (("batch", "head", "sequence", "head dim"), {
        "q": (("B",), ("H",), ("M",), ("D",)),
        "k": (("B",), ("H", "HKV"), ("N",), ("D",)),
        "v": (("B",), ("H", "HKV"), ("N",), ("D", "DV")),
    }),
    "ragged": (("token", "head", "head dim"), {
        "q": (("T",), ("H",), ("D",)),
        "k": (("TK",), ("H", "HKV"), ("D",)),
        "v": (("TK",), ("H", "HKV"), ("D", "DV")),
    }),
    "paged": (("page", "page slot", "head", "head dim"), {
        "k": (("PAGES",), ("PAGE",), ("H", "HKV"), ("D",)),
        "v": (("PAGES",), ("PAGE",), ("H", "HKV"), ("D", "DV")),
    }),
}
_EXAMPLES = {
    "dense": {"q": "B, H, M, D", "k": "B, HKV, N, D", "v": "B, HKV, N, D"},
    "ragged": {"q": "T, H, D", "k": "TK, HKV, D", "v": "TK, HKV, D"},
    "paged": {"k": "PAGES, PAGE, HKV, D", "v": "PAGES, PAGE, HKV, D"},
}
_QKV_EXAMPLE = _EXAMPLES["dense"]
# The statement that gives q, or k and v, their storage, as messages suggest it.
_STATEMENTS = {("ragged", "q"): "ragged q by cu_seqlens_q", ("ragged", "kv"): "ragged k, v by cu_seqlens_k",
               ("paged", "kv"): "paged k, v by block_table, kv_len"}
# What each index tensor of a storage is, in the order of its `declares()`.
_STORAGE_TENSORS = {ir.Ragged: ("sequence offsets",), ir.Paged: ("block table", "key lengths")}


# ---------------------------------------------------------------- the parsed block (parser.py builds it)


@dataclass(frozen=True)
class Word:
    """A name as written in a declaration, with its place."""

    text: str
    span: Span | None = None


@dataclass(frozen=True)
class Name:
    """A bare name in an expression, before resolution decides what it denotes (`score` included)."""

    name: str
    span: Span | None = None


@dataclass(frozen=True)
class TensorStmt:
    name: Word
    dtype: Word
    shape: tuple[Word, ...]
    is_input: bool
    span: Span | None = None


@dataclass(frozen=True)
class ParamStmt:
    name: Word
    dtype: Word
    default: object | None  # a surface expression; must be a literal
    span: Span | None = None


@dataclass(frozen=True)
class Binding:
    """One `NAME = value` of a `dims` line."""

    name: Word
    value: object
    span: Span | None = None


@dataclass(frozen=True)
class ScoreStmt:
    value: object
    span: Span | None = None


@dataclass(frozen=True)
class MaskStmt:
    condition: object
    span: Span | None = None


@dataclass(frozen=True)
class ReturnStmt:
    """`return NORMALIZER(score[, SINK_NAME=sink]) @ VALUE[, EXTRA]`."""

    normalizer: Word
    sink_name: Word | None
    sink: object | None
    value: Word
    extra: Word | None
    span: Span | None = None


@dataclass(frozen=True)
class StorageStmt:
    """`paged k, v by TABLE, LENGTHS` or `ragged q by OFFSETS` / `ragged k, v by OFFSETS`, lists unchecked."""

    kind: Word  # "paged" or "ragged"
    targets: tuple[Word, ...]
    tensors: tuple[Word, ...]
    span: Span | None = None


@dataclass(frozen=True)
class DequantStmt:
    """`dequant TENSOR by SCALE`, unchecked."""

    tensor: Word
    scale: Word
    span: Span | None = None


@dataclass(frozen=True)
class QuantizeStmt:
    """`quantize TENSOR, ... to DTYPE`, unchecked."""

    tensors: tuple[Word, ...]
    dtype: Word
    span: Span | None = None


Statement = Union[TensorStmt, ParamStmt, Binding, StorageStmt, DequantStmt, QuantizeStmt, ScoreStmt, MaskStmt,
                  ReturnStmt]


@dataclass(frozen=True)
class Block:
    name: Word
    statements: tuple[Statement, ...]
    span: Span | None = None


# ---------------------------------------------------------------- entry points


def elaborate(block: Block) -> tuple[ir.Attention | None, list[Diagnostic]]:
    """The checked spec of one parsed block, or None and every problem found in it."""
    return _Elaborator(block).run()


def spec_name(text: object, fallback: str) -> str:
    """`text` where it can name an attention block (a name, no reserved word), else `fallback`: a name from
    Python (a function's __name__) may hold anything, a newline and code included."""
    return text if _is_name(text) and text not in RESERVED else fallback


def _is_name(text: object) -> bool:
    """Whether the grammar's NAME matches `text` (Python's identifiers include non-ASCII letters)."""
    return isinstance(text, str) and text.isascii() and text.isidentifier()


def attention_diagnostics(spec: ir.Attention) -> list[Diagnostic]:
    report = _Report()
    if spec_name(spec.name, None) is None:
        report.error(f"the attention's name {spec.name!r} is not a name: use letters, digits and _ (not first a "
                     f"digit), and no reserved word", spec.span)
    storages = (spec.q_storage, spec.kv_storage)
    _check_declarations(report, spec.q, spec.k, spec.v, spec.params, spec.inputs, spec.dims, spec.span,
                        storages=storages)
    _check_expressions(report, _Env.of(spec.q, spec.k, spec.v, spec.params, spec.inputs, spec.dims, storages),
                       spec.score, spec.masks, spec.normalizer, spec.span)
    if spec.shares_kv and spec.v != spec.k:
        report.error(f"the values are k (`{ir.return_text(value='k')}`), so v must be k's declaration", spec.span)
    _check_dequant(report, spec.q, spec.k, spec.v, spec.params, spec.inputs, spec.dequant, spec.score, spec.span)
    _check_quantize(report, spec.k, spec.v, spec.inputs, spec.quantize, spec.score, spec.span)
    return report.sorted()


def check_attention(spec: ir.Attention) -> None:
    """Raise one SpecError listing every problem of an IR spec built outside the text front-end."""
    diagnostics = attention_diagnostics(spec)
    if diagnostics:
        raise SpecError(diagnostics)


# ---------------------------------------------------------------- helpers


class _Report:
    def __init__(self):
        self.diagnostics: dict[tuple, Diagnostic] = {}  # deduplicated: inlined score lines repeat nodes

    def error(self, message: str, span: Span | None) -> None:
        d = Diagnostic(message, span)
        self.diagnostics.setdefault((message, span), d)

    def sorted(self) -> list[Diagnostic]:
        return in_source_order(self.diagnostics.values())


def in_source_order(diagnostics) -> list[Diagnostic]:
    """By file position; diagnostics without a place come last."""
    return sorted(diagnostics, key=lambda d: (d.span is None, d.span and (d.span.line, d.span.col)))


def _did_you_mean(word: str, candidates, cutoff: float = 0.6) -> str:
    match = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=cutoff)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_dtype(report: _Report, dtype: str, allowed: tuple[str, ...], what: str, span: Span | None) -> bool:
    if dtype in allowed:
        return True
    alias = _DTYPE_ALIASES.get(dtype)
    if alias in allowed:
        hint = f"; did you mean '{alias}'?"
    else:
        hint = _did_you_mean(dtype, allowed)
    known = dtype in ir.TENSOR_DTYPES
    problem = f"{what} cannot have dtype '{dtype}'" if known else f"unknown dtype '{dtype}' for {what}"
    report.error(f"{problem}; expected one of {', '.join(allowed)}{hint}", span)
    return False


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _kind_name(kind: str) -> str:
    return {"int": "an integer", "float": "a float", "bool": "a boolean"}[kind]


def _num_kind(n: ir.Num) -> str:
    if isinstance(n.value, bool):
        return "bool"
    return "float" if n.is_float else "int"


def _shown(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def _int_problem(written: str) -> str:
    return (f"the integer {_shown(written)} is outside the 64-bit integers the kernels compute in; write a float "
            f"(such as 1e19) for a number this large")


def _float_problem(written: str) -> str:
    return (f"the number {_shown(written)} is beyond the range of float32 (about 3.4e38), the type the kernels "
            f"compute in; write inf for infinity")


def number_problem(value, is_float: bool) -> str | None:
    """Why the number `value` cannot be a constant of a spec, or None: integers compute in 64 bits and floats in
    float32 in the kernels (inf and nan are floats too)."""
    if ir.representable(value, is_float):
        return None
    return _float_problem(repr(value)) if is_float else _int_problem(str(value))


def literal_value(text: str, is_float: bool) -> tuple[int | float, str | None]:
    """The value of a number literal as written (digits, no sign), and why it cannot be one (the value is then 0)."""
    if is_float:
        value = float(text)  # any length: too large gives inf
        return (value, None) if value <= ir.FLOAT32_MAX else (0.0, _float_problem(text))
    # (the length first: Python's int() refuses over 4,300 digits)
    if len(text.lstrip("0")) > len(str(ir.INT64[1])) or int(text) > ir.INT64[1]:
        return 0, _int_problem(text)
    return int(text), None


# ---------------------------------------------------------------- declarations (IR level)


def _group(name: str) -> str:
    """Storage is given to q alone, or to k and v together."""
    return "q" if name == "q" else "kv"


def _storage_kind(storage: ir.Storage | None) -> str:
    return "dense" if storage is None else "paged" if isinstance(storage, ir.Paged) else "ragged"


def _qkv_slots(report: _Report, t: ir.TensorDecl, kind: str, one_head: bool = False) -> tuple[int, ...] | None:
    """The slot (batch, head, sequence, dim, or those of `kind`) of each entry of a q/k/v shape, or None if it
    is malformed. `one_head`: k may omit its head axis (one K/V head, HKV = 1: keys that are the values)."""
    slot_names, table = _LAYOUTS[kind]
    roles = table[t.name]
    seen: dict[int, str] = {}
    for entry in t.shape:
        slot = next((s for s, names in enumerate(roles) if entry in names), None)
        if slot is None:
            report.error(f"{t.name}'s shape may hold only the roles {', '.join(r for rs in roles for r in rs)}, "
                         f"not '{entry}'{_layout_hint(t.name, kind, entry)}", t.span)
            return None
        if slot in seen:
            report.error(f"{t.name}'s shape has two {slot_names[slot]} sizes, {seen[slot]} and {entry}", t.span)
            return None
        seen[slot] = entry
    missing = next((slot for slot in range(len(roles)) if slot not in seen
                    and not (one_head and slot_names[slot] == "head")), None)
    if missing is not None:
        hint = (" (one K/V head may go without its axis only where the values are the keys, as MLA's latent cache: "
                "a return line that ends in `@ k`)" if slot_names[missing] == "head" and t.name != "q" else "")
        report.error(f"{t.name}'s shape lacks its {slot_names[missing]} size {' or '.join(roles[missing])}; "
                     f"write e.g. {t.name}: {t.dtype}[{_EXAMPLES[kind][t.name]}]{hint}", t.span)
        return None
    return tuple(seen)


def _layout_hint(name: str, kind: str, entry: str) -> str:
    """Why a role does not fit a q/k/v shape: it belongs to another storage, or is no role at all."""
    if kind != "dense":
        return f"; {name} is {kind}, so its shape is [{_EXAMPLES[kind][name]}] in some order"
    for other, (_, table) in _LAYOUTS.items():
        if name in table and any(entry in roles for roles in table[name]) and other != kind:
            return (f"; [{_EXAMPLES[other][name]}] is the shape of a {other} {name}: add "
                    f"`{_STATEMENTS[other, _group(name)]}`")
    return " (extra tensors are declared with `input`)"


def _layouts_differ(a: tuple[int, ...], b: tuple[int, ...], kind: str) -> bool:
    """Whether two layouts (orders of slots) differ; where one has no head axis (a k with one K/V head), in the
    order of the other slots."""
    if len(a) != len(b):
        head = _LAYOUTS[kind][0].index("head")
        a, b = (tuple(s for s in x if s != head) for x in (a, b))
    return a != b


def _check_qkv(report: _Report, q, k, v, kinds: dict[str, str]) -> None:
    present = [t for t in (q, k, v) if t is not None]
    for t in present:
        if t.name == "q" and t.dtype in ir.FP8_DTYPES:
            report.error(f"q cannot have dtype '{t.dtype}': FP8 is for the K/V cache (k, v and key-side tensors of "
                         f"dot products, each with `dequant ... by SCALE`); q is one of {', '.join(ir.QKV_DTYPES)}",
                         t.span)
        else:
            _check_dtype(report, t.dtype, ir.QKV_DTYPES + (ir.FP8_DTYPES if t.name != "q" else ()), t.name,
                         t.span)
    shared = k is not None and v == k  # the values are the keys: one K/V head needs no axis
    layouts = {t.name: _qkv_slots(report, t, kinds[t.name], shared and t == k) for t in present}
    first = present[0] if present else None
    for t in present[1:]:
        # Layouts compare within one storage: a ragged q [T, H, D] has nothing to agree with in a paged k.
        ref = next(r for r in present if kinds[r.name] == kinds[t.name])
        if ref is not t and layouts[t.name] is not None and layouts[ref.name] is not None \
                and _layouts_differ(layouts[t.name], layouts[ref.name], kinds[t.name]):
            who = "q, k and v" if ref.name == "q" else "k and v"
            report.error(f"{t.name}'s layout [{', '.join(t.shape)}] differs from {ref.name}'s "
                         f"[{', '.join(ref.shape)}]: {who} must share one layout", t.span)
        if t.dtype != first.dtype and t.dtype in ir.QKV_DTYPES and first.dtype in ir.QKV_DTYPES:  # FP8 k, v: any
            report.error(f"{t.name} is {t.dtype} but {first.name} is {first.dtype}: q, k and v must share one "
                         f"dtype", t.span)
    if k is not None and v is not None and not shared and layouts.get("k") and layouts.get("v"):
        k_head, v_head = (next(e for e in t.shape if e in ("H", "HKV")) for t in (k, v))
        if k_head != v_head:
            report.error(f"v's head size is {v_head} but k's is {k_head}: k and v share their heads", v.span)


def _check_declarations(report: _Report, q, k, v, params, inputs, dims, fallback: Span | None,
                        dim_spans: dict[str, Span] | None = None, storages=(None, None),
                        kinds: dict[str, str] | None = None) -> None:
    """`kinds`: the storage of q and of k, v ("q", "kv") as the spec meant it, where a malformed statement gave
    no storage node (so that its shapes are not reported again); by default, those of `storages`."""
    q_storage, kv_storage = storages
    if kinds is None:  # a paged q is reported by _check_storage; its shape is checked as a dense one
        kinds = {"q": "ragged" if isinstance(q_storage, ir.Ragged) else "dense", "kv": _storage_kind(kv_storage)}
    _check_qkv(report, q, k, v, {"q": kinds["q"], "k": kinds["kv"], "v": kinds["kv"]})
    _check_storage(report, q_storage, kv_storage, inputs, fallback)
    declared: dict[str, str] = {}
    for name, kind, span in ([(t.name, "tensor", t.span) for t in dict.fromkeys(x for x in (q, k, v) if x)]
                             + [(p.name, "param", p.span) for p in params]
                             + [(t.name, "input", t.span) for t in inputs]):
        if name in declared:
            report.error(f"'{name}' is declared twice (first as {_a(declared[name])})", span)
        elif not _is_name(name):
            report.error(f"{name!r} cannot name {_a(kind)}: a name is ASCII letters, digits and _, not first a digit",
                         span)
        elif name in RESERVED:
            report.error(f"'{name}' is a reserved word of the spec language; choose another name", span)
        elif name in CALL_OPTIONS and kind != "tensor":
            report.error(f"'{name}' is reserved for the call option `kernel(q, k, v, {name}=True)`; choose another "
                         f"name", span)
        elif name in ir.ROLES or name in ir.INDEX_VARS:
            what = "a size role" if name in ir.ROLES else "an index variable"
            report.error(f"'{name}' is {what} and cannot name {_a(kind)}", span)
        declared.setdefault(name, kind)
    for t in inputs:
        _check_dtype(report, t.dtype, ir.TENSOR_DTYPES, f"input {t.name}", t.span)
    dim_spans = dim_spans or {}
    size_places = ([(entry, t.span, f"input {t.name}") for t in inputs for entry in t.shape]
                   + [(n, dim_spans.get(n, fallback), "dims") for n, _ in dims])
    qkv_sizes = {entry for t in (q, k, v) if t is not None for entry in t.shape}
    if k is not None and k == v and not {"H", "HKV"} & set(k.shape):
        qkv_sizes.add("HKV")  # one K/V head without an axis: HKV = 1 (a per-head dequant scale is [HKV])
    if q_storage is not None or kv_storage is not None:
        qkv_sizes.add("B")  # the number of sequences, from the offsets or the block table
    per_sequence = {"M": q_storage, "N": kv_storage}
    for entry, span, where in size_places:
        if entry in ir.ROLES and None not in (q, k, v) and entry not in qkv_sizes:
            hint = ""
            if per_sequence.get(entry) is not None:
                hint = (f" ({'q' if entry == 'M' else 'k and v'} {'is' if entry == 'M' else 'are'} "
                        f"{_storage_kind(per_sequence[entry])}: {entry} is each sequence's own length, usable in "
                        f"expressions but not as a tensor size)")
            report.error(f"{where} uses {entry}, but no shape of q, k or v does{hint}", span)
        elif not _is_name(entry):
            report.error(f"{entry!r} cannot name a size: a name is ASCII letters, digits and _, not first a digit",
                         span)
        elif entry in declared:
            report.error(f"'{entry}' names both a size and {_a(declared[entry])}", span)
        elif entry in ir.INDEX_VARS or entry in RESERVED:
            report.error(f"'{entry}' cannot name a size: it is "
                         f"{'an index variable' if entry in ir.INDEX_VARS else 'a reserved word'}", span)
    for p in params:
        _check_param(report, p)
    for name, value in dims:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            report.error(f"dims {name} must be a positive integer, not {value!r}", dim_spans.get(name, fallback))
        elif value > _INT32[1]:
            report.error(f"dims {name} = {_shown(str(value))} is too large: sizes are below 2^31",
                         dim_spans.get(name, fallback))


def _check_storage(report: _Report, q_storage, kv_storage, inputs, fallback: Span | None) -> None:
    """q is dense or ragged; each index tensor a storage names is an input with the storage's declaration."""
    if q_storage is not None and not isinstance(q_storage, ir.Ragged):
        report.error("q cannot be paged: only k and v live in a page pool (q may be ragged)",
                     q_storage.span or fallback)
    by_name = {t.name: t for t in inputs}
    for targets, storage in (("q", q_storage), ("k, v", kv_storage)):
        if storage is None:
            continue
        statement = ir.print_storage(targets, storage)
        for decl, what in zip(storage.declares(), _STORAGE_TENSORS[type(storage)]):
            have = by_name.get(decl.name)
            if have is None:
                report.error(f"`{statement}` names {decl.name}, but no input {decl.name}: "
                             f"{decl.dtype}[{', '.join(decl.shape)}] is declared", storage.span or fallback)
            elif have != decl:
                report.error(f"{decl.name} is the {what} of `{statement}`, so it must be {decl.dtype}"
                             f"[{', '.join(decl.shape)}], but it is {have.dtype}[{', '.join(have.shape)}] "
                             f"(give each role its own tensor)", storage.span or fallback)


def _check_param(report: _Report, p: ir.ParamDecl) -> None:
    if not _check_dtype(report, p.dtype, ir.PARAM_DTYPES, f"param {p.name}", p.span) or p.default is None:
        return
    d = p.default
    if p.dtype == "bool":
        ok = isinstance(d, bool)
    elif p.dtype == "i32":
        ok = isinstance(d, int) and not isinstance(d, bool)
        if ok and not _INT32[0] <= d <= _INT32[1]:
            report.error(f"default {d} of param {p.name} does not fit in i32", p.span)
    else:
        ok = isinstance(d, (int, float)) and not isinstance(d, bool)
        problem = ok and number_problem(d, True)
        if problem:
            report.error(f"param {p.name}: {problem}", p.span)
    if not ok:
        written = ir.format_number(d, isinstance(d, float)) if isinstance(d, (int, float)) else repr(d)
        report.error(f"param {p.name}: {p.dtype} cannot default to {written}", p.span)


def _check_dequant(report: _Report, q, k, v, params, inputs, dequant, score, fallback: Span | None) -> None:
    """FP8 tensors and their `dequant` lines: only k, v and key-side tensors of dot products may be FP8, each FP8
    one has one dequant line, and its scale is an f32 param (per tensor) or an input f32[HKV] (per K/V head)."""
    keys = {n.key for n in ir.walk(score) if isinstance(n, ir.QK)} - {"k"}
    inputs_by_name = {t.name: t for t in inputs}
    caches = {t.name: t for t in (k, v) if t is not None}
    caches.update((name, inputs_by_name[name]) for name in sorted(keys) if name in inputs_by_name)
    example = "`input {0}: f32[HKV]` (one per K/V head) or `param {0}: f32` (one for the tensor)"
    for t in inputs:
        if t.dtype in ir.FP8_DTYPES and t.name not in caches:
            report.error(f"input {t.name} cannot have dtype '{t.dtype}': FP8 is for the K/V cache (k, v and "
                         f"key-side tensors of dot products, each with `dequant ... by SCALE`)", t.span)
    scaled: dict[str, ir.Dequant] = {}
    for d in dequant:
        here = d.span or fallback
        t = caches.get(d.tensor)
        if d.tensor in scaled:
            first = scaled[d.tensor].span
            report.error(f"a second dequant for {d.tensor}{f' (line {first.line} has one)' if first else ''}: a "
                         f"tensor has one scale", here)
            continue
        if t is None:
            what = ("q is the query, which is never FP8 (it keeps its f16/bf16/f32 dtype)" if d.tensor == "q"
                    else f"'{d.tensor}' is not k, v or a key-side tensor of a dot product")
            report.error(f"dequant applies to the K/V cache (k, v, key-side tensors of dot products): {what}", here)
            continue
        scaled[d.tensor] = d
        if t.dtype not in ir.FP8_DTYPES:
            report.error(f"dequant applies to an FP8 tensor ({', '.join(ir.FP8_DTYPES)}), but {t.name} is {t.dtype}: "
                         f"declare {t.name}: f8e4m3[...] or remove this line", here)
        param = next((p for p in params if p.name == d.scale), None)
        scale = inputs_by_name.get(d.scale)
        if param is None and scale is None:
            report.error(f"the scale of {t.name}, '{d.scale}', is not declared; declare {example.format(d.scale)}",
                         here)
        elif (param is not None and param.dtype != "f32") or (scale is not None and (scale.dtype, scale.shape) !=
                                                              ("f32", ("HKV",))):
            have = f"param {param.dtype}" if param is not None else f"{scale.dtype}[{', '.join(scale.shape)}]"
            report.error(f"the scale of {t.name} is an f32 param (one for the tensor) or an input f32[HKV] (one per "
                         f"K/V head), but {d.scale} is {have}", here)
    for name, t in caches.items():
        if t.dtype in ir.FP8_DTYPES and name not in scaled:
            report.error(f"{name} is {t.dtype}, so it needs its dequant scale: add `dequant {name} by "
                         f"{name}_scale` with {example.format(name + '_scale')}", t.span or fallback)


def _check_quantize(report: _Report, k, v, inputs, quantize, score, fallback: Span | None) -> None:
    """`quantize` lines: each names, once, a query-side tensor the score reads in a dot product (q of qk, or the
    left side of `qr @ kr`), to one of ir.QUANTIZE_DTYPES."""
    queries = {n.query: n for n in ir.walk(score) if isinstance(n, ir.QK)}
    keys = {n.key for n in queries.values()} | {t.name for t in (k, v) if t is not None}
    declared = {t.name for t in inputs} | {"q"}
    seen: dict[str, ir.Quantize] = {}
    for d in quantize:
        here = d.span or fallback
        if d.tensor in seen:
            first = seen[d.tensor].span
            report.error(f"{d.tensor} is quantised twice{f' (line {first.line} names it too)' if first else ''}",
                         here)
            continue
        seen[d.tensor] = d
        if d.dtype not in ir.QUANTIZE_DTYPES:
            report.error(f"quantize {d.tensor} to '{d.dtype}': queries are quantised to "
                         f"{', '.join(ir.QUANTIZE_DTYPES)} only", here)
        if d.tensor in queries:
            continue
        if d.tensor in keys:
            why = (f"{d.tensor} is key-side, stored as it is (an FP8 cache says `dequant {d.tensor} by SCALE` "
                   f"instead)")
        elif d.tensor in declared:
            why = f"the score reads {d.tensor} in no dot product (`{d.tensor} @ KEY`)"
        else:
            why = f"'{d.tensor}' is not declared{_did_you_mean(d.tensor, queries)}"
        reads = ", ".join(sorted(queries)) or "none"
        report.error(f"quantize applies to the query side of the score's dot products ({reads}): {why}", here)


# ---------------------------------------------------------------- expressions (IR level)


@dataclass(frozen=True)
class _Env:
    """What the names of one spec denote."""

    params: dict
    inputs: dict
    sizes: frozenset[str]
    dims: dict  # sizes bound at compile time: constants
    q: ir.TensorDecl | None = None  # the ends of the dot products
    k: ir.TensorDecl | None = None

    @staticmethod
    def of(q, k, v, params, inputs, dims, storages=(None, None)) -> "_Env":
        qkv = [t for t in (q, k, v) if t is not None]
        sizes = {e for t in qkv + list(inputs) for e in t.shape} | {n for n, _ in dims}
        # Ragged or paged sequences have their own lengths, which M and N denote in expressions; B counts them.
        sizes |= {role for role, storage in zip(("M", "N"), storages) if storage is not None}
        if any(storage is not None for storage in storages):
            sizes.add("B")
        return _Env({p.name: p for p in params}, {t.name: t for t in inputs}, frozenset(sizes), dict(dims), q, k)


def _check_expressions(report: _Report, env: _Env, score, masks, normalizer, fallback: Span | None) -> None:
    depths: dict[int, int] = {}
    for e in (score, *masks, normalizer.sink):
        if e is not None and ir.depth(e, depths) > MAX_DEPTH:
            report.error(f"this expression nests {ir.depth(e, depths)} levels deep, more than {MAX_DEPTH}",
                         e.span or fallback)
            return  # the checks below recurse once per level
    typer = _Typer(report, env)
    score_kind = typer.kind(score, fallback)
    if score_kind == "bool":
        report.error("the score must be a number, but this is a boolean (use `mask` for conditions)",
                     score.span or fallback)
    for m in masks:
        kind = typer.kind(m, fallback)
        if kind not in ("bool", None):
            report.error(f"a mask must be a boolean condition, but this is {_kind_name(kind)} "
                         f"(compare it, e.g. `... != 0`)", m.span or fallback)
        for node in ir.walk(m):
            if isinstance(node, ir.QK):
                report.error("a mask cannot depend on qk (masks decide which keys exist before any score is "
                             "computed); use `score = where(cond, score, -inf)` instead",
                             node.span or m.span or fallback)
    sink = normalizer.sink
    if sink is not None:
        here = sink.span or normalizer.span or fallback
        if not normalizer.takes_sink:
            report.error(f"{normalizer.name} takes no sink: a sink is a logit that joins the denominator of a "
                         f"normalised row ({_with_sink()}), and {normalizer.name} does not normalise its rows",
                         here)
        if typer.kind(sink, here) == "bool":
            report.error("the sink must be a number, but this is a boolean", here)
        for node in ir.walk(sink):
            if isinstance(node, ir.QK) or (isinstance(node, ir.IndexVar) and node.name == "j"):
                report.error(f"the sink is one logit per row and cannot depend on "
                             f"{'qk' if isinstance(node, ir.QK) else 'the key position j'}", node.span or here)
    _check_constants(report, typer, env, [e for e in (score, *masks, sink) if e is not None], fallback)


def _check_constants(report: _Report, typer: _Typer, env: _Env, roots: list, fallback: Span | None) -> None:
    """Constant subexpressions (of literals and sizes bound by `dims`), computed as folding will at compile time:
    a number the kernels cannot hold, and an integer `%` or `//` by zero, are reported where they are written."""
    values: dict[int, object] = {}  # node id -> its value, or None where it is not constant
    seen: set[int] = set()
    for root in roots:
        for node in ir.post_order(root, seen):
            values[id(node)] = _constant(report, typer, env, node, values, fallback)


def _constant(report: _Report, typer: _Typer, env: _Env, e, values: dict, fallback: Span | None):
    here = getattr(e, "span", None) or fallback
    if isinstance(e, ir.Num):
        problem = number_problem(e.value, e.is_float)
        if problem:
            report.error(problem, here)
            return None
        return e.value
    if isinstance(e, ir.SizeRef):
        return env.dims.get(e.name)
    args = [values[id(c)] for c in ir.children(e)]
    kind = typer.kind(e, fallback)  # (memoized: each node was typed above)
    if isinstance(e, ir.Binary) and e.op in ("%", "//") and kind == "int" and args[1] is not None \
            and args[1] == 0:  # (whether or not the dividend is constant)
        report.error(f"integer {'modulo' if e.op == '%' else 'division'} by zero: this divisor is 0",
                     e.rhs.span or here)
        return None
    if not isinstance(e, (ir.Unary, ir.Binary, ir.Call)) or None in args or kind is None:  # None: reported
        return None
    try:
        value = ops.op_of(e).python(*args)
    except (ValueError, OverflowError, ZeroDivisionError):  # inf or nan in the kernels, as in the reference
        return None
    if isinstance(value, int) and not isinstance(value, bool) and number_problem(value, False):
        report.error(f"this constant is {_shown(str(value))}, outside the 64-bit integers the kernels compute in",
                     here)
        return None
    return value


def _with_sink() -> str:
    return ", ".join(f"`{n.name}(score, sink=...)`" for n in ir.NORMALIZERS.values() if n.takes_sink)


def dot_operand(env: _Env, name: str) -> tuple[str | None, str | None, str | None]:
    """(side, head dim, None) for a tensor that can end a dot product: "query" for q and for an input with q's
    shape and dtype but its own head dim in q's D slot, "key" for k and for an input shaped like k that way (it is
    stored as k is: paged with a paged k). (None, None, why) for any other name."""
    for side, t in (("query", env.q), ("key", env.k)):
        if t is not None and name == t.name:
            return side, "D", None
    if name == "v":
        return None, None, f"v is used only in `{ir.return_text()}`"
    tensor = env.inputs.get(name)
    if tensor is None:
        what = "a param" if name in env.params else "a size" if name in env.sizes else "not a tensor"
        return None, None, (f"{what}; a dot product joins q or a tensor shaped like q with k or a tensor shaped like "
                            f"k{_did_you_mean(name, env.inputs)}")
    for side, t in (("query", env.q), ("key", env.k)):
        if t is None or len(t.shape) != len(tensor.shape) or "D" not in t.shape:
            continue
        slot = t.shape.index("D")
        if all(a == b for n, (a, b) in enumerate(zip(t.shape, tensor.shape)) if n != slot):
            # a key-side tensor may be FP8 (a cache, dequantised) or have q's dtype next to an FP8 k (FP8 latent,
            # bf16 RoPE part)
            allowed = {t.dtype}
            if side == "key":
                allowed |= {*ir.FP8_DTYPES, *([env.q.dtype] if env.q else [])}
            if tensor.dtype not in allowed:
                return None, None, f"it is {tensor.dtype} but {t.name} is {t.dtype}; they must share one dtype"
            return side, tensor.shape[slot], None
    shapes = " or ".join(f"[{', '.join(t.shape)}]" for t in (env.q, env.k) if t is not None)
    return None, None, (f"its shape [{', '.join(tensor.shape)}] is not q's or k's with a head dim of its own in "
                        f"place of D (the layouts {shapes})")


class _Typer:
    """Kinds ('int', 'float', 'bool') of expressions, reporting misuse where it happens; None after an error
    so that one mistake is reported once. The operators' rules come from the operator table (ops.py); each node
    object is typed once, so a score that reuses itself (`score = score + score`) is checked in linear time."""

    def __init__(self, report: _Report, env: _Env):
        self.report = report
        self.env = env
        self._memo: dict[int, tuple[object, str | None]] = {}  # id(node) -> (node, kind)

    def kind(self, e, fallback: Span | None) -> str | None:
        known = self._memo.get(id(e))
        if known is None:
            known = self._memo[id(e)] = (e, self._kind(e, fallback))
        return known[1]

    def _kind(self, e, fallback: Span | None) -> str | None:
        here = getattr(e, "span", None) or fallback
        if isinstance(e, ir.Num):
            return _num_kind(e)
        if isinstance(e, Name):  # unresolved: already reported
            return None
        if isinstance(e, ir.IndexVar):
            return "int"
        if isinstance(e, ir.QK):
            return self._dot(e, here)
        if isinstance(e, ir.SizeRef):
            if e.name not in self.env.sizes:
                self.report.error(f"size '{e.name}' appears in no tensor shape and no `dims`", here)
                return None
            return "int"
        if isinstance(e, ir.ParamRef):
            p = self.env.params.get(e.name)
            if p is None:
                self.report.error(f"unknown param '{e.name}'{_did_you_mean(e.name, self.env.params)}", here)
                return None
            return ir.dtype_kind(p.dtype) if p.dtype in ir.PARAM_DTYPES else None
        if isinstance(e, ir.Lookup):
            return self._lookup(e, here)
        if isinstance(e, ir.Call) and ops.function(e.fn) is None:
            return self._unknown_function(e, here)
        if isinstance(e, (ir.Unary, ir.Binary, ir.Call)):
            return self._operator(ops.op_of(e), ir.children(e), here)
        raise TypeError(f"not an IR expression: {e!r}")

    def _need(self, kind: str | None, allowed: tuple[str, ...], what: str, operand, here) -> str | None:
        if kind is None:
            return None
        if kind in allowed:
            return kind
        if allowed == ("bool",):
            hint = " (compare it, e.g. `x != 0`)"
            need = "booleans"
        elif "float" not in allowed:
            hint = " (it divides integers, rounding down; for numbers with a fraction write floor(a / b))"
            need = "integers"
        else:
            hint = " (use where(cond, a, b) to turn a condition into a number)"
            need = "numbers"
        self.report.error(f"{what} needs {need}, but this is {_kind_name(kind)}{hint}",
                          getattr(operand, "span", None) or here)
        return None

    def _operator(self, op: ops.Op, args: tuple, here) -> str | None:
        kinds = [self.kind(a, here) for a in args]
        if len(args) != op.arity:
            self.report.error(f"{op.name} takes {op.arity} argument{'s' if op.arity > 1 else ''}, got {len(args)}",
                              here)
            return None
        ok = True
        for index, (role, kind, arg) in enumerate(zip(op.operands, kinds, args)):
            if role != "any":
                allowed = {"bool": ("bool",), "integer": ("int", "bool")}.get(role, ("int", "float"))
                ok = self._need(kind, allowed, op.operand_label(index), arg, here) is not None and ok
        either = [k for role, k in zip(op.operands, kinds) if role == "any"]  # numbers or booleans, alike
        if not ok or None in either:
            return None
        if len({k == "bool" for k in either}) > 1:
            self.report.error(op.same.format(op=op.name, a=_kind_name(either[0]), b=_kind_name(either[1])), here)
            return None
        return ops.result_kind(op, kinds)

    def _unknown_function(self, e: ir.Call, here) -> None:
        if e.fn in self.env.inputs:
            hint = f": {e.fn} is a tensor, index it as {e.fn}[...]"
        elif e.fn in ir.NORMALIZERS:
            hint = f": {e.fn} is a normalizer, used only in `{ir.return_text(ir.NORMALIZERS[e.fn]())}`"
        else:
            hint = _did_you_mean(e.fn, ops.FUNCTIONS) or f" (functions: {', '.join(ops.FUNCTIONS)})"
        self.report.error(f"unknown function '{e.fn}'{hint}", here)
        return None

    def _dot(self, e: ir.QK, here) -> str | None:
        """`query @ key`: a query-side and a key-side tensor (q and k, or inputs shaped like them with a head dim of
        their own) whose head dims are one size."""
        ends = [dot_operand(self.env, name) for name in (e.query, e.key)]
        for (side, _, problem), name in zip(ends, (e.query, e.key)):
            if problem:
                self.report.error(f"{name} cannot be in a dot product: {problem}", here)
        if any(problem for _, _, problem in ends):
            return None
        (query_side, query_dim, _), (key_side, key_dim, _) = ends
        if query_side == key_side:
            self.report.error(f"a dot product of two {query_side}-side tensors ({e.query} and {e.key}): write "
                              f"`query @ key`, a tensor shaped like q (a query-side one) on the left and one "
                              f"shaped like k on the right", here)
        elif query_side == "key":
            self.report.error(f"{e.query} is key-side and {e.key} query-side: write `{e.key} @ {e.query}`", here)
        elif query_dim != key_dim:
            self.report.error(f"a dot product pairs one head dim, but {e.query}'s is {query_dim} and {e.key}'s is "
                              f"{key_dim}", here)
        else:
            return "float"
        return None

    def _lookup(self, e: ir.Lookup, here) -> str | None:
        kinds = [self.kind(x, here) for x in e.indices]
        if e.tensor in _QKV:
            hint = ("use qk for the dot product of q and k" if e.tensor != "v"
                    else f"v is used only in `{ir.return_text()}`")
            self.report.error(f"{e.tensor} cannot be indexed in an expression: {hint}", here)
            return None
        t = self.env.inputs.get(e.tensor)
        if t is None:
            if e.tensor in self.env.params:
                hint = f": {e.tensor} is a param (a scalar) and is used without indices"
            else:
                hint = (_did_you_mean(e.tensor, self.env.inputs)
                        or f"; declare it with `input {e.tensor}: f32[...]`")
            self.report.error(f"unknown tensor '{e.tensor}'{hint}", here)
            return None
        if len(e.indices) != len(t.shape):
            self.report.error(f"{t.name} has {len(t.shape)} dimension{'s' if len(t.shape) > 1 else ''} "
                              f"[{', '.join(t.shape)}] but {len(e.indices)} "
                              f"ind{'ices are' if len(e.indices) != 1 else 'ex is'} given", here)
            return None
        bad = [(x, kind) for x, kind in zip(e.indices, kinds) if kind not in ("int", None)]
        for x, kind in bad:
            self.report.error(f"an index must be an integer, but this is {_kind_name(kind)}", x.span or here)
        if bad:
            return None
        return ir.dtype_kind(t.dtype) if t.dtype in ir.TENSOR_DTYPES else None


# ---------------------------------------------------------------- the text front-end's block


class _Elaborator:
    def __init__(self, block: Block):
        self.block = block
        self.report = _Report()

    def run(self) -> tuple[ir.Attention | None, list[Diagnostic]]:
        b, report = self.block, self.report
        qkv: dict[str, ir.TensorDecl] = {}
        inputs, params, dims, dim_spans, scores, masks = [], [], {}, {}, [], []
        storages: dict[str, tuple[ir.Storage, StorageStmt]] = {}  # "q" or "kv"
        kinds = {"q": "dense", "kv": "dense"}  # as meant, even by a malformed statement
        ret: ReturnStmt | None = None
        dequant: list[ir.Dequant] = []
        quantize: list[ir.Quantize] = []
        for st in b.statements:
            if ret is not None:
                report.error("a statement after `return`: the return ends the attention block"
                             if not isinstance(st, ReturnStmt) else "a second `return`: an attention block "
                             "returns once", st.span)
                break
            if isinstance(st, TensorStmt):
                self._tensor(st, qkv, inputs)
            elif isinstance(st, ParamStmt):
                self._param(st, params)
            elif isinstance(st, Binding):
                self._binding(st, dims, dim_spans)
            elif isinstance(st, StorageStmt):
                self._storage(st, storages, kinds)
            elif isinstance(st, DequantStmt):
                dequant.append(ir.Dequant(st.tensor.text, st.scale.text, span=st.span))
            elif isinstance(st, QuantizeStmt):
                if st.dtype.text in ir.QUANTIZE_DTYPES:
                    quantize += [ir.Quantize(t.text, st.dtype.text, span=t.span) for t in st.tensors]
                else:
                    report.error(f"queries are quantised to {', '.join(ir.QUANTIZE_DTYPES)} only, not "
                                 f"'{st.dtype.text}'", st.dtype.span)
            elif isinstance(st, ScoreStmt):
                scores.append(st)
            elif isinstance(st, MaskStmt):
                masks.append(st)
            else:
                ret = st
        if ret is None:
            report.error(f"attention {b.name.text} has no return; end it with `{ir.return_text()}`",
                         b.name.span)
        else:
            self._check_return(ret)
        shared = ret is not None and ret.value.text == "k"  # the values are the keys (latent attention)
        for name in ("q", "k") if shared else ("q", "k", "v"):
            if name not in qkv:
                report.error(f"attention {b.name.text} declares no {name}; add e.g. "
                             f"`{name}: bf16[{_QKV_EXAMPLE[name]}]`", b.name.span)
        if shared and "v" in qkv:
            report.error(f"v is declared, so write `@ v`, not `@ k` (`@ k` is for keys that are the values, "
                         f"with no v)", ret.value.span)
        q, k = qkv.get("q"), qkv.get("k")
        v = k if shared else qkv.get("v")
        if "kv" in storages:
            self._check_storage_targets(storages["kv"][1], shared)
        dim_pairs = tuple(dims.items())
        q_storage, kv_storage = (storages[g][0] if g in storages else None for g in ("q", "kv"))
        inputs = self._storage_inputs(storages, inputs)
        _check_declarations(report, q, k, v, params, inputs, dim_pairs, b.name.span, dim_spans,
                            (q_storage, kv_storage), kinds)

        env = _Env.of(q, k, v, params, inputs, dim_pairs, (q_storage, kv_storage))
        score = ir.default_score()
        depths: dict[int, int] = {}
        for st in scores:
            rebound = self._resolve(st.value, env, score)
            if ir.depth(rebound, depths) > MAX_DEPTH:
                report.error(f"with this line the score nests more than {MAX_DEPTH} levels deep (each `score = ...` "
                             f"line adds its own nesting to the score before it)", st.span)
                break
            score = rebound
        mask_exprs = [self._resolve(m.condition, env, None) for m in masks]
        sink = ret.sink if ret is not None else None
        kind = ir.NORMALIZERS.get(ret.normalizer.text, ir.DEFAULT_NORMALIZER) if ret is not None \
            else ir.DEFAULT_NORMALIZER  # an unknown one is reported; the rest is checked as for the default
        normalizer = kind(None if sink is None else self._resolve(sink, env, None),
                          span=ret.span if ret is not None else None)
        _check_expressions(report, env, score, mask_exprs, normalizer, b.name.span)
        _check_dequant(report, q, k, v, params, inputs, dequant, score, b.name.span)
        _check_quantize(report, k, v, inputs, quantize, score, b.name.span)

        diagnostics = report.sorted()
        if diagnostics:
            return None, diagnostics
        spec = ir.make_attention(b.name.text, q, k, v, dims=dim_pairs, params=params, inputs=inputs,
                                 score=score, masks=mask_exprs, normalizer=normalizer,
                                 returns_lse=ret.extra is not None, span=b.name.span, q_storage=q_storage,
                                 kv_storage=kv_storage, dequant=dequant, quantize=quantize)
        return spec, []

    # -- declarations

    def _tensor(self, st: TensorStmt, qkv: dict, inputs: list) -> None:
        name = st.name.text
        decl = ir.TensorDecl(name, st.dtype.text, tuple(w.text for w in st.shape), span=st.span)
        if st.is_input and name in _QKV:
            self.report.error(f"{name} is one of q, k, v: declare it without `input`, as `{name}: ...`",
                              st.name.span)
        elif not st.is_input and name not in _QKV:
            self.report.error(f"only q, k and v are declared bare; declare the extra tensor as "
                              f"`input {name}: ...`", st.name.span)
        elif not st.is_input and name in qkv:
            self.report.error(f"'{name}' is declared twice", st.name.span)
        elif st.is_input:
            inputs.append(decl)
        else:
            qkv[name] = decl

    def _literal(self, e, what: str) -> ir.Num | None:
        if isinstance(e, ir.Num):
            return e
        self.report.error(f"{what} must be a literal (a number, inf, true or false)", getattr(e, "span", None))
        return None

    def _param(self, st: ParamStmt, params: list) -> None:
        default = None
        if st.default is not None:
            n = self._literal(st.default, f"the default of param {st.name.text}")
            if n is None:
                return
            default = n.value
            if st.dtype.text == "f32" and not isinstance(default, bool):
                default = float(default)  # `param cap: f32 = 2` means 2.0
        params.append(ir.ParamDecl(st.name.text, st.dtype.text, default, span=st.span))

    def _binding(self, st: Binding, dims: dict, dim_spans: dict) -> None:
        name = st.name.text
        n = self._literal(st.value, f"dims {name}")
        if name in dims:
            self.report.error(f"dims binds {name} twice", st.name.span)
        elif n is not None and (_num_kind(n) != "int" or n.value <= 0):
            self.report.error(f"dims {name} must be a positive integer, not {ir.format_number(n.value, n.is_float)}",
                              n.span or st.span)
        elif n is not None:
            dims[name] = n.value
            dim_spans[name] = st.name.span

    def _storage(self, st: StorageStmt, storages: dict, kinds: dict) -> None:
        """`paged k, v by TABLE, LENGTHS`, `ragged q by OFFSETS` or `ragged k, v by OFFSETS` (k, v in any order)."""
        kind = st.kind.text
        targets = sorted(w.text for w in st.targets)
        meant = {"q": kind == "ragged" and "q" in targets,
                 "kv": kind == "paged" or "k" in targets or "v" in targets}
        for group in {"q", "kv"} - storages.keys():  # a second statement does not override the first
            if meant[group]:
                kinds[group] = kind
        usage = _STATEMENTS[kind, "kv"]
        stray = next((w for w in st.targets if w.text not in _QKV), None)
        if stray is not None:
            self.report.error(f"{kind} applies to {'k, v' if kind == 'paged' else 'q or to k, v'}, not "
                              f"'{stray.text}'; write `{usage}`", stray.span)
            return
        if kind == "paged" and "q" in targets:
            self.report.error(f"q cannot be paged: only k and v live in a page pool (q may be ragged); "
                              f"write `{usage}`", next(w.span for w in st.targets if w.text == "q"))
            return
        if targets not in (["k", "v"], ["k"], ["q"]):
            message = (f"ragged q and ragged k, v are two statements (they may name the same offsets): "
                       f"`{_STATEMENTS['ragged', 'q']}` and `{usage}`" if "q" in targets
                       else f"k and v share their storage: write `{usage}`")
            self.report.error(message, st.span)
            return
        wanted = len(_STORAGE_TENSORS[ir.Paged if kind == "paged" else ir.Ragged])
        if len(st.tensors) != wanted:
            what = ("two tensors, the block table and the key lengths" if kind == "paged"
                    else "one tensor, the sequence offsets")
            example = _STATEMENTS[kind, "q" if targets == ["q"] else "kv"]
            self.report.error(f"{kind} takes {what}, but {len(st.tensors)} "
                              f"{'is' if len(st.tensors) == 1 else 'are'} given: write `{example}`", st.span)
            return
        group = "q" if targets == ["q"] else "kv"
        if group in storages:
            _, first = storages[group]
            combine = (" (ragged and paged do not combine: a paged cache has its own key lengths)"
                       if first.kind.text != kind else "")
            self.report.error(f"a second storage for {'q' if group == 'q' else 'k and v'}: line {first.span.line} "
                              f"already has `{first.kind.text} ...`{combine}", st.span)
            return
        names = [w.text for w in st.tensors]
        node = ir.Paged(*names, span=st.span) if kind == "paged" else ir.Ragged(*names, span=st.span)
        storages[group] = (node, st)

    def _check_storage_targets(self, st: StorageStmt, shared: bool) -> None:
        """`paged k, v ...` where v is declared; `paged k ...` where the values are k."""
        targets = sorted(w.text for w in st.targets)
        if shared and targets == ["k", "v"]:
            self.report.error(f"the values are k here (`{ir.return_text(value='k')}`), so there is no v to store: "
                              f"write `{st.kind.text} k by ...`", st.span)
        elif not shared and targets == ["k"]:
            self.report.error(f"k and v share their storage: write `{_STATEMENTS[st.kind.text, 'kv']}` (or return "
                              f"`@ k` where the values are the keys)", st.span)

    def _storage_inputs(self, storages: dict, inputs: list) -> list:
        """The declared inputs plus the index tensors the storage statements declare (one tensor may serve
        several: ragged q and k, v often share their offsets); an `input` line may not declare them again."""
        implied: dict[str, tuple[ir.TensorDecl, StorageStmt]] = {}
        for node, st in storages.values():
            for decl in node.declares():
                implied.setdefault(decl.name, (decl, st))
        kept = []
        for t in inputs:
            if t.name in implied:
                decl, st = implied[t.name]
                self.report.error(f"'{t.name}' is declared by `{st.kind.text} ...` on line {st.span.line} (as "
                                  f"{decl.dtype}[{', '.join(decl.shape)}]); remove this `input` line", t.span)
            else:
                kept.append(t)
        return kept + [decl for decl, _ in implied.values()]

    def _check_return(self, ret: ReturnStmt) -> None:
        kind = ir.NORMALIZERS.get(ret.normalizer.text)
        if kind is None:
            known = " or ".join(f"`{ir.print_normalizer(n())}`" for n in ir.NORMALIZERS.values())
            self.report.error(f"unknown normalizer '{ret.normalizer.text}'; the normalizer is {known}"
                              f"{_did_you_mean(ret.normalizer.text, ir.NORMALIZERS)}", ret.normalizer.span)
        elif kind.takes_sink and ret.sink_name is not None and ret.sink_name.text != "sink":
            # (a normalizer without a sink reports any `NAME=...` where the sink is checked)
            self.report.error(f"{kind.name} takes `sink=...`, not `{ret.sink_name.text}=...`", ret.sink_name.span)
        if ret.value.text not in ("v", "k"):
            self.report.error(f"the weights multiply the value tensor: write `@ v` (or `@ k` where the keys are the "
                              f"values), not `@ {ret.value.text}`", ret.value.span)
        if ret.extra is not None and ret.extra.text != "lse":
            self.report.error(f"the only second output is lse (the row log-sum-exp), not '{ret.extra.text}'",
                              ret.extra.span)

    # -- names

    def _resolve(self, e, env: _Env, score):
        """Bare names to IR nodes; `score` to its previous value (None: `score` is not allowed here)."""
        if isinstance(e, Name):
            return self._name(e, env, score)
        kids = ir.children(e)
        if not kids:
            return e
        return ir.with_children(e, tuple(self._resolve(c, env, score) for c in kids))

    def _name(self, e: Name, env: _Env, score):
        n = e.name
        if n == "score":
            if score is not None:
                return score
            problem = "`score` can be used only on the right of `score = ...` and in the return"
        elif n in ir.INDEX_VARS:
            return ir.IndexVar(n, span=e.span)
        elif n in env.params:
            return ir.ParamRef(n, span=e.span)
        elif n in env.sizes:
            return ir.SizeRef(n, span=e.span)
        elif n in ("q", "k"):
            problem = f"{n} cannot be used in an expression: use qk for the dot product of q and k"
        elif n == "v":
            problem = f"v can be used only in `{ir.return_text()}`"
        elif n == "lse":
            problem = f"lse is an output and can be named only in `{ir.return_text(returns_lse=True)}`"
        elif n in env.inputs:
            t = env.inputs[n]
            problem = f"{n} is a tensor: index it, as {n}[{', '.join(x.lower() for x in t.shape)}]"
        elif n in ir.ROLES:
            problem = f"size {n} appears in no tensor shape and no `dims`"
        else:
            known = [*ir.INDEX_VARS, *env.params, *env.sizes, *env.inputs]
            # keywords only when close: `casual` is causal, `scal` is no keyword
            hint = _did_you_mean(n, known) or _did_you_mean(n, ("causal", "qk"), cutoff=0.8)
            problem = f"unknown name '{n}'{hint}"
        self.report.error(problem, e.span)
        return e
