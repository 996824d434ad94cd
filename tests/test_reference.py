"""attnc.reference (the float64 oracle) against torch's SDPA where SDPA can express the variant, and
against formulas written out directly in torch (or plain Python) where it cannot."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnc
from attnc.dsl import reference as reference_module
from attnc.errors import CallError
from attnc.ir import (
    QK, Binary, Call, IndexVar, Lookup, Num, ParamDecl, ParamRef, SizeRef, Softmax, TensorDecl, Unary,
    causal_mask, make_attention,
)

INF = math.inf
TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- building specs


class X:
    """Python operators on IR nodes, so the specs below read like the spec language."""

    def __init__(self, node):
        self.node = node

    def _binary(op, swap=False):
        def method(self, other):
            lhs, rhs = (node(other), self.node) if swap else (self.node, node(other))
            return X(Binary(op, lhs, rhs))
        return method

    __add__, __radd__ = _binary("+"), _binary("+", swap=True)
    __sub__, __rsub__ = _binary("-"), _binary("-", swap=True)
    __mul__, __rmul__ = _binary("*"), _binary("*", swap=True)
    __truediv__, __rtruediv__ = _binary("/"), _binary("/", swap=True)
    __mod__, __rmod__ = _binary("%"), _binary("%", swap=True)
    __floordiv__, __rfloordiv__ = _binary("//"), _binary("//", swap=True)
    __lt__, __le__, __gt__, __ge__ = _binary("<"), _binary("<="), _binary(">"), _binary(">=")
    __eq__, __ne__ = _binary("=="), _binary("!=")
    __and__, __or__ = _binary("and"), _binary("or")
    __hash__ = None
    del _binary

    def __neg__(self):
        return X(Unary("neg", self.node))

    def __invert__(self):
        return X(Unary("not", self.node))

    def __getitem__(self, indices):  # only on tensor names: t[b, i]
        indices = indices if isinstance(indices, tuple) else (indices,)
        return X(Lookup(self.node, tuple(node(x) for x in indices)))


def node(x):
    if isinstance(x, X):
        return x.node
    return Num(x, isinstance(x, float))


def call(fn, *args):
    return X(Call(fn, tuple(node(a) for a in args)))


def tensor(name):
    return X(name)


b, h, i, j = (X(IndexVar(name)) for name in "bhij")
M, N, D = (X(SizeRef(name)) for name in "MND")
qk = X(QK())
SCALED = qk * call("rsqrt", D)


def param(name):
    return X(ParamRef(name))


def spec_of(*, layout="BHSD", dtype="f32", kv_heads="HKV", dv=False, score=None, masks=(), params=(), inputs=(),
            sink=None, lse=False, dims=()):
    seq_first = layout == "BSHD"

    def decl(name, heads, seq, dim):
        shape = ("B", seq, heads, dim) if seq_first else ("B", heads, seq, dim)
        return TensorDecl(name, dtype, shape)

    return make_attention(
        "t", decl("q", "H", "M", "D"), decl("k", kv_heads, "N", "D"), decl("v", kv_heads, "N", "DV" if dv else "D"),
        dims=dims, params=params, inputs=inputs, score=None if score is None else node(score),
        masks=[node(m) for m in masks], normalizer=Softmax(None if sink is None else node(sink)), returns_lse=lse,
    )


# ---------------------------------------------------------------- inputs and independent formulas


class Case:
    """Random q, k, v drawn fresh, in BHSD float64 for the formulas (K/V expanded to H heads) and in the
    spec's layout and dtype for the call."""

    def __init__(self, B, H, HKV, M, N, D, DV=None, layout="BHSD", dtype=torch.float32):
        DV = D if DV is None else DV
        self.B, self.H, self.HKV, self.M, self.N, self.D, self.DV = B, H, HKV, M, N, D, DV
        q, k, v = (torch.randn(B, heads, seq, dim).to(dtype)
                   for heads, seq, dim in ((H, M, D), (HKV, N, D), (HKV, N, DV)))
        self.q64 = q.double()
        self.k64, self.v64 = (t.double().repeat_interleave(H // HKV, dim=1) for t in (k, v))
        to_layout = (lambda t: t.transpose(1, 2).contiguous()) if layout == "BSHD" else (lambda t: t)
        self.args = tuple(to_layout(t) for t in (q, k, v))
        self.layout = layout

    def scaled_qk(self):
        return self.q64 @ self.k64.transpose(-1, -2) / math.sqrt(self.D)

    def grid(self):
        """i [M, 1] and j [1, N] as int64, to write masks and biases in torch."""
        return torch.arange(self.M)[:, None], torch.arange(self.N)[None, :]

    def canonical(self, out):
        return out.transpose(1, 2) if self.layout == "BSHD" else out


def textbook(scores, keep, v, sink=None):
    """Masked softmax attention written out: p_j = exp(s_j) / (sum_kept exp(s_k) + exp(sink)).
    Only rows with a kept key are meaningful here (softmax of all -inf is NaN)."""
    logits = scores.masked_fill(~keep, -INF)
    if sink is not None:
        logits = torch.cat([logits, sink.expand(*logits.shape[:-1], 1)], dim=-1)
    p = torch.softmax(logits, dim=-1)[..., : scores.shape[-1]]
    return p @ v, torch.logsumexp(logits, dim=-1)


def sdpa(case, **kwargs):
    return F.scaled_dot_product_attention(case.q64, case.k64, case.v64, **kwargs)


SHAPES = [  # B, H, HKV, M, N, D, DV
    (2, 4, 4, 33, 33, 32, 32),
    (1, 8, 4, 17, 40, 64, 64),
    (2, 8, 2, 1, 57, 80, 80),
    (1, 8, 1, 40, 24, 128, 128),
    (3, 4, 1, 1, 1, 64, 64),
    (1, 2, 2, 9, 70, 64, 48),
]


# ---------------------------------------------------------------- against SDPA


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_dense_matches_sdpa(shape, layout):
    B, H, HKV, M, N, D, DV = shape
    case = Case(*shape, layout=layout)
    out = attnc.reference(spec_of(layout=layout, dv=DV != D), *case.args)
    assert out.dtype == torch.float64 and out.shape == case.args[0].shape[:-1] + (DV,)
    torch.testing.assert_close(case.canonical(out), sdpa(case), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_top_left_causal_matches_sdpa_is_causal(shape):
    case = Case(*shape)
    out = attnc.reference(spec_of(dv=shape[6] != shape[5], masks=[i >= j]), *case.args)
    torch.testing.assert_close(out, sdpa(case, is_causal=True), **TOL)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] <= s[4]])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_bottom_right_causal_matches_sdpa_mask(shape, layout):
    case = Case(*shape, layout=layout)
    M, N = shape[3], shape[4]
    out = attnc.reference(spec_of(layout=layout, dv=shape[6] != shape[5], masks=[X(causal_mask())]), *case.args)
    allowed = torch.ones(M, N, dtype=torch.bool).tril(diagonal=N - M)
    torch.testing.assert_close(case.canonical(out), sdpa(case, attn_mask=allowed), **TOL)


def test_gqa_matches_sdpa_enable_gqa():
    case = Case(2, 8, 2, 13, 29, 64)
    q, k, v = (t.double() for t in case.args)
    out = attnc.reference(spec_of(masks=[X(causal_mask())]), *case.args)
    allowed = torch.ones(13, 29, dtype=torch.bool).tril(diagonal=29 - 13)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True), **TOL)


def test_spec_without_hkv_is_plain_multi_head():
    case = Case(2, 4, 4, 11, 19, 32)
    out = attnc.reference(spec_of(kv_heads="H"), *case.args)
    torch.testing.assert_close(out, sdpa(case), **TOL)


def test_arbitrary_boolean_mask_matches_sdpa_attn_mask():
    case = Case(2, 4, 2, 21, 35, 32)
    allow = torch.rand(2, 4, 21, 35) < 0.3
    allow[..., 5] = True  # every row keeps a key, so SDPA has no NaN rows
    spec = spec_of(inputs=[TensorDecl("allow", "bool", ("B", "H", "M", "N"))], masks=[tensor("allow")[b, h, i, j]])
    out = attnc.reference(spec, *case.args, allow=allow)
    torch.testing.assert_close(out, sdpa(case, attn_mask=allow), **TOL)


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_alibi_matches_sdpa_float_mask(layout):
    case = Case(2, 8, 4, 24, 31, 64, layout=layout)
    slopes = torch.rand(8)
    spec = spec_of(layout=layout, inputs=[TensorDecl("slopes", "f32", ("H",))],
                   score=SCALED + tensor("slopes")[h] * (j - i), masks=[X(causal_mask())])
    out = attnc.reference(spec, *case.args, slopes=slopes)
    ii, jj = case.grid()
    bias = slopes.double()[:, None, None] * (jj - ii)
    bias = bias.masked_fill(ii + (31 - 24) < jj, -INF)
    torch.testing.assert_close(case.canonical(out), sdpa(case, attn_mask=bias), **TOL)


def test_custom_scale_param_matches_sdpa_scale():
    case = Case(1, 4, 4, 16, 16, 80)
    spec = spec_of(params=[ParamDecl("scale", "f32")], score=qk * param("scale"))
    out = attnc.reference(spec, *case.args, scale=0.37)
    torch.testing.assert_close(out, sdpa(case, scale=0.37), **TOL)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "f16"), (torch.bfloat16, "bf16")])
def test_half_inputs_are_widened_exactly(dtype, name):
    case = Case(2, 4, 2, 9, 12, 64, dtype=dtype)
    out = attnc.reference(spec_of(dtype=name), *case.args)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sdpa(case), **TOL)


# ---------------------------------------------------------------- against written-out formulas


def test_softcap():
    case = Case(2, 4, 2, 14, 22, 64)
    cap = 5.0
    spec = spec_of(params=[ParamDecl("cap", "f32", 50.0)], score=param("cap") * call("tanh", SCALED / param("cap")))
    out = attnc.reference(spec, *case.args, cap=cap)
    expected, _ = textbook(cap * torch.tanh(case.scaled_qk() / cap), torch.ones(14, 22, dtype=torch.bool), case.v64)
    torch.testing.assert_close(out, expected, **TOL)
    default, _ = textbook(50.0 * torch.tanh(case.scaled_qk() / 50.0), torch.ones(14, 22, dtype=torch.bool), case.v64)
    torch.testing.assert_close(attnc.reference(spec, *case.args), default, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_sinks_and_lse(shape):
    case = Case(*shape)
    sinks = torch.randn(shape[1]) * 3
    spec = spec_of(dv=shape[6] != shape[5], inputs=[TensorDecl("sinks", "f32", ("H",))], sink=tensor("sinks")[h],
                   masks=[X(causal_mask())], lse=True)
    out, lse = attnc.reference(spec, *case.args, sinks=sinks)
    ii, jj = case.grid()
    keep = ii + (case.N - case.M) >= jj
    expected, expected_lse = textbook(case.scaled_qk(), keep, case.v64, sinks.double()[:, None, None])
    assert lse.dtype == torch.float64 and lse.shape == (case.B, case.H, case.M)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(lse, expected_lse, **TOL)


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_lse_is_natural_log_in_bhm(layout):
    case = Case(2, 4, 1, 1, 50, 32, layout=layout)
    out, lse = attnc.reference(spec_of(layout=layout, lse=True), *case.args)
    assert lse.shape == (2, 4, 1)
    torch.testing.assert_close(lse, torch.logsumexp(case.scaled_qk(), dim=-1), **TOL)
    torch.testing.assert_close(case.canonical(out), sdpa(case), **TOL)


def test_rows_without_a_kept_key_give_zero_and_minus_inf():
    case = Case(2, 4, 2, 10, 6, 32)  # bottom-right causal with M > N: the first M - N rows see no key
    out, lse = attnc.reference(spec_of(masks=[X(causal_mask())], lse=True), *case.args)
    ii, jj = case.grid()
    keep = ii + (6 - 10) >= jj
    expected, expected_lse = textbook(case.scaled_qk(), keep, case.v64)
    empty = ~keep.any(-1)
    assert empty.sum() == 4
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.all(lse[:, :, empty] == -INF)
    torch.testing.assert_close(out[:, :, ~empty], expected[:, :, ~empty], **TOL)
    torch.testing.assert_close(lse[:, :, ~empty], expected_lse[:, :, ~empty], **TOL)
    assert not out.isnan().any() and not lse.isnan().any()


def test_row_without_a_kept_key_but_a_sink_gives_zero_and_the_sink_logit():
    case = Case(1, 4, 4, 5, 8, 32)
    sinks = torch.randn(4)
    spec = spec_of(inputs=[TensorDecl("sinks", "f32", ("H",))], sink=tensor("sinks")[h], masks=[j < i - 2], lse=True)
    out, lse = attnc.reference(spec, *case.args, sinks=sinks)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(lse[0, :, :3], sinks.double()[:, None].expand(4, 3), **TOL)
    ii, jj = case.grid()
    expected, expected_lse = textbook(case.scaled_qk(), jj < ii - 2, case.v64, sinks.double()[:, None, None])
    torch.testing.assert_close(out[:, :, 3:], expected[:, :, 3:], **TOL)
    torch.testing.assert_close(lse[:, :, 3:], expected_lse[:, :, 3:], **TOL)


def test_score_of_minus_inf_everywhere_is_an_empty_row_not_nan():
    case = Case(1, 2, 2, 4, 6, 32)
    out, lse = attnc.reference(spec_of(score=call("where", i >= 2, SCALED, -INF), lse=True), *case.args)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2])) and torch.all(lse[:, :, :2] == -INF)
    torch.testing.assert_close(out[:, :, 2:], sdpa(case)[:, :, 2:], **TOL)


def test_document_mask():
    case = Case(2, 4, 2, 30, 30, 64)
    doc = torch.sort(torch.randint(0, 4, (2, 30)), dim=-1).values.to(torch.int32)
    spec = spec_of(inputs=[TensorDecl("doc", "i32", ("B", "N"))],
                   masks=[X(causal_mask()), tensor("doc")[b, i] == tensor("doc")[b, j]])
    out = attnc.reference(spec, *case.args, doc=doc)
    ii, jj = case.grid()
    keep = (ii >= jj) & (doc[:, None, :, None] == doc[:, None, None, :])
    expected, _ = textbook(case.scaled_qk(), keep, case.v64)
    torch.testing.assert_close(out, expected, **TOL)


def test_relative_bias_table_with_free_size():
    case = Case(2, 4, 4, 7, 12, 32)
    table = torch.randn(4, 7 + 12 - 1)  # R = M + N - 1 relative positions, a free size read from the tensor
    spec = spec_of(inputs=[TensorDecl("rel", "f32", ("H", "R"))], score=SCALED + tensor("rel")[h, i - j + (N - 1)])
    out = attnc.reference(spec, *case.args, rel=table)
    bias = torch.tensor([[[table[hh, ii - jj + 11] for jj in range(12)] for ii in range(7)] for hh in range(4)])
    expected, _ = textbook(case.scaled_qk() + bias.double(), torch.ones(7, 12, dtype=torch.bool), case.v64)
    torch.testing.assert_close(out, expected, **TOL)


def test_dilated_sliding_window_with_int_params():
    case = Case(1, 4, 2, 40, 40, 32)
    spec = spec_of(params=[ParamDecl("window", "i32", 8), ParamDecl("dilation", "i32", 1)],
                   masks=[X(causal_mask()), i - j < param("window") * param("dilation"),
                          (i - j) % param("dilation") == 0])
    ii, jj = case.grid()
    for window, dilation in ((8, 1), (5, 3), (40, 2)):
        out = attnc.reference(spec, *case.args, window=window, dilation=dilation)
        keep = (ii >= jj) & (ii - jj < window * dilation) & ((ii - jj) % dilation == 0)
        expected, _ = textbook(case.scaled_qk(), keep, case.v64)
        torch.testing.assert_close(out, expected, **TOL)


def test_prefix_lm():
    case = Case(2, 4, 4, 25, 25, 64)
    spec = spec_of(params=[ParamDecl("prefix", "i32")], masks=[(j < param("prefix")) | (i >= j)])
    out = attnc.reference(spec, *case.args, prefix=9)
    ii, jj = case.grid()
    expected, _ = textbook(case.scaled_qk(), (jj < 9) | (ii >= jj), case.v64)
    torch.testing.assert_close(out, expected, **TOL)


def test_bool_param_switches_a_mask():
    case = Case(1, 2, 2, 12, 12, 32)
    spec = spec_of(params=[ParamDecl("causal", "bool", True)], masks=[~param("causal") | (i >= j)])
    ii, jj = case.grid()
    torch.testing.assert_close(attnc.reference(spec, *case.args), sdpa(case, is_causal=True), **TOL)
    torch.testing.assert_close(attnc.reference(spec, *case.args, causal=False), sdpa(case), **TOL)


def test_floored_modulo_and_division_and_true_division_follow_python():
    case = Case(1, 2, 2, 9, 13, 32)
    spec = spec_of(masks=[(j - i) % 3 != 1], score=SCALED + (j - i) % 2.5 - (i - 2 * j) / 4 + (i - j) % -4
                   + (j - i) // 4 - (i - 2 * j) // -3)
    out = attnc.reference(spec, *case.args)
    # plain Python ints and floats: % and // are floored (% takes the divisor's sign), / is true division
    bias = torch.tensor([[(jj - ii) % 2.5 - (ii - 2 * jj) / 4 + (ii - jj) % -4 + (jj - ii) // 4 - (ii - 2 * jj) // -3
                          for jj in range(13)] for ii in range(9)], dtype=torch.float64)
    keep = torch.tensor([[(jj - ii) % 3 != 1 for jj in range(13)] for ii in range(9)])
    expected, _ = textbook(case.scaled_qk() + bias, keep, case.v64)
    torch.testing.assert_close(out, expected, **TOL)


FUNCTIONS = [  # (score as IR, the same in torch on the scaled score s and the grid i [M, 1], j [1, N])
    (call("exp", SCALED / 4), lambda s, i, j: torch.exp(s / 4)),
    (call("exp2", SCALED), lambda s, i, j: torch.exp2(s)),
    (call("log", call("abs", SCALED) + 1), lambda s, i, j: torch.log(s.abs() + 1)),
    (call("log2", call("sqrt", SCALED * SCALED + 1)), lambda s, i, j: torch.log2(torch.sqrt(s * s + 1))),
    (call("rsqrt", SCALED * SCALED + 0.5), lambda s, i, j: 1 / torch.sqrt(s * s + 0.5)),
    (call("sigmoid", SCALED) * 3, lambda s, i, j: torch.sigmoid(s) * 3),
    (call("floor", SCALED * 2), lambda s, i, j: torch.floor(s * 2)),
    (call("min", SCALED, 0.25) + call("max", SCALED, -0.5), lambda s, i, j: s.clamp(max=0.25) + s.clamp(min=-0.5)),
    (-SCALED + call("max", i, j) - call("min", i, 3) + call("abs", i - j),
     lambda s, i, j: -s + torch.maximum(i, j) - i.clamp(max=3) + (i - j).abs()),
    (call("where", (i > j) & ~(i == 3), SCALED, -SCALED), lambda s, i, j: torch.where((i > j) & (i != 3), s, -s)),
]


@pytest.mark.parametrize("score,formula", FUNCTIONS, ids=range(len(FUNCTIONS)))
def test_functions(score, formula):
    case = Case(1, 2, 1, 6, 9, 32)
    out = attnc.reference(spec_of(score=score), *case.args)
    expected, _ = textbook(formula(case.scaled_qk(), *case.grid()), torch.ones(6, 9, dtype=torch.bool), case.v64)
    torch.testing.assert_close(out, expected, **TOL)


def test_compile_time_dims_and_free_dim_size():
    case = Case(1, 2, 2, 20, 20, 32)
    W = X(SizeRef("W"))
    spec = spec_of(dims=[("D", 32), ("W", 4)], masks=[X(causal_mask()), i - j < W])
    out = attnc.reference(spec, *case.args)
    ii, jj = case.grid()
    expected, _ = textbook(case.scaled_qk(), (ii >= jj) & (ii - jj < 4), case.v64)
    torch.testing.assert_close(out, expected, **TOL)


def test_empty_query_and_empty_keys():
    spec = spec_of(lse=True)
    q, k, v = torch.randn(2, 4, 0, 32), torch.randn(2, 4, 5, 32), torch.randn(2, 4, 5, 32)
    out, lse = attnc.reference(spec, q, k, v)
    assert out.shape == (2, 4, 0, 32) and lse.shape == (2, 4, 0)
    q, k, v = torch.randn(2, 4, 3, 32), torch.randn(2, 4, 0, 32), torch.randn(2, 4, 0, 32)
    out, lse = attnc.reference(spec, q, k, v)
    assert torch.equal(out, torch.zeros(2, 4, 3, 32, dtype=torch.float64)) and torch.all(lse == -INF)


@pytest.mark.parametrize("limit", [64, 500, 3000])
def test_chunking_does_not_change_results(monkeypatch, limit):
    case = Case(3, 4, 2, 19, 23, 32, DV=16)
    slopes = torch.randn(4)
    spec = spec_of(dv=True, inputs=[TensorDecl("slopes", "f32", ("H",))], score=SCALED + tensor("slopes")[h] * (j - i),
                   sink=tensor("slopes")[h], masks=[X(causal_mask()), (i + b) % 5 != 0], lse=True)
    whole = attnc.reference(spec, *case.args, slopes=slopes)
    monkeypatch.setattr(reference_module, "_CHUNK_ELEMS", limit)
    chunked = attnc.reference(spec, *case.args, slopes=slopes)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-14)
    ii, jj = case.grid()
    bb = torch.arange(3)[:, None, None, None]
    keep = (ii + 23 - 19 >= jj) & ((ii + bb) % 5 != 0)
    sl = slopes.double()[:, None, None]
    expected, expected_lse = textbook(case.scaled_qk() + sl * (jj - ii), keep, case.v64, sl)
    torch.testing.assert_close(whole, (expected, expected_lse), **TOL)


# ---------------------------------------------------------------- errors


def test_out_of_range_lookups_read_zero_and_validate_reports_kept_ones():
    case = Case(1, 2, 2, 6, 6, 32)
    rel = torch.randn(2, 11) + 3.0  # far from 0, so a lookup that read 0 shows
    spec = spec_of(inputs=[TensorDecl("rel", "f32", ("H", "R"))], score=SCALED + tensor("rel")[h, i - j])
    out = attnc.reference(spec, *case.args, rel=rel)
    ii, jj = case.grid()
    bias = torch.where(ii >= jj, rel.double()[:, (ii - jj).clamp(min=0)], 0.0)  # i - j < 0 reads 0
    expected, _ = textbook(case.scaled_qk() + bias, torch.ones(6, 6, dtype=torch.bool), case.v64)
    torch.testing.assert_close(out, expected, **TOL)
    with pytest.raises(CallError, match=r"^rel: index 1 of `rel\[h, i - j\]` is -1 at b=0, h=0, i=0, j=1, outside "
                                        r"dim 1 \(R\) of rel, which has size 11; an out-of-range lookup reads 0"):
        attnc.reference(spec, *case.args, rel=rel, validate=True)
    # under a causal mask every kept key reads inside rel: nothing to report, and the same numbers
    causal = spec_of(inputs=[TensorDecl("rel", "f32", ("H", "R"))], score=SCALED + tensor("rel")[h, i - j],
                     masks=[X(causal_mask())])
    out = attnc.reference(causal, *case.args, rel=rel, validate=True)
    expected, _ = textbook(case.scaled_qk() + bias, ii >= jj, case.v64)
    torch.testing.assert_close(out, expected, **TOL)
    # an index that does not depend on j is reported for every query row, kept keys or not
    row = spec_of(inputs=[TensorDecl("rel", "f32", ("H", "R"))], score=SCALED + tensor("rel")[h, i + 6],
                  masks=[j < 0])
    with pytest.raises(CallError, match=r"^rel: index 1 of `rel\[h, i \+ 6\]` is 11 at b=0, h=0, i=5, outside"):
        attnc.reference(row, *case.args, rel=rel, validate=True)


def test_integer_modulo_and_division_by_zero_are_call_errors():
    case = Case(1, 2, 2, 4, 4, 32)
    spec = spec_of(params=[ParamDecl("period", "i32")], masks=[j % param("period") == 0])
    with pytest.raises(CallError, match="modulo by zero.*period"):
        attnc.reference(spec, *case.args, period=0)
    spec = spec_of(params=[ParamDecl("period", "i32")], masks=[j // param("period") == 0])
    with pytest.raises(CallError, match="division by zero.*period"):
        attnc.reference(spec, *case.args, period=0)


def test_reference_checks_its_arguments():
    case = Case(1, 2, 2, 4, 4, 32)
    with pytest.raises(CallError, match="q: expected dtype f32"):
        attnc.reference(spec_of(), case.args[0].double(), *case.args[1:])


# ---------------------------------------------------------------- the DESIGN.md examples, parsed from text

DESIGN_EXAMPLES = """
attention gemma2_local {
    dims D = 256
    q: bf16[B, H, M, D]
    k: bf16[B, HKV, N, D]
    v: bf16[B, HKV, N, D]
    param window: i32 = 4096
    param cap: f32 = 50.0
    score = qk * rsqrt(D)
    score = cap * tanh(score / cap)
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v
}
attention alibi_doc {
    q: f16[B, M, H, D]  k: f16[B, N, HKV, D]  v: f16[B, N, HKV, D]
    input slopes: f32[H]
    input doc: i32[B, N]
    score = qk * rsqrt(D) + slopes[h] * (j - i)
    mask doc[b, i] == doc[b, j]
    return softmax(score) @ v, lse
}
"""


def test_design_examples_from_text():
    gemma, alibi = attnc.parse(DESIGN_EXAMPLES)
    case = Case(2, 4, 2, 9, 21, 256, dtype=torch.bfloat16)
    out = attnc.reference(gemma, *case.args, window=6, cap=2.0)
    ii, jj = case.grid()
    keep = (ii + 12 >= jj) & (ii + 12 - jj < 6)
    expected, _ = textbook(2.0 * torch.tanh(case.scaled_qk() / 2.0), keep, case.v64)
    torch.testing.assert_close(out, expected, **TOL)

    case = Case(2, 8, 4, 16, 16, 64, layout="BSHD", dtype=torch.float16)
    slopes, doc = torch.rand(8), torch.randint(0, 3, (2, 16), dtype=torch.int32)
    out, lse = attnc.reference(alibi, *case.args, slopes=slopes, doc=doc)
    ii, jj = case.grid()
    keep = doc[:, None, :, None] == doc[:, None, None, :]
    expected, expected_lse = textbook(case.scaled_qk() + slopes.double()[:, None, None] * (jj - ii), keep, case.v64)
    torch.testing.assert_close((case.canonical(out), lse), (expected, expected_lse), **TOL)
    # M = 17 queries against doc [B, N = 16]: query row 16 reads doc[b, 16], out of range (0 when not validating)
    with pytest.raises(CallError, match=r"^doc: index 1 of `doc\[b, i\]` is 16 at b=0, h=0, i=16, outside dim 1 "
                                        r"\(N\) of doc, which has size 16"):
        attnc.reference(alibi, torch.randn(2, 17, 8, 64).half(), *case.args[1:], slopes=slopes, doc=doc, validate=True)
