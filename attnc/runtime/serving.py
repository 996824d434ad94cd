"""Launching the decode / serving kernels (codegen/triton/decode.py.j2): ragged and paged storage, and split-KV
decode of dense specs.

Per call: the launch (tiles, splits, grid) is memoized by the sizes, which come from shapes alone; lengths,
offsets and page ids stay on the device, so nothing here syncs with the host. With more than one split, the
programs write partial (out, lse) rows to a float32 workspace and `attn_combine` merges them. The kernel checks
the index data as it reads it and records violations in the device's error buffer (runtime/device_errors.py).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from ..codegen.triton.decode import decode_args, generate_decode
from ..dsl.signature import Bound, _coerce_param, canonical_view, lse_shape, out_shape
from ..passes import KernelPlan
from ..passes.decode import INTERPRETER_SMS, DecodeLaunch, decode_launch, workspace_rows
from . import cache, device_errors, launch

SOURCE_FILE = "decode.py"


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def load_decode_module(plan: KernelPlan) -> ModuleType:
    """The generated decode module for `plan`, from the kernel cache (its own entry: the key says 'decode')."""
    def build(out_dir: Path) -> None:
        (out_dir / SOURCE_FILE).write_text(generate_decode(plan), encoding="utf-8")

    def load(entry: cache.Entry) -> ModuleType:
        return launch.import_source(entry.file(SOURCE_FILE),
                                    f"attnc_kernels.{plan.spec.name}_decode_{entry.key.digest[:16]}")

    key = launch.cache_key(plan)
    return cache.get_or_load(cache.CacheKey({**key.as_dict(), "kernel": "decode"}), build, load)


def _strides(t: torch.Tensor, rank: int = 4) -> tuple[int, ...]:
    """Strides padded in front with zeros: a packed [H, T, D] view addresses like [1, H, T, D] with b = 0."""
    return (0,) * (rank - t.dim()) + tuple(t.stride())


class DecodeLauncher:
    """Runs `attn_decode` (and `attn_combine`) for a bound call of a spec with ragged or paged storage, or for
    the decode launches of a dense one (SplitKVLauncher)."""

    def __init__(self, plan: KernelPlan, module: ModuleType | None = None):
        self.plan, self.spec = plan, plan.spec
        module = module or load_decode_module(plan)
        self.decode_fn, self.combine_fn = module.attn_decode, module.attn_combine
        self.args = decode_args(plan)
        self.upcast = plan.target.arch is None and plan.dtype == "bf16"  # the interpreter's bf16 is wrong
        self.site = device_errors.register_site(plan.spec)
        self._launches: dict[tuple, DecodeLaunch | None] = {}

    def launch_for(self, bound: Bound) -> DecodeLaunch | None:
        """The memoized `decode_launch` for the call's sizes; None for an empty q or a launch left to prefill."""
        key = (tuple(bound.sizes.values()), bound.q.device)
        go = self._launches.get(key, False)
        if go is False:
            go = self._launches[key] = decode_launch(self.plan, bound.sizes, sm_count(bound.q.device)) \
                if bound.sizes["M"] > 0 else None
        return go

    def __call__(self, bound: Bound):
        return self.run(bound)[0]

    def run(self, bound: Bound, go: DecodeLaunch | None = None):
        """out, or (out, lse); and a PreparedDecode that repeats the call for the same call key (None where
        it cannot: the interpreter, unaligned pointers, nothing to launch)."""
        q = bound.q
        go = go or self.launch_for(bound)
        outputs = self.outputs(bound, go)
        result = outputs[:2] if self.spec.returns_lse else outputs[0]
        if go is None:
            return result, None
        calls = self.calls(bound, go, *outputs)
        compiled = [fn[grid](*args, **meta) for fn, grid, args, meta in calls]
        directs = [launch.direct_launch(c, q.device) for c in compiled]
        tensors = [bound.q, bound.k, bound.v, *bound.inputs.values(), *(t for t in outputs if t is not None)]
        if None in directs or any(t.data_ptr() % launch.ALIGNMENT for t in tensors) or device_errors.capturing():
            return result, None  # a validated call's error buffer is its own: not one to replay
        return result, PreparedDecode(self, bound, go, calls, directs)

    def outputs(self, bound: Bound, go: DecodeLaunch | None) -> tuple:
        """(out, lse or None, ws_out or None, ws_lse or None), freshly allocated."""
        return allocate(output_shapes(self.spec, bound, go), bound.q.dtype, bound.q.device)

    def calls(self, bound: Bound, go: DecodeLaunch, out: torch.Tensor, lse: torch.Tensor | None,
              ws_out: torch.Tensor | None, ws_lse: torch.Tensor | None) -> list[tuple]:
        """(kernel, grid, positional arguments, constexprs and options) of attn_decode, then of attn_combine
        when the keys split. Tensors sit at fixed places: the first 7 arguments of each kernel, the input tensors
        after the sizes and params (`input_slot`) and the error buffer (`error_slot`)."""
        spec, sizes, q = self.spec, bound.sizes, bound.q
        split = ws_out is not None
        out_c = canonical_view(out, spec.q)
        lse_or_out = out if lse is None else lse
        lse_strides = (0, 0, 0) if lse is None else _strides(lse, 3)
        ws_strides = (*ws_out.stride()[:3], *ws_lse.stride()[:2]) if split else (0,) * 5
        extra = [sizes[s] for s in self.args.sizes] + [bound.params[p] for p in self.args.params]
        for name, _ in self.args.inputs:
            t = bound.inputs[name]
            extra += [t, *t.stride()]
        c = go.tiles.config
        decode = [q, bound.k, bound.v, out, lse_or_out, ws_out if split else out, ws_lse if split else out,
                  *_strides(canonical_view(q, spec.q)), *_strides(canonical_view(bound.k, spec.k)),
                  *_strides(canonical_view(bound.v, spec.v)), *_strides(out_c), *lse_strides, *ws_strides,
                  *extra, go.search_steps, go.splits, device_errors.buffer(q.device), self.site]
        calls = [(self.decode_fn, (go.q_programs * go.splits, go.head_programs), decode,
                  dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_MQ=go.tiles.block_mq, PACK=go.tiles.pack,
                       SPLIT=split, UPCAST=self.upcast, num_warps=c.num_warps, num_stages=c.num_stages))]
        if split:
            rows = workspace_rows(spec, sizes)
            combine = [ws_out, ws_lse, out, lse_or_out, *ws_strides, *_strides(out_c), *lse_strides, rows,
                       sizes["M"], go.splits]
            calls.append((self.combine_fn, (-(-rows // go.combine_rows), sizes["H"]), combine,
                          dict(BLOCK_R=go.combine_rows, BLOCK_S=go.combine_splits, num_warps=4)))
        return calls

    def param_slot(self, name: str) -> int:
        return FIXED_DECODE_ARGS + len(self.args.sizes) + self.args.params.index(name)

    def error_slot(self) -> int:
        return FIXED_DECODE_ARGS + len(self.args.names()) + 2

    def input_slot(self, name: str) -> int:
        slot = FIXED_DECODE_ARGS + len(self.args.sizes) + len(self.args.params)
        for other, rank in self.args.inputs:
            if other == name:
                return slot
            slot += 1 + rank
        raise KeyError(name)


FIXED_DECODE_ARGS = 7 + 4 * 4 + 3 + 5  # pointers, q/k/v/out strides, lse strides, workspace strides


def output_shapes(spec, bound: Bound, go: DecodeLaunch | None) -> tuple:
    """Shapes of out, lse and the split workspace (float32 partial rows; None where not used)."""
    sizes = bound.sizes
    lse = lse_shape(bound) if spec.returns_lse else None
    if go is None or go.splits == 1:
        return out_shape(spec, bound), lse, None, None
    rows = workspace_rows(spec, sizes)
    return out_shape(spec, bound), lse, (go.splits, sizes["H"], rows, sizes["DV"]), (go.splits, sizes["H"], rows)


def allocate(shapes: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    out, *rest = shapes
    return (launch.empty(out, dtype, device), *(None if s is None else launch.empty(s, torch.float32, device)
                                                 for s in rest))


class PreparedDecode:
    """A checked decode call, replayed: for later calls with the same call key (shapes, strides, dtypes,
    devices, keyword names) the sizes, grids and Triton's specializations are those of the call it was made
    from. Per call it coerces the params given, checks the pointers' 16-byte alignment and the current device
    and stream (launcher.DirectLaunch), allocates the outputs and workspace and launches through Triton's
    launcher. It returns None, sending the call back through bind(), whenever a check fails."""

    def __init__(self, launcher: DecodeLauncher, bound: Bound, go: DecodeLaunch, calls: list[tuple], directs):
        self.launcher, self.directs = launcher, directs
        self.shapes, self.dtype, self.device = output_shapes(launcher.spec, bound, go), bound.q.dtype, bound.q.device
        # No tensor is kept but the device's error buffer, which lives as long as the process: each call's own
        # tensors fill the other tensor slots.
        self.args = [[None if isinstance(x, torch.Tensor) else x for x in args]
                     + [meta[n] for n in fn.arg_names[len(args):]] for fn, _, args, meta in calls]
        self.args[0][launcher.error_slot()] = device_errors.buffer(bound.q.device)
        self.grids = [grid for _, grid, _, _ in calls]
        spec = launcher.spec
        self.params = tuple((launcher.param_slot(p.name), p) for p in spec.params)
        self.inputs = tuple((launcher.input_slot(name), name) for name, _ in launcher.args.inputs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict):
        decode = self.args[0].copy()
        for slot, p in self.params:
            if p.name in kwargs:  # absent now means absent when prepared (the call key): the default stays
                decode[slot] = _coerce_param(p, kwargs[p.name])
        pointers = q.data_ptr() | k.data_ptr() | v.data_ptr()
        for slot, name in self.inputs:
            t = decode[slot] = kwargs[name]
            pointers |= t.data_ptr()
        stream = self.directs[0].stream() if not pointers % launch.ALIGNMENT else None
        if stream is None:
            return None
        out, lse, ws_out, ws_lse = allocate(self.shapes, self.dtype, self.device)
        made = [out, out if lse is None else lse, out if ws_out is None else ws_out, out if ws_lse is None else ws_lse]
        if any(t.data_ptr() % launch.ALIGNMENT for t in made):
            return None
        decode[0:7] = [q, k, v, *made]
        self.directs[0].launch(stream, self.grids[0], decode)
        if ws_out is not None:
            combine = self.args[1].copy()
            combine[0:4] = [ws_out, ws_lse, out, made[1]]
            self.directs[1].launch(stream, self.grids[1], combine)
        return out if lse is None else (out, lse)


class SplitKVLauncher(launch.TritonLauncher):
    """A dense spec's launcher: the prefill kernel, except for launches `decode_launch` splits (small M, long
    N), which run the decode kernels (generated on the first such launch)."""

    def __init__(self, plan: KernelPlan, module: ModuleType):
        super().__init__(plan, module)
        self._decode: DecodeLauncher | None = None

    def run(self, bound: Bound):
        decode = self._decode
        if decode is None:
            if bound.sizes["M"] > self.plan.decode.dense_max_m:
                return super().run(bound)
            decode = self._decode = DecodeLauncher(self.plan)
        go = decode.launch_for(bound)
        return decode.run(bound, go) if go is not None else super().run(bound)
