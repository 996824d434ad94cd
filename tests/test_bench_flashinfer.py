"""attnc bench's FlashInfer column on the CPU (flashinfer is not installed here): the layout conversions against a
direct computation; the plan arguments chosen per workload, run through a float64 model of FlashInfer's documented
semantics (flashinfer 0.5.0: prefill.py's plan() docstring, attention/variants.cuh, hopper/variants.cuh) and
compared with attnc.reference on small seeded inputs; and the column's place in the runners, table and colours."""
import dataclasses
import math
import re
import sys
import zlib
from pathlib import Path

import pytest
import torch

import attnc
from attnc.bench import (
    FLASHINFER_SETUP, PEERS, RUNNER_COLOURS, _SPARE_COLOURS, _alibi_inputs, checked_runners, flashinfer_plan,
    from_ragged, installed_version, prefill_workloads, print_table, runner_makers, to_ragged,
)


def test_ragged_layout_against_a_direct_computation():
    t = torch.randn(3, 4, 5, 8, generator=torch.Generator().manual_seed(0))
    r = to_ragged(t)
    assert r.shape == (15, 4, 8) and r.is_contiguous()
    for b in range(3):
        for s in range(5):
            for h in range(4):
                assert torch.equal(r[b * 5 + s, h], t[b, h, s])
    back = from_ragged(r, 3)
    assert back.shape == t.shape and torch.equal(back, t)
    assert back.data_ptr() == r.data_ptr()  # a view: the timed call copies nothing
    assert to_ragged(t[:, :1]).is_contiguous()  # one head: transpose(1, 2) is already contiguous


def flashinfer_slopes(heads: int) -> torch.Tensor:
    """flashinfer.utils.get_alibi_slopes (0.5.0, utils.py:190), copied: its ALiBi takes no slopes."""
    n = 2 ** math.floor(math.log2(heads))
    m = torch.pow(2.0 ** (-8.0 / n), torch.arange(1, 1 + n))
    if n < heads:
        m = torch.cat([m, torch.pow(2.0 ** (-4.0 / n), torch.arange(1, 1 + 2 * (heads - n), 2))])
    return m.float()


def flashinfer_model(q, k, v, indptr, heads, kv_heads, causal=False, sm_scale=None, window_left=-1,
                     logits_soft_cap=0.0, pos_encoding_mode="NONE"):
    """What BatchPrefillWithRaggedKVCacheWrapper computes on ragged q/k/v ([tokens, heads, D], sequences at indptr),
    in float64: logits q.k * sm_scale (ALiBi: + slope[h] * (kv - q)), soft cap cap * tanh(x / cap), keys with
    kv <= q (causal, equal lengths) and q - kv <= window_left (window_left >= 0) kept, softmax, @ v."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = heads // kv_heads
    for a, e in zip(indptr, indptr[1:]):
        qs = q[a:e].double()
        ks, vs = (t[a:e].double().repeat_interleave(group, dim=1) for t in (k, v))
        pos = torch.arange(e - a)
        qi, kj = pos[:, None], pos[None, :]
        s = torch.einsum("ihd,jhd->hij", qs, ks) * sm_scale
        if pos_encoding_mode == "ALIBI":
            s = s + flashinfer_slopes(heads).double()[:, None, None] * (kj - qi)
        if logits_soft_cap > 0:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        keep = torch.ones(e - a, e - a, dtype=torch.bool)
        if causal:
            keep &= kj <= qi
        if window_left >= 0:
            keep &= qi - kj <= window_left
        p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
        out[a:e] = torch.einsum("hij,jhd->ihd", p, vs)
    return out


def small(w, heads=4):
    """The workload at a CPU size (B=2, S=24, D=16; GQA 4/2), its key window cut to 5 so that it masks."""
    changes = {"B": 2, "S": 24, "D": 16, "H": heads, "HKV": heads // 2 if w.HKV != w.H else heads}
    if w.window is not None:
        changes.update(window=5, params={**w.params, "window": 5})
    return dataclasses.replace(w, **changes)


@pytest.mark.parametrize("name", [w.name for w in prefill_workloads(quick=True)])
def test_flashinfer_plan_computes_each_workloads_math(name):
    (w,) = [small(w) for w in prefill_workloads(quick=True) if w.name == name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(w.B, h, w.S, w.D, generator=gen).bfloat16() for h in (w.H, w.HKV, w.HKV))
    extra = w.inputs(w.B, w.H, w.S, "cpu") if w.inputs else {}
    backend, plan = flashinfer_plan(w, extra, flashinfer_slopes)
    assert backend == ("fa2" if "alibi" in name else "fa3")
    assert plan.get("window_left", -1) == (4 if w.window else -1)
    indptr = [b * w.S for b in range(w.B + 1)]
    got = from_ragged(flashinfer_model(to_ragged(q), to_ragged(k), to_ragged(v), indptr, w.H, w.HKV, **plan), w.B)
    want = attnc.reference(attnc.parse(w.spec)[0], q, k, v, **w.params, **extra)
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_flashinfer_alibi_is_refused_where_its_slopes_are_not_the_workloads():
    (w,) = [small(w, heads=6) for w in prefill_workloads(quick=True) if w.name.startswith("alibi")]
    extra = _alibi_inputs(w.B, w.H, w.S, "cpu")  # 2^(-8 (h+1) / 6); FlashInfer's for 6 heads mix two sequences
    assert flashinfer_plan(w, extra, flashinfer_slopes) == "flashinfer's ALiBi slopes for 6 heads differ from the " \
                                                          "workload's"
    assert flashinfer_plan(dataclasses.replace(w, flashinfer=None), extra, flashinfer_slopes).startswith("FlashInfer "
                                                                                                          "cannot")


def test_without_flashinfer_the_column_says_how_to_carry_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` raises ImportError
    w = small(prefill_workloads(quick=True)[0])
    q, k, v = (torch.randn(w.B, w.H, w.S, w.D) for _ in range(3))
    makers = runner_makers(w, q, k, v, {}, {})
    assert tuple(makers) == PEERS
    reason = makers["flashinfer"]()
    assert reason.startswith("flashinfer not installed") and FLASHINFER_SETUP in reason
    section = re.search(r"section '(.+)'", FLASHINFER_SETUP).group(1)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"### {section}" in readme
    assert runner_makers(dataclasses.replace(w, flashinfer=None), q, k, v, {}, {})["flashinfer"]() is None
    results = {}
    assert checked_runners({"flashinfer": reason}, ("flashinfer",), 2e-2, results) == {}
    assert results == {"flashinfer": {"error": reason}}
    assert installed_version("attnc-no-such-package") is None and installed_version("torch") == torch.__version__


def test_the_table_and_colours_show_the_flashinfer_column(monkeypatch, capsys):
    assert "flashinfer" in PEERS and RUNNER_COLOURS["flashinfer"] not in _SPARE_COLOURS
    monkeypatch.setenv("COLUMNS", "300")
    report = {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6"}, "rows": [
        {"workload": "causal S=1024", "results": {"attnc": {"tflops": 300.0}, "flashinfer": {"tflops": 400.0}},
         "flashinfer_backend": "fa3"},
        {"workload": "alibi S=8192", "results": {"attnc": {"tflops": 440.0}, "flashinfer": {"tflops": 220.0}},
         "flashinfer_backend": "fa2"},
        {"workload": "dense S=1024", "results": {"attnc": {"tflops": 390.0}, "flashinfer": {"error": "not installed"}}},
    ]}
    print_table(report)
    lines = capsys.readouterr().out.splitlines()
    assert any("flashinfer" in line for line in lines)
    (causal,) = [line for line in lines if "causal S=1024" in line]
    (alibi,) = [line for line in lines if "alibi S=8192" in line]
    (dense,) = [line for line in lines if "dense S=1024" in line and "│" in line]
    assert "400" in causal and "0.75×" in causal and "(fa2)" not in causal
    assert "220 (fa2)" in alibi and "2.00×" in alibi
    assert "err" in dense
