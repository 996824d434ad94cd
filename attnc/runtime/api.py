"""The public entry points of the runtime: `attnc.compile`, `attnc.load`, and the text `attnc show` prints."""
from __future__ import annotations

import difflib
import os
from typing import overload

from ..dsl import compiler
from ..dsl.flex import create_block_mask, flex_attention  # noqa: F401  (attnc's public names)
from ..dsl.trace import attention  # noqa: F401
from ..errors import CallError, checks_arguments
from ..ir import Attention
from ..passes import KernelPlan, PlanOptions, Target, head_dims, plan_kernel
from .kernel import AttentionKernel, Kernel, Result  # noqa: F401  (Result: the type of a kernel's result)


@checks_arguments
def compile(spec: Attention, backend: str | None = None, options: PlanOptions | None = None,
            autotune: bool = False, deterministic: bool | None = None) -> AttentionKernel:
    """A callable kernel for `spec`. backend None picks per call from the tensors' device (triton for CUDA,
    tvm for CPU, or triton's interpreter on CPU when TRITON_INTERPRET=1). Building happens on the first call
    for each device and head dim, through the kernel cache. autotune=True times candidate prefill tiles on the
    first call of each shape regime and keeps the fastest correct one in the kernel cache (runtime/autotune.py).
    Calls that need gradients (or that torch.compile traces) run as the op attnc::attention with a backward
    (runtime/autograd.py); deterministic=True makes the backward avoid float atomics, None follows
    torch.use_deterministic_algorithms."""
    if autotune:
        from .autotune import TunedKernel

        return TunedKernel(spec, backend, options, deterministic)
    return Kernel(spec, backend, options, deterministic)


@overload
def load(path: str | os.PathLike[str], name: None = None) -> dict[str, AttentionKernel]: ...
@overload
def load(path: str | os.PathLike[str], name: str) -> AttentionKernel: ...


@checks_arguments
def load(path: str | os.PathLike[str], name: str | None = None) -> dict[str, AttentionKernel] | AttentionKernel:
    """The kernels `attnc compile FILE -o DIR` built ahead of time, run without compiling: a dict name -> kernel
    of every attention in DIR, or with `name`, that attention's kernel. Triton artifacts load as Kernels whose
    backend runs the saved kernels (attnc.backends.triton.aot), `--backend tvm` ones through
    attnc.backends.tvm.aot; both are called the same way."""
    from ..backends.triton.aot import load_backends
    from ..backends.tvm import aot as tvm_aot

    if tvm_aot.is_artifact(path):
        kernels: dict[str, AttentionKernel] = tvm_aot.load(path)
    else:
        kernels = {attention: Kernel(spec, backend=backend, options=PlanOptions())
                   for attention, (spec, backend) in load_backends(path).items()}
    if name is None:
        return kernels
    if name not in kernels:
        close = difflib.get_close_matches(name, list(kernels), n=1)
        raise CallError(f"name: {os.fspath(path)} has no attention named {name!r}"
                        f"{f'; did you mean {close[0]!r}?' if close else ''} (it has: {', '.join(kernels)})")
    return kernels[name]


# `attnc show --emit plan|triton`: planned for an H100 (sm_90); an unbound head dim is shown as 128.
SHOW_TARGET = Target("triton", "cuda", 90)
SHOW_HEAD_DIM = 128


def _show_plan(spec: Attention, options: PlanOptions = PlanOptions()) -> tuple[KernelPlan, str]:
    dims = spec.dim_values
    note = "" if "D" in dims else f"# D is not bound by `dims`: shown for D = {SHOW_HEAD_DIM}\n"
    d, dv = head_dims(spec, dims.get("D", SHOW_HEAD_DIM))
    return plan_kernel(spec, SHOW_TARGET, d, dv, options), note


def emit_plan(spec: Attention) -> str:
    plan, note = _show_plan(spec)
    return note + plan.describe() + "\n"


def emit_triton(spec: Attention) -> str:
    from ..backends.triton.decode import generate_decode
    from ..backends.triton.generate import generate

    plan, note = _show_plan(spec)
    # latent attention and FP8 K/V: the decode kernel only
    return note + (generate_decode(plan) if spec.decode_kernel_only else generate(plan))


def emit_gluon(spec: Attention) -> str:
    """The Gluon warpgroup prefill kernel the plan runs with PlanOptions(gluon=True), or why it does not apply."""
    from ..backends.triton.gluon import generate_gluon

    plan, note = _show_plan(spec, PlanOptions(gluon=True))
    if plan.warpgroups.path != "gluon":
        return f"{note}# {spec.name}: no Gluon kernel ({plan.warpgroups.reason}); the Triton template runs\n"
    return note + generate_gluon(plan)


compiler.install(compile)  # the front-ends (decorator, flex) compile what they trace through this
