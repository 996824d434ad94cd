"""Symbolic values shared by the Python front-ends (the `@attnc.attention` decorator and flex mods).

A `Sym` wraps an IR expression and its kind ('int', 'float' or 'bool'). Python operators, `attnc.*` math
functions and torch functions (through `__torch_function__`) on a Sym build IR nodes instead of computing,
so running the user's function once with Syms for its arguments traces it into the IR the text language
parses to. Every node carries the Span of the user's line that made it, and every error points there.
"""
from __future__ import annotations

import contextlib
import contextvars
import dis
import functools
import linecache
import numbers
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping

import torch

from ..errors import AttncError, CallError, Diagnostic, Span, TraceError
from ..ir import FP8_DTYPES, QKV_DTYPES, Binary, Call, Expr, IndexVar, Lookup, Num, TensorDecl, Unary, dtype_kind, print_expr, walk
from ..ops import UNARY_FUNCTIONS, op_of, result_kind
from .signature import TORCH_DTYPES

IR_DTYPES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# Frames in these directories are attnc's or torch's own; a span names the first frame outside them.
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                       for path in (torch.__file__, os.path.dirname(os.path.abspath(__file__))))

_BRANCH_HINT = ("Python `if`, `and`, `or`, `not` and bool() need a concrete value, but a traced value is "
                "symbolic: combine conditions with `&`, `|`, `~` and choose values with attnc.where(cond, a, b) "
                "(torch.where in a mod)")


# ---------------------------------------------------------------- where the user is


@functools.lru_cache(maxsize=256)
def _positions(code: types.CodeType) -> tuple:
    return tuple(code.co_positions()) if hasattr(code, "co_positions") else ()


def _frame_span(filename: str, lineno: int, code: types.CodeType | None = None, lasti: int = -1) -> Span:
    text = linecache.getline(filename, lineno)
    col, end_line, end_col = len(text) - len(text.lstrip()) + 1, lineno, len(text.rstrip("\n")) + 1
    positions = _positions(code) if code is not None and lasti >= 0 else ()
    if 0 <= lasti // 2 < len(positions):
        start, end, start_col, stop_col = positions[lasti // 2]
        if start == lineno and start_col is not None and stop_col is not None:
            # co_positions counts UTF-8 bytes; a Span counts characters.
            raw = text.encode()
            col = len(raw[:start_col].decode(errors="ignore")) + 1
            end_line = end
            end_col = len(raw[:stop_col].decode(errors="ignore")) + 1 if end == lineno else stop_col + 1
    return Span(filename, lineno, col, end_line, end_col, text)


@functools.lru_cache(maxsize=1024)
def _is_user(filename: str) -> bool:
    return not (filename.startswith("<frozen") or os.path.abspath(filename).startswith(_INTERNAL_DIRS))


def user_span() -> Span | None:
    """The expression the user's code is evaluating now: the innermost frame outside attnc and torch."""
    frame = sys._getframe(1)
    while frame is not None and not _is_user(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    return _frame_span(frame.f_code.co_filename, frame.f_lineno, frame.f_code, frame.f_lasti)


def traceback_span(tb: types.TracebackType | None) -> Span | None:
    """The innermost user frame of a traceback: where an exception escaped the user's code."""
    found = None
    while tb is not None:
        if _is_user(tb.tb_frame.f_code.co_filename):
            found = _frame_span(tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code, tb.tb_lasti)
        tb = tb.tb_next
    return found


def function_span(fn: Callable) -> Span | None:
    """The `def` line of a traced function (or its first line, for a lambda)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    lineno = code.co_firstlineno
    for offset in range(8):  # skip decorator lines to reach `def`
        text = linecache.getline(code.co_filename, lineno + offset)
        if text.lstrip().startswith(("def ", "async def ")) or "lambda" in text:
            lineno += offset
            break
    return _frame_span(code.co_filename, lineno)


def trace_error(message: str, span: Span | None = None) -> TraceError:
    return TraceError(Diagnostic(message, span if span is not None else user_span()))


# ---------------------------------------------------------------- the active trace


@dataclass
class Tracer:
    """One run of a user function with symbolic arguments.

    `label` names the function in messages ("score_mod"); `captured` maps id(tensor) -> (variable name,
    tensor) for tensors the function may index (flex mods); `capture_hint` explains why indexing any other
    tensor is refused. `used` collects the captured tensors actually indexed.
    """

    label: str
    captured: Mapping[int, tuple[str, torch.Tensor]] = field(default_factory=dict)
    capture_hint: str = ""
    used: dict[str, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("attnc_tracer", default=None)


@contextlib.contextmanager
def tracing(tracer: Tracer):
    """Run the body with `tracer` active (per thread); exceptions other than AttncError escaping the user's
    code become a TraceError at the user's line, so a mistake there never shows as an attnc traceback."""
    token = _ACTIVE.set(tracer)
    try:
        yield tracer
    except AttncError:
        raise
    except Exception as exc:
        raise trace_error(f"{tracer.label} raised {type(exc).__name__} while being traced: {exc}",
                          traceback_span(exc.__traceback__)) from exc
    finally:
        _ACTIVE.reset(token)


def _label() -> str:
    tracer = _ACTIVE.get()
    return tracer.label if tracer is not None else "a traced function"


# ---------------------------------------------------------------- symbolic values


class Sym:
    """A traced value. Behaves like a number (and, for flex mods, like a 0-dim torch tensor)."""

    __slots__ = ("expr", "kind")

    def __init__(self, expr: Expr, kind: str):
        self.expr = expr
        self.kind = kind

    def __repr__(self) -> str:
        return f"Sym({print_expr(self.expr)}: {self.kind})"

    # arithmetic
    def __add__(self, other): return arith("+", self, other)
    def __radd__(self, other): return arith("+", other, self)
    def __sub__(self, other): return arith("-", self, other)
    def __rsub__(self, other): return arith("-", other, self)
    def __mul__(self, other): return arith("*", self, other)
    def __rmul__(self, other): return arith("*", other, self)
    def __truediv__(self, other): return arith("/", self, other)
    def __rtruediv__(self, other): return arith("/", other, self)
    def __floordiv__(self, other): return floordiv(self, other)
    def __rfloordiv__(self, other): return floordiv(other, self)
    def __mod__(self, other): return arith("%", self, other)
    def __rmod__(self, other): return arith("%", other, self)
    def __pow__(self, other): return power(self, other)
    def __rpow__(self, other): return power(other, self)
    def __neg__(self): return neg(self)
    def __pos__(self): return self
    def __abs__(self): return call("abs", self)

    # comparisons give boolean symbols
    def __lt__(self, other): return compare("<", self, other)
    def __le__(self, other): return compare("<=", self, other)
    def __gt__(self, other): return compare(">", self, other)
    def __ge__(self, other): return compare(">=", self, other)
    def __eq__(self, other): return compare("==", self, other)  # type: ignore[override]
    def __ne__(self, other): return compare("!=", self, other)  # type: ignore[override]
    __hash__ = object.__hash__

    # logic on booleans
    def __and__(self, other): return logic("and", self, other)
    def __rand__(self, other): return logic("and", other, self)
    def __or__(self, other): return logic("or", self, other)
    def __ror__(self, other): return logic("or", other, self)
    def __invert__(self): return logical_not(self)

    # A concrete value is asked for: the function branches on traced data.
    def __bool__(self):
        raise trace_error(f"cannot branch on a traced value in {_label()}: {_BRANCH_HINT}")

    def _not_a_number(self, *_):
        raise trace_error(f"a traced value has no Python number in {_label()} (math.* and int()/float() need one): "
                          f"use attnc.exp/attnc.tanh/... or the torch function instead")

    __float__ = __int__ = __index__ = __complex__ = _not_a_number

    # flex mods call tensor methods: q_idx.abs(), score.tanh(), b.new_ones(...)
    device = None  # torch's noop_mask passes `device=b.device`

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        handler = TORCH_OPS.get(name)
        if handler is None:
            raise trace_error(f"Tensor.{name} is not supported in {_label()}; {_SUPPORTED}")
        return functools.partial(handler, self)

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and isinstance(args[0], torch.Tensor):
            return lookup_captured(args[0], args[1])
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                raise _unindexed_tensor_error(a)
        handler = TORCH_OPS.get(name)
        if handler is None or not _is_torch_function(func, name):
            raise trace_error(f"{_torch_name(func)} is not supported in {_label()}; {_SUPPORTED}")
        return handler(*args, **kwargs)


def as_expr(x) -> tuple[Expr, str]:
    """IR and kind of a Sym or a Python constant (captured Python scalars become literals)."""
    if isinstance(x, Sym):
        return x.expr, x.kind
    if isinstance(x, bool):
        return Num(x, False, span=user_span()), "bool"
    if isinstance(x, numbers.Integral):
        return Num(int(x), False, span=user_span()), "int"
    if isinstance(x, numbers.Real):
        return Num(float(x), True, span=user_span()), "float"
    if isinstance(x, torch.Tensor):
        raise _unindexed_tensor_error(x)
    raise trace_error(f"cannot use a {type(x).__name__} in a traced expression in {_label()}: only numbers "
                      f"and traced values combine")


def _unindexed_tensor_error(t: torch.Tensor) -> TraceError:
    return trace_error(f"a tensor of shape {tuple(t.shape)} is used as a value in {_label()}; a tensor can only "
                       f"be indexed with traced indices (t[h, q_idx]), and constants must be Python numbers "
                       f"(float('-inf'), not torch.tensor(float('-inf')))")


def _operator(node: Expr, kinds) -> Sym:
    """A traced operator node, with the kind the operator table gives it."""
    return Sym(node, result_kind(op_of(node), kinds))


def arith(op: str, a, b) -> Sym:
    (ea, ka), (eb, kb) = as_expr(a), as_expr(b)
    return _operator(Binary(op, ea, eb, span=user_span()), (ka, kb))


def floordiv(a, b) -> Sym:
    """a // b: the IR's floored integer division for integers (an integer, so it can index a table, as in
    `blocks[q_idx // 64]`); floor(a / b), a float, when either side is a float."""
    if "float" in (as_expr(a)[1], as_expr(b)[1]):
        return call("floor", arith("/", a, b))
    return arith("//", a, b)


def compare(op: str, a, b) -> Sym:
    (ea, _), (eb, _) = as_expr(a), as_expr(b)
    return Sym(Binary(op, ea, eb, span=user_span()), "bool")


def logic(op: str, a, b) -> Sym:
    (ea, ka), (eb, kb) = as_expr(a), as_expr(b)
    if ka != "bool" or kb != "bool":
        symbol = "&" if op == "and" else "|"
        raise trace_error(f"`{symbol}` combines conditions (booleans) in {_label()}, got {ka} and {kb}: bitwise "
                          f"operations on integers are not supported; compare first, e.g. (a == b) {symbol} (c < d)")
    return Sym(Binary(op, ea, eb, span=user_span()), "bool")


def logical_not(a) -> Sym:
    e, kind = as_expr(a)
    if kind != "bool":
        raise trace_error(f"`~` negates a condition (a boolean) in {_label()}, got {kind}: bitwise not on integers "
                          f"is not supported; write -x - 1 or compare first")
    return Sym(Unary("not", e, span=user_span()), "bool")


def neg(a) -> Sym:
    e, kind = as_expr(a)
    return _operator(Unary("neg", e, span=user_span()), (kind,))


def call(fn: str, *args) -> Sym:
    exprs, kinds = zip(*(as_expr(a) for a in args))
    return _operator(Call(fn, tuple(exprs), span=user_span()), kinds)


def where(cond, a, b) -> Sym:
    if as_expr(cond)[1] != "bool":
        raise trace_error(f"the condition of where() must be a boolean (a comparison) in {_label()}")
    return call("where", cond, a, b)


def power(base, exponent) -> Sym:
    """Only the square root and its inverse have IR forms; x ** -0.5 is the usual `D ** -0.5` scale."""
    if not isinstance(exponent, Sym) and isinstance(exponent, numbers.Real) and not isinstance(exponent, bool):
        if exponent == 0.5:
            return call("sqrt", base)
        if exponent == -0.5:
            return call("rsqrt", base)
    raise trace_error(f"only x ** 0.5 (sqrt) and x ** -0.5 (rsqrt) can be traced in {_label()}: other powers have "
                      f"no IR form; write x * x for a square, 1 / x for an inverse, attnc.exp2(y) for 2 ** y and "
                      f"attnc.exp(y * attnc.log(x)) for a general power")


def lookup(name: str, dtype: str, ndim: int, index) -> Sym:
    """`name[index]`: one traced index per dimension of the tensor, each an integer expression."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != ndim:
        raise trace_error(f"{name} has {ndim} dims but is indexed with {len(index)} indices in {_label()}; "
                          f"index every dim with one integer expression (slices are not supported)")
    exprs = []
    for axis, x in enumerate(index):
        if isinstance(x, (slice, type(Ellipsis))) or x is None:
            raise trace_error(f"{name}: index {axis} is {x!r}; only integer expressions index a tensor in a trace")
        e, k = as_expr(x)
        if k != "int":
            raise trace_error(f"{name}: index {axis} is a {k} expression; indices must be integers (index "
                              f"variables, sizes, integer params or integer inputs)")
        exprs.append(e)
    return Sym(Lookup(name, tuple(exprs), span=user_span()), dtype_kind(dtype))


def lookup_captured(tensor: torch.Tensor, index) -> Sym:
    """`t[...]` on a tensor the traced function closes over: it becomes an `input` named after its variable."""
    tracer = _ACTIVE.get()
    entry = tracer.captured.get(id(tensor)) if tracer is not None else None
    if entry is None:
        hint = tracer.capture_hint if tracer else ""
        raise trace_error(f"{_label()} indexes a tensor of shape {tuple(tensor.shape)}{hint}")
    name, t = entry
    if t.dtype not in IR_DTYPES:
        raise trace_error(f"captured tensor {name} has dtype {t.dtype}; inputs must be one of "
                          f"{', '.join(map(str, IR_DTYPES))}")
    tracer.used[name] = t
    return lookup(name, IR_DTYPES[t.dtype], t.dim(), index)


# ---------------------------------------------------------------- torch functions


def _clamp(x, min=None, max=None):  # noqa: A002 - torch's keyword names
    if min is not None:
        x = call("max", x, min)
    if max is not None:
        x = call("min", x, max)
    return x


def _binary_min_max(fn: str):
    def handler(a, b=None, *rest, **kwargs):
        if b is None or rest or kwargs:
            raise trace_error(f"torch.{fn}imum(a, b) / torch.{fn}(a, b) of two values is supported in {_label()}; "
                              f"reductions (dim=...) are not")
        return call(fn, a, b)
    return handler


def _div(a, b, rounding_mode=None):
    if rounding_mode is None:
        return arith("/", a, b)
    if rounding_mode == "floor":
        return floordiv(a, b)
    raise trace_error(f"division with rounding_mode={rounding_mode!r} is not supported in {_label()}; use "
                      f"rounding_mode='floor' or a // b")


def _no_alpha(op: str):
    def handler(a, b, alpha=1):
        if alpha != 1:
            raise trace_error(f"alpha={alpha!r} is not supported in {_label()}; multiply explicitly")
        return arith(op, a, b)
    return handler


def _to_float(x, *args, **kwargs):
    """.float() / .to(float dtype): the IR promotes int to float where needed, so this only changes the kind."""
    dtype = kwargs.get("dtype", args[0] if args else torch.float32)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise trace_error(f"only conversions to a float dtype can be traced in {_label()} (got {dtype!r})")
    e, _ = as_expr(x)
    return Sym(e, "float")


def _new_full(fill):
    """x.new_ones(()) / x.new_zeros(()): a constant (torch's noop_mask is `b.new_ones(size=(), dtype=bool)`)."""
    def handler(x, size=(), *, dtype=None, **_device_and_layout):
        if tuple(size) != ():
            raise trace_error(f"only 0-dim new_ones/new_zeros can be traced in {_label()}")
        if dtype == torch.bool:
            return Sym(Num(bool(fill), False, span=user_span()), "bool")
        if dtype is not None and dtype.is_floating_point:
            return Sym(Num(float(fill), True, span=user_span()), "float")
        return Sym(Num(fill, False, span=user_span()), "int")
    return handler


def _unary(fn: str):
    return lambda x: call(fn, x)


TORCH_OPS: Mapping[str, Callable] = {
    **{fn: _unary(fn) for fn in UNARY_FUNCTIONS},  # torch.exp, torch.erf, ... (and Tensor methods) by the same names
    "absolute": _unary("abs"),
    "neg": neg, "negative": neg,
    "add": _no_alpha("+"), "sub": _no_alpha("-"), "subtract": _no_alpha("-"),
    "mul": lambda a, b: arith("*", a, b), "multiply": lambda a, b: arith("*", a, b),
    "div": _div, "divide": _div, "true_divide": lambda a, b: arith("/", a, b),
    "floor_divide": floordiv, "remainder": lambda a, b: arith("%", a, b),
    "pow": power,
    **{name: (lambda op: lambda a, b: compare(op, a, b))(op) for name, op in (
        ("eq", "=="), ("ne", "!="), ("not_equal", "!="), ("lt", "<"), ("less", "<"), ("le", "<="),
        ("less_equal", "<="), ("gt", ">"), ("greater", ">"), ("ge", ">="), ("greater_equal", ">="))},
    "logical_and": lambda a, b: logic("and", a, b), "bitwise_and": lambda a, b: logic("and", a, b),
    "logical_or": lambda a, b: logic("or", a, b), "bitwise_or": lambda a, b: logic("or", a, b),
    "logical_not": logical_not, "bitwise_not": logical_not,
    "where": where,
    "minimum": _binary_min_max("min"), "min": _binary_min_max("min"),
    "maximum": _binary_min_max("max"), "max": _binary_min_max("max"),
    "clamp": _clamp, "clip": _clamp,
    "float": _to_float, "to": _to_float,
    "new_ones": _new_full(1), "new_zeros": _new_full(0),
}

_SUPPORTED = ("what traces: + - * / // %, ** 0.5, ** -0.5, comparisons, & | ~, indexing a captured tensor with "
              f"integer expressions, and torch.{'/'.join(UNARY_FUNCTIONS)}/where/minimum/maximum/clamp (or the same "
              "Tensor methods)")


def _is_torch_function(func, name: str) -> bool:
    return getattr(torch, name, None) is func or getattr(torch.Tensor, name, None) is func


def _torch_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    if getattr(torch.Tensor, name, None) is func:
        return f"Tensor.{name}"
    if getattr(torch.nn.functional, name, None) is func:
        return f"torch.nn.functional.{name}"
    module = getattr(func, "__module__", None) or ""
    return f"{module}.{name}" if module else name


# ---------------------------------------------------------------- captured variables


_CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype)
_PLAIN_OBJECTS = (types.ModuleType, types.BuiltinFunctionType, types.FunctionType, type)
_ABSENT = object()  # a global name not (yet) defined: it resolves to a builtin, or raises


@dataclass(frozen=True, eq=False)
class Captures:
    """What a function reads from its closure and globals (and from those of the Python functions it calls).

    `variables`: the tensors and constants by name, what a trace may index or bake in. `key`: everything the
    trace depends on, hashable: constants by type and value, the functions walked by code, anything else
    (tensors, modules) by identity; None when the function is not a plain Python function or reads an arbitrary
    object (a dict, a `self`) whose contents may change unseen, so that no trace of it can be reused.
    `cells` and `names` are where each value was read and the value read, so that `unchanged()` tells with a
    few reads and identity checks, without walking the function again, that nothing was rebound. Holding the
    values keeps the ids in `key` unique while this object lives."""

    variables: Mapping[str, object]
    key: tuple | None
    cells: tuple[tuple[types.CellType, object], ...] = ()  # (cell, value it held)
    names: tuple[tuple[Callable, str, object], ...] = ()  # (the globals' get, name, value it held)

    def unchanged(self) -> bool:
        """Whether every cell and global still holds the very object it held (always False when not plain)."""
        if self.key is None:
            return False
        for get, name, value in self.names:
            if get(name, _ABSENT) is not value:
                return False
        try:
            for cell, value in self.cells:
                if cell.cell_contents is not value:
                    return False
        except ValueError:  # a cell emptied by `del`
            return False
        return True


def captures(fn: Callable) -> Captures:
    """Walk `fn` (and the Python functions it reads) for the variables it captures; see Captures."""
    found: dict[str, object] = {}
    cells, names, key = [], [], []
    plain = isinstance(fn, types.FunctionType)  # a bound method or callable object reads `self` unseen
    seen: set[int] = set()

    def read(name: str, value) -> None:
        nonlocal plain
        if isinstance(value, torch.Tensor):
            found.setdefault(name, value)
            key.append((name, "tensor", id(value)))
        elif isinstance(value, _CONSTANT_TYPES):
            found.setdefault(name, value)
            # floats by repr: -0.0 and 0.0 are equal but trace differently, and nan equals itself there
            key.append((name, type(value), repr(value) if isinstance(value, float) else value))
        elif value is _ABSENT:
            key.append((name, "absent"))
        elif isinstance(value, types.FunctionType) and _is_user(value.__code__.co_filename):
            key.append((name, "function", value.__code__.co_filename, value.__code__))
            visit(value)
        elif isinstance(value, _PLAIN_OBJECTS):
            key.append((name, "object", id(value)))
        elif isinstance(value, tuple) and not any(isinstance(x, torch.Tensor) for x in value):
            # immutable: torch's and_masks / or_masks keep their mods in one; its items are read as variables
            key.append((name, "tuple", len(value)))
            for index, item in enumerate(value):
                read(f"{name}[{index}]", item)
        else:
            plain = False

    def visit(f) -> None:
        code = getattr(f, "__code__", None)
        if code is None or id(code) in seen:
            return
        seen.add(id(code))
        for name, cell in zip(code.co_freevars, f.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # not assigned yet: the trace raises if it reads it
                value = _ABSENT
            cells.append((cell, value))
            read(name, value)
        scope = f.__globals__
        for name in _global_names(code):
            value = scope.get(name, _ABSENT)
            names.append((scope.get, name, value))
            read(name, value)

    visit(fn)
    return Captures(found, tuple(key) if plain else None, tuple(cells), tuple(names))


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the lambdas and comprehensions inside it) loads as globals; attribute names,
    which co_names lists too, are left out, so that a call re-reads only real variables."""
    loaded = (ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"))
    nested = (name for const in code.co_consts if isinstance(const, types.CodeType) for name in _global_names(const))
    return tuple(dict.fromkeys((*loaded, *nested)))


def capture_table(variables: Mapping[str, object]) -> dict[int, tuple[str, torch.Tensor]]:
    """id(tensor) -> (variable name, tensor) for the captured tensors, for `Tracer.captured`."""
    return {id(v): (name, v) for name, v in variables.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- declarations


def ir_dtype(t: torch.Tensor, what: str) -> str:
    if t.dtype not in IR_DTYPES:
        raise CallError(f"{what}: dtype {t.dtype} is not supported; use one of {', '.join(map(str, IR_DTYPES))}")
    return IR_DTYPES[t.dtype]


# The one naming rule for input dims (decorator and flex): a dim indexed only by the bare batch index is B, by
# the bare query head H, by the bare query position M, by the bare key position (or by both positions) N. A dim
# any lookup indexes with an expression (`bias[i - j + N - 1]`, `offsets[doc[i]]`, `blocks[i // 64]`) has its
# own free size, taken from the tensor and checked only for rank: its length is the table's, not a role's.
_AXIS_ROLE = {frozenset("b"): "B", frozenset("h"): "H", frozenset("i"): "M", frozenset("j"): "N",
              frozenset("ij"): "N"}


def input_decls(exprs: Iterable[Expr | None], tensors: Mapping[str, torch.Tensor],
                fallback: Span | None = None) -> tuple[TensorDecl, ...]:
    """Declarations of the input tensors, each dim named by the index variables of the lookups into it;
    each declaration points at the first lookup into its tensor."""
    used: dict[tuple[str, int], set[str | None]] = {}  # None: indexed by an expression somewhere
    first: dict[str, Span | None] = {}
    for e in exprs:
        if e is None:  # no sink
            continue
        for node in walk(e):
            if isinstance(node, Lookup):
                first.setdefault(node.tensor, node.span)
                for axis, index in enumerate(node.indices):
                    used.setdefault((node.tensor, axis), set()).add(
                        index.name if isinstance(index, IndexVar) else None)
    return tuple(
        TensorDecl(name, ir_dtype(t, name),
                   tuple(_AXIS_ROLE.get(frozenset(used.get((name, axis), ())), f"{name}_{axis}")
                         for axis in range(t.dim())),
                   span=first.get(name) or fallback)
        for name, t in tensors.items())


LAYOUTS = {"BHSD": (0, 1, 2, 3), "BSHD": (0, 2, 1, 3)}  # axes of (batch, heads, sequence, head dim)


def qkv_decls(q, k, v, layout: str, gqa_allowed: bool = True,
              headless_k: bool = False, dequantized: Collection[str] = ()) -> tuple[TensorDecl, TensorDecl, TensorDecl]:
    """q/k/v declarations for these tensors: K/V get HKV when their head count differs from q's, v gets DV
    when its head dim differs; k or v in `dequantized` may be FP8. `headless_k`: where v is k, k may be [B, N, D],
    without a head axis (one K/V head that every query head reads: MLA's latent cache). Shapes are checked fully
    at call time (signature.bind)."""
    axes = LAYOUTS[layout]
    for name, t in (("q", q), ("k", k), ("v", v)):
        ranks = (4, 3) if headless_k and v is k and name != "q" else (4,)
        if not isinstance(t, torch.Tensor) or t.dim() not in ranks:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            headless = " or a 3-dim [B, N, D] one (one K/V head)" if len(ranks) > 1 else ""
            raise CallError(f"{name}: expected a 4-dim torch.Tensor in {layout} layout{headless}, got {got}")
        if ir_dtype(t, name) in FP8_DTYPES and name != "q" and name not in dequantized:
            raise CallError(f"{name}: dtype {t.dtype} is an FP8 cache, which needs its dequant scale: write a spec "
                            f"with `dequant {name} by {name}_scale`, or decorate a function with "
                            f"@attnc.attention(dequant={{{name!r}: '{name}_scale'}}) that takes {name}_scale (a float "
                            f"param, or an attnc.Tensor of one scale per K/V head); the flex front-end has no "
                            f"argument for a scale")
        if ir_dtype(t, name) not in QKV_DTYPES + (FP8_DTYPES if name in dequantized else ()):
            raise CallError(f"{name}: dtype {t.dtype} is not supported; use float16, bfloat16 or float32")

    def shape(seq: str, head: str, dim: str) -> tuple[str, ...]:
        roles = ("B", head, seq, dim)
        return tuple(roles[axes.index(axis)] for axis in range(4))

    if k.dim() == 3:
        k_decl = TensorDecl("k", IR_DTYPES[k.dtype], ("B", "N", "D"))
        return TensorDecl("q", IR_DTYPES[q.dtype], shape("M", "H", "D")), k_decl, k_decl
    heads = "HKV" if k.shape[axes[1]] != q.shape[axes[1]] else "H"
    if heads == "HKV" and not gqa_allowed:
        raise CallError(f"k: has {k.shape[axes[1]]} heads but q has {q.shape[axes[1]]}; pass enable_gqa=True for "
                        f"grouped-query attention")
    value_dim = "DV" if v.shape[axes[3]] != q.shape[axes[3]] else "D"
    return (TensorDecl("q", IR_DTYPES[q.dtype], shape("M", "H", "D")),
            TensorDecl("k", IR_DTYPES[k.dtype], shape("N", heads, "D")),
            TensorDecl("v", IR_DTYPES[v.dtype], shape("N", heads, value_dim)))

