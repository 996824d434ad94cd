"""compile/Kernel: one build per (device, head dims) however B, M, N and params change; the kernel cache's
disk layer; backend selection and its errors."""
import pytest
import torch

import attnc
from attnc.backends.triton.backend import TritonBackend
import attnc.runtime.kernel as api
from attnc.passes import head_dims
import attnc.backends.triton.generate as generate_module
import attnc.backends.triton.launch as launch
from attnc.errors import CompileError
from attnc.backends import cache

SPEC = """
attention win {
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
    param window: i32 = 8
    param scale: f32 = 0.25
    score = qk * scale
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v, lse
}
"""


@pytest.fixture
def counted(monkeypatch):
    """Counts code generation and planning."""
    counts = {"generate": 0, "plan": 0}
    real_generate, real_plan = generate_module.generate, api.plan_kernel

    def generate(plan):
        counts["generate"] += 1
        return real_generate(plan)

    def plan_kernel(*args, **kwargs):
        counts["plan"] += 1
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", generate)  # launch imports it on a cache miss
    monkeypatch.setattr(api, "plan_kernel", plan_kernel)
    return counts


def test_ten_calls_three_lengths_changed_params_compile_once(counted):
    spec = attnc.parse(SPEC)[0]
    kernel = attnc.compile(spec)
    for call in range(10):
        m, n = [(5, 40), (33, 33), (1, 70)][call % 3]
        q, k, v = torch.randn(1 + call % 2, 4, m, 32), torch.randn(1 + call % 2, 2, n, 32), torch.randn(1 + call % 2, 2, n, 32)
        params = {"window": 3 + call, "scale": 0.1 * (call + 1)}
        out, lse = kernel(q, k, v, **params)
        ref, ref_lse = attnc.reference(spec, q, k, v, **params)
        assert (out.double() - ref).abs().max() < 2e-5
        assert (lse.double() - ref_lse).abs().max() < 2e-5
    assert counted == {"generate": 1, "plan": 1}
    # one kernel per M regime (prefill, and decode for small-M launches), never one per length or param value
    assert sorted(_kernel_kind(e) for e in cache.list_entries() if e.backend == "triton") == ["decode", "prefill"]


def _kernel_kind(entry) -> str:
    return dict(entry.parts).get("kernel", "prefill")


def test_second_process_loads_from_disk_without_generating(counted):
    spec = attnc.parse(SPEC)[0]
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    first = attnc.compile(spec)(q, k, v)
    cache.clear_memory()  # as a new process starts
    second = attnc.compile(spec)(q, k, v)
    assert counted["generate"] == 1 and torch.equal(first[0], second[0])
    (entry,) = [e for e in cache.list_entries() if _kernel_kind(e) == "prefill"]
    source = (entry.path / launch.SOURCE_FILE).read_text()
    assert "def attn_fwd(" in source and "@triton.jit" in source


def test_specs_differing_only_in_name_share_one_entry_and_one_build(counted):
    """The name labels an entry; the math keys it: prefill and decode kernels are built once for both names, and
    the shared source holds neither name."""
    first, second = (attnc.parse(SPEC.replace("attention win", f"attention {name}"))[0]
                     for name in ("zebra_one", "zebra_two"))
    assert (first.name, second.name) == ("zebra_one", "zebra_two") and first.key == second.key
    for spec in (first, second):
        kernel = attnc.compile(spec)
        for m, n in ((6, 40), (1, 70)):  # the prefill kernel, then the decode one
            q, k, v = torch.randn(2, 4, m, 16), torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
            with launch.poisoned_outputs():
                out, lse = kernel(q, k, v, window=5)
            want, want_lse = attnc.reference(spec, q, k, v, window=5)
            assert (out.double() - want).abs().max() < 2e-5 and (lse.double() - want_lse).abs().max() < 2e-5
    assert counted["generate"] == 1
    entries = [e for e in cache.list_entries() if e.backend == "triton"]
    assert sorted(_kernel_kind(e) for e in entries) == ["decode", "prefill"]
    assert {e.name for e in entries} == {"zebra_one"}  # the name it was first built under, as metadata
    for e in entries:
        source = "".join(p.read_text() for p in e.path.glob("*.py"))
        assert "def attn_" in source and "zebra" not in source


def test_new_head_dim_builds_a_second_kernel(counted):
    spec = attnc.parse(SPEC)[0]
    kernel = attnc.compile(spec)
    for d in (16, 16, 24):
        kernel(torch.randn(1, 2, 3, d), torch.randn(1, 2, 5, d), torch.randn(1, 2, 5, d))
    assert counted["generate"] == 2


def test_backend_choice_and_errors(monkeypatch):
    assert api.default_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert api.default_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert api.default_backend(torch.device("cpu")) == "tvm"
    spec = attnc.parse(SPEC)[0]
    with pytest.raises(CompileError, match="backend 'nope' is not available"):
        attnc.compile(spec, backend="nope")
    with pytest.raises(CompileError, match="expects an attnc.Attention"):
        attnc.compile("attention x {}")
    with pytest.raises(CompileError, match="TRITON_INTERPRET=1"):
        TritonBackend().target(torch.device("cpu"))


def test_plan_and_source_without_tensors():
    spec = attnc.parse(SPEC)[0]
    with pytest.raises(CompileError, match="dims D = 128"):
        head_dims(spec)
    plan = attnc.compile(spec, backend="triton").plan("cpu", *head_dims(spec, 64))
    assert "exact      j >= max(0; i + (N - M) - window + 1)" in plan.describe()


def test_config_over_shared_memory_is_retried_with_fewer_stages(monkeypatch):
    """Triton's own shared-memory check (OutOfResources, before anything runs) makes the launcher drop one
    pipeline stage at a time, keep what fits, and still give the right numbers."""
    from triton.runtime.errors import OutOfResources

    from attnc.passes import PlanOptions

    spec = attnc.parse(SPEC)[0]
    kernel = attnc.compile(spec, options=PlanOptions(num_stages=3))
    q, k, v = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
    kernel(q, k, v)
    (launcher,) = kernel._impls.values()
    real, stages_seen = launcher.fwd, []

    class SharedMemoryLimited:  # a GPU on which only one stage fits
        arg_names = real.arg_names

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                stages_seen.append(num_stages)
                if num_stages > 1:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, num_stages=num_stages, **kwargs)
            return launch

    monkeypatch.setattr(launcher, "fwd", SharedMemoryLimited())
    launcher._stages.clear()
    for n in (120, 77):  # a new N each time, so the JIT launch runs (no prepared replay)
        q, k, v = torch.randn(1, 2, 100, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
        out, lse = kernel(q, k, v, window=500)
        ref, ref_lse = attnc.reference(spec, q, k, v, window=500)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)  # -inf rows: N < M here
    assert stages_seen == [3, 2, 1, 1]


def test_a_launch_installs_the_scratch_allocator_in_its_own_thread():
    """Triton keeps its allocator in a ContextVar, so a thread that did not import the kernel module (autograd's
    backward thread on a GPU, a server's worker) has none: each launch installs attnc's scratch allocator (the H100
    training tests failed with "no allocator was set" where the module was imported on another thread)."""
    import threading

    from triton.runtime import _allocation

    from attnc.backends.triton import scratch

    spec = attnc.parse(SPEC)[0]
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    kernel = attnc.compile(spec, backend="triton")
    kernel(q, k, v)  # builds and imports the module on this thread
    seen = []

    def worker():
        seen.append(_allocation._allocator.get())
        kernel(q, k, v)
        seen.append(_allocation._allocator.get())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen[0] is not scratch.scratch and seen[1] is scratch.scratch
