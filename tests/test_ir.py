from attnc.errors import Span
from attnc.ir import (
    Binary, Call, IndexVar, Lookup, Num, ParamDecl, QK, SizeRef, TensorDecl, causal_mask, make_attention,
    print_expr,
)


def _qkv(layout=("B", "H", "M", "D"), kv=("B", "HKV", "N", "D")):
    return TensorDecl("q", "bf16", layout), TensorDecl("k", "bf16", kv), TensorDecl("v", "bf16", kv)


def test_spans_do_not_change_equality_or_key():
    here = Span("a.attn", 3, 5, 3, 9, "    mask causal")
    a = make_attention("x", *_qkv(), masks=[causal_mask()])
    b = make_attention("x", *_qkv(), masks=[Binary(">=", IndexVar("i", span=here), IndexVar("j"))])
    c = make_attention("x", *_qkv(), masks=[Binary(">=", IndexVar("i"), IndexVar("j"))])
    assert b == c and hash(b) == hash(c) and b.key == c.key
    assert a != b and a.key != b.key


def test_masks_are_split_deduplicated_and_sorted():
    w = Binary("<", Binary("-", IndexVar("i"), IndexVar("j")), Num(128, False))
    one = make_attention("x", *_qkv(), masks=[Binary("and", causal_mask(), w)])
    two = make_attention("x", *_qkv(), masks=[w, causal_mask(), w])
    assert one == two and len(one.masks) == 2


def test_int_and_float_literals_differ():
    assert Num(1, False) != Num(1.0, True)


def test_printer_precedence():
    e = Binary("*", Binary("+", QK(), Num(1.0, True)), Call("rsqrt", (SizeRef("D"),)))
    assert print_expr(e) == "(qk + 1.0) * rsqrt(D)"
    e = Binary("-", IndexVar("i"), Binary("-", IndexVar("j"), Num(-2, False)))
    assert print_expr(e) == "i - (j - -2)"
    assert print_expr(Lookup("t", (IndexVar("h"), IndexVar("i")))) == "t[h, i]"


def test_params_and_inputs_sorted_for_key():
    p1, p2 = ParamDecl("cap", "f32", 50.0), ParamDecl("window", "i32", 4096)
    a = make_attention("x", *_qkv(), params=[p1, p2])
    b = make_attention("x", *_qkv(), params=[p2, p1])
    assert a.key == b.key
    assert "param cap: f32 = 50.0" in a.canonical and "param window: i32 = 4096" in a.canonical


def test_name_is_a_label_not_part_of_the_key():
    a = make_attention("one", *_qkv(), masks=[causal_mask()])
    b = make_attention("two", *_qkv(), masks=[causal_mask()])
    assert a != b and a.key == b.key and a.canonical != b.canonical


def test_true_and_one_are_different_literals():
    """Python's True == 1; the IR's literals differ, so a memo keyed by node never gives one for the other."""
    from attnc.ir import Num

    assert Num(True, False) != Num(1, False) and Num(1, False) != Num(1.0, True)
    assert len({Num(True, False): 0, Num(1, False): 1}) == 2
