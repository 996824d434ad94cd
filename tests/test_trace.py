"""The @attnc.attention decorator: traced specs against hand-built IR, the text language and (in
test_flex.py) flex mods; tracing errors point at the user's line; traced specs compute the right numbers."""
from __future__ import annotations  # annotations are strings here: the decorator must resolve them

import importlib
import inspect
import math

import pytest
import torch

import attnc
from attnc.errors import CallError, TraceError
from attnc.ir import (
    QK, Binary, Call, IndexVar, Lookup, Num, ParamDecl, ParamRef, TensorDecl, causal_mask,
    default_score, make_attention,
)


def qkv(B=2, H=4, HKV=None, M=5, N=7, D=16, DV=None, dtype=torch.float32, layout="BHSD"):
    def shaped(heads, seq, dim):
        shape = (B, heads, seq, dim) if layout == "BHSD" else (B, seq, heads, dim)
        return torch.randn(shape, dtype=dtype)
    return shaped(H, M, D), shaped(HKV or H, N, D), shaped(HKV or H, N, DV or D)


def decls(dtype="f32", heads="H", dim="D"):
    return (TensorDecl("q", dtype, ("B", "H", "M", "D")), TensorDecl("k", dtype, ("B", heads, "N", "D")),
            TensorDecl("v", dtype, ("B", heads, "N", dim)))


def line_of(fn, needle: str) -> int:
    """The file line of the first source line of `fn` containing `needle`."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(n for n, text in enumerate(lines) if needle in text)


def assert_points_at(err: pytest.ExceptionInfo, fn, needle: str) -> None:
    """The error names this file and the line of `fn` holding `needle`, with a caret line under it."""
    text = str(err.value)
    assert text.startswith(f"{__file__}:{line_of(fn, needle)}:"), text
    source, caret = text.splitlines()[1:3]
    assert needle in source and set(caret.strip()) == {"^"}, text


# ---------------------------------------------------------------- traced IR


def test_default_scale_is_the_text_default():
    @attnc.attention
    def dense(q, k, v):
        return attnc.softmax((q @ k) * q.D ** -0.5) @ v

    spec = dense.trace(*qkv())
    assert spec == make_attention("dense", *decls(), score=default_score())
    assert spec.score == default_score()


def test_alibi_doc_example_of_the_design():
    @attnc.attention
    def alibi_doc(q, k, v, *, slopes: attnc.Tensor, doc: attnc.Tensor, cap: float = 50.0):
        s = (q @ k) * q.D ** -0.5
        s = cap * attnc.tanh(s / cap) + slopes[q.head] * (k.pos - q.pos)
        keep = attnc.causal(q, k) & (doc[q.batch, q.pos] == doc[k.batch, k.pos])
        return attnc.softmax(s, where=keep) @ v

    q, k, v = qkv()
    spec = alibi_doc.trace(q, k, v, slopes=torch.randn(4), doc=torch.zeros(2, 7, dtype=torch.int32))
    i, j, b, h = (IndexVar(n) for n in "ijbh")
    cap = ParamRef("cap")
    score = Binary("+", Binary("*", cap, Call("tanh", (Binary("/", default_score(), cap),))),
                   Binary("*", Lookup("slopes", (h,)), Binary("-", j, i)))
    doc_mask = Binary("==", Lookup("doc", (b, i)), Lookup("doc", (b, j)))
    want = make_attention(
        "alibi_doc", *decls(), params=[ParamDecl("cap", "f32", 50.0)],
        inputs=[TensorDecl("slopes", "f32", ("H",)), TensorDecl("doc", "i32", ("B", "N"))],
        score=score, masks=[causal_mask(), doc_mask])
    assert spec == want and spec.key == want.key
    assert attnc.parse(spec.canonical)[0] == spec  # prints to text that parses back


def test_signature_gives_hkv_dv_layout_and_dtypes():
    @attnc.attention(layout="BSHD")
    def plain(q, k, v):
        return attnc.softmax(q @ k) @ v

    spec = plain.trace(*qkv(H=4, HKV=2, DV=8, dtype=torch.float16, layout="BSHD"))
    assert spec.q == TensorDecl("q", "f16", ("B", "M", "H", "D"))
    assert spec.k == TensorDecl("k", "f16", ("B", "N", "HKV", "D"))
    assert spec.v == TensorDecl("v", "f16", ("B", "N", "HKV", "DV"))
    assert spec.score == QK()


def test_params_keep_kinds_and_defaults():
    @attnc.attention
    def scaled(q, k, v, *, scale: float = 2, window: int = 64, flip: bool = False, bias: float):
        s = attnc.where(flip, -(q @ k), q @ k) * scale + bias
        return attnc.softmax(s, where=q.pos - k.pos < window) @ v

    spec = scaled.trace(*qkv())
    assert spec.params == (ParamDecl("bias", "f32"), ParamDecl("flip", "bool", False),
                           ParamDecl("scale", "f32", 2.0), ParamDecl("window", "i32", 64))
    assert isinstance(spec.param("scale").default, float)
    assert spec.masks == (Binary("<", Binary("-", IndexVar("i"), IndexVar("j")), ParamRef("window")),)


@pytest.mark.parametrize("index, shape", [
    (lambda q, k, t: t[q.head, q.pos], ("H", "M")),
    (lambda q, k, t: t[q.batch, q.head], ("B", "H")),
    (lambda q, k, t: t[q.batch, k.pos], ("B", "N")),
    (lambda q, k, t: t[q.head, q.pos] + t[q.head, k.pos], ("H", "N")),  # both positions: the longer
    # A dim indexed by an expression anywhere has its own size (a relative-bias table holds M + N - 1 entries).
    (lambda q, k, t: t[q.pos - k.pos + k.N - 1, q.head % 2], ("t_0", "t_1")),
    (lambda q, k, t: t[3, q.batch + q.head], ("t_0", "t_1")),
    (lambda q, k, t: t[q.head, q.pos] + t[q.head, q.pos + 1], ("H", "t_1")),
])
def test_input_dims_are_named_by_their_indices(index, shape):
    """Only a bare index variable gives a dim its role's size; every other dim is free."""
    @attnc.attention
    def lookup(q, k, v, *, t: attnc.Tensor):
        return attnc.softmax(q @ k + index(q, k, t)) @ v

    spec = lookup.trace(*qkv(), t=torch.randn(3, 4))
    assert spec.input("t").shape == shape


def test_same_dim_indexed_by_both_positions_is_n():
    @attnc.attention
    def doc(q, k, v, *, ids: attnc.Tensor):
        return attnc.softmax(q @ k, where=ids[q.batch, q.pos] == ids[k.batch, k.pos]) @ v

    assert doc.trace(*qkv(), ids=torch.zeros(2, 7, dtype=torch.int64)).input("ids") == \
        TensorDecl("ids", "i64", ("B", "N"))


def test_operators_trace_to_their_ir():
    @attnc.attention
    def ops(q, k, v):
        s = q @ k
        s = attnc.maximum(attnc.minimum(s, 3.0), -3) + abs(s) - attnc.exp2(s) % 2 + s ** 0.5
        keep = ~(q.pos < k.pos) | (q.pos == 0)
        return attnc.softmax(s, where=keep, sink=attnc.log(q.H + 0.5)) @ v, None

    with pytest.raises(TraceError):  # the trailing None is not lse
        ops.trace(*qkv())

    @attnc.attention
    def ops(q, k, v):  # noqa: F811 - the same body, returning lse
        s = q @ k
        s = attnc.maximum(attnc.minimum(s, 3.0), -3) + abs(s) - attnc.exp2(s) % 2 + s ** 0.5
        keep = ~(q.pos < k.pos) | (q.pos == 0)
        p = attnc.softmax(s, where=keep, sink=attnc.log(q.H + 0.5))
        return p @ v, p.lse

    spec = ops.trace(*qkv())
    assert spec.canonical.splitlines()[4:] == [
        "    score = max(min(qk, 3.0), -3) + abs(qk) - exp2(qk) % 2 + sqrt(qk)",
        "    mask not i < j or i == 0",
        "    return softmax(score, sink=log(H + 0.5)) @ v, lse",
        "}",
    ]
    assert attnc.parse(spec.canonical)[0] == spec


def test_traced_once_per_signature():
    traces = []

    @attnc.attention
    def counted(q, k, v, *, t: attnc.Tensor):
        traces.append(1)
        return attnc.softmax(q @ k + t[q.head]) @ v

    q, k, v = qkv()
    t = torch.randn(4)
    first = counted.trace(q, k, v, t=t)
    assert counted.trace(*qkv(), t=torch.randn(4)) is first and len(traces) == 1
    half = counted.trace(*(x.half() for x in (q, k, v)), t=t)
    assert len(traces) == 2 and half.q.dtype == "f16" and counted.spec is half
    assert counted.trace(*qkv(HKV=2), t=t).is_gqa_shape and len(traces) == 3
    assert counted.trace(q, k, v, t=t.double()).input("t").dtype == "f64" and len(traces) == 4
    assert counted.trace(q, k, v, t=t) is first and len(traces) == 4


def test_globals_are_constants_and_names_come_from_the_function():
    @attnc.attention
    def windowed(q, k, v):
        return attnc.softmax(q @ k, where=(q.pos - k.pos < WINDOW) & (q.pos >= k.pos)) @ v

    spec = windowed.trace(*qkv())
    assert spec.name == "windowed"
    assert Binary("<", Binary("-", IndexVar("i"), IndexVar("j")), Num(WINDOW, False)) in spec.masks


WINDOW = 3


# ---------------------------------------------------------------- errors point at the user's line


def traced_error(fn, *args, **kwargs) -> pytest.ExceptionInfo:
    with pytest.raises(TraceError) as err:
        attnc.attention(fn).trace(*(args or qkv()), **kwargs)
    return err


def test_if_on_a_traced_value():
    def branchy(q, k, v):
        s = q @ k
        if s > 0:
            s = s * 2
        return attnc.softmax(s) @ v

    err = traced_error(branchy)
    assert_points_at(err, branchy, "if s > 0")
    assert "attnc.where" in str(err.value) and "`&`" in str(err.value)


def test_and_keyword_on_conditions():
    def window(q, k, v):
        keep = (q.pos >= k.pos) and (q.pos - k.pos < 4)
        return attnc.softmax(q @ k, where=keep) @ v

    assert_points_at(traced_error(window), window, "and (q.pos")


@pytest.mark.parametrize("power", [2, 0.25, -1])
def test_unsupported_power(power):
    def powered(q, k, v):
        return attnc.softmax((q @ k) ** power) @ v

    err = traced_error(powered)
    assert_points_at(err, powered, "** power")
    assert "x * x" in str(err.value)


def test_python_math_on_a_traced_value():
    def mathy(q, k, v):
        return attnc.softmax(math.tanh(q @ k)) @ v

    err = traced_error(mathy)
    assert_points_at(err, mathy, "math.tanh")
    assert "attnc.exp/attnc.tanh" in str(err.value)


@pytest.mark.parametrize("body, needle, words", [
    ("attnc.softmax(q @ k + k.head) @ v", "k.head", "use q.head"),
    ("attnc.softmax(q @ k + q.shape) @ v", "q.shape", "available:"),
    ("attnc.softmax(k @ q) @ v", "k @ q", "only q @ k"),
    ("attnc.softmax(q @ k) @ q", "@ q", "@ v"),
    ("attnc.softmax(q @ k, where=q.pos - k.pos) @ v", "where=", "takes a condition"),
    ("attnc.softmax(q @ k, where=(q.pos & k.pos) > 0) @ v", "q.pos & k.pos", "bitwise"),
    ("attnc.softmax(q @ k + torch.tanh(q @ k)) @ v", "torch.tanh", None),
])
def test_misuse_inside_the_function(body, needle, words):
    scope = {"attnc": attnc, "torch": torch}
    source = f"def misuse(q, k, v):\n    return {body}\n"
    exec(compile(source, "<misuse>", "exec"), scope)
    fn = scope["misuse"]
    if words is None:  # torch functions on traced values work in the decorator too
        assert attnc.attention(fn).trace(*qkv()).score == Binary("+", QK(), Call("tanh", (QK(),)))
        return
    with pytest.raises(TraceError) as err:
        attnc.attention(fn).trace(*qkv())
    assert words in str(err.value)


def test_misuse_points_at_the_line():
    def headless(q, k, v):
        s = q @ k
        s = s + k.head
        return attnc.softmax(s) @ v

    assert_points_at(traced_error(headless), headless, "k.head")


def test_exception_in_user_code_names_its_line():
    def broken(q, k, v):
        table = {}
        return attnc.softmax(q @ k + table["missing"]) @ v

    err = traced_error(broken)
    assert_points_at(err, broken, 'table["missing"]')
    assert "KeyError" in str(err.value)


def test_wrong_return_points_at_def():
    def no_softmax(q, k, v):
        return q @ k

    err = traced_error(no_softmax)
    assert str(err.value).startswith(f"{__file__}:{line_of(no_softmax, 'def no_softmax')}:")
    assert "p @ v" in str(err.value)


@pytest.mark.parametrize("signature, words", [
    ("q, k, v, extra", "keyword-only"),
    ("q, k, v, *args", "keyword-only"),
    ("q, k, v, *, t", "needs an annotation"),
    ("q, k, v, *, t: attnc.Tensor = None", "cannot have a default"),
    ("q, k, v, *, n: int = 2.5", "defaults to 2.5"),
    ("q, k, v, *, flag: bool = 1", "defaults to 1"),
])
def test_bad_signatures(signature, words):
    scope = {"attnc": attnc}
    exec(f"def f({signature}):\n    return attnc.softmax(q @ k) @ v\n", scope)
    with pytest.raises(TraceError, match=words):
        attnc.attention(scope["f"])


def test_reserved_param_names_are_spec_errors():
    @attnc.attention
    def f(q, k, v, *, D: float = 1.0):
        return attnc.softmax(q @ k * D) @ v

    with pytest.raises(attnc.SpecError, match="'D' is a size role"):
        f.trace(*qkv())


# ---------------------------------------------------------------- call errors


def test_call_errors_name_the_argument():
    @attnc.attention
    def biased(q, k, v, *, bias: attnc.Tensor):
        return attnc.softmax(q @ k + bias[q.head]) @ v

    q, k, v = qkv()
    with pytest.raises(CallError, match="biased.spec: not traced yet"):
        biased.spec
    with pytest.raises(CallError, match="bias: missing input tensor"):
        biased.trace(q, k, v)
    with pytest.raises(CallError, match="bias: expected a torch.Tensor, got list"):
        biased.trace(q, k, v, bias=[1.0])
    with pytest.raises(CallError, match="basis: unknown argument"):
        biased.trace(q, k, v, bias=torch.randn(4), basis=1)
    with pytest.raises(CallError, match="k: expected a 4-dim"):
        biased.trace(q, k[0], v, bias=torch.randn(4))
    with pytest.raises(CallError, match="q: dtype torch.int32 is not supported"):
        biased.trace(q.int(), k, v, bias=torch.randn(4))
    # calls check the same way, before anything is compiled
    with pytest.raises(CallError, match="k: expected a 4-dim"):
        biased(q, k[0], v, bias=torch.randn(4))
    with pytest.raises(CallError, match="v: expected a 4-dim"):
        biased(q, k, v[None], bias=torch.randn(4))
    with pytest.raises(CallError, match="bias: missing input tensor"):
        biased(q, k, v)
    with pytest.raises(CallError, match="layout"):
        attnc.attention(layout="SBHD")


# ---------------------------------------------------------------- semantics: the traced spec's numbers


def alibi_window_torch(q, k, v, slopes, window):
    """ALiBi + bottom-right causal + sliding window, written directly in torch (float64, BHSD)."""
    m, n, d, group = q.shape[2], k.shape[2], q.shape[3], q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    i = torch.arange(m).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(d) + slopes.double().view(1, -1, 1, 1) * (j - i)
    keep = (i + (n - m) >= j) & (i + (n - m) - j < window)
    scores = scores.masked_fill(~keep, -math.inf)
    return torch.softmax(scores, dim=-1) @ vv, torch.logsumexp(scores, dim=-1)


@attnc.attention
def alibi_window(q, k, v, *, slopes: attnc.Tensor, window: int = 3):
    TRACES.append(q)
    s = (q @ k) * q.D ** -0.5 + slopes[q.head] * (k.pos - q.pos)
    p = attnc.softmax(s, where=attnc.causal(q, k) & (q.pos + (k.N - q.M) - k.pos < window))
    return p @ v, p.lse


TRACES = []


def test_traced_spec_computes_the_torch_formula():
    """The reference run on a traced spec equals the same attention written directly in torch."""
    q, k, v = qkv(H=4, HKV=2, M=5, N=9)
    slopes = torch.rand(4)
    out, lse = attnc.reference(alibi_window.trace(q, k, v, slopes=slopes), q, k, v, slopes=slopes, window=2)
    want_out, want_lse = alibi_window_torch(q, k, v, slopes, 2)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


def test_decorated_call_runs_a_cached_kernel(monkeypatch):
    """fp32 kernel (Triton's interpreter on CPU) against the reference and the torch formula; new lengths
    and param values reuse the one trace and the one compiled kernel."""
    api = importlib.import_module("attnc.runtime.api")
    compiled = []
    real_compile = api.compile
    monkeypatch.setattr(api.compiler, "_compile", lambda spec, **kw: compiled.append(spec.name) or real_compile(spec, **kw))
    decorated = attnc.attention(alibi_window.fn)  # a fresh cache
    TRACES.clear()
    slopes = torch.rand(4)
    for m, n, window in ((5, 9, 2), (12, 12, 5), (1, 17, 100)):
        q, k, v = qkv(H=4, HKV=2, M=m, N=n)
        out, lse = decorated(q, k, v, slopes=slopes, window=window)
        assert out.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
        ref_out, ref_lse = attnc.reference(decorated.spec, q, k, v, slopes=slopes, window=window)
        want_out, want_lse = alibi_window_torch(q, k, v, slopes, window)
        torch.testing.assert_close(ref_out, want_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=2e-5)
    assert len(TRACES) == 1 and compiled == ["alibi_window"]
    decorated(*(x.half() for x in qkv(H=4, HKV=2)), slopes=slopes)  # a new dtype: a new trace and kernel
    assert len(TRACES) == 2 and compiled == ["alibi_window"] * 2 and decorated.spec.q.dtype == "f16"


def test_bshd_layout_runs():
    @attnc.attention(layout="BSHD")
    def softcapped(q, k, v, *, cap: float = 20.0):
        return attnc.softmax(cap * attnc.tanh((q @ k) * q.D ** -0.5 / cap)) @ v

    q, k, v = qkv(M=6, N=10, DV=8, layout="BSHD")
    out = softcapped(q, k, v)
    scores = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) / 4.0
    want = torch.einsum("bhmn,bnhd->bmhd", torch.softmax(20.0 * torch.tanh(scores / 20.0), dim=-1), v.double())
    assert out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decorated_call_on_gpu(dtype):
    slopes = torch.rand(8, device="cuda")
    q, k, v = (x.to("cuda", dtype) for x in qkv(B=2, H=8, HKV=2, M=200, N=333, D=64))
    out, lse = alibi_window(q, k, v, slopes=slopes, window=100)
    ref_out, ref_lse = attnc.reference(alibi_window.spec, q, k, v, slopes=slopes, window=100)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
