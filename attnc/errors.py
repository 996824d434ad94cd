"""Every error a user can cause is an AttncError; spec errors point at the source with a caret."""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A place in a spec's source. Carried by IR nodes but never part of their equality or hash."""

    file: str
    line: int  # 1-based
    col: int  # 1-based
    end_line: int
    end_col: int
    line_text: str = field(default="", repr=False)


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None

    def format(self) -> str:
        if self.span is None:
            return self.message
        s = self.span
        head = f"{s.file}:{s.line}:{s.col}: {self.message}"
        if not s.line_text:
            return head
        text = s.line_text.rstrip("\n").expandtabs(1)
        width = max(1, s.end_col - s.col) if s.end_line == s.line else max(1, len(text) - s.col + 1)
        return f"{head}\n    {text}\n    {' ' * (s.col - 1)}{'^' * width}"


class AttncError(Exception):
    """Base of every error attnc raises for something the user can fix."""


class SpecError(AttncError):
    """One or more problems in a spec (text, decorator or flex mods), all reported at once."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))


class TraceError(SpecError):
    """A Python function (decorator body, score_mod, mask_mod) that attnc cannot trace."""


class CallError(AttncError):
    """A bad call: names the argument and what was expected."""


class CompileError(AttncError):
    """A backend failed to build a kernel, or a spec uses something the backend cannot lower."""


class CacheError(AttncError):
    """The kernel cache or an AOT artifact cannot be used."""


def checks_arguments(fn=None, *, usage=None):
    """`fn` with a call whose arguments do not fit its signature (a missing or extra positional argument, an
    unknown keyword, one given twice) raising a CallError that names the argument, where Python raises a
    TypeError. A good call pays one extra frame: the arguments are examined only after a TypeError.
    usage(args, kwargs) -> how to call it, quoted in the message (default: the name and signature)."""
    def wrap(fn):
        signature = inspect.signature(fn)
        method = next(iter(signature.parameters), None) == "self"
        params = [p for p in signature.parameters.values()][1 if method else 0:]
        bare = signature.replace(parameters=[p.replace(annotation=p.empty) for p in params],
                                 return_annotation=signature.empty)
        shown = usage or (lambda args, kwargs: f"{fn.__name__}{bare}")

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except TypeError:
                error = call_error(params, args[1:] if method else args, kwargs, lambda: shown(args, kwargs))
                if error is None:
                    raise  # raised inside fn: not a call mistake
                raise error from None

        return checked

    return wrap if fn is None else wrap(fn)


def call_error(params: list[inspect.Parameter], args: tuple, kwargs: dict, usage) -> CallError | None:
    """The CallError for calling a function of `params` with these arguments (usage() -> how to call it, for the
    message), or None when they fit."""
    problem = _argument_mismatch(params, args, kwargs)
    return None if problem is None else CallError(f"{problem}; call it as {usage()}")


def _argument_mismatch(params: list[inspect.Parameter], args: tuple, kwargs: dict) -> str | None:
    """What is wrong with calling a function of `params` on these arguments, or None when nothing is."""
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    if len(args) > len(positional) and not any(p.kind == kinds.VAR_POSITIONAL for p in params):
        names = ", ".join(p.name for p in positional)
        return (f"argument {len(positional) + 1} ({_describe(args[len(positional)])}): takes {len(positional)} "
                f"positional argument{'s' if len(positional) != 1 else ''} ({names}), got {len(args)}; pass the "
                f"others by name")
    for p, _ in zip(positional, args):
        if p.name in kwargs and p.kind == kinds.POSITIONAL_OR_KEYWORD:
            return f"{p.name}: given twice, by position and by name"
    for name in kwargs:
        if any(p.name == name and p.kind == kinds.POSITIONAL_ONLY for p in positional[len(args):]):
            return f"{name}: passed by name, but it is taken by position only"
        if name in by_name or any(p.kind == kinds.VAR_KEYWORD for p in params):
            continue
        close = difflib.get_close_matches(name, list(by_name), n=1)
        return f"{name}: unknown argument" + (f"; did you mean {close[0]!r}?" if close else "")
    for p in positional[len(args):] + [p for p in params if p.kind == kinds.KEYWORD_ONLY]:
        if p.default is kinds.empty and (p.kind == kinds.POSITIONAL_ONLY or p.name not in kwargs):
            return f"{p.name}: missing argument"
    return None


def _describe(value) -> str:
    text = repr(value) if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
