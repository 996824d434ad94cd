"""The `attnc` command: check and show, exit codes, and errors without tracebacks."""
import re
import time
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from attnc import cli
from attnc.dsl.parser import parse, parse_file

ROOT = Path(__file__).parents[1]
SPECS = sorted((ROOT / "examples" / "specs").glob("*.attn"))
BAD = "attention a {\n    q: f16[B, H, M, D]\n    k: f16[B, H, N, D]\n    v: f16[B, H, N, D]\n" \
      "    mask i - j < windw\n    return softmax(score) @ v\n}\n"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnc", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_check_every_example_spec():
    r = run("check", *(str(p.relative_to(ROOT)) for p in SPECS))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    specs = [(p, s) for p in SPECS for s in parse_file(p)]
    assert len(lines) == len(specs)
    for line, (path, spec) in zip(lines, specs):
        assert re.fullmatch(rf"OK  {re.escape(str(path.relative_to(ROOT)))}:{spec.span.line}  {spec.name}  "
                            rf"key {spec.key[:12]}", line), line


def test_check_a_malformed_file_exits_2_with_the_place(tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text(BAD)
    r = run("check", str(SPECS[0]), str(bad))
    assert r.returncode == 2
    assert r.stdout.startswith("OK  ")  # the good file is still checked
    assert r.stderr.splitlines() == [f"{bad}:5:18: unknown name 'windw'",
                                     "        mask i - j < windw", "                     ^^^^^"]
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("data, place", [
    (b"attention a { score = }", ":1:23: unexpected '}'"),
    (b"\xff\xfe garbage", ":1:1: this file is not UTF-8 text"),
    (b"\x7fELF\x02\x01\x01\x00", ":1:8: this looks like a binary file"),
    (b"", ":1:1: no `attention NAME { ... }` block"),
])
def test_malformed_files_never_give_a_traceback(tmp_path, capsys, data, place):
    path = tmp_path / "x.attn"
    path.write_bytes(data)
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}{place}") and "Traceback" not in err


def test_missing_file_and_directory(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "nope.attn")]) == 2
    assert "nope.attn: no such file" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_show_ir_round_trips(capsys):
    path = ROOT / "examples" / "specs" / "gemma2_local.attn"
    assert cli.main(["show", str(path), "--emit", "ir"]) == 0
    assert parse(capsys.readouterr().out) == parse_file(path)
    assert cli.main(["show", str(path), "--name", "alibi_doc"]) == 0
    assert parse(capsys.readouterr().out) == [s for s in parse_file(path) if s.name == "alibi_doc"]


def test_show_unknown_name_and_bad_arguments(capsys):
    path = str(ROOT / "examples" / "specs" / "gemma2_local.attn")
    assert cli.main(["show", path, "--name", "nope"]) == 2
    assert "has no attention named 'nope'; it has: gemma2_local, alibi_doc" in capsys.readouterr().err
    assert cli.main(["show", path, "--emit", "nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("attnc ")


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("attnc.dsl.parser.parse_file", interrupted)
    assert cli.main(["check", str(SPECS[0])]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_python_dash_m_show_and_bad_usage():
    r = run("show", str(SPECS[0]))
    assert r.returncode == 0 and parse(r.stdout) == parse_file(SPECS[0])
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message a machine without a GPU gets")
@pytest.mark.parametrize("extra", [(), ("--backward", "--api", "backend", "--deterministic")],
                         ids=["forward", "backward"])
def test_bench_without_a_gpu_says_so(extra):
    result = run("bench", "--quick", "--only", "dense", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"attnc bench {' '.join(extra[:1])}".strip() + " needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_bench_on_the_cpu_writes_a_checked_row_per_workload(tmp_path, backward):
    """`attnc bench --device cpu [--backward]`: every row is checked against torch (with --backward: the
    gradients of q, k, v against torch's autograd) before it is timed, printed when it is done, and the JSON holds
    the timings the table prints; a PNG plot goes beside it."""
    import json

    result = run("bench", "--device", "cpu", "--seqs", "40", "--dims", "16", "--rounds", "2", "--threads", "1",
                 "--out", str(tmp_path), *(["--backward"] if backward else []))
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("backward-cpu-*.json" if backward else "cpu-*.json")
    report = json.loads(path.read_text())
    assert report["env"]["threads"] == {"torch": 1, "tvm": 1}
    assert report["env"]["pass"] == ("forward+backward" if backward else "forward")
    forward_flops = 4 * 8 * 16 * 40 * 40  # dense: every pair; H = 8, D = 16, S = 40
    assert report["rows"][0]["flops"] == forward_flops * (3.5 if backward else 1)
    serving = [] if backward else ["paged decode D=16 S=40", "varlen prefill D=16 S=40"]  # forward only
    assert [row["workload"] for row in report["rows"]] == ["dense D=16 S=40", "causal D=16 S=40", *serving]
    for row in report["rows"]:
        assert "error" not in row and row["rel_err"] < 1e-5
        assert 0 < row["attnc_min_ms"] <= row["attnc_ms"] and 0 < row["torch_min_ms"] <= row["torch_ms"]
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"] and len(row["calls_per_round"]) == 2
        assert f"{row['workload']} " in result.stdout and f"{row['attnc_ms']:.2f}" in result.stdout
        # each row is printed as it finishes, before the table
        assert result.stdout.index(f"{row['workload']}: attnc {row['attnc_ms']:.2f} ms") < result.stdout.index("┏")
    assert path.with_suffix(".png").stat().st_size > 1000  # the CPU bench draws its plot too


def test_bench_on_the_cpu_rejects_bad_lists():
    result = run("bench", "--device", "cpu", "--seqs", "512,x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--seqs 512,x: expected positive integers" in result.stderr


def _doubling(lines: int) -> str:
    return ("attention doubling {\n    q: f32[B, H, M, D]\n    k: f32[B, H, N, D]\n    v: f32[B, H, N, D]\n"
            "    score = qk * rsqrt(D)\n" + "    score = score + score\n" * lines
            + "    mask i + (N - M) >= j\n    return softmax(score) @ v\n}\n")


def test_show_and_the_aot_text_are_linear_in_the_dag(tmp_path, capsys):
    """40 doubling lines make a score whose tree has 2^41 leaves: `attnc show --emit ir` writes it back as the
    40 lines, `--emit plan` numbers the score's distinct subexpressions, and the AOT manifest's canonical text reads
    back (as attnc.load reads it) to the same key, all in well under a second."""
    from attnc.backends.triton.aot import AttentionBuild, _spec_of
    from attnc.runtime.api import emit_plan

    path = tmp_path / "doubling.attn"
    path.write_text(_doubling(40))
    emit_plan(parse(_doubling(1))[0])  # the planner imported and warm
    start = time.perf_counter()
    assert cli.main(["show", str(path), "--emit", "ir"]) == 0
    ir_text = capsys.readouterr().out
    assert cli.main(["show", str(path), "--emit", "plan"]) == 0
    plan_text = capsys.readouterr().out
    (spec,) = parse_file(path)
    built = AttentionBuild(spec.name, spec.key, spec.canonical, ())
    loaded = _spec_of(SimpleNamespace(path=tmp_path), built)
    elapsed = time.perf_counter() - start
    assert ir_text == _doubling(40) and parse(ir_text) == [spec] and loaded == spec and spec.canonical_parses
    assert "  logits2    %42\n" in plan_text and "  %42 = %41 + %41\n" in plan_text and len(plan_text) < 4000
    assert elapsed < 0.5, elapsed


def test_show_numbers_what_no_score_line_can_share(capsys):
    """A mask that reuses a subexpression 2^30 times (a Python front-end builds one in a loop) is shown as a
    reference into a listing of its distinct subexpressions; small expressions stay as written."""
    import torch

    import attnc
    from attnc.ir import print_attention

    def doubled_mask(q, k, v):
        d = k.pos - q.pos
        for _ in range(30):
            d = d + d
        return attnc.softmax(q @ k, where=(d <= 0) & attnc.causal(q, k)) @ v

    x = torch.randn(1, 1, 4, 8)
    spec = attnc.attention(doubled_mask).trace(x, x, x)
    start = time.perf_counter()
    text = print_attention(spec)
    assert time.perf_counter() - start < 0.5 and len(text) < 4000 and not spec.canonical_parses
    masks = [line for line in text.splitlines() if line.startswith("    mask ")]
    assert masks == ["    mask i + (N - M) >= j", "    mask %34"], text
    assert text.endswith("}\n%0 = j\n%1 = i\n%2 = %0 - %1\n%3 = %2 + %2\n" + "".join(
        f"%{n} = %{n - 1} + %{n - 1}\n" for n in range(4, 33)) + "%33 = 0\n%34 = %32 <= %33\n"), text
