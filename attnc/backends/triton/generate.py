"""KernelPlan -> the source of a Python module holding the Triton kernels (`attn_fwd`, and `tile_summary`
when masks read tensors at i/j). `generate` is pure: the same plan gives the same text."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from ...version import __version__
from ...ir import QK, Expr, Num
from .. import names
from ...passes.plan import KernelPlan, KeyRange
from ...passes.score import qk_times
from .emit import PORTABLE_EXP2, TILE, TRITON_VECTORS, Emitter, Vectors, exp2_for
from .signature import prefill_signature, spec_args, summary_signature
from .normalize import folds_logit_scale, lower as lower_normalizer

@lru_cache(maxsize=None)
def template(name: str) -> jinja2.Template:
    """A kernel template of this package: kernel.py.j2 (prefill), decode.py.j2 (split-KV, paged, ragged)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template(name)


def shared_hooks(plan: KernelPlan, exp2: str = PORTABLE_EXP2, vectors: Vectors = TRITON_VECTORS) -> dict:
    """The hooks every template fills the same way: per-row key bounds (prologue), the logits tile, the evaluated
    masks, the normalizer's lowering and its sink, the head-dim padding masks and the dot precision; `exp2` names
    the base-2 exponential, `vectors` spells new vectors (Triton or Gluon)."""
    spec, masks, tiling = plan.spec, plan.masks, plan.tiling
    main = Emitter(spec, exp2, vectors=vectors, approx=plan.approximated())
    bounds(main, masks.exact, masks.hull)
    sink = None
    if plan.score.sink2 is not None:
        v = main.value(plan.score.sink2)
        sink = main.as_float(v, v.level) if v.level else f"{vectors.zeros('[BLOCK_M]', 'tl.float32')} + {main.as_float(v, 0)}"
    scaled = positive_scale(plan.score.logits2) if folds_logit_scale(spec.normalizer) else None
    with main.scope() as score_lines:
        logits = float_tile(main, plan.score.logits2 if scaled is None else scaled[0])
        with main.scope() as mask_lines:
            keep_terms = "".join(f" & ({as_tile(main, c)})" for c in masks.evaluated)
    # FP8 values' scale per row, read once per program (only the decode template reads FP8: spec.decode_only)
    value_scale = None if plan.value_scale is None else main.as_float(main.value(plan.value_scale), TILE)
    pad_d, pad_dv = tiling.block_d != plan.head_dim, tiling.block_dv != plan.value_dim
    normalizer = lower_normalizer(spec.normalizer, exp2, vectors, None if scaled is None else scaled[1])
    return dict(
        version=__version__, key=plan.spec_key[:16], exp2=exp2, approx_functions=sorted(main.approx),
        head_dim=plan.head_dim, value_dim=plan.value_dim, block_d=tiling.block_d, block_dv=tiling.block_dv,
        prologue="\n".join(main.prologue), score_lines="\n".join(score_lines), logits=logits,
        mask_lines="\n".join(mask_lines), keep_terms=keep_terms, sink=sink, returns_lse=spec.returns_lse,
        value_scale=value_scale,
        normalizer=normalizer,
        dot_args=', input_precision="ieee"' if plan.dtype == "f32" and plan.triton.dot_precision == "ieee" else "",
        d_mask_q=" & (offs_d[None, :] < HEAD_DIM)" if pad_d else "",
        d_mask_k=" & (offs_d[:, None] < HEAD_DIM)" if pad_d else "",
        d_mask_v=" & (offs_dv[None, :] < VALUE_DIM)" if pad_dv else "",
        d_mask_o=" & (offs_dv[None, :] < VALUE_DIM)" if pad_dv else "",
    )


@dataclass(frozen=True)
class DChunk:
    """One power-of-two chunk of q/k's columns, one dot of the prefill's QK^T (Tiling.d_chunks): its names end in
    `suffix` ("" where D is one chunk), `width` names its constant, `offsets` are its columns, `mask_q` / `mask_k`
    the padding masks of a chunk wider than D."""

    suffix: str
    width: str
    size: int
    start: int
    offsets: str
    mask_q: str = ""
    mask_k: str = ""


def d_chunks(widths: tuple[int, ...], hooks: dict) -> list[DChunk]:
    """Chunks of D (Tiling.d_chunks, WarpgroupLayout.d_chunks) as the templates name them; one chunk keeps the
    padded kernel's names and masks."""
    if len(widths) == 1:  # D padded to BLOCK_D
        return [DChunk("", "BLOCK_D", widths[0], 0, "tl.arange(0, BLOCK_D)", hooks["d_mask_q"], hooks["d_mask_k"])]
    starts = [sum(widths[:n]) for n in range(len(widths))]
    return [DChunk(f"_{n}", f"D_CHUNK_{n}", w, s, f"{f'{s} + ' if s else ''}tl.arange(0, D_CHUNK_{n})")
            for n, (w, s) in enumerate(zip(widths, starts))]


def generate(plan: KernelPlan) -> str:
    spec, masks = plan.spec, plan.masks
    args = spec_args(plan)

    summary_prologue, summary_lines = [], []
    if masks.data_dependent:
        summary = Emitter(spec)
        bounds(summary, masks.exact, masks.hull)
        with summary.scope() as summary_lines:
            terms = [as_tile(summary, c) for c in masks.evaluated]
        summary_lines.append("evaluated = " + " & ".join(f"({t})" for t in terms))
        summary_prologue = summary.prologue

    all_partial = bool(masks.evaluated) and not masks.data_dependent
    signature = prefill_signature(args, plan.triton.tma)
    hooks = shared_hooks(plan, exp2_for(plan.target.arch))
    return template("kernel.py.j2").render(
        **hooks,
        d_chunks=d_chunks(plan.tiling.d_chunks, hooks),
        plan_line=_plan_line(plan),
        runtime_scalars=signature.unspecialized(),
        signature=signature.render(),
        summary_signature=summary_signature(args).render() if masks.data_dependent else "",
        all_partial=all_partial,
        # Without a lower key bound the full tiles start at tile 0 (exact_lo = 0): no partial tile precedes them.
        partial_before=bool(masks.exact.lower),
        data_dependent=masks.data_dependent,
        summary_prologue="\n".join(summary_prologue), summary_lines="\n".join(summary_lines),
        tma=plan.triton.tma,
        ws_arg=", warp_specialize=True" if plan.triton.warp_specialize and plan.triton.tma else "",
    )


def bounds(em: Emitter, exact: KeyRange, hull: KeyRange, lines: list[str] | None = None) -> None:
    """Per-row [lo, hi) of the exact and hull key ranges as [BLOCK_M] int64 vectors, appended to `lines` (the
    prologue unless given: the row scope of the dK/dV kernel)."""
    lines = em.prologue if lines is None else lines
    n_keys = names.size("N")
    for name, r in (("exact", exact), ("hull", hull)):
        if name == "hull" and r == exact:
            lines += ["hull_lo = exact_lo", "hull_hi = exact_hi"]
            continue
        lo, hi = f"{name}_lo", f"{name}_hi"
        lines.append(f"{lo} = {em.vectors.zeros('[BLOCK_M]', 'tl.int64')}")
        for e in r.lower:
            lines.append(f"{lo} = tl.maximum({lo}, {em.as_int(em.value(e), em.value(e).level)})")
        lines.append(f"{hi} = {em.vectors.zeros('[BLOCK_M]', 'tl.int64')} + {n_keys}")
        for e in r.upper:
            lines.append(f"{hi} = tl.minimum({hi}, {em.as_int(em.value(e), em.value(e).level)})")
        # Clamped to [0, N], the bounds fit int32, so the masks of partial tiles compare int32 with int32.
        lines += [f"{lo} = tl.minimum({lo}, {n_keys}).to(tl.int32)", f"{hi} = tl.maximum({hi}, 0).to(tl.int32)"]


def as_tile(em: Emitter, e: Expr) -> str:
    """Code for the bool `e` broadcast against a tile."""
    return em.at(em.value(e), TILE)


def positive_scale(logits2: Expr) -> tuple[QK, float] | None:
    """(qk, c) where the base-2 logits are one dot product times a positive literal c (`qk * c`, what `scaled` makes of
    `qk / sqrt(D)`): the softmax's weights then fold c into their exponent (normalize.py)."""
    split = qk_times(logits2)
    if split is not None and isinstance(split[1], Num) and 0 < split[1].value < math.inf:
        return split[0], float(split[1].value)
    return None


def float_tile(em: Emitter, e: Expr) -> str:
    """Code for `e` as a float32 tile."""
    v = em.value(e)
    code = em.as_float(v, TILE)
    return code if v.level == TILE else f"{em.vectors.zeros(em.layout.tile_shape, 'tl.float32')} + {code}"


def _plan_line(plan: KernelPlan) -> str:
    t = plan.tiling

    def tile(c) -> str:
        return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"

    short = f" (M <= {t.short_max_m}: {tile(t.short)})" if t.short else ""
    return (f"{plan.target.backend}/{plan.target.device}"
            f"{'' if plan.target.arch is None else f'/sm_{plan.target.arch}'} {plan.dtype} D={plan.head_dim} "
            f"DV={plan.value_dim}; prefill {tile(t.prefill)}{short}; decode <= {t.decode.block_m} rows x "
            f"{t.decode.block_n}")
