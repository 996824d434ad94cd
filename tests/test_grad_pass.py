"""The differentiation pass (attnc/passes/grad.py): its derivatives of every example spec's score and sink,
evaluated on random grids, against torch autograd through the reference's evaluation of the same expressions."""
from __future__ import annotations

import glob
import pytest
import torch

import attnc
from attnc.dsl import reference as ref
from attnc.ir import QK, Binary, Call, IndexVar, Num, SizeRef, Sigmoid, Softmax, print_expr
from attnc.passes.fold import fold_spec
from attnc.passes.grad import WEIGHT, derivative, derive, normalizer_backward

# (latent attention and FP8 caches have no backward: tests/test_mla.py and tests/test_fp8.py check that it says so)
SPECS = [s for path in sorted(glob.glob("examples/specs/*.attn")) for s in attnc.parse_file(path)
         if not s.decode_kernel_only]
SIZES = {"B": 2, "H": 4, "HKV": 2, "M": 5, "N": 7, "D": 16, "DV": 16}


def _env(spec, qk, tables, params):
    g = torch.Generator().manual_seed(3)
    sizes = dict(SIZES, **spec.dim_values)
    for t in spec.inputs:
        for s in t.shape:
            sizes.setdefault(s, 6)
    shape = (SIZES["B"], SIZES["H"], SIZES["M"], SIZES["N"])
    index = {"b": torch.arange(shape[0]).view(-1, 1, 1, 1), "h": torch.arange(shape[1]).view(1, -1, 1, 1),
             "i": torch.arange(shape[2]).view(1, 1, -1, 1), "j": torch.arange(shape[3]).view(1, 1, 1, -1)}
    for t in spec.inputs:
        if t.name not in tables:
            dims = [sizes[s] for s in t.shape]
            tables[t.name] = (torch.randint(0, 3, dims, generator=g) if not t.dtype.startswith("f")
                              else torch.randn(dims, generator=g, dtype=torch.float64, requires_grad=True))
    return ref._Env(index=index, qk=qk, sizes={k: torch.tensor(v) for k, v in sizes.items()},
                    params={p.name: torch.tensor(params[p.name]) for p in spec.params}, inputs=tables,
                    input_decls={t.name: t for t in spec.inputs}, device=torch.device("cpu"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_score_derivatives_match_autograd(spec):
    spec = fold_spec(spec, {**SIZES, **spec.dim_values})
    g = torch.Generator().manual_seed(1)
    qk = (torch.randn(SIZES["B"], SIZES["H"], SIZES["M"], SIZES["N"], generator=g, dtype=torch.float64) * 3
          ).requires_grad_()
    params = {p.name: (2.5 if p.dtype == "f32" else 3 if p.dtype == "i32" else True) for p in spec.params}
    env = _env(spec, qk, {}, params)
    derivs = derive(spec)
    for expr, grads, leaves in ((spec.score, derivs.score_tables, [qk]),
                                (spec.normalizer.sink, derivs.sink_tables, [])):
        if expr is None:
            continue
        value = ref._as_float(ref.evaluate(expr, env)).expand(qk.shape)
        tables = [env.inputs[t.lookup.tensor] for t in grads]
        wanted = list(dict.fromkeys(leaves + tables))
        if not wanted:
            continue
        upstream = torch.randn(qk.shape, generator=g, dtype=torch.float64)
        auto = dict(zip(map(id, wanted), torch.autograd.grad((value * upstream).sum(), wanted, allow_unused=True)))
        if leaves:
            mine = ref._as_float(ref.evaluate(derivs.dqk, env)).expand(qk.shape) * upstream
            torch.testing.assert_close(mine, auto[id(qk)], rtol=1e-12, atol=1e-12)
        for name in {t.lookup.tensor for t in grads}:
            table = env.inputs[name]
            total = torch.zeros_like(table)
            for t in (x for x in grads if x.lookup.tensor == name):
                # scatter dscore * upstream into the looked-up elements (the kernels' atomics / reduction)
                idx = [ref.evaluate(x, env).expand(qk.shape).reshape(-1) for x in t.lookup.indices]
                inside = torch.ones_like(idx[0], dtype=torch.bool)
                for axis, ix in enumerate(idx):
                    inside &= (ix >= 0) & (ix < table.shape[axis])
                contrib = (ref._as_float(ref.evaluate(t.dscore, env)).expand(qk.shape) * upstream).reshape(-1)
                flat = torch.zeros((), dtype=torch.long)
                for axis, ix in enumerate(idx):
                    flat = flat * table.shape[axis] + ix.clamp(0, table.shape[axis] - 1)
                total.view(-1).index_add_(0, flat[inside], contrib[inside].detach())
            torch.testing.assert_close(total, auto[id(table)], rtol=1e-12, atol=1e-12)


def test_derivative_rules_compose():
    x = QK()
    e = Binary("*", Num(30.0, True), Call("tanh", (Binary("/", x, Num(30.0, True)),)))
    d = derivative(e, x)
    assert "tanh" in print_expr(d)  # d/dx 30 tanh(x/30) = (1 - tanh^2(x/30)): the forward's tanh is reused
    assert derivative(Binary("+", x, IndexVar("i")), x) == Num(1.0, True)
    assert derivative(Binary("*", SizeRef("D"), IndexVar("j")), x) == Num(0.0, True)
    # an integer derivative (qk * 2) is a float
    spec = attnc.parse("attention a { q: f32[B,H,M,D] k: f32[B,H,N,D] v: f32[B,H,N,D] score = qk * 2 "
                       "return softmax(score) @ v }")[0]
    assert derive(spec).dqk == Num(2.0, True)


def test_normalizer_backward_rules():
    soft = normalizer_backward(Softmax())
    assert soft.normalized
    sig = normalizer_backward(Sigmoid())
    assert not sig.normalized
    assert print_expr(sig.dweight) == print_expr(Binary("*", WEIGHT, Binary("-", Num(1.0, True), WEIGHT)))
