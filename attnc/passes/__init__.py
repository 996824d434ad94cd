"""Pure passes from a checked `ir.Attention` to a frozen `KernelPlan` (DESIGN.md, Passes)."""
from .pipeline import PIPELINE, fold_constants, head_dims, plan_kernel, plan_steps, verify
from .plan import (
    HeadSharing, KernelPlan, KeyRange, MaskPlan, PlanOptions, ScorePlan, Target, TileConfig, Tiling, TritonOptions,
)
from .tiling import LaunchTiles, launch_tiles

__all__ = ["PIPELINE", "fold_constants", "head_dims", "plan_kernel", "plan_steps", "verify", "HeadSharing", "KernelPlan", "KeyRange",
           "MaskPlan", "PlanOptions", "ScorePlan", "Target", "TileConfig", "Tiling", "TritonOptions",
           "LaunchTiles", "launch_tiles"]
