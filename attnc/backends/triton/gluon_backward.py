"""The backward's dK/dV kernel on sm_90 in Gluon (gluon_backward.py.j2; layout: passes/warpgroups.py dkdv_layout):
its source, and the launch that gradients.BackwardLauncher makes in place of the template's attn_bwd_dkdv where the
plan has a layout (PlanOptions(gluon_backward=True)), this Triton has the Gluon API it was written against and the
call's q, k, v and dO can be read through TMA descriptors; elsewhere the template's kernel runs.
`generate_gluon_dkdv` is pure: the same plan gives the same text."""
from __future__ import annotations

import torch

from ...passes.grad import derive, plan_backward
from ...passes.plan import DkdvLayout, KernelPlan
from ...passes.warpgroups import dkdv_shared_bytes, max_registers
from . import binaries, launch, scratch
from .signature import Signature, gluon_dkdv_signature, spec_args

SOURCE_FILE = "gluon_dkdv.py"


def generate_gluon_dkdv(plan: KernelPlan) -> str:
    from .backward import _orientation, dkdv_hooks
    from .emit import GLUON_VECTORS, KEY_MAJOR, PTX_EXP2
    from .generate import shared_hooks, template
    from .gluon import GLUON_DTYPES

    layout = plan_backward(plan).gluon_dkdv
    signature = gluon_dkdv_signature(spec_args(plan), layout.dq_in_dkdv)
    hooks = shared_hooks(plan, PTX_EXP2, GLUON_VECTORS)
    dkdv = dkdv_hooks(plan, derive(plan.spec), PTX_EXP2, GLUON_VECTORS, full_range=False, select_zero_dqk=False)
    return template("gluon_backward.py.j2").render(
        **hooks,
        plan_line=plan_line(plan, layout),
        layout=layout,
        dtype=GLUON_DTYPES[plan.dtype],
        # one wgmma layout for dK and dV: its instruction N divides both widths (powers of two)
        mma_kv_n=min(plan.tiling.block_d, plan.tiling.block_dv),
        head_lines="\n".join(dkdv["prologue"]), range_lines="\n".join(dkdv["range_lines"]),
        row_lines=dkdv["row_lines"], tiles=dkdv["tiles"], full=dkdv["full"], key_major=_orientation(KEY_MAJOR),
        signature=signature.render(), arguments=", ".join(signature.names), runtime_scalars=signature.unspecialized(),
    )


def plan_line(plan: KernelPlan, layout: DkdvLayout) -> str:
    return (f"gluon/sm_{plan.target.arch} {plan.dtype} D={plan.head_dim} DV={plan.value_dim}; dK/dV of "
            f"{layout.block_n} keys per program, {layout.consumers}x{layout.consumer_warps} consumer warps of "
            f"{layout.keys_per_consumer} keys + {layout.producer_warps} producer warp; Q and dO in "
            f"{layout.stages} stages of {layout.block_m} rows; {dkdv_shared_bytes(plan, layout)} B of shared memory"
            + ("; P^T and dS^T of the next tile under dV and dK" if layout.ds_under_dkdv else "")
            + ("; dQ by TMA reduce-add of each consumer's columns" if layout.split_dq
               else "; dQ by TMA reduce-add of the consumers' sum" if layout.dq_in_dkdv else ""))


def load_module(plan: KernelPlan):
    key = launch.cache_key(plan).updated(kernel="gluon_dkdv", backward=repr(plan_backward(plan)))
    return launch.cached_module(key, SOURCE_FILE, lambda: generate_gluon_dkdv(plan), "d")


class GluonDkdv:
    """Launches attn_bwd_dkdv_gluon for the calls it covers (`covers`), with BackwardLauncher's values."""

    def __init__(self, plan: KernelPlan, module=None):
        self.plan, self.spec = plan, plan.spec
        self.layout = plan_backward(plan).gluon_dkdv
        self.kernel = (module or load_module(plan)).attn_bwd_dkdv_gluon
        self.signature: Signature = gluon_dkdv_signature(spec_args(plan), self.layout.dq_in_dkdv)

    def covers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
               dq: torch.Tensor, deterministic: bool) -> bool:
        """Whether TMA can read q, k, v and dO (and reduce-add into the float32 dQ, `dq_in_dkdv`) through per-head
        descriptors, and a head's lse (and delta, lse-shaped) rows are int32 offsets from its base (the template's
        kernel runs other calls, and deterministic ones where this kernel adds dQ: its adds are unordered)."""
        spec = self.spec
        dq_read = ((dq, spec.q),) if self.layout.dq_in_dkdv else ()
        return not (deterministic and self.layout.dq_in_dkdv) and lse.numel() < 2 ** 31 and all(
            launch.descriptor_ready(t, decl) for t, decl in ((q, spec.q), (k, spec.k), (v, spec.v), (dout, spec.q),
                                                            *dq_read))

    def grid(self, sizes) -> tuple[int, int]:
        return -(-sizes["N"] // self.layout.block_n), sizes["B"] * sizes["H"]

    def __call__(self, sizes, values: dict) -> None:
        """One launch; `values` holds the signature's groups (BackwardLauncher's, pointers of this kernel's)."""
        grid = self.grid(sizes)
        if not grid[0] * grid[1]:
            return
        scratch.install()  # the device-side tensor descriptors' scratch
        binaries.launch(self.kernel, grid, self.signature.pack(values),
                        {"num_warps": self.layout.consumer_warps, "maxnreg": max_registers(self.layout)})
