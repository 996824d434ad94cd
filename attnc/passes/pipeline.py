"""The ordered PIPELINE of passes, `verify` (run after every pass) and `plan_kernel`."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

from ..errors import CompileError
from ..ir import QK, Attention, IndexVar, walk
from .decode import plan_decode
from .dequant import dequantize
from .fold import fold, fold_spec
from .kernels import list_kernels
from .latent_decode import stage_latent_decode
from .masks import analyze_masks
from .plan import KernelPlan, PlanOptions, Target
from .score import reciprocal_divisors, to_exp2_domain
from .warpgroups import stage_warpgroups
from .tiling import DTYPE_BITS, choose_tiles, share_kv_heads, smem_bytes, smem_capacity, stage_pipeline

Pass = Callable[[KernelPlan], KernelPlan]
FP8_E4M3_ARCH = 89  # the first CUDA arch whose Triton converts f8e4m3 (float8e4nv)


def fold_constants(plan: KernelPlan) -> KernelPlan:
    sizes = {**plan.spec.dim_values, "D": plan.head_dim, "DV": plan.value_dim}
    value_scale = None if plan.value_scale is None else fold(plan.value_scale, sizes)
    return replace(plan, spec=fold_spec(plan.spec, sizes), value_scale=value_scale)


# Backend-neutral: what the math is, whatever runs it.
NEUTRAL: tuple[Pass, ...] = (
    dequantize,  # FP8 K/V: key-side scales into the score, the values' scale onto the output rows
    fold_constants,  # dims and head dims become literals, so later passes and kernels see constants
    analyze_masks,  # masks -> key-range loop bounds, full/partial tiles, element-wise checks
    to_exp2_domain,  # the normalizer in base 2, log2(e) folded into qk's scale: one multiply per score
)
# Then one schedule per backend: how its kernels run. TVM's loop schedule is chosen in backends/tvm from the
# neutral plan, so its list is empty.
SCHEDULES: dict[str, tuple[Pass, ...]] = {
    "triton": (
        reciprocal_divisors,  # a division by a per-program, per-row or per-key value: a multiply by its reciprocal
        choose_tiles,  # block sizes and warps from arch, dtype and head dim (one tuned table)
        share_kv_heads,  # GQA: let a program take the query heads that share one K/V head
        stage_pipeline,  # software-pipelining depth that fits shared memory; Hopper TMA / warp-spec flags
        stage_warpgroups,  # sm_90: the Gluon warpgroup-specialized prefill (producer warp, consumer warpgroups)
        plan_decode,  # small-M tiles with packed GQA heads and split-KV bounds: decode and ragged/paged storage
        stage_latent_decode,  # sm_90 MLA decode: the Gluon warpgroup kernel (producer warp, two consumer warpgroups)
        list_kernels,  # every kernel a launch may select: the runtime, AOT and autotune share one finite list
    ),
    "tvm": (),
}


def pipeline(backend: str) -> tuple[Pass, ...]:
    """The passes a plan for `backend` runs, in order."""
    return NEUTRAL + SCHEDULES[backend]


PIPELINE = pipeline("triton")


def plan_kernel(spec: Attention, target: Target, head_dim: int, value_dim: int,
                options: PlanOptions = PlanOptions(), check: bool = True) -> KernelPlan:
    """Run every pass; `check` verifies the plan after each one."""
    *_, (_, plan) = plan_steps(spec, target, head_dim, value_dim, options, check)
    return plan


def plan_steps(spec: Attention, target: Target, head_dim: int, value_dim: int,
               options: PlanOptions = PlanOptions(), check: bool = True) -> Iterator[tuple[str, KernelPlan]]:
    """("spec", the empty plan), then (pass name, the plan after it) for each pass (`attnc explain` shows them)."""
    if spec.dequant and target.backend != "triton":
        raise CompileError(f"attention {spec.name!r} reads FP8 K/V ({', '.join(d.tensor for d in spec.dequant)}, "
                           f"with `dequant`), which runs on backend='triton' only (CUDA tensors, or the Triton "
                           f"interpreter on the CPU with TRITON_INTERPRET=1); the {target.backend} backend has no "
                           f"FP8 loads. Pass backend='triton', or dequantise the cache yourself (k.to(q.dtype) * "
                           f"scale) and call a spec declaring q's dtype")
    if spec.quantize and target.backend != "triton":
        quantized = ", ".join(d.tensor for d in spec.quantize)
        raise CompileError(f"attention {spec.name!r} quantises its queries ({quantized}, with `quantize`), which runs "
                           f"on backend='triton' only (CUDA tensors, or the Triton interpreter on the CPU with "
                           f"TRITON_INTERPRET=1); the {target.backend} backend's kernels read the queries as they "
                           f"are. Pass backend='triton'")
    e4m3 = [t.name for t in (spec.k, spec.v, *spec.inputs) if t.dtype == "f8e4m3"]
    if e4m3 and target.arch is not None and target.arch < FP8_E4M3_ARCH:
        raise CompileError(f"attention {spec.name!r}: {e4m3[0]} is f8e4m3, which Triton converts on sm_"
                           f"{FP8_E4M3_ARCH} (Ada) and newer only, not on sm_{target.arch}; store the cache as f8e5m2 "
                           f"there, or dequantise it to q's dtype")
    if spec.is_latent and target.backend != "triton":
        raise CompileError(f"attention {spec.name!r} is multi-head latent attention (a dot product other than qk, or "
                           f"keys that are the values), which runs on backend='triton' only (CUDA tensors, or the "
                           f"Triton interpreter on the CPU with TRITON_INTERPRET=1); the {target.backend} backend "
                           f"has no kernel for it")
    unbound = [d for d in (spec.dot_dim(dot) for dot in spec.dots) if d != "D" and d not in spec.dim_values]
    if unbound:
        raise CompileError(f"attention {spec.name!r}: the head dim {unbound[0]} of a dot product sizes a kernel's "
                           f"tile, so bind it at compile time with `dims {unbound[0]} = ...`")
    plan = KernelPlan(spec=spec, spec_key=spec.key, target=target, head_dim=head_dim, value_dim=value_dim, options=options)
    yield "spec", plan
    for step in pipeline(target.backend):
        plan = step(plan)
        if check:
            verify(plan, after=step.__name__)
        yield step.__name__, plan


def verify(plan: KernelPlan, after: str = "") -> None:
    """Check the invariants of whatever parts of the plan are filled in; raise CompileError naming the pass."""
    problems = []
    if plan.spec.q.dtype not in DTYPE_BITS:
        problems.append(f"q dtype {plan.spec.q.dtype} is not one of {sorted(DTYPE_BITS)}")
    if plan.head_dim < 1 or plan.value_dim < 1:
        problems.append(f"head dims must be positive, got D={plan.head_dim} DV={plan.value_dim}")
    if plan.masks is not None:
        for r in (plan.masks.exact, plan.masks.hull):
            for bound in r.lower + r.upper:
                if any(isinstance(n, QK) or (isinstance(n, IndexVar) and n.name == "j") for n in walk(bound)):
                    problems.append(f"a key bound depends on j or qk: {bound}")
        if set(plan.masks.exact.lower) - set(plan.masks.hull.lower):
            problems.append("the loop hull must include every exact lower bound")
    if plan.tiling is not None:
        t = plan.tiling
        for c in t.configs:
            for v in (c.block_m, c.block_n):
                if v < 16 or v & (v - 1):
                    problems.append(f"block sizes must be powers of two >= 16, got {c}")
        if t.block_d < plan.head_dim or t.block_dv < plan.value_dim:
            problems.append("the head-dim tile must cover the head dim")
        if any(w < 16 or w & (w - 1) for w in t.d_chunks) or not (
                sum(t.d_chunks) == plan.head_dim or t.d_chunks == (t.block_d,)):
            problems.append(f"D's chunks {t.d_chunks} must be powers of two >= 16 that sum to D={plan.head_dim}, "
                            f"or one chunk of BLOCK_D={t.block_d}")
        if plan.heads is not None and plan.heads.max_rows > t.decode.block_m:
            problems.append("packed rows exceed the decode tile")
        if plan.triton is not None:
            cap = smem_capacity(plan.target.arch)
            prefill = ((t.prefill, t.prefill_d),) + (((t.short, t.prefill_d),) if t.short else ())
            for c, block_d in prefill + ((t.decode, t.block_d),):  # prefill tiles hold D's chunks, decode D padded
                need = smem_bytes(c.block_m, c.block_n, block_d, t.block_dv, 1, DTYPE_BITS[plan.dtype] // 8)
                if need > cap:
                    problems.append(f"tile {c} needs {need} B of shared memory even unpipelined; the device has "
                                    f"{cap} B: pass smaller block_m/block_n")
    if problems:
        where = f" after pass {after}" if after else ""
        raise CompileError(f"invalid kernel plan for {plan.spec.name!r}{where}: " + "; ".join(problems))


def head_dims(spec: Attention, head_dim: int | None = None, value_dim: int | None = None) -> tuple[int, int]:
    """D and DV for planning without tensors (CLI, AOT): from the arguments or the spec's `dims`."""
    dims = spec.dim_values
    d = head_dim or dims.get("D")
    if d is None:
        raise CompileError(f"attention {spec.name!r}: the head dim D is only known from tensors; bind it with "
                           f"`dims D = 128` in the spec, or pass it (CLI: --dims D=128)")
    return d, value_dim or dims.get("DV") or d
