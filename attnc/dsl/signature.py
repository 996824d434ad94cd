"""Binding a call's arguments to a spec. Every kernel and the reference check their arguments here.

This runs on every kernel call, so it reads only shapes, dtypes and devices: no host-device sync, and
error text is built only when there is an error.

Empty problems: M = 0 gives an empty output, N = 0 gives rows with no kept key (out = 0, lse = -inf, or
the sink's logit when there is a sink). Every other size must be at least 1.

Ragged and paged storage (docs/serving.md): the sizes come from shapes alone, so B is derived from the block
table, the lengths or the offsets (B1 = B + 1), and M and N are capacities that bound every sequence's own
length: M = T for a ragged q, N = TK for ragged k/v, N = MAXP * PAGE for a paged cache. The offsets, lengths
and page ids themselves are data, untrusted: `reference` checks them, kernels check what they read on the device
(attnc/index_data.py).
"""
from __future__ import annotations

import difflib
import inspect
import numbers
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Callable, Mapping, Union

import torch

from ..errors import CallError, call_error
from ..ir import FP8_DTYPES, POSITION_LIMIT, Attention, ParamDecl, Ragged, TensorDecl, storage_capacities

TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
    "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool,
    "f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2,
})
MAY_BE_EMPTY = ("M", "N", "T", "TK")  # T and TK are the M and N of packed sequences
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_PARAM_KIND = {"i32": "an int", "f32": "a float (or an int)", "bool": "a bool"}
# q, k, v in canonical order: batch (or page), heads, sequence (or tokens, or page slot), head dim, whatever order
# the declaration uses.
_ROLE_RANK = {"B": 0, "PAGES": 0, "H": 1, "HKV": 1, "M": 2, "N": 2, "T": 2, "TK": 2, "PAGE": 2, "D": 3, "DV": 3}

ParamValue = Union[int, float, bool]


@dataclass(frozen=True)
class Bound:
    """A checked call: the tensors plus every size, param and input by name."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sizes: Mapping[str, int]  # every role (HKV = H, DV = D when unused) and every free size
    params: Mapping[str, ParamValue]  # every param, defaults filled in, as Python int / float / bool
    inputs: Mapping[str, torch.Tensor]  # every declared input tensor (the storage's index tensors included)
    lse_dims: tuple[str, ...] = ("B", "H", "M")  # lse's sizes: [H, T] for a ragged q, as FlashAttention's varlen


def bind(spec: Attention, q, k, v, kwargs: Mapping[str, object]) -> Bound:
    """Check a call against `spec`; raise CallError naming the argument and what was expected."""
    _check_keywords(spec, kwargs)
    tensors = [(spec.q, q), (spec.k, k), (spec.v, v)]
    for decl in spec.inputs:
        if decl.name not in kwargs:
            raise CallError(f"{decl.name}: missing input tensor {_decl_text(decl)}; pass {decl.name}=<tensor>")
        tensors.append((decl, kwargs[decl.name]))
    sizes = _bind_sizes(spec, tensors)
    params = {p.name: _param_value(p, kwargs) for p in spec.params}
    inputs = {decl.name: t for decl, t in tensors[3:]}
    lse_dims = ("H", "T") if spec.q_storage is not None else ("B", "H", "M")
    return Bound(q, k, v, MappingProxyType(sizes), MappingProxyType(params), MappingProxyType(inputs), lse_dims)


def call_key(q, k, v, kwargs: Mapping[str, object], input_names: tuple[str, ...]) -> tuple:
    """What bind() and the launch derive from a call, apart from param values and data pointers: every tensor's
    shape, strides, dtype and device, and the keyword names. Raises AttributeError / KeyError for arguments that
    are not tensors or a missing input. The per-call key of prepared launches (runtime/kernel.py) and of the
    front-ends' look-ups, which pass it on so that a call reads it once."""
    key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           k.device, v.device, *kwargs)
    return key + _inputs_key(kwargs, input_names) if input_names else key


def call_key_of_inputs(kwargs: Mapping[str, object], input_names: tuple[str, ...]) -> tuple:
    """What call_key adds to `call_key(q, k, v, {}, ())` for these keywords and inputs:
    `call_key(q, k, v, kwargs, names) == call_key(q, k, v, {}, ()) + call_key_of_inputs(kwargs, names)`."""
    return (*kwargs, *_inputs_key(kwargs, input_names))


def _inputs_key(kwargs: Mapping[str, object], input_names: tuple[str, ...]) -> tuple:
    key = ()
    for name in input_names:
        t = kwargs[name]
        key += (t.shape, t.stride(), t.dtype, t.device)
    return key


def call_usage(spec: Attention) -> str:
    """How a kernel of `spec` is called: `name(q, k, v, *, window: i32 = 4096, slopes: f32[H])`, or `name(q, k,
    ...)` where the values are the keys."""
    named = [f"{t.name}: {_decl_text(t)}" for t in spec.inputs]
    named += [f"{p.name}: {p.dtype}" + ("" if p.default is None else f" = {p.default}") for p in spec.params]
    return f"{spec.name}(q, k{'' if spec.shares_kv else ', v'}{', *, ' if named else ''}{', '.join(named)})"


def positional_qkv(spec: Attention, args: tuple, kwargs: Mapping[str, object]) -> tuple:
    """q, k, v of a call `kernel(*args, **kwargs)`: `(q, k, v)`, or `(q, k)` where the values are the keys (then v
    is k, one tensor that the kernels read once)."""
    if spec.shares_kv and len(args) == 2:
        return (*args, args[1])
    if len(args) == 3 and not spec.shares_kv:
        return args
    if spec.shares_kv and len(args) == 3:
        raise CallError(f"v: attention {spec.name!r} returns `@ k` (the keys are the values), so it takes no v; call "
                        f"it as {call_usage(spec)}")
    raise qkv_call_error(args, kwargs, lambda: call_usage(spec))


_QKV_CALL = [*(inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in ("q", "k", "v")),
             inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]


def qkv_call_error(args: tuple, kwargs: Mapping[str, object], usage: Callable[[], str]) -> CallError:
    """The CallError of a call `kernel(*args, **kwargs)` whose positional arguments are not q, k, v. Kernels take
    `*args` and check `len(args) == 3` themselves: cheaper per call than a wrapper (attnc.errors.checks_arguments)."""
    return call_error(_QKV_CALL, args, dict(kwargs), usage) or CallError(f"call it as {usage()}")


def out_shape(spec: Attention, bound: Bound) -> tuple[int, ...]:
    """The output has q's layout with DV in place of D."""
    return tuple(bound.sizes["DV" if name == "D" else name] for name in spec.q.shape)


def lse_shape(bound: Bound) -> tuple[int, ...]:
    """lse is f32 [B, H, M] whatever the layout of q; [H, T] when q is ragged."""
    return tuple(bound.sizes[name] for name in bound.lse_dims)


def canonical_view(t: torch.Tensor, decl: TensorDecl) -> torch.Tensor:
    """A q/k/v-shaped tensor (or the output, in q's layout, or a tensor of a dot product, whose head dim may have a
    name of its own) as [B, heads, sequence, head dim]; no copy. A k without a head axis (one K/V head, and the
    tensors shaped like it) gets one of size 1."""
    order, head_axis = _canonical_axes(decl.shape)
    view = t if order is None else t.permute(*order)
    return view if head_axis is None else view.unsqueeze(head_axis)


@lru_cache(maxsize=None)
def _canonical_axes(shape: tuple[str, ...]) -> tuple[tuple[int, ...] | None, int | None]:
    """canonical_view's permutation (None: the declared order is canonical) and the axis of the size-1 head dim it
    adds (None: the declaration has one), per declared shape: read a few times per call on the launch path."""
    order = tuple(sorted(range(len(shape)), key=lambda axis: _ROLE_RANK.get(shape[axis], 3)))
    head_axis = None if {"H", "HKV"} & set(shape) else 1 if {"B", "PAGES"} & set(shape) else 0
    return (None if order == tuple(range(len(shape))) else order), head_axis


# ---------------------------------------------------------------- checks


def _decl_text(decl: TensorDecl) -> str:
    return f"{decl.dtype}[{', '.join(decl.shape)}]"


def _check_keywords(spec: Attention, kwargs: Mapping[str, object]) -> None:
    known = [p.name for p in spec.params] + [t.name for t in spec.inputs]
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            takes = ", ".join(known) if known else "no keyword arguments"
            raise CallError(f"{name}: unknown argument for attention {spec.name!r}{hint} (it takes: {takes})")


def _check_tensor(decl: TensorDecl, t: object, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise CallError(f"{decl.name}: expected a torch.Tensor {_decl_text(decl)}, got {type(t).__name__}")
    want = TORCH_DTYPES[decl.dtype]
    if t.dtype != want:
        fp8 = (f" (an FP8 cache is declared so: {decl.name}: f8e4m3[{', '.join(decl.shape)}], with `dequant "
               f"{decl.name} by SCALE`)" if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and decl.dtype not in FP8_DTYPES else "")
        raise CallError(f"{decl.name}: expected dtype {decl.dtype} ({want}) as declared {_decl_text(decl)}, "
                        f"got {t.dtype}; convert with .to({want}){fp8}")
    if t.dim() != len(decl.shape):
        raise CallError(f"{decl.name}: expected {len(decl.shape)} dims [{', '.join(decl.shape)}], "
                        f"got {t.dim()} dims with shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise CallError(f"{decl.name}: is on {t.device} but q is on {device}; put every tensor on one device")


def _bind_sizes(spec: Attention, tensors: list[tuple[TensorDecl, object]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    device = None
    for decl, t in tensors:
        _check_tensor(decl, t, device)
        device = t.device
        for name, n in zip(decl.shape, t.shape):
            if sizes.setdefault(name, n) != n:
                raise CallError(f"{_where(name, tensors)} but {_where(name, tensors, n)}; "
                                f"every size named {name} must agree")
    for name, value in spec.dims:
        if sizes.setdefault(name, value) != value:
            raise CallError(f"{_where(name, tensors)} but the spec binds {name} = {value} at compile time "
                            f"(dims {name} = {value}); pass tensors with {name} = {value} or drop it from dims")
    _bind_storage_sizes(spec, sizes, tensors)
    if spec.one_kv_head and sizes.setdefault("HKV", 1) != 1:
        raise CallError(f"{_where('HKV', tensors)}, but k has no head axis: one K/V head, HKV = 1")
    sizes.setdefault("HKV", sizes["H"])
    sizes.setdefault("DV", sizes["D"])
    for name, n in sizes.items():
        if n < 1 and name not in MAY_BE_EMPTY:
            raise CallError(f"{_where(name, tensors, n)}; every size but M and N must be at least 1")
    for name in ("M", "N"):
        if sizes[name] > POSITION_LIMIT:
            raise CallError(f"{_where(name, tensors, sizes[name])}; attnc's kernels take at most 2^30 "
                            f"({POSITION_LIMIT:,}) positions a sequence (int32 position arithmetic): split the sequence")
    if sizes["H"] % sizes["HKV"]:
        raise CallError(f"k: {sizes['HKV']} key/value heads (HKV) do not divide the {sizes['H']} query heads (H) of "
                        f"q; H must be a multiple of HKV")
    return sizes


def _bind_storage_sizes(spec: Attention, sizes: dict[str, int], tensors: list[tuple[TensorDecl, object]]) -> None:
    """B from the offsets when no tensor has a batch axis (B1 = B + 1), and the capacities M and N."""
    ragged = [st for st in (spec.q_storage, spec.kv_storage) if isinstance(st, Ragged)]
    if ragged:
        offsets = ragged[0].offsets
        if "B" not in sizes:
            sizes["B"] = sizes["B1"] - 1
            if sizes["B"] < 1:
                raise CallError(f"{offsets}: has {sizes['B1']} offset{'s' if sizes['B1'] != 1 else ''}, so no "
                                f"sequence; the offsets of B sequences are B + 1 numbers, 0 first and the token "
                                f"count last")
        elif sizes["B1"] != sizes["B"] + 1:
            raise CallError(f"{offsets}: has {sizes['B1']} offsets, so {sizes['B1'] - 1} sequences, but "
                            f"{_where('B', tensors)}; the offsets of B sequences are B + 1 numbers")
    storage_capacities(spec.q_storage, spec.kv_storage, sizes)


def _where(name: str, tensors: list[tuple[TensorDecl, object]], size: int | None = None) -> str:
    """'k: dim 2 (N) is 100': the first tensor axis named `name` (and of `size`, when given). Used only to
    word an error, so that bind's fast path keeps no positions."""
    for decl, t in tensors:
        if isinstance(t, torch.Tensor):
            for axis, (dim, n) in enumerate(zip(decl.shape, t.shape)):
                if dim == name and size in (None, n):
                    return f"{decl.name}: dim {axis} ({name}) is {n}"
    return f"{name} is {size}"


def _param_value(p: ParamDecl, kwargs: Mapping[str, object]) -> ParamValue:
    if p.name not in kwargs:
        if p.default is None:
            raise CallError(f"{p.name}: missing param ({p.dtype}, no default); pass {p.name}=<value>")
        return _coerce_param(p, p.default)
    return _coerce_param(p, kwargs[p.name])


def _coerce_param(p: ParamDecl, value: object) -> ParamValue:
    if isinstance(value, torch.Tensor):
        raise CallError(f"{p.name}: param {p.dtype} wants {_PARAM_KIND[p.dtype]} (a Python value), got a "
                        f"torch.Tensor; pass a number ({p.name}=t.item() reads it, at the cost of a host-device "
                        f"sync) or declare it as an input tensor (input {p.name}: {p.dtype}[...]) and look it up")
    if p.dtype == "bool" and isinstance(value, bool):
        return value
    if not isinstance(value, bool):  # bool is an int subclass but never a number here
        if p.dtype == "i32" and isinstance(value, numbers.Integral):
            if not _I32_MIN <= value <= _I32_MAX:
                raise CallError(f"{p.name}: param i32 value {value} does not fit in 32 bits")
            return int(value)
        if p.dtype == "f32" and isinstance(value, numbers.Real):
            return float(value)
    raise CallError(f"{p.name}: param {p.dtype} wants {_PARAM_KIND[p.dtype]}, got {type(value).__name__} {value!r}")
