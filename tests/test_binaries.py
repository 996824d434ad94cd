"""Triton binaries in attnc's cache (attnc/backends/triton/binaries.py): the key never merges launches Triton's JIT
would compile apart, a later process (here: the memory layers cleared) runs the stored binary without the JIT,
and a damaged binary is rebuilt."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnc.backends.triton import binaries

ROOT = Path(__file__).resolve().parent.parent

SPEC = """
attention gqa_window {
    q: f16[B, H, M, D]  k: f16[B, HKV, N, D]  v: f16[B, HKV, N, D]
    param window: i32 = 48
    mask causal
    mask i - j < window
    return softmax(score) @ v, lse
}"""


def test_specialization_is_as_fine_as_triton_s():
    """What Triton's JIT specializes an argument on (integer width, == 1, divisible by 16; a tensor's dtype and
    16-byte alignment) all show in the key, so no two launches Triton compiles apart share a binary."""
    ints = [binaries.specialization([n])[0] for n in (1, 16, 17, 2**31, 2**31 + 1, 2**63, 2**63 + 1)]
    assert len(set(ints)) == len(ints)
    assert ints[0] == ("i", "i32", True, False) and ints[1] == ("i", "i32", False, True)
    assert ints[3][1] == "i64" and ints[5][1] == "u64"
    assert binaries.specialization([-(2**31) - 1])[0][1] == "i64" and binaries.specialization([2**31 - 1])[0][1] == "i32"
    assert binaries.specialization([2**64]) is None  # Triton takes no wider integer: its own launch says so
    x = torch.randn(64, dtype=torch.float16)
    aligned, shifted = binaries.specialization([x])[0], binaries.specialization([x[1:]])[0]
    assert aligned == ("t", "torch.float16", True) and shifted == ("t", "torch.float16", False)
    assert binaries.specialization([x.bfloat16()])[0] != aligned
    assert binaries.specialization([True])[0] != binaries.specialization([False])[0] != binaries.specialization([1])[0]
    assert binaries.specialization([0.5, None]) == (("f",), ("n",))
    assert binaries.specialization([object()]) is None  # a host-side tensor descriptor: Triton's own launch


CHILD = """
import sys, torch, attnc
from attnc.backends import cache
from triton.runtime.jit import JITFunction
spec = attnc.parse(sys.argv[1])[0]
gen = torch.Generator().manual_seed(7)
q, k, v = (torch.randn(2, h, 200, 64, generator=gen).to("cuda", torch.float16) for h in (4, 2, 2))
jit = JITFunction.run
JITFunction.run = lambda *a, **kw: (print("JIT"), jit(*a, **kw))[1]  # Triton's own launch: a binary cache miss
out, lse = attnc.compile(spec)(q, k, v)
want, want_lse = attnc.reference(spec, q, k, v)
print(((out.double() - want).abs().max() / want.abs().max()).item())
print(len([e for e in cache.list_entries() if e.backend == "triton-binary"]))
"""


def run_child(tmp_path) -> tuple[bool, float, int]:
    """A fresh process on the cache under tmp_path: (whether Triton's JIT launched, the output's error, how
    many binaries the cache holds)."""
    env = {**os.environ, "ATTNC_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, SPEC], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *lines, err, count = done.stdout.split()
    return "JIT" in lines, float(err), int(count)


@pytest.mark.gpu
def test_a_new_process_runs_the_stored_binary_and_a_damaged_one_is_rebuilt(tmp_path):
    jit, err, count = run_child(tmp_path)
    assert err < 2e-3 and count >= 1
    jit, err, again = run_child(tmp_path)
    assert not jit and err < 2e-3 and again == count  # the stored binary ran: no JIT launch, no new entry
    root = tmp_path / "cache"
    binaries_on_disk = list(root.rglob(binaries.BINARY))
    assert binaries_on_disk
    for path in binaries_on_disk:
        path.write_bytes(b"\0" * 64)
    jit, err, again = run_child(tmp_path)
    assert err < 2e-3 and again == count  # rebuilt in place, not run
    assert all(path.read_bytes() != b"\0" * 64 for path in root.rglob(binaries.BINARY))


@pytest.fixture
def background(monkeypatch, tmp_path):
    """binaries' background compiles on a CPU: a real JITFunction, device 0, a cache under tmp_path, and a build
    (`_from_cache`) that returns a stand-in binary once the test sets `release` (or raises `fail`)."""
    import threading

    from triton.runtime.jit import JITFunction

    from attnc.backends import cache

    def body(x_ptr, n):
        pass

    kernel = JITFunction(body)  # what triton.jit makes on a GPU machine (the CPU suite's TRITON_INTERPRET would not)

    monkeypatch.setenv(cache.DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "1")  # tests/conftest.py turns it off for the other tests
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
    monkeypatch.setattr(binaries, "_background", {})
    state = {"release": threading.Event(), "builds": 0, "fail": None}

    def build(fn, grid, args, keywords, launch_keywords, arguments):
        state["builds"] += 1
        state["release"].wait(30)
        if state["fail"]:
            raise state["fail"]
        return ("binary", arguments)

    monkeypatch.setattr(binaries, "_from_cache", build)
    monkeypatch.setattr(binaries, "_loaded", {})
    state["launch"] = (kernel, (1,), (torch.empty(4), 4), {"num_warps": 4})
    return state


def test_a_missing_binary_compiles_in_the_background_once(background, monkeypatch):
    """The first asks start one compile and say it is running (the caller runs its fallback); once it is built
    (finish_compiles waits), the next ask loads it and `launch` would run it. Switched off, nothing starts."""
    launch = background["launch"]
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "0")
    assert not binaries.compiling(*launch) and not binaries._background
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "1")
    assert binaries.compiling(*launch) and binaries.compiling(*launch)  # started, still running
    assert background["builds"] <= 1
    background["release"].set()
    assert binaries.finish_compiles() and background["builds"] == 1
    assert not binaries.compiling(*launch)
    memo = next(iter(binaries._loaded))
    assert binaries._loaded[memo][0] == "binary" and not binaries._background
    assert not binaries.compiling(*launch) and background["builds"] == 1


def test_a_background_compile_that_fails_warns_once_and_the_fallback_runs_on(background):
    background["fail"] = RuntimeError("ptxas died")
    launch = background["launch"]
    assert binaries.compiling(*launch)
    background["release"].set()
    assert not binaries.finish_compiles()
    with pytest.warns(RuntimeWarning, match="failed to compile in the background.*ptxas died"):
        assert binaries.compiling(*launch)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert binaries.compiling(*launch)  # no second warning, no second build
    assert background["builds"] == 1


def test_a_cached_binary_is_loaded_without_a_compile(background, monkeypatch):
    from attnc.backends import cache

    monkeypatch.setattr(cache, "get", lambda key: "entry")
    monkeypatch.setattr(binaries, "_load", lambda fn, entry: ("loaded", entry))
    assert not binaries.compiling(*background["launch"]) and background["builds"] == 0
    assert list(binaries._loaded.values()) == [("loaded", "entry")]


def test_launches_the_cache_does_not_key_compile_in_the_caller(background):
    kernel, grid, args, keywords = background["launch"]
    assert not binaries.compiling(kernel, grid, (object(), 4), keywords)  # a host-side descriptor
    assert not binaries.compiling(lambda: None, grid, args, keywords)  # not a JIT function (an AOT stand-in)
    assert background["builds"] == 0


def test_background_compiles_are_off_by_switch_and_for_deterministic_calls(monkeypatch):
    """Off by ATTNC_BACKGROUND_COMPILE=0, under torch.use_deterministic_algorithms, and in the launches of a
    Kernel made with deterministic=True (a run must give the bits of the next, cold cache or warm)."""
    import attnc
    from attnc.backends import compiles_first, launches_compile_first
    from attnc.runtime.kernel import Kernel

    monkeypatch.delenv(binaries.BACKGROUND_ENV, raising=False)
    assert binaries.compiles_in_background()
    with compiles_first(False):
        assert binaries.compiles_in_background()
    with compiles_first():
        assert not binaries.compiles_in_background()
        with compiles_first(False):  # nested: stays on
            assert not binaries.compiles_in_background()
    monkeypatch.setenv(binaries.BACKGROUND_ENV, "0")
    assert not binaries.compiles_in_background()
    monkeypatch.delenv(binaries.BACKGROUND_ENV)
    with monkeypatch.context() as m:
        m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert not binaries.compiles_in_background()
    seen = []
    launch = Kernel._launch
    monkeypatch.setattr(Kernel, "_launch", lambda self, *a: (seen.append(launches_compile_first()), launch(self, *a))[1])
    spec = attnc.parse(SPEC)[0]
    q, k, v = (torch.randn(1, h, 20, 16).half() for h in (4, 2, 2))
    for deterministic in (None, True):
        attnc.compile(spec, backend="triton", deterministic=deterministic)(q, k, v)
    assert seen == [False, True] and not launches_compile_first()
