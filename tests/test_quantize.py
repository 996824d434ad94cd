"""Quantised queries, `quantize q, qr to f8e4m3` (docs/mla.md): each row of a query-side tensor read as
float(e4m3(x / s)) * s with s = max(amax(|x|), tiny) / 448 in float32, as FlashMLA's FP8 decode reads its queries.
The language and its checker errors, the key, the decorator, the reference (that formula, and far enough from the
unquantised reference that a kernel ignoring the statement fails), the Triton decode kernel (MLA dense and paged,
with and without an FP8 latent, and a plain decode) against the reference with NaN-poisoned outputs on the CPU
through Triton's interpreter, and what does not run it (TVM, gradients). The Gluon MLA decode kernel's fp8 x fp8
QK^T (sm_90): its plan and layout here, its numbers on the GPU in tests/test_mla_gluon_gpu.py."""
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.dsl.check import check_attention
from attnc.dsl.reference import quantize_rows
from attnc.errors import CallError, CompileError, SpecError
from attnc.passes import Target, plan_kernel
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, assert_matches, poisoned_outputs,
)

pytestmark = pytest.mark.shared_cache

E4M3 = torch.float8_e4m3fn
D, DR = 64, 16
TOL = 2e-5  # f32 queries: the kernels' summation order, far below e4m3's rounding of the queries


def _mla(name: str, latent: str, storage: str = "dense", quantize: str = "q, qr") -> str:
    k, kr = (("[PAGES, PAGE, D]", "[PAGES, PAGE, DR]") if storage == "paged" else ("[B, N, D]", "[B, N, DR]"))
    fp8 = latent == "f8e4m3"
    return f"""
attention {name} {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: {latent}{k}
    input qr: f32[B, M, H, DR]
    input kr: {latent}{kr}
    {"paged k by block_table, kv_len" if storage == "paged" else ""}
    {"param ckv_scale: f32  param kr_scale: f32  dequant k by ckv_scale  dequant kr by kr_scale" if fp8 else ""}
    {f"quantize {quantize} to f8e4m3" if quantize else ""}
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    {"mask causal" if storage == "paged" else ""}
    return softmax(score) @ k, lse
}}"""


SPECS = {s.name: s for s in attnc.parse("".join([
    _mla("fp8_dense", "f8e4m3"), _mla("fp8_paged", "f8e4m3", "paged"), _mla("f32_dense", "f32"),
    _mla("f32_paged", "f32", "paged"), _mla("fp8_rope_only", "f8e4m3", quantize="qr"),
    """
attention decode {
    q: f32[B, M, H, D]
    k: f32[B, N, HKV, D]
    v: f32[B, N, HKV, D]
    quantize q to f8e4m3
    score = 20 * tanh(qk * rsqrt(D) / 20)
    mask causal
    return softmax(score) @ v, lse
}"""]), "quantize_test.attn")}


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def _fp8(*shape):
    return (_randn(*shape) * 40).clamp(-400, 400).to(E4M3)


def _unquantized(spec):
    return replace(spec, quantize=())


def _check(spec, *args, **kw):
    """The kernel against the reference, and the reference against the unquantised one: that gap is far above the
    tolerance, so a kernel that read the queries as they are would fail."""
    (out, lse), (ref, ref_lse) = attnc.compile(spec, backend="triton")(*args, **kw), attnc.reference(spec, *args, **kw)
    assert_matches(spec, (out, lse), (ref, ref_lse), tol=TOL)
    plain, _ = attnc.reference(_unquantized(spec), *args, **kw)
    assert (plain - ref).abs().max().item() > 100 * TOL * max(1.0, ref.abs().max().item())
    assert (out.double() - plain).abs().max().item() > 50 * TOL * max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------- the language


def test_the_statement_is_canonical_and_in_the_key():
    spec = SPECS["fp8_dense"]
    assert spec.quantize == (attnc.ir.Quantize("q", "f8e4m3"), attnc.ir.Quantize("qr", "f8e4m3"))
    assert "    quantize q, qr to f8e4m3\n" in spec.canonical
    assert spec.decode_kernel_only and attnc.parse(spec.canonical)[0] == spec
    # the same math, spelt otherwise: one key; quantising less is another spec
    text = _mla("other_name", "f8e4m3").replace("quantize q, qr to f8e4m3", "quantize qr to f8e4m3\n"
                                                                           "quantize q to f8e4m3")
    again = attnc.parse(text)[0]
    assert again.key == spec.key and again.name != spec.name
    assert len({spec.key, _unquantized(spec).key, SPECS["fp8_rope_only"].key}) == 3
    for s in SPECS.values():
        assert attnc.parse(s.canonical)[0].key == s.key


def _bad(statement: str) -> str:
    return (f"attention a {{\n    q: bf16[B, M, H, D]\n    k: bf16[B, N, D]\n    input qr: bf16[B, M, H, DR]\n"
            f"    input kr: bf16[B, N, DR]\n    input qx: bf16[B, M, H, D]\n    dims DR = 16\n{statement}\n"
            f"    score = (q @ k + qr @ kr) * 0.1\n    return softmax(score) @ k\n}}\n")


ERRORS = [
    # (statement, col, caret, fragment)
    ("    quantize q, k to f8e4m3", 17, "^",
     "quantize applies to the query side of the score's dot products (q, qr): k is key-side"),
    ("    quantize kr to f8e4m3", 14, "^^", "kr is key-side, stored as it is"),
    ("    quantize qx to f8e4m3", 14, "^^", "the score reads qx in no dot product (`qx @ KEY`)"),
    ("    quantize qq to f8e4m3", 14, "^^", "'qq' is not declared; did you mean 'q'?"),
    ("    quantize q, qr, q to f8e4m3", 21, "^", "q is quantised twice (line 8 names it too)"),
    ("    quantize q to f8e5m2", 19, "^^^^^^", "queries are quantised to f8e4m3 only, not 'f8e5m2'"),
]


@pytest.mark.parametrize("statement, col, caret, fragment", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_checker_errors_point_at_the_misuse(statement, col, caret, fragment):
    source = _bad(statement)
    with pytest.raises(SpecError) as info:
        attnc.parse(source, "bad.attn")
    head, *rest = info.value.diagnostics[0].format().split("\n")
    assert head.startswith(f"bad.attn:8:{col}: ") and fragment in head, head
    assert rest == [f"    {statement}", "    " + " " * (col - 1) + caret]


def test_the_words_are_reserved_and_ir_built_in_python_is_checked_alike():
    with pytest.raises(SpecError, match="to"):
        attnc.parse(_bad("    param to: f32"))
    spec = SPECS["f32_dense"]
    with pytest.raises(SpecError, match="quantize applies to the query side.*kr is key-side"):
        check_attention(replace(spec, quantize=(attnc.ir.Quantize("kr", "f8e4m3"),)))
    with pytest.raises(SpecError, match="queries are quantised to f8e4m3 only"):
        check_attention(replace(spec, quantize=(attnc.ir.Quantize("q", "f16"),)))


@attnc.attention(layout="BSHD", backend="triton", dequant={"k": "ckv_scale", "kr": "kr_scale"},
                 quantize={"q": "f8e4m3", "qr": "f8e4m3"})
def quantized_mla(q, k, *, qr: attnc.Tensor, kr: attnc.Tensor, ckv_scale: float, kr_scale: float, scale: float):
    return attnc.softmax((q @ k + qr @ kr) * scale) @ k


def test_the_decorator_traces_the_text_spec():
    torch.manual_seed(3)
    q, qr, k, kr = _randn(2, 1, 8, D), _randn(2, 1, 8, DR), _fp8(2, 90, 1, D), _fp8(2, 90, 1, DR)
    kw = dict(qr=qr, kr=kr, ckv_scale=0.02, kr_scale=0.04, scale=0.11)
    out = quantized_mla(q, k, **kw)
    spec = SPECS["fp8_dense"]
    latent = replace(spec.k, shape=("B", "N", "HKV", "D"))  # the decorator's k has a head axis (of 1)
    text = replace(spec, returns_lse=False, dims=(("DR", DR),), k=latent, v=latent,
                   inputs=tuple(replace(t, shape=("B", "N", "HKV", "DR")) if t.name == "kr" else t
                                for t in spec.inputs))
    assert quantized_mla.spec.key == text.key
    assert_matches(text, out, attnc.reference(text, q, k, **kw), tol=TOL)
    with pytest.raises(CallError, match=r"quantize: expected a dict of query-side tensor name -> dtype"):
        attnc.attention(quantize=["q"])
    wrong = attnc.attention(layout="BSHD", backend="triton", dequant={"k": "ckv_scale", "kr": "kr_scale"},
                            quantize={"k": "f8e4m3"})(quantized_mla.fn)
    with pytest.raises(attnc.AttncError, match="k is key-side"):
        wrong(q, k, **kw)


# ---------------------------------------------------------------- the reference


def _e4m3_model(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ir.Quantize's arithmetic written out in float64, independent of torch's float32 ops and its e4m3 conversion:
    a = max(amax(|x|), tiny); r = 448 / a and v = x r each rounded to float32 (a float64 quotient or product of
    float32 numbers rounded once to float32 is the correctly rounded float32 one); v to e4m3's nearest value, ties to
    even (3 fraction bits; spacing 2^-9 below 2^-6). (values as float64, scale a / 448 as float64 of the float32)."""
    def f32(t):
        return t.float().double()
    x = x.double()
    a = x.abs().amax(-1, keepdim=True).clamp(min=448 * 2.0 ** -126)
    v = f32(x * f32(448 / a))
    spacing = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -6))) - 3)
    return torch.round(v / spacing) * spacing, f32(a / 448)  # torch.round: half to even


def test_quantize_rows_is_the_formula():
    torch.manual_seed(5)
    x = torch.randn(3, 4, 64) * torch.tensor([1.0, 1e-3, 0.0, 300.0]).view(1, 4, 1)
    values, scale = quantize_rows(x, "f8e4m3")
    assert values.dtype == E4M3 and scale.dtype == torch.float32
    assert (scale[:, 2] == 2.0 ** -126).all()  # a zero row: the smallest normal scale
    want, want_scale = _e4m3_model(x)
    assert torch.equal(values.double(), want) and torch.equal(scale.double(), want_scale)
    got = values.double() * scale.double()
    assert torch.equal(got[:, 2], torch.zeros(3, 64, dtype=torch.float64))
    # each row's largest element is 448 s: itself but for the rounding of s
    assert torch.allclose(got.abs().amax(-1), x.abs().amax(-1).double(), rtol=1e-7, atol=0)
    assert (got - x).abs().max() > 1e-3 and ((got - x).abs() <= x.abs() / 16 + 2.0 ** -9 * scale).all()


def _on_midpoints(*shape) -> torch.Tensor:
    """Rows whose elements are their largest, 2.875, times n / 32: x (448 / a) = 14 n lands on a midpoint between
    e4m3 values for n = 3, 5, 9, ... (bf16 queries do this wherever x / a is a short binary fraction). 448 / 2.875
    rounds down in float32, 2.15625 (448 / 2.875) rounds back to 336 (a midpoint: e4m3 keeps 320), and torch's
    448 / tensor (a reciprocal, then times 448) rounds up, so its product is above the midpoint (352)."""
    n = torch.randint(-31, 32, shape)
    n[..., 0] = 32
    return 2.875 * n.float() / 32


def test_quantize_rows_on_midpoints_divides():
    values, scale = quantize_rows(torch.tensor([[2.875, 2.15625, -2.15625]]), "f8e4m3")
    assert values.float().tolist() == [[448.0, 320.0, -320.0]]  # ties to even
    torch.manual_seed(7)
    x = _on_midpoints(2, 8, 64)
    values, scale = quantize_rows(x, "f8e4m3")
    want, want_scale = _e4m3_model(x)
    assert torch.equal(values.double(), want) and torch.equal(scale.double(), want_scale)


def test_the_reference_reads_the_quantised_queries():
    torch.manual_seed(6)
    spec = SPECS["f32_dense"]
    q, qr, k, kr = _randn(2, 1, 8, D), _randn(2, 1, 8, DR), _randn(2, 50, D), _randn(2, 50, DR)
    got, _ = attnc.reference(spec, q, k, qr=qr, kr=kr, scale=0.11)
    f32 = [(v.double() * s.double()).float() for v, s in (quantize_rows(x, "f8e4m3") for x in (q, qr))]  # rounds once
    want, _ = attnc.reference(_unquantized(spec), f32[0], k, qr=f32[1], kr=kr, scale=0.11)
    assert (got - want).abs().max() < 1e-6


# ---------------------------------------------------------------- the Triton decode kernel


@pytest.mark.parametrize("name", ["fp8_dense", "f32_dense", "fp8_rope_only"])
def test_mla_dense_matches_the_reference(name):
    torch.manual_seed(len(name))
    spec = SPECS[name]
    b, m, h, n = 2, 1, 8, 150
    fp8 = spec.k.dtype == "f8e4m3"
    q, qr = _randn(b, m, h, D), _randn(b, m, h, DR)
    k, kr = (_fp8(b, n, D), _fp8(b, n, DR)) if fp8 else (_randn(b, n, D), _randn(b, n, DR))
    _check(spec, q, k, qr=qr, kr=kr, scale=0.11, **(dict(ckv_scale=0.02, kr_scale=0.05) if fp8 else {}))


def test_queries_on_midpoints_match_the_reference():
    """Elements on e4m3's midpoints (bf16 queries put several in a row): the kernel rounds them as the reference does,
    to even, where a reference that took 448 / a as torch's reciprocal times 448 was 0.07 off in lse here."""
    torch.manual_seed(8)
    b, m, h, n = 2, 1, 8, 150
    q, qr = _on_midpoints(b, m, h, D).to(DEVICE), _on_midpoints(b, m, h, DR).to(DEVICE)
    _check(SPECS["fp8_dense"], q, _fp8(b, n, D), qr=qr, kr=_fp8(b, n, DR), scale=0.11, ckv_scale=0.02, kr_scale=0.05)


def _paged(page, lengths):
    b = len(lengths)
    maxp = max(1, max(-(-n // page) for n in lengths))
    pages = b * maxp + 2
    table = torch.randperm(pages)[:b * maxp].view(b, maxp).int()  # shuffled pages
    return pages, dict(block_table=table.to(DEVICE), kv_len=torch.tensor(lengths).int().to(DEVICE))


@pytest.mark.parametrize("name, page", [("fp8_paged", 16), ("fp8_paged", 64), ("f32_paged", 16)])
def test_mla_paged_matches_the_reference(name, page):
    torch.manual_seed(page + len(name))
    spec = SPECS[name]
    lengths, h = [130, 7, 0], 8
    pages, kw = _paged(page, lengths)
    fp8 = spec.k.dtype == "f8e4m3"
    q, qr = _randn(len(lengths), 2, h, D), _randn(len(lengths), 2, h, DR)
    k, kr = (_fp8(pages, page, D), _fp8(pages, page, DR)) if fp8 else (_randn(pages, page, D), _randn(pages, page, DR))
    _check(spec, q, k, qr=qr, kr=kr, scale=0.11, **kw, **(dict(ckv_scale=0.02, kr_scale=0.05) if fp8 else {}))


def test_a_plain_decode_matches_the_reference():
    torch.manual_seed(9)
    q, k, v = _randn(2, 3, 8, D), _randn(2, 100, 2, D), _randn(2, 100, 2, D)
    _check(SPECS["decode"], q, k, v)


def test_the_kernel_quantises_once_per_program():
    from attnc.backends.triton.decode import generate_decode

    src = generate_decode(plan_kernel(SPECS["fp8_dense"], Target("triton", "cuda", 90), D, D))
    assert src.count("= quantize_rows(") == 2  # q and qr, before the key loops
    assert src.index("= quantize_rows(") < src.index("for t in tl.range(")
    assert "qk = qk * q_scale[:, None]" in src and "* qdot1_tile_scale[:, None]" in src
    assert "quantize_rows" not in generate_decode(plan_kernel(_unquantized(SPECS["fp8_dense"]),
                                                              Target("triton", "cuda", 90), D, D))


def test_what_does_not_run_it_says_so():
    spec = SPECS["decode"]
    with pytest.raises(CompileError, match=r"quantises its queries \(q, with `quantize`\), which runs on "
                                           r"backend='triton' only"):
        plan_kernel(spec, Target("tvm", "cpu", None), D, D)
    q, k, v = _randn(1, 1, 4, D), _randn(1, 20, 2, D), _randn(1, 20, 2, D)
    with pytest.raises(CompileError, match="backend='triton'"):
        attnc.compile(spec, backend="tvm")(q, k, v)
    with pytest.raises(CallError, match=r"q: requires grad, but attention 'decode' is attention over quantised "
                                        r"queries \(quantize\), which has no backward"):
        attnc.compile(spec, backend="triton")(q.requires_grad_(), k, v)
    from attnc.passes.warpgroups import unavailable

    assert unavailable(plan_kernel(spec, Target("triton", "cuda", 90), D, D)) == \
        "quantised queries (quantize) run the decode kernel"


# ---------------------------------------------------------------- the Gluon MLA decode kernel's plan (sm_90)


def test_the_gluon_kernel_takes_quantised_queries_over_an_fp8_latent():
    """examples/specs/fp8_cache.attn's fp8_mla_paged_q8 on sm_90: the Gluon kernel with fp8 x fp8 QK^T (the converted
    ring holds the latent's columns alone: 218368 B of shared memory with four e4m3 slots, where the FP8 kernel
    without it needs 226560 B); quantising one of q and qr, or a bf16 latent, keeps the Triton decode kernel."""
    from attnc.passes import PlanOptions

    sm90 = Target("triton", "cuda", 90)
    specs = {s.name: s for s in attnc.parse_file("examples/specs/fp8_cache.attn")}
    q8, fp8 = specs["fp8_mla_paged_q8"], specs["fp8_mla_paged"]
    staged = plan_kernel(q8, sm90, 512, 512, PlanOptions(gluon=True)).decode.warpgroups
    assert staged.path == "gluon", staged.reason
    w = staged.layout
    assert (w.fp8_queries, w.block_n, w.stages, w.fp8_stages, w.smem) == (True, 32, 2, 4, 218368)
    plain = plan_kernel(fp8, sm90, 512, 512, PlanOptions(gluon=True)).decode.warpgroups.layout
    assert not plain.fp8_queries and plain.smem == 226560
    half = replace(q8, quantize=q8.quantize[:1])
    staged = plan_kernel(half, sm90, 512, 512, PlanOptions(gluon=True)).decode.warpgroups
    assert staged.path == "triton" and "quantises q and the rope query both" in staged.reason
    narrow = replace(q8, dims=(("D", 512), ("DR", 16), ("PAGE", 64)))
    staged = plan_kernel(narrow, sm90, 512, 512, PlanOptions(gluon=True)).decode.warpgroups
    assert staged.path == "triton" and "an fp8 x fp8 wgmma sums 32 at a time" in staged.reason
    bf16 = next(s for s in attnc.parse_file("examples/specs/mla.attn") if s.name == "mla_paged")
    bf16 = replace(bf16, quantize=q8.quantize)
    check_attention(bf16)
    staged = plan_kernel(bf16, sm90, 512, 512, PlanOptions(gluon=True)).decode.warpgroups
    assert staged.path == "triton" and "over an f8e4m3 latent" in staged.reason
