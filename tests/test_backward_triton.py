"""The Triton backward (backends/triton/backward.py.j2 and gradients.py, TritonBackend.build_backward) against
torch autograd through the float64 reference (attnc.reference): dq, dk, dv and the gradients of float inputs for
every example spec with dense or ragged storage, on seeded random inputs, the gradient buffers NaN-poisoned. The
forward runs through the backend on `replace(spec, returns_lse=True)`; the loss is sum(out * dout), plus
sum(lse * dlse) where dlse is given. Sizes give several tiles and partial ones both ways (the interpreter's
backward tiles are 16 x 32 and 32 x 16), rows with no key (causal with M > N, empty sequences, kv_len = 0), GQA,
DV != D, sinks, sigmoid; deterministic=True is checked to give the same bits twice. On CPU this runs in Triton's
interpreter (tests/conftest.py); the tests marked gpu repeat the checks on CUDA in f16 / bf16 at larger sizes."""
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.backends import get_backend
from attnc.backends.triton.launch import interpreting
from attnc.dsl.signature import bind, canonical_view
from attnc.errors import CallError, CompileError
from attnc.ir import Paged
from attnc.passes import plan_kernel
from attnc.passes.fold import evaluate
from attnc.passes.grad import derive, plan_backward
from attnc.passes.masks import row_bounds
from inline_ptx import interpretable
from test_decode_kernels import offsets
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    TORCH, example_kwargs, example_specs, poisoned_outputs, with_dtype,
)

pytestmark = pytest.mark.shared_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tests of the interpreter's own path (CPU plans, sm_90 source run without a GPU); a GPU machine runs them with
# TRITON_INTERPRET=1
INTERPRETER_ONLY = pytest.mark.skipif(not interpreting(), reason="runs Triton's interpreter (TRITON_INTERPRET=1)")
# Max abs error of a gradient, relative to max(1, max |reference gradient|).
TOL = {"f32": 2e-5, "f16": 1e-2, "bf16": 5e-2}
EXAMPLES = {s.name: s for s in example_specs() if not isinstance(s.kv_storage, Paged)}
# Ragged sequences: an empty q, q longer than its keys (rows with no key under a causal mask), one key only.
Q_LENGTHS, KV_LENGTHS = (13, 0, 40, 7), (30, 5, 20, 1)


def call_inputs(spec, m, n, dtype, device, d=None, seed=0, hkv=None):
    """q, k, v and the keyword arguments of a call of `spec` (typed `dtype`), with M queries and N keys per
    sequence (the ragged lengths above where storage is ragged); `hkv` K/V heads of a GQA shape (else 2)."""
    torch.manual_seed(seed)
    dims = spec.dim_values
    d = dims.get("D", d or 64)
    sizes = {"B": 2, "H": 4, "HKV": 2 if spec.is_gqa_shape else 4, "M": m, "N": n, "D": d, "DV": dims.get("DV", d),
             "R": 16}
    if spec.name == "mqa_decode":
        sizes["HKV"] = 1
    if hkv is not None:
        sizes["HKV"] = hkv
    q_lengths, kv_lengths = Q_LENGTHS, KV_LENGTHS
    if spec.q_storage is not None and spec.kv_storage is not None \
            and spec.q_storage.offsets == spec.kv_storage.offsets:
        kv_lengths = q_lengths  # one offsets tensor for both
    stored = {}
    if spec.q_storage is not None:
        sizes.update(B=len(q_lengths), T=sum(q_lengths))
        stored[spec.q_storage.offsets] = offsets(q_lengths, device)
    if spec.kv_storage is not None:
        sizes.update(B=len(kv_lengths), TK=sum(kv_lengths))
        stored[spec.kv_storage.offsets] = offsets(kv_lengths, device)
    sizes["B1"] = sizes["B"] + 1
    q, k, v = (torch.randn([sizes[s] for s in decl.shape], device=device).to(TORCH[dtype])
               for decl in (spec.q, spec.k, spec.v))
    kwargs = example_kwargs(spec, sizes, device)
    kwargs.update(stored)
    for name in derive(spec).tables:
        # learned biases and slopes of the magnitude models have (ALiBi's slopes are at most 1/2): N(0, 1)
        # slopes times distances of 100 make logits of +-100, where f32 alone loses the 2e-5 the test asks
        kwargs[name] = kwargs[name] * 0.5
    if "prefix" in kwargs:
        kwargs["prefix"] = 9
    if "kv_len" in kwargs:
        kwargs["kv_len"][0] = 0  # a batch whose every row keeps nothing
    return q, k, v, kwargs


def forward(spec, q, k, v, kwargs):
    """(plan, bound, out, lse) of the forward through the Triton backend, planned with lse."""
    spec = replace(spec, returns_lse=True)
    backend = get_backend("triton")
    bound = bind(spec, q, k, v, kwargs)
    plan = plan_kernel(spec, backend.target(q.device), bound.sizes["D"], bound.sizes["DV"])
    out, lse = backend.build(plan)(bound)
    return plan, bound, out, lse


def reference_grads(spec, q, k, v, kwargs, dout, dlse, out_used=None):
    """Autograd through attnc.reference (float64 inside) on float32 copies of the inputs (exact for f16 / bf16).
    `out_used`: the output the backward is handed (rounded to the call's dtype). The backward takes
    delta = rowsum(dO * O) from it, as FlashAttention does, which adds to the exact gradients those of
    sum_i (delta_exact_i - delta_used_i) * lse_i; the reference adds that term too. It matters where a table's
    gradient weights dS by a large factor (ALiBi's slopes by the distance j - i: in bf16 the rounded O moved
    d slopes by 6-45% of its largest element, atomic and deterministic kernels alike)."""
    spec = with_dtype(replace(spec, returns_lse=True), "f32")
    tables = derive(spec).tables
    leaves = {"q": q.float(), "k": k.float(), "v": v.float(), **{t: kwargs[t].float() for t in tables}}
    for t in leaves.values():
        t.requires_grad_()
    out, lse = attnc.reference(spec, leaves["q"], leaves["k"], leaves["v"], **{**kwargs, **{t: leaves[t]
                                                                                             for t in tables}})
    loss = (out * dout.double()).sum()
    if dlse is not None:
        kept = torch.isfinite(lse)
        loss = loss + (torch.where(kept, lse, 0.0) * dlse.double()).sum()
    if out_used is not None:
        def delta(o):
            return canonical_view(dout.double() * o.double(), spec.q).sum(-1)

        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * (delta(out.detach()) - delta(out_used))).sum()
    if not loss.requires_grad:  # M = 0: nothing reads the inputs
        return {name: torch.zeros_like(t) for name, t in leaves.items()}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), grads)}


def check_backward(spec, m, n, deterministic, with_dlse, dtype=None, device=DEVICE, d=None, seed=0, hkv=None):
    """The backward of one call against the reference; returns its gradients."""
    dtype = dtype or spec.q.dtype
    spec = with_dtype(spec, dtype)
    q, k, v, kwargs = call_inputs(spec, m, n, dtype, device, d, seed, hkv)
    plan, bound, out, lse = forward(spec, q, k, v, kwargs)
    dout = torch.randn(*out.shape, 2, device=device)[..., 0].to(out.dtype)  # strided, as autograd may hand it
    dlse = torch.randn_like(lse) if with_dlse else None
    grads = get_backend("triton").build_backward(plan)(bound, out, lse, dout, dlse, deterministic)
    want = reference_grads(spec, q, k, v, kwargs, dout, dlse, out_used=out)
    assert set(grads) == set(want)
    tensors = {"q": q, "k": k, "v": v, **kwargs}
    for name, ref in want.items():
        got = grads[name]
        assert got.shape == tensors[name].shape and got.dtype == tensors[name].dtype, name
        assert not got.isnan().any(), f"{name}: every gradient element is written (buffers start as NaN)"
        err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        assert err <= TOL[dtype] * scale, (name, err, scale)
    if deterministic:
        again = get_backend("triton").build_backward(plan)(bound, out, lse, dout, dlse, True)
        for name in grads:
            assert torch.equal(grads[name], again[name]), f"{name}: deterministic=True gives the same bits"
    return grads


# ---------------------------------------------------------------- every example, CPU (f32 in the interpreter)

# (M, N): more keys than queries, and more queries than keys (causal rows with no key)
MODES = {"atomic-dlse": (45, 70, False, True), "deterministic": (70, 45, True, False)}


# The deterministic kernels differ from the atomic ones only in how dQ and table gradients are summed: on the CPU
# (the interpreter, ~5 s a case) they run on one spec of each kind of gradient path; the GPU tests run them all.
DETERMINISTIC_ON_CPU = ("alibi_doc", "causal_lm", "document_mask", "gqa_causal", "mla_prefill", "relative_bias",
                        "sigmoid_causal", "sinks")
CPU_CASES = [(name, mode) for name in sorted(EXAMPLES) for mode in sorted(MODES)
             if mode != "deterministic" or name in DETERMINISTIC_ON_CPU]


@pytest.mark.parametrize("name, mode", CPU_CASES, ids=[f"{name}-{mode}" for name, mode in CPU_CASES])
def test_example_gradients(name, mode):
    m, n, deterministic, with_dlse = MODES[mode]
    check_backward(EXAMPLES[name], m, n, deterministic, with_dlse, dtype="f32")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_in_the_interpreter(dtype):
    # f16 as on the GPU; bf16 loads then computes in f32 (UPCAST: the interpreter's bf16 is wrong)
    check_backward(EXAMPLES["gqa_causal"], 40, 50, False, True, dtype=dtype)


# ---------------------------------------------------------------- targeted cases

def _spec(text):
    return attnc.parse(text, "test.attn")[0]


PADDED = _spec("""attention padded {
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, DV]
    input bias: f32[H, N]
    input sinks: f32[H]
    param window: i32 = 30
    score = qk * rsqrt(D) + bias[h, j]
    mask causal and i + (N - M) - j < window
    return softmax(score, sink=sinks[h] * 0.5) @ v
}""")


@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_head_dims_gqa_sink_and_a_table_per_key(deterministic):
    # D = 40, DV = 24 (padded to 64 and 32), GQA 4/2, a bias indexed by (h, j) (col-level offsets), a scaled sink
    check_backward(PADDED, 61, 83, deterministic, True, d=40)


@pytest.mark.parametrize("slopes_grad", [False, True])
def test_a_table_without_a_gradient_costs_the_backward_nothing(slopes_grad, monkeypatch):
    """ALiBi's slopes fixed (no requires_grad): autograd's backward asks for no table's gradient, so the prep and
    dK/dV kernels run with TABLE_GRADS False (no sums of dS (j - i), no atomics: a third of the dK/dV kernel's
    spills on sm_90, benchmarks/NOTES.md session 16); q, k and v's gradients are right either way, and slopes that
    require grad get theirs."""
    import attnc.backends.triton.gradients as gradients

    switches = []
    fitting = gradients.launch.launch_fitting

    def recording(kernel, grid, args, keywords, *rest):
        if "TABLE_GRADS" in keywords:  # the backward's prep and dK/dV kernels (not the forward's)
            switches.append(keywords["TABLE_GRADS"])
        return fitting(kernel, grid, args, keywords, *rest)

    monkeypatch.setattr(gradients.launch, "launch_fitting", recording)
    spec = with_dtype(EXAMPLES["alibi"], "f32")
    q, k, v, kwargs = call_inputs(spec, 45, 70, "f32", DEVICE, seed=3)
    kwargs["slopes"] = kwargs["slopes"].detach().requires_grad_(slopes_grad)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    out = attnc.compile(spec, backend="triton")(*leaves, **kwargs)
    dout = torch.randn_like(out)
    wanted = (*leaves, kwargs["slopes"]) if slopes_grad else leaves
    got = torch.autograd.grad(out, wanted, dout)
    want = reference_grads(spec, q, k, v, kwargs, dout, None, out_used=out.detach())
    for name, g in zip("q k v slopes".split(), got):
        assert (g.double() - want[name]).abs().max() <= TOL["f32"] * max(1.0, want[name].abs().max().item()), name
    assert switches == [slopes_grad] * 2


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("hkv", [4, 1])
def test_gqa_shape_with_a_group_of_one_or_all_heads(hkv, deterministic, monkeypatch):
    """attn_bwd_dkdv has a program per query head. A group of 1 writes dK and dV itself. In a group of 4 each adds its
    share into the K/V head's float32 dK and dV by atomics, so no buffer holds a share per query head (issue 12: the
    group's sum without materialising repeated heads), or, deterministic, writes its share for the launcher's sum in
    a fixed order."""
    import attnc.backends.triton.gradients as gradients

    allocated = []  # float32 buffers shaped like dK and dV ([B, heads, N, D], N = 45): the shares
    for module, name in ((gradients.torch, "zeros"), (gradients.launch, "empty")):
        def recording(shape, *args, _make=getattr(module, name), **kwargs):
            t = _make(shape, *args, **kwargs)
            if t.dtype == torch.float32 and t.dim() == 4 and t.shape[-2] == 45:
                allocated.append(t.shape[1])
            return t
        monkeypatch.setattr(module, name, recording)
    check_backward(EXAMPLES["gqa_causal"], 37, 45, deterministic, False, hkv=hkv)
    assert allocated == ([] if hkv == 4 else [4] * 4 if deterministic else [1, 1])  # deterministic: two runs


def test_dq_kernel_where_atomics_are_allowed(monkeypatch):
    # a tuned row with dq_kernel (sm_90 at D <= 128): dQ by attn_bwd_dq while the tables' gradients stay atomic
    from attnc.backends.triton import launch
    from attnc.passes import Target, tiling

    rows = tuple(replace(r, dq_kernel=True) if r.min_arch == 0 else r for r in tiling.BACKWARD_TUNED)
    monkeypatch.setattr(tiling, "BACKWARD_TUNED", rows)
    assert plan_backward(plan_kernel(PADDED, Target("triton", "cpu", None), 40, 40)).dq_kernel
    launched = []
    fitting = launch.launch_fitting
    monkeypatch.setattr(launch, "launch_fitting", lambda fn, *a: launched.append(fn.__name__) or fitting(fn, *a))
    check_backward(PADDED, 61, 83, False, True, d=40)
    assert "attn_bwd_dq" in launched


def test_padded_value_dim_differs():
    spec = _spec("""attention dv {
        q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, DV]
        mask causal
        return sigmoid(score) @ v, lse
    }""")
    q, k, v, kwargs = call_inputs(spec, 33, 50, "f32", DEVICE, d=48)
    v = torch.randn(2, 4, 50, 20, device=DEVICE)  # DV = 20
    plan, bound, out, lse = forward(spec, q, k, v, kwargs)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = get_backend("triton").build_backward(plan)(bound, out, lse, dout, dlse, False)
    want = reference_grads(spec, q, k, v, kwargs, dout, dlse)
    for name in "qkv":
        torch.testing.assert_close(grads[name].double(), want[name].double(), rtol=0, atol=TOL["f32"] * max(
            1.0, want[name].abs().max().item()))


def test_sigmoid_lse_gradient_flows_through_dlse():
    # dS = f'(s) (dP + dlse exp(-lse)): with dout = 0 only the lse term is left, and it must not vanish
    spec = with_dtype(EXAMPLES["sigmoid_causal"], "f32")
    q, k, v, kwargs = call_inputs(spec, 20, 40, "f32", DEVICE)
    plan, bound, out, lse = forward(spec, q, k, v, kwargs)
    dout, dlse = torch.zeros_like(out), torch.randn_like(lse)
    grads = get_backend("triton").build_backward(plan)(bound, out, lse, dout, dlse, False)
    want = reference_grads(spec, q, k, v, kwargs, dout, dlse)
    assert want["q"].abs().max() > 1e-3
    for name in "qkv":
        torch.testing.assert_close(grads[name].double(), want[name].double(), rtol=1e-4, atol=2e-5)


@INTERPRETER_ONLY
@pytest.mark.parametrize("name", ["causal_lm", "sliding_window", "dilated_window", "key_padding", "chunked_causal"])
def test_query_range_is_the_mask_analysis_transposed(name):
    # Per key tile [j0, j1), the dK/dV kernel runs the query rows [lo, hi) of plan.QueryRange: every row whose
    # hull (the forward's key loop) meets the tile must be inside, and for bounds i + r the range is exact.
    spec = replace(EXAMPLES[name], returns_lse=True)
    plan = plan_kernel(spec, get_backend("triton").target(torch.device("cpu")), 64, 64)
    masks, queries = plan.masks, plan_backward(plan).queries
    kv_len = [37, 0]

    def lookup(tensor, index):
        return kv_len[index[0]]

    for m, n in ((100, 100), (40, 90), (90, 40)):
        for b in (0, 1):
            env = {"M": m, "N": n, "window": 23, "dilation": 3, "chunk": 16, "b": b, "h": 0}

            def value(e):
                return int(evaluate(e, env, lookup))

            for j0 in range(0, n, 32):
                j1 = min(j0 + 32, n)
                lo = max([0] + [j0 + 1 - value(r) for r in queries.from_upper])
                hi = min([m] + [j1 - value(r) for r in queries.from_lower])
                if any(value(u) <= j0 for u in queries.upper_free) or any(value(x) >= j1
                                                                          for x in queries.lower_free):
                    hi = 0
                hulls = [row_bounds(masks.hull, {**env, "i": i}, lookup) for i in range(m)]
                rows = [i for i, (first, end) in enumerate(hulls) if max(j0, first) < min(j1, end)]
                assert all(lo <= i < hi for i in rows), (j0, lo, hi, rows)
                if name in ("causal_lm", "sliding_window", "key_padding"):  # bounds i + r, or free of i
                    assert (lo, hi) == ((rows[0], rows[-1] + 1) if rows else (lo, min(hi, lo))), (j0, lo, hi)


@INTERPRETER_ONLY
@pytest.mark.parametrize("name", ["dense", "causal_lm", "sliding_window", "key_padding", "dilated_window",
                                  "chunked_causal", "document_mask"])
def test_full_query_range_is_the_exact_analysis_transposed(name):
    # The dK/dV kernel runs query tiles in loops free of branches where plan.QueryRange bounds every row it needs
    # (no per_tile_check); rows [f_lo, f_hi) of BackwardPlan.full_queries (backward.full_query_tiles) are exactly
    # those whose exact key range holds the whole key tile [j0, j0 + BN), and None where that is not known.
    spec = replace(EXAMPLES[name], returns_lse=True)
    plan = plan_kernel(spec, get_backend("triton").target(torch.device("cpu")), 64, 64)
    backward = plan_backward(plan)
    kv_len = [37, 0]

    def lookup(tensor, index):
        return kv_len[index[0]]

    linear = name in ("dense", "causal_lm", "sliding_window", "key_padding")  # bounds i + r, or free of i
    # the dilation is evaluated element-wise (no tile is full) inside the window's linear hull; a chunk's bound
    # (i % chunk) and the document mask's lookups at i are not linear in i
    assert backward.queries.per_tile_check == (name in ("chunked_causal", "document_mask"))
    assert (backward.full_queries is not None) == linear
    if not linear:
        return
    full, block_n = backward.full_queries, 32
    for m, n in ((100, 100), (40, 90), (90, 40)):
        for b in (0, 1):
            env = {"M": m, "N": n, "window": 23, "b": b, "h": 0}

            def value(e):
                return int(evaluate(e, env, lookup))

            for j0 in range(0, n, 16):
                j_last = j0 + block_n - 1
                lo = max([0] + [j_last + 1 - value(r) for r in full.from_upper])
                hi = min([m if j_last < n else 0] + [j0 + 1 - value(r) for r in full.from_lower])
                if any(value(u) <= j_last for u in full.upper_free) or any(value(x) > j0 for x in full.lower_free):
                    hi = 0
                exact = [row_bounds(plan.masks.exact, {**env, "i": i}, lookup) for i in range(m)]
                rows = [i for i, (first, end) in enumerate(exact) if first <= j0 and j_last < min(end, n)]
                assert rows == list(range(lo, hi)), (m, n, b, j0, lo, hi, rows)


def test_paged_storage_and_a_forward_without_lse_are_refused():
    target = get_backend("triton").target(torch.device(DEVICE))
    paged = next(s for s in example_specs() if s.name == "paged_decode")
    with pytest.raises(CompileError, match="paged"):
        get_backend("triton").build_backward(plan_kernel(paged, target, 64, 64))
    with pytest.raises(CompileError, match="returns_lse"):
        get_backend("triton").build_backward(plan_kernel(EXAMPLES["dense"], target, 64, 64))


def test_deterministic_table_workspace_has_a_bound(monkeypatch):
    import attnc.backends.triton.gradients as gradients

    monkeypatch.setattr(gradients, "DETERMINISTIC_WORKSPACE_BYTES", 64)
    with pytest.raises(CallError, match="deterministic=False"):
        check_backward(EXAMPLES["relative_bias"], 20, 30, True, False, dtype="f32")


# ---------------------------------------------------------------- the GPU: the same checks in f16 / bf16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_gradients_gpu(name, mode, dtype):
    m, n, deterministic, with_dlse = MODES[mode]
    check_backward(EXAMPLES[name], 4 * m + 3, 4 * n + 5, deterministic, with_dlse, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_head_dims_and_long_sequences_gpu(d, deterministic):
    check_backward(EXAMPLES["gqa_causal"] if d == 128 else EXAMPLES["sliding_window"], 1000, 1100, deterministic,
                   True, dtype="bf16", d=d)
    check_backward(PADDED, 700, 900, deterministic, True, dtype="f16", d=d)


@pytest.mark.parametrize("m, n", [(0, 40), (37, 0)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_queries_or_keys(m, n, deterministic):
    # no queries: zero dK, dV and table gradients; no keys: every row keeps only the sink (dsink = dlse)
    check_backward(EXAMPLES["sinks"], m, n, deterministic, True, dtype="f32")


@INTERPRETER_ONLY
def hopper_backward(spec, d):
    """(plan, module) of `spec`'s sm_90 backward (q, dO and dQ, and K, V, through tensor descriptors) made to run in
    the interpreter, which needs no descriptor scratch and runs no inline assembly. Triton 3.9's interpreter has no
    descriptor reduction: the bulk add of dQ runs as the same add through pointers here (it compiles for sm_90:
    benchmarks/NOTES.md)."""
    import types

    from attnc.backends.triton.backward import generate_backward
    from attnc.passes import PlanOptions, Target

    plan = plan_kernel(spec, Target("triton", "cuda", 90), d, d, PlanOptions(tma=True))
    source = generate_backward(plan)
    assert "make_tensor_descriptor" in source
    module = types.ModuleType("hopper_backward")
    bulk_add = "dq_desc.atomic_add([m * BLOCK_M, 0], dq_tile)"
    assert bulk_add in source
    source = source.replace(bulk_add, "tl.atomic_add(dq_ptr + b * s_dqb + h * s_dqh + q_rows[:, None] * s_dqm "
                                      f"+ offs_d[None, :] * s_dqd, dq_tile, mask=row_valid[:, None] & (offs_d < {d}))")
    exec(compile(interpretable(source.replace("scratch.install()", "")), "hopper_backward.py", "exec"), module.__dict__)
    return plan, module


def check_grads(grads, want):
    for name, ref in want.items():
        assert not grads[name].isnan().any(), f"{name}: every gradient element is written (buffers start as NaN)"
        err = (grads[name].double() - ref.double()).abs().max().item()
        assert err <= TOL["f32"] * max(1.0, ref.abs().max().item()), (name, err)


@pytest.mark.parametrize("deterministic", [False, True])
def test_hopper_descriptor_path(deterministic):
    from attnc.backends.triton.gradients import BackwardLauncher

    spec = replace(PADDED, returns_lse=True)
    q, k, v, kwargs = call_inputs(spec, 45, 70, "f32", "cpu", d=40)
    _, bound, out, lse = forward(spec, q, k, v, kwargs)
    plan, module = hopper_backward(spec, 40)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    launcher = BackwardLauncher(plan, module)
    assert launcher.descriptors(q, dout, torch.zeros_like(q))  # the dQ kernel loads by pointers (see descriptors)
    assert not launcher.descriptors(q, dout.transpose(2, 3).contiguous().transpose(2, 3),
                                    torch.zeros_like(q))  # dO with a strided head dim
    grads = launcher(bound, out, lse, dout, dlse, deterministic)
    check_grads(grads, reference_grads(spec, q, k, v, kwargs, dout, dlse))


def test_launcher_plans_once_and_each_call_picks_its_own_launch(monkeypatch):
    # The backward's launch keywords are planned when the launcher is built (a call only reads shapes and strides:
    # re-planning cost ~0.15 ms of host time a training step, benchmarks/NOTES.md issue 12, causal S = 1k); a call's
    # own choices (mode, dlse, descriptors or pointers for dO) still reach its launches, not the next call's.
    from attnc.backends.triton import gradients, launch

    spec = with_dtype(replace(EXAMPLES["causal_lm"], returns_lse=True), "f32")
    q, k, v, kwargs = call_inputs(spec, 45, 70, "f32", "cpu", d=32)
    _, bound, out, lse = forward(spec, q, k, v, kwargs)
    plan, module = hopper_backward(spec, 32)
    launcher = gradients.BackwardLauncher(plan, module)

    def planned(*args):
        raise AssertionError("the backward was planned during a call")

    monkeypatch.setattr(gradients, "plan_backward", planned)
    monkeypatch.setattr(gradients, "launch_keywords", planned)
    tma = []
    fitting = launch.launch_fitting
    monkeypatch.setattr(launch, "launch_fitting", lambda fn, grid, args, keywords, *rest: (
        tma.append(keywords.get("TMA")) if fn.__name__ == "attn_bwd_dkdv" else None,
        fitting(fn, grid, args, keywords, *rest))[1])
    strided = torch.randn(*out.shape, 2)[..., 0]  # a strided head dim: dO without descriptors
    contiguous = torch.randn_like(out)
    for dout, dlse, deterministic in ((contiguous, torch.randn_like(lse), False), (strided, None, True),
                                      (contiguous, None, False), (strided, torch.randn_like(lse), False)):
        grads = launcher(bound, out, lse, dout, dlse, deterministic)
        check_grads(grads, reference_grads(spec, q, k, v, kwargs, dout, dlse))
    assert tma == [True, False, True, False]


def test_backward_kernels_compile_for_hopper(tmp_path):
    # ptxas without a GPU (as the AOT builds): every kernel a call can launch, descriptors on and off, for a dense
    # spec with a table and a tile summary (alibi_doc: BSHD, GQA) and a ragged one with a sink (varlen_alibi_sinks)
    from attnc.backends.triton import aot
    from attnc.backends.triton.backward import generate_backward
    from attnc.backends.triton.signature import gradient_tables, summary_used
    from attnc.backends.triton.gradients import launch_keywords
    from attnc.backends.triton.signature import backward_argument_types, backward_signatures, spec_args
    from attnc.passes import Target

    jobs = []
    for name in ("alibi_doc", "varlen_alibi_sinks"):
        spec = replace(EXAMPLES[name], returns_lse=True)
        plan = plan_kernel(spec, Target("triton", "cuda", 90), 64, 64)
        source = tmp_path / f"{name}.py"
        source.write_text(generate_backward(plan))
        signatures = backward_signatures(spec_args(plan, per_sequence=True), gradient_tables(spec),
                                         summary_used(plan), plan.triton.tma)
        # (deterministic, tma, the tables' gradients wanted)
        for deterministic, tma, wanted in ((False, True, True), (False, False, True), (True, True, True),
                                           (True, False, True), (False, True, False)):
            dq_kernel = plan_backward(plan).dq_by_kernel(deterministic)
            types = backward_argument_types(plan, dq_kernel)
            for kernel, keywords in launch_keywords(plan, deterministic, True, wanted).items():
                if kernel == "attn_bwd_dq" and not dq_kernel or kernel == "attn_bwd_prep" and not tma:
                    continue
                if not wanted and kernel == "attn_bwd_dq":  # the dQ kernel adds to no table
                    continue
                sig = signatures[kernel]
                constexprs = {n: keywords[n] for n in sig.constexprs if n != "TMA"}
                constexprs.update({"TMA": tma} if "TMA" in sig.constexprs else {})
                label = f"{name} {kernel} deterministic={deterministic} tma={tma} table_grads={wanted}"
                jobs.append(aot.CompileJob(
                    str(source), f"bwd_{name}", kernel, {n: types[n] for n in sig.names}, constexprs, (),
                    {"num_warps": keywords["num_warps"], "num_stages": keywords["num_stages"]}, 90,
                    str(tmp_path / label.replace(" ", "_")), label))
    results = aot._run_jobs(jobs, workers=2)
    assert [(job.label, r["error"]) for job, r in zip(jobs, results) if "error" in r] == []


class InterpretedReplay:
    """Stands in for Triton's launcher (DirectLaunch) on CPU: runs the interpreted kernel with exactly the argument
    list a replayed launch hands the launcher, each address replaced by the tensor last seen at it (`memory`)."""

    def __init__(self, fn, memory: dict, launches: list):
        self.fn, self.memory, self.launches = fn, memory, launches

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        self.launches.append(self.fn.__name__)
        self.fn[grid](*(self.memory.get(a, a) if type(a) is int else a for a in args))


@pytest.mark.parametrize("name, deterministic", [("alibi_doc", False), ("sliding_window", True)])
def test_later_backward_calls_replay_the_first_calls_launches(monkeypatch, name, deterministic):
    # A backward call of a signature seen before (shapes, strides, dtypes, devices of every tensor, the mode)
    # replays its launches (launch.KernelReplay: no strides, TMA checks, packing or JIT launch; host time,
    # benchmarks/NOTES.md issue 12), with its own tensors, params, table gradients and tile summary; other strides
    # or sizes, and an unaligned pointer, take the full path. alibi_doc: a table's gradient, a data-dependent mask
    # (tile summary), GQA, BSHD; sliding_window: a param, the deterministic mode.
    from attnc.backends.triton import binaries, gradients, launch

    spec = with_dtype(EXAMPLES[name], "f32")
    memory, jit, replayed = {}, [], []
    data_ptr = torch.Tensor.data_ptr

    def recorded_ptr(t):
        address = data_ptr(t)
        memory[address] = t
        return address

    def jit_launch(fn, grid, args, keywords):
        jit.append(fn.__name__)
        launched(fn, grid, args, keywords)
        return fn  # what direct_launch gets: the stand-in runs it

    launched = binaries.launch
    monkeypatch.setattr(torch.Tensor, "data_ptr", recorded_ptr)
    monkeypatch.setattr(binaries, "launch", jit_launch)
    monkeypatch.setattr(launch, "direct_launch", lambda fn, device: InterpretedReplay(fn, memory, replayed))
    launcher = None

    def step(m, n, seed, layout=lambda t: t, **params):
        nonlocal launcher
        q, k, v, kwargs = call_inputs(spec, m, n, "f32", "cpu", d=32, seed=seed)
        kwargs.update(params)
        plan, bound, out, lse = forward(spec, q, k, v, kwargs)
        launcher = launcher or gradients.BackwardLauncher(plan)
        dout = layout(torch.randn_like(out))
        dlse = torch.randn_like(lse)
        jit.clear(), replayed.clear()
        grads = launcher(bound, out, lse, dout, dlse, deterministic)
        check_grads(grads, reference_grads(spec, q, k, v, kwargs, dout, dlse, out_used=out))
        return [n for n in jit if n.startswith("attn_bwd")], replayed[:]

    kernels = ["attn_bwd_prep", "attn_bwd_dkdv", "attn_bwd_dq"]
    full = step(45, 70, seed=1)
    assert full[0] in (kernels, kernels[:2]) and full[1] == []
    kernels = full[0]
    assert step(45, 70, seed=2, **({"window": 9} if name == "sliding_window" else {})) == ([], kernels)
    strided = step(45, 70, seed=3, layout=lambda t: torch.randn(*t.shape, 2)[..., 0].copy_(t))  # other strides
    assert strided == (kernels, [])
    assert step(45, 70, seed=4, layout=lambda t: torch.randn(*t.shape, 2)[..., 0].copy_(t)) == ([], kernels)
    assert step(29, 52, seed=5) == (kernels, [])  # other sizes
    unaligned = step(45, 70, seed=6, layout=lambda t: torch.empty(t.numel() + 1)[1:].view(t.shape).copy_(t))
    assert unaligned == (kernels, [])
    assert len(launcher._replays) == 3
