"""`attnc explain` and `attnc.explain`: what the passes make of a spec, and which tiles its masks let the kernel
skip for one shape.

The plan is printed after every pass of attnc.passes.PIPELINE (the folded spec and `KernelPlan.describe()`),
each as a unified diff from the one before. The tile map classes every (query tile, key tile) block of one
batch and head as the kernel does: *skipped* outside the key loop's bounds (mask analysis, `masks.key_tiles`),
*full* where no key is masked (no mask is evaluated), *partial* where the mask is evaluated element by element.
Data-dependent masks (lookups at i or j) are classed at run time by the tile-summary kernel: given the tensors,
the map evaluates them the same way (empty blocks are skipped); without them those blocks are *run time*.
Tiles are planned for the H100 (`attnc show --emit plan`'s target).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from .errors import AttncError, CallError, checks_arguments
from .ir import Attention, IndexVar, SizeRef, print_attention, print_expr, walk
from .passes import KernelPlan, Target, launch_tiles, plan_steps
from .passes.fold import NotConstant, Scalar
from .passes.masks import key_tiles

if TYPE_CHECKING:
    import torch

TARGET = Target("triton", "cuda", 90)  # the H100, as `attnc show --emit plan|triton`
SKIPPED, FULL, PARTIAL, RUN_TIME = range(4)
CLASS_NAMES = ("skipped", "full", "partial", "run time")
CLASS_COLOURS = ("#eeeeee", "#2b6cb0", "#f6ad55", "#b794f4")  # light grey, blue, orange, lilac
SHAPE_ROLES = ("B", "H", "M", "N", "D")


@dataclass(frozen=True)
class PassStep:
    name: str  # the pass, or "spec" for the plan before any pass
    text: str  # the folded spec and the plan after it
    diff: str  # unified diff from the step before ("" for the first, or when the pass changed nothing)


@dataclass(frozen=True)
class TileMap:
    block_m: int  # query positions per tile (a decode launch also packs GQA heads into its rows)
    block_n: int
    classes: tuple[tuple[int, ...], ...]  # [query tile][key tile] -> SKIPPED / FULL / PARTIAL / RUN_TIME
    note: str  # what the map assumes (the batch and head shown, run-time classes)

    def count(self, cls: int) -> int:
        return sum(row.count(cls) for row in self.classes)

    @property
    def counts(self) -> dict[str, int]:
        """Tiles per class name: {"skipped": ..., "full": ..., "partial": ..., "run time": ...}."""
        return {name: self.count(cls) for cls, name in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class Explanation:
    spec: Attention
    sizes: Mapping[str, int]
    plan: KernelPlan
    steps: tuple[PassStep, ...]
    tiles: TileMap

    def passes_text(self) -> str:
        """The first step whole, then each pass's diff."""
        out = [f"== {self.steps[0].name}", self.steps[0].text]
        for step in self.steps[1:]:
            out += [f"== after {step.name}", step.diff or "(no change)"]
        return "\n".join(out) + "\n"

    def summary(self) -> str:
        t, s = self.tiles, self.sizes
        total = len(t.classes) * (len(t.classes[0]) if t.classes else 0)
        computed = total - t.count(SKIPPED)
        flops = _tile_flops(self)
        dense = 2.0 * s["M"] * s["N"] * (s["D"] + s["DV"]) * s["B"] * s["H"]
        saved = 1 - flops / dense if dense else 0.0
        classes = ", ".join(f"{t.count(c)} {CLASS_NAMES[c]}" for c in (FULL, PARTIAL, RUN_TIME) if t.count(c))
        return (f"{self.spec.name}: B={s['B']} H={s['H']} M={s['M']} N={s['N']} D={s['D']}, tiles "
                f"{t.block_m}x{t.block_n}: {computed} of {total} tiles computed ({classes or 'none'}), "
                f"{t.count(SKIPPED)} skipped; {flops / 1e9:.3g} GFLOP of a dense {dense / 1e9:.3g} "
                f"({saved:.0%} saved)\n  {t.note}")

    def save_png(self, path: str | Path) -> Path:
        return draw_tile_map(self, Path(path))


def _tile_flops(x: Explanation) -> float:
    """FLOPs of the computed tiles (both matmuls, 2 (D + DV) per pair), clipped to M and N, for all B x H."""
    t, s = x.tiles, x.sizes
    pairs = 0
    for qt, row in enumerate(t.classes):
        rows = min(t.block_m, s["M"] - qt * t.block_m)
        pairs += sum(rows * min(t.block_n, s["N"] - kt * t.block_n) for kt, c in enumerate(row) if c != SKIPPED)
    return 2.0 * pairs * (s["D"] + s["DV"]) * s["B"] * s["H"]


# ---------------------------------------------------------------- the passes


def pass_steps(spec: Attention, target: Target, head_dim: int, value_dim: int) -> tuple[KernelPlan, tuple[PassStep, ...]]:
    """The plan after each pass of PIPELINE (passes.plan_steps), with diffs."""
    steps: list[PassStep] = []
    for name, plan in plan_steps(spec, target, head_dim, value_dim):
        text = _plan_text(plan)
        diff = difflib.unified_diff(steps[-1].text.splitlines() if steps else [], text.splitlines(), lineterm="", n=1)
        steps.append(PassStep(name, text, "\n".join(list(diff)[2:]) if steps else ""))  # [2:]: no ---/+++ lines
    return plan, tuple(steps)


def _plan_text(plan: KernelPlan) -> str:
    return print_attention(plan.spec).rstrip("\n") + "\n" + plan.describe()


# ---------------------------------------------------------------- the tile map


def tile_map(plan: KernelPlan, sizes: Mapping[str, int], params: Mapping[str, Scalar],
             inputs: Mapping[str, torch.Tensor], b: int = 0, h: int = 0) -> TileMap:
    """The class of every (query tile, key tile) block of batch b, head h (see the module docstring)."""
    masks = plan.masks
    launch = launch_tiles(plan, sizes["M"], sizes["H"] // sizes["HKV"])
    block_m, block_n = launch.block_mq, launch.config.block_n  # query positions: a decode tile packs GQA heads too
    m_tiles, n_tiles = math.ceil(sizes["M"] / block_m), math.ceil(sizes["N"] / block_n)
    env = {**sizes, **params, "b": b, "h": h}
    lookup = (lambda name, index: inputs[name][index].item()) if inputs else None
    # Prefill launches of data-dependent masks read a tile summary; decode launches evaluate them on every tile.
    summary = masks.data_dependent and sizes["M"] > plan.tiling.decode_max_m
    unknown = summary and not all(t.name in inputs for t in plan.spec.inputs if _in_masks(plan, t.name))
    classes = []
    for qt in range(m_tiles):
        rows = range(qt * block_m, min(sizes["M"], (qt + 1) * block_m))
        try:
            t_start, f_start, f_end, t_end = key_tiles(masks, [{**env, "i": i} for i in rows], block_n, lookup)
        except NotConstant:  # a bound reads a tensor that was not given: every tile is a candidate
            t_start, f_start, f_end, t_end = 0, 0, 0, n_tiles
        row = []
        for kt in range(n_tiles):
            in_exact = f_start <= kt < f_end
            if not t_start <= kt < t_end:
                row.append(SKIPPED)
            elif unknown:
                row.append(RUN_TIME)
            elif summary:  # the summary kernel's classes: nothing kept, all kept, or some
                from .dsl.reference import keep_mask  # torch: only for tensors' values

                cols = range(kt * block_n, min(sizes["N"], (kt + 1) * block_n))
                kept = keep_mask(plan.spec, sizes, params, inputs, b, h, rows, cols)
                row.append(SKIPPED if not kept.any() else FULL if kept.all() and in_exact else PARTIAL)
            else:
                row.append(FULL if in_exact and not masks.evaluated else PARTIAL)
        classes.append(tuple(row))
    notes = [f"batch {b}, head {h}" + (" (the masks read b or h: other batches or heads may differ)"
                                       if _masks_read(plan, ("b", "h")) else " (every head alike)")]
    if summary:
        notes.append("data-dependent masks: " + ("'run time' blocks are classed by the tile-summary kernel; pass "
                                                 "the tensors to attnc.explain to class them" if unknown else
                                                 "classed from the tensors given, as the tile-summary kernel does"))
    elif masks.evaluated:
        notes.append("element-wise masks (" + ", ".join(print_expr(e) for e in masks.evaluated) + ") are "
                     "evaluated on every tile the loop runs")
    return TileMap(block_m, block_n, tuple(classes), "; ".join(notes))


def _masks_read(plan: KernelPlan, names: Sequence[str]) -> bool:
    return any(isinstance(n, IndexVar) and n.name in names for m in plan.spec.masks for n in walk(m))


def _in_masks(plan: KernelPlan, tensor: str) -> bool:
    return any(getattr(n, "tensor", None) == tensor for m in plan.spec.masks for n in walk(m))


def draw_tile_map(x: Explanation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    t, s = x.tiles, x.sizes
    rows, cols = len(t.classes), len(t.classes[0]) if t.classes else 0
    side = 5.5
    fig, ax = plt.subplots(figsize=(side * max(1.0, cols / max(rows, 1)) ** 0.5 + 1.8,
                                    side * max(1.0, rows / max(cols, 1)) ** 0.5))
    ax.imshow(t.classes, cmap=ListedColormap(CLASS_COLOURS), vmin=0, vmax=len(CLASS_COLOURS) - 1,
              interpolation="nearest", aspect="equal")
    if rows <= 64 and cols <= 64:  # tile borders, while they stay readable
        ax.set_xticks([c - 0.5 for c in range(1, cols)], minor=True)
        ax.set_yticks([r - 0.5 for r in range(1, rows)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel(f"key tile ({t.block_n} keys each)")
    ax.set_ylabel(f"query tile ({t.block_m} queries each)")
    ax.set_title(f"{x.spec.name}: M={s['M']} N={s['N']}, {rows}x{cols} tiles", fontsize=10)
    handles = [Patch(facecolor=CLASS_COLOURS[c], edgecolor="#888888", label=f"{CLASS_NAMES[c]} ({t.count(c)})")
               for c in range(len(CLASS_NAMES)) if t.count(c) or c != RUN_TIME]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as err:
        raise AttncError(f"{path}: cannot write the tile map ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points


def explain_spec(spec: Attention, sizes: Mapping[str, int], params: Mapping[str, Scalar] | None = None,
                 inputs: Mapping[str, torch.Tensor] | None = None, target: Target = TARGET) -> Explanation:
    """The pass steps and tile map of `spec` for `sizes` (B, H, M, N, D at least; HKV = H, DV = D by
    default), with params (defaults filled in) and input tensors (those the masks read, if any)."""
    sizes = dict(sizes)
    sizes.setdefault("HKV", sizes["H"])
    sizes.setdefault("DV", sizes["D"])
    missing = sorted(n.name for m in spec.masks for n in walk(m) if isinstance(n, SizeRef) and n.name not in sizes)
    if missing:
        raise CallError(f"the masks of {spec.name!r} use the sizes {', '.join(missing)}; bind them with `dims` in "
                        f"the spec or pass tensors")
    values = {}
    for p in spec.params:
        value = (params or {}).get(p.name, p.default)
        if value is None:
            raise CallError(f"{p.name}: param {p.dtype} has no default; pass a value (CLI: --param "
                            f"{p.name}=<value>)")
        values[p.name] = value
    plan, steps = pass_steps(spec, target, sizes["D"], sizes["DV"])
    return Explanation(spec, sizes, plan, steps, tile_map(plan, sizes, values, dict(inputs or {})))


@checks_arguments
def explain(what: object, *args: object, shape: Sequence[int] | None = None, png: str | Path | None = None,
            **kwargs: object) -> Explanation:
    """What attnc makes of an attention, for one shape: `.passes_text()`, `.summary()`, `.save_png(path)`.

    `what` is a spec (attnc.Attention), a compiled kernel, an @attnc.attention function (traced for the
    tensors given, else its last trace) or attnc.flex_attention (its arguments follow: q, k, v, score_mod=...,
    block_mask=...). The sizes come from q, k, v when given (other keywords: the params and input tensors, as to
    the kernel), else from shape=(B, H, M, N, D). png: also write the tile map there."""
    from .dsl.flex import flex_attention, flex_spec
    from .dsl.trace import AttentionFunction

    params: dict[str, Scalar] = {}
    inputs: dict[str, torch.Tensor] = {}
    if what is flex_attention or what is flex_spec:
        spec = flex_spec(*args, **kwargs)
        mask = kwargs.get("block_mask")
        inputs = dict(mask.trace.tensors) if mask is not None else {}
        args = tuple(a[0] if isinstance(a, tuple) and a else a for a in args)  # latent (q, q_pe): sized by q
    elif isinstance(what, AttentionFunction):
        spec = what.trace(*args, **kwargs) if args else what.spec
    elif isinstance(getattr(what, "spec", None), Attention) or isinstance(what, Attention):
        spec = what if isinstance(what, Attention) else what.spec
    else:
        raise CallError(f"what: expected an attnc.Attention, a compiled kernel, an @attnc.attention function or "
                        f"attnc.flex_attention, got {type(what).__name__}")
    if what is not flex_attention and what is not flex_spec:
        inputs = {n: t for n, t in kwargs.items() if spec.input(n) is not None}
        params = {n: value for n, value in kwargs.items() if spec.param(n) is not None}
    if args:
        sizes = _sizes_of(spec, args, inputs)
    elif shape is not None:
        sizes = parse_shape(shape, spec)
    else:
        raise CallError("shape: pass q, k, v or shape=(B, H, M, N, D)")
    result = explain_spec(spec, sizes, params, inputs)
    if png is not None:
        result.save_png(png)
    return result


def _sizes_of(spec: Attention, args: Sequence[object], inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    if len(args) != 3:
        raise CallError(f"explain: pass q, k, v (3 tensors), got {len(args)} positional arguments")
    sizes = dict(spec.dim_values)
    decls = [spec.q, spec.k, spec.v, *(spec.input(n) for n in inputs)]
    for decl, t in zip(decls, [*args, *inputs.values()]):
        shape = getattr(t, "shape", None)
        if shape is None or len(shape) != len(decl.shape):
            raise CallError(f"{decl.name}: expected a tensor [{', '.join(decl.shape)}], got {type(t).__name__}")
        sizes.update(zip(decl.shape, (int(n) for n in shape)))
    return sizes


def parse_shape(shape: Sequence[int] | str, spec: Attention) -> dict[str, int]:
    """B, H, M, N, D from a sequence or "B,H,M,N,D" text; the spec's `dims` win for D (and DV)."""
    values = shape.split(",") if isinstance(shape, str) else list(shape)
    try:
        numbers = [int(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 5 or min(numbers) < 1:
        raise CallError(f"shape: expected five positive integers B,H,M,N,D, e.g. 1,8,4096,4096,128, got {shape!r}")
    sizes = dict(zip(SHAPE_ROLES, numbers))
    sizes.update(spec.dim_values)
    return sizes
