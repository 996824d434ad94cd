"""The Triton backend at run time: build (generate, cache, import) and launch generated kernels.

Per call the launcher only reads shapes and strides, allocates the outputs and launches: no host-device sync,
no planning, no hashing. Sizes and params are runtime kernel arguments (and not specialized by Triton), so a
new B, M, N or param value reuses the compiled kernel; the tile for a launch is memoized by (M, H // HKV).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import torch

from .. import __version__
from ..codegen.triton.generate import generate, kernel_args
from ..dsl.signature import Bound, canonical_view, lse_shape, out_shape
from ..errors import CompileError
from ..passes import KernelPlan, LaunchTiles, Target, launch_tiles
from . import cache

SOURCE_FILE = "kernel.py"
SUMMARY_CACHE_SIZE = 4  # tile summaries kept per kernel (one per distinct mask tensors / sizes)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"

    def target(self, device: torch.device) -> Target:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            return Target("triton", "cuda", major * 10 + minor)
        if not interpreting():
            raise CompileError(f"the triton backend runs on CUDA tensors (got tensors on {device}); set "
                               f"TRITON_INTERPRET=1 before importing triton to use its CPU interpreter, or use "
                               f"backend='tvm' for CPU tensors")
        return Target("triton", "cpu", None)

    def build(self, plan: KernelPlan) -> "TritonLauncher":
        if plan.spec.q_storage is not None or plan.spec.kv_storage is not None:
            raise CompileError(f"attention {plan.spec.name!r}: ragged and paged storage have no Triton kernel yet "
                               f"(the decode/serving work adds them); attnc.reference computes their semantics")
        return TritonLauncher(plan, load_module(plan))


def cache_key(plan: KernelPlan) -> cache.CacheKey:
    import triton

    t = plan.target
    return cache.CacheKey({
        "ir": plan.spec.canonical, "plan": repr(plan), "backend": "triton", "backend_version": triton.__version__,
        "device": f"{t.device}:{'interpreter' if t.arch is None else f'sm_{t.arch}'}", "attnc": __version__,
        "name": plan.spec.name,
    })


def load_module(plan: KernelPlan) -> ModuleType:
    """The generated module for `plan`, from the kernel cache (generated and written on a miss)."""
    def build(out_dir: Path) -> None:
        (out_dir / SOURCE_FILE).write_text(generate(plan), encoding="utf-8")

    def load(entry: cache.Entry) -> ModuleType:
        return import_source(entry.file(SOURCE_FILE), f"attnc_kernels.{plan.spec.name}_{entry.key.digest[:16]}")

    return cache.get_or_load(cache_key(plan), build, load)


def import_source(path: Path, module_name: str) -> ModuleType:
    """Import a generated file without writing bytecode next to it (cache entries are read-only);
    triton.jit reads the function source back from `path`."""
    source = path.read_text(encoding="utf-8")
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[module_name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


class TritonLauncher:
    def __init__(self, plan: KernelPlan, module: ModuleType):
        self.plan = plan
        self.spec = plan.spec
        self.fwd = module.attn_fwd
        self.summary_fn = getattr(module, "tile_summary", None)
        self.args = kernel_args(plan)
        self.upcast = plan.target.arch is None and plan.dtype == "bf16"  # the interpreter's bf16 is wrong
        self._tiles: dict[tuple[int, int], LaunchTiles] = {}
        self._summaries: OrderedDict = OrderedDict()

    def tiles(self, m: int, group: int) -> LaunchTiles:
        t = self._tiles.get((m, group))
        if t is None:
            t = self._tiles[(m, group)] = launch_tiles(self.plan, m, group)
        return t

    def __call__(self, bound: Bound):
        spec, sizes = self.spec, bound.sizes
        q = bound.q
        out = empty(out_shape(spec, bound), q.dtype, q.device)
        lse = empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
        if sizes["M"] > 0:
            self.launch(bound, out, lse)
        return (out, lse) if spec.returns_lse else out

    def launch(self, bound: Bound, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        spec, sizes = self.spec, bound.sizes
        tiles = self.tiles(sizes["M"], sizes["H"] // sizes["HKV"])
        extra = self.extra_args(bound)
        if self.args.data_dependent:
            extra += self.summary(bound, tiles, extra)
        c = tiles.config
        grid = (-(-sizes["M"] // tiles.block_mq), sizes["B"] * (sizes["H"] // tiles.pack))
        self.fwd[grid](
            bound.q, bound.k, bound.v, out, out if lse is None else lse,
            *canonical_view(bound.q, spec.q).stride(), *canonical_view(bound.k, spec.k).stride(),
            *canonical_view(bound.v, spec.v).stride(), *canonical_view(out, spec.q).stride(),
            *((0, 0, 0) if lse is None else lse.stride()),
            *extra,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_MQ=tiles.block_mq, PACK=tiles.pack, UPCAST=self.upcast,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    def extra_args(self, bound: Bound) -> list:
        a = self.args
        values = [bound.sizes[s] for s in a.sizes] + [bound.params[p] for p in a.params]
        for name, _ in a.inputs:
            t = bound.inputs[name]
            values += [t, *t.stride()]
        return values

    def summary(self, bound: Bound, tiles: LaunchTiles, extra: list) -> list:
        """[summary, s_sb, s_sh]: the tile classes for this call's mask tensors, sizes and params, computed on
        the device by the generated `tile_summary` kernel and reused while those are unchanged. Entries hold
        the tensors themselves, so a data_ptr in a key cannot be reused by a new tensor while it is cached;
        `_version` catches in-place writes."""
        tensors = [bound.inputs[name] for name, _ in self.args.inputs]
        key = (tuple(extra[i] for i in range(len(self.args.sizes) + len(self.args.params))),
               tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in tensors),
               tiles, bound.q.device)
        hit = self._summaries.get(key)
        if hit is not None:
            self._summaries.move_to_end(key)
            return list(hit[1])
        sizes, c = bound.sizes, tiles.config
        m_tiles = -(-sizes["M"] // tiles.block_mq)
        n_tiles = -(-sizes["N"] // c.block_n)
        heads = sizes["H"] // tiles.pack if self.args.summary_uses_h else 1
        batches = sizes["B"] if self.args.summary_uses_b else 1
        table = torch.empty((batches, heads, m_tiles, max(n_tiles, 1)), dtype=torch.int8, device=bound.q.device)
        s_sb = heads * m_tiles * n_tiles if self.args.summary_uses_b else 0
        s_sh = m_tiles * n_tiles if self.args.summary_uses_h else 0
        result = (table, s_sb, s_sh)
        if n_tiles:
            self.summary_fn[(m_tiles, batches * heads)](
                *extra, *result, heads, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_MQ=tiles.block_mq,
                PACK=tiles.pack, num_warps=c.num_warps)
        self._summaries[key] = (tensors, result)
        if len(self._summaries) > SUMMARY_CACHE_SIZE:
            self._summaries.popitem(last=False)
        return list(result)
