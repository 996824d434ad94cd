"""The backward at run time (TritonBackend.build_backward): build the backward module (backward.py) and launch its
kernels for a bound forward call.

Per call: attn_bwd_prep (delta per row, the sink's gradient), then attn_bwd_dkdv (dK, dV; dQ, the input tables'
gradients and a GQA group's dK and dV by atomics), or with `deterministic` attn_bwd_dkdv without atomics and
attn_bwd_dq for dQ, the tables' gradients summed from per-program slices and a GQA group's dK and dV from a share per
query head. Where the tuned row says the dQ kernel is faster (plan.BackwardPlan.dq_kernel) it writes dQ in either
mode. Extra memory is O(rows) (delta, dQ in float32 for the atomics, dK and dV in float32 with GQA) plus the
gradients of the input tables (times the programs, with `deterministic`); no [M, N] buffer.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Collection
from types import ModuleType

import torch

from ...dsl.signature import Bound, canonical_view, lse_shape
from ...errors import CallError, CompileError
from ...ir import Paged
from ...passes import KernelPlan, LaunchTiles
from ...passes.decode import upcast
from ...passes.grad import plan_backward
from ...passes.plan import TileConfig
from . import launch
from .gluon import gluon_runs
from .gluon_backward import GluonDkdv
from .signature import (BACKWARD_TENSORS, backward_signatures, gradient_tables, padded_strides, spec_args,
                        summary_used)

SOURCE_FILE = "backward.py"
# deterministic=True keeps a gradient slice per program for each input table: at most this many bytes of them
DETERMINISTIC_WORKSPACE_BYTES = 1 << 30
# The backward's tensors laid out as q, k or v (the others are lse-shaped)
SHAPED_AS = {"q": "q", "out": "q", "do": "q", "dq": "q", "k": "k", "dk": "k", "v": "v", "dv": "v"}
# The signature groups whose values a replayed launch takes from each call (the others follow from its key: sizes,
# strides, grids, tiles), and how many call signatures a launcher keeps replays for
REPLAYED_GROUPS = ("pointers", "params", "inputs", "table_grads", "summary")
REPLAYED_CALLS = 64


def load_backward_module(plan: KernelPlan) -> ModuleType:
    """The generated backward module for `plan`, from the kernel cache (its own entry: the key says 'backward'
    and holds the backward plan, whose tile table is outside the code generator's fingerprint)."""
    def source() -> str:
        from .backward import generate_backward  # the code generator is imported on a cache miss only

        return generate_backward(plan)

    key = launch.cache_key(plan).updated(kernel="backward", backward=repr(plan_backward(plan)))
    return launch.cached_module(key, SOURCE_FILE, source, "k")


class BackwardLauncher:
    """`grads(bound, out, lse, dout, dlse, deterministic) -> {"q", "k", "v", table: gradient}` for a planned
    forward (runtime.kernel.Backend.build_backward)."""

    def __init__(self, plan: KernelPlan, module: ModuleType | None = None):
        spec = plan.spec
        if isinstance(spec.kv_storage, Paged):
            raise CompileError(f"attention {spec.name!r}: the Triton backward takes dense or ragged k and v, not a "
                               f"paged cache (a training step has its keys in a tensor: use `ragged k, v by ...`)")
        if not spec.returns_lse:
            raise CompileError(f"attention {spec.name!r}: the backward recomputes the weights from the forward's "
                               f"lse; plan the forward of dataclasses.replace(spec, returns_lse=True)")
        self.plan, self.spec = plan, spec
        self.backward = plan_backward(plan)
        module = module or load_backward_module(plan)
        self.args = spec_args(plan, per_sequence=True)
        self.tables = gradient_tables(spec)
        self.signatures = backward_signatures(self.args, self.tables, summary_used(plan), plan.triton.tma)
        self.kernels = {name: getattr(module, name) for name in self.signatures}
        # the heads attn_bwd_dkdv has one program each for: "H" (a GQA group's shares of dK and dV added up: __call__);
        # modules of older attnc versions (benchmarks' A/B baselines) loop over the group per K/V head, "HKV"
        self.dkdv_heads = module.DKDV_HEADS
        # the forward's tile_summary classes the backward's tiles of data-dependent masks
        self.forward = launch.TritonLauncher(plan, launch.load_module(plan)) if summary_used(plan) else None
        self._stages: dict = {}  # pipeline stages that fit, per (kernel, tile)
        # each kernel's constexprs and options per (deterministic, has dlse, table gradients wanted): planned once,
        # not per call (the backward plan's mask analysis cost ~50-130 us of host time a call on the CPU machine)
        self._keywords = {(det, has_dlse, wanted): launch_keywords(plan, det, has_dlse, wanted)
                          for det in (False, True) for has_dlse in (False, True)
                          for wanted in ((False, True) if self.tables else (False,))}
        self.gluon_dkdv = gluon_dkdv(plan, self.backward)
        # call signature (call_signature) -> [(kernel name, KernelReplay)]: later calls skip the strides, the TMA
        # checks, the packing and Triton's JIT launch
        self._replays: dict[tuple, list] = {}

    def __call__(self, bound: Bound, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                 dlse: torch.Tensor | None = None, deterministic: bool = False,
                 tables: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """dq, dk, dv and each float table's gradient by name; `tables`: the tables whose gradients the caller wants
        (None: every one). Where it wants none, the kernels skip the tables' sums and atomics (TABLE_GRADS)."""
        spec, sizes = self.spec, bound.sizes
        table_grads = bool(self.tables) and (tables is None or any(name in tables for name, _ in self.tables))
        q, k, v = bound.q, bound.k, bound.v
        device = q.device
        dq_kernel = self.backward.dq_by_kernel(deterministic)
        # dQ accumulates by atomics in float32, unless the dQ kernel writes it once
        dq = launch.empty(q.shape, q.dtype, device) if dq_kernel else torch.zeros(
            q.shape, dtype=torch.float32, device=device)
        dk, dv = launch.empty(k.shape, k.dtype, device), launch.empty(v.shape, v.dtype, device)
        grad_views = {"dk": canonical_view(dk, spec.k), "dv": canonical_view(dv, spec.v)}  # [.., HKV, N, D]
        # one program per query head of a GQA group: each adds its share of dK and dV into float32 ones of the K/V
        # heads by atomics; deterministic calls and the Gluon dK/dV kernel write the shares of every query head
        # instead, summed after the launch in a fixed order
        gluon_dkdv = bool(self.gluon_dkdv) and self.gluon_dkdv.covers(q, k, v, dout, lse, dq, deterministic)
        group_heads = None
        if sizes[self.dkdv_heads] != sizes["HKV"]:
            group_heads = "H" if deterministic or gluon_dkdv else "HKV"
        shares = {} if group_heads is None else {
            name: (launch.empty if group_heads == "H" else torch.zeros)(
                (*view.shape[:-3], sizes[group_heads], *view.shape[-2:]), dtype=torch.float32, device=device)
            for name, view in grad_views.items()}
        delta = torch.empty(lse_shape(bound), dtype=torch.float32, device=device)
        grids = self.grids(sizes)
        programs = {name: grid[0] * grid[1] for name, grid in grids.items()}
        slices, workspaces = self.table_workspaces(bound, programs, deterministic, device, table_grads)

        tensors = {"q": q, "k": k, "v": v, "out": out, "do": dout, "lse": lse, "dlse": lse if dlse is None else dlse,
                   "delta": delta, "dq": dq, "dk": dk, "dv": dv, **shares}
        values = self.args.values(sizes, bound.params, bound.inputs)
        key = (call_signature(bound, out, lse, dout, dlse, deterministic), table_grads)
        replays = self._replays.get(key)
        if replays is None or not self.replay(replays, bound, tensors, slices, values):
            launched = self.launch_jit(bound, tensors, shares, slices, values, grids, dq_kernel, dlse, deterministic,
                                       table_grads, gluon_dkdv)
            replays = self.prepare(launched, device)
            if replays is not None:
                if key not in self._replays and len(self._replays) >= REPLAYED_CALLS:
                    self._replays.pop(next(iter(self._replays)))  # the oldest signature
                self._replays[key] = replays

        for name, share in shares.items():  # query head h = kvh * group + g
            grad_views[name].copy_(share if group_heads == "HKV" else share.unflatten(-3, (sizes["HKV"], -1)).sum(-3))
        grads = {"q": dq if dq.dtype == q.dtype else dq.to(q.dtype), "k": dk, "v": dv}
        for (table, _), ws in zip(self.tables if table_grads else (), workspaces):
            t = bound.inputs[table]
            total = ws.sum(0) if deterministic else ws[0]
            grads[table] = total.view(t.shape).to(t.dtype)
        return grads

    def launch_jit(self, bound: Bound, tensors: dict, shares: dict, slices: dict, values: dict, grids: dict,
               dq_kernel: bool, dlse, deterministic: bool, table_grads: bool, gluon_dkdv: bool) -> list:
        """The kernels' launches through Triton's JIT (launch_fitting); per launch (kernel name, grid, arguments,
        keywords, what Triton returned), the Gluon dK/dV kernel's (where `gluon_dkdv`: it covers the call) as None."""
        spec, sizes = self.spec, bound.sizes
        q, dout, dq = bound.q, tensors["do"], tensors["dq"]
        launched = []
        values["launch"] = [max(0, sizes["B"] - 1).bit_length()]
        for name, t in tensors.items():
            # q/k/v-shaped: strides of the canonical view; lse-shaped and the shares (canonical): as they are
            declared = None if name in shares else SHAPED_AS.get(name)
            view = t if declared is None else canonical_view(t, getattr(spec, declared))
            values[f"{name}_strides"] = padded_strides(view, len(BACKWARD_TENSORS[name][1]))
        if dlse is None:
            values["dlse_strides"] = (0, 0, 0)  # lse stands in for the pointer

        keywords = self._keywords[(bool(deterministic), dlse is not None, table_grads)]
        if self.plan.triton.tma:
            keywords = {**keywords, "attn_bwd_dkdv": {**keywords["attn_bwd_dkdv"], "TMA": self.descriptors(q, dout, dq)}}
        for name in ("attn_bwd_prep", "attn_bwd_dkdv", "attn_bwd_dq"):
            if name == "attn_bwd_dq" and not dq_kernel:
                continue
            grid = grids[name]
            if not grid[0] * grid[1]:
                continue
            sig = self.signatures[name]
            if name == "attn_bwd_dkdv" and gluon_dkdv:
                # the Gluon kernel in its place (dQ is the dQ kernel's, or with dq_in_dkdv its reduce-adds into the
                # float32 dQ of the template's atomic mode: plan_backward sets dq_kernel)
                values["pointers"] = [tensors[name] for name in self.gluon_dkdv.signature.pointed_tensors]
                self.gluon_dkdv(sizes, values)
                launched.append(None)
                continue
            values["pointers"] = [tensors[t] for t in sig.pointed_tensors]
            values["table_grads"] = slices.get(name, [])
            if sig.has("summary"):
                values["summary"] = self.summary(bound, values, name)
            args = sig.pack(values)
            compiled = launch.launch_fitting(
                self.kernels[name], grid, args, keywords[name], self._stages, (name, *keywords[name].items()),
                spec.name, "the backward's tiles are the BACKWARD_TUNED table of attnc/passes/tiling.py")
            launched.append((name, grid, args, keywords[name], compiled))
        return launched

    def prepare(self, launched: list, device: torch.device) -> list | None:
        """Replays of a call's launches (KernelReplay), or None where one cannot be replayed: the Gluon dK/dV
        kernel's, the interpreter's, or one whose arguments are not `replayable`."""
        replays = []
        for record in launched:
            if record is None:
                return None
            name, grid, args, keywords, compiled = record
            direct = launch.direct_launch(compiled, device)
            if direct is None or not launch.replayable(args):
                return None
            sig = self.signatures[name]
            replays.append((launch.KernelReplay(direct, grid, self.kernels[name], args, keywords, sig,
                                                REPLAYED_GROUPS),
                            name, sig.pointed_tensors, sig.has("summary")))
        return replays

    def replay(self, replays: list, bound: Bound, tensors: dict, slices: dict, values: dict) -> bool:
        """Launch a call through the replays of its signature's first call; False, before anything launches, where
        a pointer is not 16-byte aligned or Triton's own launch must run (DirectLaunch.stream)."""
        ready = []
        for kernel, name, pointers, reads_summary in replays:
            values["pointers"] = [tensors[p] for p in pointers]
            values["table_grads"] = slices.get(name, [])
            if reads_summary:
                values["summary"] = self.summary(bound, values, name)
            args = kernel.arguments(values)
            stream = kernel.direct.stream() if args is not None else None
            if stream is None:
                return False
            ready.append((kernel, stream, args))
        for kernel, stream, args in ready:
            kernel.direct.launch(stream, kernel.grid, args)
        return True

    def grids(self, sizes) -> dict[str, tuple[int, int]]:
        """Each kernel's grid: query tiles x heads (prep, dQ), key tiles x heads (dK/dV: self.dkdv_heads). Packed
        storage gets room for every sequence's last partial tile (its programs find their sequence on the device)."""
        b = sizes["B"]

        def tiles(size: str, block: int, heads: str, packed: bool) -> tuple[int, int]:
            if packed:
                return (sizes[size] + b * (block - 1)) // block, sizes[heads]
            return -(-sizes[size] // block), b * sizes[heads]

        ragged_q, ragged_kv = self.spec.q_storage is not None, self.spec.kv_storage is not None
        bp = self.backward
        return {"attn_bwd_prep": tiles("M", bp.prep.block_m, "H", ragged_q),
                "attn_bwd_dq": tiles("M", bp.dq.block_m, "H", ragged_q),
                "attn_bwd_dkdv": tiles("N", bp.dkdv.block_n, self.dkdv_heads, ragged_kv)}

    def table_workspaces(self, bound: Bound, programs: dict[str, int], deterministic: bool, device,
                         wanted: bool = True):
        """Per kernel that adds to input tables, its table_grads group values; and per table the float32 buffer
        its gradient is summed from: one shared slice (atomics), or with `deterministic` one slice per program of
        attn_bwd_prep and then of attn_bwd_dkdv. Not `wanted` (TABLE_GRADS False: no kernel adds): one float each,
        for the arguments, and no buffer."""
        slices: dict[str, list] = {"attn_bwd_prep": [], "attn_bwd_dkdv": []}
        workspaces = []
        adding = ("attn_bwd_prep", "attn_bwd_dkdv")
        if not wanted:
            unused = torch.empty(1, dtype=torch.float32, device=device)
            for (table, _), name in itertools.product(self.tables, adding):
                slices[name] += [unused, 0, *(0 for _ in bound.inputs[table].shape)]
            return slices, workspaces
        count = sum(programs[n] for n in adding) if deterministic else 1
        for table, _ in self.tables:
            shape = bound.inputs[table].shape
            numel = math.prod(shape)
            if deterministic and (count * numel * 4 > DETERMINISTIC_WORKSPACE_BYTES or numel >= 2 ** 31 - 1):
                raise CallError(
                    f"{table}: deterministic=True sums the gradient of {table} from one copy per program "
                    f"({count} x {numel} floats, more than {DETERMINISTIC_WORKSPACE_BYTES >> 20} MiB); pass "
                    f"deterministic=False (atomic adds) for a table this large")
            ws = torch.zeros((count, numel), dtype=torch.float32, device=device)
            workspaces.append(ws)
            strides = torch.empty(shape, device="meta").stride()
            first = 0
            for name in adding:
                part = ws[first:] if deterministic else ws
                slices[name] += [part, numel if deterministic else 0, *strides]
                first += programs[name]
        return slices, workspaces

    def descriptors(self, q, dout, dq) -> bool:
        """Hopper: whether attn_bwd_dkdv reads q, dO and dQ through tensor descriptors: where each fits TMA's rules
        (as the forward's K and V). attn_bwd_dq loads K by pointers: its K tile feeds one dot transposed (q kᵀ) and
        one as it is (dS k), and Triton 3.6's pipeliner fails on a descriptor load used both ways
        ("PassManager::run failed" in TritonGPUPipeline, seen on the H100)."""
        return all(launch.descriptor_ready(t, self.spec.q) for t in (q, dout, dq))

    def summary(self, bound: Bound, values: dict, kernel: str) -> list:
        """[summary, s_sb, s_sh]: the forward's tile classes for the tiles of `kernel`."""
        c = self.backward.dkdv if kernel == "attn_bwd_dkdv" else self.backward.dq
        tiles = LaunchTiles(c, 1, c.block_m)
        tensors = [bound.inputs[name] for name, _ in self.forward.args.inputs]
        return self.forward.summary(values["sizes"] + values["params"], tensors, bound.sizes, tiles, bound.q.device)


def call_signature(bound: Bound, out, lse, dout, dlse, deterministic: bool) -> tuple:
    """What a backward call's launches derive from its tensors, apart from data pointers and param values: shapes,
    strides, dtypes and devices of every tensor it reads (None for an absent dlse), and the mode."""
    key = (bool(deterministic),)
    for t in (bound.q, bound.k, bound.v, out, lse, dout, dlse, *bound.inputs.values()):
        key += (None,) if t is None else (t.shape, t.stride(), t.dtype, t.device)
    return key


def gluon_dkdv(plan: KernelPlan, backward) -> GluonDkdv | None:
    """The Gluon dK/dV kernel's launcher where the backward plan has its layout and this Triton can build it; a plan
    that asked for it (PlanOptions(gluon_backward=True)) and cannot have it warns once, saying why."""
    # its reason already says the template's kernel runs
    runs = gluon_runs(plan, backward.gluon_dkdv is not None, backward.gluon_reason, plan.options.gluon_backward,
                      "the Gluon dK/dV kernel")
    return GluonDkdv(plan) if runs else None


def launch_keywords(plan: KernelPlan, deterministic: bool, has_dlse: bool, table_grads: bool = True) -> dict[str, dict]:
    """Each backward kernel's constexprs and launch options (TMA, where the plan has it, is the launcher's per
    call). `deterministic`: the input tables' gradients from per-program slices, and dQ by the dQ kernel.
    `table_grads`: the input tables' gradients are wanted (TABLE_GRADS, where the spec has tables)."""
    def tiles(c: TileConfig, query_major: bool) -> dict:
        rows = {"BLOCK_MQ": c.block_m, "PACK": 1} if query_major else {}
        return {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, **rows, "num_warps": c.num_warps,
                "num_stages": c.num_stages}

    bp, up = plan_backward(plan), upcast(plan)
    wanted = {"TABLE_GRADS": table_grads} if gradient_tables(plan.spec) else {}
    return {"attn_bwd_prep": {**tiles(bp.prep, True), "HAS_DLSE": has_dlse, "DETERMINISTIC": deterministic, **wanted},
            "attn_bwd_dkdv": {**tiles(bp.dkdv, False), "UPCAST": up, "DETERMINISTIC": deterministic,
                              "DQ_KERNEL": bp.dq_by_kernel(deterministic), **wanted},
            "attn_bwd_dq": {**tiles(bp.dq, True), "UPCAST": up}}
