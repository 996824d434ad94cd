"""TVM TensorIR kernels on the CPU (LLVM) against attnc.reference (float64): every example spec in its own
dtype, random shapes (M != N, M = 1 decode, N = 0, head dims that are not powers of two, DV != D), strided
and BSHD inputs, empty rows, sinks and lse. Outputs are allocated NaN-filled so unwritten elements fail."""
import math
from dataclasses import replace

import pytest
import torch

import attnc
from attnc import ir
from attnc.passes import Target

pytest.importorskip("tvm")  # the GPU machine has no TVM compiler: these tests run in CI
from attnc.backends.tvm import backend as tvm_backend
from attnc.backends.tvm import launch as tvm_launch
from attnc.backends.tvm.emit import exp2, float_function
from attnc.backends import cache

from test_triton_kernels import TOL, TORCH, example_kwargs, example_sizes, example_specs


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(tvm_launch, "empty",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))


def make_inputs(spec, sizes):
    return [torch.randn([sizes[n] for n in t.shape]).to(TORCH[t.dtype]) for t in (spec.q, spec.k, spec.v)]


def check(spec, got, want, dtype=None):
    tol = TOL[dtype or spec.q.dtype]
    if spec.returns_lse:
        (got, got_lse), (want, want_lse) = got, want
        assert got_lse.dtype == torch.float32 and got_lse.shape == want_lse.shape
        assert torch.equal(got_lse == -math.inf, want_lse == -math.inf)
        finite = want_lse > -math.inf
        assert not got_lse.isnan().any()
        torch.testing.assert_close(got_lse[finite].double(), want_lse[finite], rtol=1e-5, atol=tol)
    assert got.shape == want.shape and not got.isnan().any()
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(1.0, want.abs().max().item() if want.numel() else 0.0), err


def f32_spec(masks=(), k_shape=("B", "H", "N", "D"), v_shape=None, returns_lse=True, **kw):
    q = ir.TensorDecl("q", "f32", ("B", "H", "M", "D"))
    return ir.make_attention("t", q, ir.TensorDecl("k", "f32", k_shape), ir.TensorDecl("v", "f32", v_shape or k_shape),
                             masks=masks, returns_lse=returns_lse, **kw)


DENSE_EXAMPLES = [s for s in example_specs() if s.q_storage is None and s.kv_storage is None]
STORED_EXAMPLES = [s for s in example_specs() if s not in DENSE_EXAMPLES]


@pytest.mark.shared_cache
@pytest.mark.parametrize("spec", DENSE_EXAMPLES, ids=lambda s: s.name)
def test_example_matches_reference(spec):
    sizes = example_sizes(spec)
    q, k, v = make_inputs(spec, sizes)
    kwargs = example_kwargs(spec, sizes, "cpu")
    kernel = attnc.compile(spec, backend="tvm")
    check(spec, kernel(q, k, v, **kwargs), attnc.reference(spec, q, k, v, **kwargs))


@pytest.mark.parametrize("spec", STORED_EXAMPLES, ids=lambda s: s.name)
def test_ragged_and_paged_storage_run_in_the_cpu_forward_only(spec):
    """The CPU forward lowers them (tests/test_tvm_serving.py checks the numbers); the backward and the CUDA kernel
    do not: a CompileError that names the workaround, not a wrong number."""
    plan = attnc.compile(spec, backend="tvm").plan("cpu", 64)
    assert isinstance(tvm_backend.TvmBackend().build(plan), tvm_backend.TvmLauncher)
    with pytest.raises(attnc.CompileError, match="ragged and paged storage run on the tvm backend's CPU forward "
                                                 "kernel; the backward does not lower them: run it with "
                                                 "backend='triton'"):
        tvm_backend.TvmBackend().build_backward(plan)
    with pytest.raises(attnc.CompileError, match="its CUDA kernel does not lower them"):
        tvm_backend.TvmBackend().build(replace(plan, target=Target("tvm", "cuda", 90)))


@pytest.mark.shared_cache
@pytest.mark.parametrize("masks", [(), (ir.causal_mask(),)], ids=["dense", "causal"])
def test_random_shapes(masks):
    """One kernel per head dim serves every B, H, M, N (including the decode schedule for small M)."""
    spec = f32_spec(masks)
    kernel = attnc.compile(spec, backend="tvm")
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1, 1), (2, 3, 1, 130), (1, 2, 16, 17), (2, 2, 70, 33), (1, 1, 129, 200)]
    shapes += [tuple(int(x) for x in torch.randint(1, 150, (4,), generator=gen)) for _ in range(2)]
    for b, h, m, n in shapes:
        b, h = min(b, 2), min(h, 3)
        q, k, v = torch.randn(b, h, m, 48), torch.randn(b, h, n, 48), torch.randn(b, h, n, 48)
        check(spec, kernel(q, k, v), attnc.reference(spec, q, k, v))


@pytest.mark.shared_cache
@pytest.mark.parametrize("claim_tasks", [False, True], ids=["static", "claimed"])
def test_task_schedules(claim_tasks, monkeypatch):
    """Both ways of handing out query tiles to threads (schedule.CpuSchedule.claim_tasks), with more tasks than
    one claim word holds (2 x 3 heads x 10 query tiles) and causal tiles of unequal cost."""
    from attnc.backends.tvm.host import host_cpu

    if claim_tasks and not host_cpu().x86:
        pytest.skip("tasks are claimed with x86's lock bts")
    default = tvm_backend.prefill_schedule
    monkeypatch.setattr(tvm_backend, "prefill_schedule", lambda vector: replace(default(vector),
                                                                                claim_tasks=claim_tasks))
    spec = f32_spec((ir.causal_mask(),))
    q, k, v = torch.randn(2, 3, 300, 32), torch.randn(2, 3, 300, 32), torch.randn(2, 3, 300, 32)
    kernel = attnc.compile(spec, backend="tvm")
    for _ in range(3):  # claims start from zero on every call
        check(spec, kernel(q, k, v), attnc.reference(spec, q, k, v))
    assert kernel._impls[(q.device, 32, 32)].schedules["prefill"].claim_tasks == claim_tasks


@pytest.mark.shared_cache
def test_value_dim_and_odd_head_dim():
    spec = f32_spec((ir.causal_mask(),), v_shape=("B", "H", "N", "DV"))
    q, k, v = torch.randn(2, 2, 41, 24), torch.randn(2, 2, 90, 24), torch.randn(2, 2, 90, 72)
    check(spec, attnc.compile(spec, backend="tvm")(q, k, v), attnc.reference(spec, q, k, v))


@pytest.mark.shared_cache
def test_gqa_bshd_and_strided_views():
    """BSHD is a layout the kernel reads through strides; views that are not contiguous are read in place."""
    bshd = ("B", "N", "HKV", "D")
    spec = replace(f32_spec((ir.causal_mask(),), k_shape=bshd), q=ir.TensorDecl("q", "f32", ("B", "M", "H", "D")))
    q = torch.randn(2, 6, 37, 32).transpose(1, 2)  # [B, M, H, D] view of a BHSD tensor
    k = torch.randn(2, 50, 4, 32)[:, :, ::2]  # every other K/V head: strided, HKV = 2
    v = torch.randn(2, 50, 2, 32)
    got = attnc.compile(spec, backend="tvm")(q, k, v)
    check(spec, got, attnc.reference(spec, q, k, v))
    assert got[0].shape == (2, 37, 6, 32)  # out in q's layout


@pytest.mark.shared_cache
def test_empty_rows_and_no_keys():
    """Rows with no kept key give out = 0 and lse = -inf; with a sink, lse = the sink's logit."""
    keep_first = ir.Binary("<", ir.IndexVar("j"), ir.Lookup("n_keys", (ir.IndexVar("b"),)))
    spec = f32_spec((keep_first,), inputs=(ir.TensorDecl("n_keys", "i32", ("B",)),))
    q, k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 70, 16), torch.randn(3, 2, 70, 16)
    n_keys = torch.tensor([0, 1, 70], dtype=torch.int32)
    out, lse = attnc.compile(spec, backend="tvm")(q, k, v, n_keys=n_keys)
    check(spec, (out, lse), attnc.reference(spec, q, k, v, n_keys=n_keys))
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()

    sink = ir.Softmax(ir.Lookup("sinks", (ir.IndexVar("h"),)))
    spec = f32_spec(inputs=(ir.TensorDecl("sinks", "f32", ("H",)),), normalizer=sink)
    sinks = torch.randn(2)
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)
    out, lse = attnc.compile(spec, backend="tvm")(q, k, v, sinks=sinks)
    assert (out == 0).all()
    torch.testing.assert_close(lse, sinks.view(1, 2, 1).expand(1, 2, 5))


# Logits near -1440 (base 2) for every key, and rows whose first key tiles keep nothing (j >= 8 i: row i's
# first kept key is 8 i, so later rows of a query tile start several 64-key tiles after its first row). The
# running max must stay -inf through those tiles: a finite stand-in (0) makes every later exp2 underflow.
VERY_NEGATIVE = """
attention very_negative {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    score = qk * rsqrt(D) - 1000.0
    mask j >= 8 * i
    return softmax(score) @ v, lse
}
"""
# float32 spacing at |logit| ~ 1440 is 1.2e-4, so the logits themselves carry ~6e-5 of rounding (torch's
# float32 SDPA too): softmax weights are exact to ~1e-4 relative, not 1e-5.
VERY_NEGATIVE_TOL = 3e-4


@pytest.mark.shared_cache
@pytest.mark.parametrize("m, n", [(100, 800), (16, 130)], ids=["prefill", "decode"])
def test_very_negative_logits_after_empty_tiles(m, n):
    spec = attnc.parse(VERY_NEGATIVE)[0]
    q, k, v = torch.randn(2, 2, m, 32), torch.randn(2, 2, n, 32), torch.randn(2, 2, n, 32)
    (out, lse), (want, want_lse) = attnc.compile(spec, backend="tvm")(q, k, v), attnc.reference(spec, q, k, v)
    assert (want_lse < -900).all() and not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=VERY_NEGATIVE_TOL * max(1.0, want.abs().max().item()))


@pytest.mark.shared_cache
def test_low_precision_inputs_compute_in_f32():
    spec = f32_spec((ir.causal_mask(),))
    for dtype in ("f16", "bf16"):
        typed = replace(spec, q=replace(spec.q, dtype=dtype), k=replace(spec.k, dtype=dtype),
                        v=replace(spec.v, dtype=dtype))
        q, k, v = (torch.randn(1, 2, 40, 64).to(TORCH[dtype]) for _ in range(3))
        out, lse = attnc.compile(typed, backend="tvm")(q, k, v)
        assert out.dtype == TORCH[dtype]
        check(typed, (out, lse), attnc.reference(typed, q, k, v))


def test_specs_differing_only_in_name_share_one_library(monkeypatch):
    builds = []
    real = tvm_backend.compile_module
    monkeypatch.setattr(tvm_backend, "compile_module", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    spec = f32_spec(masks=(ir.causal_mask(),))
    q, k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 75, 16), torch.randn(1, 2, 75, 16)
    for named in (spec, replace(spec, name="renamed")):
        check(named, attnc.compile(named, backend="tvm")(q, k, v), attnc.reference(named, q, k, v))
    assert len(builds) == 1
    assert [(e.backend, e.name) for e in cache.list_entries()] == [("tvm", "t")]


def test_built_once_then_cached():
    spec = f32_spec()
    q = torch.randn(1, 1, 70, 16)
    attnc.compile(spec, backend="tvm")(q, q, q)
    entries = cache.list_entries()
    assert [e.backend for e in entries] == ["tvm"]
    cache.clear_memory()
    out, _ = attnc.compile(spec, backend="tvm")(q, q, q)  # a new process would load the same library
    assert cache.list_entries() == entries
    check(spec, (out, _), attnc.reference(spec, q, q, q))


def test_other_devices_are_refused_with_a_hint():
    with pytest.raises(attnc.CompileError, match="attnc compile --backend tvm"):
        tvm_backend.TvmBackend().target(torch.device("meta"))


@pytest.mark.shared_cache
def test_vector_math():
    """The polynomial exp2 and the tanh formula the kernels use, in a vectorized loop, against torch."""
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from attnc.backends.tvm.host import host_cpu

    x = torch.cat([torch.linspace(-150, 140, 4093), torch.tensor([-math.inf, math.inf, 0.0])])
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("f")
            xs = T.match_buffer(T.arg("x", T.handle()), (x.numel(),), "float32")
            ys = T.match_buffer(T.arg("y", T.handle()), (2, x.numel()), "float32")
            with T.vectorized(0, x.numel()) as i:
                T.buffer_store(ys, exp2(xs[i]), [0, i])
                T.buffer_store(ys, float_function("tanh", xs[i] / 16.0), [1, i])
    fn = tvm.compile(tvm.IRModule({"f": ib.get()}), target=host_cpu().target())["f"]
    y = torch.full((2, x.numel()), math.nan)
    fn(x, y)
    want = torch.exp2(x.double())
    assert (y[0][x < -126] == 0).all() and (y[0][x >= 128] == math.inf).all()  # no denormals, as documented
    normal = (x >= -126) & (x < 128)
    assert ((y[0][normal] - want[normal]) / want[normal]).abs().max() < 3e-7
    assert (y[1] - torch.tanh(x.double() / 16)).abs().max() < 3e-7


def test_nested_functions_build_in_seconds():
    """Five nested softcaps (tanh written over exp2, reading its argument several times: 64^5 nodes as a tree)
    build on the CPU in seconds and match the reference: the kernels hold each float value they bind in a register
    buffer, which TVM never substitutes into its uses (emit.bind); the same spec through a `T.Bind` took over 5
    minutes from four nested tanh. The prefill and the decode schedule both run; the output and lse are poisoned."""
    body = "".join("score = 4.0 * tanh(score / 4.0)\n" for _ in range(5))
    spec = attnc.parse("attention nested { q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]\n"
                       f"score = qk * rsqrt(D)\n{body}mask causal\nreturn softmax(score) @ v, lse }}")[0]
    torch.manual_seed(11)
    kernel = attnc.compile(spec, backend="tvm")
    for m, n in ((37, 45), (1, 29)):
        q, k, v = torch.randn(2, 3, m, 32) * 3, torch.randn(2, 3, n, 32) * 3, torch.randn(2, 3, n, 32)
        check(spec, kernel(q, k, v), attnc.reference(spec, q, k, v))
