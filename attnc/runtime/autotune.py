"""Autotuning of the prefill tile, persisted in the kernel cache: `attnc.compile(spec, autotune=True)`.

The tuned table (passes/tiling.py) picks one tile per (arch, dtype, head dim, mask class). Autotuning times a
few candidate tiles on the first call of each *regime* -- device, dtype, head dims, GQA group and the
power-of-two buckets of M and N -- and keeps the fastest whose output agrees with the table's tile (every
candidate is checked against it before its time counts). The choice is a kernel-cache entry (backend
"autotune"): later processes load it without timing, racing processes tune once (the cache's file lock), and a
damaged entry is re-tuned like any other cache entry. Calls the tile does not decide keep the plain kernel:
decode-sized M (the split-KV decode plan), ragged or paged storage, and the TVM backend.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..dsl.signature import bind, call_usage, qkv_call_error
from ..errors import AttncError
from ..ir import Attention
from ..passes import PlanOptions
from ..passes.tiling import DECODE_MAX_M, next_pow2
from ..backends import cache
from ..backends.triton import launch
from ..backends.triton.backend import TritonBackend
from .kernel import Kernel, call_key, default_backend

CHOICE_FILE = "choice.json"
# Relative Frobenius error a candidate may differ from the table's tile by (accumulation order differs).
AGREEMENT = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Tile:
    """One candidate: PlanOptions' tile fields. All None: the tuned table's own choice."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    tma: bool | None = None

    @property
    def label(self) -> str:
        if self == TABLE:
            return "table"
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}" + (" tma" if self.tma else "")

    def options(self, base: PlanOptions) -> PlanOptions:
        """base with this tile's fields; a candidate other than the table's turns warp specialization off (it
        is a property of the table's rows: passes/tiling.py)."""
        if self == TABLE:
            return base
        return replace(base, **asdict(self), warp_specialize=False)


TABLE = Tile()


def candidates(arch: int | None, head_dim: int) -> tuple[Tile, ...]:
    """The table's tile first (the anchor every other is checked against), then the alternatives the H100
    sweeps found competitive for some shapes (benchmarks/NOTES.md: short sequences and bands favour 64-row
    tiles, and BN=64 without descriptors was within a few percent of the table for causal masks)."""
    if arch is None:  # Triton's interpreter: a search over small tiles keeps the CPU tests fast
        return TABLE, Tile(16, 32, 4, 1), Tile(32, 16, 4, 1)
    if arch >= 90:
        if head_dim <= 64:
            return TABLE, Tile(128, 64, 4, 3, False), Tile(128, 128, 8, 3, False), Tile(64, 64, 4, 3, True)
        if head_dim <= 128:
            return TABLE, Tile(128, 64, 8, 3, False), Tile(64, 64, 4, 3, True), Tile(64, 32, 4, 3, True)
        return TABLE, Tile(64, 64, 4, 2, False), Tile(128, 32, 8, 2, False)
    return TABLE, Tile(64, 64, 4, 2), Tile(128, 32, 8, 2), Tile(64, 32, 4, 2)


def time_ms(fn, cuda: bool) -> float:
    """Median time of fn() in milliseconds: triton.testing.do_bench on a GPU, wall time otherwise."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _agrees(out: torch.Tensor, anchor: torch.Tensor) -> tuple[bool, float]:
    if not bool(torch.isfinite(out).all()):
        return False, math.nan
    a, b = out.float(), anchor.float()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return err <= AGREEMENT.get(anchor.dtype, 2e-2), err


def tune(spec: Attention, backend: str | None, options: PlanOptions, tiles: tuple[Tile, ...],
         q, k, v, kwargs: dict) -> dict:
    """Time every tile on this call's tensors; the record that goes into the cache entry."""
    timings, rejected = {}, {}
    anchor = None
    for tile in tiles:
        kern = Kernel(spec, backend, tile.options(options))
        try:
            with launch.poisoned_outputs():  # a fresh torch.empty may hold an earlier candidate's output
                out = _first(kern(q, k, v, **kwargs))
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
        except AttncError as err:  # a tile the device cannot run (shared memory, compile failure)
            if tile == TABLE:
                raise
            rejected[tile.label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        if anchor is None:
            anchor = out.clone()
        else:
            ok, err = _agrees(out, anchor)
            if not ok:
                rejected[tile.label] = f"output differs from the table's tile (relative error {err:.3g})"
                continue
        timings[tile.label] = time_ms(lambda: kern(q, k, v, **kwargs), q.is_cuda)
    best = min(timings, key=timings.get)
    chosen = next(t for t in tiles if t.label == best)
    return {"chosen": best, "tile": asdict(chosen), "timings_ms": timings, "rejected": rejected}


class TunedKernel:
    """A Kernel that picks its prefill tile per regime by timing candidates once (see the module docstring).
    Called like attnc.Kernel; `choices` maps each regime tuned or loaded in this process to its record."""

    def __init__(self, spec: Attention, backend: str | None = None, options: PlanOptions | None = None,
                 deterministic: bool | None = None):
        self.plain = Kernel(spec, backend, options, deterministic)
        self.spec, self.backend, self.options = spec, backend, self.plain.options
        self.choices: dict[tuple, dict] = {}
        self._by_call: dict[tuple, Kernel] = {}
        self._by_regime: dict[tuple, Kernel] = {}
        self._input_names = tuple(t.name for t in spec.inputs)

    def __call__(self, *args, validate: bool = False, **kwargs):
        if self.spec.decode_only:  # no prefill tile to tune
            return self.plain(*args, validate=validate, **kwargs)
        if len(args) != 3:
            raise qkv_call_error(args, kwargs, lambda: call_usage(self.spec))
        q, k, v = args
        try:
            key = call_key(q, k, v, kwargs, self._input_names)
        except (AttributeError, KeyError, TypeError):
            return self.plain(q, k, v, **kwargs)  # not tensors, or a missing input: its error message
        kern = self._by_call.get(key)
        if kern is None:
            kern = self._by_call[key] = self._kernel_for(q, k, v, kwargs)
        return kern.call(q, k, v, kwargs, key, validate)

    def _kernel_for(self, q, k, v, kwargs: dict) -> Kernel:
        spec = self.spec
        backend = self.backend or default_backend(q.device)
        sizes = bind(spec, q, k, v, kwargs).sizes
        if backend != "triton" or sizes["M"] <= DECODE_MAX_M:
            return self.plain
        regime = (q.device, q.dtype, sizes["D"], sizes["DV"], sizes["H"] // sizes["HKV"],
                  next_pow2(sizes["M"]), next_pow2(sizes["N"]))
        kern = self._by_regime.get(regime)
        if kern is None:
            record = self._choice(regime, backend, q, k, v, kwargs)
            self.choices[regime] = record
            kern = self._by_regime[regime] = self.plain.sibling(spec, Tile(**record["tile"]).options(self.options))
        return kern

    def _choice(self, regime: tuple, backend: str, q, k, v, kwargs: dict) -> dict:
        import triton

        from ..backends.triton import codegen_fingerprint

        device, dtype, d, dv, group, m, n = regime
        arch = TritonBackend().target(device).arch
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter"
        key = cache.CacheKey({
            **cache.spec_parts(self.spec), "backend": "autotune",
            "device": f"{name}:sm_{arch}" if arch else name, "dtype": str(dtype), "D": str(d), "DV": str(dv),
            "group": str(group), "M": str(m), "N": str(n), "options": repr(self.options),
            "backend_version": triton.__version__, "codegen": codegen_fingerprint(),
        }, name=self.spec.name)
        tiles = candidates(arch, max(d, dv))

        def build(out_dir: Path) -> None:
            record = tune(self.spec, backend, self.options, tiles, q, k, v, kwargs)
            (out_dir / CHOICE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")

        return json.loads(cache.get_or_build(key, build).read_text(CHOICE_FILE))

    def __repr__(self) -> str:
        return f"attnc.TunedKernel({self.spec.name!r}, backend={self.backend!r}, key={self.spec.key[:12]})"
