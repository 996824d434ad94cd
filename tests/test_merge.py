"""attnc.merge_states: two partial results over disjoint key sets merge into the result over their union, as the
normalizer merges (softmax through the lse, sigmoid by summing). The halves and the whole come from the float64
reference (keys split with two masks); on CPU the Triton kernel runs in the interpreter (tests/conftest.py), and
the torch fallback is tested alongside."""
import math

import pytest
import torch

import attnc
import attnc.merge as merge_module
from attnc.errors import CallError

INF = math.inf
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Merging is computed in float32.
TOL = {torch.float64: dict(rtol=2e-5, atol=2e-6), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

DECLS = {
    "bhsd": "q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, DV]",
    "bshd": "q: f32[B, M, H, D]  k: f32[B, N, HKV, D]  v: f32[B, N, HKV, DV]",
    "thd": "q: f32[T, H, D]  k: f32[TK, HKV, D]  v: f32[TK, HKV, DV]  ragged q by cu_q  ragged k, v by cu_k",
}


def split_specs(layout, normalizer="softmax"):
    """The keys of a causal spec with ALiBi, split at a runtime position: half a, half b, and the whole."""
    def spec(name, mask):
        return (f"attention {name} {{ {DECLS[layout]}  input slopes: f32[H]  param split: i32\n"
                f"  score = qk * rsqrt(D) + slopes[h] * (j - i)\n  mask causal\n  mask {mask}\n"
                f"  return {normalizer}(score) @ v, lse }}\n")
    return attnc.parse(spec("a", "j < split") + spec("b", "j >= split") + spec("whole", "true"))


def random_call(layout, H=4, HKV=2, D=16, DV=24, seed=0):
    """q, k, v and inputs for a split spec, seeded; the packed batch has an empty key sequence (rows with no key)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {"slopes": torch.rand(H, generator=g)}
    if layout == "thd":
        m_lens, n_lens = [3, 2, 1, 4], [9, 0, 1, 6]
        q, k, v = (torch.randn(sum(m_lens), H, D, generator=g), torch.randn(sum(n_lens), HKV, D, generator=g),
                   torch.randn(sum(n_lens), HKV, DV, generator=g))
        kwargs["cu_q"], kwargs["cu_k"] = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
                                          for n in (m_lens, n_lens))
    else:
        B, M, N = 2, 5, 11
        shapes = ((B, H, M, D), (B, HKV, N, D), (B, HKV, N, DV))
        q, k, v = (torch.randn(s, generator=g) for s in shapes)
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return (q, k, v), kwargs


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Results start as NaN, so an element the merge fails to write fails the comparison."""
    monkeypatch.setattr(merge_module, "empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """The Triton kernel (the interpreter on CPU) or the torch fallback, each made the only one that may run."""
    def refuse(*_):
        raise AssertionError("the other merge path ran")

    if request.param == "torch":
        monkeypatch.setattr(merge_module, "_interpreting", lambda: False)
        monkeypatch.setattr(merge_module, "_merge_triton", refuse)
    else:
        if DEVICE == "cpu" and not merge_module._interpreting():
            pytest.skip("CPU tensors reach the Triton kernel only with TRITON_INTERPRET=1")
        monkeypatch.setattr(merge_module, "_merge_torch", refuse)
    return request.param


def assert_merged(out, lse, want_out, want_lse, halves=()):
    """`halves`: the partial outs as the merge got them, where they were rounded to out's dtype. Their rounding,
    an epsilon of each (the merge weighs each by at most 1), is then allowed on top of the tolerance: a sigmoid merge
    adds halves that may nearly cancel, leaving a small sum with the halves' rounding in it (one element in 10240 of
    a bf16 GPU run was 0.0225 off against 0.02 allowed)."""
    allowance = sum((h.double().abs() for h in halves), torch.zeros_like(want_out, dtype=torch.float64))
    allowance = allowance * torch.finfo(out.dtype).eps
    tol = TOL[out.dtype]
    excess = (out.double() - want_out.double()).abs() - (tol["atol"] + tol["rtol"] * want_out.double().abs() + allowance)
    assert not excess.isnan().any() and (excess <= 0).all(), \
        f"out off by up to {excess.max().item():.3g} over the tolerance, at {torch.unravel_index(excess.argmax(), excess.shape)}"
    torch.testing.assert_close(lse.double(), want_lse.double(), **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
@pytest.mark.parametrize("split", [0, 3, 7, 100])  # 0 / 100: one half has no key at all; 3, 7: some rows
def test_halves_merge_into_the_whole(layout, split, path):
    half_a, half_b, whole = split_specs(layout)
    args, kwargs = random_call(layout)
    out_a, lse_a = attnc.reference(half_a, *args, **kwargs, split=split)
    out_b, lse_b = attnc.reference(half_b, *args, **kwargs, split=split)
    want_out, want_lse = attnc.reference(whole, *args, **kwargs, split=split)
    out, lse = attnc.merge_states(out_a, lse_a, out_b, lse_b)
    assert out.shape == out_a.shape and out.dtype == torch.float64 and lse.dtype == torch.float32
    assert_merged(out, lse, want_out, want_lse)
    if layout == "thd":  # the empty key sequence: no key on either side gives out = 0, lse = -inf
        assert bool((lse[:, 3:5] == -INF).all()) and bool((out[3:5] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_out_keeps_its_dtype_and_an_empty_halfs_garbage_is_ignored(dtype, path):
    half_a, half_b, whole = split_specs("bhsd")
    args, kwargs = random_call("bhsd")
    out_a, lse_a = attnc.reference(half_a, *args, **kwargs, split=7)
    out_b, lse_b = attnc.reference(half_b, *args, **kwargs, split=7)
    want_out, want_lse = attnc.reference(whole, *args, **kwargs, split=7)
    assert bool((lse_b == -INF).any()) and bool((lse_b > -INF).any())
    out_b = out_b.masked_fill((lse_b == -INF)[..., None], float("nan"))  # rows with no key hold anything
    out, lse = attnc.merge_states(out_a.to(dtype), lse_a.float(), out_b.to(dtype), lse_b.float())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_merged(out, lse, want_out, want_lse)


@pytest.mark.parametrize("d", [1, 40, 128])
def test_random_states_against_the_formula(d, path):
    """Any out and lse, with rows empty on one side, on both, and non-contiguous inputs."""
    B, H, M = 2, 3, 7
    out_a, out_b = torch.randn(B, M, H, d).transpose(1, 2), torch.randn(B, H, M, d)  # a: a strided view
    lse_a, lse_b = torch.randn(B, H, M) * 4, torch.randn(B, H, M) * 4
    lse_a[0, :, :3] = -INF
    lse_b[0, :, 2:5] = -INF  # row 2: both empty
    lse_b[1, 1] = lse_a[1, 1] + 60.0  # one side dominates
    out, lse = attnc.merge_states(out_a, lse_a, out_b, lse_b, layout="bhsd")
    la, lb = lse_a.double(), lse_b.double()
    want_lse = torch.logaddexp(la, lb)
    base = torch.where(want_lse > -INF, want_lse, 0.0)
    want_out = torch.exp(la - base)[..., None] * out_a.double() + torch.exp(lb - base)[..., None] * out_b.double()
    assert_merged(out, lse, want_out, want_lse)
    assert bool((out[0, :, 2] == 0).all()) and bool((lse[0, :, 2] == -INF).all())


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
@pytest.mark.parametrize("split", [0, 3, 100])
def test_sigmoid_halves_sum_into_the_whole(layout, split, path):
    """Sigmoid weights are not normalised: the outs add up (an lse merge would average them), the lse of the
    whole is still the logaddexp of the halves'. The normalizer is given by name or as the spec."""
    half_a, half_b, whole = split_specs(layout, "sigmoid")
    args, kwargs = random_call(layout)
    out_a, lse_a = attnc.reference(half_a, *args, **kwargs, split=split)
    out_b, lse_b = attnc.reference(half_b, *args, **kwargs, split=split)
    want_out, want_lse = attnc.reference(whole, *args, **kwargs, split=split)
    for normalizer in ("sigmoid", whole, whole.normalizer):
        out, lse = attnc.merge_states(out_a, lse_a, out_b, lse_b, normalizer=normalizer)
        assert_merged(out, lse, want_out, want_lse)
    if split == 3:  # both halves hold keys: merging them as softmax's would be wrong
        averaged, _ = attnc.merge_states(out_a, lse_a, out_b, lse_b)
        assert not torch.allclose(averaged.double(), want_out)


def test_sigmoid_random_states_against_the_formula(path):
    """out = out_a + out_b where each side kept a key (an empty side's out, NaN here, is ignored)."""
    B, H, M, d = 2, 3, 7, 40
    out_a, out_b = torch.randn(B, M, H, d).transpose(1, 2), torch.randn(B, H, M, d)
    lse_a, lse_b = torch.randn(B, H, M) * 4, torch.randn(B, H, M) * 4
    lse_a[0, :, :3] = -INF
    lse_b[0, :, 2:5] = -INF  # row 2: both empty
    out_b[0, :, 2:5] = float("nan")
    out, lse = attnc.merge_states(out_a, lse_a, out_b, lse_b, layout="bhsd", normalizer="sigmoid")
    want_out = (torch.where((lse_a > -INF)[..., None], out_a, 0.0)
                + torch.where((lse_b > -INF)[..., None], out_b.nan_to_num(), 0.0))
    assert_merged(out, lse, want_out, torch.logaddexp(lse_a.double(), lse_b.double()))
    assert bool((out[0, :, 2] == 0).all()) and bool((lse[0, :, 2] == -INF).all())


def test_layout_is_inferred_or_named():
    out_bshd, lse = torch.randn(2, 5, 3, 8), torch.randn(2, 3, 5)
    other, lse_other = torch.randn(2, 5, 3, 8), torch.randn(2, 3, 5)
    inferred, _ = attnc.merge_states(out_bshd, lse, other, lse_other)
    named, _ = attnc.merge_states(out_bshd, lse, other, lse_other, layout="bshd")
    torch.testing.assert_close(inferred, named, rtol=0, atol=0)
    w = torch.exp(lse.transpose(1, 2))[..., None]  # row (b, m, h) pairs with lse[b, h, m]
    w_other = torch.exp(lse_other.transpose(1, 2))[..., None]
    torch.testing.assert_close(inferred, (w * out_bshd + w_other * other) / (w + w_other), rtol=2e-5, atol=2e-6)


def test_call_errors_name_the_argument():
    out, lse = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5)
    square_out, square_lse = torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4)
    cases = [
        ((out, lse, out[..., :4], lse), {}, r"^out_b: expected out_a's shape \(2, 3, 5, 8\)"),
        ((out, lse, out.half(), lse), {}, r"^out_b: expected out_a's shape .* and dtype torch.float32"),
        ((out, lse, out, lse[:, :2]), {}, r"^lse_b: expected lse_a's shape \(2, 3, 5\), got \(2, 2, 5\)"),
        ((out, lse.long(), out, lse), {}, r"^lse_a: expected a floating-point tensor, got torch.int64"),
        ((out, lse, out.tolist(), lse), {}, r"^out_b: expected a torch.Tensor, got list"),
        ((out, lse, out.to("meta"), lse), {}, r"^out_b: is on meta but out_a is on cpu"),
        ((out, lse[:, :, :4], out, lse[:, :, :4]), {}, r"^lse_a: shape \(2, 3, 4\) does not fit out_a \(2, 3, 5, 8\) "
                                                       r"in any layout: bhsd: out \[B, H, M, D\] with lse \[B, H, M\]"),
        ((square_out, square_lse, square_out, square_lse), {}, r"^layout: out_a \(2, 4, 4, 8\) with lse \(2, 4, 4\) "
                                                               r"fits both 'bhsd' and 'bshd' \(H == M\); pass layout="),
        ((out, lse, out, lse), {"layout": "thd"}, r"^lse_a: with layout 'thd', out \[T, H, D\] = \(2, 3, 5, 8\) "
                                                  r"needs lse \[H, T\] = None"),
        ((out, lse, out, lse), {"layout": "BHSD"}, r"^layout: expected one of 'bhsd', 'bshd', 'thd', got 'BHSD'"),
        ((out, lse, out, lse), {"normalizer": "relu"}, r"^normalizer: expected one of 'softmax', 'sigmoid', an "
                                                       r"attnc.Attention or None, got 'relu'"),
        ((out, lse, out, lse), {"normalizer": 2}, r"^normalizer: expected one of .* got 2"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(CallError, match=message):
            attnc.merge_states(*args, **kwargs)


def test_empty_rows_launch_nothing():
    out, lse = attnc.merge_states(torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0), torch.randn(2, 3, 0, 8),
                                  torch.randn(2, 3, 0))
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
def test_gpu_kernel_against_the_cpu_reference(dtype, layout, normalizer):
    half_a, half_b, whole = split_specs(layout, normalizer)
    args, kwargs = random_call(layout, H=8, HKV=2, D=64, DV=128)
    want_out, want_lse = attnc.reference(whole, *args, **kwargs, split=5)
    halves = [attnc.reference(spec, *args, **kwargs, split=5) for spec in (half_a, half_b)]
    (out_a, lse_a), (out_b, lse_b) = ((o.to("cuda", dtype), s.float().cuda()) for o, s in halves)
    out, lse = attnc.merge_states(out_a, lse_a, out_b, lse_b, normalizer=normalizer)
    assert out.is_cuda and out.dtype == dtype
    assert_merged(out.cpu(), lse.cpu(), want_out, want_lse, halves=(out_a.cpu(), out_b.cpu()))
