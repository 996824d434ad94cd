"""The `Kernel` that `attnc.compile` returns: it plans and builds lazily, once per (device, head dims): D and DV
fix the tile shapes, everything else (B, M, N, params) is a runtime argument. The spec's key is computed once.

Validate mode (`kernel(..., validate=True)`, or ATTNC_VALIDATE=1 for every call of the process) waits for the call,
raises a CallError for bad index data the kernel recorded (backends/device_errors.py) and then for an out-of-range
lookup that reaches the result, by the reference's rule (dsl/reference.check_lookups).
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, Union

import torch

from .. import index_data
from . import autograd
from ..backends import compiles_first, device_errors, get_backend
from ..dsl.signature import Bound, bind, call_key, positional_qkv
from ..errors import CompileError
from ..ir import Attention
from ..passes import KernelPlan, PlanOptions, plan_kernel
from ..passes.plan import Target
from ..backends.progress import status

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

    def build_backward(self, plan: KernelPlan) -> Callable[..., dict[str, torch.Tensor]]:
        """The backward of a planned forward (passes/grad.py gives its math), as a callable
        `grads(bound, out, lse, dout, dlse, deterministic) -> {name: gradient}`:
          bound  the forward call (its q, k, v and inputs as the user passed them; `plan.spec` returns lse);
          out    the forward's out; lse: its float32 lse (lse_shape(bound)); dout: out's gradient (any strides);
          dlse   lse's gradient, or None when the caller's loss does not read lse;
          deterministic  True: no floating-point atomics, so two runs give the same bits.
        The result holds "q", "k", "v" and each float input of `derive(plan.spec).tables`, each with the shape and
        dtype of its tensor. Rows with no kept key contribute nothing."""


def default_backend(device: torch.device) -> str:
    """triton for CUDA tensors; for CPU tensors tvm, unless Triton's interpreter is switched on."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "triton"
    return "tvm"


PREPARED_CALLS = 64  # call signatures (shapes, strides, ...) each Kernel keeps a prepared launch for


class Kernel:
    """A compiled attention: call it as `kernel(q, k, v, **params_and_inputs)`."""

    def __init__(self, spec: Attention, backend: "str | Backend | None" = None, options: PlanOptions | None = None,
                 deterministic: bool | None = None):
        if not isinstance(spec, Attention):
            raise CompileError(f"attnc.compile expects an attnc.Attention (from attnc.parse or a decorator), "
                               f"got {type(spec).__name__}")
        if isinstance(backend, str):
            get_backend(backend)  # fail at compile time for an unknown backend
        self.spec = spec
        self.key = spec.key
        self.backend = backend
        self.options = options or PlanOptions()
        # True: a backward without float atomics, and a forward that compiles its kernel before the first launch
        # (never the fallback while it compiles); None follows torch.use_deterministic_algorithms
        self.deterministic = deterministic
        self._impls: dict[tuple, Callable[[Bound], object]] = {}
        self._input_names = tuple(t.name for t in spec.inputs)
        # read here, not in a call that torch.compile traces (Dynamo cannot enter cached_property's lock)
        self.forward_only = spec.decode_kernel_only  # latent attention, FP8 K/V: no backward kernels
        self._shares_kv = spec.shares_kv  # read per call: an attribute is cheaper than the spec's property
        # call_key -> a launch that repeats a checked call (Backend.build's `run`): the per-call fast path
        self._prepared: dict[tuple, Callable] = {}
        self.op_key = autograd.register(self)  # its name in the attnc::attention ops (training, torch.compile)

    def __call__(self, *args: torch.Tensor, validate: bool = False, **kwargs: object) -> Result:
        """kernel(q, k, v, **params_and_inputs) -> out, or (out, lse); `validate`: see the module docstring."""
        if len(args) != 3 or self._shares_kv:
            args = positional_qkv(self.spec, args, kwargs)
        q, k, v = args
        return self.call(q, k, v, kwargs, None, validate)

    def call(self, q, k, v, kwargs: dict, key: tuple | None = None, validate: bool = False,
             prepared: Callable | None = None, bound: Bound | None = None) -> Result:
        """`kernel(q, k, v, **kwargs)` for a caller that has its arguments in hand (a front-end: the decorator,
        flex_attention): q, k, v as the kernel reads them (v is k where the values are the keys), kwargs neither
        copied nor changed. `key`: the call's call_key where the caller has read it, with the names of every
        input the spec declares, or more (a key that tells more calls apart only prepares more launches); None:
        read here. `prepared`: prepared_launch(key), where the caller keeps it. `bound`: bind(spec, q, k, v, kwargs)
        where the caller has it (the training step's, which its backward reads too)."""
        if key is None and not torch.compiler.is_compiling():  # traced, it takes the op, and Dynamo reads no key
            try:
                key = call_key(q, k, v, kwargs, self._input_names)
            except (AttributeError, KeyError, TypeError):
                pass  # not tensors, or a missing input: bind() words the error
        if autograd.needs_op(q, k, v, kwargs, None if key is None else self._input_names):
            return autograd.call(self, q, k, v, kwargs)
        if validate or index_data.VALIDATE_ALL:
            return self.validated(q, k, v, kwargs)
        if key is not None:
            if prepared is None:
                prepared = self._prepared.get(key)
            if prepared is not None:
                result = prepared(q, k, v, kwargs)
                if result is not None:
                    return result
        if bound is None:
            bound = bind(self.spec, q, k, v, kwargs)
        sizes = bound.sizes
        impl = self._impls.get((q.device, sizes["D"], sizes["DV"]))
        if impl is not None and getattr(impl, "run", None) is None:
            return impl(bound)  # built whole (TVM): nothing left to compile
        # Building, or a call signature the launcher has not prepared, whose launch Triton's JIT may compile:
        # a status line on a terminal if it takes long.
        backend = self.backend if isinstance(self.backend, str) else self.backend_for(q.device).name
        with status(f"attnc: compiling {self.spec.name} ({backend} on {q.device.type}, D={sizes['D']})"), \
                compiles_first(bool(self.deterministic)):
            return self._launch(impl or self._build(q.device, sizes["D"], sizes["DV"]), bound, key)

    def prepared_launch(self, key: tuple) -> Callable | None:
        """The launch that repeats calls of this call_key (a caller may keep it and pass it to `call`), or None
        where the last call of that key could not prepare one."""
        return self._prepared.get(key)

    def validated(self, q, k, v, kwargs: dict) -> Result:
        """A call in validate mode: the kernel records into an error buffer of its own, which is read (a host sync)
        right after it; then the lookups are checked on the call's device."""
        from ..dsl.reference import check_lookups

        bound = bind(self.spec, q, k, v, kwargs)
        sizes = bound.sizes
        impl = self._impls.get((q.device, sizes["D"], sizes["DV"])) or self._build(q.device, sizes["D"], sizes["DV"])
        with device_errors.capture(bound.q.device) as errors:
            result = impl(bound)
        device_errors.raise_recorded(errors)
        check_lookups(self.spec, bound)
        return result

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
        return plan_kernel(self.spec, self.backend_for(device).target(device), head_dim, value_dim or head_dim,
                           self.options)

    def _build(self, device: torch.device, head_dim: int, value_dim: int):
        backend = self.backend_for(device)
        plan = plan_kernel(self.spec, backend.target(device), head_dim, value_dim, self.options)
        impl = self._impls[(device, head_dim, value_dim)] = backend.build(plan)
        return impl

    def backend_for(self, device: torch.device) -> Backend:
        if self.backend is None or isinstance(self.backend, str):
            return get_backend(self.backend or default_backend(device))
        return self.backend

    @property
    def backend_name(self) -> str:
        """The backend's name, "auto" where each call's device picks it."""
        if self.backend is None or isinstance(self.backend, str):
            return self.backend or "auto"
        return getattr(self.backend, "name", type(self.backend).__name__)

    def sibling(self, spec: Attention, options: PlanOptions | None = None) -> "Kernel":
        """A kernel for `spec` with this one's backend, options (unless given) and determinism."""
        return Kernel(spec, self.backend, options or self.options, self.deterministic)

    def __repr__(self) -> str:
        return f"attnc.Kernel({self.spec.name!r}, backend={self.backend!r}, key={self.key[:12]})"
