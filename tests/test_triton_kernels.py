"""Generated Triton kernels against attnc.reference (float64): every example spec, random shapes, layouts,
strides, GQA, head dims, empty rows, sinks, lse and data-dependent masks. On CPU these run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); test_triton_gpu.py reruns them on the GPU."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import attnc
from attnc.errors import CallError
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.tiling import head_dim_chunks

pytestmark = pytest.mark.shared_cache

SPECS_DIR = Path(__file__).resolve().parent.parent / "examples" / "specs"
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Max abs error allowed, relative to max(1, max |reference|).
TOL = {"f32": 2e-5, "f16": 3e-3, "bf16": 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def example_specs():
    """Every example but latent attention's and FP8 caches' (tests/test_mla.py and tests/test_fp8.py run them, on
    Triton only)."""
    return [s for path in sorted(SPECS_DIR.glob("*.attn")) for s in attnc.parse_file(path)
            if not s.decode_kernel_only]


def with_dtype(spec, dtype):
    return replace(spec, q=replace(spec.q, dtype=dtype), k=replace(spec.k, dtype=dtype),
                   v=replace(spec.v, dtype=dtype))


def example_sizes(spec, m=37, n=75):
    dims = spec.dim_values
    sizes = {"B": 2, "H": 4, "HKV": 2 if spec.is_gqa_shape else 4, "M": m, "N": n, "D": dims.get("D", 64), "R": 16}
    if spec.name == "mqa_decode":
        sizes.update(HKV=1, M=3)
    sizes["DV"] = dims.get("DV", sizes["D"])
    return sizes


def example_kwargs(spec, sizes, device=DEVICE):
    """Fresh random inputs for an example's declared tensors, and values for params without defaults."""
    kwargs = {}
    for t in spec.inputs:
        shape = [sizes[n] for n in t.shape]
        if t.name == "doc":
            kwargs[t.name] = torch.sort(torch.randint(0, 3, shape), dim=-1).values.int()
        elif t.name == "kv_len":
            kwargs[t.name] = torch.randint(0, sizes["N"] + 1, shape).int()
        elif t.dtype == "bool":
            kwargs[t.name] = torch.rand(shape) < 0.7
        elif t.dtype.startswith("i"):
            kwargs[t.name] = torch.randint(0, 4, shape).int()
        else:
            kwargs[t.name] = torch.randn(shape)
        kwargs[t.name] = kwargs[t.name].to(device)
    small = {"window": 23, "chunk": 16, "prefix": 20, "dilation": 3}
    for p in spec.params:
        if p.name in small:
            kwargs[p.name] = small[p.name]
    return kwargs


def qkv(spec, sizes, device=DEVICE):
    return tuple(torch.randn([sizes[n] for n in d.shape], device=device).to(TORCH[d.dtype])
                 for d in (spec.q, spec.k, spec.v))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel fails to write fails the comparison."""
    import attnc.backends.triton.launch as launch

    monkeypatch.setattr(launch, "empty", launch.nan_empty)


def assert_matches(spec, got, want, tol=None):
    tol = tol or TOL[spec.q.dtype]
    if spec.returns_lse:
        (out, lse), (ref, ref_lse) = got, want
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly where no key is kept"
        assert (lse[~finite] == ref_lse[~finite].float()).all()
        if finite.any():
            err = (lse.double() - ref_lse)[finite].abs().max().item()
            assert err <= max(tol, 1e-5) * max(1.0, ref_lse[finite].abs().max().item()), err
    else:
        out, ref = got, want
    assert out.dtype == TORCH[spec.q.dtype] and out.shape == ref.shape
    assert not out.isnan().any(), "every output element is written (outputs start as NaN)"
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), err


def run_and_check(spec, sizes, kwargs=None, options=None, tensors=None, device=DEVICE):
    q, k, v = tensors or qkv(spec, sizes, device)
    kwargs = example_kwargs(spec, sizes, device) if kwargs is None else kwargs
    got = attnc.compile(spec, options=options)(q, k, v, **kwargs)
    assert_matches(spec, got, attnc.reference(spec, q, k, v, **kwargs))
    return got


# Paged and ragged examples have their own sizes and tests (test_decode_kernels.py).
EXAMPLES = {s.name: s for s in example_specs() if s.q_storage is None and s.kv_storage is None}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_spec(name, dtype):
    spec = with_dtype(EXAMPLES[name], dtype)
    run_and_check(spec, example_sizes(spec))


def test_bf16_upcast_in_interpreter():
    spec = EXAMPLES["gqa_causal"]  # declared bf16
    run_and_check(spec, example_sizes(spec, m=20, n=33))


def _spec(masks="mask causal", dtype="f32", layout="B, H, M, D", kv_layout="B, HKV, N, D", v_dim="D", extra="",
          ret="softmax(score) @ v, lse"):
    v_layout = kv_layout.replace("D", v_dim) if v_dim != "D" else kv_layout
    return attnc.parse(f"attention t {{ q: {dtype}[{layout}] k: {dtype}[{kv_layout}] v: {dtype}[{v_layout}]\n"
                       f"{extra}\n{masks}\nreturn {ret} }}")[0]


# (M, N, H, HKV, D, mask): M and N off the block size, M != N, M = 1 (decode), GQA ratios 1/2/4/8,
# D in {32, 64, 80, 128}.
RANDOM_SHAPES = [
    (1, 1, 2, 2, 32, "mask causal"),
    (1, 97, 8, 1, 64, "mask causal"),
    (1, 50, 8, 2, 80, ""),
    (3, 64, 8, 4, 32, "mask causal"),
    (5, 41, 8, 8, 128, "mask causal"),
    (33, 33, 4, 2, 80, "mask causal"),
    (45, 19, 2, 1, 64, "mask causal"),
    (64, 100, 4, 4, 32, ""),
    (17, 90, 8, 2, 128, "param w: i32 = 1\nmask causal\nmask i + (N - M) - j < w"),
]


@pytest.mark.parametrize("m, n, h, hkv, d, masks", RANDOM_SHAPES)
def test_random_shapes(m, n, h, hkv, d, masks):
    spec = _spec(masks.split("\n")[-1] if masks else "", extra="\n".join(masks.split("\n")[:-1]))
    sizes = {"B": 2, "H": h, "HKV": hkv, "M": m, "N": n, "D": d, "DV": d}
    run_and_check(spec, sizes, kwargs={})


# Head dims that are the sum of two powers of two: the prefill's QK^T is one dot per chunk (passes/tiling.py
# head_dim_chunks), no padded column. MLA's non-absorbed prefill (192 / 128), 96 and 80; causal and dense, GQA, lse.
@pytest.mark.parametrize("d, dv, h, hkv, masks", [
    (192, 128, 4, 2, "mask causal"),
    (192, 128, 2, 2, ""),
    (96, 96, 4, 1, "mask causal"),
    (80, 64, 4, 2, ""),
])
def test_head_dim_in_two_chunks(d, dv, h, hkv, masks):
    spec = _spec(masks, v_dim="DV")
    plan = plan_kernel(spec, Target("triton", "cpu", None), d, dv)
    assert plan.tiling.d_chunks == head_dim_chunks(d) and len(plan.tiling.d_chunks) == 2 and sum(plan.tiling.d_chunks) == d
    padded_plan = plan_kernel(spec, Target("triton", "cpu", None), d, dv, PlanOptions(chunk_head_dim=False))
    assert padded_plan.tiling.d_chunks == (padded_plan.tiling.block_d,) and padded_plan.tiling.block_d > d
    sizes = {"B": 2, "H": h, "HKV": hkv, "M": 37, "N": 75, "D": d, "DV": dv}  # M past the decode regime
    q, k, v = qkv(spec, sizes)
    chunked = run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v))
    padded = run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v), options=PlanOptions(chunk_head_dim=False))
    assert torch.allclose(chunked[0], padded[0], atol=1e-5)


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_bshd_layout_non_contiguous_strides_and_dv(dtype):
    spec = _spec(dtype=dtype, layout="B, M, H, D", kv_layout="B, N, HKV, D", v_dim="DV")
    sizes = {"B": 2, "H": 4, "HKV": 2, "M": 21, "N": 40, "D": 48, "DV": 24}
    t = TORCH[dtype]
    # Slices of bigger tensors: no stride is what a contiguous tensor of this shape would have.
    q = torch.randn(2, 30, 4, 64, device=DEVICE).to(t)[:, 5:26, :, 3:51]
    k = torch.randn(2, 40, 2, 96, device=DEVICE).to(t)[..., ::2]
    v = torch.randn(3, 40, 2, 24, device=DEVICE).to(t)[1:]
    run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v))


def test_packed_gqa_heads_match_unpacked():
    spec = _spec(dtype="f32")
    sizes = {"B": 2, "H": 8, "HKV": 2, "M": 2, "N": 45, "D": 32, "DV": 32}
    q, k, v = qkv(spec, sizes)
    packed = run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v))
    plain = run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v), options=PlanOptions(pack_heads=False))
    assert torch.allclose(packed[0], plain[0], atol=1e-5)


def test_fully_masked_rows_give_zero_and_minus_inf():
    spec = EXAMPLES["key_padding"]  # mask j < kv_len[b]
    spec = replace(with_dtype(spec, "f32"), returns_lse=True)
    sizes = {"B": 3, "H": 2, "HKV": 2, "M": 9, "N": 40, "D": 32, "DV": 32}
    kv_len = torch.tensor([0, 17, 40], dtype=torch.int32, device=DEVICE)
    out, lse = run_and_check(spec, sizes, kwargs={"kv_len": kv_len})
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


def test_sink_on_empty_rows_and_n_zero():
    spec = _spec(masks="mask j < i", extra="input sinks: f32[H]", ret="softmax(score, sink=sinks[h]) @ v, lse")
    sizes = {"B": 1, "H": 2, "HKV": 2, "M": 20, "N": 20, "D": 16, "DV": 16}
    sinks = torch.randn(2, device=DEVICE)
    out, lse = run_and_check(spec, sizes, kwargs={"sinks": sinks})  # row 0 keeps nothing: lse = the sink
    assert torch.allclose(lse[0, :, 0], sinks) and (out[0, :, 0] == 0).all()
    run_and_check(spec, {**sizes, "N": 0}, kwargs={"sinks": sinks})


def test_empty_query():
    spec = _spec()
    out, lse = attnc.compile(spec)(*qkv(spec, {"B": 1, "H": 2, "HKV": 2, "M": 0, "N": 5, "D": 16, "DV": 16}))
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_score_and_mask_expressions():
    """Floored %, true /, float/int mixes, where/min/max/abs/floor/exp/log/sqrt/sigmoid/tanh, bool params."""
    extra = "param flip: bool = true\nparam c: f32 = 3.5\ninput t: f16[H, M]"
    score = ("score = where(flip, qk, -qk) * rsqrt(D) + (i - j) % 3 + (i - j) / 7 + min(abs(i - j), 4) * 0.1"
             " + floor(c) - max(c, t[h, i]) + exp(-abs(qk) / 8) + log(1 + sigmoid(qk)) + sqrt(c) * tanh(qk / c)")
    spec = _spec(masks="mask not (i - j) % 5 == 4 or i == j", extra=f"{extra}\n{score}")
    sizes = {"B": 1, "H": 2, "HKV": 2, "M": 34, "N": 34, "D": 16, "DV": 16}
    t = torch.randn(2, 34, device=DEVICE).half()
    for flip in (True, False):
        run_and_check(spec, sizes, kwargs={"flip": flip, "t": t, "c": 2.5})


def test_tile_summary_is_reused_and_follows_in_place_changes():
    spec = with_dtype(EXAMPLES["document_mask"], "f32")
    sizes = {"B": 2, "H": 2, "HKV": 1, "M": 40, "N": 70, "D": 16, "DV": 16}
    q, k, v = qkv(spec, sizes)
    doc = torch.sort(torch.randint(0, 3, (2, 70)), dim=-1).values.int().to(DEVICE)
    kernel = attnc.compile(spec)
    calls = []
    out = kernel(q, k, v, doc=doc)
    (launcher,) = kernel._impls.values()
    original = launcher.summary_fn
    launcher.summary_fn = type("Counting", (), {"__getitem__": lambda self, grid: (calls.append(grid),
                                                                                   original[grid])[1]})()
    again = kernel(q, k, v, doc=doc)
    assert calls == [] and torch.equal(out, again)  # unchanged mask tensor: the summary is reused
    doc[:, 35:] += 1  # in place: a new document starts at key 35
    assert_matches(spec, kernel(q, k, v, doc=doc), attnc.reference(spec, q, k, v, doc=doc))
    assert len(calls) == 1


def test_call_errors_name_the_argument():
    spec = EXAMPLES["document_mask"]
    sizes = example_sizes(spec)
    q, k, v = qkv(spec, sizes)
    kernel = attnc.compile(spec)
    with pytest.raises(CallError, match="doc"):
        kernel(q, k, v)
    with pytest.raises(CallError, match="q: expected dtype bf16"):
        kernel(q.float(), k, v, doc=torch.zeros(2, 75, dtype=torch.int32))
    with pytest.raises(CallError, match="window"):
        kernel(q, k, v, doc=torch.zeros(2, 75, dtype=torch.int32), window=3)
