"""The device error buffer: where kernels record bad index data without a host sync (attnc/index_data.py).

One small int64 tensor per device (index_data.SLOTS slots) is passed to every serving kernel. A program that
finds a violation counts itself in slot COUNT with an atomic add; the first one to count writes the details.
`check_errors()` (public: `attnc.check_errors`) synchronises, reads and clears the buffers and raises the
recorded violation as the CallError the reference would raise for the same data. Validate mode gives each call a
fresh buffer of its own (`capture`) and raises right after the call.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..errors import CallError
from ..index_data import COUNT, INDEX, KIND, LIMIT, OTHER, SEQ, SITE, SLOTS, TENSOR, VALUE, Violation
from ..ir import Attention

_buffers: dict[torch.device, torch.Tensor] = {}
_sites: list[Attention] = []
_site_of: dict[str, int] = {}
# The buffer of a validated call in progress (None: the device's own).
_captured: ContextVar[torch.Tensor | None] = ContextVar("attnc_captured_errors", default=None)


def register_site(spec: Attention) -> int:
    """The number a kernel of `spec` writes into the SITE slot, so that a record names the spec's tensors."""
    site = _site_of.get(spec.key)
    if site is None:
        site = _site_of[spec.key] = len(_sites)
        _sites.append(spec)
    return site


def buffer(device: torch.device) -> torch.Tensor:
    """The buffer kernels on `device` record into: a validated call's own, else the device's, made by the first
    serving launch there and kept for the process, so that prepared launches and CUDA graphs hold its address (as
    for compiling, make that first call before capturing a graph: made inside a capture, its zeroing would be
    captured too)."""
    captured = _captured.get()
    if captured is not None:
        return captured
    buf = _buffers.get(device)
    if buf is None:
        buf = _buffers[device] = torch.zeros(SLOTS, dtype=torch.int64, device=device)
    return buf


def capturing() -> bool:
    return _captured.get() is not None


@contextmanager
def capture(device: torch.device):
    """Launches inside the block record into a fresh buffer of their own, which is yielded: validate mode."""
    buf = torch.zeros(SLOTS, dtype=torch.int64, device=device)
    token = _captured.set(buf)
    try:
        yield buf
    finally:
        _captured.reset(token)


def raise_recorded(buf: torch.Tensor) -> None:
    """Raise the violation `buf` holds, if any, and clear it (reading it waits for the kernels that write it)."""
    message = _take(buf)
    if message is not None:
        raise CallError(message)


def check_errors() -> None:
    """Raise a CallError for bad index data (offsets, lengths, page ids) that a kernel met since the last check,
    naming the tensor, the sequence and the value, and clear the records. Synchronises with every device that ran
    a serving kernel."""
    messages = [m for m in (_take(buf) for buf in list(_buffers.values())) if m is not None]
    if messages:
        raise CallError("\n".join(messages))


def _take(buf: torch.Tensor) -> str | None:
    """The message of the violation `buf` holds (None: none), clearing it."""
    if buf.device.type == "cuda":
        torch.cuda.synchronize(buf.device)
    record = buf.tolist()
    if not record[COUNT]:
        return None
    buf.zero_()
    spec = _sites[record[SITE]]
    found = Violation(record[KIND], spec.inputs[record[TENSOR]].name, record[SEQ], record[INDEX], record[VALUE],
                      record[LIMIT], record[OTHER])
    reports = record[COUNT]
    more = f", with {reports - 1} more report{'s' if reports > 2 else ''}" if reports > 1 else ""
    return (f"{found.message()} (found on {buf.device} by the kernel of attention {spec.name!r}{more}; the rows "
            f"it reached are NaN)")
