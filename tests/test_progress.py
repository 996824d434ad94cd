"""Progress on a terminal, silence elsewhere: the compile status line and `attnc compile`'s kernel bar."""
import io
import sys
import time

import pytest
import torch
from rich.console import Console

import attnc
from attnc.backends import progress

SPEC = """
attention progress_causal {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    mask causal
    return softmax(score) @ v
}
"""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """stderr_console() draws into this buffer as into an interactive terminal."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(progress, "stderr_console", lambda: console)
    return screen


def test_stderr_console_only_for_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.stderr_console() is None
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.delenv("TERM", raising=False)
    console = progress.stderr_console()
    assert console is not None and console.is_terminal


def test_status_is_silent_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "STATUS_DELAY_S", 0.0)
    with progress.status("attnc: compiling something"):
        time.sleep(0.2)
    # a real first call (compile and run) on a non-terminal stderr prints nothing either
    spec = attnc.parse(SPEC)[0]
    q = torch.randn(1, 2, 20, 16)
    out = attnc.compile(spec)(q, q, q)
    assert torch.allclose(out.double(), attnc.reference(spec, q, q, q), atol=1e-5)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_status_shows_on_a_terminal_once_slow(terminal, monkeypatch):
    with progress.status("attnc: quick", delay=1.0):
        pass  # ends before the delay: nothing drawn
    assert "quick" not in terminal.getvalue()
    with progress.status("attnc: slow", delay=0.0):
        time.sleep(0.3)
    assert "attnc: slow" in terminal.getvalue()
    monkeypatch.setattr(progress, "STATUS_DELAY_S", 0.0)
    spec = attnc.parse(SPEC.replace("progress_causal", "progress_shown"))[0]
    q = torch.randn(1, 2, 20, 16)
    compiled = attnc.compile(spec)
    compiled(q, q, q)
    assert "attnc: compiling progress_shown" in terminal.getvalue()


def test_kernel_bar_counts_kernels_on_a_terminal(terminal, capsys, monkeypatch):
    with progress.kernel_bar("building out") as report:
        for done in range(3):
            report(done, 3, f"kernel {done}")
            time.sleep(0.05)
        report(3, 3, "done")
    screen = terminal.getvalue()
    assert "building out" in screen and "3/3" in screen and "ETA" in screen
    monkeypatch.setattr(progress, "stderr_console", lambda: None)
    with progress.kernel_bar("building out") as report:
        assert report is None
    assert capsys.readouterr().err == ""
