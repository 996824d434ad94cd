"""The Hopper MLA decode kernel in Gluon (gluon_decode.py.j2): its source, and a launcher that runs it for the calls
it covers and hands every other call to the Triton decode kernel's launcher.

The plan decides whether it runs and its layout (passes/latent_decode.py); this module adds what only the installed
Triton and the call can tell: whether Triton's Gluon is the one the kernel was written against (gluon.py's
GLUON_TRITON), and per call whether q, the latent and the rope tensors can be read through TMA descriptors.
The split workspace and attn_combine are the Triton decode kernel's: the launcher is a DecodeLauncher whose decode
function is this kernel. `generate_gluon_decode` is pure: the same plan gives the same text.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from functools import lru_cache
from types import SimpleNamespace

from ...dsl.signature import Bound
from ...ir import QUANTIZE_DTYPES, QUANTIZE_TINY, Paged
from ...passes.latent_decode import latent_launch
from ...passes.plan import KernelPlan, LatentDecodeLayout
from .. import names
from . import binaries, launch, scratch
from .gluon import GLUON_DTYPES, gluon_runs
from .serving import DecodeLauncher
from .signature import gluon_decode_signature, spec_args

SOURCE_FILE = "gluon_decode.py"


def generate_gluon_decode(plan: KernelPlan) -> str:
    # the code generators load only where a kernel is built, not on a warm start
    from .decode import ERROR_CONSTANTS, latent_dots, storage_hooks
    from .emit import GLUON_VECTORS
    from .generate import shared_hooks, template

    spec, w = plan.spec, plan.decode.warpgroups.layout
    signature = gluon_decode_signature(spec_args(plan, per_sequence=True))
    storage, _ = storage_hooks(plan)
    return template("gluon_decode.py.j2").render(
        **shared_hooks(plan, "ex2_approx", GLUON_VECTORS),
        **storage,
        vectors=GLUON_VECTORS,
        plan_line=plan_line(plan),
        layout=w,
        rope=rope_hooks(plan, latent_dots(plan)),
        dtype=GLUON_DTYPES[plan.dtype],
        signature=signature.render(),
        runtime_signature=replace(signature, constexprs=()).render(),
        arguments=", ".join(signature.names),
        runtime_scalars=signature.unspecialized(),
        all_partial=bool(plan.masks.evaluated),  # element-wise masks: evaluated on every tile
        partial_before=bool(plan.masks.exact.lower),
        kv_storage="paged" if isinstance(spec.kv_storage, Paged) else "dense",
        err=ERROR_CONSTANTS,
        quantize_max=QUANTIZE_DTYPES["f8e4m3"],
        quantize_tiny=repr(QUANTIZE_TINY),
    )


def rope_hooks(plan: KernelPlan, dots: list[dict]) -> dict:
    """The rope dot's names: its score tile, its size, the base of the program's query rows (PACK heads of position
    pid_m) and their stride, and the key side's base (per sequence, or of the pages) and row stride."""
    spec = plan.spec
    dot = next(d for d in spec.dots if not d.is_qk)
    drawn = next(d for d in dots if d["tile"] != "qk")
    query = spec.input(dot.query)
    axes = {name: axis for axis, name in enumerate(query.shape)}
    base = names.tensor(query.name)
    for axis, index in (("B", "b"), ("M", "pid_m"), ("H", "hp * PACK")):
        if axis in axes:
            base += f" + {index} * {names.stride(query.name, axes[axis])}"
    return dict(tile=drawn["tile"], dim=drawn["dim"], query_base=base,
                query_row_stride=names.stride(query.name, axes["H"]), key_base=drawn["base"],
                key_row_stride=drawn["seq_stride"])


def plan_line(plan: KernelPlan) -> str:
    w = plan.decode.warpgroups.layout
    return (f"gluon/sm_{plan.target.arch} {plan.dtype} MLA decode D={plan.head_dim} DR={w.rope}; {w.block_m} rows, "
            f"BN={w.block_n} stages={w.stages}; score + value warpgroups x {w.consumer_warps} warps + "
            f"{w.producer_warps} producer warp; latent chunks {'+'.join(map(str, w.chunks))}; {w.smem} B shared"
            + (f"; e4m3 stages={w.fp8_stages}, {w.converter_warpgroups} converter warpgroup(s) of "
               f"{w.converter_vector} e4m3 a thread{', P V in f16' if w.f16_values else ''}"
               if w.converter_vector != LatentDecodeLayout.converter_vector else ""))


def load_gluon_decode_module(plan: KernelPlan):
    return launch.cached_module(launch.cache_key(plan).updated(kernel="gluon_decode"), SOURCE_FILE,
                                lambda: generate_gluon_decode(plan), "gd")


def launcher(plan: KernelPlan, fallback, module=None):
    """The plan's decode launcher: `fallback` (the Triton decode kernel's) unless the plan runs the Gluon MLA decode
    kernel and this Triton can; a plan that asked for it (PlanOptions(gluon=True)) and cannot have it warns once,
    saying why. `module` holds the kernel where it was built ahead of time (attnc.load: an AotKernel); by default
    it is compiled here."""
    staged = plan.decode.warpgroups if plan.decode else None
    if staged is None or not gluon_runs(plan, staged.path == "gluon", staged.reason, plan.options.gluon,
                                        "the Gluon MLA decode kernel", "the Triton decode kernel"):
        return fallback
    return GluonDecodeLauncher(plan, module or load_gluon_decode_module(plan), fallback)


@lru_cache(maxsize=None)
def _warn_once(name: str, why: str) -> None:
    warnings.warn(f"attention {name!r}: the Gluon MLA decode kernel does not take this call ({why}); the Triton "
                  f"decode kernel runs it", stacklevel=5)


class GluonDecodeLauncher(DecodeLauncher):
    """attn_decode_gluon for the calls `uncovered` finds nothing against, attn_combine (the Triton decode module's)
    after it where the keys split; every other call goes to `fallback`, with a warning naming why (once per
    reason). No prepared replay: the kernel makes its TMA descriptors on the device (scratch.install)."""

    def __init__(self, plan: KernelPlan, module, fallback: DecodeLauncher):
        # the merge of split launches is the Triton decode module's, which the fallback holds
        super().__init__(plan, SimpleNamespace(attn_decode=module.attn_decode_gluon, attn_combine=fallback.combine_fn))
        self.signature = gluon_decode_signature(self.args)
        self.fallback = fallback

    def choose_launch(self, sizes, sms: int):
        return latent_launch(self.plan, sizes, sms)

    def uncovered(self, bound: Bound) -> str:
        """Why this call cannot run the Gluon kernel ("" where it can): TMA reads q, the latent and the rope tensors
        (unit last strides, 16-byte aligned bases and row strides), and a paged cache's pages are rows of one
        matrix (page stride = PAGE x slot stride) for k and the rope part."""
        spec = self.spec
        dot = next(d for d in spec.dots if not d.is_qk)
        tensors = [(bound.q, spec.q), (bound.k, spec.k), (bound.inputs[dot.query], spec.input(dot.query)),
                   (bound.inputs[dot.key], spec.input(dot.key))]
        for t, decl in tensors:
            if not launch.tma_ready(t):
                return f"{decl.name} is not TMA-readable (a unit last stride, 16-byte aligned base and strides)"
        if isinstance(spec.kv_storage, Paged):
            page = spec.dim_values["PAGE"]
            for t, decl in tensors[1::2]:
                axes = {name: axis for axis, name in enumerate(decl.shape)}
                if t.stride(axes["PAGES"]) != page * t.stride(axes["PAGE"]):
                    return f"{decl.name}'s pages are not one [PAGES * PAGE, ...] matrix (strides {t.stride()})"
        return ""

    def run(self, bound: Bound, go=None):
        why = self.uncovered(bound)
        if why:
            _warn_once(self.spec.name, why)
            return self.fallback.run(bound)
        go = go or self.launch_for(bound)
        outputs = self.outputs(bound, go)
        result = outputs[:2] if self.spec.returns_lse else outputs[0]
        if go is not None:
            scratch.install()
            for fn, grid, args, meta in self.calls(bound, go, *outputs):
                binaries.launch(fn, grid, args, meta)
        return result, None
