"""Serving on the CPU through TVM (docs/serving.md): paged K/V caches, packed (ragged) q/k/v and data-dependent
masks with tile skipping, against attnc.reference (float64) with NaN-filled outputs, and adversarial index data
(attnc/index_data.py's rule, the same model tests/test_index_safety.py holds the Triton kernels to).

Kernels are kept per module (each test has its own disk cache, conftest.py): every spec and schedule compiles once."""
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import attnc

pytest.importorskip("tvm")
from attnc.backends.tvm import launch as tvm_launch  # noqa: E402
from attnc.backends.tvm.backend import TvmLauncher  # noqa: E402
from attnc.backends.tvm.host import host_cpu  # noqa: E402
from attnc.backends.tvm.schedule import prefill_schedule  # noqa: E402

from fuzz.index import random_case  # noqa: E402
from test_index_safety import FIXED, WORKER, key  # noqa: E402

pytestmark = pytest.mark.shared_cache

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples" / "specs"
TOL = 2e-5
D = 32
_KERNELS: dict = {}


@pytest.fixture(autouse=True)
def _cpu_default_and_nan_outputs(monkeypatch):
    """CPU tensors go to TVM by default: conftest.py switches Triton's interpreter on, which these tests switch
    off. Outputs start as NaN so that rows a kernel fails to write fail the comparison."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tvm_launch, "empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                     device=device))


def f32(spec):
    """An example spec in f32 (the 1e-5 tolerance)."""
    return attnc.parse(spec.canonical.replace("bf16", "f32").replace("f16", "f32"), spec.name)[0]


def example(file: str, name: str):
    return f32(next(s for s in attnc.parse_file(SPECS / file) if s.name == name))


def kernel(spec):
    """attnc.compile(spec) with the default backend, shared by the module's tests."""
    if spec.key not in _KERNELS:
        _KERNELS[spec.key] = attnc.compile(spec)
    return _KERNELS[spec.key]


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def assert_matches(got, want):
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        assert g.shape == w.shape and not g.isnan().any()
        assert torch.equal(g == -math.inf, w == -math.inf)
        finite = w.isfinite()
        err = (g.double()[finite] - w[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= TOL * max(1.0, w[finite].abs().max().item() if finite.any() else 0.0), err


def run(spec, q, k, v, **kwargs):
    """The default backend's result for CPU tensors, checked against the reference; which must be TVM's."""
    kern = kernel(spec)
    got = kern(q, k, v, **kwargs)
    assert_matches(got, attnc.reference(spec, q, k, v, **kwargs))
    assert all(isinstance(impl, TvmLauncher) for impl in kern._impls.values())
    attnc.check_errors()  # sound index data: nothing recorded
    return got


def paged_call(lens, m, h=4, hkv=2, page=4, maxp=None, spare=3, seed=0, q_layout="bshd"):
    """q and a shuffled page pool holding `lens` keys per sequence; stale ids past each sequence's pages."""
    gen = torch.Generator().manual_seed(seed)
    maxp = maxp or max(1, max(-(-n // page) for n in lens))
    pages = sum(-(-n // page) for n in lens) + spare
    k, v = (torch.randn(pages, page, hkv, D, generator=gen) for _ in range(2))
    ids = torch.randperm(pages, generator=gen).tolist()
    table = torch.full((len(lens), maxp), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for e in range(-(-n // page)):
            table[b, e] = ids.pop()
    shape = (len(lens), m, h, D) if q_layout == "bshd" else (sum(m) if isinstance(m, list) else m, h, D)
    q = torch.randn(shape, generator=gen)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("m", [1, 3, 21], ids=["M=1", "M=3", "M=21"])
def test_paged_decode(m):
    """GQA over a paged cache: decode (one vector of rows) and prefill schedules, an empty sequence, a sequence
    shorter than M (rows with no key: out 0, lse -inf), a page size that does not divide the lengths."""
    spec = example("paged_decode.attn", "paged_decode")
    q, k, v, table, lens = paged_call([7, 0, 2, 70], m)
    run(spec, q, k, v, block_table=table, kv_len=lens)


def test_paged_decode_local_and_chunked_prefill():
    local = example("paged_decode.attn", "paged_decode_local")  # dims PAGE = 16, a window and softcap
    q, k, v, table, lens = paged_call([40, 1, 33], 2, page=16)
    run(local, q, k, v, block_table=table, kv_len=lens, window=20, cap=30.0)
    prefill = example("paged_decode.attn", "paged_prefill")  # ragged q over the cache (vLLM's chunked prefill)
    q_lens = [3, 0, 25, 1]
    q, k, v, table, lens = paged_call([9, 4, 90, 1], q_lens, page=8, q_layout="thd")
    run(prefill, q, k, v, cu_seqlens_q=offsets(q_lens), block_table=table, kv_len=lens)


PAGED_ALIBI_SINKS = attnc.parse("""attention paged_alibi_sinks {
    q: f32[B, M, H, D]  k: f32[PAGES, PAGE, HKV, D]  v: f32[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    input slopes: f32[H]
    input sinks: f32[H]
    score = qk * rsqrt(D) + slopes[h] * (j - i)
    mask causal
    return softmax(score, sink=sinks[h]) @ v, lse
}""", "paged_alibi_sinks.attn")[0]


@pytest.mark.parametrize("m", [1, 2, 5])
def test_packed_heads_read_their_own_head(m):
    """Decode tasks pack a GQA group's heads into their rows (schedule.decode_pack: 4 heads at M = 2 on 16 lanes):
    the score and the sink read each row's own head (slopes[h], sinks[h])."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, table, lens = paged_call([30, 0, 65], m, h=8, hkv=2, seed=4)
    run(PAGED_ALIBI_SINKS, q, k, v, block_table=table, kv_len=lens, slopes=torch.rand(8, generator=gen),
        sinks=torch.randn(8, generator=gen))


@pytest.mark.parametrize("name", ["varlen_causal", "varlen_alibi_sinks"])
def test_varlen(name):
    """Packed sequences, with an empty one and sequences longer than a query tile; GQA for varlen_causal."""
    spec = example("varlen.attn", name)
    gen = torch.Generator().manual_seed(1)
    q_lens = [5, 0, 70, 1]
    kv_lens = [9, 3, 70, 12] if name == "varlen_causal" else q_lens
    hkv = 2 if name == "varlen_causal" else 4
    q = torch.randn(sum(q_lens), 4, D, generator=gen)
    k, v = (torch.randn(sum(kv_lens), hkv, D, generator=gen) for _ in range(2))
    if name == "varlen_causal":
        kwargs = dict(cu_seqlens_q=offsets(q_lens), cu_seqlens_k=offsets(kv_lens))
    else:
        kwargs = dict(cu_seqlens=offsets(q_lens), slopes=torch.rand(4, generator=gen), sinks=torch.randn(4, generator=gen))
    run(spec, q, k, v, **kwargs)


@pytest.mark.parametrize("name, m", [("document_mask", 40), ("document_mask", 1), ("key_padding", 50),
                                     ("mqa_decode", 1), ("mqa_decode", 5)])
def test_dense_serving_examples(name, m):
    spec = example("document_mask.attn" if name != "mqa_decode" else "mqa_decode.attn", name)
    gen = torch.Generator().manual_seed(2)
    b, h, n = 2, 4, 150
    hkv = 1 if name == "mqa_decode" else h
    q = torch.randn(b, h, m, D, generator=gen)
    k, v = (torch.randn(b, hkv, n, D, generator=gen) for _ in range(2))
    kwargs = {}
    if name == "document_mask":
        kwargs["doc"] = torch.sort(torch.randint(0, 5, (b, n), generator=gen), dim=1).values.int()
    elif name == "key_padding":
        kwargs["kv_len"] = torch.tensor([0, 77], dtype=torch.int32)
    run(spec, q, k, v, **kwargs)


# ---------------------------------------------------------------- tile skipping (data-dependent masks)


DOC = example("document_mask.attn", "document_mask")


def test_tile_summary_classes_and_skipped_tiles():
    """Documents of 64 keys (whole key tiles): the summary classes every (query tile, key tile) pair as the mask
    says, and the prefill kernel skips the empty ones: V holds NaN in document 0's keys, which only document 0's
    rows keep, so every other row comes out finite and right only if those tiles are never read."""
    sched = prefill_schedule(host_cpu().vector)
    bm, bn = sched.block_m, sched.block_n
    n = 4 * 64
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, D, generator=gen) for _ in range(3))
    doc = (torch.arange(n) // 64).int()[None]
    v[:, :, :64] = math.nan
    kern = kernel(DOC)
    out = kern(q, k, v, doc=doc)
    want = attnc.reference(DOC, q, k, v, doc=doc)
    assert out[:, :, :64].isnan().all() and want[:, :, :64].isnan().all()
    assert_matches(out[:, :, 64:], want[:, :, 64:])
    launcher = kern._impls[(q.device, D, D)]
    table = next(reversed(launcher._summaries.values()))[1]  # this call's
    assert table.shape == (n // bm, n // bn)  # the heads share one summary: the mask does not read h
    for qt in range(n // bm):
        rows = range(qt * bm, (qt + 1) * bm)
        for kt in range(-(-(rows[-1] + 1) // bn)):  # the key tiles the causal mask leaves
            keys = range(kt * bn, (kt + 1) * bn)
            same_doc = [bool(doc[0, i] == doc[0, j]) for i in rows for j in keys]
            kept = [same and j <= i for same, (i, j) in zip(same_doc, ((i, j) for i in rows for j in keys))]
            assert table[qt, kt] == (0 if not any(kept) else 1 if all(same_doc) else 2), (qt, kt)
    # the summary is reused while the tensors are unchanged, and rebuilt after an in-place write
    cached = len(launcher._summaries)
    kern(q, k, v, doc=doc)
    assert len(launcher._summaries) == cached
    doc[0, 0] = 9
    kern(q, k, v, doc=doc)
    assert len(launcher._summaries) == min(cached + 1, 4) and next(reversed(launcher._summaries.values()))[1] \
        is not table


# ---------------------------------------------------------------- adversarial index data


def test_bad_page_id_is_poisoned_and_flagged_in_process():
    spec = example("paged_decode.attn", "paged_decode")
    q, k, v, table, lens = paged_call([7, 9, 3], 2)
    bad = table.clone()
    bad[1, 1] = 1_000_000
    out, lse = kernel(spec)(q, k, v, block_table=bad, kv_len=lens)
    assert out[1].isnan().all() and lse[1].isnan().all()
    want, want_lse = attnc.reference(spec, q, k, v, block_table=table, kv_len=lens)
    assert_matches((out[[0, 2]], lse[[0, 2]]), (want[[0, 2]], want_lse[[0, 2]]))
    with pytest.raises(attnc.CallError, match=r"^block_table: block_table\[1, 1\] = 1000000 is not a page id"):
        attnc.check_errors()
    with pytest.raises(attnc.CallError, match=r"^kv_len: kv_len\[2\] = 13, but a sequence holds 0 to MAXP \* PAGE"):
        kernel(spec)(q, k, v, block_table=table, kv_len=torch.tensor([7, 9, 13], dtype=torch.int32), validate=True)


CI_RANDOM_CASES = 30


def test_adversarial_index_data_through_tvm():
    """tests/fuzz/index.py's fixed cases and random ones, through TVM (TRITON_INTERPRET=0) in a subprocess: no
    out-of-bounds access, the rows bad data reaches NaN, the rest equal to the reference on the clamped data, and
    check_errors / validate mode raising exactly the messages the Triton kernels raise. Split-KV is a Triton
    choice (the CPU kernel does not split): the cases run without it."""
    cases = [replace(c, splits=None) for c, _ in FIXED.values()]
    kv_heads = {c.kind: c.hkv for c in cases}  # the random cases reuse the fixed cases' kernels (no compile of their own)
    cases += [replace(c, splits=None, hkv=kv_heads[c.kind], validate=n % 3 == 0)
              for n, c in enumerate(random_case(5000 + n) for n in range(CI_RANDOM_CASES))]
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # the worker's outputs NaN-filled, as the Triton runs' are (fuzz/index.py's run_case)
    worker = ("import math, sys, torch; from attnc.backends.tvm import launch; "
              "launch.empty = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device); "
              f"sys.path.insert(0, {str(WORKER.parent.parent)!r}); from fuzz import index; "
              f"sys.exit(index.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", worker, "--n", "0", "--device", "cpu",
                           "--cases", json.dumps([asdict(c) for c in cases])],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        results[json.dumps(record.pop("case"), sort_keys=True)] = record
    assert len(results) == len(cases), proc.stderr[-3000:]
    assert not [r for r in results.values() if r["problems"]], [r for r in results.values() if r["problems"]][:3]
    for (case, message), used in zip(FIXED.values(), cases):
        result = results[key(used)]
        if message is None:
            assert result["recorded"] is None and result["validated"] is None
            continue
        for raised in (result["recorded"], result["validated"]):
            assert raised is not None and re.match(message, raised), raised
            assert "the rows it reached are NaN" in raised
