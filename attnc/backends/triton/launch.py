"""The Triton backend at run time: build (generate, cache, import) and launch generated kernels.

Per call the launcher only reads shapes and strides, allocates the outputs and launches: no host-device sync,
no planning, no hashing. Sizes and params are runtime kernel arguments (and not specialized by Triton), so a
new B, M, N or param value reuses the compiled kernel; the tile for a launch is memoized by (M, H // HKV).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import codegen_fingerprint
from .signature import padded_strides, prefill_signature, qkv_values, spec_args, summary_signature
from ...dsl.signature import Bound, canonical_view, lse_shape, out_shape
from ...errors import CompileError
from ...passes import KernelPlan, LaunchTiles, Target, launch_tiles
from ...passes.kernels import prefill_kernel, summary_kernel
from ...passes.plan import KernelLaunch
from .. import cache, names
from . import binaries, scratch

SOURCE_FILE = "kernel.py"
SUMMARY_CACHE_SIZE = 4  # tile summaries kept per kernel (one per distinct mask tensors / sizes)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in `nan_empty` so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


def nan_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`empty`, poisoned: NaN-filled, so an element no kernel writes fails any check of the result."""
    return torch.full(shape, math.nan, dtype=dtype, device=device)


@contextmanager
def poisoned_outputs():
    """Outputs and serving workspaces allocated by `nan_empty` while the block runs (it swaps this module's
    `empty`: not for concurrent threads)."""
    global empty
    plain, empty = empty, nan_empty
    try:
        yield
    finally:
        empty = plain


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_key(plan: KernelPlan) -> cache.CacheKey:
    import triton

    t = plan.target
    return cache.CacheKey({
        **cache.plan_parts(plan), "backend": "triton", "backend_version": triton.__version__,
        "device": f"{t.device}:{'interpreter' if t.arch is None else f'sm_{t.arch}'}", "codegen": codegen_fingerprint(),
    }, name=plan.spec.name)


def cached_module(key: cache.CacheKey, file: str, source: Callable[[], str], prefix: str) -> ModuleType:
    """The generated module of the cache entry `key`: on a miss `source()` (which imports its code generator and
    templates then only) is written to `file`; loaded once per process as attnc_kernels.<prefix><the key's digest>."""
    def build(out_dir: Path) -> None:
        (out_dir / file).write_text(source(), encoding="utf-8")

    def load(entry: cache.Entry) -> ModuleType:
        return import_source(entry.file(file), f"attnc_kernels.{prefix}{entry.key.digest[:16]}")

    return cache.get_or_load(key, build, load)


def load_module(plan: KernelPlan) -> ModuleType:
    """The generated module for `plan`, from the kernel cache (generated and written on a miss)."""
    def source() -> str:
        from .generate import generate

        return generate(plan)

    return cached_module(cache_key(plan), SOURCE_FILE, source, "k")


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
        self.args = spec_args(plan)
        self.signature = prefill_signature(self.args, plan.triton.tma)
        self._tiles: dict[tuple[int, int], LaunchTiles] = {}
        self._summaries: OrderedDict = OrderedDict()
        self._stages: dict[KernelLaunch, int] = {}  # pipeline stages that fit, per kernel

    def tiles(self, m: int, group: int) -> LaunchTiles:
        t = self._tiles.get((m, group))
        if t is None:
            t = self._tiles[(m, group)] = launch_tiles(self.plan, m, group)
        return t

    def __call__(self, bound: Bound):
        return self.run(bound)[0]

    def run(self, bound: Bound) -> tuple[object, "PreparedLaunch | None"]:
        """out, or (out, lse), through Triton's JIT launch; and a PreparedLaunch that repeats this call for the
        same shapes, strides, dtypes and devices without the JIT (None where it cannot)."""
        spec, sizes = self.spec, bound.sizes
        q = bound.q
        out = empty(out_shape(spec, bound), q.dtype, q.device)
        lse = empty(lse_shape(bound), torch.float32, q.device) if spec.returns_lse else None
        result = (out, lse) if spec.returns_lse else out
        if sizes["M"] == 0:
            return result, None
        tiles = self.tiles(sizes["M"], sizes["H"] // sizes["HKV"])
        args = self.kernel_arguments(bound, out, lse, tiles)
        grid = (-(-sizes["M"] // tiles.block_mq), sizes["B"] * (sizes["H"] // tiles.pack))
        # TMA is decided here, not in the kernel, so a launch compiles one K/V loop set: the descriptor loops or
        # the pointer ones. It depends on strides and dtype (fixed for a PreparedLaunch) and on 16-byte pointer
        # alignment (which a PreparedLaunch checks per call), so a replay always meets it.
        tma = descriptor_ready(bound.k, spec.k) and descriptor_ready(bound.v, spec.v) if self.plan.triton.tma else None
        kernel = prefill_kernel(self.plan, tiles, tma)
        compiled = self.launch_jit(grid, args, kernel)
        direct = direct_launch(compiled, q.device)
        if direct is None or not replayable(args):
            return result, None
        return result, PreparedLaunch(self, bound, tiles, KernelReplay(direct, grid, self.fwd, args, kernel.keywords))

    def launch_jit(self, grid, args: list, kernel: KernelLaunch):
        """Triton's JIT launch of attn_fwd (`launch_fitting`)."""
        return launch_fitting(self.fwd, grid, args, kernel.keywords, self._stages, kernel, self.spec.name,
                              "compile with smaller tiles: attnc.compile(spec, "
                              "options=attnc.passes.PlanOptions(block_m=64, block_n=64))")

    def kernel_arguments(self, bound: Bound, out: torch.Tensor, lse: torch.Tensor | None,
                         tiles: LaunchTiles) -> list:
        """attn_fwd's runtime arguments, packed by its signature."""
        spec = self.spec
        values = self.args.values(bound.sizes, bound.params, bound.inputs)
        values.update(qkv_values(spec, bound, out, lse))
        if self.args.data_dependent:
            scalars = values["sizes"] + values["params"]
            values["summary"] = self.summary(scalars, [bound.inputs[name] for name, _ in self.args.inputs],
                                             bound.sizes, tiles, bound.q.device)
        return self.signature.pack(values)

    def summary(self, scalars: list, tensors: list[torch.Tensor], sizes, tiles: LaunchTiles,
                device: torch.device) -> list:
        """[summary, s_sb, s_sh]: the tile classes for this call's mask tensors, sizes and params, computed on
        the device by the generated `tile_summary` kernel and reused while those are unchanged. Entries hold
        the tensors themselves, so a data_ptr in a key cannot be reused by a new tensor while it is cached;
        `_version` catches in-place writes."""
        key = (tuple(scalars), tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in tensors),
               tiles, device)
        hit = self._summaries.get(key)
        if hit is not None:
            self._summaries.move_to_end(key)
            return list(hit[1])
        c = tiles.config
        m_tiles = -(-sizes["M"] // tiles.block_mq)
        n_tiles = -(-sizes["N"] // c.block_n)
        heads = sizes["H"] // tiles.pack if self.args.summary_uses_h else 1
        batches = sizes["B"] if self.args.summary_uses_b else 1
        table = torch.empty((batches, heads, m_tiles, max(n_tiles, 1)), dtype=torch.int8, device=device)
        s_sb = heads * m_tiles * n_tiles if self.args.summary_uses_b else 0
        s_sh = m_tiles * n_tiles if self.args.summary_uses_h else 0
        result = (table, s_sb, s_sh)
        if n_tiles:
            values = dict(sizes=scalars[:len(self.args.sizes)], params=scalars[len(self.args.sizes):],
                          inputs=[x for t in tensors for x in (t, *t.stride())], summary=result, head_programs=[heads])
            binaries.launch(self.summary_fn, (m_tiles, batches * heads), summary_signature(self.args).pack(values),
                            summary_kernel(tiles).keywords)
        self._summaries[key] = (tensors, result)
        if len(self._summaries) > SUMMARY_CACHE_SIZE:
            self._summaries.popitem(last=False)
        return list(result)


def launch_fitting(fn, grid, args: list, keywords: dict, fitted: dict, key, name: str, advice: str):
    """Triton's JIT launch of `fn`. When Triton finds a config over the device's shared memory (the plan's estimate
    leaves out the scratch that lookups and warp specialization add), it is retried with one pipeline stage
    fewer, before anything runs; the stage count that fits is kept in `fitted[key]` for later launches. `advice`
    ends the CompileError where even one stage does not fit."""
    from triton.runtime.errors import OutOfResources

    stages = fitted.get(key, keywords["num_stages"])
    scratch.install()
    while True:
        try:
            compiled = binaries.launch(fn, grid, args, {**keywords, "num_stages": stages})
            fitted[key] = stages
            return compiled
        except OutOfResources as e:
            if stages <= 1:
                raise CompileError(
                    f"attention {name!r}: tile {keywords['BLOCK_M']}x{keywords['BLOCK_N']} of {fn.__name__} needs "
                    f"more shared memory than this GPU has even with one pipeline stage ({e}); {advice}") from None
            stages -= 1


def descriptor_ready(t: torch.Tensor, decl) -> bool:
    """Whether a q/k/v-shaped tensor (declared as `decl`; packed storage too) can be read through per-head 2-D
    tensor descriptors: a unit stride on the head dim, and a 16-byte aligned base and batch, head and row strides
    (TMA's rules for global memory)."""
    view = canonical_view(t, decl)
    # the row stride is in every per-head descriptor, also over a single row
    return tma_ready(view) and (padded_strides(view, 4)[2] * t.element_size()) % ALIGNMENT == 0


def tma_ready(t: torch.Tensor) -> bool:
    """Whether TMA reads `t` as 2-D boxes along its last dim whatever its other axes index: a unit last stride, and a
    16-byte aligned base and stride on every other axis of more than one element (a stride of a size-1 axis never
    moves the base)."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % ALIGNMENT == 0 and all(
        (stride * size) % ALIGNMENT == 0 for stride, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def heads_addressable(t: torch.Tensor, decl) -> bool:
    """Whether one 4-D descriptor over [B, heads, rows, D] (the persistent Gluon kernel's) reaches every head of a
    q/k/v-shaped tensor whose per-head descriptors are ready (descriptor_ready): TMA takes every stride of the
    descriptor, so each must be a multiple of 16 bytes, also a size-1 dim's, and none of a dim of several elements
    may be 0 (an expanded tensor); a descriptor per head puts the batch and head strides in its base instead."""
    view = canonical_view(t, decl)
    return all(stride % (ALIGNMENT // t.element_size()) == 0 and (stride != 0 or size == 1)
               for size, stride in zip(view.shape[:-1], view.stride()[:-1]))  # the head dim's is 1


# ---------------------------------------------------------------- the launch without the JIT

ALIGNMENT = 16  # Triton specializes pointers on 16-byte alignment
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_ABSENT = object()


def replayable(args: list) -> bool:
    """Whether a PreparedLaunch may repeat a launch with these arguments: tensors (replaced by each call's own)
    at 16-byte aligned addresses, since an unaligned one made Triton specialize for it, and plain numbers, which
    stay fixed. Anything else (a host-side tensor descriptor holds its call's address) must be rebuilt per call."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.data_ptr() % ALIGNMENT:
                return False
        elif type(a) not in (int, float, bool):
            return False
    return True


def _param_check(dtype: str):
    """Per-call check of a param value that needs none of bind()'s conversions; None sends the call to bind()."""
    if dtype == "i32":
        return lambda x: x if type(x) is int and _I32_MIN <= x <= _I32_MAX else None
    if dtype == "f32":
        return lambda x: float(x) if type(x) is float or type(x) is int else None
    return lambda x: x if type(x) is bool else None


class KernelReplay:
    """One kernel launch of a checked call, kept for later calls whose shapes, strides, dtypes and devices are the
    same (the caller's key): its grid, Triton's launcher for the binary it ran (DirectLaunch) and its argument list
    (constexprs included) with every tensor left out, since each call brings its own. Built only where the launch
    is `replayable`. The forward's PreparedLaunch patches its arguments by slot; the backward's calls
    `arguments`."""

    __slots__ = ("direct", "grid", "args", "spans")

    def __init__(self, direct: "DirectLaunch", grid: tuple[int, ...], fn, args: list, keywords: dict,
                 signature=None, varying: tuple[str, ...] = ()):
        self.direct, self.grid = direct, (*grid, 1)[:2]  # a 1-D grid (persistent programs) as 2-D
        full = args + [keywords[name] for name in fn.arg_names[len(args):]]
        self.args = [None if isinstance(x, torch.Tensor) else x for x in full]
        # the signature's groups `varying` (those of them it has) take each call's values
        self.spans = tuple((role, slice(*signature.span(role))) for role in varying if signature.has(role))

    def arguments(self, values: dict) -> list | None:
        """The argument list with `values[role]` in each varying group, tensors as their addresses; None where one
        of those is not 16-byte aligned (Triton specialized the binary on alignment: the JIT must launch)."""
        args = self.args.copy()
        pointers = 0
        for role, span in self.spans:
            group = list(values[role])
            for i, x in enumerate(group):
                if isinstance(x, torch.Tensor):
                    group[i] = address = x.data_ptr()
                    pointers |= address
            args[span] = group
        return None if pointers % ALIGNMENT else args


class PreparedLaunch:
    """A checked call, replayed. For later calls whose tensors have the same shapes, strides, dtypes and devices
    (and the same keyword names: the caller's key), the sizes, grid, strides, tiles and Triton's specialization
    are those of the call it was made from. Per call it checks only the params, the pointers' 16-byte alignment,
    the current device and Triton's launch hooks, allocates the outputs and calls Triton's launcher. It returns
    None, and the caller takes the full path (bind, then Triton's JIT), whenever one of those differs. `launcher`:
    the template's (TritonLauncher) or the Gluon forward's (gluon.GluonLauncher, no tiles)."""

    __slots__ = ("launcher", "direct", "args", "grid", "out_shape", "lse_shape", "dtype", "device", "param_slots",
                 "input_slots", "summary_slot", "scalars", "pointers", "sizes", "tiles")

    def __init__(self, launcher, bound: Bound, tiles: LaunchTiles | None, replay: KernelReplay):
        a = launcher.args
        self.launcher, self.tiles, self.sizes = launcher, tiles, bound.sizes
        self.direct, self.grid, self.args = replay.direct, replay.grid, replay.args
        self.out_shape = out_shape(launcher.spec, bound)
        self.lse_shape = lse_shape(bound) if launcher.spec.returns_lse else None
        self.dtype, self.device = bound.q.dtype, bound.q.device
        sig = launcher.signature
        self.param_slots = tuple((sig.slot(names.param(p.name)), p.name, _param_check(p.dtype))
                                 for p in launcher.spec.params)
        self.input_slots = tuple((sig.slot(names.tensor(name)), name) for name, _ in a.inputs)
        self.scalars = slice(sig.span("sizes")[0], sig.span("params")[1])
        self.pointers = slice(*sig.span("pointers"))
        # (the Gluon forward evaluates data-dependent masks on every tile: no summary)
        self.summary_slot = sig.span("summary")[0] if sig.has("summary") else None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict):
        args = self.args.copy()
        for slot, name, check in self.param_slots:
            value = kwargs.get(name, _ABSENT)
            if value is not _ABSENT:  # absent now means absent when prepared (the caller's key): the default
                value = check(value)
                if value is None:
                    return None
                args[slot] = value
        # q, k, v, out and lse go to the launcher as addresses: it takes them as they are, where for a tensor it
        # calls data_ptr() and asks the driver about the pointer (the key has already fixed their device).
        q_ptr, k_ptr, v_ptr = q.data_ptr(), k.data_ptr(), v.data_ptr()
        pointers = q_ptr | k_ptr | v_ptr
        for slot, name in self.input_slots:
            t = args[slot] = kwargs[name]
            pointers |= t.data_ptr()
        stream = self.direct.stream() if not pointers % ALIGNMENT else None
        if stream is None:
            return None
        out = empty(self.out_shape, self.dtype, self.device)
        lse = out if self.lse_shape is None else empty(self.lse_shape, torch.float32, self.device)
        out_ptr, lse_ptr = out.data_ptr(), lse.data_ptr()
        if (out_ptr | lse_ptr) % ALIGNMENT:
            return None
        args[self.pointers] = q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr
        if self.summary_slot is not None:
            tensors = [args[slot] for slot, _ in self.input_slots]
            s = self.summary_slot
            args[s:s + 3] = self.launcher.summary(args[self.scalars], tensors, self.sizes, self.tiles, self.device)
        self.direct.launch(stream, self.grid, args)
        return out if self.lse_shape is None else (out, lse)


class DirectLaunch:
    """Triton's launcher for one compiled kernel, called without JITFunction.run's per-call work (binding the
    arguments, re-deriving the specialization key, formatting the options). Triton 3.6 through 3.9 launch a
    CompiledKernel as `compiled.run(grid..., stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *every argument in signature order)`.

    With Triton 3.6's launcher (a Python CudaLauncher around a C `launch`), the C function is called directly:
    the Python wrapper's per-call work (a closure, two allocator lookups, the scratch callback, and for a
    tensor scratch a data_ptr() call plus a driver pointer query) is ~3-5 us of host time on the H100 machines.
    The descriptor scratch then comes from attnc.backends.triton.scratch, as the wrapper's allocator would give it."""

    def __init__(self, compiled, device_index: int, current_device, current_stream):
        from triton import knobs

        self.compiled = compiled  # held: Triton 3.9 unloads the module when a CompiledKernel is freed
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.device_index = device_index
        self.current_device, self.current_stream = current_device, current_stream
        self.hooks = knobs.runtime
        self.raw = _raw_launch(compiled.run)
        if self.raw is None:
            # Triton's own launcher asks the launching thread's allocator for global scratch (scratch.install)
            self.asks_allocator = getattr(compiled.metadata, "global_scratch_size", 1) > 0
        else:
            run = compiled.run
            self.flags = (run.launch_cooperative_grid, run.launch_pdl)
            self.scratch_bytes = run.global_scratch_size * run.num_ctas  # per program
            self.scratch_align = run.global_scratch_align
            self.scratch = (None, 0, None)  # (stream, bytes, buffer) of the last launch

    def stream(self):
        """The current stream, or None when the JIT must launch: another device is current (the kernel was
        loaded for this one), or a launch hook (a profiler) wants Triton's launch metadata."""
        if self.current_device() != self.device_index or _hook_set(self.hooks.launch_enter_hook) \
                or _hook_set(self.hooks.launch_exit_hook):
            return None
        return self.current_stream(self.device_index)

    def launch(self, stream, grid: tuple[int, int], args: list) -> None:
        if self.raw is None:
            if self.asks_allocator:
                scratch.install()
            self.run(grid[0], grid[1], 1, stream, self.function, self.metadata, None, None, None, *args)
            return
        scratch_ptr = None
        if self.scratch_bytes:
            size = self.scratch_bytes * grid[0] * grid[1]
            last_stream, last_size, buffer = self.scratch
            capturing = torch.cuda.is_current_stream_capturing()  # the graph's own allocation, never kept
            if capturing or last_stream != stream or last_size < size:
                buffer = scratch.scratch(size, self.scratch_align, stream)
                if not capturing:
                    self.scratch = (stream, size, buffer)
            scratch_ptr = buffer.data_ptr()
        self.raw(grid[0], grid[1], 1, stream, self.function, *self.flags, scratch_ptr, None, self.metadata, None,
                 None, None, *args)


def _raw_launch(run):
    """The C launch function under Triton 3.6's CudaLauncher, or None for any other launcher (Triton 3.7+
    changed the wrapper; profiling scratch, which instrumentation asks for, keeps the wrapper too)."""
    try:
        from triton.backends.nvidia import driver as nvidia_driver
    except ImportError:
        return None
    fields = ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "global_scratch_align",
              "profile_scratch_size", "num_ctas")
    if getattr(nvidia_driver, "_BASE_ARGS_FORMAT", None) != "iiiKKppOOOOOO" \
            or type(run).__name__ != "CudaLauncher" or not all(hasattr(run, f) for f in fields) \
            or run.profile_scratch_size:
        return None
    return run.launch


def _hook_set(hook) -> bool:
    """Triton 3.6+ keeps launch hooks in a HookChain (never None; empty when unset); older knobs used None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def direct_launch(compiled, device: torch.device) -> DirectLaunch | None:
    """A DirectLaunch for what `jit_fn[grid](...)` returned: a CompiledKernel, loaded for the current device,
    which must be the tensors' (the JIT compiles and loads per current device). The interpreter returns no
    CompiledKernel, so its calls always take the JIT path."""
    if device.type != "cuda" or getattr(compiled, "packed_metadata", None) is None:
        return None
    from triton.runtime.driver import driver

    current_device, current_stream = driver.active.get_current_device, driver.active.get_current_stream
    if current_device() != device.index:
        return None
    return DirectLaunch(compiled, device.index, current_device, current_stream)
