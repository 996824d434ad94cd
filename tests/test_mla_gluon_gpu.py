"""The Gluon MLA decode kernel (PlanOptions(gluon=True), passes/latent_decode.py) on an H100: run with
`python -m pytest -m gpu tests/test_mla_gluon_gpu.py`. bf16 at DeepSeek's widths (D = 512 latent, DR = 64, pages of
64), 64 and 128 heads, the latent contiguous and paged (shuffled pages, key lists off the tile and page sizes, every
eighth one key long), one split and forced split-KV, one and two query tokens, an FP8 e4m3 latent (converted in
shared memory by the kernel's converter warpgroup), and quantised queries over it (fp8 x fp8 QK^T), against
attnc.reference with NaN-poisoned outputs and workspace (test_mla_grid's inputs); each test checks that the Gluon
kernel ran, not the Triton decode kernel it falls back to, and that no index data was flagged. A bad page id comes
out as NaN rows and a flagged violation. The persistent schedule (PlanOptions(mla_persistent=True); `-k
persistent`): B in {1, 3, 64}, paged key lists of 0 and 1 keys beside lengths off the tile, 64 and 128 heads, and a
bad length flagged and NaN."""
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import attnc
from attnc.backends.triton import binaries, gluon, gluon_decode
from attnc.dsl.check import check_attention
from attnc.errors import CallError
from attnc.ir import Quantize
from attnc.passes import PlanOptions
from test_mla_grid import Point, grid_call, grid_spec
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    assert_matches, poisoned_outputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_mla  # noqa: E402

pytestmark = pytest.mark.gpu
SHAPES = bench_mla.GPU
POINTS = [Point(64, 1, n_max=3000), Point(64, 64), Point(128, 4, n_max=1000), Point(128, 64),
          Point(64, 8, n_max=700, splits=4), Point(128, 2, n_max=2000, splits=7), Point(64, 16, m=2),
          Point(16, 4, n_max=500)]


@pytest.fixture
def gluon_calls(monkeypatch):
    """Per call: whether the Gluon kernel took it (False: the Triton decode kernel ran)."""
    took = []
    run = gluon_decode.GluonDecodeLauncher.run

    def counted(self, bound, go=None):
        took.append(self.uncovered(bound) == "")
        return run(self, bound, go)

    monkeypatch.setattr(gluon_decode.GluonDecodeLauncher, "run", counted)
    return took


def _needs_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon MLA decode kernel runs on sm_90")
    why = gluon.unavailable_here()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("block_n", [None, 32])
@pytest.mark.parametrize("point", POINTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gluon_decode_matches_reference_gpu(layout, point, block_n, gluon_calls):
    _needs_hopper()
    spec = grid_spec(layout, "plain", SHAPES)
    q, k, kw = grid_call(layout, "plain", SHAPES, point)
    kern = attnc.compile(spec, backend="triton", options=PlanOptions(gluon=True, num_splits=point.splits,
                                                                     warpgroup_block_n=block_n))
    with contextlib.suppress(CallError):
        attnc.check_errors()  # clears whatever an earlier test left
    got = kern(q, k, **kw)
    assert gluon_calls == [True], "the Gluon kernel took the call"
    assert_matches(spec, got, attnc.reference(spec, q, k, **kw), tol=1e-2)
    attnc.check_errors()  # the index data is valid: nothing flagged


def test_a_new_variant_runs_the_triton_decode_kernel_while_the_gluon_kernel_compiles_gpu(monkeypatch):
    """By default (ATTNC_BACKGROUND_COMPILE) a new variant's first call runs the Triton decode kernel while the Gluon
    kernel compiles in the background; once built (attnc.finish_compiles waits) the calls run it. Both right."""
    _needs_hopper()
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "1")
    launched = []
    launch = binaries.launch
    monkeypatch.setattr(binaries, "launch", lambda fn, *a, **kw: (launched.append(fn.__name__), launch(fn, *a, **kw))[1])
    point = Point(64, 4, n_max=900, splits=3)  # a split count no other test plans: a module no test compiled
    spec = grid_spec("paged", "plain", SHAPES)
    q, k, kw = grid_call("paged", "plain", SHAPES, point)
    kern = attnc.compile(spec, backend="triton", options=PlanOptions(gluon=True, num_splits=point.splits))
    want = attnc.reference(spec, q, k, **kw)
    with contextlib.suppress(CallError):
        attnc.check_errors()  # clears whatever an earlier test left
    assert_matches(spec, kern(q, k, **kw), want, tol=1e-2)
    assert "attn_decode_gluon" not in launched and launched, launched  # the Triton decode kernel ran
    assert attnc.finish_compiles()
    launched.clear()
    assert_matches(spec, kern(q, k, **kw), want, tol=1e-2)
    assert launched[0] == "attn_decode_gluon", launched
    attnc.check_errors()


FP8_POINTS = [Point(64, 64), Point(128, 4, n_max=1000), Point(64, 8, n_max=700, splits=4), Point(64, 16, m=2)]


# The converter variants (e4m3 a converter thread, converter warpgroups, P V in f16): (8, 1, False) the default
# (PlanOptions.fp8_conflict_free_converter), (16, 1, False) with it off, and the options built on it
FP8_CONVERTERS = [(16, 1, False), (8, 1, False), (8, 2, False)]
Q8_CONVERTERS = FP8_CONVERTERS + [(8, 1, True), (8, 2, True)]


def converter_id(variant: tuple[int, int, bool]) -> str:
    vector, converters, f16_values = variant
    return f"v{vector}-c{converters}{'-f16' if f16_values else ''}"


def converter_options(point: Point, variant: tuple[int, int, bool]) -> PlanOptions:
    """The Gluon kernel with the converter `variant` for an FP8 latent at the point's splits."""
    vector, converters, f16_values = variant
    return PlanOptions(gluon=True, num_splits=point.splits, fp8_conflict_free_converter=None if vector == 8 else False,
                       fp8_converter_warpgroups=converters, fp8_f16_values=f16_values)


def assert_converters(kern, q, variant: tuple[int, int, bool]) -> None:
    w = kern.plan(q.device, q.shape[-1]).decode.warpgroups.layout
    assert (w.converter_vector, w.converter_warpgroups, w.f16_values) == variant


@pytest.mark.parametrize("variant", FP8_CONVERTERS, ids=converter_id)
@pytest.mark.parametrize("point", FP8_POINTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gluon_decode_fp8_latent_gpu(layout, point, variant, gluon_calls):
    """The latent and its rope part e4m3 with a scale each (test_mla_grid's "fp8" form): the producer lands e4m3
    tiles, the converter warpgroup(s) write them as bf16 into the warpgroups' ring (16 or 8 e4m3 a thread; two: half
    the latent's chunks each, the rope part by the second); scores and out rows scaled."""
    _needs_hopper()
    spec = grid_spec(layout, "fp8", SHAPES)
    q, k, kw = grid_call(layout, "fp8", SHAPES, point)
    kern = attnc.compile(spec, backend="triton", options=converter_options(point, variant))
    assert_converters(kern, q, variant)
    with contextlib.suppress(CallError):
        attnc.check_errors()
    got = kern(q, k, **kw)
    assert gluon_calls == [True], "the Gluon kernel took the call"
    assert_matches(spec, got, attnc.reference(spec, q, k, **kw), tol=1e-2)
    attnc.check_errors()


PERSISTENT = PlanOptions(gluon=True, mla_persistent=True)
PERSISTENT_POINTS = [Point(64, 1, n_max=3000), Point(64, 3, n_max=700), Point(64, 64, n_max=2000),
                     Point(128, 3, n_max=1000), Point(128, 64, n_max=1500), Point(128, 1, n_max=40)]


@pytest.fixture
def persistent_launches(monkeypatch):
    """Per Gluon launch: its programs (0: the split rule's launch, not the persistent one)."""
    programs = []
    calls = gluon_decode.GluonDecodeLauncher.calls

    def counted(self, bound, go, *outputs):
        programs.append(go.programs)
        return calls(self, bound, go, *outputs)

    monkeypatch.setattr(gluon_decode.GluonDecodeLauncher, "calls", counted)
    return programs


def _ragged(kw: dict, batch: int) -> dict:
    """Paged key lists of 0 and 1 keys first (the rest drawn off the tile and page sizes by grid_call)."""
    lengths = kw["kv_len"].clone()
    lengths[:min(batch - 1, 2)] = torch.tensor([0, 1][:min(batch - 1, 2)], dtype=lengths.dtype)
    return {**kw, "kv_len": lengths}


@pytest.mark.parametrize("point", PERSISTENT_POINTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_persistent_schedule_matches_reference_gpu(layout, point, gluon_calls, persistent_launches):
    _needs_hopper()
    spec = grid_spec(layout, "plain", SHAPES)
    q, k, kw = grid_call(layout, "plain", SHAPES, point)
    if layout == "paged":
        kw = _ragged(kw, point.B)
    kern = attnc.compile(spec, backend="triton", options=PERSISTENT)
    with contextlib.suppress(CallError):
        attnc.check_errors()
    got = kern(q, k, **kw)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert gluon_calls == [True] and len(persistent_launches) == 1 and 0 < persistent_launches[0] <= sms
    assert_matches(spec, got, attnc.reference(spec, q, k, **kw), tol=1e-2)
    attnc.check_errors()


def test_persistent_bad_length_poisons_its_sequence_and_is_flagged_gpu(gluon_calls, persistent_launches):
    """A negative length (clamped to no keys, kept one tile) and one past the table's capacity: both sequences
    NaN and a violation flagged; the others right."""
    _needs_hopper()
    spec = grid_spec("paged", "plain", SHAPES)
    q, k, kw = grid_call("paged", "plain", SHAPES, Point(128, 6, n_max=900))
    lengths = kw["kv_len"].clone()
    lengths[1], lengths[4] = -7, kw["block_table"].shape[1] * SHAPES.page + 1
    kern = attnc.compile(spec, backend="triton", options=PERSISTENT)
    with contextlib.suppress(CallError):
        attnc.check_errors()
    out, lse = kern(q, k, **{**kw, "kv_len": lengths})
    assert gluon_calls == [True] and persistent_launches[0] > 0
    assert out[[1, 4]].isnan().all() and lse[[1, 4]].isnan().all()
    good = [0, 2, 3, 5]
    want_out, want_lse = attnc.reference(spec, q, k, **kw)
    torch.testing.assert_close(out[good].double(), want_out[good], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse[good].double(), want_lse[good], rtol=1e-2, atol=1e-2)
    with pytest.raises(CallError, match="kv_len"):
        attnc.check_errors()


Q8_POINTS = [Point(64, 64), Point(128, 4, n_max=1000), Point(64, 8, n_max=700, splits=4), Point(128, 16, n_max=90)]


@pytest.mark.parametrize("variant", Q8_CONVERTERS, ids=converter_id)
@pytest.mark.parametrize("point", Q8_POINTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gluon_decode_quantized_queries_gpu(layout, point, variant, gluon_calls):
    """The FP8 latent with `quantize q, qr to f8e4m3`: Q quantised in place in shared memory, QK^T and the rope dot
    fp8 x fp8 wgmma on the e4m3 slots, P V on the converter warpgroups' bf16 (or f16: fp8_f16_values, P in f16 too)
    copy of the latent's columns, the fp8 products in the tensor cores' own sums (the default). Key lists of any length
    (none a multiple of the 32-key tile or the page); against the quantised reference, and nearer it than the
    unquantised one (a kernel that read q as it is would be nearer that)."""
    kern, q = assert_quantized_queries(layout, point, converter_options(point, variant), 1e-2, gluon_calls)
    assert_converters(kern, q, variant)


@pytest.mark.parametrize("every", [32, 64, 128])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gluon_decode_fp8_score_sums_gpu(layout, every, gluon_calls):
    """PlanOptions.fp8_float32_sum_every: the fp8 QK^T's products added in float32 every 32, 64 or 128 products, where
    the default (0) keeps the tensor cores' own sums. On the H100 in session 16 out was 0.0071 off the reference with
    sums every 32 and 0.0086 with none (lse 0.00035 and 0.0023; benchmarks/fp8_queries_error.py)."""
    kern, q = assert_quantized_queries(layout, Point(64, 64), PlanOptions(gluon=True, fp8_float32_sum_every=every),
                                       1e-2, gluon_calls)
    assert kern.plan(q.device, q.shape[-1]).decode.warpgroups.layout.fp8_float32_sum_every == every


@pytest.mark.parametrize(("options", "gluon"), [(PlanOptions(), True), (PlanOptions(gluon=False), False)],
                         ids=["default", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_quantized_queries_default_and_triton_kernel_gpu(layout, options, gluon, gluon_calls):
    """`quantize q, qr` over the FP8 latent: by default the Gluon kernel's fp8 x fp8 path takes the call, and with
    PlanOptions(gluon=False) the Triton decode kernel; both within the bf16 tolerance."""
    kern, q = assert_quantized_queries(layout, Point(64, 64), options, 1e-2, gluon_calls, gluon=gluon)
    assert kern.plan(q.device, q.shape[-1]).decode.warpgroups.path == ("gluon" if gluon else "triton")


def assert_quantized_queries(layout: str, point: Point, options: PlanOptions, tol: float, gluon_calls,
                             gluon: bool = True):
    """The grid's FP8 spec with `quantize q, qr to f8e4m3` at `options` (through the Gluon kernel, or with `gluon`
    False the Triton decode kernel): right within `tol` against the quantised reference and twice nearer it than to
    the unquantised one. Returns the kernel and q."""
    _needs_hopper()
    fp8 = grid_spec(layout, "fp8", SHAPES)
    spec = replace(fp8, name=f"{fp8.name}_q8", quantize=(Quantize("q", "f8e4m3"), Quantize("qr", "f8e4m3")))
    check_attention(spec)
    q, k, kw = grid_call(layout, "fp8", SHAPES, point)
    kern = attnc.compile(spec, backend="triton", options=options)
    assert kern.plan(q.device, q.shape[-1]).decode.warpgroups.layout.fp8_queries
    with contextlib.suppress(CallError):
        attnc.check_errors()
    got = kern(q, k, **kw)
    assert gluon_calls == ([True] if gluon else []), "the Gluon kernel took the call" if gluon else "the Triton one did"
    want = attnc.reference(spec, q, k, **kw)
    assert_matches(spec, got, want, tol=tol)
    plain, _ = attnc.reference(fp8, q, k, **kw)
    out = got[0].double()
    assert 2 * (out - want[0]).abs().max() < (out - plain).abs().max()
    attnc.check_errors()
    return kern, q


def test_bad_page_id_poisons_its_sequence_and_is_flagged_gpu(gluon_calls):
    _needs_hopper()
    spec = grid_spec("paged", "plain", SHAPES)
    q, k, kw = grid_call("paged", "plain", SHAPES, Point(64, 4, n_max=300))
    kw["block_table"] = kw["block_table"].clone()
    kw["block_table"][2, 0] = k.shape[0] + 5  # past the pool: sequence 2 reads page 0 instead, and is NaN
    kern = attnc.compile(spec, backend="triton", options=PlanOptions(gluon=True))
    with contextlib.suppress(CallError):
        attnc.check_errors()
    out, lse = kern(q, k, **kw)
    assert gluon_calls == [True]
    assert out[2].isnan().all() and lse[2].isnan().all()
    assert not out[[0, 1, 3]].isnan().any()
    with pytest.raises(CallError, match="block_table"):
        attnc.check_errors()


def test_uncovered_calls_run_the_triton_kernel_gpu(gluon_calls):
    """q with a head-dim stride of 2 (TMA cannot read it): the Triton decode kernel runs the call, with a warning,
    and its result matches the reference."""
    _needs_hopper()
    spec = grid_spec("contiguous", "plain", SHAPES)
    q, k, kw = grid_call("contiguous", "plain", SHAPES, Point(64, 4, n_max=300))
    strided = torch.zeros(*q.shape[:-1], 2 * q.shape[-1], dtype=q.dtype, device=q.device)
    strided[..., ::2] = q
    kern = attnc.compile(spec, backend="triton", options=PlanOptions(gluon=True))
    gluon_decode._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="q is not TMA-readable"):
        got = kern(strided[..., ::2], k, **kw)
    assert gluon_calls == [False]
    assert_matches(spec, got, attnc.reference(spec, q, k, **kw), tol=1e-2)
