"""The Gluon warpgroup prefill (PlanOptions(gluon=True)) on an H100 (run with `python -m pytest -m gpu
tests/test_gluon_gpu.py`): every dense example spec in bf16 and fp16 at D = 64 / 128 / 256 (a spec's own D and DV
where it binds them), with lse, against attnc.reference with NaN-poisoned outputs; each test checks that the Gluon
kernel ran, not the template it falls back to."""
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.backends.triton import binaries, gluon
from attnc.passes import PlanOptions
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    EXAMPLES, assert_matches, example_kwargs, example_sizes, poisoned_outputs, qkv, with_dtype,
)

pytestmark = pytest.mark.gpu
GLUON = PlanOptions(gluon=True)


@pytest.fixture
def gluon_launches(monkeypatch):
    """How many launches ran the Gluon kernel (the rest went to the template)."""
    ran = []
    covers = gluon.GluonLauncher.covers

    def counted(self, bound):
        took = covers(self, bound)
        ran.append(took)
        return took

    monkeypatch.setattr(gluon.GluonLauncher, "covers", counted)
    return ran


def _needs_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon warpgroup kernel runs on sm_90")
    why = gluon.unavailable_here()
    if why:
        pytest.skip(why)


def _head_dims(spec):
    d = spec.dim_values.get("D")
    return [d] if d else [64, 128, 256]


CASES = [(name, d) for name in sorted(EXAMPLES) for d in _head_dims(EXAMPLES[name])]


def test_a_new_variant_runs_the_template_while_the_gluon_kernel_compiles_gpu(monkeypatch):
    """By default (ATTNC_BACKGROUND_COMPILE) a new variant's first call runs the template while the Gluon kernel
    compiles in the background; once built (attnc.finish_compiles waits) the calls run it. Both right."""
    _needs_hopper()
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "1")
    launched = []
    launch = binaries.launch
    monkeypatch.setattr(binaries, "launch", lambda fn, *a, **kw: (launched.append(fn.__name__), launch(fn, *a, **kw))[1])
    cap = 17.0 + torch.rand(()).item()  # a variant no earlier test compiled
    spec = attnc.parse(f"""attention fresh_softcap {{
        q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
        score = {cap} * tanh(qk * rsqrt(D) / {cap})
        mask causal
        return softmax(score) @ v, lse
    }}""")[0]
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    kern = attnc.compile(spec)
    want = attnc.reference(spec, q, k, v)
    assert_matches(spec, kern(q, k, v), want)
    assert "attn_fwd_gluon" not in launched and launched, launched  # the template ran
    assert attnc.finish_compiles()
    launched.clear()
    assert_matches(spec, kern(q, k, v), want)
    assert launched == ["attn_fwd_gluon"], launched


def _run(spec, sizes, gluon_launches, expect_gluon=True, options=GLUON):
    q, k, v = qkv(spec, sizes, "cuda")
    kwargs = example_kwargs(spec, sizes, "cuda")
    got = attnc.compile(spec, options=options)(q, k, v, **kwargs)
    assert_matches(spec, got, attnc.reference(spec, q, k, v, **kwargs))
    assert gluon_launches == [expect_gluon], "the launch ran the Gluon kernel" if expect_gluon else "the template"


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name, d", CASES, ids=[f"{n}-D{d}" for n, d in CASES])
def test_example_spec_gluon_gpu(name, d, dtype, gluon_launches):
    """M and N off the tile sizes, M != N (bottom-right causal alignment), GQA where the spec has it."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], dtype), returns_lse=True)
    sizes = example_sizes(spec, m=300, n=1000)
    sizes.update(M=300, D=d, DV=spec.dim_values.get("DV", d))  # mqa_decode's example M is a decode one
    _run(spec, sizes, gluon_launches)


@pytest.mark.parametrize("name", ["causal_lm", "dense", "sliding_window", "gqa_causal", "document_mask", "sinks"])
def test_long_sequences_gluon_gpu(name, gluon_launches):
    """Many key tiles per program: the ring wraps several times, with full tiles between partial ones."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], "bf16"), returns_lse=True)
    sizes = example_sizes(spec, m=2048, n=2048)
    sizes.update(H=4, HKV=2 if spec.is_gqa_shape else 4)
    _run(spec, sizes, gluon_launches)


@pytest.mark.parametrize("schedule", ["parallel", "cooperative"])
@pytest.mark.parametrize("name, d", [("causal_lm", 128), ("dense", 256), ("document_mask", 64), ("sinks", 64)])
def test_other_schedules_gpu(name, d, schedule, gluon_launches):
    """The consumer schedules besides ping-pong, selected by PlanOptions: two partitions without the handoff, and
    one partition of two warpgroups."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], "bf16"), returns_lse=True)
    sizes = example_sizes(spec, m=700, n=1300)
    sizes.update(D=d, DV=d)
    _run(spec, sizes, gluon_launches, options=PlanOptions(gluon=True, warpgroup_schedule=schedule))


def test_decode_shapes_and_strided_inputs_take_the_template_gpu(gluon_launches):
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES["causal_lm"], "bf16"), returns_lse=True)
    _run(spec, example_sizes(spec, m=3, n=500), gluon_launches, expect_gluon=False)
    gluon_launches.clear()
    sizes = example_sizes(spec, m=300, n=500)
    q, k, v = qkv(spec, {**sizes, "D": 2 * sizes["D"]}, "cuda")
    q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]  # a head-dim stride of 2: TMA cannot read it
    got = attnc.compile(spec, options=GLUON)(q, k, v)
    assert_matches(spec, got, attnc.reference(spec, q, k, v))
    assert gluon_launches == [False]


@pytest.mark.parametrize("d, dv, h, hkv, mask, block_n", [
    (192, 128, 4, 2, "mask causal", None),  # MLA: chunks 128 + 64, 128 keys
    (192, 128, 4, 4, "", 64),  # the same at 64 keys (3 stages)
    (192, 64, 2, 2, "mask causal", None),  # out narrower than Q's first chunk
    (80, 64, 4, 1, "mask causal", None),  # 64 + 16
])
def test_head_dim_in_chunks_gluon_gpu(d, dv, h, hkv, mask, block_n, gluon_launches):
    """QK^T over D's chunks (two chained wgmmas, no padded column) against the reference and against D padded
    (PlanOptions(chunk_head_dim=False)) on the same inputs; the ring wraps (N = 1500)."""
    from test_triton_kernels import _spec

    _needs_hopper()
    spec = _spec(mask, dtype="bf16", v_dim="DV")
    sizes = {"B": 2, "H": h, "HKV": hkv, "M": 700, "N": 1500, "D": d, "DV": dv}
    q, k, v = qkv(spec, sizes, "cuda")
    results = []
    for chunk in (None, False):
        options = PlanOptions(gluon=True, chunk_head_dim=chunk, warpgroup_block_n=block_n if chunk is None else None)
        results.append(attnc.compile(spec, options=options)(q, k, v))
        assert_matches(spec, results[-1], attnc.reference(spec, q, k, v))
    assert gluon_launches == [True, True]
    assert torch.allclose(results[0][0].float(), results[1][0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["causal_lm", "gqa_causal"])
def test_the_default_takes_gluon_for_long_prefill_gpu(name, gluon_launches):
    """PlanOptions() at D = 128: M and N of 4096 run the Gluon kernel, 1000 the template (passes/warpgroups.py)."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], "bf16"), returns_lse=True)
    for length, expect_gluon in ((4096, True), (1000, False)):
        gluon_launches.clear()
        sizes = example_sizes(spec, m=length, n=length)
        sizes.update(B=1, H=4, HKV=2 if spec.is_gqa_shape else 4, D=128, DV=128)
        _run(spec, sizes, gluon_launches, expect_gluon=expect_gluon, options=PlanOptions())


PERSISTENT = PlanOptions(gluon=True, gluon_persistent=True)


@pytest.mark.parametrize("name, d, sizes, schedule", [
    ("dense", 128, dict(B=2, H=4, M=300, N=1000), None),  # M off the 128-row tile, M != N
    ("causal_lm", 128, dict(B=4, H=8, M=1100, N=1100), None),  # 288 work tiles, 9 a head: units of 2 and of 1
    ("causal_lm", 64, dict(B=2, H=3, M=700, N=300), None),  # M > N: whole tiles with no key (out 0, lse -inf)
    ("dense", 64, dict(B=1, H=2, M=200, N=5), None),  # one partial key tile
    ("gqa_causal", 128, dict(B=2, H=8, HKV=2, M=900, N=1500), None),  # GQA, 4 stages' ring wraps
    ("gqa_causal", 128, dict(B=1, H=12, HKV=3, M=300, N=24576), None),  # L2 sections of 8 heads and a last of 4
    ("dense", 256, dict(B=1, H=6, M=300, N=8192), None),  # out through Q; sections of 4 heads and a last of 2
    ("mla_prefill", 192, dict(B=2, H=4, M=700, N=1500), None),  # D in chunks 128 + 64, DV = 128 out through Q
    ("bshd_causal", 128, dict(B=2, H=4, M=1000, N=1000), None),  # 4-D descriptors over [B, M, H, D] strides
    ("causal_lm", 128, dict(B=3, H=4, M=1000, N=1000), "cooperative"),  # one 8-warp consumer
    ("causal_lm", 128, dict(B=3, H=4, M=1000, N=1000), "parallel"),  # no handoff
    ("sinks", 64, dict(B=2, H=4, HKV=2, M=700, N=700), None),  # params and tables per tile's head
    ("document_mask", 128, dict(B=2, H=4, M=700, N=700), None),  # every tile masked, lookups at (b, i)
])
def test_persistent_gluon_gpu(name, d, sizes, schedule, gluon_launches):
    """Persistent programs (a program per SM over the work tiles) against the reference with NaN-poisoned outputs:
    a tile a program skipped, a head addressed wrongly or a ring phase out of step shows as NaN or a wrong row. Out
    leaves through a buffer of its own at D <= 128, through Q's at D = 256 and in MLA's chunks."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], "bf16"), returns_lse=True)
    full = example_sizes(spec, m=sizes["M"], n=sizes["N"])
    full.update(sizes, D=d, DV=spec.dim_values.get("DV", d))
    _run(spec, full, gluon_launches, options=replace(PERSISTENT, warpgroup_schedule=schedule))


def test_persistent_matches_one_tile_programs_gpu(gluon_launches):
    """The same inputs through both kernels: persistent programs change which program runs a tile, not the
    arithmetic of a tile, so out and lse agree to bf16's rounding (ptxas may order or fuse differently)."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES["causal_lm"], "bf16"), returns_lse=True)
    sizes = example_sizes(spec, m=1500, n=1500)
    sizes.update(B=3, H=8, HKV=8, D=128, DV=128)
    q, k, v = qkv(spec, sizes, "cuda")
    (out_1, lse_1), (out_p, lse_p) = (attnc.compile(spec, options=o)(q, k, v) for o in (GLUON, PERSISTENT))
    assert gluon_launches == [True, True]
    torch.testing.assert_close(out_p.float(), out_1.float(), rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(lse_p, lse_1, rtol=1e-5, atol=1e-5)


def test_persistent_leaves_expanded_heads_to_the_template_gpu(gluon_launches):
    """K and V expanded over their heads (stride 0): the persistent kernel's descriptor cannot say so, the
    template runs, and the result is right."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES["gqa_causal"], "bf16"), returns_lse=True)
    sizes = example_sizes(spec, m=500, n=500)
    sizes.update(B=2, H=8, HKV=2, D=128, DV=128)
    q, k, v = qkv(spec, sizes, "cuda")
    k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    got = attnc.compile(spec, options=PERSISTENT)(q, k, v)
    assert_matches(spec, got, attnc.reference(spec, q, k, v))
    assert gluon_launches == [False]


@pytest.mark.parametrize("m, n", [(700, 1300), (300, 100), (1100, 1100)])  # even / one / odd key tiles a program
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name, d, persistent", [
    ("dense", 64, False), ("dense", 128, False), ("dense", 128, True),
    ("causal_lm", 64, True), ("causal_lm", 128, True), ("causal_lm", 128, False),  # persistent: causal's default
    ("gqa_causal", 128, True), ("gqa_causal", 128, False),
])
def test_weights_under_pv_gpu(name, d, persistent, dtype, m, n, gluon_launches):
    """PlanOptions(gluon_weights_under_pv=True): P V reads P from two shared buffers per consumer and is waited for
    a step later (benchmarks/NOTES.md, issue 13). A buffer overwritten before its P V ran, a slot released early or
    twice, or the last P V lost shows as a wrong or NaN row against the reference; the layout the launch ran is
    checked to have the option on."""
    _needs_hopper()
    spec = replace(with_dtype(EXAMPLES[name], dtype), returns_lse=True)
    sizes = example_sizes(spec, m=m, n=n)
    sizes.update(B=2, H=4, HKV=2 if spec.is_gqa_shape else 4, D=d, DV=d)
    q, k, v = qkv(spec, sizes, "cuda")
    kwargs = example_kwargs(spec, sizes, "cuda")
    kernel = attnc.compile(spec, options=PlanOptions(gluon=True, gluon_persistent=persistent,
                                                     gluon_weights_under_pv=True))
    got = kernel(q, k, v, **kwargs)
    assert_matches(spec, got, attnc.reference(spec, q, k, v, **kwargs))
    assert gluon_launches == [True], "the launch ran the Gluon kernel"
    layout = kernel.plan(q.device, d).warpgroups.layout
    assert layout.weights_under_pv and layout.persistent == persistent
