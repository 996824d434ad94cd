"""The text front-end: `.attn` source -> checked `ir.Attention`s.

attn.lark gives a parse tree, one Transformer turns it into check.Block (IR expressions plus bare names),
and check.elaborate resolves the names and checks the meaning (the `paged` / `ragged` statements for serving
layouts are described in docs/serving.md). Every problem becomes one SpecError whose
diagnostics point at the source with a caret; lark's own types never leave this package.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import replace
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from .. import ir
from ..errors import Diagnostic, Span, SpecError
from . import check

_GRAMMAR = resources.files(__package__).joinpath("attn.lark").read_text(encoding="utf-8")
_LARK = Lark(_GRAMMAR, parser="lalr", lexer="basic", propagate_positions=True, maybe_placeholders=False)

# Plain words for the grammar's terminals, used in "expected ..." messages.
_WORDS = {t.name: f"'{t.pattern.value}'" for t in _LARK.terminals if isinstance(t.pattern, PatternStr)}
_WORDS.update(NAME="a name", NUMBER="a number", **{"$END": "the end of the file"})
KEYWORDS = frozenset(t.pattern.value for t in _LARK.terminals
                     if isinstance(t.pattern, PatternStr) and t.pattern.value.isidentifier())
# Terminals named by one phrase: (the ones whose presence signals the group, all it covers, the phrase).
_GROUPS = (
    ({"DIMS", "RETURN"}, {"DIMS", "PARAM", "INPUT", "PAGED", "RAGGED", "SCORE", "MASK", "RETURN", "NAME"},
     "a statement (dims, param, input, paged, ragged, score, mask, return or a q/k/v declaration)"),
    ({"NAME", "NUMBER"}, {"NAME", "NUMBER", "LPAR", "MINUS", "NOT", "INF", "TRUE", "FALSE", "QK", "SCORE", "CAUSAL"},
     "an expression"),
    ({"PLUS", "STAR"}, {"LT", "LE", "GT", "GE", "EQ", "NE", "PLUS", "MINUS", "STAR", "SLASH", "DSLASH", "PERCENT",
                        "AND", "OR", "LSQB", "LPAR"}, "an operator"),
)

_COMPARISONS = {"LT", "LE", "GT", "GE", "EQ", "NE"}
# Limits that keep a hostile or broken file from exhausting time, memory or the stack: a real spec is a few KB
# and a few hundred words and symbols; parsing takes about 50 us a token.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_TOKENS = 20_000
_TOKEN = re.compile(r"\w+|[^\w\s]")  # counts what the lexer makes tokens of (comments' words too, to be brief)
_STATEMENT_RULES = frozenset({"start", "attention", "dims", "binding", "tensor", "input", "shape", "storage", "names",
                              "dequant", "quantize", "param", "score", "mask", "result", "sink"})
_CHARACTER_HINTS = {"&": "; write `and`", "|": "; write `or`", "!": "; write `not` (or `!=`)",
                    "^": "; there is no power operator: use exp2, sqrt or a product",
                    '"': "; the language has no strings", "'": "; the language has no strings"}


def parse(text: str, filename: str = "<string>") -> list[ir.Attention]:
    """Every `attention` block of `text`, checked and in canonical form; raises SpecError listing every
    problem (syntax errors stop at the first)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(Diagnostic(f"{filename}: {_too_large(len(text), 'characters')}"))
    tokens = len(_TOKEN.findall(text))
    if tokens > MAX_SPEC_TOKENS:
        raise SpecError(Diagnostic(f"{filename}: the spec is too long ({tokens:,} words and symbols; at most "
                                   f"{MAX_SPEC_TOKENS:,}): split it into several files"))
    lines = _lines(text)
    nul = text.find("\x00")
    if nul >= 0:
        raise SpecError(Diagnostic("this looks like a binary file (it holds a NUL byte), not an attnc spec",
                                   _offset_span(text, nul, filename, lines)))
    try:
        tree = _LARK.parse(text)
    except UnexpectedInput as e:
        raise SpecError(_syntax_diagnostic(e, filename, lines)) from None
    too_deep = _too_deep(tree)
    if too_deep is not None:
        start = too_deep.meta  # a caret under its first character: the expression may run for pages
        raise SpecError(Diagnostic(f"this expression nests more than {check.MAX_DEPTH} levels deep; split it with "
                                   f"`score = ...` lines", Span(filename, start.line, start.column, start.line,
                                                                start.column + 1, lines[start.line - 1])))
    to_blocks = _ToBlocks(filename, lines)
    blocks = to_blocks.transform(tree)
    if to_blocks.problems:
        raise SpecError(check.in_source_order(to_blocks.problems))
    if not blocks:
        raise SpecError(Diagnostic("no `attention NAME { ... }` block in this file",
                                   Span(filename, 1, 1, 1, 2, lines[0])))
    specs, diagnostics, names = [], [], {}
    for block in blocks:
        if block.name.text in names:
            diagnostics.append(Diagnostic(f"a second attention named '{block.name.text}' (the first is on line "
                                          f"{names[block.name.text]})", block.name.span))
        names.setdefault(block.name.text, block.name.span.line)
        spec, problems = check.elaborate(block)
        diagnostics.extend(problems)
        specs.append(spec)
    if diagnostics:
        raise SpecError(check.in_source_order(diagnostics))
    return specs


def parse_file(path: str | os.PathLike) -> list[ir.Attention]:
    """`parse` of a file's text; a missing, unreadable or non-UTF-8 file is a SpecError too."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(Diagnostic(f"{name}: {_too_large(os.path.getsize(name), 'bytes')}"))
    except IsADirectoryError:
        raise SpecError(Diagnostic(f"{name}: is a directory, not a spec file")) from None
    except FileNotFoundError:
        raise SpecError(Diagnostic(f"{name}: no such file")) from None
    except OSError as e:
        raise SpecError(Diagnostic(f"{name}: cannot read it ({e.strerror or e})")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = data.decode("utf-8", errors="replace")  # the bytes before e.start decode unchanged
        place = _offset_span(shown, len(data[:e.start].decode("utf-8")), name, _lines(shown))
        raise SpecError(Diagnostic(f"this file is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8",
                                   place)) from None
    return parse(text, filename=name)


# ---------------------------------------------------------------- syntax errors


def _too_large(size: int, unit: str) -> str:
    return (f"the file is too large for a spec ({size:,} {unit}; at most {MAX_SPEC_BYTES:,}): a spec holds "
            f"declarations and a few expressions, not data")


def _too_deep(tree: Tree) -> Tree | None:
    """The first expression node nested more than check.MAX_DEPTH expressions deep, if any (walked without
    recursion: the transformer below, and every later walk, recurse once per level)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data not in _STATEMENT_RULES:
            depth += 1
            if depth > check.MAX_DEPTH:
                return node
        stack.extend((c, depth) for c in reversed(node.children) if isinstance(c, Tree))  # leftmost first
    return None


def _lines(text: str) -> list[str]:
    """Source lines as lark counts them: only \n ends a line (str.splitlines also splits at \f, \x1c, ...)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _offset_span(text: str, offset: int, filename: str, lines: list[str]) -> Span:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Span(filename, line, col, line, col + 1, lines[line - 1] if line <= len(lines) else "")


def _expected_words(expected) -> str:
    names = set(expected)
    phrases = []
    for signal, covered, phrase in _GROUPS:
        if signal <= names:
            phrases.append(phrase)
            names -= covered
    phrases += sorted(_WORDS.get(n, n) for n in names)
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " or " + phrases[-1]


_STATEMENTS = ("dims", "param", "input", "paged", "ragged", "score", "mask", "return")


def _misspelt(e: UnexpectedToken, line_text: str) -> str:
    """'; did you mean ...' for a misspelt keyword: the unexpected name itself (`atention`, `scor`), or the word
    before it when a statement's first word was misspelt and so read as a q/k/v declaration (`paramm w: ...`
    expects ':' after `paramm`)."""
    expected = set(e.expected)
    if e.token.type == "NAME" and len(expected) > 1:  # one expected word is named by the message already
        words = [_WORDS[n].strip("'") for n in expected if n in _WORDS and _WORDS[n].strip("'") in KEYWORDS]
        close = difflib.get_close_matches(e.token.value, words, n=1, cutoff=0.7)
        if close:
            return f"; did you mean '{close[0]}'?"
    if expected == {"COLON"}:
        before = re.search(r"([A-Za-z_]\w*)\s*$", line_text[:e.column - 1])
        close = before and difflib.get_close_matches(before.group(1), _STATEMENTS, n=1, cutoff=0.7)
        if close:
            return f"; '{before.group(1)}' is not a statement keyword: did you mean '{close[0]}'?"
    return ""


def _syntax_diagnostic(e: UnexpectedInput, filename: str, lines: list[str]) -> Diagnostic:
    line, col = e.line, e.column
    if isinstance(e, UnexpectedCharacters):
        message = f"unexpected character {e.char!r}{_CHARACTER_HINTS.get(e.char, '')}"
        width = 1
    elif isinstance(e, UnexpectedToken) and e.token.type != "$END":
        token = e.token
        what = (f"'{token.value}'" if token.type not in ("NAME", "NUMBER")
                else f"{'name' if token.type == 'NAME' else 'number'} '{token.value}'")
        message = f"unexpected {what}; expected {_expected_words(e.expected)}{_misspelt(e, lines[line - 1])}"
        if token.value in KEYWORDS and set(e.expected) == {"NAME"}:
            message = f"'{token.value}' is a reserved word and cannot be a name"
        elif token.type in _COMPARISONS and not _COMPARISONS & set(e.expected):
            message = "comparisons do not chain: write `a < b and b < c`, or parenthesize"
        width = len(token.value)
    else:  # lark places the end of input on the last token: point just past it
        token = getattr(e, "token", None)
        if token is not None and token.end_line is not None:
            line, col = token.end_line, token.end_column
        message = f"unexpected end of file; expected {_expected_words(getattr(e, 'expected', ()))}"
        width = 1
    line_text = lines[line - 1] if 0 < line <= len(lines) else ""
    return Diagnostic(message, Span(filename, line, col, line, col + width, line_text))


# ---------------------------------------------------------------- parse tree -> blocks


class _ToBlocks(Transformer):
    """Bottom-up: tokens and rules become IR expressions (with check.Name for bare names) and statements.
    Problems found on the way are collected in `problems` (an exception raised here would reach the caller
    wrapped in lark's VisitError)."""

    def __init__(self, filename: str, lines: list[str]):
        super().__init__()
        self.filename = filename
        self.lines = lines
        self.problems: list[Diagnostic] = []
        # 9223372036854775808 fits int64 only as `-9223372036854775808`: its problem, withdrawn by `neg`
        self._least_int64: dict[int, Diagnostic] = {}

    def _span(self, place) -> Span:
        return Span(self.filename, place.line, place.column, place.end_line, place.end_column,
                    self.lines[place.line - 1])

    def _word(self, token: Token) -> check.Word:
        return check.Word(str(token), self._span(token))

    # -- blocks and statements

    def start(self, blocks):
        return blocks

    @v_args(meta=True)
    def attention(self, meta, children):
        name, *statements = children
        flat = [s for st in statements for s in (st if isinstance(st, list) else [st])]  # dims give lists
        return check.Block(self._word(name), tuple(flat), self._span(meta))

    @v_args(meta=True)
    def binding(self, meta, children):
        name, value = children
        return check.Binding(self._word(name), value, self._span(meta))

    def dims(self, bindings):
        return bindings

    def shape(self, names):
        return tuple(self._word(n) for n in names)

    def _tensor(self, meta, children, is_input: bool) -> check.TensorStmt:
        name, dtype, shape = children
        return check.TensorStmt(self._word(name), self._word(dtype), shape, is_input, self._span(meta))

    @v_args(meta=True)
    def tensor(self, meta, children):
        return self._tensor(meta, children, is_input=False)

    @v_args(meta=True)
    def input(self, meta, children):
        return self._tensor(meta, children, is_input=True)

    @v_args(meta=True)
    def param(self, meta, children):
        name, dtype, *default = children
        return check.ParamStmt(self._word(name), self._word(dtype), default[0] if default else None,
                               self._span(meta))

    def names(self, tokens):
        return tuple(self._word(t) for t in tokens)

    @v_args(meta=True)
    def storage(self, meta, children):
        kind, targets, tensors = children
        return check.StorageStmt(self._word(kind), targets, tensors, self._span(meta))

    @v_args(meta=True)
    def dequant(self, meta, children):
        tensor, scale = children
        return check.DequantStmt(self._word(tensor), self._word(scale), self._span(meta))

    @v_args(meta=True)
    def quantize(self, meta, children):
        tensors, dtype = children
        return check.QuantizeStmt(tensors, self._word(dtype), self._span(meta))

    @v_args(meta=True)
    def score(self, meta, children):
        return check.ScoreStmt(children[0], self._span(meta))

    @v_args(meta=True)
    def mask(self, meta, children):
        return check.MaskStmt(children[0], self._span(meta))

    def sink(self, children):
        name, value = children
        return self._word(name), value

    @v_args(meta=True)
    def result(self, meta, children):
        normalizer, *rest = children
        sink_name, sink = rest.pop(0) if isinstance(rest[0], tuple) else (None, None)
        value, *extra = rest
        return check.ReturnStmt(self._word(normalizer), sink_name, sink, self._word(value),
                                self._word(extra[0]) if extra else None, self._span(meta))

    # -- expressions

    @v_args(meta=True)
    def number(self, meta, children):
        text = str(children[0])
        is_float = any(ch in text for ch in ".eE")
        value, problem = check.literal_value(text, is_float)
        if problem and not is_float and text.lstrip("0") == str(-ir.INT64[0]):
            num = ir.Num(-ir.INT64[0], False, span=self._span(meta))
            self._least_int64[id(num)] = Diagnostic(problem, self._span(meta))
            self.problems.append(self._least_int64[id(num)])
            return num
        if problem:
            self.problems.append(Diagnostic(problem, self._span(meta)))
        return ir.Num(value, is_float, span=self._span(meta))

    @v_args(meta=True)
    def inf(self, meta, _):
        return ir.Num(float("inf"), True, span=self._span(meta))

    @v_args(meta=True)
    def true(self, meta, _):
        return ir.Num(True, False, span=self._span(meta))

    @v_args(meta=True)
    def false(self, meta, _):
        return ir.Num(False, False, span=self._span(meta))

    @v_args(meta=True)
    def qk(self, meta, _):
        return ir.QK(span=self._span(meta))

    @v_args(meta=True)
    def dot(self, meta, children):
        query, key = children
        return ir.QK(str(query), str(key), span=self._span(meta))

    @v_args(meta=True)
    def score_ref(self, meta, _):
        return check.Name("score", self._span(meta))

    @v_args(meta=True)
    def causal(self, meta, _):
        return _with_span(ir.causal_mask(), self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return check.Name(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def lookup(self, meta, children):
        tensor, *indices = children
        return ir.Lookup(str(tensor), tuple(indices), span=self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        fn, *args = children
        return ir.Call(str(fn), tuple(args), span=self._span(meta))

    @v_args(meta=True)
    def neg(self, meta, children):
        _minus, operand = children
        if isinstance(operand, ir.Num) and not isinstance(operand.value, bool):
            if id(operand) in self._least_int64:
                self.problems.remove(self._least_int64.pop(id(operand)))
            return ir.Num(-operand.value, operand.is_float, span=self._span(meta))  # `-3` is one literal
        return ir.Unary("neg", operand, span=self._span(meta))

    @v_args(meta=True)
    def logic_not(self, meta, children):
        return ir.Unary("not", children[0], span=self._span(meta))

    @v_args(meta=True)
    def binary(self, meta, children):
        lhs, op, rhs = children
        return ir.Binary(str(op), lhs, rhs, span=self._span(meta))

    @v_args(meta=True)
    def logic_and(self, meta, children):
        return ir.Binary("and", *children, span=self._span(meta))

    @v_args(meta=True)
    def logic_or(self, meta, children):
        return ir.Binary("or", *children, span=self._span(meta))


def _with_span(e: ir.Expr, span: Span) -> ir.Expr:
    """`e` with every node placed at `span` (an expansion such as `causal` stands where its word is)."""
    kids = tuple(_with_span(c, span) for c in ir.children(e))
    if isinstance(e, ir.Binary):
        return replace(e, lhs=kids[0], rhs=kids[1], span=span)
    return replace(e, span=span)  # causal's expansion holds only Binary, IndexVar and SizeRef nodes
