"""The finite set of kernels a Triton plan may launch, listed in the plan (`KernelPlan.kernels`).

A launch picks its kernels with pure functions of the plan and the call's sizes: `launch_tiles` for the prefill
kernel, `decode_launch` for the decode and merge kernels; where the plan's prefill path is Gluon
(passes/warpgroups.py), its one warpgroup kernel (`gluon_kernel`) takes the launches it covers, and where its MLA
decode path is Gluon (passes/latent_decode.py), `latent_launch` picks the Gluon MLA decode kernel's. Their results
range over a finite set, since tiles change only at powers of two of M and of the GQA group and splits are at most
MAX_SPLITS; `list_kernels` enumerates that set. The runtime launches `prefill_kernel` / `DecodeLaunch` records,
and AOT builds compile the list, so a loaded artifact holds every kernel a call can select.
"""
from __future__ import annotations

from dataclasses import replace

from .decode import MAX_SPLITS, combine_kernel, decode_kernel, decode_tiles, upcast
from .latent_decode import latent_kernels
from .plan import KernelLaunch, KernelPlan
from .tiling import LaunchTiles, launch_tiles, next_pow2
from .warpgroups import max_registers


def prefill_kernel(plan: KernelPlan, tiles: LaunchTiles, tma: bool | None) -> KernelLaunch:
    """attn_fwd for a launch of `tiles`; `tma`: K/V through descriptors (None where the plan has no TMA)."""
    c = tiles.config
    return KernelLaunch("attn_fwd", (("BLOCK_M", c.block_m), ("BLOCK_N", c.block_n), ("BLOCK_MQ", tiles.block_mq),
                                     ("PACK", tiles.pack), ("UPCAST", upcast(plan)))
                        + ((("TMA", tma),) if tma is not None else ())
                        + (("num_warps", c.num_warps), ("num_stages", c.num_stages)))


def summary_kernel(tiles: LaunchTiles) -> KernelLaunch:
    """tile_summary, which classes the key tiles of data-dependent masks for attn_fwd's launch of `tiles`."""
    c = tiles.config
    return KernelLaunch("tile_summary", (("BLOCK_M", c.block_m), ("BLOCK_N", c.block_n),
                                         ("BLOCK_MQ", tiles.block_mq), ("PACK", tiles.pack),
                                         ("num_warps", c.num_warps)))


def gluon_kernel(plan: KernelPlan) -> KernelLaunch:
    """attn_fwd_gluon (backends/triton/gluon.py.j2): its tiles are module constants, so a launch passes options only,
    the consumers' warps and the register limit the partitions' setmaxnreg budgets share."""
    w = plan.warpgroups.layout
    return KernelLaunch("attn_fwd_gluon", (("num_warps", w.consumer_warps), ("maxnreg", max_registers(w))))


def gluon_min_m(plan: KernelPlan) -> int:
    """The fewest query rows a launch the Gluon kernel takes has: past the decode regimes, and at least the
    plan's minimum length."""
    return max(plan.tiling.decode_max_m + 1, plan.decode.dense_max_m + 1 if plan.decode else 0,
               plan.warpgroups.min_length)


def gluon_launches(plan: KernelPlan) -> bool:
    """Whether a call can reach the Gluon kernel of a plan whose path is Gluon: not where dims bind M or N short."""
    dims = plan.spec.dim_values
    return dims.get("M", gluon_min_m(plan)) >= gluon_min_m(plan) \
        and dims.get("N", plan.warpgroups.min_length) >= plan.warpgroups.min_length


def list_kernels(plan: KernelPlan) -> KernelPlan:
    found: dict[KernelLaunch, None] = {}
    storage = plan.spec.decode_only
    groups = group_classes(plan)
    if not storage:  # ragged, paged and latent specs run every launch on the decode kernel
        for m in prefill_m_classes(plan):
            for group in groups:
                tiles = launch_tiles(plan, m, group)
                for tma in ((True, False) if plan.triton.tma else (None,)):
                    found[prefill_kernel(plan, tiles, tma)] = None
                if plan.masks.data_dependent:
                    found[summary_kernel(tiles)] = None
        if plan.warpgroups.path == "gluon" and gluon_launches(plan):
            found[gluon_kernel(plan)] = None
    decode_ms = decode_m_classes(plan, storage) if storage or plan.decode.dense_max_m else []
    for m in decode_ms:
        for group in groups:
            tiles = decode_tiles(plan, m, group)
            for split in (False, True):
                found[decode_kernel(plan, tiles, split)] = None
    if plan.decode and plan.decode.warpgroups and plan.decode.warpgroups.path == "gluon":
        rows = plan.decode.warpgroups.layout.block_m
        # its split launches merge with the combine kernels listed below
        found.update(dict.fromkeys(latent_kernels(plan, group_classes(plan, rows))))
    if decode_ms:
        splits = 2
        while splits <= next_pow2(MAX_SPLITS):
            found[combine_kernel(plan, splits)] = None
            splits *= 2
    return replace(plan, kernels=tuple(found))


def group_classes(plan: KernelPlan, limit: int | None = None) -> list[int]:
    """H // HKV values with distinct tiles: the spec's own where dims bind it (one K/V head without an axis: H),
    else the powers of two up to `limit` (default: the most heads a program packs; packing takes the largest power
    of two dividing the group)."""
    spec = plan.spec
    dims = spec.dim_values
    kv_heads = 1 if spec.one_kv_head else dims.get("HKV")
    if "H" in dims and kv_heads:
        return [dims["H"] // kv_heads]
    if not spec.is_gqa_shape:
        return [1]
    limit = limit or max(plan.heads.max_rows, plan.decode.tile.block_m if plan.decode else 1)
    return [g for g in (1 << p for p in range(limit.bit_length())) if "H" not in dims or dims["H"] % g == 0]


def prefill_m_classes(plan: KernelPlan) -> list[int]:
    """One M per prefill tile regime: each decode-tile M (powers of two), then the first M of the short and the
    long prefill tiles."""
    t = plan.tiling
    if "M" in plan.spec.dim_values:
        return [plan.spec.dim_values["M"]]
    return [*(1 << p for p in range(t.decode_max_m.bit_length())), t.decode_max_m + 1,
            *((t.short_max_m + 1,) if t.short else ())]


def decode_m_classes(plan: KernelPlan, storage: bool) -> list[int]:
    """Rows per sequence with distinct decode tiles: powers of two up to the decode tile and, for ragged or
    paged storage (whose every launch runs the decode kernel), the prefill regimes past it."""
    d, t = plan.decode, plan.tiling
    if "M" in plan.spec.dim_values and plan.spec.q_storage is None:
        m = plan.spec.dim_values["M"]
        return [m] if storage or m <= d.dense_max_m else []  # a longer dense M runs the prefill kernel
    top = d.tile.block_m if storage else min(d.tile.block_m, d.dense_max_m)
    ms = [1 << p for p in range(top.bit_length())]
    if storage:
        ms += [d.tile.block_m + 1] + ([t.short_max_m + 1] if t.short and t.short_max_m > d.tile.block_m else [])
    return ms
