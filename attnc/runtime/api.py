"""`attnc.compile` and the `Kernel` it returns; the backend registry.

A Kernel plans and builds lazily, once per (device, head dims): D and DV fix the tile shapes, everything
else (B, M, N, params) is a runtime argument. The spec's key is computed once, at `compile`.

Validate mode (`kernel(..., validate=True)`, or ATTNC_VALIDATE=1 for every call of the process) waits for the call,
raises a CallError for bad index data the kernel recorded (runtime/device_errors.py) and then for an out-of-range
lookup that reaches the result, by the reference's rule (dsl/reference.check_lookups).
"""
from __future__ import annotations

import os
from typing import Callable, Protocol

import torch

from .. import index_data
from ..dsl.signature import Bound, bind
from ..errors import CompileError
from . import device_errors
from ..ir import Attention
from ..passes import KernelPlan, PlanOptions, Target, plan_kernel


class Backend(Protocol):
    name: str

    def target(self, device: torch.device) -> Target:
        """The plan target for tensors on `device` (raises CompileError if this backend cannot run there)."""

    def build(self, plan: KernelPlan) -> Callable[[Bound], object]:
        """A callable that runs the planned kernel on a bound call and returns out, or (out, lse). It may also
        have `run(bound) -> (result, prepared)`, where `prepared(q, k, v, kwargs)` repeats the call for later
        calls with the same `call_key`, returning None to send a call back through bind()."""


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make `compile(spec, backend=name)` available; `factory` is called once, on first use."""
    _BACKENDS[name] = factory


_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    backend = _instances.get(name)
    if backend is None:
        if name not in _BACKENDS and name == "tvm":
            _import_tvm_backend()
        if name not in _BACKENDS:
            known = ", ".join(sorted(_BACKENDS)) or "none"
            raise CompileError(f"backend {name!r} is not available (registered: {known})"
                               + ("; the TVM backend registers itself from attnc.codegen.tvm, which is not "
                                  "installed yet: use backend='triton' with TRITON_INTERPRET=1 on CPU"
                                  if name == "tvm" else ""))
        backend = _instances[name] = _BACKENDS[name]()
    return backend


def _import_tvm_backend() -> None:
    try:
        import attnc.codegen.tvm.backend  # noqa: F401  (registers "tvm" when present)
    except ImportError:
        pass


def default_backend(device: torch.device) -> str:
    """triton for CUDA tensors; for CPU tensors tvm, unless Triton's interpreter is switched on."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "triton"
    return "tvm"


def _register_builtin() -> None:
    from .launch import TritonBackend

    register_backend("triton", TritonBackend)


_register_builtin()


PREPARED_CALLS = 64  # call signatures (shapes, strides, ...) each Kernel keeps a prepared launch for


def call_key(q, k, v, kwargs: dict, input_names: tuple[str, ...]) -> tuple:
    """What bind() and the launch derive from a call, apart from param values and data pointers: every tensor's
    shape, strides, dtype and device, and the keyword names. Raises AttributeError / KeyError for arguments that
    are not tensors or a missing input."""
    key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           k.device, v.device, *kwargs)
    for name in input_names:
        t = kwargs[name]
        key += (t.shape, t.stride(), t.dtype, t.device)
    return key


class Kernel:
    """A compiled attention: call it as `kernel(q, k, v, **params_and_inputs)`."""

    def __init__(self, spec: Attention, backend: str | None = None, options: PlanOptions | None = None):
        if not isinstance(spec, Attention):
            raise CompileError(f"attnc.compile expects an attnc.Attention (from attnc.parse or a decorator), "
                               f"got {type(spec).__name__}")
        if backend is not None:
            get_backend(backend)  # fail at compile time for an unknown backend
        self.spec = spec
        self.key = spec.key
        self.backend = backend
        self.options = options or PlanOptions()
        self._impls: dict[tuple, Callable[[Bound], object]] = {}
        self._input_names = tuple(t.name for t in spec.inputs)
        # call_key -> a launch that repeats a checked call (Backend.build's `run`): the per-call fast path
        self._prepared: dict[tuple, Callable] = {}

    def __call__(self, q, k, v, /, *, validate: bool = False, **kwargs):
        if validate or index_data.VALIDATE_ALL:
            return self.validated(q, k, v, kwargs)
        try:
            key = call_key(q, k, v, kwargs, self._input_names)
        except (AttributeError, KeyError, TypeError):
            key = None  # not tensors, or a missing input: bind() words the error
        else:
            prepared = self._prepared.get(key)
            if prepared is not None:
                result = prepared(q, k, v, kwargs)
                if result is not None:
                    return result
        bound = bind(self.spec, q, k, v, kwargs)
        impl = self._impl(bound)
        run = getattr(impl, "run", None)
        if run is None or key is None:
            return impl(bound)
        result, prepared = run(bound)
        if prepared is not None:
            if key not in self._prepared and len(self._prepared) >= PREPARED_CALLS:
                self._prepared.pop(next(iter(self._prepared)), None)  # the oldest signature
            self._prepared[key] = prepared
        return result

    def validated(self, q, k, v, kwargs: dict):
        """A call in validate mode (module docstring): the kernel records into an error buffer of its own, which is
        read (a host sync) right after it; then the lookups are checked on the call's device."""
        from ..dsl.reference import check_lookups

        bound = bind(self.spec, q, k, v, kwargs)
        impl = self._impl(bound)
        with device_errors.capture(bound.q.device) as errors:
            result = impl(bound)
        device_errors.raise_recorded(errors)
        check_lookups(self.spec, bound)
        return result

    def _impl(self, bound: Bound) -> Callable[[Bound], object]:
        sizes = bound.sizes
        impl = self._impls.get((bound.q.device, sizes["D"], sizes["DV"]))
        return impl if impl is not None else self._build(bound.q.device, sizes["D"], sizes["DV"])

    def plan(self, device: torch.device | str, head_dim: int, value_dim: int | None = None) -> KernelPlan:
        device = torch.device(device)
        backend = get_backend(self.backend or default_backend(device))
        return plan_kernel(self.spec, backend.target(device), head_dim, value_dim or head_dim, self.options)

    def _build(self, device: torch.device, head_dim: int, value_dim: int):
        backend = get_backend(self.backend or default_backend(device))
        plan = plan_kernel(self.spec, backend.target(device), head_dim, value_dim, self.options)
        impl = self._impls[(device, head_dim, value_dim)] = backend.build(plan)
        return impl

    def __repr__(self) -> str:
        return f"attnc.Kernel({self.spec.name!r}, backend={self.backend!r}, key={self.key[:12]})"


def compile(spec: Attention, backend: str | None = None, options: PlanOptions | None = None,
            autotune: bool = False):
    """A callable kernel for `spec`. backend None picks per call from the tensors' device (triton for CUDA,
    tvm for CPU, or triton's interpreter on CPU when TRITON_INTERPRET=1). Building happens on the first call
    for each device and head dim, through the kernel cache. autotune=True times candidate prefill tiles on the
    first call of each shape regime and keeps the fastest correct one in the kernel cache (runtime/autotune.py)."""
    if autotune:
        from .autotune import TunedKernel

        return TunedKernel(spec, backend, options)
    return Kernel(spec, backend, options)


def load(path) -> Kernel | dict[str, Kernel]:
    """The kernels `attnc compile FILE --backend triton --arch ... -o DIR` built ahead of time, run without
    compiling: one Kernel when DIR holds one attention, else a dict name -> Kernel (attnc.runtime.aot).
    `--backend tvm` artifacts load through attnc.codegen.tvm.aot (its AotKernels are called the same way)."""
    from ..codegen.tvm import aot as tvm_aot
    from .aot import load_artifact

    if tvm_aot.is_artifact(path):
        return tvm_aot.load(path)
    return load_artifact(path)


def head_dims(spec: Attention, head_dim: int | None = None, value_dim: int | None = None) -> tuple[int, int]:
    """D and DV for planning without tensors (CLI, AOT): from the arguments or the spec's `dims`."""
    dims = spec.dim_values
    d = head_dim or dims.get("D")
    if d is None:
        raise CompileError(f"attention {spec.name!r}: the head dim D is only known from tensors; bind it with "
                           f"`dims D = 128` in the spec, or pass it (CLI: --dim D=128)")
    return d, value_dim or dims.get("DV") or d


# `attnc show --emit plan|triton`: planned for an H100 (sm_90); an unbound head dim is shown as 128.
SHOW_TARGET = Target("triton", "cuda", 90)
SHOW_HEAD_DIM = 128


def _show_plan(spec: Attention) -> tuple[KernelPlan, str]:
    dims = spec.dim_values
    note = "" if "D" in dims else f"# D is not bound by `dims`: shown for D = {SHOW_HEAD_DIM}\n"
    d, dv = head_dims(spec, dims.get("D", SHOW_HEAD_DIM))
    return plan_kernel(spec, SHOW_TARGET, d, dv), note


def emit_plan(spec: Attention) -> str:
    plan, note = _show_plan(spec)
    return note + plan.describe() + "\n"


def emit_triton(spec: Attention) -> str:
    from ..codegen.triton.generate import generate

    plan, note = _show_plan(spec)
    return note + generate(plan)
