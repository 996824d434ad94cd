"""Malformed specs: each gives a SpecError at the exact place, with the source line, a caret and a message
that says what is wrong; several problems are reported together."""
import pytest

from attnc import ir
from attnc.dsl.check import attention_diagnostics, check_attention
from attnc.dsl.parser import parse, parse_file
from attnc.errors import AttncError, SpecError

HEAD = "attention a {\n    q: f16[B, H, M, D]\n    k: f16[B, HKV, N, D]\n    v: f16[B, HKV, N, D]\n"
RET = "    return softmax(score) @ v\n}\n"


def body(*lines: str) -> str:
    """A spec whose own lines start at line 5."""
    return HEAD + "".join(f"    {line}\n" for line in lines) + RET


def qkv(q="f16[B, H, M, D]", k="f16[B, H, N, D]", v="f16[B, H, N, D]") -> str:
    """A spec whose q, k, v are on lines 2, 3, 4."""
    return f"attention a {{\n    q: {q}\n    k: {k}\n    v: {v}\n" + RET


# (source, line, col, caret, message fragment): the first diagnostic of each.
CORPUS = [
    # -- syntax
    ("attention a {", 1, 14, "^", "unexpected end of file; expected a statement"),
    ("attention a {\n    score = qk *\n}\n", 3, 1, "^", "unexpected '}'; expected an expression"),
    (body("mask i < j < 3"), 5, 16, "^", "comparisons do not chain"),
    (body("mask i $ j"), 5, 12, "^", "unexpected character '$'"),
    (body("mask i < j && j > 0"), 5, 16, "^", "unexpected character '&'; write `and`"),
    (body("score = qk * rsqrt(D) +"), 6, 5, "^^^^^^", "unexpected 'return'; expected an expression"),
    (body("param mask: f32"), 5, 11, "^^^^", "'mask' is a reserved word"),
    ("attention a {\n    q: f16\n}\n", 3, 1, "^", "unexpected '}'; expected '['"),
    (body("mask (i < j"), 6, 5, "^^^^^^", "unexpected 'return'; expected ')'"),
    (HEAD + "    return softmax(score) @ v\n", 5, 30, "^", "unexpected end of file; expected"),
    # -- names
    (body("param window: i32", "mask i - j < windw"), 6, 18, "^^^^^", "unknown name 'windw'; did you mean 'window'?"),
    (body("score = tanhh(qk)"), 5, 13, "^^^^^^^^^", "unknown function 'tanhh'; did you mean 'tanh'?"),
    (body("mask bias[h] > 0"), 5, 10, "^^^^^^^", "unknown tensor 'bias'; declare it with `input bias"),
    (body("mask q[b, h, i, 0] > 0"), 5, 10, "^^^^^^^^^^^^^", "q cannot be indexed in an expression: use qk"),
    (body("score = qk + lse"), 5, 18, "^^^", "lse is an output"),
    (body("score = qk + v"), 5, 18, "^", "v can be used only in `return softmax(score) @ v`"),
    (body("mask score > 0"), 5, 10, "^^^^^", "`score` can be used only on the right of `score = ...`"),
    (body("input slopes: f32[H]", "score = qk + slopes"), 6, 18, "^^^^^^", "slopes is a tensor: index it"),
    (body("mask j <= i + DV"), 5, 19, "^^", "size DV appears in no tensor shape and no `dims`"),
    # -- declarations
    (qkv(q="bfloat16[B, H, M, D]"), 2, 5, "^" * 23, "unknown dtype 'bfloat16' for q; expected one of f16, bf16, f32; "
                                                      "did you mean 'bf16'?"),
    (body("param cap: f23 = 3.0"), 5, 5, "^" * 20, "unknown dtype 'f23' for param cap"),
    (body("input doc: i32[B, N]", "input x: i33[H]"), 6, 5, "^" * 15, "unknown dtype 'i33' for input x"),
    ("attention a {\n    k: f16[B, H, N, D]\n    v: f16[B, H, N, D]\n" + RET, 1, 11, "^",
     "attention a declares no q; add e.g. `q: bf16[B, H, M, D]`"),
    (qkv(q="f16[B, H, M]"), 2, 5, "^" * 15, "q's shape lacks its head dim size D"),
    (qkv(q="f16[B, H, M, M]"), 2, 5, "^" * 18, "q's shape has two sequence sizes, M and M"),
    (qkv(k="f16[B, H, N, X]"), 3, 5, "^" * 18, "k's shape may hold only the roles B, H, HKV, N, D, not 'X'"),
    (qkv(k="f16[B, N, H, D]", v="f16[B, N, H, D]"), 3, 5, "^" * 18, "k's layout [B, N, H, D] differs from q's"),
    (qkv(k="f16[B, HKV, N, D]"), 4, 5, "^" * 18, "v's head size is H but k's is HKV"),
    (qkv(v="bf16[B, H, N, D]"), 4, 5, "^" * 19, "v is bf16 but q is f16: q, k and v must share one dtype"),
    (body("param x: f32", "input x: f32[H]"), 6, 5, "^" * 15, "'x' is declared twice (first as a param)"),
    (body("param i: i32"), 5, 5, "^" * 12, "'i' is an index variable and cannot name a param"),
    (body("input D: f32[H]"), 5, 5, "^" * 15, "'D' is a size role and cannot name an input"),
    (body("param R: i32", "input t: f32[R]"), 6, 5, "^" * 15, "'R' names both a size and a param"),
    (body("extra: f32[H]"), 5, 5, "^^^^^", "declare the extra tensor as `input extra: ...`"),
    (body("input q: f16[B, H, M, D]"), 5, 11, "^", "q is one of q, k, v: declare it without `input`"),
    (body("param w: i32 = 1.5"), 5, 5, "^" * 18, "param w: i32 cannot default to 1.5"),
    (body("param w: bool = 3"), 5, 5, "^" * 17, "param w: bool cannot default to 3"),
    (body("param w: i32 = 3000000000"), 5, 5, "^" * 25, "does not fit in i32"),
    (body("param w: f32 = D"), 5, 20, "^", "the default of param w must be a literal"),
    ("attention a {\n    dims D = 64, D = 128\n" + HEAD.split("{\n", 1)[1] + RET, 2, 18, "^", "dims binds D twice"),
    ("attention a {\n    dims D = 0\n" + HEAD.split("{\n", 1)[1] + RET, 2, 14, "^",
     "dims D must be a positive integer"),
    ("attention a {\n    dims D = 6.5\n" + HEAD.split("{\n", 1)[1] + RET, 2, 14, "^^^", "positive integer, not 6.5"),
    ("attention a {\n    dims DV = 64\n" + HEAD.split("{\n", 1)[1] + RET, 2, 10, "^^",
     "dims uses DV, but no shape of q, k or v does"),
    # -- types
    (body("mask i - j"), 5, 10, "^^^^^", "a mask must be a boolean condition, but this is an integer"),
    (body("score = i < j"), 5, 13, "^^^^^", "the score must be a number, but this is a boolean"),
    (body("mask i and j > 0"), 5, 10, "^", "`and` needs booleans, but this is an integer"),
    (body("mask not i"), 5, 14, "^", "`not` needs booleans"),
    (body("score = qk + (i < j)"), 5, 19, "^^^^^", "`+` needs numbers, but this is a boolean"),
    (body("score = qk // 2"), 5, 13, "^^", "`//` needs integers, but this is a float (it divides integers, "
                                           "rounding down; for numbers with a fraction write floor(a / b))"),
    (body("score = where(i, qk, 0.0)"), 5, 19, "^", "where's condition needs booleans"),
    (body("score = where(i < j, qk, true)"), 5, 13, "^" * 22, "where's branches must both be numbers or both"),
    (body("mask (i < j) == 1"), 5, 10, "^" * 12, "`==` compares a boolean with an integer"),
    (body("score = tanh(qk, 2)"), 5, 13, "^" * 11, "tanh takes 1 argument, got 2"),
    (body("score = max(qk)"), 5, 13, "^" * 7, "max takes 2 arguments, got 1"),
    (body("input s: f32[H]", "score = qk + s[h, i]"), 6, 18, "^" * 7, "s has 1 dimension [H] but 2 indices are given"),
    (body("input s: f32[H]", "score = qk + s[1.5]"), 6, 20, "^^^", "an index must be an integer, but this is a float"),
    (body("input s: f32[H]", "score = qk + s[i < j]"), 6, 20, "^^^^^", "an index must be an integer, but this is a bo"),
    (body("mask qk > 0"), 5, 10, "^^", "a mask cannot depend on qk"),
    (body("input s: f32[H]") .replace(RET, "    return softmax(score, sink=s[j]) @ v\n}\n"), 6, 34, "^",
     "cannot depend on the key position j"),
    (body("param f: bool") .replace(RET, "    return softmax(score, sink=f) @ v\n}\n"), 6, 32, "^",
     "the sink must be a number, but this is a boolean"),
    # -- the return
    (HEAD + "    return sigmod(score) @ v\n}\n", 5, 12, "^^^^^^", "unknown normalizer 'sigmod'; the normalizer is "
     "`softmax(score)` or `sigmoid(score)`; did you mean 'sigmoid'?"),
    (HEAD + "    return sigmoid(score, sink=0.5) @ v\n}\n", 5, 32, "^^^", "sigmoid takes no sink"),
    (HEAD + "    return sigmoid(score, bias=0.5) @ v\n}\n", 5, 32, "^^^", "sigmoid takes no sink"),
    (HEAD + "    return softmax(score) @ k\n}\n", 5, 29, "^", "write `@ v`, not `@ k`"),
    (HEAD + "    return softmax(score) @ v, lsee\n}\n", 5, 32, "^^^^", "the only second output is lse"),
    (HEAD + "    return softmax(score, sinks=1.0) @ v\n}\n", 5, 27, "^^^^^", "softmax takes `sink=...`"),
    (HEAD + "    mask i >= j\n}\n", 1, 11, "^", "attention a has no return"),
    (HEAD + "    return softmax(score) @ v\n    mask i > j\n}\n", 6, 5, "^" * 10, "a statement after `return`"),
    (HEAD + "    return softmax(score) @ v\n    return softmax(score) @ v\n}\n", 6, 5, "^" * 25,
     "a second `return`"),
    # -- files
    ("", 1, 1, None, "no `attention NAME { ... }` block"),
    ("# just a comment\n\n", 1, 1, "^", "no `attention NAME { ... }` block"),
    (body() + body(), 7, 11, "^", "a second attention named 'a' (the first is on line 1)"),
    ("attention a { q: f16[B, H, M, D] \x00 }", 1, 34, "^", "this looks like a binary file"),
]


@pytest.mark.parametrize("source, line, col, caret, fragment", CORPUS,
                         ids=[f"{n}-{c[4][:30]}" for n, c in enumerate(CORPUS)])
def test_error_corpus(source, line, col, caret, fragment):
    with pytest.raises(SpecError) as info:
        parse(source, "bad.attn")
    first = info.value.diagnostics[0]
    head, *rest = first.format().split("\n")
    assert head.startswith(f"bad.attn:{line}:{col}: "), head
    assert fragment in head, head
    if caret is None:  # an empty file has no line to show
        assert rest == []
        return
    source_line = source.splitlines()[line - 1] if source.splitlines() else ""
    assert rest == [f"    {source_line}", "    " + " " * (col - 1) + caret]
    assert str(info.value).startswith(head) and isinstance(info.value, AttncError)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 20


def test_all_problems_are_reported_at_once_in_source_order():
    source = qkv(q="f17[B, H, M, D]") + "\n" + body("param w: i32 = 1.5", "mask i - j", "score = tanhh(qk)")
    source = source.replace("attention a {", "attention b {", 1)
    with pytest.raises(SpecError) as info:
        parse(source, "many.attn")
    places = [(d.span.line, d.span.col) for d in info.value.diagnostics]
    assert places == sorted(places) and len(places) == 4
    messages = str(info.value)
    for fragment in ("unknown dtype 'f17'", "cannot default to 1.5", "a mask must be a boolean", "'tanhh'"):
        assert fragment in messages


def test_one_mistake_is_reported_once():
    # the unknown name is inlined into later score lines but reported once, with no follow-on type errors
    with pytest.raises(SpecError) as info:
        parse(body("score = qk * scal", "score = score + score", "score = tanh(score) > 0 and true"), "once.attn")
    assert [d.message for d in info.value.diagnostics] == ["unknown name 'scal'"]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.attn"
    path.write_bytes(b"attention a {\n    # caf\xe9 au lait\n}\n")
    with pytest.raises(SpecError) as info:
        parse_file(path)
    head, shown, caret = str(info.value).split("\n")
    assert head == f"{path}:2:10: this file is not UTF-8 text (byte 0xe9); save it as UTF-8"
    assert shown == "    " + "    # caf\ufffd au lait" and caret == "    " + " " * 9 + "^"


@pytest.mark.parametrize("data, line, col, fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, 1, "not UTF-8 text (byte 0x89)"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", 1, 8, "this looks like a binary file"),
])
def test_binary_garbage(tmp_path, data, line, col, fragment):
    path = tmp_path / "garbage.attn"
    path.write_bytes(data)
    with pytest.raises(SpecError) as info:
        parse_file(path)
    head = str(info.value).split("\n")[0]
    assert head.startswith(f"{path}:{line}:{col}: ") and fragment in head


def test_unreadable_paths(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        parse_file(tmp_path / "missing.attn")
    with pytest.raises(SpecError, match="is a directory"):
        parse_file(tmp_path)


# ---------------------------------------------------------------- IR built by other front-ends


def _qkv_decls(dtype="f16"):
    return (ir.TensorDecl("q", dtype, ("B", "H", "M", "D")), ir.TensorDecl("k", dtype, ("B", "HKV", "N", "D")),
            ir.TensorDecl("v", dtype, ("B", "HKV", "N", "D")))


def test_check_attention_accepts_a_good_spec_and_reports_a_bad_one():
    good = ir.make_attention("g", *_qkv_decls(), params=[ir.ParamDecl("w", "i32", 8)],
                             inputs=[ir.TensorDecl("s", "f32", ("H",))],
                             score=ir.Binary("+", ir.QK(), ir.Lookup("s", (ir.IndexVar("h"),))),
                             masks=[ir.Binary("<", ir.IndexVar("j"), ir.ParamRef("w"))])
    check_attention(good)
    bad = ir.make_attention(
        "b", *_qkv_decls(), params=[ir.ParamDecl("score", "f32"), ir.ParamDecl("n", "i64")],
        score=ir.Binary("<", ir.QK(), ir.ParamRef("missing")),
        masks=[ir.Lookup("k", (ir.IndexVar("b"), ir.IndexVar("h"), ir.IndexVar("j"), ir.Num(0, False))),
               ir.Binary(">", ir.SizeRef("R"), ir.IndexVar("i"))],
        dims=[("D", -1)])
    messages = [d.message for d in attention_diagnostics(bad)]
    for fragment in ("'score' is a reserved word", "param n cannot have dtype 'i64'", "unknown param 'missing'",
                     "k cannot be indexed", "size 'R' appears in no tensor shape", "dims D must be a positive"):
        assert any(fragment in m for m in messages), (fragment, messages)
    with pytest.raises(SpecError):
        check_attention(bad)
