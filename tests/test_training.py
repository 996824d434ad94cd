"""Training through the public API (attnc/runtime/autograd.py): gradients of every example spec with dense storage
on both CPU backends against torch autograd through attnc.reference (float64), torch.compile(fullgraph=True)
including dynamic shapes, torch.library.opcheck, lse gradients, double backward, determinism, and the training
example's loss curve against the same model with attention in plain torch."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.passes.grad import derive

from test_triton_kernels import example_kwargs, example_sizes, example_specs, with_dtype

pytestmark = pytest.mark.shared_cache

DENSE = [s for s in example_specs() if s.q_storage is None and s.kv_storage is None]
BACKENDS = ["tvm", "triton"]  # on CPU: TVM through LLVM, Triton through its interpreter
F32_TOL = 2e-5  # dq, dk, dv sum over keys or queries: a little above f32's 1e-5
# A table's gradient sums dS * d score / d table over every (b, h, i, j) it is read at, terms that cancel (a row's dS
# sums to 0): with example_kwargs' N(0, 1) ALiBi slopes (logits up to ~150) f32 scores leave ~1e-4 of the largest (1.02e-4 seen on TVM).
TABLE_TOL = 3e-4


def _leaves(spec, sizes, seed, device="cpu"):
    """q, k, v and the float inputs as leaves that require grad; other inputs and params as they are."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn([sizes[n] for n in d.shape], device=device, dtype=torch.float32).requires_grad_()
               for d in (spec.q, spec.k, spec.v))
    kwargs = example_kwargs(spec, sizes, device)
    tables = [t.name for t in spec.inputs if t.dtype.startswith("f")]
    for name in tables:
        kwargs[name] = kwargs[name].float().requires_grad_()
    return q, k, v, kwargs, tables


def _grads(fn, spec, q, k, v, kwargs, tables, seed):
    """Gradients of a random linear function of out (and of lse where the spec returns it)."""
    result = fn(q, k, v, **kwargs)
    out, lse = result if spec.returns_lse else (result, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
    if lse is not None:
        finite = lse > -math.inf
        upstream = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.device)
        loss = loss + (torch.where(finite, lse.double(), 0.0) * upstream).sum()
    leaves = [q, k, v, *(kwargs[name] for name in tables)]
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _check_grads(got, want, names):
    for index, (name, g, w) in enumerate(zip(names, got, want)):
        tol = F32_TOL if index < 3 else TABLE_TOL
        w = torch.zeros_like(g) if w is None else w
        assert g is not None and g.shape == w.shape, name
        assert not g.isnan().any(), f"{name}: NaN in the gradient"
        scale = max(1.0, w.abs().max().item())
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", DENSE, ids=lambda s: s.name)
def test_example_gradients_match_reference(spec, backend):
    spec = with_dtype(spec, "f32")
    sizes = example_sizes(spec, m=37, n=53)
    q, k, v, kwargs, tables = _leaves(spec, sizes, seed=7)
    kernel = attnc.compile(spec, backend=backend)
    got = _grads(kernel, spec, q, k, v, kwargs, tables, seed=8)
    want = _grads(lambda *a, **kw: attnc.reference(spec, *a, **kw), spec, q, k, v, kwargs, tables, seed=8)
    _check_grads(got, want, ["q", "k", "v", *tables])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_and_fully_masked_rows(backend):
    """lse returned to the caller carries gradient; rows that keep no key (a window of 0 for the first rows
    under `j >= lo[b]`) give zero gradients, never NaN."""
    spec = attnc.parse("""attention rows {
        q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, DV]
        input lo: i32[B]
        input sinks: f32[H]
        mask causal
        mask j >= lo[b]
        return softmax(score, sink=sinks[h]) @ v, lse
    }""")[0]
    sizes = {"B": 2, "H": 4, "HKV": 2, "M": 33, "N": 33, "D": 24, "DV": 40}
    q, k, v, kwargs, tables = _leaves(spec, sizes, seed=3)
    kwargs["lo"] = torch.tensor([5, 40], dtype=torch.int32)  # batch 1 keeps nothing
    kernel = attnc.compile(spec, backend=backend)
    got = _grads(kernel, spec, q, k, v, kwargs, tables, seed=4)
    want = _grads(lambda *a, **kw: attnc.reference(spec, *a, **kw), spec, q, k, v, kwargs, tables, seed=4)
    _check_grads(got, want, ["q", "k", "v", *tables])
    assert got[0][1].abs().max() == 0 and got[2][1].abs().max() == 0


def test_integer_and_unused_inputs_get_no_gradient():
    spec = with_dtype(next(s for s in DENSE if s.name == "document_mask"), "f32")
    sizes = example_sizes(spec)
    q, k, v, kwargs, _ = _leaves(spec, sizes, seed=1)
    out = attnc.compile(spec, backend="tvm")(q, k, v, **kwargs)
    assert out.requires_grad and out.grad_fn is not None
    assert derive(spec).tables == ()


@pytest.mark.parametrize("loss_reads", ["out", "lse", "both"])
def test_eager_training_runs_without_the_ops(monkeypatch, loss_reads):
    """Outside torch.compile a call trains through a plain autograd.Function (no torch.library dispatch: host time,
    benchmarks/NOTES.md issue 12), whose backward gets no zero-filled gradient for an output the loss does not read:
    out, lse or both read, the gradients (NaN-poisoned buffers) match the reference's."""
    from attnc.backends.triton import launch
    from attnc.runtime import autograd

    def op(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(autograd, "attention_op", op)
    monkeypatch.setattr(autograd, "attention_backward_op", op)
    spec = with_dtype(next(s for s in DENSE if s.name == "causal_lm"), "f32")
    assert spec.returns_lse
    q, k, v, kwargs, _ = _leaves(spec, example_sizes(spec, m=37, n=53), seed=11)
    g = torch.Generator().manual_seed(12)
    weights = {"out": torch.randn(q.shape, generator=g, dtype=torch.float64),
               "lse": torch.randn(q.shape[:-1], generator=g, dtype=torch.float64)}

    def grads(fn):
        out, lse = fn(q, k, v)
        parts = {"out": (out.double() * weights["out"]).sum(),
                 "lse": (torch.where(lse > -math.inf, lse.double(), 0.0) * weights["lse"]).sum()}
        loss = sum(parts[name] for name in (("out", "lse") if loss_reads == "both" else (loss_reads,)))
        return torch.autograd.grad(loss, [q, k, v], allow_unused=True)  # lse does not read v

    with launch.poisoned_outputs():
        got = grads(attnc.compile(spec, backend="triton"))
    want = grads(lambda *a: attnc.reference(spec, *a))
    _check_grads(got, want, ["q", "k", "v"])


def test_double_backward_is_a_clear_error():
    spec = with_dtype(next(s for s in DENSE if s.name == "causal_lm"), "f32")
    sizes = example_sizes(spec, m=8, n=8)
    q, k, v, kwargs, _ = _leaves(spec, sizes, seed=2)
    out, _ = attnc.compile(spec, backend="tvm")(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(attnc.AttncError, match="double backward"):
        dq.sum().backward()


def test_deterministic_backward_repeats_bit_for_bit():
    spec = with_dtype(next(s for s in DENSE if s.name == "alibi"), "f32")
    sizes = example_sizes(spec)
    q, k, v, kwargs, tables = _leaves(spec, sizes, seed=5)
    kernel = attnc.compile(spec, backend="triton", deterministic=True)
    first = _grads(kernel, spec, q, k, v, kwargs, tables, seed=6)
    second = _grads(kernel, spec, q, k, v, kwargs, tables, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(dynamic):
    spec = with_dtype(next(s for s in DENSE if s.name == "alibi"), "f32")
    kernel = attnc.compile(spec, backend="tvm")

    def layer(q, k, v, slopes):
        return (kernel(q, k, v, slopes=slopes) * 2.0).sum()

    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for m in (19, 29):
        sizes = example_sizes(spec, m=m, n=m + 4)
        q, k, v, kwargs, tables = _leaves(spec, sizes, seed=m)
        got = torch.autograd.grad(compiled(q, k, v, kwargs["slopes"]), [q, k, v, kwargs["slopes"]])
        want = torch.autograd.grad(layer(q, k, v, kwargs["slopes"]), [q, k, v, kwargs["slopes"]])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_decorator_and_flex_attention_train_under_torch_compile():
    @attnc.attention(backend="tvm")
    def softcapped(q, k, v):
        s = 30.0 * attnc.tanh((q @ k) * q.D ** -0.5 / 30.0)
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * 0.1

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, requires_grad=True) for _ in range(3))
    for fn in (lambda q, k, v: softcapped(q, k, v),
               lambda q, k, v: attnc.flex_attention(q, k, v, score_mod=score_mod, kernel_options={"backend": "tvm"})):
        eager = torch.autograd.grad(fn(q, k, v).sum(), [q, k, v])
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        traced = torch.autograd.grad(compiled(q, k, v).sum(), [q, k, v])
        for g, w in zip(traced, eager):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["causal_lm", "alibi", "sinks"])
def test_opcheck(name):
    spec = with_dtype(next(s for s in DENSE if s.name == name), "f32")
    kernel = attnc.compile(spec, backend="tvm")
    sizes = example_sizes(spec, m=9, n=12)
    q, k, v, kwargs, tables = _leaves(spec, sizes, seed=11)
    key = kernel.op_key
    inputs = [kwargs[t.name] for t in spec.inputs]
    params = torch.tensor([kwargs.get(p.name, p.default) for p in spec.params], dtype=torch.float64)
    torch.library.opcheck(torch.ops.attnc.attention.default, (key, q, k, v, inputs, params))


def test_training_example_matches_plain_torch():
    """examples/train_gpt.py: the attnc model's losses follow the plain-torch model's step for step, and the
    torch attention it is compared with agrees with attnc.reference in float64."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "train_gpt.py"
    module_spec = importlib.util.spec_from_file_location("train_gpt", path)
    train_gpt = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(train_gpt)

    spec = attnc.parse(train_gpt.SPEC.format(dtype="f32"))[0]
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    torch.testing.assert_close(train_gpt.torch_attention(q, k, v, 48, 30.0).double(),
                               attnc.reference(spec, q, k, v, window=48, cap=30.0), rtol=1e-5, atol=1e-5)
    theirs = train_gpt.train(12, attention="torch", batch_size=4)
    ours = train_gpt.train(12, attention="attnc", batch_size=4, backend="tvm")
    assert ours[-1] < ours[0]
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-3 * abs(b), (ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("spec", DENSE, ids=lambda s: s.name)
def test_example_gradients_on_gpu(spec, dtype):
    spec = with_dtype(spec, dtype)
    sizes = example_sizes(spec, m=300, n=517)
    torch.manual_seed(0)
    leaves = _leaves(with_dtype(spec, "f32"), sizes, seed=9, device="cuda")
    q, k, v = (t.detach().to(getattr(torch, {"bf16": "bfloat16", "f16": "float16"}[dtype])).requires_grad_()
               for t in leaves[:3])
    kwargs, tables = leaves[3], leaves[4]
    for name in tables:  # N(0, 1) ALiBi slopes over 500 keys make logits of ~1000, where bf16 inputs and f32 scores
        # keep too few digits for a table gradient that sums cancelling terms; real slopes are 2^-1 .. 2^-8
        kwargs[name] = (kwargs[name].detach() / 8).requires_grad_()
    got = _grads(attnc.compile(spec), spec, q, k, v, kwargs, tables, seed=10)
    want = _grads(lambda *a, **kw: attnc.reference(spec, *a, **kw), spec, q, k, v, kwargs, tables, seed=10)
    tol = 2e-2 if dtype == "bf16" else 4e-3
    for name, g, w in zip(["q", "k", "v", *tables], got, want):
        w = torch.zeros_like(g) if w is None else w
        rel = (g.double() - w.double()).norm() / max(w.double().norm().item(), 1e-6)
        assert not g.isnan().any() and rel <= tol, f"{name}: relative error {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])  # D = 128: on sm_90 the Gluon dK/dV kernel with dQ by TMA reduce-adds
def test_cuda_graph_captures_forward_and_backward(d):
    spec = attnc.parse("attention c { q: bf16[B,H,M,D] k: bf16[B,H,N,D] v: bf16[B,H,N,D] mask causal "
                       "return softmax(score) @ v }")[0]
    kernel = attnc.compile(spec)
    q, k, v = (torch.randn(2, 4, 256, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(kernel(q, k, v).float().sum(), [q, k, v])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.autograd.grad(kernel(q, k, v).float().sum(), [q, k, v])
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(captured, grads):
        torch.testing.assert_close(g, w)


def test_inductor_with_strided_views():
    """torch.compile's default backend (Inductor) checks that each op's outputs have the strides its fake gave:
    q, k, v as transposed views of one projection (a GPT block's layout) once failed that check in the backward."""
    spec = attnc.parse("""attention a {
        q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
        input slopes: f32[H]
        score = qk * rsqrt(D) + slopes[h] * (j - i)
        mask causal
        return softmax(score) @ v
    }""")[0]
    kernel = attnc.compile(spec, backend="tvm")

    def block(x, w, slopes):
        b, t, _ = x.shape
        qkv = (x @ w).view(b, t, 8, 16)
        q, k, v = (qkv[:, :, a:z].transpose(1, 2) for a, z in ((0, 4), (4, 6), (6, 8)))
        return kernel(q, k, v, slopes=slopes).square().sum()

    torch.manual_seed(0)
    x, w, slopes = torch.randn(2, 63, 32), torch.randn(32, 128, requires_grad=True), torch.rand(4, requires_grad=True)
    want = torch.autograd.grad(block(x, w, slopes), [w, slopes])
    got = torch.autograd.grad(torch.compile(block, fullgraph=True)(x, w, slopes), [w, slopes])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_eager_step_binds_the_call_once(monkeypatch):
    """An eager training step checks its arguments once (bind: host time, benchmarks/NOTES.md issue 12): the
    forward and backward take that bound call. Two steps of other sizes and strides, with a float table and a
    param, each match the reference's gradients (NaN-poisoned buffers); bad arguments still raise CallErrors."""
    from attnc.backends.triton import launch
    from attnc.dsl import signature
    from attnc.runtime import autograd, kernel as api

    binds = []

    def counted(*args):
        binds.append(args[0].name)
        return signature.bind(*args)

    monkeypatch.setattr(autograd, "bind", counted)
    monkeypatch.setattr(api, "bind", counted)
    spec = with_dtype(next(s for s in DENSE if s.name == "alibi"), "f32")
    kernel = attnc.compile(spec, backend="triton")
    for m, n, seed in ((19, 23, 3), (29, 17, 4)):
        q, k, v, kwargs, tables = _leaves(spec, example_sizes(spec, m=m, n=n), seed=seed)
        if seed == 4:  # other strides: q in [B, M, H, D] memory seen as the declared [B, H, M, D]
            q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        binds.clear()
        with launch.poisoned_outputs():
            got = _grads(kernel, spec, q, k, v, kwargs, tables, seed=seed)
        assert len(binds) == 1
        want = _grads(lambda *a, **kw: attnc.reference(spec, *a, **kw), spec, q, k, v, kwargs, tables, seed=seed)
        _check_grads(got, want, ["q", "k", "v", *tables])
    with pytest.raises(attnc.CallError, match="slopes"):
        kernel(q, k, v, slopes=kwargs["slopes"][:1])
