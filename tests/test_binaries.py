"""Triton binaries in attnc's cache (attnc/backends/triton/binaries.py): the key never merges launches Triton's JIT
would compile apart, a later process (here: the memory layers cleared) runs the stored binary without the JIT,
and a damaged binary is rebuilt."""
import math

import pytest
import torch

import attnc
from attnc.backends import cache
from attnc.backends.triton import binaries

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


def binary_entries() -> list:
    return [e for e in cache.list_entries() if e.backend == "triton-binary"]


@pytest.mark.gpu
def test_a_new_process_runs_the_stored_binary_without_the_jit(monkeypatch):
    (spec,) = attnc.parse(SPEC)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 200, 64, generator=gen).to("cuda", torch.float16) for h in (4, 2, 2))
    want = attnc.reference(spec, q, k, v)
    kern = attnc.compile(spec)
    first = kern(q, k, v)
    stored = binary_entries()
    assert stored, "the launch stored no binary"

    def forget():  # what a new process starts with: the disk cache only
        binaries._loaded.clear()
        cache.clear_memory()

    def no_jit(*args, **kwargs):
        raise AssertionError("Triton's JIT compiled a kernel whose binary is cached")

    from triton.runtime.jit import JITFunction
    forget()
    monkeypatch.setattr(JITFunction, "warmup", no_jit)
    monkeypatch.setattr(JITFunction, "run", no_jit)
    from attnc.backends.triton import launch
    with launch.poisoned_outputs():
        again = attnc.compile(spec)(q, k, v)
    for got, ref, before in zip(again, want, first):
        assert torch.equal(got, before)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), finite)
        err = ((got.double() - ref.double())[finite].abs().max() / ref[finite].abs().max().clamp(min=1)).item()
        assert err < 2e-3
    monkeypatch.undo()

    # a damaged binary is not run: the entry is rebuilt, and the result is the same
    for e in binary_entries():
        (e.path / binaries.BINARY).write_bytes(b"\0" * 64)
    forget()
    with pytest.warns(cache.CacheWarning):
        rebuilt = attnc.compile(spec)(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, first))
    assert not math.isnan(rebuilt[0].float().sum().item())
