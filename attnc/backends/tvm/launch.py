"""Running a compiled TVM kernel on a bound call: shared by the JIT launchers (backend.py) and AOT artifacts
(aot.py). Imports no TVM compiler: cached kernels and AOT artifacts run with only the TVM runtime (runtime.py).

q/k/v/out are passed as [B, heads, sequence, head dim] views of whatever layout the spec declares (BSHD is a
matter of strides); the compiled function takes the torch tensors through DLPack without copies.
"""
from __future__ import annotations

import torch

from ...dsl.signature import Bound, canonical_view, lse_shape, out_shape
from .runtime import ffi


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch(spec, function, bound: Bound):
    """Allocate out (and lse) and run a compiled kernel; shared by the JIT launchers and AOT artifacts.
    q/k/v/out go as [B, heads, sequence, head dim] views of whatever layout the spec declares."""
    q = bound.q
    out = empty(out_shape(spec, bound), q.dtype, q.device)
    lse = empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
    if bound.sizes["M"] > 0:
        gpu = q.device.type == "cuda"
        args = [_loadable(canonical_view(t, decl), gpu) for t, decl in
                ((q, spec.q), (bound.k, spec.k), (bound.v, spec.v))]
        args.append(canonical_view(out, spec.q))  # freshly allocated in q's layout: head dim is contiguous
        if lse is not None:
            args.append(lse)
        args += [_table(bound.inputs[t.name]) for t in spec.inputs]
        args += [int(v) if isinstance(v, bool) else v for v in (bound.params[p.name] for p in spec.params)]
        if gpu:
            tvm_ffi = ffi()
            # TVM launches on the stream it is given: torch's current one, so the kernel orders with torch's work.
            with tvm_ffi.use_raw_stream(tvm_ffi.device("cuda", q.device.index or 0),
                                        torch.cuda.current_stream(q.device).cuda_stream):
                function(*args)
        else:
            function(*args)
    return (out, lse) if spec.returns_lse else out


def _loadable(t: torch.Tensor, gpu: bool) -> torch.Tensor:
    """Kernels load along the head dim with vector loads (CPU) or 16-byte cp.async (CUDA, head dims that are
    multiples of 8: rows must start 16-byte aligned). A view that breaks this is copied (rare)."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if gpu and t.shape[-1] % 8 == 0 and (t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:-1])):
        return t.contiguous()
    return t


def _table(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t
