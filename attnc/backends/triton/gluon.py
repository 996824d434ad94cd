"""The Hopper warpgroup-specialized forward in Gluon (gluon.py.j2): its source, and a launcher that runs it for the
prefill launches it covers and hands every other launch to the Triton template's launcher.

The plan decides the path and the layout (passes/warpgroups.py); this module adds what only the installed Triton
and the call can tell: whether Triton's Gluon has the Hopper API the kernel was written against (GLUON_TRITON:
the kernel has been compiled with these versions only), and per call whether q, k and v can be read through TMA
descriptors. `generate_gluon` is pure: the same plan gives the same text.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from ...dsl.signature import Bound, lse_shape, out_shape
from ...passes.kernels import gluon_kernel, gluon_min_m
from ...passes.plan import KernelPlan
from . import binaries, launch, scratch
from .signature import Signature, gluon_signature, qkv_values, spec_args

SOURCE_FILE = "gluon_kernel.py"
GLUON_TRITON = ("3.6",)  # Triton releases (major.minor) whose Gluon the kernel compiles with
GLUON_DTYPES = {"f16": "gl.float16", "bf16": "gl.bfloat16"}


def generate_gluon(plan: KernelPlan) -> str:
    from .emit import GLUON_VECTORS, PTX_EXP2
    from .generate import d_chunks, shared_hooks, template

    w, masks = plan.warpgroups.layout, plan.masks
    signature = gluon_signature(spec_args(plan))
    hooks = shared_hooks(plan, PTX_EXP2, GLUON_VECTORS)
    return template("gluon.py.j2").render(
        **hooks,
        d_chunks=d_chunks(w.d_chunks, hooks),
        vectors=GLUON_VECTORS,
        plan_line=plan_line(plan),
        layout=w,
        handoff=w.schedule == "pingpong",
        persistent=w.persistent,
        dtype=GLUON_DTYPES[plan.dtype],
        # One wgmma layout for the score tile and the accumulator: its instruction N divides both.
        mma_n=min(w.block_n, plan.tiling.block_dv),
        signature=signature.render(),
        arguments=", ".join(signature.names),
        runtime_scalars=signature.unspecialized(),
        # Data-dependent masks have no tile summary here: every tile of the hull evaluates them.
        all_partial=bool(masks.evaluated),
        partial_before=bool(masks.exact.lower),
    )


def plan_line(plan: KernelPlan) -> str:
    w = plan.warpgroups.layout
    return (f"gluon/sm_{plan.target.arch} {plan.dtype} D={plan.head_dim} DV={plan.value_dim}; BM={w.block_m} "
            f"BN={w.block_n} stages={w.stages}; {w.consumers}x{w.consumer_warps} consumer warps {w.schedule}"
            f"{' overlapped' if w.overlap else ''}"
            + (", weights under P V (P in shared memory)" if w.weights_under_pv else "")
            + f" + {w.producer_warps} producer warp"
            + (f"; QK^T over D's chunks {'+'.join(map(str, w.d_chunks))}" if len(w.d_chunks) > 1 else "")
            + ("; persistent: a program per SM over the work tiles" if w.persistent else "")
            + (", out through a buffer of its own" if w.out_buffer else ""))


@lru_cache(maxsize=None)
def unavailable_here() -> str:
    """Why this Triton cannot run the Gluon kernel ("" where it can)."""
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    if release not in GLUON_TRITON:
        return f"Triton {triton.__version__}: the Gluon kernel is written for Triton {', '.join(GLUON_TRITON)}"
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError as e:
        return f"Triton {triton.__version__} has no Gluon Hopper API ({e})"
    return ""


def gluon_runs(plan: KernelPlan, staged: bool, reason: str, asked: bool | None, kernel: str, instead: str = "") -> bool:
    """Whether a Gluon kernel runs for `plan`: the plan staged it (else `reason` says why not) and this Triton can
    build it; where the options asked for it (`asked`) and it does not run, a warning names the kernel, why, and
    (`instead`) what runs in its place. One rule for the forward, MLA decode and dK/dV kernels."""
    why = unavailable_here() if staged else reason
    if asked and why:
        warnings.warn(f"attention {plan.spec.name!r}: {kernel} was asked for and does not run ({why})"
                      + (f"; {instead} runs instead" if instead else ""), stacklevel=5)
    return staged and not why


def load_gluon_module(plan: KernelPlan):
    return launch.cached_module(launch.cache_key(plan).updated(kernel="gluon"), SOURCE_FILE,
                                lambda: generate_gluon(plan), "g")


def launcher(plan: KernelPlan, fallback, module=None):
    """The plan's launcher: `fallback` (the template's) unless the plan runs the Gluon kernel and this Triton can;
    a plan that asked for it (PlanOptions(gluon=True)) and cannot have it warns once, saying why. `module` holds
    the kernel where it was built ahead of time (attnc.load: an AotKernel); by default it is compiled here."""
    staged = plan.warpgroups
    if not gluon_runs(plan, staged.path == "gluon", staged.reason, plan.options.gluon,
                      "the Gluon warpgroup kernel", "the Triton template"):
        return fallback
    return GluonLauncher(plan, module or load_gluon_module(plan), fallback)


@lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The device's SM count: the persistent kernel's grid."""
    return torch.cuda.get_device_properties(device).multi_processor_count


class GluonLauncher:
    def __init__(self, plan: KernelPlan, module, fallback):
        self.plan, self.spec, self.fallback = plan, plan.spec, fallback
        self.kernel = module.attn_fwd_gluon
        self.args = spec_args(plan)
        self.signature: Signature = gluon_signature(self.args)
        self.min_m = gluon_min_m(plan)
        self.options = gluon_kernel(plan).keywords  # the plan's kernel list names the launch (passes/kernels.py)

    def __call__(self, bound: Bound):
        return self.run(bound)[0]

    def covers(self, bound: Bound) -> bool:
        """Prefill launches (past the decode regime) whose q, k and v TMA can read (persistent programs: through one
        descriptor over all heads)."""
        spec = self.spec
        sizes = bound.sizes
        tensors = ((bound.q, spec.q), (bound.k, spec.k), (bound.v, spec.v))
        return sizes["M"] >= self.min_m and sizes["N"] >= self.plan.warpgroups.min_length \
            and all(launch.descriptor_ready(t, decl) for t, decl in tensors) \
            and (not self.plan.warpgroups.layout.persistent
                 or all(launch.heads_addressable(t, decl) for t, decl in tensors))

    def run(self, bound: Bound):
        if not self.covers(bound):
            return self.fallback.run(bound)
        spec, sizes, q = self.spec, bound.sizes, bound.q
        out = launch.empty(out_shape(spec, bound), q.dtype, q.device)
        lse = launch.empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
        values = self.args.values(sizes, bound.params, bound.inputs)
        values.update(qkv_values(spec, bound, out, lse))
        w = self.plan.warpgroups.layout
        grid = (-(-sizes["M"] // w.block_m), sizes["B"] * sizes["H"])
        if w.persistent:  # a program per SM, each looping over the work tiles (at most one per tile)
            grid = (min(grid[0] * grid[1], multiprocessors(q.device)),)
        scratch.install()
        args = self.signature.pack(values)
        if binaries.compiling(self.kernel, grid, args, self.options):
            # the template meanwhile, with no prepared launch: a later call takes this kernel once it is built
            return self.fallback.run(bound)[0], None
        compiled = binaries.launch(self.kernel, grid, args, self.options)
        result = (out, lse) if spec.returns_lse else out
        direct = launch.direct_launch(compiled, q.device)
        if direct is None or not launch.replayable(args):
            return result, None
        # Later calls of this call_key are covered too: their strides and sizes are these, and the prepared launch
        # checks the 16-byte alignment descriptor_ready asks of the pointers
        return result, launch.PreparedLaunch(self, bound, None, launch.KernelReplay(direct, grid, self.kernel, args,
                                                                                    self.options))
