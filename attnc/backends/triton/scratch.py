"""Global scratch for kernels with device-side tensor descriptors (Triton asks its allocator at every launch).

One buffer per (device, stream), grown when a launch asks for more: launches on one stream run in order, so
they can share it, and a torch.empty per launch (~2-3 us of host time) is saved on the cache-hit path. While a
CUDA graph is being captured each launch gets its own allocation, which the graph's memory pool keeps alive.
"""
from __future__ import annotations

import torch

_buffers: dict[tuple[int, int], torch.Tensor] = {}


def scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator protocol: `size` bytes aligned to `alignment` for a launch on `stream`."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.int8, device="cuda")
    key = (torch.cuda.current_device(), int(stream))
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < size:  # the caching allocator's blocks are 512-byte aligned
        buffer = _buffers[key] = torch.empty(size, dtype=torch.int8, device="cuda")
    return buffer


def install() -> None:
    """Make `scratch` Triton's allocator for the calling thread. Triton keeps it in a ContextVar, so a thread that
    did not set it (autograd's backward thread, a server's worker) has none: each launch through Triton's launcher
    of a kernel that may need scratch (device-side tensor descriptors) installs it first."""
    import triton

    triton.set_allocator(scratch)
