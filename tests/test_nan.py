"""NaN and inf in the inputs propagate as in the reference (DESIGN.md, Semantics), on TVM's CPU kernels and on Triton
(the interpreter here; the GPU variant runs the same code on CUDA tensors): a NaN in q, k, v, a param, a table value
or the sink makes exactly the rows it reaches NaN, out and lse alike, and leaves every other row as it was. (The
clamps of TVM's vectorised exp2 and its `l > 0` guards once turned such rows into "no kept key": out = 0, lse =
-inf.)"""
import math

import pytest
import torch

import attnc

pytestmark = pytest.mark.shared_cache

SOFTMAX = """attention nan_softmax {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    input bias: f32[H, N]
    input sinks: f32[H]
    param cap: f32 = 30.0
    score = cap * tanh(qk * rsqrt(D) / cap) + bias[h, j]
    mask causal
    return softmax(score, sink=sinks[h]) @ v, lse
}"""
SIGMOID = """attention nan_sigmoid {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    input bias: f32[H, N]
    param scale: f32 = 1.0
    score = qk * rsqrt(D) * scale + bias[h, j] - 2.0
    mask causal
    return sigmoid(score) @ v, lse
}"""
NAN, INF = math.nan, math.inf
# (what is poisoned, the value): each reaches some rows (a query row, the rows that keep a key, a head, everything)
POISONS = [("q", NAN), ("k", NAN), ("v", NAN), ("param", NAN), ("table", NAN), ("sink", NAN), ("q", INF),
           ("k", -INF), ("table", INF)]
SHAPES = [(1, 300), (5, 70), (40, 40)]  # (M, N): a decode call, a few rows, a square causal prefill


def _call(spec: attnc.Attention, m: int, n: int, where: str, value: float, device: str = "cpu"):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randn(2, 2, m, 16, generator=gen)
    k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    bias = torch.randn(2, n, generator=gen)
    args = {"bias": bias}
    if spec.name == "nan_softmax":
        args.update(sinks=torch.randn(2, generator=gen), cap=30.0)
    else:
        args.update(scale=1.0)
    key = 0 if m > 1 else n // 2  # a key every row of the poisoned batch keeps (causal, bottom-right aligned)
    if where == "q":
        q[1, 1, m - 1, 3] = value
    elif where == "k":
        k[0, 0, key, 2] = value
    elif where == "v":
        v[1, 0, key, 4] = value
    elif where == "table":
        bias[1, key] = value
    elif where == "sink":
        if "sinks" not in args:
            pytest.skip("sigmoid takes no sink")
        args["sinks"][0] = value
    else:
        args["cap" if "cap" in args else "scale"] = value
    tensors = [t.to(device) for t in (q, k, v)]
    return tensors, {name: a.to(device) if isinstance(a, torch.Tensor) else a for name, a in args.items()}


def _check(kernel, spec, m, n, where, value, device="cpu"):
    (q, k, v), args = _call(spec, m, n, where, value, device)
    want = attnc.reference(spec, q, k, v, **args)
    bad = [w.isnan() | w.isinf() for w in want]
    # an inf need not reach the output: tanh bounds an infinite qk, sigmoid weighs a +inf score 1; softmax's
    # +inf score, from the table, makes its row NaN and its lse +inf
    if math.isnan(value) or (where == "table" and spec.normalizer.name == "softmax"):
        assert any(b.any() for b in bad), "the poison reaches no row: the case tests nothing"
    if where != "param":  # a param reaches every row
        assert not bad[0].all(), "the poison reaches every row: positions are not tested"
    got = kernel(q, k, v, **args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.fixture(scope="module", params=["triton", "tvm"])
def kernels(request):
    if request.param == "tvm":
        pytest.importorskip("tvm")
    specs = [attnc.parse(text)[0] for text in (SOFTMAX, SIGMOID)]
    return {spec.name: (spec, attnc.compile(spec, backend=request.param)) for spec in specs}


@pytest.mark.parametrize("m, n", SHAPES, ids=[f"M{m}N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("where, value", POISONS, ids=[f"{w}={v}" for w, v in POISONS])
@pytest.mark.parametrize("name", ["nan_softmax", "nan_sigmoid"])
def test_nan_and_inf_reach_the_rows_the_reference_says(kernels, name, where, value, m, n):
    spec, kernel = kernels[name]
    _check(kernel, spec, m, n, where, value)


@pytest.mark.gpu
@pytest.mark.parametrize("where, value", POISONS, ids=[f"{w}={v}" for w, v in POISONS])
@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_nan_and_inf_on_the_gpu(backend, where, value):
    if backend == "tvm":
        pytest.importorskip("tvm")  # the GPU machine has no TVM compiler: the TVM CUDA artifacts are built in CI
    for text in (SOFTMAX, SIGMOID):
        spec = attnc.parse(text)[0]
        kernel = attnc.compile(spec, backend=backend)
        for m, n in SHAPES + [(1, 4096)]:  # long enough to split the key range
            _check(kernel, spec, m, n, where, value, device="cuda")
