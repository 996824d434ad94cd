"""Where Triton's compile time goes for the cold-compile benchmark's kernel: time per stage, per variant.

The kernel is the one `benchmarks/host_overhead.py` compiles on its first call of a new variant (its spec: a
fresh softcap constant, causal, bf16, B=1 H=16 S=128), for sm_90a, at that script's head dim D=64 and at D=128
(`attnc bench`'s cold compile). The source is what attnc generates for the plan; the arguments, constexprs and
options are those the runtime launcher passes (recorded from `TritonLauncher` on CPU tensors of the benchmark's
shapes), specialized by Triton's own JIT binder, so `triton.compile` gets the `ASTSource` a GPU run gives it. No
GPU is needed: the target is `GPUTarget("cuda", 90, 32)`.

Stages (`backend.add_stages`, timed by Triton's compilation listener): frontend (Python AST -> TTIR), ttir,
ttgir, llir (TTGIR -> LLVM IR, LLVM O3), ptx (LLVM NVPTX), cubin (ptxas), store (cache writes). Every compile
gets a fresh cache folder; after one warm-up compile (the benchmark's process has compiled before) the variants
are compiled round-robin and the median of `--runs` is reported.

Variants, each one change from `tuned` (the plan attnc makes): `stages2`/`stages3` (num_stages), `pointer`
(pointer loads instead of tensor descriptors), `tma_no_ws` (D=64, whose tuned row warp-specializes), `warps8`
(D=64: 8 warps instead of 4, half the elements per thread), `lse` (the spec also returns lse), `mask_all` (the
element-wise mask on every key tile; measurement only: the template is rendered as if every tile were partial),
`libdevice_exp2` (tl.exp2, which Triton 3.6 lowers through libdevice, instead of the inline `ex2.approx`).
`--template PATH` adds `tuned` rendered from another prefill template (e.g. an earlier commit's, for a
before/after in one run; with tl.exp2 in the score, as templates before the `exp2` hook expect); `--ptxas` times
ptxas options on the tuned PTX.

    python benchmarks/compile_phases.py [--runs 3] [--dims 64,128] [--variants tuned,lse,...] [--template PATH]
                                        [--ptxas] [--json PATH] [--dump DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "0")  # real JITFunctions: the interpreter's cannot compile

import jinja2  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import attnc  # noqa: E402
from attnc.backends.triton import generate as codegen  # noqa: E402
from attnc.dsl.signature import bind  # noqa: E402
from attnc.passes import PlanOptions, Target, plan_kernel  # noqa: E402
from attnc.backends.triton import launch as launching  # noqa: E402
from attnc.backends.triton.aot import _import_kernels  # noqa: E402
from attnc.backends.triton.launch import TritonLauncher  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead import B, H, S, SPEC  # noqa: E402  (the cold-compile benchmark's spec and shapes)

CAPABILITY = 90
TARGET = GPUTarget("cuda", CAPABILITY, 32)
STAGES = ("frontend", "ttir", "ttgir", "llir", "ptx", "cubin", "store")
PREFILL_TEMPLATE = "kernel.py.j2"


@dataclass(frozen=True)
class Variant:
    name: str
    options: PlanOptions = PlanOptions()
    lse: bool = False
    mask_all: bool = False  # render with every key tile partial: the mask on every tile
    template: Path | None = None  # another prefill template than the package's
    exp2: str | None = None  # the kernel's base-2 exponential; None: generate()'s choice
    only_dims: tuple[int, ...] = ()  # empty: every head dim


VARIANTS = (
    Variant("tuned"),
    Variant("stages2", PlanOptions(num_stages=2)),
    Variant("stages3", PlanOptions(num_stages=3)),
    Variant("pointer", PlanOptions(tma=False, warp_specialize=False)),
    Variant("tma_no_ws", PlanOptions(tma=True, warp_specialize=False), only_dims=(64,)),
    Variant("warps8", PlanOptions(num_warps=8), only_dims=(64,)),
    Variant("lse", lse=True),
    Variant("mask_all", mask_all=True),
    Variant("libdevice_exp2", exp2="tl.exp2"),
)


@dataclass(frozen=True)
class Case:
    """One compile: the generated source and the `triton.compile` inputs Triton's JIT makes for the launch."""

    source_text: str
    src: ASTSource
    options: dict
    launch: dict  # the launcher's constexpr and option keywords, for the report


def spec_for(cap: float, lse: bool):
    text = SPEC.format(name=f"cold_{str(cap).replace('.', '_')}", score=f"score = {cap} * tanh(score / {cap})")
    if lse:
        text = text.replace("return softmax(score) @ v", "return softmax(score) @ v, lse")
    return attnc.parse(text)[0]


class _Rendering:
    """A prefill template whose hooks are overridden (measurement variants only)."""

    def __init__(self, template: jinja2.Template, overrides: dict):
        self.template, self.overrides = template, overrides

    def render(self, **hooks) -> str:
        return self.template.render(**{**hooks, **self.overrides})


@contextmanager
def prefill_template(variant: Variant):
    """generate() with the variant's prefill template, exp2 and hook overrides."""
    if variant.template is None and not variant.mask_all and variant.exp2 is None:
        yield
        return
    real, real_hooks = codegen.template, codegen.shared_hooks
    template = real(PREFILL_TEMPLATE)
    if variant.template is not None:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(variant.template.parent),
                                 undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        template = env.get_template(variant.template.name)
    overrides = {"all_partial": True, "partial_before": True} if variant.mask_all else {}
    codegen.template = lambda name: _Rendering(template, overrides) if name == PREFILL_TEMPLATE else real(name)
    if variant.exp2 is not None:
        codegen.shared_hooks = lambda plan, exp2="tl.exp2": real_hooks(plan, variant.exp2)
    try:
        yield
    finally:
        codegen.template, codegen.shared_hooks = real, real_hooks


def make_case(variant: Variant, d: int, cap: float, folder: Path) -> Case:
    plan = plan_kernel(spec_for(cap, variant.lse), Target("triton", "cuda", CAPABILITY), d, d, variant.options)
    with prefill_template(variant):
        text = codegen.generate(plan)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = folder / f"{variant.name}_d{d}_{digest}.py"
    path.write_text(text, encoding="utf-8")
    module = _import_kernels(path, f"compile_phases_{digest}")  # a module per source: imports are cached
    args, launch = record_launch(plan, module, d)
    src, options = jit_compile_inputs(module.attn_fwd, args, launch)
    return Case(text, src, options, launch)


def record_launch(plan, module, d: int) -> tuple[tuple, dict]:
    """attn_fwd's arguments and keywords as TritonLauncher passes them for the benchmark's shapes (CPU tensors:
    only their shapes, strides, dtypes and 16-byte alignment matter to Triton's specialization)."""
    log: list = []

    class Recorded(Exception):
        pass

    def record(fn, grid, args, keywords, *rest):  # stands in for launch_fitting: the JIT launch, recorded
        log.append((tuple(args), dict(keywords)))
        raise Recorded

    launcher = TritonLauncher(plan, SimpleNamespace(attn_fwd=module.attn_fwd))
    q, k, v = (torch.randn(B, H, S, d, dtype=torch.bfloat16) for _ in range(3))
    real, launching.launch_fitting = launching.launch_fitting, record
    try:
        launcher(bind(plan.spec, q, k, v, {}))
    except Recorded:
        pass
    finally:
        launching.launch_fitting = real
    (launch,) = log
    return launch


def jit_compile_inputs(fn, args: tuple, launch: dict) -> tuple[ASTSource, dict]:
    """What `fn[grid](*args, **launch)` hands `triton.compile` on an sm_90 device: Triton's own binder and
    argument packing, with the target's backend instead of the current device's."""
    backend = make_backend(TARGET)
    kwargs = {**launch, "debug": fn.debug or triton.knobs.runtime.debug}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


# ---------------------------------------------------------------- timing


def timed_compile(case: Case):
    """Seconds per stage and in total of one cold `triton.compile` (fresh cache folder), and the kernel."""
    record: dict = {}

    def listener(*, times, cache_hit: bool, **_):
        assert not cache_hit, "a cold compile hit the cache"
        record["times"] = times

    with tempfile.TemporaryDirectory(prefix="attnc-phases-") as cache_dir, triton.knobs.cache.scope(), \
            triton.knobs.compilation.scope():
        triton.knobs.cache.dir = cache_dir
        triton.knobs.compilation.listener = listener
        start = time.perf_counter()
        kernel = triton.compile(case.src, target=TARGET, options=case.options)
        total = time.perf_counter() - start
    t = record["times"]
    times = {"frontend": t.ir_initialization / 1e6, **{stage: us / 1e6 for stage, us in t.lowering_stages},
             "store": t.store_results / 1e6, "total": total}
    return times, kernel


PTXAS_OPTIONS = {  # what Triton 3.6 passes (-lineinfo; -v and --gpu-name always), then alternatives
    "default (-lineinfo)": ["-lineinfo"],
    "no -lineinfo": [],
    "-O2": ["-lineinfo", "-O2"],
    "-O1": ["-lineinfo", "-O1"],
    "--split-compile 0": ["-lineinfo", "--split-compile", "0"],
}


def ptxas_times(ptx: str, runs: int) -> dict[str, dict]:
    """ptxas of one PTX with each option set: median seconds and the register count it reports."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(CAPABILITY).path
    samples: dict[str, list[float]] = {name: [] for name in PTXAS_OPTIONS}
    registers = {}
    with tempfile.TemporaryDirectory(prefix="attnc-ptxas-") as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx, encoding="utf-8")
        for _ in range(runs):
            for name, opts in PTXAS_OPTIONS.items():
                cmd = [ptxas, *opts, "-v", f"--gpu-name=sm_{CAPABILITY}a", str(src), "-o", f"{src}.o"]
                start = time.perf_counter()
                log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
                samples[name].append(time.perf_counter() - start)
                registers[name] = next((part.strip() for line in log.splitlines() for part in line.split(",")
                                        if "registers" in part), None)
    return {name: {"median_s": statistics.median(ts), "runs_s": ts, "registers": registers[name]}
            for name, ts in samples.items()}


# ---------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="compiles per variant (the median is reported)")
    ap.add_argument("--dims", default="64,128", help="head dims: 64 is host_overhead.py's, 128 attnc bench's")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    ap.add_argument("--template", type=Path, help="also compile `tuned` from this prefill template")
    ap.add_argument("--ptxas", action="store_true", help="also time ptxas options on the tuned PTX")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--dump", type=Path, help="write each variant's generated source and PTX here")
    args = ap.parse_args()
    dims = [int(x) for x in args.dims.split(",")]
    variants = [v for v in VARIANTS if v.name in args.variants.split(",")]
    if args.template:
        variants.append(replace(VARIANTS[0], name=f"tuned@{args.template.name}", template=args.template.resolve(),
                                exp2="tl.exp2"))
    cap = round(random.uniform(10.0, 60.0), 6)  # a constant never compiled before, as the benchmark's

    print(f"triton {triton.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; softcap {cap}, causal, bf16, B={B} H={H} S={S}, sm_{CAPABILITY}a; "
          f"seconds, median of {args.runs}", flush=True)
    with tempfile.TemporaryDirectory(prefix="attnc-phases-src-") as folder:
        cases = {(v.name, d): make_case(v, d, cap, Path(folder)) for d in dims for v in variants
                 if not v.only_dims or d in v.only_dims}
        timed_compile(next(iter(cases.values())))  # warm-up
        samples: dict = {key: [] for key in cases}
        kernels = {}
        for _ in range(args.runs):
            for key, case in cases.items():
                times, kernels[key] = timed_compile(case)
                samples[key].append(times)

    report = {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "capability": CAPABILITY, "softcap": cap, "runs": args.runs, "variants": {}}
    print(f"{'variant':26s} " + " ".join(f"{s:>8s}" for s in (*STAGES, "total")) + "  vs tuned  ptx lines    smem")
    for (name, d), runs in samples.items():
        kernel, case = kernels[(name, d)], cases[(name, d)]
        medians = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in (*STAGES, "total")}
        tuned = statistics.median(r["total"] for r in samples.get(("tuned", d), runs))
        ptx_lines = kernel.asm["ptx"].count("\n")
        report["variants"][f"{name} D={d}"] = {
            "median_s": medians, "runs": runs, "vs_tuned": medians["total"] / tuned, "launch": case.launch,
            "shared": kernel.metadata.shared, "ptx_lines": ptx_lines, "source_lines": case.source_text.count("\n")}
        print(f"{f'{name} D={d}':26s} " + " ".join(f"{medians[s]:8.3f}" for s in (*STAGES, "total"))
              + f"  {medians['total'] / tuned:8.2f}  {ptx_lines:9d}  {kernel.metadata.shared:6d}", flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}_d{d}.py").write_text(case.source_text, encoding="utf-8")
            (args.dump / f"{name}_d{d}.ptx").write_text(kernel.asm["ptx"], encoding="utf-8")
    for d in dims:
        if ("tuned", d) in cases:
            launch = cases[("tuned", d)].launch
            print(f"tuned D={d} launch: " + " ".join(f"{k}={v}" for k, v in launch.items()))
    if args.ptxas:
        report["ptxas"] = {}
        for d in dims:
            if ("tuned", d) not in kernels:
                continue
            print(f"ptxas on the tuned D={d} PTX:")
            report["ptxas"][f"D={d}"] = times = ptxas_times(kernels[("tuned", d)].asm["ptx"], args.runs)
            for name, r in times.items():
                print(f"  {name:24s} {r['median_s']:7.3f} s  {r['registers']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
