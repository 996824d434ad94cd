"""Issue 14's correctness grid for MLA decode: the heads x batch grid of benchmarks/bench_mla.py (64 / 128 heads,
batch 64 / 128 / 768, its D = 512 latent, DR = 64 RoPE part, page of 64, scale) at short key lists, on the GPU
(`-m gpu`), for the latent cache contiguous, paged (a random permutation of pages) and ragged; the latent in bf16,
in FP8 e4m3 with its RoPE part and a per-tensor scale each, and in FP8 e4m3 beside a bf16 RoPE part (FlashMLA's
FP8 layout) with its scale as an f32[HKV] device tensor; one query token, a few (M = 3, 4) on two points, and a
forced split-KV on two. Each call is checked against attnc.reference (float64, over the FP8 data dequantised) with
NaN-poisoned outputs and workspace. The same body runs on the CPU through Triton's interpreter at tiny widths."""
import contextlib
import sys
import zlib
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pytest
import torch

import attnc
from attnc.backends.triton import serving
from attnc.dsl.signature import bind
from attnc.errors import CallError
from attnc.passes import PlanOptions
from attnc.passes.decode import decode_launch
from test_fp8 import _fp8, _offsets, _paged, _randn, _scales
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    assert_matches, poisoned_outputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_mla  # noqa: E402

pytestmark = pytest.mark.shared_cache

LAYOUTS = ("contiguous", "paged", "ragged")
# Where the latent (k) and its RoPE part (kr) are stored: both in q's dtype; both FP8 e4m3, each with an f32 param
# as its scale; the latent alone FP8, its scale a one-element f32[HKV] tensor on the device (one latent head).
FORMS = ("plain", "fp8", "fp8-head")
TOL = {"bf16": 1e-2, "f32": 1e-5}  # of the largest |reference| (at least 1), as assert_matches measures it


@dataclass(frozen=True)
class Point:
    """One call of the grid: H heads, B sequences of m query tokens each (at most m, drawn, for a ragged q), key
    lists drawn in 1..n_max, and a forced split count (None: the plan's rule)."""

    H: int
    B: int
    m: int = 1
    n_max: int = 300
    splits: int | None = None

    def __str__(self) -> str:
        return f"H{self.H}-B{self.B}-M{self.m}" + ("" if self.splits is None else f"-split{self.splits}")


GPU_POINTS = [Point(h, b) for h, b in dict.fromkeys((w.H, w.B) for w in bench_mla.decode_workloads(quick=False))]
# The rule splits none of these short key lists on an H100: the split-KV merge runs where a split count is forced
GPU_POINTS += [Point(128, 64, m=4), Point(64, 128, splits=4), Point(64, 64, m=3, splits=3)]
SMALL = bench_mla.SMOKE  # f32, D = 64, DR = 16, pages of 16 (the interpreter's key tile)
CPU_POINTS = [(SMALL, Point(8, 3, n_max=90, splits=3)),
              (replace(SMALL, dtype=torch.bfloat16, spec_dtype="bf16"), Point(4, 2, m=3, n_max=40))]


@cache
def grid_spec(layout: str, form: str, s: bench_mla.Shapes) -> attnc.Attention:
    """examples/specs/mla.attn's decode at these widths, for a layout and a storage form, returning lse."""
    q_rows, k_rows = {"contiguous": ("B, M, H", "B, N"), "paged": ("B, M, H", "PAGES, PAGE"),
                      "ragged": ("T, H", "TK")}[layout]
    latent = s.spec_dtype if form == "plain" else "f8e4m3"
    rope = "f8e4m3" if form == "fp8" else s.spec_dtype
    storage = {"contiguous": "", "paged": "    paged k by block_table, kv_len\n",
               "ragged": "    ragged q by cu_seqlens_q\n    ragged k by cu_seqlens_k\n"}[layout]
    scales = {"plain": "",
              "fp8": "    param ckv_scale: f32\n    param kr_scale: f32\n    dequant k by ckv_scale\n"
                     "    dequant kr by kr_scale\n",
              "fp8-head": "    input ckv_scale: f32[HKV]\n    dequant k by ckv_scale\n"}[form]
    page = f", PAGE = {s.page}" if layout == "paged" else ""
    return attnc.parse(f"""attention mla_{layout}_{form.replace("-", "_")} {{
    dims D = {s.D}, DR = {s.DR}{page}
    q: {s.spec_dtype}[{q_rows}, D]
    k: {latent}[{k_rows}, D]
    input qr: {s.spec_dtype}[{q_rows}, DR]
    input kr: {rope}[{k_rows}, DR]
{storage}{scales}    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}}""", "test_mla_grid.py")[0]


@cache
def grid_kernel(spec: attnc.Attention, splits: int | None):
    """One kernel a spec and split count in a process, so that the grid compiles each spec once."""
    return attnc.compile(spec, backend="triton", options=PlanOptions(num_splits=splits))


def latent_cache(rows: tuple, form: str, s: bench_mla.Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent [*rows, D] and its RoPE part [*rows, DR]: views of one [*rows, D + DR] cache (FlashMLA's, and
    bench_mla's) where they share a dtype."""
    if form == "fp8-head":
        return _fp8(*rows, s.D), _randn(*rows, s.DR).to(s.dtype)
    cache = _fp8(*rows, s.E) if form == "fp8" else _randn(*rows, s.E).to(s.dtype)
    return cache[..., :s.D], cache[..., s.D:]


def grid_call(layout: str, form: str, s: bench_mla.Shapes, p: Point) -> tuple:
    """(q, k, keyword arguments) of one point, on fresh inputs seeded by the point: key lists drawn in 1..n_max (the
    last n_max, the contiguous cache's length), none a multiple of the page, every eighth one key long; q and qr
    views of one [.., D + DR] query, as the benchmark passes them."""
    torch.manual_seed(zlib.crc32(f"{layout}-{form}-{s.spec_dtype}-{p}".encode()))
    lengths = torch.randint(1, p.n_max + 1, (p.B,))
    lengths[-1] = p.n_max
    lengths[lengths % s.page == 0] -= 1
    lengths[::8] = 1
    lengths = lengths.tolist()
    kw = dict(scale=bench_mla.SCALE)
    if layout == "ragged":
        q_lengths = torch.randint(1, p.m + 1, (p.B,)).tolist()
        q_rows, k_rows = (sum(q_lengths),), (sum(lengths),)
        kw.update(cu_seqlens_q=_offsets(q_lengths), cu_seqlens_k=_offsets(lengths))
    elif layout == "paged":
        pages, table = _paged(s.page, lengths, 1)
        q_rows, k_rows = (p.B, p.m), (pages, s.page)
        kw.update(table)
    else:
        q_rows, k_rows = (p.B, p.m), (p.B, max(lengths))
    q = _randn(*q_rows, p.H, s.E).to(s.dtype)
    k, kw["kr"] = latent_cache(k_rows, form, s)
    kw["qr"] = q[..., s.D:]
    if form == "fp8":
        kw.update(ckv_scale=0.02, kr_scale=0.05)
    elif form == "fp8-head":
        kw["ckv_scale"] = _scales(1)
    return q[..., :s.D], k, kw


def check_grid_point(layout: str, form: str, s: bench_mla.Shapes, p: Point) -> None:
    spec = grid_spec(layout, form, s)
    q, k, kw = grid_call(layout, form, s, p)
    kern = grid_kernel(spec, p.splits)
    if p.splits is not None:  # the forced split is taken: the lse merge runs
        go = decode_launch(kern.plan(q.device, s.D), bind(spec, q, k, k, kw).sizes, serving.sm_count(q.device))
        assert go.splits > 1
    with contextlib.suppress(CallError):
        attnc.check_errors()  # clears whatever an earlier test left
    assert_matches(spec, kern(q, k, **kw), attnc.reference(spec, q, k, **kw), tol=TOL[s.spec_dtype])
    attnc.check_errors()  # the index data is valid: nothing flagged


@pytest.mark.gpu
@pytest.mark.parametrize("point", GPU_POINTS, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_gpu(layout, form, point):
    check_grid_point(layout, form, bench_mla.GPU, point)


@pytest.mark.parametrize("shapes, point", CPU_POINTS, ids=[f"{s.spec_dtype}-{p}" for s, p in CPU_POINTS])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_small(layout, form, shapes, point):
    check_grid_point(layout, form, shapes, point)
