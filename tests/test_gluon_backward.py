"""The Gluon dK/dV kernel (PlanOptions(gluon_backward=True); backends/triton/gluon_backward.py.j2, passes/warpgroups.py
dkdv_layout). On the CPU: where the plan takes it and why not elsewhere, its shared memory against sm_90's, and its
source (valid Python, the Triton backward's own mask and gradient lines). Gluon kernels cannot run in the interpreter:
the tests marked gpu check the gradients on an H100 against the float64 reference with NaN-poisoned outputs
(`python -m pytest -m gpu tests/test_gluon_backward.py`), and that the Gluon kernel ran, not the template's."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import attnc
from attnc.backends import get_backend
from attnc.backends.triton import gluon, gluon_backward, launch
from attnc.backends.triton.backward import generate_backward
from attnc.backends.triton.gluon_backward import generate_gluon_dkdv
from attnc.dsl.signature import bind
from attnc.errors import CompileError
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.grad import plan_backward
from attnc.passes.tiling import smem_capacity
from attnc.passes.warpgroups import dkdv_by_default, dkdv_shared_bytes
from test_backward_triton import EXAMPLES, TOL, _spec, call_inputs, reference_grads
from test_triton_kernels import poisoned_outputs, with_dtype  # noqa: F401  (an autouse fixture: importing enables it)

HOPPER = Target("triton", "cuda", 90)
# Padded head dims with DV != D (D from the call, DV = 48: padded to 64), GQA, a window and a sink (whose gradient is
# attn_bwd_prep's, so the Gluon kernel takes it)
PADDED = _spec("""attention padded_sink {
    dims DV = 48
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, DV]
    input sinks: f32[H]
    param window: i32 = 300
    mask causal and i + (N - M) - j < window
    return softmax(score, sink=sinks[h] * 0.5) @ v
}""")
EXAMPLES = {**EXAMPLES, PADDED.name: PADDED}
GLUON_BACKWARD = PlanOptions(gluon_backward=True)
DS_UNDER_DKDV = PlanOptions(gluon_backward=True, gluon_backward_ds_under_dkdv=True)
DQ_IN_DKDV = PlanOptions(gluon_backward=True, gluon_backward_dq_in_dkdv=True)


def _plan(name, d=128, target=HOPPER, options=GLUON_BACKWARD, dtype="bf16"):
    spec = replace(with_dtype(EXAMPLES[name], dtype), returns_lse=True)
    d = spec.dim_values.get("D", d)
    return plan_kernel(spec, target, d, spec.dim_values.get("DV", d), options)


@pytest.mark.parametrize("name", ["causal_lm", "dense", "gqa_causal", "sliding_window", "grok_softcap",
                                  "sigmoid_causal", "dilated_window", "sinks", "padded_sink"])
@pytest.mark.parametrize("d", [64, 128])
def test_asked_for_it_runs_within_shared_memory(name, d):
    plan = _plan(name, d, dtype="f16" if name == "dilated_window" else "bf16")
    bp = plan_backward(plan)
    assert bp.gluon_dkdv is not None, bp.gluon_reason
    # dQ is the dQ kernel's beside the Gluon dK/dV kernel, but where the default puts it in the kernel
    assert bp.dq_by_kernel(False) is not dkdv_by_default(plan)
    assert dkdv_shared_bytes(plan, bp.gluon_dkdv) <= smem_capacity(90)
    assert bp.gluon_dkdv.keys_per_consumer == 64  # wgmma's M per warpgroup


@pytest.mark.parametrize("name", ["causal_lm", "dense", "gqa_causal", "sliding_window", "prefix_lm"])
@pytest.mark.parametrize("d", [64, 128])
def test_ds_under_dkdv_option(name, d):
    """PlanOptions(gluon_backward_ds_under_dkdv): two P^T and two dS^T buffers per consumer beside the same ring,
    within shared memory; the source waits for S^T and dP^T with dV and dK in flight; without it, neither."""
    plan = _plan(name, d, options=DS_UNDER_DKDV)
    layout = plan_backward(plan).gluon_dkdv
    unskewed = replace(GLUON_BACKWARD, gluon_backward_block_m=layout.block_m, gluon_backward_dq_in_dkdv=False)
    default = plan_backward(_plan(name, d, options=unskewed)).gluon_dkdv
    assert layout.ds_under_dkdv and not default.ds_under_dkdv and layout.stages == default.stages
    grads = 2 * 2 * layout.block_n * layout.block_m * 2  # bf16
    assert dkdv_shared_bytes(plan, layout) == dkdv_shared_bytes(plan, default) + grads <= smem_capacity(90)
    source = generate_gluon_dkdv(plan)
    compile(source, "gluon_dkdv", "exec")
    assert "qk, dp = warpgroup_mma_wait(2, deps=[qk, dp])" in source and "prob_bufs.index(grad).store" in source
    assert "prob_bufs" not in generate_gluon_dkdv(_plan(name, d, options=unskewed))


def test_ds_under_dkdv_keeps_three_stages_at_the_widest():
    """Skewed, a consumer waits for tile m + 2's Q and dO before it releases tile m's slot: with 2 slots it would wait
    for itself. D = 128 at 64 query rows, the most shared memory the option takes, still fits 3."""
    plan = _plan("causal_lm", 128, options=replace(DS_UNDER_DKDV, gluon_backward_block_m=64))
    layout = plan_backward(plan).gluon_dkdv
    assert layout.stages == 3 and dkdv_shared_bytes(plan, layout) <= smem_capacity(90)


@pytest.mark.parametrize("name", ["causal_lm", "dense", "gqa_causal", "sliding_window"])
@pytest.mark.parametrize("d", [64, 128])
def test_dq_in_dkdv_option(name, d):
    """PlanOptions(gluon_backward_dq_in_dkdv) at 32 query rows: the skew (dS^T in shared memory) with a float32 dQ
    tile (the consumers' sum), within shared memory; dQ by the kernel's TMA reduce-adds, so the dQ kernel runs only
    where deterministic."""
    options = replace(DQ_IN_DKDV, gluon_backward_block_m=32)
    plan = _plan(name, d, options=options)
    bp = plan_backward(plan)
    layout = bp.gluon_dkdv
    skewed = plan_backward(_plan(name, d, options=replace(DS_UNDER_DKDV, gluon_backward_block_m=32))).gluon_dkdv
    assert layout.dq_in_dkdv and layout.ds_under_dkdv and not layout.split_dq and not skewed.dq_in_dkdv
    assert not bp.dq_by_kernel(False) and bp.dq_by_kernel(True) and "TMA reduce-add" in bp.gluon_reason
    dq_tile = layout.block_m * plan.tiling.block_d * 4
    assert dkdv_shared_bytes(plan, layout) == dkdv_shared_bytes(plan, skewed) + dq_tile <= smem_capacity(90)
    source = generate_gluon_dkdv(plan)
    compile(source, "gluon_dkdv", "exec")
    assert source.count("async_reduce_add(dq_desc, [") == 2 and "dq_ptr" in source  # the loop's tile and the last
    assert source.count("mbarrier.wait(dq_full, n & 1)") == 2  # one reduce-add a tile: the consumers' sum
    assert "dq_desc" not in generate_gluon_dkdv(_plan(name, d, options=DS_UNDER_DKDV))


@pytest.mark.parametrize("name", ["causal_lm", "dense", "gqa_causal", "sliding_window"])
@pytest.mark.parametrize("d", [64, 128])
def test_dq_in_dkdv_at_64_query_rows_splits_dq_columns(name, d):
    """At 64 query rows, unskewed: dQ = dS K, each consumer half of D's columns over both consumers' keys (dS^T in
    two shared buffers a consumer), one reduce-add a consumer a tile; 3 stages fit sm_90 at D = 128."""
    plan = _plan(name, d, options=replace(DQ_IN_DKDV, gluon_backward_block_m=64))
    bp = plan_backward(plan)
    layout = bp.gluon_dkdv
    assert layout.split_dq and not layout.ds_under_dkdv and layout.stages == 3 and not bp.dq_by_kernel(False)
    plain = plan_backward(_plan(name, d, options=PlanOptions(gluon_backward=True, gluon_backward_block_m=64,
                                                             gluon_backward_dq_in_dkdv=False)))
    grads_and_dq = 2 * layout.block_n * 64 * 2 + 64 * plan.tiling.block_d * 4
    assert dkdv_shared_bytes(plan, layout) == dkdv_shared_bytes(plan, plain.gluon_dkdv) + grads_and_dq
    assert dkdv_shared_bytes(plan, layout) <= smem_capacity(90)
    source = generate_gluon_dkdv(plan)
    compile(source, "gluon_dkdv", "exec")
    assert source.count("async_reduce_add(dq_desc, [m * QUERY_ROWS, CONSUMER * DQ_COLUMNS]") == 1
    assert source.count(".slice(CONSUMER * DQ_COLUMNS, DQ_COLUMNS, dim=1)") == 2  # both consumers' keys
    assert "dq_full" not in source and "prob_bufs" not in source


def test_dq_in_dkdv_needs_wgmma_rows_of_head_dim():
    """D = 32: dQ^T's 32 rows are fewer than a warpgroup's wgmma M, so dQ stays the dQ kernel's."""
    bp = plan_backward(_plan("causal_lm", 32, options=DQ_IN_DKDV))
    assert bp.gluon_dkdv is not None and not bp.gluon_dkdv.dq_in_dkdv and bp.dq_by_kernel(False)


def test_dq_in_dkdv_skewed_at_64_query_rows_past_shared_memory_is_refused():
    """D = 128 at 64 query rows with the skew asked for too: its 3 stages, P^T and dS^T buffers and the float32 dQ
    tile need 264704 B, more than sm_90's 232448: a CompileError naming the options and the workaround, not a launch
    that fails."""
    skewed_dq = replace(DQ_IN_DKDV, gluon_backward_block_m=64, gluon_backward_ds_under_dkdv=True)
    with pytest.raises(CompileError, match=r"gluon_backward_dq_in_dkdv with gluon_backward_block_m=64 at D=128: "
                                           r"3 stages take 264704 B .* use gluon_backward_block_m=32"):
        plan_backward(_plan("causal_lm", 128, options=skewed_dq))
    assert plan_backward(_plan("causal_lm", 128, options=replace(DQ_IN_DKDV, gluon_backward_block_m=32))).gluon_dkdv


@pytest.mark.parametrize("deterministic", [False, True])
def test_dq_in_dkdv_leaves_deterministic_calls_to_the_template(deterministic):
    """Its reduce-adds land in any order: a deterministic call runs the template's dK/dV kernel and the dQ kernel.
    The float32 dQ must be TMA-ready too."""
    plan = _plan("causal_lm", 64, options=DQ_IN_DKDV)
    kernel = gluon_backward.GluonDkdv(plan, SimpleNamespace(attn_bwd_dkdv_gluon=None))
    q, k, v = (torch.randn(1, 2, 128, 64, dtype=torch.bfloat16) for _ in range(3))
    lse, dq = torch.zeros(1, 2, 128), torch.zeros(1, 2, 128, 64)
    assert kernel.covers(q, k, v, q, lse, dq, deterministic) is not deterministic
    assert not kernel.covers(q, k, v, q, lse, torch.zeros(1, 2, 128, 65)[..., :64], False)  # rows of 260 B


def test_query_rows_option():
    assert plan_backward(_plan("causal_lm", options=PlanOptions(gluon_backward=True, gluon_backward_block_m=64))
                         ).gluon_dkdv.block_m == 64
    with pytest.raises(CompileError, match="gluon_backward_block_m must be one of 32, 64"):
        plan_backward(_plan("causal_lm", options=PlanOptions(gluon_backward=True, gluon_backward_block_m=48)))


@pytest.mark.parametrize("name, d, default", [
    ("causal_lm", 128, True), ("dense", 128, True), ("gqa_causal", 128, True),
    ("causal_lm", 64, False), ("sliding_window", 128, False), ("grok_softcap", 128, False),
    ("sinks", 128, False), ("prefix_lm", 128, False), ("sigmoid_causal", 128, False), ("alibi", 128, False)])
def test_by_default_where_measured_faster(name, d, default):
    """PlanOptions() on sm_90: the Gluon kernel at 64 query rows with dQ split between its consumers for D = 128 and
    a plain score (what the H100 timed faster than the template), the template's kernels elsewhere; False turns
    it off, and True elsewhere keeps the dQ kernel."""
    bp = plan_backward(_plan(name, d, options=PlanOptions()))
    if default:
        assert bp.gluon_dkdv.block_m == 64 and bp.gluon_dkdv.split_dq and not bp.dq_by_kernel(False)
    else:
        assert bp.gluon_dkdv is None and "PlanOptions(gluon_backward=True)" in bp.gluon_reason
    assert plan_backward(_plan(name, d, options=PlanOptions(gluon_backward=False))).gluon_dkdv is None
    asked = plan_backward(_plan(name, d, options=GLUON_BACKWARD)).gluon_dkdv
    if asked is not None and not default:
        assert not asked.dq_in_dkdv


@pytest.mark.parametrize("name, d, target, why", [
    ("causal_lm", 256, HOPPER, "head dims up to 128"),
    ("causal_lm", 128, Target("triton", "cuda", 80), "sm_80"),
    ("causal_lm", 128, Target("triton", "cpu", None), "no GPU"),
    ("varlen_causal", 128, HOPPER, "ragged storage"),
    ("document_mask", 128, HOPPER, "data-dependent masks"),
    ("alibi", 128, HOPPER, "float inputs that get gradients"),
])
def test_falls_back_to_the_template_saying_why(name, d, target, why):
    bp = plan_backward(_plan(name, d, target))
    assert bp.gluon_dkdv is None
    assert why in bp.gluon_reason and "the Triton template's dK/dV kernel runs" in bp.gluon_reason


@pytest.mark.parametrize("name", ["causal_lm", "sliding_window", "sigmoid_causal", "dilated_window"])
def test_source_shares_the_template_backwards_lines(name):
    # the score, mask and gradient lines come from the emitter both backward kernels use, not from a copy
    plan = _plan(name, 64, dtype="f16" if name == "dilated_window" else "bf16")
    source = generate_gluon_dkdv(plan)
    compile(source, f"{name}.py", "exec")
    assert "tl.dot" not in source and source.count("warpgroup_mma(") == 4
    template = generate_backward(plan)
    for marker in ("keep = (j_col[:, None] >= exact_lo[None, :])",
                   "ds = p * (dp - delta[None, :])" if name != "sigmoid_causal" else "ds = ", "m_end = "):
        assert marker in source and marker in template, marker
    # a masked key's dS is 0 by its p where the gain is p and d score / d qk a constant: the Gluon kernel leaves out
    # the select that would keep `keep` alive across dP's wait (sigmoid's gain is not p); the template keeps it
    select = "dqk = tl.where(keep, dqk, 0.0)"
    assert select in template and (select in source) == (name == "sigmoid_causal")


def test_launcher_warns_where_this_triton_cannot_run_it():
    plan = _plan("causal_lm", 64)
    if not gluon.unavailable_here():
        pytest.skip("this Triton has the Gluon API the kernel was written for")
    with pytest.warns(UserWarning, match="Gluon dK/dV kernel was asked for and does not run"):
        launcher = get_backend("triton").build_backward(plan)
    assert launcher.gluon_dkdv is None


# ---------------------------------------------------------------- the GPU (H100): gradients and the path taken


@pytest.fixture
def gluon_launches(monkeypatch):
    """How many dK/dV launches ran the Gluon kernel."""
    ran = []
    call = gluon_backward.GluonDkdv.__call__

    def counted(self, sizes, values):
        ran.append(True)
        return call(self, sizes, values)

    monkeypatch.setattr(gluon_backward.GluonDkdv, "__call__", counted)
    return ran


def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon dK/dV kernel runs on sm_90")
    why = gluon.unavailable_here()
    if why:
        pytest.skip(why)


def _check(name, m, n, d, deterministic, dtype="bf16", hkv=None, strided_dout=False, options=GLUON_BACKWARD):
    """The backward of one call planned with the Gluon dK/dV kernel against the reference; NaN-poisoned buffers."""
    spec = with_dtype(EXAMPLES[name], dtype)
    q, k, v, kwargs = call_inputs(spec, m, n, dtype, "cuda", d, hkv=hkv)
    full = replace(spec, returns_lse=True)
    bound = bind(full, q, k, v, kwargs)
    backend = get_backend("triton")
    plan = plan_kernel(full, backend.target(q.device), bound.sizes["D"], bound.sizes["DV"], options)
    assert plan_backward(plan).gluon_dkdv is not None, plan_backward(plan).gluon_reason
    out, lse = backend.build(plan)(bound)
    # strided: a view made in out's dtype (a .to() after the slice would copy it into contiguous rows)
    dout = torch.randn(*out.shape, 2, device="cuda", dtype=out.dtype)[..., 0] if strided_dout else torch.randn_like(out)
    dlse = torch.randn_like(lse)
    grads = backend.build_backward(plan)(bound, out, lse, dout, dlse, deterministic)
    want = reference_grads(spec, q, k, v, kwargs, dout, dlse, out_used=out)
    for key, ref in want.items():
        got = grads[key]
        assert not got.isnan().any(), f"{key}: every gradient element is written (buffers start as NaN)"
        err = (got.double() - ref.double()).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), (key, err)


GPU_CASES = [(name, d) for name in ("causal_lm", "dense", "gqa_causal", "sliding_window", "grok_softcap",
                                    "sigmoid_causal", "prefix_lm", "sinks") for d in (64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name, d", GPU_CASES, ids=[f"{n}-D{d}" for n, d in GPU_CASES])
def test_gradients_gpu(name, d, deterministic, gluon_launches):
    """N and M not multiples of the tiles (keys past N in the last program, query rows past M in the last tile),
    M != N (bottom-right causal), GQA (float32 shares summed by the launcher)."""
    _needs_hopper()
    _check(name, 1000, 1100, d, deterministic)
    assert gluon_launches == [True]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_lm", "dense", "gqa_causal", "sliding_window", "grok_softcap"])
def test_gradients_at_64_query_rows_gpu(name, gluon_launches):
    """64 query rows a slot at D = 128 (the default's 32 there): lse2 and delta of each slot from shared memory."""
    _needs_hopper()
    _check(name, 1000, 1100, 128, False, options=replace(GLUON_BACKWARD, gluon_backward_block_m=64))
    assert gluon_launches == [True]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("d", [40, 80, 96])
def test_padded_head_dims_gpu(d, dtype, gluon_launches):
    """D padded to a power of two (TMA reads the columns past D as zeros; dK's are not written), DV = 48 != D."""
    _needs_hopper()
    _check("padded_sink", 700, 900, d, False, dtype=dtype)
    assert gluon_launches == [True]


@pytest.mark.gpu
@pytest.mark.parametrize("m, n", [(4096, 4096), (77, 300), (300, 77)])
def test_long_and_short_sequences_gpu(m, n, gluon_launches):
    """Many query tiles (the ring wraps), and programs whose second consumer holds no key."""
    _needs_hopper()
    _check("causal_lm", m, n, 128, False)
    _check("gqa_causal", m, n, 128, False, hkv=1)
    assert gluon_launches == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name, d", [(n, d) for n in ("dense", "causal_lm", "gqa_causal") for d in (64, 128)])
def test_ds_under_dkdv_gradients_gpu(name, d, dtype, monkeypatch):
    """Skewed by a query tile (PlanOptions.gluon_backward_ds_under_dkdv): programs of 1, 2-3 (odd and even: the two
    P^T / dS^T buffers alternate), 5 and 16-32 query tiles (the ring wraps), the first tile alone and the last with
    nothing ahead; each launch ran the Gluon kernel with the option's layout."""
    _needs_hopper()
    layouts = []
    call = gluon_backward.GluonDkdv.__call__
    monkeypatch.setattr(gluon_backward.GluonDkdv, "__call__",
                        lambda self, sizes, values: (layouts.append(self.layout), call(self, sizes, values))[1])
    for m, n in ((32, 300), (77, 64), (160, 200), (1000, 1100)):
        _check(name, m, n, d, False, dtype, options=DS_UNDER_DKDV)
    assert len(layouts) == 4 and all(layout.ds_under_dkdv for layout in layouts)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [32, 64])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name, d", [(n, d) for n in ("dense", "causal_lm", "gqa_causal") for d in (64, 128)])
def test_dq_in_dkdv_gradients_gpu(name, d, dtype, rows, monkeypatch):
    """dQ by the Gluon kernel's TMA reduce-adds (PlanOptions.gluon_backward_dq_in_dkdv; 32 query rows skewed, 64 the
    consumers' column split): programs of 1 to 32 query tiles, rows past M in the last tile, keys past N (zeros
    through TMA); the Gluon kernel ran with the option's layout and attn_bwd_dq did not. Deterministic, the
    template's dK/dV kernel and the dQ kernel run instead."""
    options = replace(DQ_IN_DKDV, gluon_backward_block_m=rows)
    _needs_hopper()
    layouts, template = [], []
    call, fitting = gluon_backward.GluonDkdv.__call__, launch.launch_fitting
    monkeypatch.setattr(gluon_backward.GluonDkdv, "__call__",
                        lambda self, sizes, values: (layouts.append(self.layout), call(self, sizes, values))[1])
    monkeypatch.setattr(launch, "launch_fitting", lambda fn, *a: (  # the template's backward kernels, not attn_fwd
        fn.__name__.startswith("attn_bwd") and template.append(fn.__name__), fitting(fn, *a))[1])
    for m, n in ((32, 300), (77, 64), (160, 200), (1000, 1100)):
        _check(name, m, n, d, False, dtype, options=options)
    assert len(layouts) == 4 and all(layout.dq_in_dkdv and layout.split_dq == (rows == 64) for layout in layouts)
    assert template == ["attn_bwd_prep"] * 4, "neither the dQ kernel nor the template's dK/dV kernel ran"
    _check(name, 160, 200, d, True, dtype, options=options)
    assert len(layouts) == 4 and template[4:] == ["attn_bwd_prep", "attn_bwd_dkdv", "attn_bwd_dq"]


@pytest.mark.gpu
def test_strided_dout_falls_back_gpu(gluon_launches):
    """dO whose rows TMA cannot read (a stride of 2 on its head dim): the template's kernel, same gradients."""
    _needs_hopper()
    _check("causal_lm", 300, 300, 64, False, strided_dout=True)
    assert gluon_launches == []
    _check("causal_lm", 300, 300, 64, False)
    assert gluon_launches == [True], "the same call with dO in contiguous rows runs the Gluon kernel"
