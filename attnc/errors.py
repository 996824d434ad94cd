"""Every error a user can cause is an AttncError; spec errors point at the source with a caret."""
from __future__ import annotations

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
