"""Hostile specs (issue 15): deep nesting, huge literals, constant division by zero, out-of-range constants and
oversized files each give a SpecError placed in the source (file:line:col, the line, a caret), quickly, from
attnc.parse, from `attnc check` and from the decorator; never a RecursionError, lark's VisitError, an
OverflowError or a backend's error."""
import re
import time

import pytest
import torch

import attnc
from attnc import cli
from attnc.dsl import check, parser
from attnc.ir import print_attention as emit_ir

HEAD = "attention a {\n    q: f32[B, H, M, D]\n    k: f32[B, H, N, D]\n    v: f32[B, H, N, D]\n"


def body(*lines: str) -> str:
    """A spec whose own lines start at line 5."""
    return HEAD + "".join(f"    {line}\n" for line in lines) + "    return softmax(score) @ v\n}\n"


DEEP = check.MAX_DEPTH + 1
# (source, line, col, message fragment): the first diagnostic of each.
CASES = {
    "calls": (body("score = " + "abs(" * 600 + "qk" + ")" * 600), 5, 13 + 4 * check.MAX_DEPTH, "nests more than 100"),
    "unary minus": (body("score = " + "-" * 3000 + "qk"), 5, 13 + check.MAX_DEPTH, "nests more than 100"),
    "not": (body("mask " + "not " * 3000 + "i < j"), 5, 10 + 4 * check.MAX_DEPTH, "nests more than 100"),
    "long sum": (body("score = qk" + " + 1" * 5000), 5, 13, "nests more than 100"),
    # the default score, qk * rsqrt(D), is 3 levels deep: the 98th line makes it 101
    "score lines": (body(*["score = score + 1.0"] * DEEP), 5 + check.MAX_DEPTH - 3, 5, "the score nests more than 100"),
    "2^64": (body("score = qk * 18446744073709551616"), 5, 18, "the integer 18446744073709551616 is outside the "
             "64-bit integers"),
    "10^400": (body("score = qk * 1" + "0" * 400), 5, 18, "the integer 100000000000...000000 (401 characters)"),
    "5000 digits": (body("score = qk * 1" + "0" * 5000), 5, 18, "(5001 characters) is outside the 64-bit"),
    "1e400": (body("score = qk * 1e400"), 5, 18, "the number 1e400 is beyond the range of float32"),
    "1e39": (body("score = qk + 1e39"), 5, 18, "the number 1e39 is beyond the range of float32"),
    "param 1e400": (body("param cap: f32 = 1e400"), 5, 22, "beyond the range of float32"),
    "param 10^400": (body("param cap: f32 = 1" + "0" * 400), 5, 22, "outside the 64-bit integers"),
    "dims 2^40": (HEAD.replace("{\n", "{\n    dims D = 1099511627776\n", 1) + "return softmax(score) @ v }",
                  2, 10, "dims D = 1099511627776 is too large"),
    "% 0": (body("mask (i - j) % 0 == 0"), 5, 20, "integer modulo by zero: this divisor is 0"),
    "// 0": (body("score = qk + i // (3 - 3)"), 5, 24, "integer division by zero"),
    "% a dims size minus itself": (HEAD.replace("{\n", "{\n    dims D = 16\n", 1)
                                   + "mask (i - j) % (D - 16) == 0\nreturn softmax(score) @ v }", 6, 17,
                                   "integer modulo by zero"),
    "int64 overflow": (body("score = qk + 9223372036854775807 * 2"), 5, 18, "this constant is 18446744073709551614"),
    "2^63 unnegated": (body("score = qk * 9223372036854775808"), 5, 18, "the integer 9223372036854775808 is outside"),
}


@pytest.mark.parametrize("name", CASES)
def test_hostile_specs_give_a_placed_spec_error(name):
    text, line, col, message = CASES[name]
    start = time.perf_counter()
    with pytest.raises(attnc.SpecError) as err:
        attnc.parse(text, filename="bad.attn")
    assert time.perf_counter() - start < 2.0
    first = str(err.value).split("\n")
    assert first[0].startswith(f"bad.attn:{line}:{col}: "), first[0]
    assert message in first[0]
    assert first[2].strip().startswith("^") and first[2].index("^") == col - 1 + 4  # under the column


def test_attnc_check_reports_hostile_files_without_a_traceback(tmp_path, capsys):
    paths = []
    for name, (text, *_rest) in CASES.items():
        paths.append(tmp_path / f"{len(paths)}.attn")
        paths[-1].write_text(text)
    assert cli.main(["check", *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert {int(n) for n in re.findall(r"/(\d+)\.attn:\d+:\d+: ", err)} == set(range(len(CASES)))


def test_the_limits_leave_room_for_real_specs():
    """99 levels of calls and 45 lines of `score = score * 0.5 + qk` parse; powers and division by non-zero
    constants, the largest 64-bit integer and float32 value are fine, and a float `/ 0` is inf as in the reference."""
    attnc.parse(body("score = " + "abs(" * (check.MAX_DEPTH - 1) + "qk" + ")" * (check.MAX_DEPTH - 1)))
    attnc.parse(body(*["score = score * 0.5 + qk"] * 45))
    spec = attnc.parse(body("score = qk + 9223372036854775807 // 4611686018427387904 + 3.4e38 * 0.0 + i % 7 "
                            "+ (j // (3 - 2)) + 1.0 / 0", "mask (i - j) % (2 - 1) == 0"))[0]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    assert torch.isnan(attnc.reference(spec, q, k, v)).all()  # inf - inf in the softmax


def test_the_least_int64_reads_back_as_written():
    """-2^63 is a literal (its digits alone are past int64): the canonical text writes it so and reads back to the same
    key, from a spec and from the decorator (`s // -2**63`, found by the spec fuzzer, seed 9 mutant 11211)."""
    spec = attnc.parse(body("score = floor(qk * rsqrt(D) / -9223372036854775808) + (i - -9223372036854775808) % 3"))[0]
    text = emit_ir(spec)
    assert "-9223372036854775808" in text and attnc.parse(text)[0].key == spec.key

    def least(q, k, v):
        return attnc.softmax((q @ k) * q.D ** -0.5 // -2**63) @ v

    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    traced = attnc.attention(least).trace(q, k, v)
    assert attnc.parse(emit_ir(traced))[0].key == traced.key


def test_oversized_files_are_refused_before_parsing(tmp_path):
    big = tmp_path / "big.attn"
    big.write_text("# padding\n" * (parser.MAX_SPEC_BYTES // 10 + 1))
    start = time.perf_counter()
    with pytest.raises(attnc.SpecError, match=r"big.attn: the file is too large for a spec \(1,048,\d+ bytes; at most "
                                              r"1,048,576\)"):
        attnc.parse_file(big)
    many = body(*["mask i - j < 3"] * (parser.MAX_SPEC_TOKENS // 5))
    with pytest.raises(attnc.SpecError, match=r"<string>: the spec is too long \(2\d,\d+ words and symbols; at most "
                                              r"20,000\): split it"):
        attnc.parse(many)
    assert time.perf_counter() - start < 2.0
    attnc.parse(body(*["mask i - j < 3"] * (parser.MAX_SPEC_TOKENS // 7)))  # under the cap: parses


def test_the_decorator_reports_hostile_python_at_the_line():
    q = torch.randn(1, 1, 4, 8)

    def huge_default(q, k, v, *, cap: float = 10**400):
        return attnc.softmax((q @ k) / cap) @ v

    def deep(q, k, v):
        s = q @ k
        for _ in range(3000):
            s = s + 1.0
        return attnc.softmax(s) @ v

    def huge_literal(q, k, v):
        return attnc.softmax((q @ k) * 2**64) @ v

    def modulo_zero(q, k, v):
        return attnc.softmax((q @ k) + (q.pos % 0)) @ v

    for fn, message in ((huge_default, "param 'cap': the integer 100000000000...000000 (401 characters)"),
                        (deep, "this expression nests 3001 levels deep, more than 100"),
                        (huge_literal, "the integer 18446744073709551616 is outside"),
                        (modulo_zero, "integer modulo by zero")):
        with pytest.raises(attnc.SpecError) as err:
            attnc.attention(fn).trace(q, q, q)
        assert message in str(err.value) and "test_limits.py:" in str(err.value)
    with pytest.raises(attnc.CallError, match="scale: the integer 1000"):
        attnc.flex_attention(q, q, q, scale=10**30)


def test_int64_least_value_prints_as_text_that_parses():
    """-2**63 is an int64, but its digits without the sign are not: the canonical text writes it as a difference
    (a decorator's `s * -2**63` once printed text the parser refused)."""
    from attnc import ir

    text = ir.format_number(-2**63, False)
    spec = attnc.parse(f"""attention a {{
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    score = qk * {text}
    return softmax(score) @ v
}}""")[0]
    assert attnc.parse(spec.canonical)[0].key == spec.key
    assert ir.format_number(-2**63 + 1, False) == "-9223372036854775807"
