"""FP8 K/V caches: k, v (and key-side tensors of dot products: MLA's latent and RoPE part) stored as f8e4m3 or
f8e5m2 with a dequant scale per tensor (an f32 param) or per K/V head (an input f32[HKV]), `dequant k by k_scale`.
The language and its checker errors, the reference (the FP8 data dequantised, exactly as a spec over the
dequantised tensors computes it), and the Triton decode kernels (dense, paged at pages of 16 and 64, ragged, MLA)
against the reference with NaN-poisoned outputs, on the CPU through Triton's interpreter. The kernels compute on
the dequantised values (FP8 converts exactly to q's dtype), so the tolerance is q's dtype's. The FP8 latent over
the MLA benchmark's grid (on the GPU with `-m gpu`): tests/test_mla_grid.py."""
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.dsl.check import check_attention
from attnc.errors import CallError, CompileError, SpecError
from attnc.passes import Target, plan_kernel
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, assert_matches, poisoned_outputs,
)

pytestmark = pytest.mark.shared_cache

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
D, DR = 64, 16

SPECS = {s.name: s for s in attnc.parse(f"""
attention decode {{
    q: f32[B, M, H, D]
    k: f8e4m3[B, N, HKV, D]
    v: f8e4m3[B, N, HKV, D]
    input k_scale: f32[HKV]               # one scale per K/V head
    param v_scale: f32                    # one for the tensor
    dequant k by k_scale
    dequant v by v_scale
    mask causal
    return softmax(score) @ v, lse
}}
attention paged_decode {{
    q: f32[B, M, H, D]
    k: f8e4m3[PAGES, PAGE, HKV, D]
    v: f8e4m3[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    input k_scale: f32[HKV]
    input v_scale: f32[HKV]
    dequant k by k_scale
    dequant v by v_scale
    mask causal
    return softmax(score) @ v, lse
}}
attention ragged_prefill {{
    q: f32[T, H, D]
    k: f8e5m2[TK, HKV, D]
    v: f8e4m3[TK, HKV, D]
    ragged q by cu_q
    ragged k, v by cu_k
    param k_scale: f32
    input v_scale: f32[HKV]
    dequant k by k_scale
    dequant v by v_scale
    score = 30 * tanh(qk * rsqrt(D) / 30)
    mask causal
    return softmax(score) @ v, lse
}}
attention mla_dense {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: f8e4m3[B, N, D]                    # the FP8 latent: keys and values, one K/V head
    input qr: f32[B, M, H, DR]
    input kr: f8e4m3[B, N, DR]
    param ckv_scale: f32
    param kr_scale: f32
    dequant k by ckv_scale
    dequant kr by kr_scale
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    return softmax(score) @ k, lse
}}
attention mla_paged {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: f8e4m3[PAGES, PAGE, D]
    input qr: f32[B, M, H, DR]
    input kr: f32[PAGES, PAGE, DR]        # an FP8 latent beside a RoPE part in q's dtype
    paged k by block_table, kv_len
    input ckv_scale: f32[HKV]             # one K/V head without an axis: HKV = 1, a one-element device tensor
    dequant k by ckv_scale
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}}
attention mla_ragged {{
    dims D = {D}, DR = {DR}
    q: f32[T, H, D]
    k: f8e4m3[TK, HKV, D]
    input qr: f32[T, H, DR]
    input kr: f8e4m3[TK, HKV, DR]
    ragged q by cu_q
    ragged k by cu_k
    input ckv_scale: f32[HKV]
    input kr_scale: f32[HKV]
    dequant k by ckv_scale
    dequant kr by kr_scale
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k
}}
""", "fp8_test.attn")}
SCALE = 0.11


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def _fp8(*shape, dtype=E4M3):
    """Cache contents as a quantiser leaves them: FP8 values spread over the type's range."""
    return (_randn(*shape) * 40).clamp(-400, 400).to(dtype)


def _scales(n):
    return torch.rand(n, device=DEVICE) * 0.05 + 0.01  # dequantised values of a few units, as K/V caches hold


def _compile(spec):
    return attnc.compile(spec, backend="triton")


def _check(spec, q, k, *v, **kw):
    got = _compile(spec)(q, k, *v, **kw)
    want = attnc.reference(spec, q, k, *v, **kw)
    assert_matches(spec, got, want, tol=2e-5)


# ---------------------------------------------------------------- the language


def test_dequant_is_part_of_the_spec_and_its_key():
    spec = SPECS["decode"]
    assert spec.dequant == (attnc.ir.Dequant("k", "k_scale"), attnc.ir.Dequant("v", "v_scale"))
    assert "    dequant k by k_scale\n    dequant v by v_scale\n" in spec.canonical
    assert spec.decode_only and spec.decode_kernel_only and not spec.is_latent
    for s in SPECS.values():
        again = attnc.parse(s.canonical)[0]
        assert again == s and again.key == s.key
    # the FP8 type and the scales are in the key: another type or another scale is another kernel
    e5m2 = replace(spec, k=replace(spec.k, dtype="f8e5m2"))
    check_attention(e5m2)
    swapped = replace(spec, dequant=(attnc.ir.Dequant("k", "v_scale"), attnc.ir.Dequant("v", "k_scale")),
                      inputs=(replace(spec.inputs[0], name="v_scale"),), params=(replace(spec.params[0], name="k_scale"),))
    check_attention(swapped)
    assert len({spec.key, e5m2.key, swapped.key}) == 3
    from attnc.backends.triton.signature import argument_types

    types = argument_types(plan_kernel(e5m2, Target("triton", "cuda", 90), 64, 64))
    assert (types["k_ptr"], types["v_ptr"], types["q_ptr"]) == ("*fp8e5", "*fp8e4nv", "*fp32")


def _source(body: str, k: str = "f8e4m3", v: str = "f8e4m3", q: str = "bf16") -> str:
    return (f"attention a {{\n    q: {q}[B, M, H, D]\n    k: {k}[B, N, HKV, D]\n    v: {v}[B, N, HKV, D]\n"
            f"    input k_scale: f32[HKV]\n    param v_scale: f32\n{body}    return softmax(score) @ v\n}}\n")


WHOLE = object()
GOOD = "    dequant k by k_scale\n    dequant v by v_scale\n"
ERRORS = [
    # (source, line, col, caret, fragment); WHOLE: the caret underlines the whole statement
    (_source(GOOD, q="f8e4m3"), 2, 5, WHOLE,
     "q cannot have dtype 'f8e4m3': FP8 is for the K/V cache (k, v and key-side tensors of dot products"),
    (_source(GOOD + "    dequant q by v_scale\n"), 9, 5, WHOLE,
     "dequant applies to the K/V cache (k, v, key-side tensors of dot products): q is the query, which is never FP8"),
    (_source(GOOD, v="bf16"), 8, 5, WHOLE,
     "dequant applies to an FP8 tensor (f8e4m3, f8e5m2), but v is bf16: declare v: f8e4m3[...] or remove this"),
    (_source("    dequant k by k_scale\n"), 4, 5, WHOLE,
     "v is f8e4m3, so it needs its dequant scale: add `dequant v by v_scale` with `input v_scale: f32[HKV]` (one "
     "per K/V head) or `param v_scale: f32` (one for the tensor)"),
    (_source(GOOD).replace("k_scale: f32[HKV]", "k_scale: f32[H]"), 7, 5, WHOLE,
     "the scale of k is an f32 param (one for the tensor) or an input f32[HKV] (one per K/V head), but k_scale is "
     "f32[H]"),
    (_source(GOOD).replace("v_scale: f32", "v_scale: i32"), 8, 5, WHOLE,
     "the scale of v is an f32 param (one for the tensor) or an input f32[HKV] (one per K/V head), but v_scale is "
     "param i32"),
    (_source(GOOD.replace("by v_scale", "by vscale")), 8, 5, WHOLE,
     "the scale of v, 'vscale', is not declared; declare `input vscale: f32[HKV]`"),
    (_source(GOOD + "    dequant k by k_scale\n"), 9, 5, WHOLE, "a second dequant for k (line 7 has one)"),
    (_source(GOOD + "    input w: f8e4m3[H]\n    score = qk * w[h]\n"), 9, 5, WHOLE,
     "input w cannot have dtype 'f8e4m3': FP8 is for the K/V cache"),
    (_source(GOOD + "    dequant w by v_scale\n"), 9, 5, WHOLE, "'w' is not k, v or a key-side tensor"),
    (_source(GOOD, k="f8e4m2"), 3, 5, WHOLE, "unknown dtype 'f8e4m2' for k; expected one of f16, bf16, f32, "
     "f8e4m3, f8e5m2; did you mean 'f8e5m2'?"),
]


@pytest.mark.parametrize("source, line, col, caret, fragment", ERRORS, ids=[e[4][:40] for e in ERRORS])
def test_checker_errors_point_at_the_misuse(source, line, col, caret, fragment):
    if caret is WHOLE:
        caret = "^" * len(source.splitlines()[line - 1].strip())
    with pytest.raises(SpecError) as info:
        attnc.parse(source, "bad.attn")
    head, *rest = info.value.diagnostics[0].format().split("\n")
    assert head.startswith(f"bad.attn:{line}:{col}: ") and fragment in head, head
    assert rest == [f"    {source.splitlines()[line - 1]}", "    " + " " * (col - 1) + caret]


def test_ir_built_in_python_is_checked_alike():
    spec = SPECS["decode"]
    with pytest.raises(SpecError, match="v is f8e4m3, so it needs its dequant scale"):
        check_attention(replace(spec, dequant=spec.dequant[:1]))


# ---------------------------------------------------------------- the reference


def _decode_call(b, m, h, n, hkv, dtype=E4M3):
    q, k, v = _randn(b, m, h, D), _fp8(b, n, hkv, D, dtype=dtype), _fp8(b, n, hkv, D, dtype=dtype)
    return q, k, v, dict(k_scale=_scales(hkv), v_scale=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_reference_is_the_dequantised_data(dtype):
    """The reference of an FP8 call equals the reference of the same spec over the cache dequantised to q's dtype
    (bf16 and f32 hold every FP8 value; the scales are powers of two, so their products are exact too)."""
    torch.manual_seed(1)
    spec = SPECS["decode"]
    q, k, v, kw = _decode_call(2, 3, 4, 40, 2)
    kw = dict(k_scale=torch.tensor([0.25, 0.015625]), v_scale=0.0625)
    name = "bf16" if dtype == torch.bfloat16 else "f32"
    plain = attnc.parse(spec.canonical.replace("f32[B, M", f"{name}[B, M").replace("f8e4m3", name)
                        .replace("    dequant k by k_scale\n    dequant v by v_scale\n", ""))[0]
    kd = k.to(dtype) * kw["k_scale"].to(dtype).view(1, 1, 2, 1)
    vd = v.to(dtype) * kw["v_scale"]
    assert torch.equal(kd.double(), k.double() * kw["k_scale"].double().view(1, 1, 2, 1))
    want_out, want_lse = attnc.reference(plain, q.to(dtype), kd, vd, **kw)
    out, lse = attnc.reference(spec, q.to(dtype), k, v, **kw) if dtype == torch.float32 else \
        attnc.reference(replace(spec, q=plain.q), q.to(dtype), k, v, **kw)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def test_calls_name_the_argument():
    spec = SPECS["decode"]
    q, k, v, kw = _decode_call(1, 1, 4, 20, 2)
    with pytest.raises(CallError, match=r"k: expected dtype f8e4m3 \(torch.float8_e4m3fn\).*got torch.bfloat16"):
        attnc.reference(spec, q, k.bfloat16(), v, **kw)
    with pytest.raises(CallError, match=r"k_scale: expected dtype f32"):
        attnc.reference(spec, q, k, v, **dict(kw, k_scale=kw["k_scale"].half()))
    with pytest.raises(CallError, match=r"k_scale: dim 0 \(HKV\) is 3"):
        _compile(spec)(q, k, v, **dict(kw, k_scale=_scales(3)))
    plain = attnc.parse(_source("", k="f32", v="f32", q="f32").replace("    input k_scale: f32[HKV]\n", "")
                        .replace("    param v_scale: f32\n", ""))[0]
    with pytest.raises(CallError, match=r"k: expected dtype f32 .*got torch.float8_e4m3fn.*an FP8 cache is declared "
                                        r"so: k: f8e4m3\[B, N, HKV, D\], with `dequant k by SCALE`"):
        attnc.compile(plain, backend="triton")(q, k, v.float())


# ---------------------------------------------------------------- the Triton kernels


@pytest.mark.parametrize("b, m, h, n, hkv, dtype", [
    (2, 1, 8, 300, 2, E4M3),   # decode: a GQA group packed into a tile's rows; split-KV merged through lse
    (1, 3, 4, 130, 4, E5M2),   # a few tokens, one head per K/V head, e5m2
    (1, 40, 4, 90, 1, E4M3),   # prefill rows past the decode tile: the decode kernel still runs it
])
def test_dense_kernel_matches_the_reference(b, m, h, n, hkv, dtype):
    torch.manual_seed(b * 1000 + m * 100 + n)
    spec = SPECS["decode"]
    if dtype == E5M2:
        spec = replace(spec, k=replace(spec.k, dtype="f8e5m2"), v=replace(spec.v, dtype="f8e5m2"))
    q, k, v, kw = _decode_call(b, m, h, n, hkv, dtype)
    _check(spec, q, k, v, **kw)


def test_a_device_scalar_scale_passes_as_a_per_head_view():
    """docs/serving.md: a per-tensor scale held on the device, expanded to [HKV] (stride 0, no copy, no sync)."""
    torch.manual_seed(3)
    q, k, v, kw = _decode_call(2, 1, 8, 90, 2)
    scalar = torch.tensor(0.03, device=DEVICE)
    kw = dict(kw, k_scale=scalar.expand(2))
    assert kw["k_scale"].stride() == (0,)
    _check(SPECS["decode"], q, k, v, **kw)
    torch.testing.assert_close(attnc.reference(SPECS["decode"], q, k, v, **kw)[0],
                               attnc.reference(SPECS["decode"], q, k, v, **dict(kw, k_scale=scalar.repeat(2)))[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("f16", torch.float16)])
def test_half_precision_queries_over_an_fp8_cache(name, dtype):
    spec = SPECS["decode"]
    spec = replace(spec, q=replace(spec.q, dtype=name))
    torch.manual_seed(2)
    q, k, v, kw = _decode_call(2, 1, 8, 200, 2)
    q = q.to(dtype)
    assert_matches(spec, _compile(spec)(q, k, v, **kw), attnc.reference(spec, q, k, v, **kw))


def _paged(page, lengths, hkv):
    b = len(lengths)
    maxp = max(1, max(-(-n // page) for n in lengths))
    pages = b * maxp + 2
    table = torch.randperm(pages)[:b * maxp].view(b, maxp).int()  # shuffled pages
    return pages, dict(block_table=table.to(DEVICE), kv_len=torch.tensor(lengths).int().to(DEVICE))


@pytest.mark.parametrize("page, lengths, m, h, hkv", [
    (16, [100, 37, 0, 1], 1, 8, 2),
    (16, [250], 2, 4, 1),   # one sequence: split-KV
    (64, [200, 65, 64], 1, 8, 4),
])
def test_paged_kernel_matches_the_reference(page, lengths, m, h, hkv):
    torch.manual_seed(page + sum(lengths))
    pages, kw = _paged(page, lengths, hkv)
    q, k, v = _randn(len(lengths), m, h, D), _fp8(pages, page, hkv, D), _fp8(pages, page, hkv, D)
    _check(SPECS["paged_decode"], q, k, v, k_scale=_scales(hkv), v_scale=_scales(hkv), **kw)


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]).int().to(DEVICE)


def test_ragged_kernel_matches_the_reference():
    torch.manual_seed(7)
    q_lengths, kv_lengths, h, hkv = [3, 0, 1, 6], [40, 0, 1, 70], 4, 2
    t, tk = sum(q_lengths), sum(kv_lengths)
    q, k, v = _randn(t, h, D), _fp8(tk, hkv, D, dtype=E5M2), _fp8(tk, hkv, D)
    _check(SPECS["ragged_prefill"], q, k, v, cu_q=_offsets(q_lengths), cu_k=_offsets(kv_lengths), k_scale=0.03,
           v_scale=_scales(hkv))


def test_mla_dense_fp8_latent():
    torch.manual_seed(11)
    b, m, h, n = 2, 1, 8, 300
    q, qr, k, kr = _randn(b, m, h, D), _randn(b, m, h, DR), _fp8(b, n, D), _fp8(b, n, DR)
    _check(SPECS["mla_dense"], q, k, qr=qr, kr=kr, ckv_scale=0.02, kr_scale=0.05, scale=SCALE)


@pytest.mark.parametrize("page", [16, 64])
def test_mla_paged_fp8_latent(page):
    torch.manual_seed(page)
    lengths, h = [130, 7, 0], 8
    pages, kw = _paged(page, lengths, 1)
    q, qr = _randn(len(lengths), 2, h, D), _randn(len(lengths), 2, h, DR)
    k, kr = _fp8(pages, page, D), _randn(pages, page, DR)
    _check(SPECS["mla_paged"], q, k, qr=qr, kr=kr, ckv_scale=_scales(1), scale=SCALE, **kw)
    with pytest.raises(CallError, match=r"ckv_scale: dim 0 \(HKV\) is 2, but k has no head axis: one K/V head"):
        _compile(SPECS["mla_paged"])(q, k, qr=qr, kr=kr, ckv_scale=_scales(2), scale=SCALE, **kw)


def test_mla_ragged_fp8_latent():
    torch.manual_seed(13)
    q_lengths, kv_lengths, h = [2, 1, 4], [50, 0, 90], 8
    t, tk = sum(q_lengths), sum(kv_lengths)
    q, qr, k, kr = _randn(t, h, D), _randn(t, h, DR), _fp8(tk, 1, D), _fp8(tk, 1, DR)
    _check(SPECS["mla_ragged"], q, k, qr=qr, kr=kr, cu_q=_offsets(q_lengths), cu_k=_offsets(kv_lengths),
           ckv_scale=_scales(1), kr_scale=_scales(1), scale=SCALE)


def test_the_kernel_converts_fp8_tiles_and_scales_once_per_row():
    from attnc.backends.triton.decode import generate_decode

    plan = plan_kernel(SPECS["decode"], Target("triton", "cpu", None), D, D)
    assert "qk * (k_scale[h // (H // HKV)]" in plan.describe() and "out rows times v_scale" in plan.describe()
    source = generate_decode(plan)
    assert source.count("k_tile = upcast_fp8(k_tile, q_tile.dtype)") == 3
    assert "v_tile = upcast_fp8(v_tile, q_tile.dtype)" in source
    assert "out = out * p_v_scale" in source


def test_an_fp8_latent_stages_in_half_the_shared_memory():
    """The decode program's shared memory as Triton 3.6 allocates it on sm_90 (benchmarks/compile_mla_sm90.py
    [--fp8], 64x64 at 8 warps): bf16 stages its latent tiles where the tensor cores read them (2 stages 222208 B,
    4: 370688 B); e4m3 tiles go through registers into one bf16 tile (2 stages 185344 B, 3: 222208 B, 4: 260096 B,
    over the cap), so an FP8 latent takes the bf16 tile with one stage more, and no more than fit."""
    from attnc.passes import PlanOptions
    from attnc.passes.decode import decode_smem_bytes
    from attnc.passes.plan import TileConfig

    sm90 = Target("triton", "cuda", 90)
    latent = next(s for s in attnc.parse_file("examples/specs/fp8_cache.attn") if s.name == "fp8_mla_paged")
    fp8 = plan_kernel(latent, sm90, 512, 512)
    bf16 = plan_kernel(next(s for s in attnc.parse_file("examples/specs/mla.attn") if s.name == "mla_paged"),
                       sm90, 512, 512)
    assert fp8.decode.tile == TileConfig(64, 64, 8, 3) and bf16.decode.tile == TileConfig(64, 64, 8, 2)
    for plan, allocated in ((fp8, {2: 185344, 3: 222208, 4: 260096}), (bf16, {2: 222208, 4: 370688})):
        for stages, triton_bytes in allocated.items():
            assert 0 <= triton_bytes - decode_smem_bytes(plan, replace(plan.decode.tile, num_stages=stages)) <= 2048
    assert plan_kernel(latent, sm90, 512, 512, PlanOptions(num_stages=4)).decode.tile.num_stages == 3


def test_what_fp8_does_not_run_on_says_so():
    spec = SPECS["decode"]
    with pytest.raises(CompileError, match=r"reads FP8 K/V \(k, v, with `dequant`\), which runs on "
                                           r"backend='triton' only.*Pass backend='triton'"):
        plan_kernel(spec, Target("tvm", "cpu", None), D, D)
    q, k, v, kw = _decode_call(1, 1, 4, 20, 2)
    with pytest.raises(CompileError, match="backend='triton'"):
        attnc.compile(spec, backend="tvm")(q, k, v, **kw)
    with pytest.raises(CallError, match=r"q: requires grad, but attention 'decode' is attention over FP8 K/V"):
        _compile(spec)(q.requires_grad_(), k, v, **kw)


@pytest.mark.parametrize("name", ["fp8_paged_decode", "fp8_mla_paged"])
def test_the_example_specs_run(name):
    """examples/specs/fp8_cache.attn as written (bf16 queries), at small sizes; the MLA one at its D = 512, DR = 64
    and page of 64."""
    spec = next(s for s in attnc.parse_file("examples/specs/fp8_cache.attn") if s.name == name)
    torch.manual_seed(len(name))
    lengths, h = [130, 7], 4
    page = spec.dim_values.get("PAGE", 16)
    pages, kw = _paged(page, lengths, 2)
    if spec.is_latent:
        q, qr = _randn(2, 1, h, 512).bfloat16(), _randn(2, 1, h, 64).bfloat16()
        k, kr = _fp8(pages, page, 512), _fp8(pages, page, 64)
        args, kw = (q, k), dict(kw, qr=qr, kr=kr, ckv_scale=_scales(1), kr_scale=_scales(1), scale=192 ** -0.5)
    else:
        q, k, v = _randn(2, 2, h, D).bfloat16(), _fp8(pages, page, 2, D), _fp8(pages, page, 2, D)
        args, kw = (q, k, v), dict(kw, k_scale=_scales(2), v_scale=_scales(2))
    assert_matches(spec, _compile(spec)(*args, **kw), attnc.reference(spec, *args, **kw))


# ---------------------------------------------------------------- the decorator


@attnc.attention(layout="BSHD", backend="triton", dequant={"k": "k_scale", "v": "v_scale"})
def fp8_decode(q, k, v, *, k_scale: attnc.Tensor, v_scale: float):
    return attnc.softmax((q @ k) * q.D ** -0.5, where=attnc.causal(q, k)) @ v


@attnc.attention(layout="BSHD", backend="triton", dequant={"k": "ckv_scale", "kr": "kr_scale"})
def fp8_mla(q, k, *, qr: attnc.Tensor, kr: attnc.Tensor, ckv_scale: float, kr_scale: float, scale: float):
    return attnc.softmax((q @ k + qr @ kr) * scale) @ k


def test_the_decorator_traces_the_text_spec():
    torch.manual_seed(17)
    q, k, v, kw = _decode_call(2, 1, 8, 120, 2)
    out = fp8_decode(q, k, v, **kw)
    text = replace(SPECS["decode"], returns_lse=False)
    assert fp8_decode.spec.dequant == text.dequant and fp8_decode.spec.key == text.key
    assert_matches(text, out, attnc.reference(text, q, k, v, **kw), tol=2e-5)
    q, qr, k, kr = _randn(2, 1, 8, D), _randn(2, 1, 8, DR), _fp8(2, 90, 1, D), _fp8(2, 90, 1, DR)
    mla_kw = dict(qr=qr, kr=kr, ckv_scale=0.02, kr_scale=0.04, scale=SCALE)
    out = fp8_mla(q, k, **mla_kw)
    assert fp8_mla.spec.key == replace(SPECS["mla_dense"], dims=(("DR", DR),), returns_lse=False,
                                       k=replace(SPECS["mla_dense"].k, shape=("B", "N", "HKV", "D")),
                                       v=replace(SPECS["mla_dense"].k, shape=("B", "N", "HKV", "D")),
                                       inputs=tuple(replace(t, shape=t.shape[:2] + ("HKV", "DR")) if t.name == "kr"
                                                    else t for t in SPECS["mla_dense"].inputs)).key
    assert_matches(fp8_mla.spec, out, attnc.reference(fp8_mla.spec, q, k, **mla_kw), tol=2e-5)


def test_decorator_and_flex_mistakes_are_attnc_errors():
    q, k, v, kw = _decode_call(1, 1, 4, 20, 2)

    @attnc.attention(layout="BSHD")
    def no_scale(q, k, v):
        return attnc.softmax(q @ k) @ v

    with pytest.raises(CallError, match=r"k: dtype torch.float8_e4m3fn is an FP8 cache, which needs its dequant "
                                        r"scale: write a spec with `dequant k by k_scale`, or decorate"):
        no_scale(q, k, v)
    with pytest.raises(attnc.AttncError, match="dequant names the scale 'k_scal', which is not one of its keyword"):
        @attnc.attention(dequant={"k": "k_scal", "v": "v_scale"})
        def misspelt(q, k, v, *, k_scale: attnc.Tensor, v_scale: float):
            return attnc.softmax(q @ k) @ v
    with pytest.raises(CallError, match="an FP8 cache.*the flex front-end has no argument for a scale"):
        attnc.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)


def test_e4m3_needs_an_ada_or_newer_gpu():
    with pytest.raises(CompileError, match="k is f8e4m3, which Triton converts on sm_89 .* not on sm_80; store the "
                                           "cache as f8e5m2"):
        plan_kernel(SPECS["decode"], Target("triton", "cuda", 80), D, D)
    e5m2 = SPECS["decode"]
    e5m2 = replace(e5m2, k=replace(e5m2.k, dtype="f8e5m2"), v=replace(e5m2.v, dtype="f8e5m2"))
    assert plan_kernel(e5m2, Target("triton", "cuda", 80), D, D).spec.dequant


def test_the_fp8_decode_kernels_compile_for_hopper(tmp_path):
    """Triton's compiler (not its interpreter) takes the FP8 loads and conversions: one decode kernel of each example
    built ahead of time for sm_90a, as `attnc compile` builds it (in a worker with the interpreter off)."""
    from attnc.backends.triton import aot
    from attnc.backends.triton.signature import argument_types

    jobs = []
    for spec in attnc.parse_file("examples/specs/fp8_cache.attn"):
        d = spec.dim_values.get("D", 128)
        plan = plan_kernel(spec, Target("triton", "cuda", 90), d, d)
        kernel = next(k for k in plan.kernels if k.function == "attn_decode")
        source = tmp_path / f"{spec.name}.py"
        source.write_text(aot.GENERATORS[kernel.module](plan))
        module = f"attnc_fp8_test_{spec.name}"
        fn = getattr(aot._import_kernels(source, module), kernel.function)
        job = aot._job(fn, kernel, argument_types(plan), aot._layouts_for(fn)[0], str(source), module,
                       aot.Arch.parse("sm_90a"), str(tmp_path / spec.name), spec.name)
        assert job.signature["k_ptr"] == "*fp8e4nv"
        jobs.append(job)
    for job, result in zip(jobs, aot._run_jobs(jobs, 1)):
        assert result["hash"] and (tmp_path / f"{job.label}.cubin").stat().st_size > 1000
