"""The "tvm" backend: build (TensorIR -> LLVM for the host CPU, or -> CUDA through nvcc; a shared library
through the kernel cache) and launch.

TVM's compiler is imported on a cache miss only: the cache key is computed from the plan, the schedule, attnc's
lowering code and TVM's version, and a cached library is loaded through TVM's runtime (runtime.py), so a new
process whose kernels are cached starts fast. Per call the launcher (launch.py) only reads shapes and strides,
allocates the outputs with torch and calls the compiled function, which takes the torch tensors through DLPack
without copies.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Collection

import torch

from ...dsl.signature import Bound
from ...errors import CompileError
from ...ir import linear_repr
from ...passes import KernelPlan, Target
from ...passes.grad import derive, normalizer_backward
from .. import cache, device_errors
from . import codegen_fingerprint
from .host import configure_threads, host_cpu
from .launch import FINISH, KEYS, ROWS, extra_args, launch, launch_backward, qkv_args
from .runtime import load_module, tvm_version
from .schedule import KEY_TILES, decode_pack, decode_schedule, prefill_schedule, summary_uses_h, uses_summary

# TVM substitutes let-bound values free of buffer loads into their uses, so its passes take time in the size of an
# expression as a tree, each shared node counted at every use. The kernels hold the values they bind, float, integer
# and boolean, in register buffers, which TVM never substitutes (emit.bind), and every expression the emitter
# renders is rendered under `vectorized` or `registers`, so no spec needs a size bound here: a CPU forward build
# takes 0.27 s plain, +0.1 s per nested tanh (0.87 s for six) and 0.38 s for 40 lines of `score = score + score`,
# where through `Let`s three nested tanh took 13 s, four over 90 s, and 17 doubling lines 5.7 s, 20 lines 46 s
# (2-core machine). Integer and boolean nodes were bound through `T.Bind` until session 9, under a bound of 250,000
# tree nodes: 40 doubling lines of `x = x + x` in a mask and a lookup index (15 lines took 13 s) now build in
# about 1.8 s, 40 lines of `keep = keep | keep` in about 0.9 s (tests/test_ops.py).
# TVM passes the kernels skip: CompactBufferAllocation shrinks buffers to the region that a schedule's blocks
# access; attnc's kernels are written as loops, with no blocks, and their code came out the same without it (CPU:
# the same TIR but for one buffer's extent spelled out; CUDA: the same source for five example specs in f32 and
# bf16). It took about 2 s of every CPU build (0.4 s of a CUDA one), 20 s with register buffers and a tanh nested
# twice.
SKIPPED_PASSES = frozenset({"s_tir.CompactBufferAllocation"})
LIBRARY_FILE = "kernel.so"
FUNCTION = "attn"
SUMMARY = "tile_summary"  # kernel.tile_summary_primfunc, in the prefill library of data-dependent masks
SUMMARY_CACHE_SIZE = 4  # tile summaries kept per kernel (one per distinct mask tensors / sizes / params)
MAX_SPLITS = 4  # the backward keeps at most this many float32 partials of dQ (backward.py)


class TvmBackend:
    name = "tvm"

    def __init__(self):
        configure_threads()

    def target(self, device: torch.device) -> Target:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            return Target("tvm", "cuda", major * 10 + minor)
        if device.type != "cpu":
            raise CompileError(f"the tvm backend runs on CPU and CUDA tensors (got tensors on {device}); build "
                               f"other targets ahead of time with `attnc compile --backend tvm --target ...`")
        return Target("tvm", "cpu", None)

    def build(self, plan: KernelPlan):
        if plan.target.device == "cuda":
            check_dense(plan, "its CUDA kernel")
            return CudaLauncher(plan)
        return TvmLauncher(plan)

    def build_backward(self, plan: KernelPlan):
        """The CPU backward (backward.py; Backend.build_backward's contract). CUDA tensors train through the
        triton backend."""
        check_dense(plan, "the backward")
        if plan.target.device == "cuda":
            raise CompileError(f"attention {plan.spec.name!r}: the tvm backend's backward runs on the CPU; backward "
                               f"on CUDA runs through the triton backend (backend='triton')")
        return TvmBackward(plan)


def check_dense(plan: KernelPlan, where: str) -> None:
    """Ragged and paged storage run in the CPU forward kernel only (serving.py); `where` names what refuses."""
    spec = plan.spec
    if spec.q_storage is not None or spec.kv_storage is not None:
        raise CompileError(f"attention {spec.name!r}: ragged and paged storage run on the tvm backend's CPU forward "
                           f"kernel; {where} does not lower them: run it with backend='triton', or pass dense q/k/v")


def cuda_target(arch: int):
    """TVM's CUDA target for compute capability `arch` x 10 (90 -> sm_90a: Hopper's arch-specific features)."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": f"sm_{arch}{'a' if arch == 90 else ''}"}, host="llvm")


def compile_module(funcs: dict, plan: KernelPlan, target, label: str):
    """The compiled runtime module of the PrimFuncs `funcs` (name -> PrimFunc; not cached). CUDA kernels are
    compiled by nvcc (no GPU needed), so the result matches what `attnc compile` ships."""
    import tvm

    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    try:
        with target, tvm.transform.PassContext(instruments=[_skipping(SKIPPED_PASSES)]):
            return tvm.compile(tvm.IRModule(funcs), target=target)
    except Exception as err:  # TVM's errors are not AttncErrors; say which spec and schedule failed
        raise CompileError(f"TVM could not build attention {plan.spec.name!r} for {label}: {err}") from err


def _skipping(names: frozenset):
    """A TVM pass instrument under which the passes `names` do not run."""
    import tvm

    @tvm.instrument.pass_instrument
    class Skipping:
        def should_run(self, mod, info) -> bool:
            return info.name not in names

    return Skipping()


def nvcc_options(plan: KernelPlan) -> tuple[str, ...]:
    """Fast math (ex2.approx / rcp.approx / lg2.approx without range fix-ups, denormals flushed) for the
    tensor-core kernels: their f16 / bf16 outputs do not see the last bits it changes; f32 kernels keep IEEE
    math for their 1e-5 tolerance."""
    from .cuda import MMA_TYPES

    return ("-use_fast_math",) if plan.dtype in MMA_TYPES else ()


def export_library(executable, path: str | Path, target, label: str, options: tuple[str, ...] = ()) -> None:
    """Write compile_module's `executable` as a shared library with each CUDA kernel as an nvcc fatbin
    (nvcc gets `options`, e.g. nvcc_options(plan)).

    TVM 0.27's compiler leaves CUDA kernels as source (module format "cuda") and the runtime compiles them when
    the library is loaded, through tvm.support.nvcc: absent where only the TVM runtime is installed. So the
    import tree is packed here, as export_library would, with the source swapped for its fatbin."""
    def pack_imports(host, system_lib: bool, prefix: str, workspace: str) -> str:
        import tvm_ffi

        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(host).numpy().tobytes()
        cuda_modules = host._collect_from_import_tree(lambda m: m.kind == "cuda")
        sources = {m.inspect_source("cuda").encode() for m in cuda_modules}
        with target:  # nvcc's -gencode comes from the current target's arch
            blob = with_cuda_fatbins(blob, sources, options)
        packed = tvm_ffi.get_global_func("codegen.codegen_blob")(
            blob, system_lib, host.get_function("_get_target_string")(), prefix)
        out = os.path.join(workspace, f"{prefix}devc.o")
        packed.write_to_file(out)
        return out

    try:
        executable.mod.export_library(str(path), fpack_imports=pack_imports)
    except (RuntimeError, OSError) as err:  # nvcc or the linker failed
        raise CompileError(f"could not export the TVM kernel for {label}: {err}") from err


_U64 = struct.Struct("<Q")


def with_cuda_fatbins(blob: bytes, sources: set[bytes], options: tuple[str, ...] = ()) -> bytes:
    """`blob` (TVM's packed import tree: u64 size; the tree as two u64 vectors; per module its kind and, unless
    "_lib", its saved bytes) with each CUDA module's saved bytes, [format][function table][code], turned from
    format "cuda" with code one of `sources` into format "fatbin" with nvcc's fatbin of that source."""
    from tvm.support.nvcc import compile_cuda

    def field(at: int) -> tuple[bytes, int]:  # a u64-length-prefixed field at `at`, and the offset after it
        (size,) = _U64.unpack_from(blob, at)
        return blob[at + 8:at + 8 + size], at + 8 + size

    def fatbin(saved: bytes) -> bytes:
        fmt = _U64.pack(4) + b"cuda"
        source = next((s for s in sources if saved.startswith(fmt) and saved.endswith(_U64.pack(len(s)) + s)), None)
        if source is None:
            return saved  # already compiled (TVM with its CUDA runtime loaded JIT-compiles while building)
        table = saved[len(fmt):len(saved) - 8 - len(source)]
        binary = bytes(compile_cuda(source.decode(), target_format="fatbin", options=list(options) or None,
                                    compiler="nvcc"))
        return _U64.pack(6) + b"fatbin" + table + _U64.pack(len(binary)) + binary

    at = 8
    (rows,) = _U64.unpack_from(blob, at)
    at += 8 + 8 * rows  # import tree row pointers: one per module, plus one
    (children,) = _U64.unpack_from(blob, at)
    at += 8 + 8 * children
    parts = [blob[8:at]]
    for _ in range(rows - 1):
        kind, at = field(at)
        parts.append(_U64.pack(len(kind)) + kind)
        if kind != b"_lib":
            saved, at = field(at)
            saved = fatbin(saved) if kind == b"cuda" else saved
            parts.append(_U64.pack(len(saved)) + saved)
    if at != len(blob):
        raise CompileError(f"TVM's packed module layout is not the one attnc reads ({len(blob) - at} bytes left "
                           f"over); use apache-tvm 0.27")
    body = b"".join(parts)
    return _U64.pack(len(body)) + body


def cache_key(plan: KernelPlan, sched, device: str, stage: str = "forward", derivatives: str = "") -> cache.CacheKey:
    """Computed without TVM's compiler: the TensorIR a build lowers is a function of the plan, the schedule, the
    stage (the forward's library or the backward's, backward.py, of the same plan), the backward's `derivatives`
    (passes/grad.py's IR, whose code is outside the codegen part) and attnc's lowering code (the codegen part),
    and what LLVM or nvcc make of it, of TVM's version and the device."""
    return cache.CacheKey({
        **cache.plan_parts(plan), "stage": stage, "schedule": repr(sched), "derivatives": derivatives,
        "backend": "tvm", "backend_version": tvm_version(), "device": device, "codegen": codegen_fingerprint(),
        "nvcc_options": " ".join(nvcc_options(plan)) if device.startswith("cuda") else "",
    }, name=plan.spec.name)


def load_functions(plan: KernelPlan, sched, names: tuple[str, ...], lower: Callable[[], tuple[dict, object]],
                   device: str, stage: str = "forward", derivatives: str = "") -> dict:
    """The compiled functions `names` (name -> callable) of one library from the kernel cache; on a miss `lower()`
    gives (name -> PrimFunc, TVM target), which is built and exported as a shared library (cache_key tells the
    other arguments)."""
    def build(out_dir: Path) -> None:
        funcs, target = lower()
        label = f"{device} with {sched}"
        export_library(compile_module(funcs, plan, target, label), out_dir / LIBRARY_FILE, target, label,
                       nvcc_options(plan))

    def load(entry: cache.Entry) -> dict:
        module = load_module(entry.file(LIBRARY_FILE), cuda=device.startswith("cuda"))
        return {name: module[name] for name in names}

    return cache.get_or_load(cache_key(plan, sched, device, stage, derivatives), build, load)


class TvmLauncher:
    """CPU: a prefill schedule and, for M up to one vector of rows, a decode schedule (M: the rows a sequence is
    expected to have, ceil(T / B) for a ragged q). Data-dependent masks: the prefill library also holds the tile
    summary, computed per call and reused while the mask tensors, sizes and params are unchanged."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        vector = host_cpu().vector
        self.decode_rows = vector  # M up to this runs the decode schedule
        prefill = prefill_schedule(vector)
        self.schedules = {"prefill": replace(prefill, summary=True) if plan.masks.data_dependent else prefill,
                          "decode": decode_schedule(vector)}  # and decode schedules with heads packed, when called
        self._functions: dict[str, dict] = {}
        self.serving = plan.spec.q_storage is not None or plan.spec.kv_storage is not None
        self.site = device_errors.register_site(plan.spec) if self.serving else None
        self._summaries: OrderedDict = OrderedDict()

    def schedule_kind(self, rows: int, group: int) -> str:
        """The key in `schedules` of the schedule for `rows` query rows per sequence and H / HKV = group (a decode
        schedule with heads packed is added when first asked for)."""
        if rows > self.decode_rows:
            return "prefill"
        pack = decode_pack(self.decode_rows, rows, group)
        kind = "decode" if pack == 1 else f"decode/{pack}"
        if kind not in self.schedules:
            self.schedules[kind] = decode_schedule(self.decode_rows, pack)
        return kind

    def functions(self, kind: str) -> dict:
        fns = self._functions.get(kind)
        if fns is None:
            sched = self.schedules[kind]
            summary = uses_summary(self.plan, sched)
            names = (FUNCTION, SUMMARY) if summary else (FUNCTION,)

            def lower():
                from .kernel import build_primfunc, tile_summary_primfunc

                funcs = {FUNCTION: build_primfunc(self.plan, sched, FUNCTION)}
                if summary:
                    funcs[SUMMARY] = tile_summary_primfunc(self.plan, sched, SUMMARY)
                return funcs, host_cpu().target()

            fns = self._functions[kind] = load_functions(self.plan, sched, names, lower, host_cpu().label)
        return fns

    def __call__(self, bound: Bound):
        sizes = bound.sizes
        m = -(-sizes["T"] // sizes["B"]) if self.plan.spec.q_storage is not None else sizes["M"]
        kind = self.schedule_kind(m, sizes["H"] // sizes["HKV"])
        fns = self.functions(kind)
        tail = None
        if SUMMARY in fns or self.serving:
            def tail():
                extra = [self.summary(fns[SUMMARY], bound, self.schedules[kind])] if SUMMARY in fns else []
                if self.serving:
                    extra += [device_errors.buffer(bound.q.device), self.site]
                return extra
        return launch(self.plan.spec, fns[FUNCTION], bound, tail)

    def summary(self, function, bound: Bound, sched) -> torch.Tensor:
        """The tile classes (kernel.tile_summary_primfunc) for this call's mask tensors, sizes and params. Entries
        hold the tensors themselves, so a data_ptr in a key cannot be reused by a new tensor while it is cached;
        `_version` catches in-place writes."""
        tensors = list(bound.inputs.values())
        key = (tuple(bound.sizes.items()), tuple(bound.params.items()),
               tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in tensors))
        hit = self._summaries.get(key)
        if hit is not None:
            self._summaries.move_to_end(key)
            return hit[1]
        sizes, bm = bound.sizes, sched.block_m
        spec = self.plan.spec
        heads = sizes["H"] if summary_uses_h(self.plan) else 1
        if spec.q_storage is not None:
            rows = heads * ((sizes["T"] + sizes["B"] * (bm - 1)) // bm)
        else:
            rows = sizes["B"] * heads * -(-sizes["M"] // bm)
        table = torch.empty((rows, max(1, -(-sizes["N"] // sched.block_n))), dtype=torch.int8)
        function(*qkv_args(spec, bound, False), *extra_args(spec, bound), table)
        self._summaries[key] = (tensors, table)
        if len(self._summaries) > SUMMARY_CACHE_SIZE:
            self._summaries.popitem(last=False)
        return table


class CudaLauncher:
    def __init__(self, plan: KernelPlan):
        from .cuda import build_cuda_kernel, kernel_schedule

        self.plan = plan
        arch = plan.target.arch
        sched = kernel_schedule(plan)
        self.function = load_functions(plan, sched, (FUNCTION,),
                                       lambda: ({FUNCTION: build_cuda_kernel(plan, FUNCTION, sched)[1]},
                                                cuda_target(arch)), f"cuda:sm_{arch}")[FUNCTION]

    def __call__(self, bound: Bound):
        return launch(self.plan.spec, self.function, bound)


class TvmBackward:
    """The CPU backward (backward.py): its three functions from one cached library, and their launch. The result
    is deterministic whatever `deterministic` says: no task shares a write with another."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        self.sched = prefill_schedule(host_cpu().vector)  # the forward prefill's register tiles
        derivatives = derive(plan.spec)
        self.tables = derivatives.tables

        def lower():
            from .backward import build_backward_primfuncs

            return build_backward_primfuncs(plan, self.sched), host_cpu().target()

        self.functions = load_functions(plan, self.sched, (ROWS, KEYS, FINISH), lower, host_cpu().label, "backward",
                                        linear_repr((derivatives, normalizer_backward(plan.spec.normalizer))))

    def __call__(self, bound: Bound, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                 dlse: torch.Tensor | None = None, deterministic: bool = False,
                 tables: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """dq, dk, dv and every float table's gradient (`tables`, the ones a caller wants, does not change the work
        here: the CPU kernels add the tables' gradients where they compute dS)."""
        key_blocks = -(-bound.sizes["N"] // (KEY_TILES * self.sched.block_n))
        splits = key_splits(bound.sizes["B"] * bound.sizes["HKV"], key_blocks, int(os.environ["TVM_NUM_THREADS"]))
        return launch_backward(self.plan.spec, self.functions, self.tables, self.sched.block_m, splits, bound, out,
                               lse, dout, dlse)


def key_splits(kv_heads: int, key_blocks: int, threads: int) -> int:
    """How many tasks share the key blocks of one (batch, K/V head) in the backward: enough for two tasks per
    thread, at most MAX_SPLITS (each split is a float32 copy of dQ) and at most one per key block."""
    return max(1, min(MAX_SPLITS, key_blocks, -(-2 * threads // max(1, kv_heads))))
