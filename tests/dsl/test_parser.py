"""The text front-end: example specs round-trip, equivalent spellings give one key, precedence matches the
printer, names resolve to the right IR nodes."""
import dataclasses
import random
from pathlib import Path

import pytest

import attnc
from attnc import ir, ops
from attnc.dsl import check, parser
from attnc.dsl.parser import parse, parse_file
from attnc.errors import Span

SPECS = sorted((Path(__file__).parents[2] / "examples" / "specs").glob("*.attn"))
QKV = "q: bf16[B, H, M, D]  k: bf16[B, HKV, N, D]  v: bf16[B, HKV, N, D]\n"


def one(body: str, head: str = QKV, ret: str = "return softmax(score) @ v") -> ir.Attention:
    (spec,) = parse(f"attention a {{\n{head}{body}\n{ret}\n}}\n", "t.attn")
    return spec


def test_examples_cover_the_variants():
    specs = [s for path in SPECS for s in parse_file(path)]
    assert len(specs) >= 14 and len({s.key for s in specs}) == len(specs)
    for path in SPECS:
        assert path.read_text().startswith("# "), f"{path.name} needs a first comment line saying what it is"
    by_name = {s.name: s for s in specs}
    assert by_name["mqa_decode"].k.shape == ("B", "HKV", "N", "D")
    assert by_name["bshd_causal"].q.shape == ("B", "M", "H", "D")
    assert by_name["mla_prefill"].value_dim == "DV" and by_name["mla_prefill"].dim_values == {"D": 192, "DV": 128}
    assert by_name["sinks"].normalizer.sink == ir.Lookup("sinks", (ir.IndexVar("h"),))
    assert by_name["causal_lm"].returns_lse and by_name["causal_lm"].masks == (ir.causal_mask(),)
    assert by_name["alibi"].input("slopes") == ir.TensorDecl("slopes", "f32", ("H",))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_round_trips_through_the_printer(path):
    specs = parse_file(path)
    for spec in specs:
        text = ir.print_attention(spec)
        (again,) = parse(text, "printed.attn")
        assert again == spec and again.key == spec.key and again.canonical == text
        assert check.attention_diagnostics(spec) == []
        assert ops.expr_type(spec.score, spec) in ("int", "float")
        assert all(ops.expr_type(m, spec) == "bool" for m in spec.masks)
    assert parse_file(str(path)) == specs


def test_no_lark_objects_leave_the_parser():
    import lark

    def visit(x):
        if isinstance(x, (lark.Tree, lark.Token)):
            raise AssertionError(f"lark object in the IR: {x!r}")
        if dataclasses.is_dataclass(x) and not isinstance(x, Span):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, tuple):
            for y in x:
                visit(y)

    for path in SPECS:
        for spec in parse_file(path):
            visit(spec)


@pytest.mark.parametrize("a, b", [
    # comments, whitespace and line breaks
    ("mask causal\n", "# a comment\n\n   mask    causal   # trailing\n"),
    # `mask causal` is its expansion
    ("mask causal\n", "mask i + (N - M) >= j\n"),
    # the default score line, omitted or written
    ("", "score = qk * rsqrt(D)\n"),
    # mask order, and `and` versus separate masks; duplicates collapse
    ("mask causal\nmask j > 0\n", "mask j > 0\nmask causal\n"),
    ("mask causal and j > 0\n", "mask j > 0\nmask causal\nmask j > 0\n"),
    ("mask (causal and j > 0) and i < 9\n", "mask i < 9 and j > 0\nmask causal\n"),
    # sequential rebinding is inlined
    ("score = qk * rsqrt(D)\nscore = score * 2.0\n", "score = qk * rsqrt(D) * 2.0\n"),
    ("score = score * 2.0\n", "score = (qk * rsqrt(D)) * 2.0\n"),
    # declaration order, and an integer default of an f32 param
    ("param w: i32 = 4\nparam c: f32 = 2\n", "param c: f32 = 2.0\nparam w: i32 = 4\n"),
    ("input s: f32[H]\ninput t: f32[H]\nscore = qk + s[h] + t[h]\n",
     "input t: f32[H]\nscore = qk + s[h] + t[h]\ninput s: f32[H]\n"),
    # redundant parentheses and a folded negative literal
    ("score = ((qk)) * (-2)\n", "score = qk * -2\n"),
])
def test_equivalent_spellings_give_one_key(a, b):
    x, y = one(a), one(b)
    assert x == y and x.key == y.key


def test_dims_order_and_layout_spelling():
    a = parse("attention a { dims D = 64, DV = 32 q: f16[B,H,M,D] k: f16[B,H,N,D] v: f16[B,H,N,DV] "
              "return softmax(score) @ v }")
    b = parse("attention a {\n  dims DV = 32\n  dims D = 64\n  v: f16[B, H, N, DV]\n  k: f16[B, H, N, D]\n"
              "  q: f16[B, H, M, D]\n  return softmax(score) @ v\n}")
    assert a == b and a[0].key == b[0].key


def test_different_meanings_give_different_keys():
    keys = {one(body).key for body in ("", "mask causal\n", "score = qk\n", "score = qk * 1.0\n", "score = qk * 1\n")}
    assert len(keys) == 5
    assert one("").key != one("", ret="return softmax(score) @ v, lse").key


def test_names_resolve_to_their_ir_nodes():
    spec = one("param w: i32\ninput s: f32[H, R]\nscore = qk + s[h, j % R]\nmask i - j < w + D\n")
    assert spec.score == ir.Binary("+", ir.QK(), ir.Lookup("s", (ir.IndexVar("h"), ir.Binary(
        "%", ir.IndexVar("j"), ir.SizeRef("R")))))
    assert spec.masks == (ir.Binary("<", ir.Binary("-", ir.IndexVar("i"), ir.IndexVar("j")),
                                     ir.Binary("+", ir.ParamRef("w"), ir.SizeRef("D"))),)


def test_literals():
    spec = one("param c: f32 = -inf\nparam f: bool = true\nparam n: i32 = -7\n"
               "score = qk * 1.5e-3 + 2 - .5 + 3. + 1E2\nmask i >= -1 and not false\n")
    assert spec.param("c").default == float("-inf") and spec.param("f").default is True
    assert spec.param("n").default == -7 and isinstance(spec.param("n").default, int)
    nums = [n for n in ir.walk(spec.score) if isinstance(n, ir.Num)]
    assert [(n.value, n.is_float) for n in nums] == [(1.5e-3, True), (2, False), (0.5, True), (3.0, True),
                                                     (100.0, True)]
    assert ir.Num(-1, False) in list(ir.walk(spec.masks[0])) or ir.Num(-1, False) in list(ir.walk(spec.masks[1]))


@pytest.mark.parametrize("text, tree", [
    ("x or y and z", ("or", "x", ("and", "y", "z"))),
    ("not x and y", ("and", ("not", "x"), "y")),
    ("not i < j", ("not", ("<", "i", "j"))),
    ("(i + j * 2 < 3) == x", ("==", ("<", ("+", "i", ("*", "j", 2)), 3), "x")),
    ("i - j - 1 >= 0", (">=", ("-", ("-", "i", "j"), 1), 0)),
    ("i * j % 2 / 3 > 0", (">", ("/", ("%", ("*", "i", "j"), 2), 3), 0)),
    ("-i * 2 > 0", (">", ("*", ("neg", "i"), 2), 0)),
    ("i - -2 > --j", (">", ("-", "i", -2), ("neg", ("neg", "j")))),
])
def test_precedence_and_associativity(text, tree):
    # `true == (...)` keeps a top-level `and` from being split into two masks
    spec = one(f"param x: bool\nparam y: bool\nparam z: bool\nmask true == ({text})\n")

    def shape(e):
        if isinstance(e, ir.Binary):
            return (e.op, shape(e.lhs), shape(e.rhs))
        if isinstance(e, ir.Unary):
            return (e.op, shape(e.operand))
        return e.value if isinstance(e, ir.Num) else e.name

    assert shape(spec.masks[0].rhs) == tree


def test_sequential_score_and_causal_expand_to_ir():
    spec = one("param cap: f32 = 30\nscore = cap * tanh(score / cap)\nmask causal\n")
    assert spec.score == ir.Binary("*", ir.ParamRef("cap"), ir.Call("tanh", (
        ir.Binary("/", ir.default_score(), ir.ParamRef("cap")),)))
    assert spec.masks == (ir.causal_mask(),)


def test_spans_point_at_the_source():
    (spec,) = parse("attention w {\n" + QKV + "    param window: i32\n    mask i - j < window\n"
                    "    return softmax(score) @ v\n}\n", "w.attn")
    (mask,) = spec.masks
    assert (mask.span.file, mask.span.line, mask.span.col, mask.span.end_col) == ("w.attn", 4, 10, 24)
    assert mask.span.line_text == "    mask i - j < window"
    assert mask.rhs.span.col == 18 and mask.lhs.lhs.span.col == 10
    assert spec.span.line == 1 and spec.param("window").span.line == 3
    assert spec.q.span.col == 1 and spec.k.span.col == 22


def test_several_attentions_per_file_and_the_public_api():
    text = "".join(f"attention a{n} {{ {QKV} return softmax(score) @ v }}\n" for n in range(3))
    specs = attnc.parse(text)
    assert [s.name for s in specs] == ["a0", "a1", "a2"]
    assert len({s.key for s in specs}) == 1, "the name labels a variant; the same math shares one key"
    assert attnc.parse_file is parse_file


def test_reserved_words_match_the_grammar():
    assert check.RESERVED == parser.KEYWORDS | {"lse"}


# ---------------------------------------------------------------- printer/grammar agreement on random IR

_NUMS = [0, 1, 7, -3, 0.5, -2.25, 1e-05, 3e20, float("inf"), -float("inf")]


def _random_expr(rng: random.Random, kind: str, depth: int, allow_qk: bool, index_vars=ir.INDEX_VARS):
    """A well-typed random expression; `kind` is 'num' or 'bool'."""
    if depth == 0 or rng.random() < 0.2:
        if kind == "bool":
            return rng.choice([ir.Num(True, False), ir.Num(False, False), ir.ParamRef("flag")])
        leaves = [ir.IndexVar(rng.choice(index_vars)), ir.SizeRef(rng.choice(("M", "N", "D"))),
                  ir.ParamRef(rng.choice(("cap", "w"))), ir.Lookup("s", (ir.IndexVar("h"),))]
        n = rng.choice(_NUMS)
        leaves.append(ir.Num(n, isinstance(n, float)))
        if allow_qk:
            leaves.append(ir.QK())
        return rng.choice(leaves)
    sub = lambda k: _random_expr(rng, k, depth - 1, allow_qk, index_vars)  # noqa: E731
    if kind == "bool":
        choice = rng.randrange(4)
        if choice == 0:
            return ir.Binary(rng.choice(ir.COMPARE_OPS), sub("num"), sub("num"))
        if choice == 1:
            return ir.Binary(rng.choice(ir.LOGIC_OPS), sub("bool"), sub("bool"))
        if choice == 2:
            return ir.Unary("not", sub("bool"))
        return ir.Call("where", (sub("bool"), sub("bool"), sub("bool")))
    choice = rng.randrange(5)
    if choice == 0:
        op = rng.choice(ir.ARITH_OPS)
        if op == "//":  # divides integers only
            return ir.Binary(op, ir.IndexVar(rng.choice(index_vars)), ir.Num(rng.choice((3, -7)), False))
        return ir.Binary(op, sub("num"), sub("num"))
    if choice == 1:
        operand = sub("num")
        return operand if isinstance(operand, ir.Num) else ir.Unary("neg", operand)  # `-3` parses as one literal
    if choice == 2:
        return ir.Call(rng.choice(ops.UNARY_FUNCTIONS), (sub("num"),))
    if choice == 3:
        return ir.Call(rng.choice(("min", "max")), (sub("num"), sub("num")))
    return ir.Call("where", (sub("bool"), sub("num"), sub("num")))


@pytest.mark.parametrize("seed", range(40))
def test_printed_random_expressions_parse_back(seed):
    rng = random.Random(seed)
    q, k, v = (ir.TensorDecl(n, "f16", ("B", "H" if n == "q" else "HKV", "M" if n == "q" else "N", "D"))
               for n in "qkv")
    spec = ir.make_attention(
        "r", q, k, v, inputs=[ir.TensorDecl("s", "f32", ("H",))],
        params=[ir.ParamDecl("cap", "f32", 1.0), ir.ParamDecl("w", "i32"), ir.ParamDecl("flag", "bool", False)],
        score=_random_expr(rng, "num", 5, True), masks=[_random_expr(rng, "bool", 5, False) for _ in range(2)],
        normalizer=ir.Sigmoid() if seed % 4 == 3
        else ir.Softmax(_random_expr(rng, "num", 3, False, ("b", "h", "i")) if seed % 2 else None))
    (again,) = parse(spec.canonical, "random.attn")
    assert again.canonical == spec.canonical
    assert again == spec


def test_line_endings_tabs_and_form_feeds_do_not_matter():
    text = (SPECS[0].parent / "gemma2_local.attn").read_text()
    odd = text.replace("\n", "\r\n").replace("    ", "\t").replace("# rebinding", "\f# rebinding")
    assert parse(odd) == parse(text)
    spec = parse(odd, "odd.attn")[0]
    causal = next(m for m in spec.masks if m == ir.causal_mask())
    for node in ir.walk(causal):
        assert (node.span.line, node.span.col) == (13, 7) and node.span.line_text.startswith("\tmask causal\t")
        assert not node.span.line_text.endswith("\r")
