"""The generated kernels on a CUDA GPU (run on the lent H100 with `python -m pytest -m gpu`): every example spec
in bf16 and fp16 against attnc.reference with NaN-poisoned outputs, odd and larger shapes, decode with packed
GQA heads, padded head dims, and the Hopper warp-specialization option."""
import pytest
import torch

import attnc
from attnc.passes import PlanOptions
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    EXAMPLES, _spec, example_sizes, poisoned_outputs, run_and_check, with_dtype,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("m, n", [(37, 75), (300, 1000), (1, 517)])
def test_example_spec_gpu(name, dtype, m, n):
    spec = with_dtype(EXAMPLES[name], dtype)
    run_and_check(spec, example_sizes(spec, m=m, n=n), device="cuda")


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("m, n, h, hkv, d", [
    (1, 4099, 32, 8, 128), (4, 2000, 16, 2, 64), (129, 257, 8, 8, 80), (1000, 1000, 4, 1, 96),
    (77, 1500, 8, 4, 192), (512, 512, 2, 2, 256), (1, 1, 8, 1, 32),
])
def test_odd_shapes_gpu(dtype, m, n, h, hkv, d):
    spec = _spec(dtype=dtype)
    run_and_check(spec, {"B": 2, "H": h, "HKV": hkv, "M": m, "N": n, "D": d, "DV": d}, kwargs={}, device="cuda")


@pytest.mark.parametrize("layout", ["B, M, H, D", "B, H, M, D"])
def test_layouts_and_strides_gpu(layout):
    kv = layout.replace("H", "HKV").replace("M", "N")
    spec = _spec(dtype="bf16", layout=layout, kv_layout=kv, v_dim="DV")
    sizes = {"B": 3, "H": 8, "HKV": 2, "M": 333, "N": 700, "D": 128, "DV": 64}
    q, k, v = (torch.randn([sizes[n] * (2 if n == "D" else 1) for n in d.shape], device="cuda").bfloat16()
               for d in (spec.q, spec.k, spec.v))
    d, dv = sizes["D"], sizes["DV"]
    q, k = q[..., ::2], k[..., 64:64 + d]  # non-unit head-dim stride; a 128-wide slice at a 64-element offset
    v = v[..., :dv]
    run_and_check(spec, sizes, kwargs={}, tensors=(q, k, v), device="cuda")


def test_warp_specialization_option_gpu():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("warp specialization is a Hopper option")
    spec = with_dtype(EXAMPLES["causal_lm"], "bf16")
    run_and_check(spec, example_sizes(spec, m=1024, n=1024), options=PlanOptions(warp_specialize=True),
                  device="cuda")


def test_many_lengths_one_kernel_gpu():
    spec = with_dtype(EXAMPLES["sliding_window"], "bf16")
    kernel = attnc.compile(spec)
    for m, n, window in [(1, 100, 7), (64, 64, 100), (500, 900, 33), (3, 4096, 1000)]:
        sizes = example_sizes(spec, m=m, n=n)
        q, k, v = (torch.randn([sizes[x] for x in d.shape], device="cuda").bfloat16()
                   for d in (spec.q, spec.k, spec.v))
        out = kernel(q, k, v, window=window)
        ref = attnc.reference(spec, q, k, v, window=window)
        assert (out.double() - ref).abs().max() < 3e-2 * max(1.0, ref.abs().max().item())
    assert len(kernel._impls) == 1
