"""A CI share of the spec fuzzer (tests/fuzz/specs.py; `python -m tests.fuzz --n 50000` runs more): 2,000
mutants of the example specs and of Python front-end calls give attnc's own errors, with no traceback, no hang
over 2 s of CPU and no crashed worker."""
import time

from fuzz.specs import FINDINGS, KEYWORDS, LIMIT_S, Mutant, fuzz, make_mutant, run_one, summary, _corpus

CI_MUTANTS = 2000
TRACED = "    return attnc.attention(lambda q, k, v: attnc.softmax(q @ k) @ v).trace(q, k, v)\n"  # a spec, as mutants give


def test_two_thousand_mutants_give_no_traceback_hang_or_crash():
    start = time.monotonic()
    outcomes = fuzz(CI_MUTANTS, seed=2026, workers=2)
    findings = [o for o in outcomes if o.result in FINDINGS]
    report = "\n\n".join(f"mutant {o.mutant.index} ({o.mutant.how}): {o.result}, {o.cpu_s:.2f} s\n{o.detail}\n"
                         f"{o.mutant.source[:1500]}" for o in findings[:5])
    assert not findings, f"{len(findings)} findings, {summary(outcomes)}:\n{report}"
    counts = summary(outcomes)
    assert len(outcomes) == CI_MUTANTS and counts.get("ok", 0) > 100 and counts["error"] > 1000, counts
    print(f"{CI_MUTANTS} mutants in {time.monotonic() - start:.0f} s: {counts}")


def test_the_fuzzer_sees_what_it_must_report(tmp_path):
    """The harness itself: a mutant that raises something other than an AttncError is a traceback, one past the
    CPU limit is a hang, one whose worker dies is a crash; mutants are reproducible from (seed, index)."""
    corpus = _corpus()
    assert make_mutant(7, 11, corpus) == make_mutant(7, 11, corpus)
    broken = Mutant(0, "python", "by hand", "def run(attnc, q, k, v):\n    return attnc.parse(None)\n")
    result, detail = run_one(broken, tmp_path)
    assert result == "traceback" and ("AttributeError" in detail or "TypeError" in detail)
    assert run_one(Mutant(1, "text", "by hand", "attention {"), tmp_path) == ("error", "")
    assert run_one(Mutant(2, "text", "by hand", corpus[0]), tmp_path) == ("ok", "")
    assert "softmax" in KEYWORDS


def test_a_slow_show_form_is_a_hang(tmp_path, monkeypatch):
    """Every accepted mutant is printed by `attnc show --emit ir` and `--emit plan` under a bound of their own."""
    import fuzz.specs as specs

    monkeypatch.setattr(specs, "SHOW_LIMIT_S", -1.0)
    result, detail = run_one(Mutant(0, "text", "by hand", _corpus()[0]), tmp_path)
    assert result == "hang" and detail.startswith("attnc show --emit ir took"), (result, detail)
    assert run_one(Mutant(1, "python", "by hand", f"def run(attnc, q, k, v):\n{TRACED}"), tmp_path)[0] == "hang"


def test_the_pool_reports_hangs_and_crashes(monkeypatch):
    import fuzz.specs as specs

    spin = f"def run(attnc, q, k, v):\n    import time\n    end = time.process_time() + {LIMIT_S + 0.5}\n" \
           f"    while time.process_time() < end:\n        pass\n{TRACED}"
    die = "def run(attnc, q, k, v):\n    import os\n    os._exit(3)\n"
    mutants = {0: Mutant(0, "python", "spin", spin), 1: Mutant(1, "python", "die", die)}
    monkeypatch.setattr(specs, "make_mutant", lambda seed, index, corpus: mutants[index])
    results = {o.mutant.how: o for o in specs.fuzz(2, only=[0, 1], workers=2)}
    assert results["spin"].result == "hang" and results["spin"].cpu_s > LIMIT_S
    assert results["die"].result == "crash" and "exit code 3" in results["die"].detail
