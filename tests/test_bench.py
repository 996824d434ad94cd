"""The benchmarks' shared checking: every runner's output is compared with an anchor before any time counts."""
import torch

from attnc.bench import checked_runners


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
