"""attnc.compile(spec, autotune=True): candidate tiles timed once per regime, checked against the table's tile,
the choice persisted in the kernel cache. Runs on Triton's interpreter (fp32, small shapes); the timer is
replaced so the choice is known, and every result is checked against attnc.reference with poisoned outputs."""

import pytest
import torch

import attnc
from attnc.backends import cache
from attnc.backends.triton import launch
from attnc.runtime import autotune

SPEC = """attention tuned_causal {
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
    param cap: f32 = 20.0
    score = cap * tanh(qk * rsqrt(D) / cap)
    mask causal
    return softmax(score) @ v
}"""


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(launch, "empty", launch.nan_empty)


def inputs(m=40, n=40, d=16, h=2, hkv=2):
    return (torch.randn(1, h, m, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d))


def check(out, spec, q, k, v, **kw):
    ref = attnc.reference(spec, q, k, v, **kw)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5), (out.double() - ref).abs().max()


class FakeTimer:
    """Times in candidate order from `times`; records how many candidates were timed."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn, cuda):
        fn()
        self.calls += 1
        return self.times[self.calls - 1]


def forbid_timing(fn, cuda):
    raise AssertionError("a persisted choice must not be timed again")


def test_fastest_correct_tile_is_chosen_persisted_and_reloaded(monkeypatch, poisoned):
    spec = attnc.parse(SPEC)[0]
    timer = FakeTimer([3.0, 1.0, 2.0])  # the interpreter's candidates: table, 16x32, 32x16
    monkeypatch.setattr(autotune, "time_ms", timer)
    kern = attnc.compile(spec, backend="triton", autotune=True)
    q, k, v = inputs()
    check(kern(q, k, v, cap=15.0), spec, q, k, v, cap=15.0)
    (record,) = kern.choices.values()
    assert record["chosen"] == "16x32 w4 s1" and timer.calls == 3 and not record["rejected"]
    assert set(record["timings_ms"]) == {"table", "16x32 w4 s1", "32x16 w4 s1"}
    q2, k2, v2 = inputs()  # same regime, new values: no tuning, the chosen kernel
    check(kern(q2, k2, v2), spec, q2, k2, v2)
    assert timer.calls == 3

    cache.clear_memory()  # a new process: the choice comes from the cache entry
    monkeypatch.setattr(autotune, "time_ms", forbid_timing)
    again = attnc.compile(spec, backend="triton", autotune=True)
    check(again(q, k, v), spec, q, k, v)
    assert list(again.choices.values()) == [record]


def test_a_candidate_that_disagrees_is_rejected_even_when_fastest(monkeypatch, poisoned):
    spec = attnc.parse(SPEC)[0]
    plain_kernel = autotune.Kernel

    class Unwritten(plain_kernel):
        """The 16x32 tile's kernel 'forgets' its output: a fresh (poisoned) tensor comes back."""

        def __call__(self, q, k, v, /, **kwargs):
            out = super().__call__(q, k, v, **kwargs)
            return launch.empty(out.shape, out.dtype, out.device) if self.options.block_m == 16 else out

    monkeypatch.setattr(autotune, "Kernel", Unwritten)
    monkeypatch.setattr(autotune, "time_ms", FakeTimer([3.0, 2.0]))  # table, then 32x16 (16x32 never timed)
    kern = attnc.compile(spec, backend="triton", autotune=True)
    q, k, v = inputs()
    check(kern(q, k, v), spec, q, k, v)
    (record,) = kern.choices.values()
    assert "16x32 w4 s1" in record["rejected"] and "differs" in record["rejected"]["16x32 w4 s1"]
    assert record["chosen"] == "32x16 w4 s1"


def test_decode_sized_calls_keep_the_plain_kernel(monkeypatch, poisoned):
    spec = attnc.parse(SPEC)[0]
    monkeypatch.setattr(autotune, "time_ms", forbid_timing)
    kern = attnc.compile(spec, backend="triton", autotune=True)
    q, k, v = inputs(m=3, n=50, h=4, hkv=2)
    check(kern(q, k, v), spec, q, k, v)
    assert kern.choices == {}


def test_regimes_are_tuned_separately(monkeypatch, poisoned):
    spec = attnc.parse(SPEC)[0]
    timer = FakeTimer([1.0, 2.0, 3.0, 3.0, 2.0, 1.0])
    monkeypatch.setattr(autotune, "time_ms", timer)
    kern = attnc.compile(spec, backend="triton", autotune=True)
    for m in (40, 100):  # next_pow2: 64 and 128
        q, k, v = inputs(m=m, n=m)
        check(kern(q, k, v), spec, q, k, v)
    assert sorted(r["chosen"] for r in kern.choices.values()) == ["32x16 w4 s1", "table"]


def test_a_damaged_choice_is_tuned_again(monkeypatch, poisoned):
    spec = attnc.parse(SPEC)[0]
    monkeypatch.setattr(autotune, "time_ms", FakeTimer([1.0, 2.0, 3.0]))
    q, k, v = inputs()
    attnc.compile(spec, backend="triton", autotune=True)(q, k, v)
    (entry,) = [e for e in cache.list_entries() if e.backend == "autotune"]
    (entry.path / autotune.CHOICE_FILE).write_text('{"chosen": "garbage"')
    cache.clear_memory()
    timer = FakeTimer([2.0, 1.0, 3.0])
    monkeypatch.setattr(autotune, "time_ms", timer)
    kern = attnc.compile(spec, backend="triton", autotune=True)
    check(kern(q, k, v), spec, q, k, v)
    assert timer.calls == 3 and next(iter(kern.choices.values()))["chosen"] == "16x32 w4 s1"


def test_call_errors_are_the_plain_kernels(monkeypatch):
    spec = attnc.parse(SPEC)[0]
    kern = attnc.compile(spec, backend="triton", autotune=True)
    q, k, v = inputs()
    with pytest.raises(attnc.CallError, match="cap"):
        kern(q, k, v, cap="wide")
    with pytest.raises(attnc.CallError, match="k"):
        kern(q, k[..., :8], v)


@pytest.mark.gpu
def test_autotune_on_the_gpu_times_real_tiles(poisoned):
    spec = attnc.parse(SPEC.replace("f32[", "bf16["))[0]
    kern = attnc.compile(spec, autotune=True)
    q, k, v = (torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = kern(q, k, v, cap=30.0)
    ref = attnc.reference(spec, q, k, v, cap=30.0)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    (record,) = kern.choices.values()
    assert len(record["timings_ms"]) >= 2 and record["chosen"] in record["timings_ms"]
    assert all(t > 0 for t in record["timings_ms"].values())
