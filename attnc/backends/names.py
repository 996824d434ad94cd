"""The names a spec's own words take in generated code (Triton and Python source, TVM's IR and its sources).

Sizes, params and input tensors are named by the user, so any identifier may arrive: `start` or `tl` (names the
templates use), `def` (a Python keyword), `a` beside `a_s0`. None is emitted as written. Each becomes
`{role}_{name}` (MANGLED), a role holding no `_`: the role is everything before the first `_`, so two
different (role, name) pairs never give one name, and no result is a keyword. The templates and emitters name
nothing of their own with a role prefix (tests/test_names.py reads them), so no mangled name meets a template's.
The sizes of the fixed roles keep the same scheme (`sz_N`, `cap_M`), which the templates spell out.
"""
from __future__ import annotations

import re

# Every mangled name, and nothing a template or an emitter names on its own.
MANGLED = re.compile(r"(sz|cap|p|t|st[0-9]+|g|gst[0-9p]+|gpart)_[A-Za-z0-9_]+")


def _mangle(role: str, name: str) -> str:
    if not name.isidentifier() or not name.isascii():
        raise ValueError(f"not a spec name: {name!r}")  # the front-ends admit only ASCII identifiers
    return f"{role}_{name}"


def size(name: str) -> str:
    """A size (`N`, or a free size such as `S`)."""
    return _mangle("sz", name)


def capacity(name: str) -> str:
    """M or N of ragged or paged storage in the decode kernel: the largest sequence's, a bound for the tiles."""
    return _mangle("cap", name)


def param(name: str) -> str:
    return _mangle("p", name)


def tensor(name: str) -> str:
    """An input tensor's pointer (Triton) or buffer (TVM)."""
    return _mangle("t", name)


def stride(name: str, axis: int) -> str:
    """The stride of an input tensor's dim `axis`."""
    return _mangle(f"st{axis}", name)


def gradient(name: str) -> str:
    """The gradient of a float input tensor (the backward kernels' output, or its per-program workspace)."""
    return _mangle("g", name)


def gradient_stride(name: str, axis: int | str) -> str:
    """A stride of gradient(name): per table axis, and "p" between programs' slices of a workspace."""
    return _mangle(f"gst{axis}", name)


def gradient_partials(name: str) -> str:
    """The TVM backward's per-task float64 partial sums of gradient(name)."""
    return _mangle("gpart", name)

