"""Ahead-of-time Triton kernels: `attnc compile FILE --backend triton --arch sm_90a -o DIR` builds them on a machine
without a GPU; `attnc.load(DIR)` runs them on the GPU without compiling.

What a build holds, per attention and head dims (`DIR/<name>/d<D>_dv<DV>/`): the generated `kernel.py`, and for
every launch the runtime launcher can make (the prefill tile, each decode tile and GQA packing) a cubin plus
Triton's metadata, compiled by `triton.compile` of an `ASTSource` for `GPUTarget("cuda", capability, 32)`.
The launches are not listed by hand: the build compiles the plan's kernel list (passes/kernels.py), the finite
set the runtime launchers select from, with exactly the constexprs and options a call passes.

Triton specializes a kernel on its arguments (16-byte aligned pointers, strides equal to 1 or divisible by 16)
when it compiles at run time; a build cannot see the tensors, so each forward kernel is compiled twice: a "dense"
build that assumes what a q/k/v/out with a contiguous head dim and 16-element aligned rows has (what Triton's JIT
would assume for them), and an "any" build that assumes nothing. Per call the first build whose assumptions the
arguments meet runs. Sizes, strides and integer params are 64-bit arguments, so every value fits. Where the plan
reads K/V through tensor descriptors (sm_90), the launcher picks per call between the descriptor loops and the
pointer loops (the TMA constexpr, from K/V's strides and alignment); the trace meets both, so both are built.

`DIR/manifest.json` records the spec (canonical text and key), each plan, the kernels with their signatures,
constexprs, assumptions and launch metadata, the Triton version and arch that built them, the attnc version and
the SHA-256 of every file. `load` refuses an artifact whose Triton version, attnc version, arch or files do not
match this machine, or whose plans this attnc would not make, with a CacheError that says how to rebuild it; and
one whose folder, manifest or files are not owned by this user or root, or are writable by others, or lie outside
the folder (runtime/cache.verify_files). The spec is read back from its canonical text (no pickle) and must give
the recorded key before any kernel is imported.

Where the plan's prefill path is Gluon (sm_90, passes/warpgroups.py), its kernel list names the warpgroup kernel
too: the build writes `gluon_kernel.py` and compiles `attn_fwd_gluon` from Gluon's AST source, and a loaded kernel
launches it through the JIT runtime's Gluon launcher (gluon.launcher). Likewise where an MLA decode plan runs the
Gluon MLA decode kernel (passes/latent_decode.py): the build writes `gluon_decode_kernel.py` and compiles each
`attn_decode_gluon` launch of the list, and a loaded kernel runs them through gluon_decode.launcher, which hands the
calls TMA cannot read to the saved Triton decode kernels, as the JIT runtime does. A Triton whose Gluon is not the
one the kernels were written for cannot build them: the manifest records them under `not_built` with the reason,
and the loaded kernel runs the template (or the Triton decode kernel) for those launches and warns once, as the JIT
runtime on that Triton would compute.

Loaded attentions are ordinary `attnc.Kernel`s whose backend is the artifact (`AotBackend`): they bind their
arguments like `attnc.compile`'s kernels and launch through the same `TritonLauncher`, whose kernels here are
`AotKernel`s, stand-ins for Triton's JITFunction that run the saved cubins (so the launcher's prepared-launch
fast path applies to them too).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import warnings
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

# Compiler workers import this module: torch (seconds to import) and the runtime are imported where used.
from ...version import __version__
from .decode import generate_decode
from .generate import generate
from .saved import compiled_kernel, source_class
from .signature import ALIGNED, UNIT, argument_types
from ...errors import AttncError, CacheError, CallError, CompileError
from ...ir import Attention
from ...passes import KernelPlan, PlanOptions, Target, plan_kernel
from ...passes.plan import KernelLaunch
from .. import cache
from ..folders import check_output, staged_folder
from ..progress import Progress

if TYPE_CHECKING:
    import torch

    from .launch import TritonLauncher

FORMAT = "attnc-aot/2"  # bump when the layout or the manifest changes
MANIFEST = "manifest.json"
# the generated sources in each build folder
SOURCES = {"prefill": "kernel.py", "decode": "decode.py", "gluon": "gluon_kernel.py",
           "gluon_decode": "gluon_decode_kernel.py"}
GLUON_MODULES = ("gluon", "gluon_decode")  # compiled from Gluon's AST source, on the Triton its Gluon was written for


def _generate_gluon(plan: KernelPlan) -> str:
    from .gluon import generate_gluon  # imports torch, which compiler workers do without

    return generate_gluon(plan)


def _generate_gluon_decode(plan: KernelPlan) -> str:
    from .gluon_decode import generate_gluon_decode  # imports torch, as _generate_gluon's module does

    return generate_gluon_decode(plan)


GENERATORS = {"prefill": generate, "decode": generate_decode, "gluon": _generate_gluon,
              "gluon_decode": _generate_gluon_decode}
ALIGNMENT = 16  # bytes for pointers, elements for strides: Triton's "tt.divisibility" hint
MIN_CAPABILITY = 75  # the oldest NVIDIA arch Triton 3.x compiles for


# ---------------------------------------------------------------- targets and layouts


@dataclass(frozen=True)
class Arch:
    capability: int  # compute capability x 10, as Target.arch and GPUTarget use it
    name: str  # what Triton compiles for: sm_90a for 90 and newer

    @classmethod
    def parse(cls, text: str) -> Arch:
        match = re.fullmatch(r"sm_(\d{2,3})a?", text.strip())
        if match is None:
            raise AttncError(f"--arch {text}: expected an NVIDIA arch as sm_<compute capability>, e.g. sm_90a "
                             f"(H100) or sm_80 (A100)")
        capability = int(match.group(1))
        if capability < MIN_CAPABILITY:
            raise AttncError(f"--arch {text}: Triton compiles for sm_{MIN_CAPABILITY} and newer; pick a newer arch")
        return cls.of_capability(capability)

    @classmethod
    def of_capability(cls, capability: int) -> Arch:
        return cls(capability, f"sm_{capability}{'a' if capability >= 90 else ''}")

    @classmethod
    def of(cls, device: torch.device) -> Arch:
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return cls.of_capability(major * 10 + minor)


@dataclass(frozen=True)
class Layout:
    """What a build of a kernel assumes about its arguments (names not in a kernel are ignored)."""

    name: str
    divisible: tuple[str, ...] = ()  # pointers 16-byte aligned, ints divisible by 16
    unit: tuple[str, ...] = ()  # ints equal to 1, compiled in as constants


LAYOUTS = (
    # q/k/v/out with a contiguous head dim and rows 16 elements apart: every contiguous BHSD or BSHD tensor whose
    # head dims are multiples of 16, and their head or sequence slices.
    Layout("dense", divisible=ALIGNED, unit=UNIT),
    Layout("any"),
)


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class KernelBuild:
    """One compiled kernel: `kernel` launched with `launch` (the launcher's constexpr and option keywords, in call
    order) on arguments that meet `divisible` and `unit`."""

    kernel: str
    launch: tuple[tuple[str, object], ...]
    layout: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, object]
    divisible: tuple[str, ...]
    unit: tuple[str, ...]
    binary: str  # artifact-relative paths
    metadata: str
    triton_hash: str
    shared: int
    num_warps: int
    num_stages: int

    def as_json(self) -> dict:
        return {"kernel": self.kernel, "launch": [list(kv) for kv in self.launch], "layout": self.layout,
                "signature": dict(self.signature), "constexprs": dict(self.constexprs),
                "assumes": {"divisible_by_16": list(self.divisible), "equal_to_1": list(self.unit)},
                "binary": self.binary, "metadata": self.metadata, "triton_hash": self.triton_hash,
                "shared": self.shared, "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, d: dict) -> KernelBuild:
        return cls(d["kernel"], tuple((k, v) for k, v in d["launch"]), d["layout"], d["signature"], d["constexprs"],
                   tuple(d["assumes"]["divisible_by_16"]), tuple(d["assumes"]["equal_to_1"]), d["binary"],
                   d["metadata"], d["triton_hash"], int(d["shared"]), int(d["num_warps"]), int(d["num_stages"]))


@dataclass(frozen=True)
class HeadDimBuild:
    head_dim: int
    value_dim: int
    plan: str  # repr(KernelPlan): load re-plans and compares
    sources: Mapping[str, str]  # module (a SOURCES key) -> artifact-relative path of its source
    kernels: tuple[KernelBuild, ...]
    # kernels of the plan's list that this build's Triton cannot compile (the Gluon kernels off Triton 3.6) -> why;
    # a loaded kernel runs the template's or the Triton decode kernel's launches in their place and warns once
    not_built: Mapping[str, str]


@dataclass(frozen=True)
class AttentionBuild:
    name: str
    key: str
    canonical: str
    builds: tuple[HeadDimBuild, ...]


@dataclass(frozen=True)
class Artifact:
    """A verified AOT folder (files hashed, versions and arch checked against this machine)."""

    path: Path
    manifest: dict = field(repr=False)
    arch: Arch
    triton: str
    command: str
    attentions: tuple[AttentionBuild, ...]


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify `path`; raise CacheError naming what does not match and how to rebuild."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CacheError(f"{folder}: no such folder; build an artifact with "
                         f"`attnc compile FILE --backend triton --arch sm_90a -o {folder}`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{folder}: not an attnc AOT artifact (no {MANIFEST}); build one with "
                         f"`attnc compile FILE --backend triton --arch sm_90a -o {folder}`") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CacheError(f"{manifest_path}: unreadable ({type(err).__name__}: {err}); rebuild the artifact with "
                         f"`attnc compile`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{manifest_path}: format {got!r}, this attnc reads {FORMAT!r}; rebuild the artifact "
                         f"with this attnc's `attnc compile`")
    try:
        arch = Arch.parse(manifest["arch"])
        command = manifest["command"]
        built_by = f"built by Triton {manifest['triton']} for {arch.name}"
        _check_versions(manifest, built_by, command)
        cache.verify_files(folder, manifest["files"], f"rebuild with `{command}`")
        attentions = tuple(
            AttentionBuild(a["name"], a["key"], a["canonical"], tuple(
                HeadDimBuild(int(b["head_dim"]), int(b["value_dim"]), b["plan"], dict(b["sources"]),
                             tuple(KernelBuild.from_json(k) for k in b["kernels"]), dict(b["not_built"]))
                for b in a["builds"]))
            for a in manifest["attentions"])
        unlisted = [path for a in attentions for b in a.builds
                    for path in (*b.sources.values(), *(p for k in b.kernels for p in (k.binary, k.metadata)))
                    if path not in manifest["files"]]
        if unlisted:
            raise ValueError(f"files not in its file list: {unlisted}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CacheError(f"{manifest_path}: garbled manifest ({type(err).__name__}: {err}); rebuild the artifact "
                         f"with `attnc compile`") from None
    _check_gpu(arch, built_by, command)
    return Artifact(folder, manifest, arch, manifest["triton"], command, attentions)


def _check_versions(manifest: dict, built_by: str, command: str) -> None:
    try:
        import triton
    except ImportError:
        raise CacheError(f"{built_by}; this machine has no Triton: install triton=={manifest['triton']}") from None
    if triton.__version__ != manifest["triton"]:
        raise CacheError(f"{built_by}; this machine has Triton {triton.__version__}: rebuild with `{command}` "
                         f"using Triton {triton.__version__}")
    if manifest["attnc"] != __version__:
        raise CacheError(f"{built_by} and attnc {manifest['attnc']}; this is attnc {__version__}: rebuild with "
                         f"`{command}` using this attnc")


def _check_gpu(arch: Arch, built_by: str, command: str) -> None:
    """Refuse a machine none of whose GPUs can run the cubins (calls check their own device too)."""
    import torch

    if not torch.cuda.is_available():
        return  # loading is fine; a call on a non-CUDA tensor is refused by AotBackend.target
    found = [Arch.of(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    if arch not in found:
        raise CacheError(f"{built_by}; this machine's GPU is {', '.join(sorted({a.name for a in found}))}: rebuild "
                         f"with `{_with_arch(command, found[0])}`")


def _with_arch(command: str, arch: Arch) -> str:
    return re.sub(r"--arch[ =]\S+", f"--arch {arch.name}", command)


# ---------------------------------------------------------------- loading


def load_backends(path: str | os.PathLike) -> dict[str, tuple[Attention, "AotBackend"]]:
    """`attnc.load`: each attention of the artifact, by name, as its spec and the backend that runs its saved
    kernels (the runtime wraps each pair in an attnc.Kernel)."""
    artifact = read_artifact(path)
    loaded = {}
    for attention in artifact.attentions:
        spec = _spec_of(artifact, attention)
        loaded[attention.name] = (spec, AotBackend(artifact, attention, spec))
    return loaded


def _spec_of(artifact: Artifact, attention: AttentionBuild) -> Attention:
    from ...dsl.parser import parse

    specs = parse(attention.canonical, filename=f"{artifact.path / MANIFEST}:{attention.name}")
    if len(specs) != 1 or specs[0].key != attention.key:
        raise CacheError(f"{artifact.path}: this attnc reads attention {attention.name!r} back with another key "
                         f"than the one it was built with: rebuild with `{artifact.command}`")
    spec = specs[0]
    for build in attention.builds:
        # The same plan and the same generated source: the saved kernels take exactly the arguments this attnc's
        # launcher passes.
        plan = plan_kernel(spec, Target("triton", "cuda", artifact.arch.capability), build.head_dim,
                           build.value_dim, PlanOptions())
        same = repr(plan) == build.plan and all(
            GENERATORS[module](plan) == (artifact.path / path).read_text("utf-8")
            for module, path in build.sources.items())
        if not same:
            raise CacheError(f"{artifact.path}: attnc {__version__} plans or generates attention {attention.name!r} "
                             f"(D={build.head_dim}) differently from the attnc that built it: rebuild with "
                             f"`{artifact.command}`")
    return spec


class AotBackend:
    """The backend of one loaded attention: `Kernel` plans as for any backend, and `build` hands the launcher the
    saved kernels of that plan instead of compiling."""

    name = "triton"

    def __init__(self, artifact: Artifact, attention: AttentionBuild, spec: Attention):
        self.artifact, self.attention, self.spec = artifact, attention, spec

    def target(self, device: torch.device) -> Target:
        a = self.artifact
        if device.type != "cuda":
            raise CallError(f"q: is on {device}, but the AOT kernels of {a.path} run on CUDA GPUs ({a.arch.name}); "
                            f"move the tensors to the GPU")
        here = Arch.of(device)
        if here != a.arch:
            raise CacheError(f"{a.path}: built by Triton {a.triton} for {a.arch.name}; {device} is {here.name}: "
                             f"rebuild with `{_with_arch(a.command, here)}`")
        return Target("triton", "cuda", a.arch.capability)

    def build(self, plan: KernelPlan) -> TritonLauncher:
        from . import gluon, gluon_decode
        from .serving import launcher_for

        builds = self.attention.builds
        match = next((b for b in builds if b.plan == repr(plan)), None)
        if match is None:
            built = ", ".join(f"D={b.head_dim} DV={b.value_dim}" for b in builds)
            raise CacheError(f"{self.artifact.path}: attention {self.attention.name!r} was built for {built}, not "
                             f"D={plan.head_dim} DV={plan.value_dim}: rebuild with --dims D={plan.head_dim},"
                             f"DV={plan.value_dim} (`{self.artifact.command}`)")
        modules = {}
        for module, path in match.sources.items():
            digest = self.artifact.manifest["files"][path]["sha256"]
            loaded = _import_kernels(self.artifact.path / path, f"attnc_aot.{self.spec.name}_{module}_{digest[:16]}")
            kernels = [k for k in match.kernels if KernelLaunch(k.kernel, ()).module == module]
            modules[module] = SimpleNamespace(**{
                name: AotKernel(getattr(loaded, name), self.artifact.path, [k for k in kernels if k.kernel == name],
                                self.artifact.command)
                for name in dict.fromkeys(k.kernel for k in kernels)})
        fallback = launcher_for(plan, modules.get("prefill"), modules.get("decode"))
        # the JIT backend's choice (backend.py), with the saved Gluon kernels in place of compiling them
        if "gluon_decode" in modules:
            return gluon_decode.launcher(plan, fallback, modules["gluon_decode"])
        if "gluon" in modules:
            return gluon.launcher(plan, fallback, modules["gluon"])
        instead = "the Triton decode kernel" if plan.spec.decode_only else "the Triton template"
        for kernel, why in match.not_built.items():
            warnings.warn(f"{self.artifact.path}: attention {self.attention.name!r} (D={plan.head_dim} "
                          f"DV={plan.value_dim}) was built without {kernel} ({why}); its launches run {instead} "
                          f"instead. Rebuild with Triton {', '.join(gluon.GLUON_TRITON)} to include it: "
                          f"`{self.artifact.command}`", stacklevel=4)
        return fallback


class AotKernel:
    """Stands in for a JITFunction in TritonLauncher: `kernel[grid](*args, **launch)` runs the saved build for
    those `launch` keywords whose assumptions the arguments meet, and returns its triton CompiledKernel."""

    def __init__(self, fn, folder: Path, builds: Sequence[KernelBuild], command: str):
        self.fn, self.folder, self.command = fn, folder, command
        self.arg_names = fn.arg_names
        self._builds: dict[tuple, list[_LoadedBuild]] = {}
        for b in builds:  # the manifest lists the dense build of a launch before the "any" one
            self._builds.setdefault(b.launch, []).append(_LoadedBuild(self, b))

    def __getitem__(self, grid):
        return lambda *args, **launch: self.run(grid, args, launch)

    def run(self, grid: tuple, args: tuple, launch: dict):
        for build in self._builds.get(tuple(launch.items()), ()):
            if build.accepts(args):
                compiled = build.compiled()
                # A CompiledKernel takes a 3-D grid and every argument, constexprs included (it skips those).
                compiled[(*grid, 1, 1)[:3]](*args, *(launch[name] for name in self.arg_names[len(args):]))
                return compiled
        raise CacheError(f"{self.folder}: no saved {self.fn.__name__} for the launch {dict(launch)} (the artifact "
                         f"holds {sorted({str(dict(k)) for k in self._builds})}); the launcher of this attnc differs "
                         f"from the one that built it: rebuild with `{self.command}`")


class _LoadedBuild:
    def __init__(self, owner: AotKernel, build: KernelBuild):
        names = owner.arg_names
        self.owner, self.build = owner, build
        self.divisible = tuple((names.index(n), build.signature[n].startswith("*")) for n in build.divisible)
        self.unit = tuple(names.index(n) for n in build.unit)
        self._compiled = None

    def accepts(self, args: tuple) -> bool:
        for i in self.unit:
            if args[i] != 1:
                return False
        for i, pointer in self.divisible:
            if (args[i].data_ptr() if pointer else args[i]) % ALIGNMENT:
                return False
        return True

    def compiled(self):
        """Triton's CompiledKernel rebuilt from the saved cubin and metadata (the cubin loads on first launch)."""
        if self._compiled is None:
            b, folder, fn = self.build, self.owner.folder, self.owner.fn
            source = _source_class(b.kernel)(fn, dict(b.signature), dict(b.constexprs), _attrs(fn, b.divisible))
            self._compiled = compiled_kernel(source, b.kernel, folder / b.metadata, folder / b.binary, b.triton_hash)
        return self._compiled


def _attrs(fn, divisible: Iterable[str]) -> dict:
    from triton.backends.compiler import BaseBackend

    return {(fn.arg_names.index(n),): BaseBackend.parse_attr("D") for n in divisible}


def _source_class(kernel: str):
    """What triton.compile takes `kernel` from: Gluon's AST source for the Gluon kernels, Triton's otherwise."""
    return source_class(KernelLaunch(kernel, ()).module in GLUON_MODULES)


def _import_kernels(path: Path, module_name: str) -> ModuleType:
    """The generated module with real JITFunctions even where TRITON_INTERPRET=1 (CPU test runs). Like
    launch.import_source (no bytecode written into the artifact), without importing torch into workers."""
    import triton

    module = sys.modules.get(module_name)
    if module is None:
        module = ModuleType(module_name)
        module.__file__ = str(path)  # triton.jit reads each kernel's source back from here
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = False
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
        sys.modules[module_name] = module
    return module


# ---------------------------------------------------------------- building


@dataclass(frozen=True)
class CompileJob:
    """One `triton.compile`, runnable in a worker process."""

    source: str  # path of kernel.py
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    divisible: tuple[str, ...]
    options: dict
    capability: int
    out_stem: str  # absolute path without suffix: .cubin and .json are written
    label: str  # for error messages


def compile_job(job: CompileJob) -> dict:
    """Compile `job` in a worker process (see _run_jobs); the result, or the error as text, comes back."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        fn = getattr(_import_kernels(Path(job.source), job.module), job.kernel)
        source = _source_class(job.kernel)(fn, job.signature, job.constexprs, _attrs(fn, job.divisible))
        compiled = triton.compile(source, target=GPUTarget("cuda", job.capability, 32), options=job.options)
    except Exception as err:  # a Triton compile error or an internal failure: reported with the kernel's name
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"}
    metadata = Path(compiled.metadata_group[f"{compiled.name}.json"])
    Path(job.out_stem + ".cubin").write_bytes(compiled.asm["cubin"])
    shutil.copyfile(metadata, job.out_stem + ".json")
    md = compiled.metadata
    return {"hash": compiled.hash, "shared": md.shared, "num_warps": md.num_warps, "num_stages": md.num_stages}


def _run_jobs(jobs: list[CompileJob], workers: int, progress: Progress | None = None) -> list[dict]:
    """Compile in fresh processes with Triton's interpreter off: where TRITON_INTERPRET=1 was set when triton was
    imported, Triton's own library functions (tl.zeros, tl.max, ...) are interpreter functions and cannot compile.
    progress(done, total, label) hears of each kernel as it is done."""
    import multiprocessing

    results: list[dict] = [{} for _ in jobs]
    try:
        with _environ("TRITON_INTERPRET", "0"), ProcessPoolExecutor(  # workers are spawned at the first submit
                max_workers=max(1, min(workers, len(jobs))), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(compile_job, job): n for n, job in enumerate(jobs)}
            for done, future in enumerate(as_completed(futures), 1):
                n = futures[future]
                results[n] = future.result()
                if progress:
                    progress(done, len(jobs), "/".join(Path(jobs[n].out_stem).parts[-3:]))
    except BrokenProcessPool:
        raise CompileError("the Triton compiler crashed in a worker process (a crash inside Triton, not an error in "
                           "the spec); run with --jobs 1 and look at the last kernel it compiled") from None
    for job, result in zip(jobs, results):
        if "error" in result:
            raise CompileError(f"Triton {_triton_version()} failed to compile {job.label}: {result['error']}")
    return results


@contextmanager
def _environ(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _triton_version() -> str:
    import triton

    return triton.__version__


@dataclass(frozen=True)
class BuildSummary:
    path: Path
    arch: Arch
    triton: str
    lines: tuple[str, ...]  # one per attention and head dims
    files: int
    size: int


def compile_artifact(file: str | os.PathLike, out: str | os.PathLike, arch: str, names: Sequence[str] | None = None,
                     head_dims: Sequence[tuple[int, int | None]] = (), jobs: int | None = None,
                     command: str | None = None, progress: Progress | None = None) -> BuildSummary:
    """Build the AOT artifact of the attentions in `file` (all, or those in `names`) for `arch` into `out`.

    head_dims: (D, DV or None) builds for attentions whose spec does not bind D; the spec's dims win where it does.
    jobs: compiler processes (default: the CPU count, at most 8). command: recorded for rebuild hints.
    progress(done, total, label): told of each kernel compiled (the CLI's progress bar).
    The folder is written whole or not at all: built beside `out`, then moved into place (replacing an earlier
    artifact there, never any other folder)."""
    from ...dsl.parser import parse_file

    target_arch = Arch.parse(arch)
    out = Path(out)
    check_output(out, _is_artifact)
    specs = parse_file(file)
    if names:
        missing = [n for n in names if n not in {s.name for s in specs}]
        if missing:
            raise AttncError(f"{file} has no attention named {', '.join(map(repr, missing))}; it has: "
                             f"{', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in names]
    builds = [(spec, _dims_for(spec, head_dims)) for spec in specs]
    command = command or (f"attnc compile {shlex.quote(str(file))} --backend triton --arch {target_arch.name} "
                          f"-o {shlex.quote(str(out))}")
    with staged_folder(out, _is_artifact) as staging:
        manifest, lines = _build(staging, builds, target_arch, jobs or min(os.cpu_count() or 1, 8), command,
                                 progress)
        files = _hash_files(staging)
        manifest["files"] = files
        manifest["digest"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        cache.seal([staging, *staging.rglob("*")])
    size = sum(r["size"] for r in files.values()) + (out / MANIFEST).stat().st_size
    return BuildSummary(out, target_arch, manifest["triton"], tuple(lines), len(files) + 1, size)


def _dims_for(spec: Attention, head_dims: Sequence[tuple[int, int | None]]) -> list[tuple[int, int]]:
    dims = spec.dim_values
    if "D" in dims:
        return [(dims["D"], dims.get("DV", dims["D"]))]
    if not head_dims:
        raise AttncError(f"attention {spec.name!r}: the head dim D is not bound by `dims` in the spec, so the build "
                         f"needs it: pass --dims D=128 (and DV=... when v's head dim differs)")
    result = []
    for d, dv in head_dims:
        dv = dims.get("DV", dv or d)
        if spec.value_dim == "D" and dv != d:
            raise AttncError(f"attention {spec.name!r}: v's head dim is D, so --dims DV={dv} must equal D={d}")
        result.append((d, dv))
    return list(dict.fromkeys(result))


def _is_artifact(out: Path) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("format", "").startswith("attnc-aot/")
    except (OSError, ValueError, AttributeError):
        return False


def _hash_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                "size": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(staging: Path, builds, arch: Arch, workers: int, command: str,
           progress: Progress | None = None) -> tuple[dict, list[str]]:
    jobs: list[CompileJob] = []
    entries: list[tuple[dict, dict, list[tuple[CompileJob, KernelLaunch, Layout, dict]]]] = []
    attentions = []
    for spec, head_dims in builds:
        attention = {"name": spec.name, "key": spec.key, "canonical": spec.canonical, "builds": []}
        attentions.append(attention)
        for d, dv in head_dims:
            plan = plan_kernel(spec, Target("triton", "cuda", arch.capability), d, dv, PlanOptions())
            folder = Path(spec.name) / f"d{d}_dv{dv}"
            (staging / folder).mkdir(parents=True)
            build = {"head_dim": d, "value_dim": dv, "plan": repr(plan), "plan_text": plan.describe(),
                     "sources": {}, "kernels": [], "not_built": {}}
            attention["builds"].append(build)
            kernels = []
            for kernel in plan.kernels:
                why = _cannot_build(kernel)
                if why:
                    build["not_built"][kernel.function] = why
                else:
                    kernels.append(kernel)
            modules = {}
            for module in dict.fromkeys(k.module for k in kernels):
                source = staging / folder / SOURCES[module]
                text = GENERATORS[module](plan)
                source.write_text(text, encoding="utf-8")
                name = f"attnc_aot_build.{spec.name}_{module}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
                modules[module] = (source, name, _import_kernels(source, name))
                build["sources"][module] = (folder / SOURCES[module]).as_posix()
            types = argument_types(plan)
            pending = []
            for kernel in kernels:
                source, module_name, module = modules[kernel.module]
                fn = getattr(module, kernel.function)
                for layout in _layouts_for(fn):
                    stem = folder / f"{kernel.function}.{len(pending):03d}.{layout.name}"
                    job = _job(fn, kernel, types, layout, str(source), module_name, arch, str(staging / stem),
                               f"{kernel.function} of attention {spec.name!r} (D={d} DV={dv}, "
                               f"{kernel.keywords}, {layout.name} layout) for {arch.name}")
                    pending.append((job, kernel, layout, {"binary": stem.as_posix() + ".cubin",
                                                          "metadata": stem.as_posix() + ".json"}))
            jobs += [p[0] for p in pending]
            entries.append((attention, build, pending))
    if progress:
        progress(0, len(jobs), f"{len(jobs)} kernels")
    results = iter(_run_jobs(jobs, workers, progress))
    lines = []
    for attention, build, pending in entries:
        for job, kernel, layout, paths in pending:
            r = next(results)
            build["kernels"].append(KernelBuild(
                kernel.function, kernel.launch, layout.name, job.signature, job.constexprs, job.divisible,
                tuple(n for n, v in job.constexprs.items() if n in layout.unit), paths["binary"], paths["metadata"],
                r["hash"], r["shared"], r["num_warps"], r["num_stages"]).as_json())
        lines.append(f"{attention['name']}: D={build['head_dim']} DV={build['value_dim']}, "
                     f"{len(pending)} kernels -> {Path(next(iter(build['sources'].values()))).parent.as_posix()}/"
                     + "".join(f"; not built: {k} ({why}), the template runs its launches"
                               for k, why in build["not_built"].items()))
    manifest = {"format": FORMAT, "attnc": __version__, "triton": _triton_version(), "arch": arch.name,
                "capability": arch.capability, "command": command,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "attentions": attentions}
    return manifest, lines


def _cannot_build(kernel: KernelLaunch) -> str:
    """Why this Triton cannot build `kernel` ("" where it can): the Gluon kernels need the Gluon API they were
    written against."""
    if kernel.module not in GLUON_MODULES:
        return ""
    from .gluon import unavailable_here

    return unavailable_here()


def _layouts_for(fn) -> list[Layout]:
    """The layouts that differ for this kernel: those whose assumptions name none of its arguments collapse."""
    seen, result = set(), []
    for layout in LAYOUTS:
        effective = (tuple(n for n in layout.divisible if n in fn.arg_names),
                     tuple(n for n in layout.unit if n in fn.arg_names))
        if effective not in seen:
            seen.add(effective)
            result.append(Layout(layout.name, *effective))
    return result


def _job(fn, kernel: KernelLaunch, types: Mapping[str, str], layout: Layout, source: str, module: str, arch: Arch,
         out_stem: str, label: str) -> CompileJob:
    """The signature and constexprs Triton's JIT would compile for this launch, with `layout`'s assumptions."""
    keywords = kernel.keywords
    signature, constexprs = {}, {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", keywords[name]
        elif name in layout.unit:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = types[name]
    options = {k: v for k, v in keywords.items() if k not in fn.arg_names}
    return CompileJob(source, module, kernel.function, signature, constexprs, layout.divisible, options,
                      arch.capability, out_stem, label)
