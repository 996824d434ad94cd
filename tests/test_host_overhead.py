"""The per-call fast path: after a checked call, later calls with the same shapes, strides, dtypes, devices and
keyword names go through a PreparedLaunch straight to Triton's launcher; anything that would change bind()'s
result or Triton's specialization (a param of another type, an unaligned pointer, other strides, another size)
goes back through bind() and the JIT.

On CPU Triton's interpreter returns no compiled kernel, so these tests stand an interpreter-backed launcher in
for Triton's (it runs the kernel with exactly the argument list a direct launch receives) and check every
result against attnc.reference. The GPU tests time the real thing."""
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import attnc
import attnc.runtime.kernel as api
import attnc.backends.triton.launch as launch
from attnc.bench import host_us_against_sdpa
from attnc.dsl.signature import call_key_of_inputs
from attnc.errors import CallError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import host_overhead_wrappers as wrappers  # noqa: E402  (the front-ends' runners and SOFTCAP)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}

WINDOW = """
attention win {
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
    param window: i32 = 8
    param scale: f32 = 0.25
    param flip: bool = false
    score = where(flip, -qk, qk) * scale
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v, lse
}
"""
DOC = """
attention doc {
    q: f16[B, M, H, D]  k: f16[B, N, HKV, D]  v: f16[B, N, HKV, D]
    input doc: i32[B, N]
    mask doc[b, i] == doc[b, j]
    return softmax(score) @ v
}
"""


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs start as NaN, so an element a launch fails to write fails the comparison."""
    monkeypatch.setattr(launch, "empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def assert_matches(spec, got, q, k, v, **kwargs):
    want = attnc.reference(spec, q, k, v, **kwargs)
    got, want = (got, want) if spec.returns_lse else ((got,), (want,))
    for g, w in zip(got, want):
        scale = max(1.0, w[torch.isfinite(w)].abs().max().item()) if w.numel() else 1.0
        assert not torch.isnan(g).any()
        assert torch.equal(torch.isinf(g), torch.isinf(w))
        finite = torch.isfinite(w)
        assert (g.double()[finite] - w[finite]).abs().max().item() <= TOL[q.dtype] * scale


def tensors(spec, sizes, dtype):
    return [torch.randn([sizes[n] for n in d.shape], device=DEVICE, dtype=dtype) for d in (spec.q, spec.k, spec.v)]


class InterpreterLaunch:
    """Stands in for Triton's launcher on CPU: receives what DirectLaunch.launch receives (every argument in
    attn_fwd's signature order, constexprs included, q/k/v/out/lse as addresses) and runs the interpreted kernel
    with it, finding the tensors at those addresses among those the test registered."""

    def __init__(self, fwd, memory: dict | None = None):
        self.fwd, self.launches, self.memory = fwd, 0, {} if memory is None else memory

    def register(self, *tensors):
        self.memory.update((t.data_ptr(), t) for t in tensors if isinstance(t, torch.Tensor))

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        self.launches += 1
        assert all(type(a) is int for a in args[:5])
        args = [self.memory[a] for a in args[:5]] + args[5:]
        names = self.fwd.arg_names
        first_constexpr = names.index("BLOCK_M")
        self.fwd[grid](*args[:first_constexpr], **dict(zip(names[first_constexpr:], args[first_constexpr:])))


class CountingJit:
    """Wraps a launcher's JIT function: counts full-path launches and returns a stand-in CompiledKernel."""

    def __init__(self, fwd):
        self.fwd, self.arg_names, self.launches = fwd, fwd.arg_names, 0

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches += 1
            self.fwd[grid](*args, **kwargs)
            return self

        return launch_


@pytest.fixture
def direct(monkeypatch):
    """Builds a kernel with one call, then routes its JIT launches through CountingJit and its direct launches
    through one InterpreterLaunch; returns (call, kernel, jit, direct launch), where `call` registers the call's
    tensors with the stand-in and calls the kernel. On a GPU the real launcher runs: (kernel, kernel, None, None)."""
    def setup(spec, *args, **kwargs):
        kernel = attnc.compile(spec)
        kernel(*args, **kwargs)
        (launcher,) = kernel._impls.values()
        if DEVICE == "cuda":
            return kernel, kernel, None, None
        kernel._prepared.clear()
        jit = launcher.fwd = CountingJit(launcher.fwd)
        stand_in = InterpreterLaunch(jit.fwd)
        monkeypatch.setattr(launch, "direct_launch", lambda compiled, device: stand_in)
        poisoned = launch.empty

        def empty(*args):
            out = poisoned(*args)
            stand_in.register(out)
            return out

        monkeypatch.setattr(launch, "empty", empty)

        def call(q, k, v, **kw):
            stand_in.register(q, k, v)
            return kernel(q, k, v, **kw)

        return call, kernel, jit, stand_in

    return setup


def counts(jit, stand_in):
    return (jit.launches, stand_in.launches) if jit is not None else None


def test_later_calls_take_the_prepared_launch_and_match_the_reference(direct):
    spec = attnc.parse(WINDOW)[0]
    sizes = {"B": 2, "H": 4, "HKV": 2, "M": 19, "N": 41, "D": 16}
    call, kernel, jit, stand_in = direct(spec, *tensors(spec, sizes, torch.float32))
    params = [{}, {"window": 5}, {"window": 30, "scale": 1, "flip": True}, {"window": 5}, {"scale": 0.5}]
    for kwargs in params:
        q, k, v = tensors(spec, sizes, torch.float32)  # fresh data at new addresses each call
        assert_matches(spec, call(q, k, v, **kwargs), q, k, v, **kwargs)
    # keyword sets {}, {window}, {window, scale, flip}, {scale}: one full-path call each, the repeat is prepared
    assert len(kernel._prepared) == 4
    if jit is not None:
        assert counts(jit, stand_in) == (4, 1)


def test_calls_that_bind_or_specialize_differently_take_the_full_path(direct):
    spec = attnc.parse(WINDOW)[0]
    sizes = {"B": 1, "H": 2, "HKV": 2, "M": 9, "N": 9, "D": 16}
    call, kernel, jit, stand_in = direct(spec, *tensors(spec, sizes, torch.float32))
    q, k, v = tensors(spec, sizes, torch.float32)
    assert_matches(spec, call(q, k, v, window=3), q, k, v, window=3)  # full path, prepares
    assert_matches(spec, call(q, k, v, window=4), q, k, v, window=4)  # prepared
    before = counts(jit, stand_in)

    # a q at a 4-byte offset: same shape and strides, so the same key, but Triton would not assume alignment
    flat = torch.randn(q.numel() + 1, device=DEVICE)
    shifted = flat[1:].view(q.shape)
    prepared = dict(kernel._prepared)
    assert_matches(spec, call(shifted, k, v, window=3), shifted, k, v, window=3)
    assert kernel._prepared == prepared  # not replaced by one prepared from the unaligned call
    # a param value bind() converts (a numpy-style integral that is not an int)
    window = torch.tensor(6).numpy()[()]
    assert_matches(spec, call(q, k, v, window=window), q, k, v, window=6)
    # other strides (a transposed copy seen through a view) and another size: new keys
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert_matches(spec, call(q_t, k, v, window=3), q_t, k, v, window=3)
    q2, k2, v2 = tensors(spec, dict(sizes, M=12, N=20), torch.float32)
    assert_matches(spec, call(q2, k2, v2, window=3), q2, k2, v2, window=3)
    if jit is not None:
        assert counts(jit, stand_in) == (before[0] + 4, before[1])
        assert_matches(spec, call(q_t, k, v, window=2), q_t, k, v, window=2)  # now prepared too
        assert counts(jit, stand_in) == (before[0] + 4, before[1] + 1)


def test_errors_still_come_from_bind_after_a_prepared_call(direct):
    spec = attnc.parse(WINDOW)[0]
    sizes = {"B": 1, "H": 2, "HKV": 1, "M": 5, "N": 7, "D": 16}
    q, k, v = tensors(spec, sizes, torch.float32)
    call, kernel, _, _ = direct(spec, q, k, v, window=3)
    call(q, k, v, window=3)
    with pytest.raises(CallError, match="window: param i32 wants an int, got float"):
        call(q, k, v, window=3.5)
    with pytest.raises(CallError, match=r"window: param i32 wants an int \(a Python value\), got a torch.Tensor"):
        call(q, k, v, window=torch.tensor(3))
    with pytest.raises(CallError, match="window: param i32 value 4294967296 does not fit in 32 bits"):
        call(q, k, v, window=2**32)
    with pytest.raises(CallError, match="flip: param bool wants a bool, got int"):
        call(q, k, v, window=3, flip=1)
    with pytest.raises(CallError, match="wndow: unknown argument"):
        call(q, k, v, wndow=3)
    with pytest.raises(CallError, match="q: expected dtype f32"):
        call(q.half(), k, v, window=3)
    with pytest.raises(CallError, match="k: expected a torch.Tensor"):
        call(q, k.tolist(), v, window=3)


def test_data_dependent_masks_follow_the_mask_tensor_on_the_prepared_path(direct):
    spec = attnc.parse(DOC)[0]
    sizes = {"B": 2, "H": 2, "HKV": 1, "M": 33, "N": 47, "D": 16}
    doc = torch.sort(torch.randint(0, 3, (2, 47), device=DEVICE), dim=-1).values.int()
    call, kernel, jit, stand_in = direct(spec, *tensors(spec, sizes, torch.float16), doc=doc)
    for shift in range(3):
        q, k, v = tensors(spec, sizes, torch.float16)
        assert_matches(spec, call(q, k, v, doc=doc), q, k, v, doc=doc)
        doc[:, 20 + shift:] += 1  # in place: the tile summary must be recomputed
    other = torch.sort(torch.randint(0, 5, (2, 47), device=DEVICE), dim=-1).values.int()
    assert_matches(spec, call(q, k, v, doc=other), q, k, v, doc=other)
    if jit is not None:
        assert counts(jit, stand_in) == (1, 3)


def test_prepared_launches_are_bounded_per_kernel(direct, monkeypatch):
    monkeypatch.setattr(api, "PREPARED_CALLS", 2)
    spec = attnc.parse(WINDOW)[0]
    sizes = {"B": 1, "H": 1, "HKV": 1, "M": 3, "N": 3, "D": 16}
    call, kernel, _, _ = direct(spec, *tensors(spec, sizes, torch.float32))
    for m in (3, 4, 5):
        q, k, v = tensors(spec, dict(sizes, M=m), torch.float32)
        assert_matches(spec, call(q, k, v), q, k, v)
    assert len(kernel._prepared) == 2


def test_call_key_covers_what_bind_reads():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    doc = torch.zeros(1, 3, dtype=torch.int32)
    base = api.call_key(q, k, v, {"doc": doc, "w": 1}, ("doc",))
    assert base == api.call_key(q.clone(), k, v, {"doc": doc.clone(), "w": 2}, ("doc",))  # data, param values
    for other in [api.call_key(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, {"doc": doc, "w": 1}, ("doc",)),
                  api.call_key(q, k, v.half(), {"doc": doc, "w": 1}, ("doc",)),
                  api.call_key(q, k, v, {"doc": doc.long(), "w": 1}, ("doc",)),
                  api.call_key(q, k, v, {"doc": doc}, ("doc",)),
                  api.call_key(q[:, :1], k, v, {"doc": doc, "w": 1}, ("doc",))]:
        assert other != base
    with pytest.raises(AttributeError):
        api.call_key(q, k.tolist(), v, {}, ())
    with pytest.raises(KeyError):
        api.call_key(q, k, v, {}, ("doc",))
    # flex_attention's look-up reads q, k, v's part first and the captured tensors' part after
    assert base == api.call_key(q, k, v, {}, ()) + call_key_of_inputs({"doc": doc, "w": 1}, ("doc",))


def test_only_aligned_tensors_and_numbers_are_replayed():
    flat = torch.randn(65)
    assert launch.replayable([flat[:64], 3, 0.5, True, flat[4:]])
    assert not launch.replayable([flat[1:], 3])
    from triton.tools.tensor_descriptor import TensorDescriptor

    descriptor = TensorDescriptor.from_tensor(flat[:64].view(8, 8), [8, 8])
    assert not launch.replayable([flat[:64], descriptor])


def test_launch_hooks_send_calls_to_the_jit():
    from triton.knobs import HookChain

    chain = HookChain()
    assert not launch._hook_set(None) and not launch._hook_set(chain)
    chain.add(print)
    assert launch._hook_set(chain) and launch._hook_set(print)


# ---------------------------------------------------------------- the front-ends' cache hits


class Replays:
    """Every Triton kernel built while installed prepares its launches, on CPU too: a JIT launch (Triton's
    interpreter) returns the kernel's attn_fwd as the compiled kernel, and each prepared launch is replayed by an
    InterpreterLaunch of it, all sharing one registry of tensors by address (outputs register themselves, poisoned).
    On a GPU nothing is replaced and `launches` stays None."""

    def __init__(self, monkeypatch):
        self.memory, self.stand_ins = {}, []
        if DEVICE == "cuda":
            return
        real_jit = launch.TritonLauncher.launch_jit

        def launch_jit(launcher, grid, args, kernel):
            real_jit(launcher, grid, args, kernel)
            return launcher.fwd

        def direct_launch(fwd, device):
            self.stand_ins.append(InterpreterLaunch(fwd, self.memory))
            return self.stand_ins[-1]

        poisoned = launch.empty

        def empty(*args):
            out = poisoned(*args)
            self.register(out)
            return out

        monkeypatch.setattr(launch.TritonLauncher, "launch_jit", launch_jit)
        monkeypatch.setattr(launch, "direct_launch", direct_launch)
        monkeypatch.setattr(launch, "empty", empty)

    def register(self, *tensors):
        self.memory.update((t.data_ptr(), t) for t in tensors if isinstance(t, torch.Tensor))

    @property
    def launches(self):
        return None if DEVICE == "cuda" else sum(s.launches for s in self.stand_ins)


@pytest.fixture
def replays(monkeypatch):
    import attnc.dsl.flex as flex

    monkeypatch.setattr(flex, "_KERNELS", {})  # kernels and look-ups of this test's launches only
    monkeypatch.setattr(flex, "_CALLS", {})
    return Replays(monkeypatch)


class Counted:
    """Counts calls of functions that a front-end's cache hit must not make (or make once)."""

    def __init__(self, monkeypatch, places):
        self.calls = {}
        for module, name in places:
            real = getattr(module, name)
            self.calls[name] = 0

            def counting(*args, _real=real, _name=name, **kwargs):
                self.calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)
        return self


SIZES = {"B": 1, "H": 2, "HKV": 2, "M": 9, "N": 9, "D": 16}


def fresh(replays, spec, sizes=SIZES, dtype=torch.float32):
    q, k, v = tensors(spec, sizes, dtype)
    replays.register(q, k, v)
    return q, k, v


def test_decorator_hits_read_the_call_once_and_match_the_reference(replays, monkeypatch):
    import attnc.dsl.trace as trace
    import attnc.runtime.kernel as kernel_module

    spec = attnc.parse(wrappers.SOFTCAP)[0]
    softcap = wrappers.softcap_decorated()
    for cap in (20.0, 20.0):  # traces, compiles and prepares; then a hit
        q, k, v = fresh(replays, spec)
        assert_matches(spec, softcap(q, k, v, cap=cap), q, k, v, cap=cap)
    assert softcap.spec.key == spec.key
    counted = Counted(monkeypatch, [(trace, "call_key"), (trace.AttentionFunction, "_signature"),
                                    (kernel_module, "call_key"), (kernel_module, "bind")])
    before = replays.launches
    for cap in (5.0, 20.0, 7):  # a param is a runtime argument: any value, int or float, takes the hit
        q, k, v = fresh(replays, spec)
        assert_matches(spec, softcap(q, k, v, cap=cap), q, k, v, cap=cap)
        assert counted.calls == {"call_key": 1, "_signature": 0, "bind": 0}  # the kernel reads no key of its own
        counted.reset()
    if before is not None:
        assert replays.launches == before + 3


def test_decorator_hits_check_what_changed(replays):
    spec = attnc.parse(wrappers.SOFTCAP)[0]
    softcap = wrappers.softcap_decorated()
    for _ in range(2):
        q, k, v = fresh(replays, spec)
        softcap(q, k, v, cap=20.0)
    launches = replays.launches
    q2, k2, v2 = fresh(replays, spec, dict(SIZES, M=5, N=12))  # other sizes: another key, the full path
    assert_matches(spec, softcap(q2, k2, v2, cap=3.0), q2, k2, v2, cap=3.0)
    h, kh, vh = fresh(replays, spec, dtype=torch.float16)  # another dtype: traced again, another kernel
    assert softcap(h, kh, vh, cap=3.0).dtype == torch.float16 and softcap.spec.key != spec.key
    assert_matches(softcap.spec, softcap(h, kh, vh, cap=3.0), h, kh, vh, cap=3.0)
    with pytest.raises(CallError, match=r"^k: expected a 4-dim torch.Tensor"):
        softcap(q, k.tolist(), v, cap=3.0)
    with pytest.raises(CallError, match=r"^cap: param f32 wants a float"):
        softcap(q, k, v, cap="3")
    with pytest.raises(CallError, match=r"^cp: unknown argument"):
        softcap(q, k, v, cp=3.0)
    if launches is not None:
        assert replays.launches == launches + 1  # the second f16 call only: each other call was new or refused
    grad_q = q.clone().requires_grad_()
    replays.register(grad_q)
    out = softcap(grad_q, k, v, cap=3.0)
    assert out.grad_fn is not None  # through the op, which autograd records
    assert_matches(spec, out.detach(), q, k, v, cap=3.0)
    with torch.no_grad():
        assert_matches(spec, softcap(grad_q, k, v, cap=3.0), q, k, v, cap=3.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 3)


def make_softcap_mod(cap, bias):
    """A score_mod capturing a scalar and a tensor, and a function that rebinds the scalar."""
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap) + bias[h]

    def rebind(value):
        nonlocal cap
        cap = value

    return softcap_mod, rebind


def test_flex_hits_read_the_call_once_and_follow_what_the_mod_captures(replays, monkeypatch):
    import attnc.dsl.flex as flex
    import attnc.runtime.kernel as kernel_module

    bias = torch.randn(SIZES["H"], device=DEVICE)
    mod, rebind = make_softcap_mod(20.0, bias)
    mask = attnc.create_block_mask(causal, None, None, SIZES["M"], SIZES["N"])

    def check(q, k, v, block_mask=mask, mask_mod=causal):
        out = attnc.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask)
        spec = flex.flex_spec(q, k, v, score_mod=mod, block_mask=block_mask)
        want = attnc.reference(spec, q, k, v, bias=bias)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)

    spec = attnc.parse(wrappers.SOFTCAP)[0]  # only its q, k, v declarations are used here
    for _ in range(2):
        check(*fresh(replays, spec))
    counted = Counted(monkeypatch, [(flex, "call_key"), (flex, "_latent"), (flex, "_signature"),
                                    (flex, "_variant"), (kernel_module, "call_key"), (kernel_module, "bind")])
    launches = replays.launches
    q, k, v = fresh(replays, spec)
    out = attnc.flex_attention(q, k, v, score_mod=mod, block_mask=mask)
    assert counted.calls == {"call_key": 1, "_latent": 0, "_signature": 0, "_variant": 0, "bind": 0}
    assert launches is None or replays.launches == launches + 1
    assert_matches(flex.flex_spec(q, k, v, score_mod=mod, block_mask=mask), out, q, k, v, bias=bias)

    rebind(5.0)  # a rebound scalar: traced again, another kernel; its numbers
    check(*fresh(replays, spec))
    bias.mul_(-3.0)  # written in place: the same trace and kernel read the new values
    check(*fresh(replays, spec))
    other = attnc.create_block_mask(window, None, None, SIZES["M"], SIZES["N"])  # another block mask object
    check(*fresh(replays, spec), block_mask=other)
    with pytest.raises(CallError, match=r"^block_mask: was created for Q_LEN=9"):
        attnc.flex_attention(*fresh(replays, spec, dict(SIZES, M=4)), score_mod=mod, block_mask=mask)
    bias.data = torch.randn(2 * SIZES["H"], device=DEVICE)  # the captured tensor's shape changed in place
    with pytest.raises(CallError, match=r"bias: dim 0 \(H\) is 4; every size named H must agree"):
        attnc.flex_attention(q, k, v, score_mod=mod, block_mask=mask)
    bias.data = bias.data[:SIZES["H"]].clone()
    check(q, k, v)
    grad_q = q.clone().requires_grad_()
    replays.register(grad_q)
    assert attnc.flex_attention(grad_q, k, v, score_mod=mod, block_mask=mask).grad_fn is not None


def test_front_ends_add_little_to_their_kernels_call(monkeypatch):
    """Host time of a cache hit with Triton's launcher stubbed (only Python runs), each front-end against the
    kernel it hands the call to, called directly on the same tensors (benchmarks/host_overhead_wrappers.py).
    Measured on a 2-core CPU machine: the decorator adds 0.1-0.3 us to its kernel's ~5.5 us, flex_attention
    1.1-1.5 us to its kernel's ~5.2 us (0.3-0.6 us of it the frame that makes argument mistakes CallErrors); before
    the look-ups shared the call's key they added 1.3-1.5 us (0.2x) and 3.3 us (0.57x). The bounds sit between."""
    import attnc.dsl.flex as flex

    monkeypatch.setattr(flex, "_KERNELS", {})
    monkeypatch.setattr(flex, "_CALLS", {})
    wrappers.stub_launches(monkeypatch.setattr)
    q, k, v = tensors(attnc.parse(wrappers.SOFTCAP)[0], SIZES, torch.float32)
    def within_bounds(us: dict) -> bool:
        return (us["decorator"] - us["decorator's kernel"] < 0.15 * us["decorator's kernel"]
                and us["flex"] - us["flex's kernel"] < 0.5 * us["flex's kernel"])

    # Up to three measurements: beside another pytest worker on 2 cores one measurement was once 2.8 us over (the
    # runs alone never were); a real regression fails all three
    tries = []
    for _ in range(3):
        tries.append(wrappers.timed(wrappers.runners(q, k, v), calls=200, rounds=30))
        if within_bounds(tries[-1]):
            break
    assert within_bounds(tries[-1]), tries


class CudaLauncher:
    """Stands in for Triton 3.6's launcher: records what DirectLaunch hands its C `launch`."""

    launch_cooperative_grid, launch_pdl, num_ctas = False, False, 1
    global_scratch_size, global_scratch_align, profile_scratch_size = 128, 128, 0

    def __init__(self):
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)

    def __call__(self, *args):
        raise AssertionError("the Python wrapper ran: DirectLaunch should call the C launch")


def test_direct_launch_calls_triton_36s_c_launcher_with_cached_scratch(monkeypatch):
    from triton.backends.nvidia import driver as nvidia_driver

    from attnc.backends.triton import scratch

    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOO", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    asked = []

    def fake_scratch(size, alignment, stream):
        asked.append((size, alignment, stream))
        return torch.empty(size, dtype=torch.int8)

    monkeypatch.setattr(scratch, "scratch", fake_scratch)
    run = CudaLauncher()
    compiled = types.SimpleNamespace(run=run, function=77, packed_metadata=("meta",),
                                     metadata=types.SimpleNamespace(global_scratch_size=0))
    direct = launch.DirectLaunch(compiled, 0, lambda: 0, lambda index: 5)
    for stream in (5, 5, 6):
        direct.launch(stream, (3, 4), [10, 20])
    assert asked == [(128 * 12, 128, 5), (128 * 12, 128, 6)]  # one buffer per stream, reused on stream 5
    (first, second, third) = run.calls
    assert first[:7] == (3, 4, 1, 5, 77, False, False) and first[8:] == (None, ("meta",), None, None, None, 10, 20)
    assert first[7] == second[7] != third[7] and isinstance(first[7], int)  # the scratch as an address

    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", "another layout")
    assert launch.DirectLaunch(compiled, 0, lambda: 0, lambda index: 5).raw is None  # Triton 3.7+: the wrapper


# ---------------------------------------------------------------- on the GPU


TINY = wrappers.SOFTCAP.replace("f32[", "bf16[")  # the front-ends' spec, as the GPU runs it


# A cache hit's host time, as a multiple of causal SDPA's on the same tensors in the same process: a regression
# bound that holds on fast and slow hosts alike. Issue 4's absolute target (15 us) is reported by
# benchmarks/host_overhead.py, not asserted here.
HOST_BOUND = 1.25
# A host-time bound means nothing while other test processes share the CPUs (pytest -n): such runs skip it, and the
# GPU plan runs `pytest -m gpu -k host_time` on its own (benchmarks/NOTES.md)
needs_idle_host = pytest.mark.skipif("PYTEST_XDIST_WORKER" in os.environ,
                                     reason="host time is measured on an otherwise idle host: run it without -n")


@pytest.mark.gpu
@needs_idle_host
def test_host_time_per_call_on_a_cache_hit_gpu():
    spec = attnc.parse(TINY)[0]
    q, k, v = (torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernel = attnc.compile(spec)
    assert_matches(spec, kernel(q, k, v, cap=20.0), q, k, v, cap=20.0)  # compiles; prepares the launch
    (launcher,) = kernel._impls.values()
    launcher = getattr(launcher, "fallback", launcher)  # the Gluon default (softcap's) runs M = 128 on the template
    launcher.fwd = CountingJit(launcher.fwd)
    for _ in range(3):
        q, k, v = (torch.randn_like(t) for t in (q, k, v))
        assert_matches(spec, kernel(q, k, v, cap=20.0), q, k, v, cap=20.0)
    assert launcher.fwd.launches == 0 and len(kernel._prepared) == 1  # no JIT launch after the first call
    us, sdpa_us = host_us_against_sdpa(lambda: kernel(q, k, v, cap=20.0), q, k, v)
    assert us < HOST_BOUND * sdpa_us, f"attnc.compile kernel: {us:.1f} us per call, SDPA {sdpa_us:.1f}"

    @attnc.attention
    def softcap(q, k, v, *, cap: float = 30.0):
        s = (q @ k) * q.D ** -0.5
        s = cap * attnc.tanh(s / cap)
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    assert_matches(spec, softcap(q, k, v, cap=20.0), q, k, v, cap=20.0)
    us, sdpa_us = host_us_against_sdpa(lambda: softcap(q, k, v, cap=20.0), q, k, v)
    assert_matches(spec, softcap(q, k, v, cap=20.0), q, k, v, cap=20.0)
    assert us < HOST_BOUND * sdpa_us, f"@attnc.attention: {us:.1f} us per call, SDPA {sdpa_us:.1f}"


@pytest.mark.gpu
def test_prepared_launch_in_a_cuda_graph_gpu():
    spec = attnc.parse(TINY)[0]
    q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernel = attnc.compile(spec)
    kernel(q, k, v)
    kernel(q, k, v)  # prepared from here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(q, k, v)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(spec, out, q, k, v)


CAUSAL_BF16 = """
attention causal_bf16 {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    param scale: f32 = 0.125
    score = qk * scale
    mask i >= j
    return softmax(score) @ v, lse
}
"""


def test_gluon_forward_calls_take_a_prepared_launch(monkeypatch):
    """The Gluon forward (sm_90 plans, persistent programs) prepares a launch as the template's does. Gluon kernels
    do not run in the interpreter: attn_fwd_gluon's place is taken by the CPU plan's template kernel run with the
    argument list the Gluon kernel gets (both signatures are QKV_GROUPS + the spec's groups for a mask without
    data), so each result is checked against the reference; a param, fresh tensors, other strides, other sizes and
    an unaligned q: each call's own launch, the last three not from a stale prepared one."""
    from attnc.backends.triton import binaries, gluon
    from attnc.backends.triton.signature import gluon_signature
    from attnc.passes import PlanOptions, Target, plan_kernel
    from attnc.passes.kernels import prefill_kernel

    if DEVICE == "cuda":
        pytest.skip("stands the interpreter in for the Gluon kernel (the GPU tests run it: tests/test_gluon_gpu.py)")
    spec = attnc.parse(CAUSAL_BF16)[0]
    template = launch.TritonLauncher(plan_kernel(spec, Target("triton", "cpu", None), 16, 16),
                                     launch.load_module(plan_kernel(spec, Target("triton", "cpu", None), 16, 16)))
    memory, runs = {}, []
    data_ptr = torch.Tensor.data_ptr

    def recorded_ptr(t):
        address = data_ptr(t)
        memory[address] = t
        return address

    class GluonStandIn:
        arg_names = gluon_signature(template.args).names

        def __getitem__(self, grid):
            def run(*args, **options):
                runs.append(grid)
                args = [memory.get(a, a) if type(a) is int else a for a in args]
                sizes = dict(zip(template.args.sizes, args[slice(*signature.span("sizes"))]))
                tiles = template.tiles(sizes["M"], sizes["H"] // sizes["HKV"])
                kernel = prefill_kernel(template.plan, tiles, None)
                template.fwd[(-(-sizes["M"] // tiles.block_mq), sizes["B"] * sizes["H"])](*args, **kernel.keywords)
                return self

            return run

    class StandInDirect:
        def __init__(self, compiled):
            self.compiled = compiled

        def stream(self):
            return 0

        def launch(self, stream, grid, args):
            self.compiled[grid](*args)

    class Backend:
        name = "triton"

        def target(self, device):
            return Target("triton", "cuda", 90)

        def build(self, plan):
            assert plan.warpgroups.path == "gluon" and plan.warpgroups.layout.persistent
            return gluon.GluonLauncher(plan, types.SimpleNamespace(attn_fwd_gluon=GluonStandIn()), template)

    signature = gluon_signature(template.args)
    monkeypatch.setattr(torch.Tensor, "data_ptr", recorded_ptr)
    monkeypatch.setattr(gluon, "multiprocessors", lambda device: 3)
    monkeypatch.setattr(launch, "direct_launch", lambda compiled, device: StandInDirect(compiled))
    jit = []
    launched = binaries.launch
    monkeypatch.setattr(binaries, "launch", lambda fn, *rest: (jit.append(fn), launched(fn, *rest))[1])
    kernel = attnc.compile(spec, backend=Backend(), options=PlanOptions(gluon=True))
    sizes = {"B": 2, "H": 3, "HKV": 3, "M": 70, "N": 80, "D": 16}

    def call(q, k, v, **kwargs):
        jit.clear()
        got = kernel(q, k, v, **kwargs)
        assert_matches(spec, got, q, k, v, **kwargs)
        return [type(fn).__name__ for fn in jit]

    assert call(*tensors(spec, sizes, torch.bfloat16)) == ["GluonStandIn"]  # prepares
    assert call(*tensors(spec, sizes, torch.bfloat16), scale=0.3) == ["GluonStandIn"]  # another keyword set
    assert call(*tensors(spec, sizes, torch.bfloat16)) == []  # prepared: new tensors
    assert call(*tensors(spec, sizes, torch.bfloat16), scale=0.2) == []
    q, k, v = tensors(spec, sizes, torch.bfloat16)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # other strides: a new key
    assert call(q_t, k, v) == ["GluonStandIn"]
    assert call(*tensors(spec, dict(sizes, M=90), torch.bfloat16)) == ["GluonStandIn"]  # other sizes
    shifted = torch.randn(q.numel() + 1, dtype=torch.bfloat16)[1:].view(q.shape)  # unaligned: the template
    assert call(shifted, k, v) == ["InterpretedFunction"]
    assert [grid[0] for grid in runs] == [3] * 6  # persistent: a program per SM (3 here), full path or replayed
