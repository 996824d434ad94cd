"""Training: every attnc call that torch.compile traces runs as the custom op `attnc::attention` (torch.library),
with a fake implementation for tracing and a registered autograd formula whose backward is the op
`attnc::attention_backward`, the backend's kernels for the IR's derivative (passes/grad.py). An eager call that needs
gradients runs the same kernels through a plain autograd.Function (`_Eager`), which costs less host time than the
ops' dispatch. The forward saves out and lse (never an N x N matrix).

An op takes the kernel as a string: the key of an `_Entry` registered here when a Kernel first runs through the
op, so that a traced graph names the kernel as a constant. Params cross the op as floats (every i32 param is
exact in a double) in one float64 CPU tensor (a list of floats would be a pytree whose shape torch.compile
treats differently when empty), converted back by their declared types.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Callable, Sequence

import torch

from ..dsl.signature import Bound, bind
from ..errors import CallError, CompileError
from ..passes.grad import derive

_KERNELS: dict[str, "kernel.Kernel"] = {}  # by op key (register)
_ENTRIES: dict[str, "_Entry"] = {}  # made on a kernel's first call through the ops


class _Entry:
    """One kernel as the ops see it: its lse-returning forward, its backward launchers and the names of the
    float inputs that receive gradients."""

    def __init__(self, kernel: "kernel.Kernel"):
        self.spec = kernel.spec
        # The forward always returns lse, which the backward reads; a spec without lse gets a sibling kernel.
        self.forward = kernel if kernel.spec.returns_lse else kernel.sibling(replace(kernel.spec, returns_lse=True))
        self.deterministic = kernel.deterministic
        self.input_names = tuple(t.name for t in self.spec.inputs)
        self.tables = derive(self.spec).tables
        self._backwards: dict[tuple, Callable] = {}

    def kwargs(self, inputs: Sequence[torch.Tensor], params: torch.Tensor) -> dict[str, object]:
        kwargs: dict[str, object] = dict(zip(self.input_names, inputs))
        for decl, value in zip(self.spec.params, params.tolist()):
            kwargs[decl.name] = bool(value) if decl.dtype == "bool" else int(value) if decl.dtype == "i32" else value
        return kwargs

    def backward(self, q, k, v, kwargs, out, lse, dout, dlse, deterministic: bool) -> dict[str, torch.Tensor]:
        return self.backward_bound(bind(self.forward.spec, q, k, v, kwargs), out, lse, dout, dlse, deterministic)

    def backward_bound(self, bound: Bound, out, lse, dout, dlse, deterministic: bool,
                       tables: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """`backward` of a call bound already (by the spec or its lse sibling: bind() reads neither's returns_lse);
        `tables`: the float inputs whose gradients the caller wants (None: all; the backends may skip the others)."""
        q, sizes = bound.q, bound.sizes
        where = (q.device, sizes["D"], sizes["DV"])
        grads = self._backwards.get(where)
        if grads is None:
            backend = self.forward.backend_for(q.device)
            build = getattr(backend, "build_backward", None)
            if build is None:
                raise CompileError(f"attention {self.spec.name!r}: backend {getattr(backend, 'name', backend)!r} "
                                   f"has no backward kernels here (ahead-of-time artifacts run forward only); "
                                   f"train with a kernel from attnc.compile on CPU (tvm) or CUDA (triton) tensors")
            grads = self._backwards[where] = build(self.forward.plan(q.device, sizes["D"], sizes["DV"]))
        return grads(bound, out, lse, dout, dlse, deterministic, tables)


def register(kernel: "kernel.Kernel") -> str:
    """The ops' name for `kernel` (computed where the kernel is made, so that torch.compile's tracing of a call
    only reads it): the same spec, backend, options and determinism share one name and one entry."""
    text = f"{kernel.spec.key}|{kernel.backend_name}|{kernel.options!r}|{kernel.deterministic}"
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    _KERNELS.setdefault(key, kernel)
    return key


def _entry(key: str) -> _Entry:
    entry = _ENTRIES.get(key)
    if entry is None:
        if key not in _KERNELS:
            raise CompileError(f"attnc::attention: no kernel {key!r} in this process; a graph that calls attnc "
                               f"ops runs where its kernels were made with attnc.compile")
        entry = _ENTRIES[key] = _Entry(_KERNELS[key])
    return entry


# ---------------------------------------------------------------- the ops


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention_op(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                 params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of kernel `key`."""
    entry = _entry(key)
    qkv = (q, k) if entry.spec.shares_kv else (q, k, v)  # (latent attention: v is k, and the kernel takes no v)
    out, lse = entry.forward(*qkv, **entry.kwargs(inputs, params))
    return out.contiguous(), lse.contiguous()  # the strides the fake promises (torch.compile checks them)


@attention_op.register_fake
def _attention_fake(key, q, k, v, inputs, params):
    spec = _entry(key).spec
    sizes = dict(zip(spec.q.shape, q.shape))
    sizes["DV"] = dict(zip(spec.v.shape, v.shape))[spec.value_dim]
    out = q.new_empty([sizes["DV"] if name == "D" else sizes[name] for name in spec.q.shape])
    lse_dims = ("H", "T") if spec.q_storage is not None else ("B", "H", "M")
    return out, q.new_empty([sizes[name] for name in lse_dims], dtype=torch.float32)


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def attention_backward_op(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                          params: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                          dlse: torch.Tensor | None, deterministic: bool) -> list[torch.Tensor]:
    """[dq, dk, dv, then the gradient of each float input the score or sink reads (_Entry.tables)]."""
    entry = _entry(key)
    kwargs = entry.kwargs(inputs, params)
    grads = entry.backward(q, k, v, kwargs, out, lse, dout, dlse, deterministic)
    tensors = {"q": q, "k": k, "v": v, **kwargs}
    return [_strided_like(grads[name], tensors[name]) for name in ("q", "k", "v", *entry.tables)]


def _strided_like(grad: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`grad` with torch.empty_like(tensor)'s strides, which the fake gives (a copy only where they differ)."""
    like = torch.empty_like(tensor)
    return grad if grad.stride() == like.stride() else like.copy_(grad)


@attention_backward_op.register_fake
def _attention_backward_fake(key, q, k, v, inputs, params, out, lse, dout, dlse, deterministic):
    entry = _entry(key)
    by_name = dict(zip(entry.input_names, inputs))
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *(torch.empty_like(by_name[name]) for name in entry.tables)]


def _setup_context(ctx, inputs, output):
    key, q, k, v, tensors, params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.key, ctx.params = key, params


def _backward_mode(entry: _Entry, dlse):
    """(deterministic, dlse) of a backward call: the kernel's choice or torch's deterministic-algorithms flag, and
    no lse gradient where the caller never saw lse."""
    deterministic = entry.deterministic
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return deterministic, dlse if entry.spec.returns_lse else None


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    entry = _entry(ctx.key)
    deterministic, dlse = _backward_mode(entry, dlse)
    grads = attention_backward_op(ctx.key, q, k, v, tensors, ctx.params, out, lse, dout.contiguous(), dlse,
                                  deterministic)
    by_name = dict(zip(entry.tables, grads[3:]))
    input_grads = [by_name.get(name) for name in entry.input_names]
    return None, grads[0], grads[1], grads[2], input_grads, None


def _no_double_backward(ctx, *grads):
    raise CallError("attnc computes first derivatives only: double backward (a gradient of a gradient, e.g. "
                     "torch.autograd.grad(..., create_graph=True) then .backward()) is not supported; detach the "
                     "first gradient or use attnc.reference for higher derivatives")


attention_op.register_autograd(_backward, setup_context=_setup_context)
attention_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------- the call


def needs_op(q, k, v, kwargs: dict, input_names: tuple[str, ...] | None = None) -> bool:
    """Whether a call must run through the op: torch.compile is tracing it, or autograd must record it.
    `input_names`: the tensor keywords, where the caller has read a call_key (so q, k, v and these are tensors, and
    any other keyword is a param, which bind() refuses as a tensor); None: any argument may be a tensor."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    if input_names is not None:
        try:  # the common case, without a generator: this runs on every call
            return q.requires_grad or k.requires_grad or v.requires_grad \
                or bool(input_names) and any(kwargs[name].requires_grad for name in input_names)
        except AttributeError:
            pass  # tensor-like, not a tensor
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, *kwargs.values()))


def call(kernel: "kernel.Kernel", q, k, v, kwargs: dict):
    """kernel(q, k, v, **kwargs) through the op: out, or (out, lse) as the spec returns."""
    spec = kernel.spec
    traced = torch.compiler.is_compiling()
    # argument errors as CallErrors before the op (torch.compile: at run time); the eager path's forward and
    # backward take this bound call, not a bind of their own
    bound = None if traced else bind(spec, q, k, v, kwargs)
    if kernel.forward_only and torch.is_grad_enabled():
        wanting = next((name for name, t in (("q", q), ("k", k), ("v", v), *kwargs.items())
                        if isinstance(t, torch.Tensor) and t.requires_grad), None)
        if wanting is not None:
            what = ("multi-head latent attention" if spec.is_latent else "attention over FP8 K/V (dequant)"
                    if spec.dequant else "attention over quantised queries (quantize)")
            raise CallError(f"{wanting}: requires grad, but attention {spec.name!r} is {what}, which has no backward "
                            f"kernels yet (forward only); call it under torch.no_grad() or pass {wanting}.detach()")
    key = kernel.op_key
    inputs = [kwargs[t.name] for t in spec.inputs]
    if traced:
        params = torch.tensor([kwargs[p.name] if p.name in kwargs else p.default for p in spec.params],
                              dtype=torch.float64)
        out, lse = attention_op(key, q, k, v, inputs, params)
    else:
        out, lse = _Eager.apply(_entry(key), kwargs, bound, q, k, v, *inputs)
    return (out, lse) if spec.returns_lse else out


class _Eager(torch.autograd.Function):
    """The ops' forward and backward outside torch.compile, without torch.library's dispatch: a custom-op pair cost
    ~120 us more host time per training step than this on the CPU machine (~0.3 ms on the H100's host, where short
    training steps are host-bound: benchmarks/NOTES.md, issue 12, causal S = 1k). Same kernels, same gradients."""

    @staticmethod
    def forward(ctx, entry: _Entry, kwargs: dict, bound: Bound, q, k, v, *inputs):
        out, lse = entry.forward.call(q, k, v, kwargs, bound=bound)  # v is k where the values are the keys
        out, lse = out.contiguous(), lse.contiguous()
        ctx.save_for_backward(q, k, v, out, lse, *inputs)
        ctx.entry, ctx.bound = entry, bound
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an output the loss does not read
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # all unpacked, read from ctx.bound: the unpacking is torch's check that none was written in place since
        q, _, _, out, lse, *_ = ctx.saved_tensors
        entry = ctx.entry
        deterministic, dlse = _backward_mode(entry, dlse)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        # forward's arguments: entry, kwargs, bound, q, k, v, then the spec's inputs
        tables = [name for name, needed in zip(entry.input_names, ctx.needs_input_grad[6:]) if needed]
        with torch.no_grad():
            grads = entry.backward_bound(ctx.bound, out, lse, dout, dlse, deterministic, tables)
        wanted = [grads["q"], grads["k"], grads["v"], *(grads.get(name) for name in entry.input_names)]
        if torch.is_grad_enabled():  # create_graph=True: the gradients' own backward is a clear error
            leaves = [g for g in wanted if g is not None]
            firsts = iter(_FirstOrderOnly.apply(q, *leaves))
            wanted = [None if g is None else next(firsts) for g in wanted]
        return None, None, None, *wanted


class _FirstOrderOnly(torch.autograd.Function):
    """The gradients of an _Eager call under create_graph=True, as they are, with a backward that says attnc computes
    first derivatives only (`anchor`, an input that requires grad, makes them part of the graph)."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


def gradients(kernel: "kernel.Kernel", q, k, v, kwargs: dict, out, lse, dout, dlse,
              deterministic: bool | None = None) -> dict[str, torch.Tensor]:
    """The backward kernels of one call of `kernel`, outside autograd: {"q", "k", "v", each float table of
    derive(spec).tables: its gradient}. `out` and `lse` are the rows' results the weights are normalised by: for a
    call over part of the keys (attnc.distributed's shard pairs) the merged ones over all keys, so that each part's
    gradients add up to the whole's. deterministic None follows the kernel, then torch."""
    entry = _entry(kernel.op_key)
    if deterministic is None:
        deterministic = entry.deterministic
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return entry.backward(q, k, v, kwargs, out, lse, dout, dlse, deterministic)
