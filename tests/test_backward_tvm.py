"""The TVM CPU backward (backends/tvm/backward.py) against torch autograd through attnc.reference (float64):
every example spec with dense storage, its forward run with lse through the TVM backend, then build_backward's
gradients of q, k, v and every float input table, on seeded random inputs with NaN-poisoned gradient buffers.
Each spec runs in f32 (tolerance 4e-5 of the largest gradient) on two shapes: one tile of queries with dlse
given, and several query tiles with more queries than keys (causal masks leave whole rows empty) without dlse.
A few run in their own bf16 / f16 as well. The kernels are built once per spec for the module (one cache)."""
import math
from dataclasses import replace

import pytest
import torch

import attnc

pytest.importorskip("tvm")
from attnc.backends import get_backend
from attnc.backends.tvm import launch as tvm_launch
from attnc.dsl.signature import bind
from attnc.errors import CompileError
from attnc.passes import PlanOptions, plan_kernel
from attnc.passes.grad import derive
from attnc.passes.plan import Target

from test_triton_kernels import TOL, TORCH, example_kwargs, example_sizes, example_specs, with_dtype

pytestmark = pytest.mark.shared_cache

DENSE = [s for s in example_specs() if s.q_storage is None and s.kv_storage is None]
# (M, N, dlse given): one query tile; then several, with M > N (empty rows under causal masks) and no dlse
SHAPES = [(37, 75, True), (150, 70, False)]
# Of the largest gradient. f32: alibi_doc's random slopes times positions give logits near 150, which float32 holds
# to ~1e-5 (its worst gradients are 1.3e-5 and 1.6e-5 off; the other specs 1e-6 or less).
REL_TOL = {"f32": 4e-5, "f16": 3e-3, "bf16": 3e-2}


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    monkeypatch.setattr(tvm_launch, "empty",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))


def _inputs(spec, m, n, seed):
    torch.manual_seed(seed)
    sizes = dict(example_sizes(spec, m, n))
    q, k, v = (torch.randn([sizes[s] for s in t.shape]).to(TORCH[t.dtype]) for t in (spec.q, spec.k, spec.v))
    return sizes, (q, k, v), example_kwargs(spec, sizes, "cpu")


def _reference_grads(spec, qkv, kwargs, dout, dlse, tables):
    """Gradients of sum(out * dout) [+ sum(lse * dlse) over rows that keep a key] by autograd in float64."""
    spec64 = with_dtype(replace(spec, returns_lse=True), "f64")
    leaves = {role: t.double().requires_grad_() for role, t in zip("qkv", qkv)}
    kwargs = {name: (value.detach().requires_grad_() if name in tables else value) for name, value in kwargs.items()}
    leaves.update({name: kwargs[name] for name in tables})
    out, lse = attnc.reference(spec64, leaves["q"], leaves["k"], leaves["v"], **kwargs)
    loss = (out * dout.double()).sum() + sum(x.sum() * 0 for x in leaves.values())  # M = 0: every gradient 0
    if dlse is not None:
        loss = loss + (torch.where(lse > -math.inf, lse, 0.0) * dlse.double()).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


_BACKWARDS: dict = {}


def _run(spec, m, n, with_dlse, seed=0, strided_dout=False):
    spec = replace(spec, returns_lse=True)
    sizes, (q, k, v), kwargs = _inputs(spec, m, n, seed)
    kernel = attnc.compile(spec, backend="tvm")
    out, lse = kernel(q, k, v, **kwargs)
    key = (spec.key, sizes["D"], sizes["DV"])
    if key not in _BACKWARDS:
        _BACKWARDS[key] = get_backend("tvm").build_backward(kernel.plan("cpu", sizes["D"], sizes["DV"]))
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    if strided_dout:  # as autograd may pass it: the head dim not contiguous
        dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    grads = _BACKWARDS[key](bind(spec, q, k, v, kwargs), out, lse, dout, dlse, True)
    tables = derive(spec).tables
    want = _reference_grads(spec, (q, k, v), kwargs, dout, dlse, tables)
    assert set(grads) == set(want) == {"q", "k", "v", *tables}
    tensors = {"q": q, "k": k, "v": v, **kwargs}
    for name, ref in want.items():
        got = grads[name]
        assert got.shape == tensors[name].shape and got.dtype == tensors[name].dtype, name
        assert not got.isnan().any() and not ref.isnan().any(), name
        if not ref.numel():
            continue
        scale = max(ref.abs().max().item(), 1e-3)
        err = (got.double() - ref.double()).abs().max().item()
        assert err <= REL_TOL[spec.q.dtype] * scale, (name, err, scale)
    return grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}{'-dlse' if s[2] else ''}")
@pytest.mark.parametrize("spec", DENSE, ids=lambda s: s.name)
def test_example_gradients_f32(spec, shape):
    _run(with_dtype(spec, "f32"), *shape)


@pytest.mark.parametrize("name", ["sinks", "key_padding"])
def test_example_gradients_in_own_dtype(name):
    """bf16 (GQA with sinks) and f16 (rows without keys) inputs and gradients, computed in float32."""
    spec = next(s for s in DENSE if s.name == name)
    assert spec.q.dtype in ("bf16", "f16")
    _run(spec, 150, 70, True)


@pytest.mark.parametrize("m, n", [(5, 0), (0, 7), (1, 1), (3, 130)])
def test_empty_and_small_shapes(m, n):
    """No keys (the sinks still take a gradient), no queries, single elements, decode-sized M; dout strided."""
    _run(with_dtype(next(s for s in DENSE if s.name == "sinks"), "f32"), m, n, True, strided_dout=True)


def test_backward_is_deterministic():
    spec = next(s for s in DENSE if s.name == "alibi")
    first, second = (_run(with_dtype(spec, "f32"), 150, 70, True) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cuda_backward_goes_to_triton():
    spec = replace(DENSE[0], returns_lse=True)
    plan = plan_kernel(spec, Target("tvm", "cuda", 90), 64, 64, PlanOptions())
    with pytest.raises(CompileError, match="triton"):
        get_backend("tvm").build_backward(plan)
