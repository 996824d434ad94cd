"""Multi-head latent attention (MLA) through the FlexAttention-style front-end: `flex_attention((q, q_pe),
(ckv, k_pe), ckv, ...)` sums the pairs' dot products in the score, and a value that is the first key tensor makes
the values the keys (docs/mla.md). The same key as the text spec and the decorator, the meaning of the tuples
(the concatenated tensors' attention), the Triton kernel (the interpreter on the CPU) against the float64
reference with NaN-poisoned outputs, and call errors that name the argument."""
import pytest
import torch

import attnc
from attnc.errors import CallError
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, assert_matches, poisoned_outputs,
)

pytestmark = pytest.mark.shared_cache

D, DR = 32, 16
TRITON = {"backend": "triton"}  # MLA runs on Triton only (docs/mla.md)
slopes = 2.0 ** -torch.arange(1.0, 9.0, device=DEVICE)  # captured by alibi: an input named slopes


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def alibi(score, b, h, q_idx, kv_idx):
    return score + slopes[h] * (kv_idx - q_idx)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _latent(b, h, m, n, kv_heads=None):
    """q, q_pe, c_kv, k_pe: the latent cache [B, N, D] (kv_heads None) or [B, kv_heads, N, D]."""
    kv = (b, n) if kv_heads is None else (b, kv_heads, n)
    return _randn(b, h, m, D), _randn(b, h, m, DR), _randn(*kv, D), _randn(*kv, DR)


def _text(k_shape: str, score: str, extra: str = "", returns: str = "") -> attnc.Attention:
    return attnc.parse(f"""
attention text {{
    dims DR = {DR}
    q: f32[B, H, M, D]
    k: f32[{k_shape}, D]
    input qr: f32[B, H, M, DR]
    input kr: f32[{k_shape}, DR]
    {extra}
    score = {score}
    return softmax(score) @ k{returns}
}}""")[0]


# ---------------------------------------------------------------- one spelling per front-end, one key


def test_the_flex_spelling_has_the_text_specs_key():
    q, qr, ckv, kpe = _latent(2, 8, 3, 40)
    flexed = attnc.flex_spec((q, qr), (ckv, kpe), ckv, scale=0.11)
    assert flexed.shares_kv and flexed.one_kv_head and flexed.is_latent
    assert flexed.key == _text("B, N", "(q @ k + qr @ kr) * 0.11").key
    # a score_mod, a block mask (top-left, as FlexAttention's), lse, the default scale: 1/sqrt of D + DR
    bm = attnc.create_block_mask(causal, None, None, 3, 40)
    flexed = attnc.flex_spec((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm, return_lse=True)
    text = _text("B, N", "(q @ k + qr @ kr) * rsqrt(D + DR)\n    score = score + slopes[h] * (j - i)\n    mask i >= j",
                 extra="input slopes: f32[H]", returns=", lse")
    assert flexed.key == text.key


def test_three_front_ends_one_key_with_a_head_axis_of_one():
    """k [B, 1, N, D] (a head axis of 1, as FlexAttention's GQA takes it, with enable_gqa=True) is `k: [B, HKV, N,
    D]`; the decorator spells it `softmax(...) @ k` of a function taking (q, k)."""
    q, qr, ckv, kpe = _latent(2, 4, 3, 40, kv_heads=1)

    @attnc.attention
    def mla(q, k, *, qr: attnc.Tensor, kr: attnc.Tensor):
        return attnc.softmax((q @ k + qr @ kr) * 0.11) @ k

    flexed = attnc.flex_spec((q, qr), (ckv, kpe), ckv, scale=0.11, enable_gqa=True)
    text = _text("B, HKV, N", "(q @ k + qr @ kr) * 0.11")
    assert flexed.key == text.key == mla.trace(q, ckv, qr=qr, kr=kpe).key


def test_more_pairs_and_a_value_of_its_own():
    """Three pairs name their tensors qr, kr, DR then qr2, kr2, DR2; a value that is not key[0] is a v."""
    q, qr, ckv, kpe = _latent(1, 4, 3, 20, kv_heads=4)
    qr2, kr2, v = _randn(1, 4, 3, 8), _randn(1, 4, 20, 8), _randn(1, 4, 20, 24)
    flexed = attnc.flex_spec((q, qr, qr2), (ckv, kpe, kr2), v, scale=0.5)
    text = attnc.parse(f"""attention t {{
        dims DR = {DR}, DR2 = 8
        q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, DV]
        input qr: f32[B, H, M, DR]  input kr: f32[B, H, N, DR]
        input qr2: f32[B, H, M, DR2]  input kr2: f32[B, H, N, DR2]
        score = (qk + qr @ kr + qr2 @ kr2) * 0.5
        return softmax(score) @ v }}""")[0]
    assert flexed.key == text.key and not flexed.shares_kv
    # 1-tuples: the values are the keys, with no second dot product
    alone = attnc.flex_spec((q,), (ckv,), ckv)
    assert alone.shares_kv and len(alone.dots) == 1 and alone.score == attnc.ir.default_score()
    # a key without a head axis needs no tuple: it is a latent cache, whose values are the keys
    headless = ckv[:, 0]
    assert attnc.flex_spec(q, headless, headless).key == attnc.flex_spec((q,), (headless,), headless).key
    assert attnc.flex_spec(q, headless, headless).one_kv_head


def test_the_tuples_mean_the_concatenated_tensors():
    """The reference of the latent spelling is FlexAttention's concatenated form, q = [q | q_pe],
    k = [c_kv | k_pe], v = c_kv, computed as plain attention (its default scale is 1/sqrt(D + DR) too)."""
    torch.manual_seed(0)
    q, qr, ckv, kpe = _latent(2, 8, 5, 30)
    bm = attnc.create_block_mask(causal, None, None, 5, 30)
    latent = attnc.flex_spec((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm, return_lse=True)
    qcat, kcat = torch.cat([q, qr], -1), torch.cat([ckv, kpe], -1)[:, None]
    plain = attnc.flex_spec(qcat, kcat, ckv[:, None], score_mod=alibi, block_mask=bm, enable_gqa=True,
                            return_lse=True)
    out, lse = attnc.reference(latent, q, ckv, qr=qr, kr=kpe, slopes=slopes)
    want, want_lse = attnc.reference(plain, qcat, kcat, ckv[:, None], slopes=slopes)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the kernel


@pytest.mark.parametrize("b, h, m, n, kv_heads", [
    (1, 8, 1, 300, None),  # decode over a latent cache without a head axis; split-KV merged through lse
    (2, 8, 5, 70, None),   # a few tokens per sequence
    (2, 8, 3, 90, 1),      # a head axis of 1 (enable_gqa=True)
])
def test_flex_mla_matches_the_reference(b, h, m, n, kv_heads):
    torch.manual_seed(b * 1000 + m * 100 + n)
    q, qr, ckv, kpe = _latent(b, h, m, n, kv_heads)
    bm = attnc.create_block_mask(causal, None, None, m, n)
    out, lse = attnc.flex_attention((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm,
                                    enable_gqa=kv_heads is not None, return_lse=True, kernel_options=TRITON)
    spec = attnc.flex_spec((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm,
                           enable_gqa=kv_heads is not None, return_lse=True)
    assert out.shape == (b, h, m, D)
    assert_matches(spec, (out, lse), attnc.reference(spec, q, ckv, qr=qr, kr=kpe, slopes=slopes), tol=1e-5)


def test_flex_mla_variants_run():
    """A value of its own beside a second dot product, and the values as keys alone (1-tuples); the second call
    of each runs the cached kernel with new tensors."""
    for seed in (1, 2):
        torch.manual_seed(seed)
        q, qr, k, kr = _latent(2, 4, 6, 50, kv_heads=2)
        v = _randn(2, 2, 50, 24)
        for query, key, value in (((q, qr), (k, kr), v), ((q,), (k,), k)):
            spec = attnc.flex_spec(query, key, value, scale=0.2, enable_gqa=True)
            got = attnc.flex_attention(query, key, value, scale=0.2, enable_gqa=True, kernel_options=TRITON)
            args = (q, k) if value is k else (q, k, v)
            want = attnc.reference(spec, *args, **({} if value is k else dict(qr=qr, kr=kr)))
            assert_matches(spec, got, want, tol=1e-5)


# ---------------------------------------------------------------- call errors name the argument


def _errors():
    q, qr, ckv, kpe = _latent(1, 4, 3, 20)
    return [
        (((q, qr), ckv, ckv), {}, r"query: a tuple, but key is not"),
        ((q, (ckv, kpe), ckv), {}, r"key: a tuple, but query is not"),
        (((q, qr), (ckv,), ckv), {}, r"key: a tuple of 1 tensors, but query has 2"),
        (((), (), ckv), {}, r"query: an empty tuple"),
        (((q, qr.tolist()), (ckv, kpe), ckv), {}, r"query\[1\]: expected a torch.Tensor, got list"),
        (((q, qr), (ckv, kpe[:, :10]), ckv), {}, r"key\[1\]: expected torch.float32 with key\[0\]'s shape but for "
                                                 r"its head dim, \(1, 20, ·\), got torch.float32 \(1, 10, 16\)"),
        (((q, qr.half()), (ckv, kpe), ckv), {}, r"query\[1\]: expected torch.float32 .* got torch.float16"),
        (((q, qr), (ckv, kpe[..., :8]), ckv), {}, r"key\[1\]: head dim 8, but query\[1\]'s is 16: the two sides"),
        (((q, qr), (ckv, kpe), ckv.clone()), {}, r"value: key\[0\] has no head axis .* pass that very tensor"),
        ((q, ckv, ckv.clone()), {}, r"value: key has no head axis"),
        ((q.tolist(), ckv, ckv), {}, r"query: expected a torch.Tensor, got list"),
        ((q[0], ckv, ckv), {}, r"q: expected a 4-dim torch.Tensor in BHSD layout, got shape \(4, 3, 32\)"),
        (((q, qr), (ckv[:, None], kpe[:, None]), ckv[:, None]), {},
         r"k: has 1 heads but q has 4; pass enable_gqa=True"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_call_errors_name_the_argument(case):
    args, kwargs, words = _errors()[case]
    for fn in (attnc.flex_spec, attnc.flex_attention):
        with pytest.raises(CallError, match=words):
            fn(*args, **kwargs)


def test_a_captured_tensor_may_not_take_a_dot_products_name():
    q, qr, ckv, kpe = _latent(1, 4, 3, 20)
    kr = torch.ones(4)

    def biased(score, b, h, q_idx, kv_idx):
        return score + kr[h]

    with pytest.raises(CallError, match=r"key\[1\] is the spec's input 'kr', and a mod captures a tensor of that "
                                        r"name; rename the variable"):
        attnc.flex_spec((q, qr), (ckv, kpe), ckv, score_mod=biased)


def test_the_tvm_backend_says_mla_runs_on_triton():
    q, qr, ckv, kpe = _latent(1, 4, 3, 20)
    with pytest.raises(attnc.CompileError, match="backend='triton'"):
        attnc.flex_attention((q, qr), (ckv, kpe), ckv, kernel_options={"backend": "tvm"})


def test_explain_takes_the_latent_call():
    q, qr, ckv, kpe = _latent(1, 4, 3, 20)
    bm = attnc.create_block_mask(causal, None, None, 3, 20)
    got = attnc.explain(attnc.flex_attention, (q, qr), (ckv, kpe), ckv, block_mask=bm).summary()
    want = attnc.explain(attnc.flex_spec((q, qr), (ckv, kpe), ckv, block_mask=bm), shape=(1, 4, 3, 20, D)).summary()
    assert got == want and "B=1 H=4 M=3 N=20 D=32" in got


def test_torch_compile_traces_the_latent_call():
    torch.manual_seed(4)
    q, qr, ckv, kpe = _latent(1, 8, 3, 40)
    bm = attnc.create_block_mask(causal, None, None, 3, 40)

    def run(q, qr, ckv, kpe):
        return attnc.flex_attention((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm, kernel_options=TRITON)

    spec = attnc.flex_spec((q, qr), (ckv, kpe), ckv, score_mod=alibi, block_mask=bm)
    run(q, qr, ckv, kpe)  # traced and compiled eagerly first: Dynamo cannot trace a mod's tracing (as for any flex call)
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(q, qr, ckv, kpe)
    assert_matches(spec, got, attnc.reference(spec, q, ckv, qr=qr, kr=kpe, slopes=slopes), tol=1e-5)
