"""The "tvm" backend: build (TensorIR -> LLVM -> shared library, through the kernel cache) and launch.

Per call the launcher only reads shapes and strides, allocates the outputs with torch and calls the compiled
function, which takes the torch tensors through DLPack without copies. q/k/v/out are passed as
[B, heads, sequence, head dim] views of whatever layout the spec declares (BSHD is a matter of strides).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ... import __version__
from ...dsl.signature import Bound, canonical_view, lse_shape, out_shape
from ...errors import CompileError
from ...passes import KernelPlan, Target
from ...runtime import cache
from ...runtime.api import register_backend
from .host import configure_threads, host_cpu
from .kernel import CpuSchedule, build_primfunc, decode_schedule, prefill_schedule

LIBRARY_FILE = "kernel.so"
FUNCTION = "attn"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


class TvmBackend:
    name = "tvm"

    def __init__(self):
        configure_threads()

    def target(self, device: torch.device) -> Target:
        if device.type != "cpu":
            raise CompileError(f"the tvm backend runs on CPU tensors here (got tensors on {device}); use "
                               f"backend='triton' for CUDA tensors, or `attnc compile --backend tvm --target cuda` "
                               f"to build CUDA kernels ahead of time")
        return Target("tvm", "cpu", None)

    def build(self, plan: KernelPlan) -> "TvmLauncher":
        spec = plan.spec
        if spec.q_storage is not None or spec.kv_storage is not None:
            raise CompileError(f"attention {spec.name!r}: the tvm backend does not lower ragged or paged storage "
                               f"yet; run it with backend='triton' (CUDA, or TRITON_INTERPRET=1 on CPU), or pass "
                               f"dense q/k/v")
        return TvmLauncher(plan)


def compile_module(func, plan: KernelPlan, sched: CpuSchedule):
    """The compiled runtime module of the PrimFunc `func` (not cached)."""
    import tvm

    try:
        return tvm.compile(tvm.IRModule({FUNCTION: func}), target=host_cpu().target())
    except Exception as err:  # TVM's errors are not AttncErrors; say which spec and schedule failed
        raise CompileError(f"TVM could not build attention {plan.spec.name!r} for {host_cpu().label} with "
                           f"{sched}: {err}") from err


def cache_key(plan: KernelPlan, sched: CpuSchedule, func) -> cache.CacheKey:
    """The TensorIR text is part of the key, so a change to the code generator never loads a stale library."""
    import tvm

    return cache.CacheKey({
        "ir": plan.spec.canonical, "plan": repr(plan), "schedule": repr(sched),
        "tir": hashlib.sha256(func.script().encode()).hexdigest(), "backend": "tvm",
        "backend_version": tvm.__version__, "device": host_cpu().label, "attnc": __version__,
        "name": plan.spec.name,
    })


def load_function(plan: KernelPlan, sched: CpuSchedule):
    """The compiled function from the kernel cache (built and exported as a shared library on a miss)."""
    import tvm

    func = build_primfunc(plan, sched, FUNCTION)

    def build(out_dir: Path) -> None:
        compile_module(func, plan, sched).export_library(str(out_dir / LIBRARY_FILE))

    def load(entry: cache.Entry):
        return tvm.runtime.load_module(str(entry.file(LIBRARY_FILE)))[FUNCTION]

    return cache.get_or_load(cache_key(plan, sched, func), build, load)


class TvmLauncher:
    def __init__(self, plan: KernelPlan):
        self.plan = plan
        self.spec = plan.spec
        vector = host_cpu().vector
        self.decode_rows = vector  # M up to this runs the decode schedule
        self.schedules = {"prefill": prefill_schedule(vector), "decode": decode_schedule(vector)}
        self._functions: dict[str, object] = {}

    def function(self, m: int):
        kind = "decode" if m <= self.decode_rows else "prefill"
        fn = self._functions.get(kind)
        if fn is None:
            fn = self._functions[kind] = load_function(self.plan, self.schedules[kind])
        return fn

    def __call__(self, bound: Bound):
        spec, sizes = self.spec, bound.sizes
        q = bound.q
        out = empty(out_shape(spec, bound), q.dtype, q.device)
        lse = empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
        if sizes["M"] > 0:
            args = [_unit_last(canonical_view(t, decl)) for t, decl in
                    ((q, spec.q), (bound.k, spec.k), (bound.v, spec.v))]
            out_view = canonical_view(out, spec.q)  # freshly allocated in q's layout: head dim is contiguous
            args.append(out_view)
            if lse is not None:
                args.append(lse)
            args += [_table(bound.inputs[t.name]) for t in spec.inputs]
            args += [int(v) if isinstance(v, bool) else v for v in (bound.params[p.name] for p in spec.params)]
            self.function(sizes["M"])(*args)
        return (out, lse) if spec.returns_lse else out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels load along the head dim with vector loads; a view strided there is copied (rare)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _table(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


register_backend("tvm", TvmBackend)
