"""Running a compiled TVM kernel on a bound call: shared by the JIT launchers (backend.py) and AOT artifacts
(aot.py). Imports no TVM compiler: cached kernels and AOT artifacts run with only the TVM runtime (runtime.py).

q/k/v/out are passed as [B, heads, sequence, head dim] views of whatever layout the spec declares (BSHD is a
matter of strides); the compiled function takes the torch tensors through DLPack without copies.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...dsl.signature import Bound, canonical_view, lse_shape, out_shape
from .runtime import ffi

# The backward's functions (backward.py), by name: the library holds all three.
ROWS, KEYS, FINISH = "bwd_rows", "bwd_keys", "bwd_finish"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch(spec, function, bound: Bound, tail: Callable[[], list] | None = None):
    """Allocate out (and lse) and run a compiled kernel; shared by the JIT launchers and AOT artifacts.
    q/k/v/out go as [B, heads, sequence, head dim] views of whatever layout the spec declares. `tail()`: the
    arguments after the params (the tile summary, the error buffer and site of serving kernels)."""
    q = bound.q
    out = empty(out_shape(spec, bound), q.dtype, q.device)
    lse = empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
    if bound.sizes["M"] > 0:
        gpu = q.device.type == "cuda"
        args = qkv_args(spec, bound, gpu)
        args.append(canonical_view(out, spec.q))  # freshly allocated in q's layout: head dim is contiguous
        if lse is not None:
            args.append(lse)
        args += extra_args(spec, bound)
        if tail is not None:
            args += tail()
        if gpu:
            tvm_ffi = ffi()
            # TVM launches on the stream it is given: torch's current one, so the kernel orders with torch's work.
            with tvm_ffi.use_raw_stream(tvm_ffi.device("cuda", q.device.index or 0),
                                        torch.cuda.current_stream(q.device).cuda_stream):
                function(*args)
        else:
            function(*args)
    return (out, lse) if spec.returns_lse else out


def qkv_args(spec, bound: Bound, gpu: bool) -> list:
    """q, k, v as the kernels take them (canonical_view, loadable)."""
    return [loadable(canonical_view(t, decl), gpu) for t, decl in ((bound.q, spec.q), (bound.k, spec.k),
                                                                    (bound.v, spec.v))]


def launch_backward(spec, functions: dict, tables: tuple[str, ...], block_m: int, splits: int, bound: Bound,
                    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                    dlse: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Run the backward's three functions (backward.py) on a bound call: the gradients of q, k, v and the float
    input `tables`, each with its tensor's shape and dtype, contiguous. `block_m`: the query tile of the build;
    `splits`: how many tasks share the key tiles of one (batch, K/V head)."""
    q = bound.q
    grads = {role: empty(t.shape, t.dtype, t.device) for role, t in (("q", q), ("k", bound.k), ("v", bound.v))}
    grads.update({name: empty(bound.inputs[name].shape, bound.inputs[name].dtype, q.device) for name in tables})
    sizes = bound.sizes
    if sizes["M"] == 0:  # no query: nothing reaches K, V or a table
        for grad in grads.values():
            grad.zero_()
        return grads
    b, h, hkv = sizes["B"], sizes["H"], sizes["HKV"]
    q_tiles = -(-sizes["M"] // block_m)
    mp = q_tiles * block_m  # query rows padded to whole tiles
    f32 = torch.float32
    scratch = [torch.empty((b, h, q_tiles, sizes["D"], block_m), dtype=f32),
               torch.empty((b, h, q_tiles, sizes["DV"], block_m), dtype=f32),
               torch.empty((b, h, mp), dtype=f32), torch.empty((b, h, mp), dtype=f32),
               torch.empty((b, h, q_tiles, 4), dtype=torch.int32)]
    q_view, k_view, v_view = (loadable(canonical_view(t, decl), False) for t, decl in
                              ((q, spec.q), (bound.k, spec.k), (bound.v, spec.v)))
    out_view, dout_view = (loadable(canonical_view(t, spec.q), False) for t in (out, dout))
    extra = extra_args(spec, bound)
    # No torch op that runs on torch's thread pool between the three calls (module docstring of backward.py): dQ's
    # partials are zeroed by bwd_rows, and a missing dlse is a flag, not a zero-filled tensor
    dq_part = torch.empty((splits, b, h, mp, sizes["D"]), dtype=f32)
    functions[ROWS](q_view, k_view, out_view, dout_view, lse, lse if dlse is None else dlse, int(dlse is not None),
                    *scratch, dq_part, *extra)
    partials = [torch.zeros((b * hkv * splits, *bound.inputs[name].shape), dtype=torch.float64) for name in tables]
    functions[KEYS](q_view, k_view, v_view, dout_view, *scratch, dq_part, canonical_view(grads["k"], spec.k),
                    canonical_view(grads["v"], spec.v), *partials, *extra)
    functions[FINISH](dq_part, canonical_view(grads["q"], spec.q), *partials, *(grads[name] for name in tables))
    return grads


def loadable(t: torch.Tensor, gpu: bool) -> torch.Tensor:
    """Kernels load along the head dim with vector loads (CPU) or 16-byte cp.async (CUDA, head dims that are
    multiples of 8: rows must start 16-byte aligned). A view that breaks this is copied (rare)."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if gpu and t.shape[-1] % 8 == 0 and (t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:-1])):
        return t.contiguous()
    return t


def extra_args(spec, bound: Bound) -> list:
    """The compiled functions' last arguments: the input tables (bool ones as uint8 views), then the params."""
    tables = [bound.inputs[t.name] for t in spec.inputs]
    return [*(t.view(torch.uint8) if t.dtype == torch.bool else t for t in tables),
            *(int(v) if isinstance(v, bool) else v for v in (bound.params[p.name] for p in spec.params))]
