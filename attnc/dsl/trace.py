"""The `@attnc.attention` decorator: a Python function traced into the same IR as the text language.

    @attnc.attention
    def alibi_doc(q, k, v, *, slopes: attnc.Tensor, doc: attnc.Tensor, cap: float = 50.0):
        s = (q @ k) * q.D ** -0.5
        s = cap * attnc.tanh(s / cap) + slopes[q.head] * (k.pos - q.pos)
        keep = attnc.causal(q, k) & (doc[q.batch, q.pos] == doc[k.batch, k.pos])
        return attnc.softmax(s, where=keep) @ v      # or attnc.sigmoid(s, where=keep) @ v: sigmoid attention

The function runs once per call signature (q/k/v dtypes, whether K/V have their own head count, whether v
has its own head dim, input dtypes) with symbolic arguments; the spec it builds is compiled by
`attnc.compile` and cached. Python values it reads from globals are constants baked in at that trace:
make a value a keyword parameter (a runtime `param`) to change it without re-tracing.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from typing import Callable, Mapping, overload

import torch

from ..errors import CallError, Diagnostic, TraceError
from ..ops import UNARY_FUNCTIONS
from ..ir import (
    NORMALIZERS, QK, ROLES, Attention, Dequant, Expr, IndexVar, Normalizer, ParamDecl, ParamRef, SizeRef, Sigmoid, Softmax,
    Quantize, TensorDecl, causal_mask, dtype_kind, make_attention, print_expr, walk,
)
from . import compiler, symbolic
from .check import check_attention, number_problem, spec_name
from .signature import call_key, qkv_call_error
from .symbolic import LAYOUTS, Sym, as_expr, function_span, trace_error, user_span


class Tensor:
    """Annotation of a keyword-only argument that is an extra input tensor (`input` in the text language):
    `def f(q, k, v, *, slopes: attnc.Tensor)`. Index it with traced indices: `slopes[q.head]`."""


# ---------------------------------------------------------------- q, k, v and inputs inside the trace

_POSITION = {"q": "i", "k": "j", "v": "j"}
_QKV_HELP = ("q.pos, k.pos (query / key position), q.head, q.batch, the sizes q.B, q.H, k.HKV, q.M, k.N, q.D, "
             "v.DV, and q @ k")


class TracedTensor:
    """q, k or v inside a traced function: index variables by role, sizes by role name, and `q @ k`."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    @property
    def pos(self) -> Sym:
        return Sym(IndexVar(_POSITION[self.name], span=user_span()), "int")

    @property
    def batch(self) -> Sym:
        return Sym(IndexVar("b", span=user_span()), "int")

    @property
    def head(self) -> Sym:
        if self.name != "q":
            raise trace_error(f"{self.name}.head: the key/value head is derived from the query head "
                              f"(h // (H // HKV)); use q.head")
        return Sym(IndexVar("h", span=user_span()), "int")

    def __getattr__(self, name: str) -> Sym:
        if name in ROLES:
            return Sym(SizeRef(name, span=user_span()), "int")
        if name.startswith("__"):
            raise AttributeError(name)
        raise trace_error(f"{self.name}.{name} cannot be traced; available: {_QKV_HELP}")

    def __matmul__(self, other) -> Sym:
        if self.name == "q" and isinstance(other, (TracedTensor, InputTensor)) and other.name != "v":
            return _dot(self, other)
        raise trace_error(f"only q @ k (the scores), dot products of tensors shaped like q and like k (latent "
                          f"attention: qr @ kr) and p @ v (with p = {_WEIGHT_FUNCTIONS}) can be traced")

    def __rmatmul__(self, other):
        raise trace_error(f"only the weights of a normalizer multiply {self.name}: p @ v with p = "
                          f"{_WEIGHT_FUNCTIONS}")

    def __bool__(self):
        raise trace_error(f"{self.name} is symbolic inside a traced function and has no truth value")


@dataclass(frozen=True)
class InputTensor:
    """An `attnc.Tensor` argument inside a traced function: index it to look values up."""

    name: str
    dtype: str
    ndim: int

    def __getitem__(self, index) -> Sym:
        return symbolic.lookup(self.name, self.dtype, self.ndim, index)

    def __matmul__(self, other) -> Sym:
        """`qr @ kr`: a dot product of latent attention, this tensor shaped like q and `other` like k."""
        if isinstance(other, (TracedTensor, InputTensor)) and other.name != "v":
            return _dot(self, other)
        raise trace_error(f"{self.name} @ ...: a dot product takes a tensor shaped like k on the right")


def _dot(query, key) -> Sym:
    """The symbolic score of one (query, key) pair of a dot product (the checker checks its sides and dims)."""
    return Sym(QK(query.name, key.name, span=user_span()), "float")


# How the normalizers are called here, for messages: "attnc.softmax(...) or attnc.sigmoid(...)".
_WEIGHT_FUNCTIONS = " or ".join(f"attnc.{name}(...)" for name in NORMALIZERS)


@dataclass(frozen=True, eq=False)
class Probabilities:
    """The weights of a normalizer (`attnc.softmax(score, where=..., sink=...)`, `attnc.sigmoid(score, where=...)`):
    multiply by v to return them; `.lse` is the log of the row's total weight (ir.Normalizer)."""

    score: Expr
    masks: tuple[Expr, ...]
    normalizer: Normalizer

    def __matmul__(self, other) -> "Output":
        if not (isinstance(other, TracedTensor) and other.name in ("v", "k")):
            name = self.normalizer.name
            raise trace_error(f"{name} weights multiply the value tensor: write `attnc.{name}(s) @ v` (or `@ k` "
                              f"where the keys are the values and the function takes no v)")
        return Output(self, other.name)

    @property
    def lse(self) -> "Lse":
        return Lse(self)


@dataclass(frozen=True)
class Output:
    probabilities: Probabilities
    value: str = "v"  # k: the values are the keys


@dataclass(frozen=True)
class Lse:
    probabilities: Probabilities


# ---------------------------------------------------------------- functions used inside a traced function


def _weights(normalizer: Normalizer, score, where) -> Probabilities:
    score_expr, kind = as_expr(score)
    if kind == "bool":
        raise trace_error(f"the score given to {normalizer.name} is a boolean; pass conditions as where=...")
    masks = ()
    if where is not None:
        mask, kind = as_expr(where)
        if kind != "bool":
            raise trace_error(f"{normalizer.name}(where=...) takes a condition (a comparison), got {kind}")
        masks = (mask,)
    return Probabilities(score_expr, masks, normalizer)


def softmax(score, *, where=None, sink=None) -> Probabilities:
    """softmax of `score` over the keys where `where` holds; `sink` (one logit per row) joins the denominator."""
    return _weights(Softmax(None if sink is None else as_expr(sink)[0]), score, where)


class SigmoidWeights(Sym):
    """`attnc.sigmoid(s)`: the elementwise sigmoid of a traced value and, multiplied by v, the sigmoid normalizer
    (sigmoid attention: weights sigmoid(s_j), rows not normalised)."""

    __slots__ = ("score", "_as_weights")

    def __init__(self, *args):
        value = _sigmoid(*args)  # checks the arguments
        super().__init__(value.expr, value.kind)
        self.score, self._as_weights = args[0], None

    def weights(self) -> Probabilities:
        """The same object each time, so that `p @ v, p.lse` return one normalizer's outputs."""
        if self._as_weights is None:
            self._as_weights = _weights(Sigmoid(), self.score, None)
        return self._as_weights

    def __matmul__(self, other) -> "Output":
        return self.weights() @ other

    @property
    def lse(self) -> "Lse":
        return self.weights().lse


def sigmoid(*args, where=None):
    """sigmoid(x) of a traced value. As the returned weights, `attnc.sigmoid(s) @ v` or
    `attnc.sigmoid(s, where=keep) @ v`, it is sigmoid attention: each kept key weighs sigmoid(s_j), with no row
    normalisation; `where` (a condition) keeps the keys where it holds."""
    if where is None:
        return SigmoidWeights(*args)
    if len(args) != 1:
        raise trace_error(f"attnc.sigmoid(score, where=...) takes one score, got {len(args)} arguments")
    return _weights(Sigmoid(), args[0], where)


def causal(q: TracedTensor, k: TracedTensor) -> Sym:
    """The bottom-right aligned causal mask, `mask causal` in the text language (decode sees every key)."""
    if not (isinstance(q, TracedTensor) and q.name == "q" and isinstance(k, TracedTensor) and k.name == "k"):
        raise trace_error("attnc.causal takes the traced q and k: attnc.causal(q, k)")
    return Sym(replace(causal_mask(), span=user_span()), "bool")


def where(cond, a, b) -> Sym:
    """`a` where `cond` holds, else `b`."""
    return symbolic.where(cond, a, b)


def _math(fn: str, name: str, arity: int = 1):
    def apply(*args):
        if len(args) != arity:
            raise trace_error(f"attnc.{name} takes {arity} argument{'s' if arity > 1 else ''}, got {len(args)}")
        return symbolic.call(fn, *args)
    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = f"`{fn}` of the IR, applied to traced values."
    return apply


# attnc.exp, attnc.tanh, attnc.erf, ...: one per function of one operand in the operator table (ops.py); sigmoid,
# which is also a normalizer, dispatches through `sigmoid` above.
globals().update({fn: _math(fn, fn) for fn in UNARY_FUNCTIONS if fn != "sigmoid"})
_sigmoid = _math("sigmoid", "sigmoid")
minimum = _math("min", "minimum", 2)
maximum = _math("max", "maximum", 2)


# ---------------------------------------------------------------- the decorator

_ANNOTATIONS = {Tensor: "tensor", torch.Tensor: "tensor", float: "f32", int: "i32", bool: "bool",
                "attnc.Tensor": "tensor", "Tensor": "tensor", "torch.Tensor": "tensor",
                "float": "f32", "int": "i32", "bool": "bool"}


@overload
def attention(fn: Callable[..., object], *, layout: str = "BHSD", backend: str | None = None,
              dequant: Mapping[str, str] | None = None,
              quantize: Mapping[str, str] | None = None) -> AttentionFunction:
    ...
@overload
def attention(fn: None = None, *, layout: str = "BHSD", backend: str | None = None,
              dequant: Mapping[str, str] | None = None,
              quantize: Mapping[str, str] | None = None) -> Callable[[Callable[..., object]], AttentionFunction]: ...


def attention(fn: Callable[..., object] | None = None, *, layout: str = "BHSD", backend: str | None = None,
              dequant: Mapping[str, str] | None = None, quantize: Mapping[str, str] | None = None):
    """Trace `fn(q, k, v, *, inputs..., params...)` into an attention spec, compiled on first call.

    `layout` is the tensors' memory order ("BHSD" or "BSHD"); `backend` goes to `attnc.compile`; `dequant` maps
    an FP8 cache (k, v, or a key-side input of a dot product) to the argument holding its dequant scale, a float
    param or an attnc.Tensor of one scale per K/V head: `dequant={"k": "k_scale", "v": "v_scale"}` is the text
    language's `dequant k by k_scale` and `dequant v by v_scale`. `quantize` maps query-side tensors (q, or the
    query side of a dot product) to the dtype their rows are quantised to: `quantize={"q": "f8e4m3", "qr":
    "f8e4m3"}` is `quantize q, qr to f8e4m3` (docs/mla.md).
    """
    if layout not in LAYOUTS:
        raise CallError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    dequant = _names("dequant", dequant, "tensor name -> scale argument name", {"k": "k_scale"})
    quantize = _names("quantize", quantize, "query-side tensor name -> dtype", {"q": "f8e4m3"})

    def wrap(f):
        return AttentionFunction(f, layout, backend, dequant, quantize)

    return wrap if fn is None else wrap(fn)


def _names(argument: str, given, what: str, example: dict[str, str]) -> dict[str, str]:
    """A decorator argument that maps names to names (`dequant`, `quantize`), as a dict; a CallError otherwise."""
    if given is None:
        return {}
    if not (isinstance(given, Mapping) and all(isinstance(x, str) for pair in given.items() for x in pair)):
        raise CallError(f"{argument}: expected a dict of {what}, such as {example!r}, got {given!r}")
    return dict(given)


CALL_KEYS = 64  # call signatures (shapes, strides, ...) each decorated function keeps a direct look-up for


class AttentionFunction:
    """A decorated function. Calling it traces (once per signature), compiles (once per signature) and runs."""

    def __init__(self, fn, layout: str, backend: str | None, dequant: Mapping[str, str] | None = None,
                 quantize: Mapping[str, str] | None = None):
        self.fn = fn
        self.layout = layout
        self.backend = backend
        self._params, self._inputs, self._shares_kv = _declared_arguments(fn)
        self._dequant = dict(dequant or {})
        self._quantize = dict(quantize or {})
        # the tensors that may be FP8 (where the values are the keys, v is k)
        self._fp8 = set(self._dequant) | ({"v"} if self._shares_kv and "k" in self._dequant else set())
        for name in self._dequant.values():
            if name not in self._inputs and all(p.name != name for p in self._params):
                raise TraceError(Diagnostic(f"{fn.__name__}: dequant names the scale {name!r}, which is not one of its "
                                            f"keyword arguments; add `{name}: float` (one scale for the tensor) or "
                                            f"`{name}: attnc.Tensor` (one per K/V head)", function_span(fn)))
        self._heads_axis = LAYOUTS[layout][1]
        self._specs: dict[tuple, Attention] = {}
        self._compiled: dict[tuple, tuple[Attention, object]] = {}  # signature -> (spec, kernel)
        # call_key (over every declared input) -> (spec, kernel, the kernel's prepared launch for that key): a hit
        # reads each tensor's attributes and looks the key up once; kept where a launch was prepared
        self._calls: dict[tuple, tuple[Attention, object, object]] = {}
        self._last: Attention | None = None
        functools.update_wrapper(self, fn)

    @property
    def spec(self) -> Attention:
        """The spec traced for the last call's signature."""
        if self._last is None:
            name = self.fn.__name__
            raise CallError(f"{name}.spec: not traced yet; call {name}(q, k, v, ...) or {name}.trace(q, k, v, ...)")
        return self._last

    def trace(self, *args, **kwargs) -> Attention:
        """The spec for these tensors' signature, without compiling."""
        q, k, v = self._qkv(args, kwargs)
        for name in kwargs:
            if name not in self._inputs and not any(p.name == name for p in self._params):
                known = ", ".join([*self._inputs, *(p.name for p in self._params)]) or "no keyword arguments"
                raise CallError(f"{name}: unknown argument of {self.fn.__name__} (it takes: {known})")
        self._last = self._spec(self._signature(q, k, v, kwargs), q, k, v, kwargs)
        return self._last

    def __call__(self, *args, validate: bool = False, **kwargs):
        q, k, v = self._qkv(args, kwargs)
        key = None
        if not torch.compiler.is_compiling():  # traced, a key of every stride would make Dynamo guard on each
            try:
                key = call_key(q, k, v, kwargs, self._inputs)
                hit = self._calls.get(key)
            except (AttributeError, KeyError, TypeError):
                pass  # not tensors, or a missing input: _signature words the error
            else:
                if hit is not None:
                    self._last = hit[0]
                    return hit[1].call(q, k, v, kwargs, key, validate, hit[2])
        signature = self._signature(q, k, v, kwargs)
        entry = self._compiled.get(signature)
        if entry is None:
            spec = self._spec(signature, q, k, v, kwargs)
            entry = self._compiled[signature] = (spec, compiler.compile_spec(spec, backend=self.backend))
        spec, kernel = entry
        self._last = spec
        result = kernel.call(q, k, v, kwargs, key, validate)
        prepared = kernel.prepared_launch(key) if key is not None else None
        if prepared is not None:
            if len(self._calls) >= CALL_KEYS:
                self._calls.pop(next(iter(self._calls)), None)  # the oldest
            self._calls[key] = (spec, kernel, prepared)
        return result

    @property
    def usage(self) -> str:
        """How to call it: the function's name and signature."""
        return f"{self.fn.__name__}{inspect.signature(self.fn)}"

    def __repr__(self) -> str:
        return f"<attnc.attention {self.fn.__module__}.{self.fn.__qualname__} layout={self.layout}>"

    # -- internals

    def _qkv(self, args: tuple, kwargs: dict) -> tuple:
        """q, k, v of a call: (q, k, v), or (q, k) for a function that takes no v (its values are k), v = k."""
        if len(args) != (2 if self._shares_kv else 3):
            raise qkv_call_error(args, kwargs, lambda: self.usage)
        return (*args, args[1]) if self._shares_kv else args

    def _signature(self, q, k, v, kwargs) -> tuple:
        """What the trace depends on, read cheaply for the per-call look-up: dtypes, whether K/V have their own
        head count and v its own head dim, the input tensors' dtypes and ranks, and the last size of 4-dim inputs
        (the head dim of a latent dot product, which the trace binds as a compile-time size)."""
        try:
            q_shape, k_shape, v_shape, h = q.shape, k.shape, v.shape, self._heads_axis
            if not len(q_shape) == len(k_shape) == len(v_shape) == 4:
                raise IndexError
            signature = (q.dtype, k.dtype, v.dtype, k_shape[h] != q_shape[h], v_shape[3] != q_shape[3])
            if self._inputs:
                signature += tuple([(kwargs[name].dtype, kwargs[name].dim(),
                                     kwargs[name].shape[-1] if kwargs[name].dim() == 4 else None)
                                    for name in self._inputs])
            return signature
        except (AttributeError, KeyError, IndexError, TypeError):
            self._explain_bad_call(q, k, v, kwargs)
            raise

    def _explain_bad_call(self, q, k, v, kwargs) -> None:
        symbolic.qkv_decls(q, k, v, self.layout, dequantized=self._fp8)
        for name in self._inputs:
            if name not in kwargs:
                raise CallError(f"{name}: missing input tensor; pass {name}=<tensor>")
            if not isinstance(kwargs[name], torch.Tensor):
                raise CallError(f"{name}: expected a torch.Tensor, got {type(kwargs[name]).__name__}")

    def _spec(self, signature: tuple, q, k, v, kwargs) -> Attention:
        spec = self._specs.get(signature)
        if spec is None:
            spec = self._specs[signature] = self._traced(q, k, v, {name: kwargs[name] for name in self._inputs})
        return spec

    def _traced(self, q, k, v, tensors: dict[str, torch.Tensor]) -> Attention:
        q_decl, k_decl, v_decl = symbolic.qkv_decls(q, k, v, self.layout, dequantized=self._fp8)
        args = {p.name: Sym(ParamRef(p.name), dtype_kind(p.dtype)) for p in self._params}
        args.update({name: InputTensor(name, symbolic.ir_dtype(t, name), t.dim()) for name, t in tensors.items()})
        label = f"@attnc.attention function {self.fn.__name__!r}"
        tracer = symbolic.Tracer(label, capture_hint=" from outside; pass tensors as keyword arguments annotated attnc.Tensor")
        traced = [TracedTensor("q"), TracedTensor("k")] + ([] if self._shares_kv else [TracedTensor("v")])
        with symbolic.tracing(tracer):
            result = self.fn(*traced, **args)
        p, returns_lse, value = _returned(result, self.fn)
        span = function_span(self.fn)
        if (value == "k") != self._shares_kv:
            raise TraceError(Diagnostic(
                f"{self.fn.__name__} returns `p @ {value}`, but " + (
                    "takes no v: return `p @ k` (the keys are the values)" if self._shares_kv else
                    "takes v: return `p @ v`, or drop v from its arguments where the keys are the values"), span))
        inputs = symbolic.input_decls([p.score, *p.masks, p.normalizer.sink], tensors, span)
        inputs, dims = _dot_operands(p.score, inputs, tensors, q_decl, k_decl)
        scales = set(self._dequant.values())  # an input scale is one per K/V head
        inputs = tuple(replace(t, shape=("HKV",)) if t.name in scales and len(t.shape) == 1 else t for t in inputs)
        spec = make_attention(
            spec_name(self.fn.__name__, "traced_attention"), q_decl, k_decl, k_decl if self._shares_kv else v_decl,
            dims=dims, params=self._params, inputs=inputs, score=p.score, masks=p.masks, normalizer=p.normalizer,
            returns_lse=returns_lse, span=span,
            dequant=[Dequant(tensor, scale, span=span) for tensor, scale in self._dequant.items()],
            quantize=[Quantize(tensor, dtype, span=span) for tensor, dtype in self._quantize.items()])
        check_attention(spec)
        return spec


def _dot_operands(score: Expr, inputs: tuple[TensorDecl, ...], tensors: dict[str, torch.Tensor], q: TensorDecl,
                  k: TensorDecl) -> tuple[tuple[TensorDecl, ...], dict[str, int]]:
    """The inputs with each tensor of a latent dot product (`qr @ kr`) declared as q's shape (query-side) or k's
    (key-side) with its own head dim in the D slot, both sides naming it DR (then DR2, DR3, ... in the order of
    the dot products' text), as the docs' specs do, so that the same spec in text has the same key. The size is
    bound to the query tensor's, as a dot product's head dim must be at compile time; the checker verifies the
    pairing."""
    by_name = {t.name: t for t in inputs}
    declared = set()  # a tensor takes the side of its first use (`qr @ qr` is then two query-side tensors)
    dims = {}
    slot = q.shape.index("D")
    dots = sorted({n for n in walk(score) if isinstance(n, QK) and not n.is_qk}, key=print_expr)
    for n, dot in enumerate(dots):
        dim = "DR" if n == 0 else f"DR{n + 1}"
        for name, like in ((dot.query, q), (dot.key, k)):
            if name in by_name and name not in declared and tensors[name].dim() == len(like.shape):
                declared.add(name)
                by_name[name] = replace(by_name[name], shape=like.shape[:slot] + (dim,) + like.shape[slot + 1:])
        if dot.query in tensors and tensors[dot.query].dim() == len(q.shape):
            dims[dim] = tensors[dot.query].shape[slot]
    return tuple(by_name[t.name] for t in inputs), dims


def _returned(result, fn) -> tuple[Probabilities, bool, str]:
    """The weights, whether lse is returned, and the value tensor ("v", or "k" where the keys are the values)."""
    if isinstance(result, Output):
        return result.probabilities, False, result.value
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Output)
            and isinstance(result[1], Lse) and result[1].probabilities is result[0].probabilities):
        return result[0].probabilities, True, result[0].value
    raise TraceError(Diagnostic(
        f"{fn.__name__} must return `p @ v` or `p @ v, p.lse` with p = {_WEIGHT_FUNCTIONS}, "
        f"not {type(result).__name__}", function_span(fn)))


def _declared_arguments(fn) -> tuple[tuple[ParamDecl, ...], tuple[str, ...], bool]:
    """Params (keyword-only numbers) and inputs (keyword-only attnc.Tensor) of a decorated function, and whether
    it takes (q, k) alone: latent attention, whose values are the keys."""
    span = function_span(fn)
    try:
        signature = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, SyntaxError):  # annotations naming unknown things stay strings
        signature = inspect.signature(fn)
    kinds = inspect.Parameter
    arguments = list(signature.parameters.values())
    positional = [a for a in arguments if a.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if len(positional) not in (2, 3) or any(a.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD) for a in arguments):
        raise TraceError(Diagnostic(
            f"{fn.__name__} must take q, k, v positionally and everything else keyword-only, as in "
            f"`def {fn.__name__}(q, k, v, *, slopes: attnc.Tensor, cap: float = 50.0)` (no *args, **kwargs); "
            f"or q, k alone where the keys are the values (latent attention, returning `p @ k`)", span))
    params, inputs = [], []
    for a in arguments[len(positional):]:
        kind = _ANNOTATIONS.get(a.annotation) if a.annotation is not kinds.empty else _kind_of_default(a.default)
        if kind is None:
            raise TraceError(Diagnostic(
                f"{fn.__name__}: argument {a.name!r} needs an annotation: attnc.Tensor (an input tensor), float, "
                f"int or bool (a runtime param)", span))
        if kind == "tensor":
            if a.default is not kinds.empty:
                raise TraceError(Diagnostic(f"{fn.__name__}: input tensor {a.name!r} cannot have a default; "
                                            f"drop it and pass the tensor at every call", span))
            inputs.append(a.name)
        else:
            params.append(ParamDecl(a.name, kind, _param_default(fn, a, kind, span), span=span))
    return tuple(params), tuple(inputs), len(positional) == 2


def _kind_of_default(default) -> str | None:
    for t in (bool, int, float):  # bool first: it is an int
        if isinstance(default, t):
            return _ANNOTATIONS[t]
    return None


def _param_default(fn, a: inspect.Parameter, kind: str, span):
    d = a.default
    if d is inspect.Parameter.empty:
        return None
    ok = (isinstance(d, bool) if kind == "bool"
          else isinstance(d, int) and not isinstance(d, bool) if kind == "i32"
          else isinstance(d, (int, float)) and not isinstance(d, bool))
    if not ok:
        raise TraceError(Diagnostic(f"{fn.__name__}: param {a.name!r} is {kind} but defaults to {d!r}", span))
    problem = number_problem(d, kind == "f32" and not isinstance(d, int))
    if problem:
        raise TraceError(Diagnostic(f"{fn.__name__}: param {a.name!r}: {problem}", span))
    return float(d) if kind == "f32" else d
