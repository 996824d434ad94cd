"""The benchmarks' shared checking (every runner's output is compared with an anchor before any time counts) and
plotting (one colour per runner in every panel, the device in the legend), on made-up reports."""
import torch
from matplotlib.colors import to_hex

from attnc.bench import (
    PEERS, RUNNER_COLOURS, checked_runners, draw_panels, memory_panels, plot, plot_memory_scaling, report_panels,
    runner_colour,
)


def test_checked_runners_keep_only_the_runners_that_agree_with_the_anchor():
    want = torch.randn(64, 32)
    made = {
        "anchor": lambda: want.clone(),
        "close": lambda: want + 1e-4 * torch.randn_like(want),
        "wrong": lambda: torch.randn_like(want),
        "raises": lambda: (_ for _ in ()).throw(RuntimeError("No available kernel.\nmore")),
        "absent": "not installed",
    }
    results = {}
    kept = checked_runners(made, ("missing", "anchor"), 1e-2, results)
    assert sorted(kept) == ["anchor", "close"]
    assert results["close"]["rel_err_vs"] == "anchor" and 0 < results["close"]["rel_err"] < 1e-3
    assert results["wrong"]["error"].startswith("wrong result") and results["wrong"]["rel_err"] > 0.5
    assert results["raises"] == {"error": "RuntimeError: No available kernel."}
    assert results["absent"] == {"error": "not installed"}


def _gpu_report() -> dict:
    """A GPU report as run() writes it, with made-up numbers: runners missing from some panels, one error."""
    def row(workload, group, **tflops):
        results = {p: ({"error": "wrong result"} if t is None else {"tflops": t, "peak_extra_bytes": t * 2**20})
                   for p, t in tflops.items()}
        return {"workload": workload, "group": group, "results": results}

    return {"env": {"device": "NVIDIA H100 80GB HBM3"}, "rows": [
        row("dense S=1024", "dense", **{"attnc": 404.0, "sdpa-cudnn": 568.0, "sdpa-flash": 324.0, "flex": 395.0,
                                        "flashinfer": 501.0}),
        row("dense S=4096", "dense", **{"attnc": 478.0, "sdpa-cudnn": 611.0, "sdpa-flash": 343.0, "flex": 382.0}),
        row("window 1024", "variants", **{"attnc": 372.0, "flex": 270.0, "flashinfer": 390.0}),  # no SDPA here
        row("softcap 30", "variants", **{"attnc": 299.0, "flex": None}),
    ]}


def test_each_runner_has_one_colour_in_every_panel_and_the_legend_names_the_device(tmp_path):
    report = _gpu_report()
    panels = report_panels(report, "tflops")
    assert panels["variants"]["flex"] == [("window 1024", 270.0)] and panels["variants"]["sdpa-cudnn"] == []
    assert report_panels(report, "peak_extra_bytes")["dense"]["attnc"] == [("dense S=1024", 404.0),
                                                                          ("dense S=4096", 478.0)]
    fig = draw_panels(panels, report["env"]["device"], "t", "TFLOP/s")
    seen = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    assert seen == {r: {RUNNER_COLOURS[r]} for r in ("attnc", "sdpa-cudnn", "sdpa-flash", "flex", "flashinfer")}
    assert len(set(RUNNER_COLOURS[r] for r in PEERS)) == len(PEERS)  # the GPU peers never share a colour
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "NVIDIA H100 80GB HBM3"
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(seen)
    assert runner_colour("fa2-varlen") == runner_colour("fa2-varlen") not in RUNNER_COLOURS.values()
    paths = plot(report, tmp_path, "h100")
    assert [p.name for p in paths] == ["h100-tflops.png", "h100-memory.png"] and all(p.stat().st_size for p in paths)


def test_memory_scaling_plot_from_made_up_rows(tmp_path):
    rows = [{"S": s, "results": {"attnc": {"peak_extra_bytes": 4 * s * 2**10},
                                 "sdpa": {"peak_extra_bytes": 4 * s * 2**10 + 2**20},
                                 "naive": {"peak_extra_bytes": s * s * 64} if s < 8192 else {"error": "out of memory"}}}
            for s in (1024, 2048, 4096, 8192)]
    ((title, lines),) = memory_panels(rows).items()
    assert "naive out of memory from S=8192" in title
    assert lines["naive"] == [(1024, 64.0), (2048, 256.0), (4096, 1024.0)] and len(lines["attnc"]) == 4
    path = plot_memory_scaling(rows, "NVIDIA H100 80GB HBM3", tmp_path / "memory.png")
    assert path.stat().st_size > 1000


def test_memory_scaling_measures_each_runner_and_records_out_of_memory(monkeypatch):
    """memory_scaling's bookkeeping on the CPU: torch.cuda's memory counters faked by what each runner allocates
    (its output's bytes), the naive runner out of memory past S=64. The GPU run measures the real peaks."""
    import attnc.bench as bench

    allocated = {"peak": 0}
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(bench, "MEMORY_HEADS", 2)
    monkeypatch.setattr(bench, "MEMORY_DIM", 16)

    def measured(fn):
        def run(q, k, v):
            out = fn(q, k, v)
            allocated["peak"] = out.numel() * out.element_size()
            return out
        return run

    naive_attention = bench.naive_attention

    def naive(q, k, v):
        if q.shape[-2] > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return naive_attention(q, k, v)

    real_compile = bench.attnc.compile
    monkeypatch.setattr(bench.attnc, "compile", lambda spec: measured(real_compile(spec)))
    monkeypatch.setattr(bench, "naive_attention", measured(naive))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, is_causal: measured(lambda q, k, v: sdpa(q, k, v, is_causal=is_causal))(q, k, v))
    rows = bench.memory_scaling("cpu", seqs=(32, 128))
    assert [row["S"] for row in rows] == [32, 128]
    assert rows[0]["results"] == {name: {"peak_extra_bytes": 2 * 32 * 16 * 2} for name in ("attnc", "sdpa", "naive")}
    assert rows[1]["results"]["naive"] == {"error": "out of memory"}
    assert rows[1]["results"]["attnc"] == {"peak_extra_bytes": 2 * 128 * 16 * 2}
