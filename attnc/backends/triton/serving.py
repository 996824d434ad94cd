"""Launching the decode / serving kernels (codegen/triton/decode.py.j2): ragged and paged storage, and split-KV
decode of dense specs.

Per call: the launch (tiles, splits, grid) is memoized by the sizes, which come from shapes alone; lengths,
offsets and page ids stay on the device, so nothing here syncs with the host. With more than one split, the
programs write partial (out, lse) rows to a float32 workspace and `attn_combine` merges them. The kernel checks
the index data as it reads it and records violations in the device's error buffer (backends/device_errors.py).
"""
from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch

from ...dsl.signature import Bound, _coerce_param, lse_shape, out_shape
from ...passes import KernelPlan
from ...passes.decode import INTERPRETER_SMS, DecodeLaunch, decode_launch, workspace_rows
from .. import device_errors, names
from . import binaries, launch
from .signature import COMBINE_SIGNATURE, decode_signature, qkv_values, spec_args

SOURCE_FILE = "decode.py"


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def load_decode_module(plan: KernelPlan) -> ModuleType:
    """The generated decode module for `plan`, from the kernel cache (its own entry: the key says 'decode')."""
    def source() -> str:
        from .decode import generate_decode

        return generate_decode(plan)

    return launch.cached_module(launch.cache_key(plan).updated(kernel="decode"), SOURCE_FILE, source, "k")


class DecodeLauncher:
    """Runs `attn_decode` (and `attn_combine`) for a bound call of a spec with ragged or paged storage, or for
    the decode launches of a dense one (SplitKVLauncher)."""

    def __init__(self, plan: KernelPlan, module: ModuleType | None = None):
        self.plan, self.spec = plan, plan.spec
        module = module or load_decode_module(plan)
        self.decode_fn, self.combine_fn = module.attn_decode, module.attn_combine
        self.args = spec_args(plan, per_sequence=True)
        self.signature = decode_signature(self.args)
        self.site = device_errors.register_site(plan.spec)
        self._launches: dict[tuple, DecodeLaunch | None] = {}

    def launch_for(self, bound: Bound) -> DecodeLaunch | None:
        """The memoized `decode_launch` for the call's sizes; None for an empty q or a launch left to prefill."""
        key = (tuple(bound.sizes.values()), bound.q.device)
        go = self._launches.get(key, False)
        if go is False:
            go = self._launches[key] = self.choose_launch(bound.sizes, sm_count(bound.q.device)) \
                if bound.sizes["M"] > 0 else None
        return go

    def choose_launch(self, sizes, sms: int) -> DecodeLaunch | None:
        return decode_launch(self.plan, sizes, sms)

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
        compiled = [binaries.launch(fn, grid, args, meta) for fn, grid, args, meta in calls]
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
        when the keys split, packed by their signatures."""
        spec, sizes = self.spec, bound.sizes
        split = ws_out is not None
        values = self.args.values(sizes, bound.params, bound.inputs)
        values.update(qkv_values(spec, bound, out, lse),
                      workspace=(ws_out, ws_lse) if split else (out, out),
                      workspace_strides=(*ws_out.stride()[:3], *ws_lse.stride()[:2]) if split else (0,) * 5,
                      launch=(go.search_steps, go.splits), errors=(device_errors.buffer(bound.q.device),),
                      site=(self.site,))
        calls = [(self.decode_fn, (go.q_programs * go.splits, go.head_programs), self.signature.pack(values),
                  go.decode.keywords)]
        if split:
            rows = workspace_rows(spec, sizes)
            values.update(outputs=values["pointers"][3:], rows=(rows, sizes["M"], go.splits))
            calls.append((self.combine_fn, (-(-rows // go.combine_rows), sizes["H"]), COMBINE_SIGNATURE.pack(values),
                          go.combine.keywords))
        return calls


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
        self.args[0][launcher.signature.slot("err_ptr")] = device_errors.buffer(bound.q.device)
        self.grids = [grid for _, grid, _, _ in calls]
        spec = launcher.spec
        sig = launcher.signature
        self.params = tuple((sig.slot(names.param(p.name)), p) for p in spec.params)
        self.inputs = tuple((sig.slot(names.tensor(name)), name) for name, _ in launcher.args.inputs)
        self.tensors = slice(sig.span("pointers")[0], sig.span("workspace")[1])
        self.combine_tensors = slice(COMBINE_SIGNATURE.span("workspace")[0], COMBINE_SIGNATURE.span("outputs")[1])

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
        decode[self.tensors] = [q, k, v, *made]
        self.directs[0].launch(stream, self.grids[0], decode)
        if ws_out is not None:
            combine = self.args[1].copy()
            combine[self.combine_tensors] = [ws_out, ws_lse, out, made[1]]
            self.directs[1].launch(stream, self.grids[1], combine)
        return out if lse is None else (out, lse)


class SplitKVLauncher(launch.TritonLauncher):
    """A dense spec's launcher: the prefill kernel, except for launches `decode_launch` splits (small M, long
    N), which run the decode kernels (generated on the first such launch)."""

    def __init__(self, plan: KernelPlan, module: ModuleType, decode_module: ModuleType | None = None):
        super().__init__(plan, module)
        self._decode: DecodeLauncher | None = None
        self._decode_module = decode_module

    def run(self, bound: Bound):
        decode = self._decode
        if decode is None:
            if bound.sizes["M"] > self.plan.decode.dense_max_m:
                return super().run(bound)
            decode = self._decode = DecodeLauncher(self.plan, self._decode_module)
        go = decode.launch_for(bound)
        return decode.run(bound, go) if go is not None else super().run(bound)


def launcher_for(plan: KernelPlan, prefill: ModuleType | None, decode: ModuleType | None = None):
    """The launcher of a plan, given the modules holding its kernels (None: generated and loaded through the
    kernel cache when first needed): ragged, paged and latent specs run every launch on the decode kernels, dense
    ones on the prefill kernel and, where the plan splits keys for small M, on the decode kernels too."""
    if plan.spec.decode_only:
        return DecodeLauncher(plan, decode)
    if plan.decode.dense_max_m:
        return SplitKVLauncher(plan, prefill, decode)
    return launch.TritonLauncher(plan, prefill)
