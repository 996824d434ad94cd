"""The Hopper MLA decode kernel in Gluon (gluon_decode.py.j2): its source, and a launcher that runs it for the calls
it covers and hands every other call to the Triton decode kernel's launcher.

The plan decides whether it runs and its layout (passes/latent_decode.py); this module adds what only the installed
Triton and the call can tell: whether Triton's Gluon is the one the kernel was written against (gluon.py's
GLUON_TRITON), and per call whether q, the latent and the rope tensors can be read through TMA descriptors.
The split workspace and attn_combine are the Triton decode kernel's: the launcher is a DecodeLauncher whose decode
function is this kernel. The persistent schedule (passes/latent_decode.py balanced_shares) adds the items' cumulative
key tiles (`schedule_tiles`: torch ops on the lengths, no host sync, so a CUDA graph captures them), a workspace row
per (program + item) and attn_combine_scheduled for the items the shares cut. `generate_gluon_decode` is pure: the
same plan gives the same text.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from functools import lru_cache
from types import SimpleNamespace

import torch

from ...dsl.signature import Bound
from ...ir import QUANTIZE_DTYPES, QUANTIZE_TINY, Paged
from ...passes.decode import DecodeLaunch, workspace_rows
from ...passes.latent_decode import latent_launch
from ...passes.plan import KernelPlan, LatentDecodeLayout
from .. import device_errors, names
from . import binaries, launch, scratch
from .gluon import GLUON_DTYPES, gluon_runs
from .serving import DecodeLauncher, load_decode_module
from .signature import SCHEDULED_COMBINE_SIGNATURE, gluon_decode_signature, qkv_values, spec_args

SOURCE_FILE = "gluon_decode.py"


def generate_gluon_decode(plan: KernelPlan) -> str:
    # the code generators load only where a kernel is built, not on a warm start
    from .decode import ERROR_CONSTANTS, latent_dots, storage_hooks
    from .emit import GLUON_VECTORS, PTX_EXP2
    from .generate import shared_hooks, template

    spec, w = plan.spec, plan.decode.warpgroups.layout
    signature = gluon_decode_signature(spec_args(plan, per_sequence=True), w.persistent)
    storage, _ = storage_hooks(plan)
    return template("gluon_decode.py.j2").render(
        **shared_hooks(plan, PTX_EXP2, GLUON_VECTORS),
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
               if w.converter_vector != LatentDecodeLayout.converter_vector else "")
            + (f"; QK^T fp8 x fp8, float32 every {w.fp8_float32_sum_every} products" if w.fp8_float32_sum_every else ""))


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


def schedule_tiles(lengths: torch.Tensor | None, batch: int, capacity: int, block_n: int, items_per_sequence: int,
                   device: torch.device) -> torch.Tensor:
    """The items' cumulative key tiles, int32 [items + 1] on the device (latent_decode.item_tiles's rule: lengths
    clamped to [0, capacity], a bad length that clamps to nothing keeps one tile; None: every sequence `capacity`
    long). Torch ops without a host sync."""
    if lengths is None:
        tiles = torch.full((batch,), -(-capacity // block_n), dtype=torch.int64, device=device)
    else:
        lengths = lengths.to(torch.int64)
        kept = lengths.clamp(0, capacity)
        tiles = torch.maximum((kept + block_n - 1) // block_n, (kept != lengths).to(torch.int64))
    cumulative = torch.zeros(batch * items_per_sequence + 1, dtype=torch.int32, device=device)
    cumulative[1:] = tiles.repeat_interleave(items_per_sequence).cumsum(0)
    return cumulative


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
        self.persistent = plan.decode.warpgroups.layout.persistent
        self.signature = gluon_decode_signature(self.args, self.persistent)
        self.fallback = fallback
        if self.persistent:  # JIT only: attnc compile plans with PlanOptions(), never persistent
            self.combine_fn = load_decode_module(plan).attn_combine_scheduled

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
        if self.persistent and (bound.sizes["M"] != 1 or bound.sizes["HKV"] != 1):
            return "the persistent schedule takes one query position and one latent head (M = HKV = 1)"
        if isinstance(spec.kv_storage, Paged):
            page = spec.dim_values["PAGE"]
            for t, decl in tensors[1::2]:
                axes = {name: axis for axis, name in enumerate(decl.shape)}
                if t.stride(axes["PAGES"]) != page * t.stride(axes["PAGE"]):
                    return f"{decl.name}'s pages are not one [PAGES * PAGE, ...] matrix (strides {t.stride()})"
        return ""

    def outputs(self, bound: Bound, go: DecodeLaunch | None) -> tuple:
        """out, lse, and for a persistent launch its workspace: a partial row per (program + item) [slots, H, 1, DV]
        and its lse [slots, H]."""
        if go is None or not go.programs:
            return super().outputs(bound, go)
        out, lse = super().outputs(bound, None)[:2]
        sizes, device = bound.sizes, bound.q.device
        slots = go.programs + sizes["B"] * sizes["M"] * (sizes["H"] // go.tiles.pack)
        return (out, lse, torch.empty(slots, sizes["H"], 1, sizes["DV"], dtype=torch.float32, device=device),
                torch.empty(slots, sizes["H"], dtype=torch.float32, device=device))

    def calls(self, bound: Bound, go: DecodeLaunch, out, lse, ws_out, ws_lse) -> list[tuple]:
        """DecodeLauncher's, or for a persistent launch: attn_decode_gluon over `go.programs` programs with the
        schedule, then attn_combine_scheduled over every (row, head) (it skips the items written whole)."""
        if not go.programs:
            return super().calls(bound, go, out, lse, ws_out, ws_lse)
        spec, sizes = self.spec, bound.sizes
        kv = spec.kv_storage
        lengths = bound.inputs[kv.lengths] if isinstance(kv, Paged) else None
        schedule = schedule_tiles(lengths, sizes["B"], sizes["N"], self.plan.decode.warpgroups.layout.block_n,
                                  sizes["H"] // go.tiles.pack, bound.q.device)
        values = self.args.values(sizes, bound.params, bound.inputs)
        values.update(qkv_values(spec, bound, out, lse), workspace=(ws_out, ws_lse),
                      workspace_strides=(ws_out.stride(0), ws_out.stride(1), 0, ws_lse.stride(0), ws_lse.stride(1)),
                      launch=(go.search_steps, go.programs), errors=(device_errors.buffer(bound.q.device),),
                      site=(self.site,), schedule=(schedule,))
        rows = workspace_rows(spec, sizes)
        calls = [(self.decode_fn, (go.programs, 1), self.signature.pack(values), go.decode.keywords)]
        values.update(outputs=values["pointers"][3:], rows=(rows, sizes["M"], go.programs), item_heads=(go.tiles.pack,))
        calls.append((self.combine_fn, (-(-rows // go.combine_rows), sizes["H"]),
                      SCHEDULED_COMBINE_SIGNATURE.pack(values), go.combine.keywords))
        return calls

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
            calls = self.calls(bound, go, *outputs)
            if binaries.compiling(*calls[0]):
                # the Triton decode kernel meanwhile; a later call takes this kernel once it is built
                return self.fallback.run(bound)[0], None
            for fn, grid, args, meta in calls:
                binaries.launch(fn, grid, args, meta)
        return result, None
