"""Ahead-of-time TVM kernels: `build` makes an artifact folder on any machine (nvcc compiles CUDA kernels, no
GPU needed); `load` runs it with only the TVM runtime (runtime.py): tvm_ffi plus libtvm_runtime.so (and
libtvm_runtime_cuda.so), from the installed TVM or a trimmed runtime folder (runtime_pack.py).

An artifact folder holds kernel.so (the exported TVM module: host code plus the embedded CUDA binary) and
manifest.json: the spec's canonical text and key, the plan and its options, the library's SHA-256. `load` parses
the text, checks that it gives the key and that this attnc makes the same plan, and checks the library's owner,
permissions and hash (backends/cache.verify_files) before it loads anything. `compile_file`
(`attnc compile --backend tvm`) writes one per attention of a spec file under an index manifest.

`emit_source` writes kernel source for targets that are generated here but not run: Metal, ROCm (AMDGPU
assembly) and OpenCL through the plain GPU kernel (gpu.py), CUDA C through the tensor-core kernel (cuda.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ... import index_data
from ...version import __version__
from ...dsl.reference import check_lookups
from ...dsl.signature import bind, call_usage, qkv_call_error
from ...errors import AttncError, CacheError, CallError, CompileError
from ...ir import Attention
from ...passes import KernelPlan, PlanOptions, Target, plan_kernel
from .. import cache
from .launch import launch
from .runtime import load_module, tvm_version

if TYPE_CHECKING:
    from ..progress import Progress

FORMAT = "attnc-tvm-aot/1"
SET_FORMAT = "attnc-tvm-aot-set/1"  # compile_file's folder: one FORMAT folder per attention
MANIFEST, LIBRARY = "manifest.json", "kernel.so"
TARGETS = ("cuda", "llvm")  # runnable artifacts; other TVM targets: --emit source (emit_source)
# --emit source: TVM target kind -> (file suffix, comment prefix, what the text is)
SOURCE_TARGETS = {
    "cuda": ("cu", "//", "CUDA C (tensor cores for f16/bf16)"),
    "metal": ("metal", "//", "Metal Shading Language"),
    "rocm": ("s", ";", "AMDGPU assembly (LLVM), before linking ROCm's device libraries"),
    "opencl": ("cl", "//", "OpenCL C"),
}
# TVM targets attnc cannot write source for, and why.
NO_SOURCE = {
    "vulkan": "the apache-tvm wheel is built without the SPIR-V code generator (no target.build.vulkan); build TVM "
              "from source with USE_VULKAN=ON, or emit --target opencl / metal",
    "webgpu": "WGSL has no 64-bit integers, which attnc's index and mask arithmetic uses; emit --target metal / "
              "opencl",
}


def build(spec: Attention, out_dir: str | Path, target: str = "cuda", arch: str | None = "sm_90a",
          head_dim: int | None = None, value_dim: int | None = None, options: PlanOptions = PlanOptions(),
          cuda_schedule=None) -> Path:
    """Compile `spec` for `target` ("cuda" with `arch` like "sm_90a", or "llvm": this machine's CPU) into
    `out_dir`; returns the folder. `options` overrides the CUDA kernel's num_warps / block_m / block_n;
    `cuda_schedule` (a cuda.CudaSchedule) replaces the f16 / bf16 kernel's whole schedule."""
    from ...passes import head_dims
    from .backend import check_dense, compile_module, export_library, nvcc_options
    from .host import host_cpu

    if not spec.canonical_parses:  # the manifest holds the spec as text, which `load` parses
        raise CompileError(f"{spec.name}: its expressions reuse subexpressions in a way no spec text writes in "
                           f"reasonable size (a score that reuses itself can be written; a mask or sink cannot), so "
                           f"an artifact of it could not be loaded; compile it at run time instead")
    d, dv = head_dims(spec, head_dim, value_dim)
    out = Path(out_dir)
    if target == "cuda":
        from .cuda import build_cuda_kernel

        plan = plan_kernel(spec, _plan_target(target, arch), d, dv, options)
        check_dense(plan, "ahead-of-time compilation")
        sched, func = build_cuda_kernel(plan, "attn", cuda_schedule)
        funcs = {"attn": func}
        tvm_target = _tvm_target("cuda", arch)
        kinds, decode_max_m, device = {"prefill": "attn"}, 0, f"cuda:{arch}"
    elif target == "llvm":
        from .kernel import build_primfunc
        from .schedule import decode_schedule, prefill_schedule

        cpu = host_cpu()
        options = PlanOptions()  # the CPU schedules take no overrides
        plan = plan_kernel(spec, _plan_target(target, arch), d, dv, options)
        check_dense(plan, "ahead-of-time compilation")
        funcs = {"attn_prefill": build_primfunc(plan, prefill_schedule(cpu.vector), "attn_prefill"),
                 "attn_decode": build_primfunc(plan, decode_schedule(cpu.vector), "attn_decode")}
        tvm_target, sched = cpu.target(), None
        kinds, decode_max_m, device = {"prefill": "attn_prefill", "decode": "attn_decode"}, cpu.vector, cpu.label
    else:
        raise CompileError(_not_runnable(target))
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    export_library(compile_module(funcs, plan, tvm_target, device), out / LIBRARY, tvm_target, device,
                   nvcc_options(plan) if target == "cuda" else ())
    library = (out / LIBRARY).read_bytes()
    manifest = {
        "format": FORMAT, "backend": "tvm", "target": target, "arch": arch if target == "cuda" else None,
        "device": device, "name": spec.name, "key": spec.key, "canonical": spec.canonical, "plan": repr(plan),
        "options": dataclasses.asdict(options), "dtype": spec.q.dtype, "head_dim": d, "value_dim": dv,
        "functions": kinds, "decode_max_m": decode_max_m, "schedule": repr(sched), "tvm": tvm_version(),
        "attnc": __version__, "library": LIBRARY,
        "files": {LIBRARY: {"sha256": hashlib.sha256(library).hexdigest(), "size": len(library)}},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    cache.seal([out / LIBRARY, out / MANIFEST] + ([out] if made else []))
    return out


def _plan_target(target: str, arch: str | None) -> Target:
    """The plan target of an artifact for TVM target `target` ("cuda" with `arch`, or "llvm")."""
    return Target("tvm", "cuda", _arch_number(arch)) if target == "cuda" else Target("tvm", "cpu", None)


def emit_source(spec: Attention, target: str, arch: str | None = None, head_dim: int | None = None,
                value_dim: int | None = None) -> str:
    """The kernel source TVM generates for `target` (a key of SOURCE_TARGETS), with a comment header naming the
    spec, head dims, schedule and kernel arguments. Written, not run: CUDA and LLVM artifacts come from `build`.
    `arch`: sm_XX[a] for cuda (default sm_90a), gfxNNN for rocm (default gfx942, MI300), unused elsewhere.

    cuda runs the tensor-core kernel (cuda.py; plain for f32); metal, rocm and opencl run the plain GPU kernel
    (gpu.py), since mma.sync / ldmatrix / cp.async are PTX-only."""
    from ...passes import head_dims
    from .backend import check_dense, compile_module
    from .kernel import parameter_names

    if target in NO_SOURCE:
        raise CompileError(f"--target {target}: no kernel source: {NO_SOURCE[target]}")
    if target not in SOURCE_TARGETS:
        raise CompileError(f"--target {target}: attnc writes kernel source for {', '.join(SOURCE_TARGETS)}; pick "
                           f"one of those")
    _check_codegen(target)
    d, dv = head_dims(spec, head_dim, value_dim)
    if target == "cuda":
        from .cuda import build_cuda_kernel

        arch = arch or "sm_90a"
        plan = plan_kernel(spec, Target("tvm", "cuda", _arch_number(arch)), d, dv)
        check_dense(plan, "ahead-of-time compilation")
        sched, func = build_cuda_kernel(plan, "attn")
    else:
        from .gpu import build_gpu_primfunc, gpu_schedule

        if target == "rocm":
            arch = arch or "gfx942"
            if re.fullmatch(r"gfx[0-9a-f]+", arch) is None:
                raise CompileError(f"--arch {arch!r} is not an AMD GPU architecture; pass one like gfx942 (MI300) "
                                   f"or gfx90a (MI200)")
        elif arch is not None:
            raise CompileError(f"--arch {arch!r}: --target {target} takes no architecture; leave --arch out")
        plan = plan_kernel(spec, Target("tvm", target, None), d, dv)
        check_dense(plan, "ahead-of-time compilation")
        sched = gpu_schedule(plan)
        func = build_gpu_primfunc(plan, sched, "attn")
    _, comment, what = SOURCE_TARGETS[target]
    label = f"{target}{':' + arch if arch else ''}"
    with _rocm_without_toolchain() if target == "rocm" else contextlib.nullcontext():
        module = compile_module({"attn": func}, plan, _tvm_target(target, arch), label)
    device_module = module.mod.imports[0]
    source = device_module.inspect_source("asm" if target == "rocm" else "")
    import tvm

    header = [f"{what}, generated by attnc {__version__} with TVM {tvm.__version__} for {label}",
              f"attention {spec.name} (key {spec.key[:16]}), D={d} DV={dv}, q/k/v {plan.dtype}, {sched}",
              f"TVM host function arguments: {', '.join(parameter_names(spec))}; the device kernel takes those "
              f"buffers by name, then sizes and strides",
              "q/k/v/out are [B, heads, sequence, head dim] views with any strides but a unit head-dim stride"]
    return "".join(f"{comment} {line}\n" for line in header) + "\n" + source


def _tvm_target(kind: str, arch: str | None):
    import tvm

    options = {"cuda": {"arch": arch}, "rocm": {"mcpu": arch} if arch else {}}.get(kind, {})
    return tvm.target.Target({"kind": kind, **options}, host="llvm")


def _check_codegen(kind: str) -> None:
    import tvm_ffi

    if tvm_ffi.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        raise CompileError(f"--target {kind}: this TVM build has no {kind} code generator (target.build.{kind}); "
                           f"install a TVM built with it")


@contextlib.contextmanager
def _rocm_without_toolchain():
    """TVM's ROCm build links ROCm's device-library bitcode and then ld.lld's code object, both from a ROCm
    install; the source (assembly) exists before either step. Stand-ins for the two callbacks, restored after."""
    import tvm_ffi

    importlib.import_module("tvm.support.rocm")  # registers the callbacks being replaced
    names = {"tvm_callback_rocm_bitcode_path": lambda rocdl_dir=None: [], "tvm_callback_rocm_link": lambda obj: obj}
    originals = {name: tvm_ffi.get_global_func(name) for name in names}
    for name, stand_in in names.items():
        tvm_ffi.register_global_func(name, stand_in, override=True)
    try:
        yield
    finally:
        for name, original in originals.items():
            tvm_ffi.register_global_func(name, original, override=True)


def _not_runnable(target: str) -> str:
    return (f"attnc compile --backend tvm builds runnable kernels for {' and '.join(TARGETS)}, not {target!r}; for "
            f"other TVM targets write the kernel source with --emit source")


def _arch_number(arch: str | None) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", arch or "")
    if match is None:
        raise CompileError(f"--arch {arch!r} is not a CUDA architecture; pass one like sm_90a or sm_80")
    return int(match.group(1))


class AotKernel:
    """A loaded artifact: call it as `kernel(q, k, v, **params_and_inputs)`, like attnc.compile's kernels."""

    def __init__(self, spec: Attention, manifest: dict, functions: dict):
        self.spec = spec
        self.manifest = manifest
        self._functions = functions
        self._device_type = "cuda" if manifest["target"] == "cuda" else "cpu"

    def __call__(self, *args, validate: bool = False, **kwargs):
        """validate=True (or ATTNC_VALIDATE=1) checks the call's lookups after it, as attnc.Kernel does."""
        if len(args) != 3:
            raise qkv_call_error(args, kwargs, lambda: call_usage(self.spec))
        q, k, v = args
        bound = bind(self.spec, q, k, v, kwargs)
        m = self.manifest
        if bound.q.device.type != self._device_type:
            raise CallError(f"q: this kernel was built for {m['device']} and takes {self._device_type} tensors, "
                            f"got tensors on {bound.q.device}; move them, or build for that device")
        if (bound.sizes["D"], bound.sizes["DV"]) != (m["head_dim"], m["value_dim"]):
            raise CallError(f"q: this kernel was built for head dims D={m['head_dim']} DV={m['value_dim']}, got "
                            f"D={bound.sizes['D']} DV={bound.sizes['DV']}; rebuild with --dims D=...")
        kind = "decode" if "decode" in self._functions and bound.sizes["M"] <= m["decode_max_m"] else "prefill"
        result = launch(self.spec, self._functions[kind], bound)
        if validate or index_data.VALIDATE_ALL:
            check_lookups(self.spec, bound)
        return result

    def __repr__(self) -> str:
        return f"attnc.AotKernel({self.spec.name!r}, {self.manifest['device']}, key={self.spec.key[:12]})"


def compile_file(file: str | Path, out_dir: str | Path, target: str = "cuda", arch: str | None = None,
                 names: Sequence[str] | None = None, head_dims: Sequence[tuple[int, int | None]] = (),
                 emit: str = "artifact", progress: Progress | None = None) -> list[str]:
    """`attnc compile FILE --backend tvm`: the attentions of `file` (all, or `names`) built into `out_dir`.

    emit="artifact" (targets cuda, llvm): one `build` folder per attention, OUT/<name>/, and OUT/manifest.json
    listing them, which `load(OUT)` reads. emit="source" (cuda, metal, rocm, opencl): OUT/<name>.<suffix> from
    `emit_source`. head_dims: at most one (D, DV or None), used where a spec does not bind D. OUT is written whole
    or not at all (backends/folders.py). progress(done, total, label) hears of each kernel. Returns one line per
    file written."""
    from ...dsl.parser import parse_file
    from ...passes import head_dims as resolve_head_dims
    from ..folders import staged_folder

    if emit not in ("artifact", "source"):
        raise CompileError(f"--emit {emit}: the tvm backend writes an `artifact` (targets {', '.join(TARGETS)}) or "
                           f"kernel `source` (targets {', '.join(SOURCE_TARGETS)})")
    if len(head_dims) > 1:
        raise CompileError("--dims: the tvm backend builds one head dim per attention; run `attnc compile` once per "
                           "head dim, each with its own -o")
    specs = parse_file(file)
    missing = [n for n in names or () if n not in {s.name for s in specs}]
    if missing:
        raise CompileError(f"{file} has no attention named {', '.join(map(repr, missing))}; it has: "
                           f"{', '.join(s.name for s in specs)}")
    specs = [s for s in specs if not names or s.name in names]
    d, dv = head_dims[0] if head_dims else (None, None)
    out = Path(out_dir)
    if emit == "artifact" and target not in TARGETS:  # before any work: source targets say --emit source
        raise CompileError(_not_runnable(target))
    # a spec's own `dims` win; --dims DV only applies where v's head dim is DV
    dims = {s.name: (None, None) if "D" in s.dim_values else (d, dv if s.value_dim == "DV" else None) for s in specs}
    for spec in specs:  # an unbound head dim fails here, before anything is built
        resolve_head_dims(spec, *dims[spec.name])
    suffix = SOURCE_TARGETS.get(target, ("",))[0]
    files = {s.name: f"{s.name}.{suffix}" if emit == "source" else s.name for s in specs}
    lines = []
    with staged_folder(out, lambda folder: is_artifact(folder) or _is_source_folder(folder)) as staging:
        for n, spec in enumerate(specs):
            if progress:
                progress(n, len(specs), f"{spec.name} ({target} {emit})")
            if emit == "source":
                (staging / files[spec.name]).write_text(emit_source(spec, target, arch, *dims[spec.name]))
            else:
                build(spec, staging / spec.name, target, arch or ("sm_90a" if target == "cuda" else None),
                      *dims[spec.name])
            lines.append(f"{spec.name}: {target} {emit} -> {out / files[spec.name]}")
        if progress:
            progress(len(specs), len(specs), "done")
        if emit == "artifact":
            index = {"format": SET_FORMAT, "backend": "tvm", "target": target, "attentions": [s.name for s in specs]}
            (staging / MANIFEST).write_text(json.dumps(index, indent=2) + "\n")
    return lines


def _is_source_folder(folder: Path) -> bool:
    """A folder of --emit source files only (which a new --emit source build may replace)."""
    suffixes = {f".{suffix}" for suffix, _, _ in SOURCE_TARGETS.values()}
    return all(p.is_file() and p.suffix in suffixes for p in folder.iterdir())


def is_artifact(path: str | Path) -> bool:
    """Whether `path` holds a TVM artifact (`build`'s folder or `compile_file`'s set): what attnc.load asks."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") in (FORMAT, SET_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def load(path: str | Path) -> dict[str, AotKernel]:
    """The kernels of a `build` folder (one) or a `compile_file` folder, by attention name (attnc.load).
    Nothing is loaded before the spec text gives the recorded key and plan and the files pass
    cache.verify_files; a CacheError says what does not."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{folder}: not an attnc TVM artifact folder ({err}); build one with "
                         f"`attnc compile FILE --backend tvm -o DIR`") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, SET_FORMAT):
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{folder / MANIFEST}: format {got!r}, this attnc reads {FORMAT}; rebuild the artifact with "
                         f"this attnc")
    try:
        if manifest["format"] == SET_FORMAT:
            names = manifest["attentions"]
            if not all(isinstance(n, str) and n.isidentifier() for n in names):
                raise ValueError(f"attention names {names!r} are not all identifiers")
            return {name: kernel for n in names for name, kernel in load(folder / n).items()}
        spec, plan = _checked_spec(folder, manifest)
        cache.verify_files(folder, manifest["files"], "rebuild the artifact with `attnc compile --backend tvm`")
        if manifest["library"] not in manifest["files"]:
            raise ValueError(f"the library {manifest['library']!r} is not in its file list")
        functions = manifest["functions"].items()
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CacheError(f"{folder / MANIFEST}: garbled manifest ({type(err).__name__}: {err}); rebuild the artifact "
                         f"with `attnc compile --backend tvm`") from None
    module = load_module(folder / manifest["library"], cuda=plan.target.device == "cuda")
    return {spec.name: AotKernel(spec, manifest, {kind: module[name] for kind, name in functions})}


def _checked_spec(folder: Path, manifest: dict) -> tuple[Attention, KernelPlan]:
    """The artifact's spec, parsed from its canonical text, and its plan, made again: each must be what the
    manifest records (the key; the plan this attnc makes), else the library may take other arguments."""
    from ...dsl.parser import parse

    try:
        specs = parse(manifest["canonical"], filename=f"{folder / MANIFEST}:canonical")
    except AttncError as err:
        raise CacheError(f"{folder / MANIFEST}: its spec text does not parse ({err}); rebuild the artifact with "
                         f"`attnc compile --backend tvm`") from None
    if len(specs) != 1 or specs[0].key != manifest["key"]:
        raise CacheError(f"{folder / MANIFEST}: its spec text does not give the key it records (built by attnc "
                         f"{manifest.get('attnc')}); rebuild the artifact with `attnc compile --backend tvm`")
    spec = specs[0]
    plan = plan_kernel(spec, _plan_target(manifest["target"], manifest["arch"]), int(manifest["head_dim"]),
                       int(manifest["value_dim"]), PlanOptions(**manifest["options"]))
    if repr(plan) != manifest["plan"]:
        raise CacheError(f"{folder}: attnc {__version__} plans attention {spec.name!r} differently from attnc "
                         f"{manifest.get('attnc')}, which built it; rebuild the artifact with `attnc compile "
                         f"--backend tvm`")
    return spec, plan
