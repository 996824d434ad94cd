"""benchmarks/bench_mla.py on the CPU through Triton's interpreter (--smoke: tiny f32 shapes): every runner's output
is checked against the float32 formula before it is timed, attnc's with NaN-poisoned outputs; the report, its
plots and the tile sweep's lines are written; --fp8 runs attnc on an e4m3 latent."""
import json
import sys
from pathlib import Path

import pytest

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_mla  # noqa: E402

pytestmark = pytest.mark.shared_cache


def test_smoke_report_checks_every_runner_and_plots(tmp_path):
    assert bench_mla.main(["--smoke", "--prefill", "--out", str(tmp_path)]) == 0
    report, = (json.loads(p.read_text()) for p in tmp_path.glob("mla-decode-prefill-*.json"))
    rows = {r["workload"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(w.name for w in (*bench_mla.SMOKE_DECODE, *bench_mla.SMOKE_PREFILL))
    for row in rows.values():
        res = row["results"]
        timed = {"attnc", "sdpa"} | ({"attnc-paged16"} if row["kind"] == "decode" else set())
        for name in timed:
            assert res[name]["rel_err"] < 1e-5 and res[name]["ms"] > 0 and res[name]["tflops"] > 0, (name, res)
        assert "needs a GPU" in res["flex"]["error"]
        if row["kind"] == "decode":
            assert res["attnc"]["gb_s"] * 1e9 * res["attnc"]["ms"] * 1e-3 == pytest.approx(row["bytes"])
            assert "error" in res["flashinfer"]
    assert len(list(tmp_path.glob("mla-*-decode-gbs.png"))) == 1 and len(list(tmp_path.glob("mla-*-prefill.png"))) == 1


def test_a_wrong_runner_is_reported_not_timed():
    import torch

    want = torch.randn(3, 4, 8)
    row = {"flops": 1.0, "results": {}}
    bench_mla.measure({"close": lambda: want + 1e-6, "wrong": lambda: want.flip(0), "nan": lambda: want * torch.nan},
                      want, "cpu", row)
    assert "ms" in row["results"]["close"]
    assert row["results"]["wrong"]["error"].startswith("wrong result") and "ms" not in row["results"]["wrong"]
    assert row["results"]["nan"]["rel_err"] == float("inf") and "ms" not in row["results"]["nan"]


def test_smoke_sweep_streams_checked_configs(tmp_path):
    assert bench_mla.main(["--smoke", "--sweep", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "sweep_mla.jsonl").read_text().splitlines()]
    assert len(lines) == len(bench_mla.SMOKE_DECODE) * len(bench_mla.tile_choices(True))
    assert all(r["ok"] and r["rel_err"] < 1e-5 and r["ms"] > 0 for r in lines), lines
    assert {r["launch"]["splits"] for r in lines if r["config"]["splits"] == 2} == {2}


def test_fp8_latent_grid(tmp_path):
    """--fp8: attnc alone on an e4m3 latent (and RoPE part) with a dequant scale, checked against the dequantised
    float32 formula."""
    assert bench_mla.main(["--smoke", "--fp8", "--out", str(tmp_path)]) == 0
    report, = (json.loads(p.read_text()) for p in tmp_path.glob("mla-fp8-decode-*.json"))
    for row in report["rows"]:
        assert sorted(row["results"]) == ["attnc", "attnc-paged16"]
        assert all(r.get("rel_err", 1) < 2e-2 for r in row["results"].values()), row["results"]


def test_fp8_latent_grid_with_quantized_queries(tmp_path):
    """--fp8 --quantize-q: beside the FP8 columns, the spec with quantised queries (attnc-q8, checked against the
    float32 formula over the quantised queries, which the unquantised formula is not near) and the latent
    dequantised (attnc-bf16, here f32), each with its tokens/s."""
    assert bench_mla.main(["--smoke", "--fp8", "--quantize-q", "--only", "B=2", "--out", str(tmp_path)]) == 0
    report, = (json.loads(p.read_text()) for p in tmp_path.glob("mla-fp8-decode-*.json"))
    row, = report["rows"]
    assert sorted(row["results"]) == ["attnc", "attnc-bf16", "attnc-bf16-paged16", "attnc-paged16", "attnc-q8",
                                      "attnc-q8-paged16"]
    assert all(r.get("rel_err", 1) < 2e-2 and r["tokens_s"] > 0 for r in row["results"].values()), row["results"]
    w = bench_mla.SMOKE_DECODE[0]
    x = bench_mla.decode_inputs(w, bench_mla.fp8_shapes(bench_mla.SMOKE), "cpu")
    gap = bench_mla.rel_err(bench_mla.decode_reference(x, 64), bench_mla.decode_reference(x, 64, quantize_q=True))
    assert gap > 10 * row["results"]["attnc-q8"]["rel_err"]
    with pytest.raises(attnc.CallError, match="add --fp8"):
        bench_mla.main(["--smoke", "--quantize-q", "--out", str(tmp_path)])


def test_fp8_sweep_of_named_tiles(tmp_path):
    """--sweep --tiles: only the tiles named, here on the e4m3 latent with a fixed split count; a misspelt tile is
    refused by the argument parser, naming the spelling it expects."""
    assert bench_mla.main(["--smoke", "--fp8", "--sweep", "--tiles", "16x32:w4:s2:x2", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "sweep_mla.jsonl").read_text().splitlines()]
    assert [r["config"] for r in lines] == [dict(block_m=16, block_n=32, num_warps=4, num_stages=2, splits=2)] * 2
    assert all(r["ok"] and r["rel_err"] < 2e-2 and r["launch"]["splits"] == 2 for r in lines), lines
    with pytest.raises(SystemExit):
        bench_mla.main(["--smoke", "--sweep", "--tiles", "64x64w8s3", "--out", str(tmp_path)])


def test_split_counts_side_by_side(tmp_path):
    """--splits: beside the rule's launch, the default kernel at fixed split-KV counts (the sweep latent_splits was
    fit to), each checked against the float32 formula with poisoned outputs."""
    assert bench_mla.main(["--smoke", "--fp8", "--splits", "1", "3", "--only", "B=2", "--out", str(tmp_path)]) == 0
    report, = (json.loads(p.read_text()) for p in tmp_path.glob("mla-fp8-decode-*.json"))
    row, = report["rows"]
    assert sorted(row["results"]) == ["attnc", "attnc-paged16", "attnc-x1", "attnc-x1-paged16", "attnc-x3",
                                      "attnc-x3-paged16"]
    assert all(r.get("rel_err", 1) < 2e-2 and r["ms"] > 0 for r in row["results"].values()), row["results"]
