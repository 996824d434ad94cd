"""`attnc.compile` and the `Kernel` it returns; the backend registry.

A Kernel plans and builds lazily, once per (device, head dims): D and DV fix the tile shapes, everything
else (B, M, N, params) is a runtime argument. The spec's key is computed once, at `compile`.
"""
from __future__ import annotations

import difflib
import os
from typing import Callable, Protocol, Union, overload

import torch

from ..dsl.signature import Bound, bind, call_usage, qkv_call_error
from ..errors import CallError, CompileError, checks_arguments
from ..ir import Attention
from ..passes import KernelPlan, PlanOptions, Target, plan_kernel
from .progress import status


Result = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # out, or (out, lse) when the spec returns lse


class AttentionKernel(Protocol):
    """What attnc.compile and attnc.load return: `kernel(q, k, v, **params_and_inputs) -> out | (out, lse)`."""

    spec: Attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, **kwargs: object) -> Result: ...


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

    def __call__(self, *args: torch.Tensor, **kwargs: object) -> Result:
        """kernel(q, k, v, **params_and_inputs) -> out, or (out, lse)."""
        if len(args) != 3:
            raise qkv_call_error(args, kwargs, lambda: call_usage(self.spec))
        q, k, v = args
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
        sizes = bound.sizes
        impl = self._impls.get((q.device, sizes["D"], sizes["DV"]))
        if impl is not None and getattr(impl, "run", None) is None:
            return impl(bound)  # built whole (TVM): nothing left to compile
        # Building, or a call signature the launcher has not prepared, whose launch Triton's JIT may compile:
        # a status line on a terminal if it takes long.
        backend = self.backend or default_backend(q.device)
        with status(f"attnc: compiling {self.spec.name} ({backend} on {q.device.type}, D={sizes['D']})"):
            return self._launch(impl or self._build(q.device, sizes["D"], sizes["DV"]), bound, key)

    def _launch(self, impl, bound: Bound, key: tuple | None) -> Result:
        run = getattr(impl, "run", None)
        if run is None or key is None:
            return impl(bound)
        result, prepared = run(bound)
        if prepared is not None:
            if key not in self._prepared and len(self._prepared) >= PREPARED_CALLS:
                self._prepared.pop(next(iter(self._prepared)), None)  # the oldest signature
            self._prepared[key] = prepared
        return result

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


@checks_arguments
def compile(spec: Attention, backend: str | None = None, options: PlanOptions | None = None,
            autotune: bool = False) -> AttentionKernel:
    """A callable kernel for `spec`. backend None picks per call from the tensors' device (triton for CUDA,
    tvm for CPU, or triton's interpreter on CPU when TRITON_INTERPRET=1). Building happens on the first call
    for each device and head dim, through the kernel cache. autotune=True times candidate prefill tiles on the
    first call of each shape regime and keeps the fastest correct one in the kernel cache (runtime/autotune.py)."""
    if autotune:
        from .autotune import TunedKernel

        return TunedKernel(spec, backend, options)
    return Kernel(spec, backend, options)


@overload
def load(path: str | os.PathLike[str], name: None = None) -> dict[str, AttentionKernel]: ...
@overload
def load(path: str | os.PathLike[str], name: str) -> AttentionKernel: ...


@checks_arguments
def load(path: str | os.PathLike[str], name: str | None = None) -> dict[str, AttentionKernel] | AttentionKernel:
    """The kernels `attnc compile FILE -o DIR` built ahead of time, run without compiling: a dict name -> kernel
    of every attention in DIR, or with `name`, that attention's kernel. Triton artifacts load as Kernels
    (attnc.runtime.aot), `--backend tvm` ones through attnc.codegen.tvm.aot; both are called the same way."""
    from ..codegen.tvm import aot as tvm_aot
    from .aot import load_artifact

    kernels: dict[str, AttentionKernel] = tvm_aot.load(path) if tvm_aot.is_artifact(path) else load_artifact(path)
    if name is None:
        return kernels
    if name not in kernels:
        close = difflib.get_close_matches(name, list(kernels), n=1)
        raise CallError(f"name: {os.fspath(path)} has no attention named {name!r}"
                        f"{f'; did you mean {close[0]!r}?' if close else ''} (it has: {', '.join(kernels)})")
    return kernels[name]


def head_dims(spec: Attention, head_dim: int | None = None, value_dim: int | None = None) -> tuple[int, int]:
    """D and DV for planning without tensors (CLI, AOT): from the arguments or the spec's `dims`."""
    dims = spec.dim_values
    d = head_dim or dims.get("D")
    if d is None:
        raise CompileError(f"attention {spec.name!r}: the head dim D is only known from tensors; bind it with "
                           f"`dims D = 128` in the spec, or pass it (CLI: --dims D=128)")
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
