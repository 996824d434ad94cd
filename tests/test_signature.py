"""bind(): every check a call goes through, and what a checked call gives the kernels."""
import numpy as np
import pytest
import torch

import attnc
from attnc.dsl.signature import TORCH_DTYPES, bind, canonical_view, lse_shape, out_shape
from attnc.errors import CallError

SPEC = attnc.parse("""
attention sig {
    q: bf16[B, M, H, D]  k: bf16[B, N, HKV, D]  v: bf16[B, N, HKV, DV]
    param window: i32 = 64
    param cap: f32
    param causal_on: bool = true
    input slopes: f32[H]
    input doc: i32[B, N]
    input rel: f32[H, R]
    score = qk * rsqrt(D) + slopes[h] * (j - i) + rel[h, (i - j) % R]
    mask not causal_on or i + (N - M) >= j
    mask i - j < window
    mask doc[b, j] >= 0
    return softmax(score) @ v, lse
}
attention dense { dims D = 64  q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]  return softmax(score) @ v }
""")
GQA, DENSE = SPEC


def gqa_args(B=2, M=5, N=7, H=8, HKV=2, D=32, DV=48, R=3, device="cpu"):
    q = torch.randn(B, M, H, D, dtype=torch.bfloat16, device=device)
    k = torch.randn(B, N, HKV, D, dtype=torch.bfloat16, device=device)
    v = torch.randn(B, N, HKV, DV, dtype=torch.bfloat16, device=device)
    kwargs = dict(cap=30.0, slopes=torch.rand(H, device=device), rel=torch.randn(H, R, device=device),
                  doc=torch.randint(0, 3, (B, N), dtype=torch.int32, device=device))
    return (q, k, v), kwargs


def raises(match, spec, args, kwargs):
    with pytest.raises(CallError, match=match):
        bind(spec, *args, kwargs)


# ---------------------------------------------------------------- what a checked call gives


def test_bound_sizes_params_and_inputs():
    args, kwargs = gqa_args()
    bound = bind(GQA, *args, dict(kwargs, window=np.int64(16)))
    assert dict(bound.sizes) == dict(B=2, M=5, N=7, H=8, HKV=2, D=32, DV=48, R=3)
    assert bound.params == {"window": 16, "cap": 30.0, "causal_on": True}
    assert type(bound.params["window"]) is int
    assert set(bound.inputs) == {"slopes", "doc", "rel"} and bound.inputs["doc"] is kwargs["doc"]
    assert bound.q is args[0] and bound.k is args[1] and bound.v is args[2]
    assert out_shape(GQA, bound) == (2, 5, 8, 48)  # q's BSHD layout, DV in place of D
    assert lse_shape(bound) == (2, 8, 5)


def test_defaults_filled_and_int_accepted_for_f32():
    args, kwargs = gqa_args()
    bound = bind(GQA, *args, dict(kwargs, cap=3))
    assert bound.params["window"] == 64 and bound.params["causal_on"] is True
    assert bound.params["cap"] == 3.0 and type(bound.params["cap"]) is float


def test_hkv_and_dv_default_to_h_and_d_and_dims_fill_sizes():
    q, k, v = (torch.randn(1, 4, 6, 64) for _ in range(3))
    bound = bind(DENSE, q, k, v, {})
    assert bound.sizes["HKV"] == 4 and bound.sizes["DV"] == 64 and bound.sizes["N"] == 6
    assert out_shape(DENSE, bound) == (1, 4, 6, 64)


def test_empty_query_or_key_range_is_allowed():
    for M, N in ((0, 7), (5, 0), (0, 0)):
        args, kwargs = gqa_args(M=M, N=N)
        bound = bind(GQA, *args, kwargs)
        assert bound.sizes["M"] == M and bound.sizes["N"] == N


def test_bind_reads_no_tensor_data():
    """Meta tensors have no data: binding them proves the per-call check never syncs with the device."""
    args, kwargs = gqa_args(device="meta")
    assert bind(GQA, *args, kwargs).sizes["R"] == 3


def test_canonical_view_orders_batch_heads_sequence_dim():
    args, _ = gqa_args()
    for t, decl in zip(args, (GQA.q, GQA.k, GQA.v)):
        view = canonical_view(t, decl)
        assert torch.equal(view, t.transpose(1, 2)) and view.data_ptr() == t.data_ptr()


def test_torch_dtypes_cover_every_declared_dtype():
    assert set(TORCH_DTYPES) == set(attnc.ir.TENSOR_DTYPES)


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
def test_qkv_must_be_tensors(position, name):
    args, kwargs = gqa_args()
    args = list(args)
    args[position] = args[position].tolist()
    raises(rf"^{name}: expected a torch.Tensor bf16\[.*got list", GQA, args, kwargs)


def test_input_must_be_a_tensor():
    args, kwargs = gqa_args()
    raises(r"^slopes: expected a torch.Tensor f32\[H\], got list", GQA, args, dict(kwargs, slopes=[1.0] * 8))


def test_dtype_must_match_declaration():
    args, kwargs = gqa_args()
    raises(r"^q: expected dtype bf16 \(torch.bfloat16\).*got torch.float16", GQA,
           (args[0].half(), *args[1:]), kwargs)
    raises(r"^v: expected dtype bf16.*got torch.float32", GQA, (*args[:2], args[2].float()), kwargs)
    raises(r"^doc: expected dtype i32 \(torch.int32\).*got torch.int64.*\.to\(torch.int32\)", GQA, args,
           dict(kwargs, doc=kwargs["doc"].long()))


def test_rank_must_match_declaration():
    args, kwargs = gqa_args()
    raises(r"^k: expected 4 dims \[B, N, HKV, D\], got 3 dims", GQA, (args[0], args[1][0], args[2]), kwargs)
    raises(r"^rel: expected 2 dims \[H, R\], got 1 dims", GQA, args, dict(kwargs, rel=torch.randn(8)))


def test_sizes_of_one_name_must_agree():
    args, kwargs = gqa_args()
    q, k, v = args
    raises(r"^k: dim 1 \(N\) is 7 but v: dim 1 \(N\) is 6", GQA, (q, k, v[:, :6]), kwargs)
    raises(r"^q: dim 3 \(D\) is 32 but k: dim 3 \(D\) is 16", GQA, (q, k[..., :16], v), kwargs)
    raises(r"^q: dim 2 \(H\) is 8 but slopes: dim 0 \(H\) is 4", GQA, args, dict(kwargs, slopes=torch.rand(4)))
    raises(r"^q: dim 0 \(B\) is 2 but doc: dim 0 \(B\) is 3", GQA, args,
           dict(kwargs, doc=torch.zeros(3, 7, dtype=torch.int32)))


def test_compile_time_dims_must_match():
    q, k, v = (torch.randn(1, 4, 6, 32) for _ in range(3))
    raises(r"^q: dim 3 \(D\) is 32 but the spec binds D = 64", DENSE, (q, k, v), {})


def test_query_heads_must_be_a_multiple_of_kv_heads():
    args, kwargs = gqa_args(H=8, HKV=3)
    raises(r"^k: 3 key/value heads \(HKV\) do not divide the 8 query heads \(H\)", GQA, args, kwargs)


def test_sequences_take_at_most_2_to_the_30_positions():
    """Kernels compute positions, M and N (and position arithmetic such as ALiBi's) in int32; views of one element
    stand in for the long tensors."""
    small = torch.randn(1, 1, 4, 64)
    for n, fine in ((2 ** 30 + 1, False), (2 ** 30, True)):
        long = torch.zeros(1, 1, 1, 64).expand(1, 1, n, 64)
        for (q, k), axis in (((small, long), "k: dim 2 \\(N\\)"), ((long, small), "q: dim 2 \\(M\\)")):
            if fine:
                assert bind(DENSE, q, k, k, {}).sizes["N" if k is long else "M"] == n
            else:
                raises(rf"^{axis} is {n}; attnc's kernels take at most 2\^30 \(1,073,741,824\) positions a sequence",
                       DENSE, (q, k, k), {})


@pytest.mark.parametrize("size", ["B", "H", "HKV", "D", "DV", "R"])
def test_sizes_other_than_m_and_n_must_be_positive(size):
    args, kwargs = gqa_args(**{size: 0})
    raises(rf": dim \d \({size}\) is 0; every size but M and N must be at least 1", GQA, args, kwargs)


def test_tensors_must_share_a_device():
    args, kwargs = gqa_args()
    raises(r"^v: is on meta but q is on cpu", GQA, (*args[:2], args[2].to("meta")), kwargs)
    raises(r"^doc: is on meta but q is on cpu", GQA, args, dict(kwargs, doc=kwargs["doc"].to("meta")))


# ---------------------------------------------------------------- names and params


def test_missing_input_and_param_are_named():
    args, kwargs = gqa_args()
    raises(r"^rel: missing input tensor f32\[H, R\]; pass rel=", GQA, args,
           {k: v for k, v in kwargs.items() if k != "rel"})
    raises(r"^cap: missing param \(f32, no default\); pass cap=", GQA, args,
           {k: v for k, v in kwargs.items() if k != "cap"})


def test_unknown_keyword_suggests_closest_name():
    args, kwargs = gqa_args()
    raises(r"^windw: unknown argument for attention 'sig'; did you mean 'window'\?", GQA, args,
           dict(kwargs, windw=3))
    raises(r"^scale: unknown argument for attention 'dense' \(it takes: no keyword arguments\)", DENSE,
           tuple(torch.randn(1, 2, 3, 64) for _ in range(3)), {"scale": 0.1})


@pytest.mark.parametrize("name,value,expected", [
    ("window", 3.5, "i32 wants an int, got float 3.5"),
    ("window", True, "i32 wants an int, got bool True"),
    ("window", 2**31, "i32 value 2147483648 does not fit in 32 bits"),
    ("cap", "30", r"f32 wants a float \(or an int\), got str '30'"),
    ("cap", False, r"f32 wants a float \(or an int\), got bool False"),
    ("causal_on", 1, "bool wants a bool, got int 1"),
    ("cap", None, r"f32 wants a float \(or an int\), got NoneType None"),
])
def test_param_value_types(name, value, expected):
    args, kwargs = gqa_args()
    raises(rf"^{name}: param {expected}", GQA, args, dict(kwargs, **{name: value}))


def test_tensor_for_param_is_refused_with_a_hint():
    args, kwargs = gqa_args()
    raises(r"^window: param i32 wants an int \(a Python value\), got a torch.Tensor; "
           r".*window=t.item\(\).*input window: i32", GQA, args, dict(kwargs, window=torch.tensor(5)))
