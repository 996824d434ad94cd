"""Compile the Gluon warpgroup prefill kernel (attnc/backends/triton/gluon.py.j2) of every dense example spec for
sm_90 without a GPU, for D = 64 / 128 / 256 (and the spec's own DV where it binds one) in bf16 and f16, and print
ptxas' registers, spills and the shared memory per kernel. Needs Triton 3.6 (the GPU machine's), e.g.

    python3 -m venv --system-site-packages /tmp/venv36 && /tmp/venv36/bin/pip install triton==3.6.0
    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_gluon_sm90.py [--spec NAME] [--dims 128] [--persistent]
        [--weights-under-pv] [--aot] [--times]

`--times` prints each kernel's cold compile by stage (fresh cache folder; Triton's compilation listener): the
front end (Gluon's Python -> TTGIR), ttgir, llir (LLVM O3), ptx and cubin (ptxas).

Exit status 1 if a kernel fails to compile, ptxas warns or reports serialized wgmma (C7512), a kernel spills more than
--max-spill bytes (default 128) or its steady-state key loop touches local memory (LDL/STL). dilated_window fails it at
D >= 128 (its per-element int64 modulo: 624-728 B and key-loop LDL/STL with Triton 3.6, session 19); the default runs
that spec on the template (masks evaluated per element), so only PlanOptions(gluon=True) reaches this kernel."""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.tools.disasm import get_sass

import attnc
from attnc.backends.triton import launch
from attnc.backends.triton.gluon import generate_gluon
from attnc.backends.triton.signature import argument_types, gluon_signature, spec_args
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.warpgroups import SCHEDULES, max_registers
import kernel_stats

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def dense_specs(only: str | None):
    for path in sorted(glob.glob("examples/specs/*.attn")):
        for spec in attnc.parse_file(path):
            if spec.q_storage is None and spec.kv_storage is None and (only is None or spec.name == only):
                yield spec


def with_dtype(spec, dtype: str):
    return replace(spec, q=replace(spec.q, dtype=dtype), k=replace(spec.k, dtype=dtype),
                   v=replace(spec.v, dtype=dtype))


def stem(plan) -> str:
    w = plan.warpgroups.layout
    return f"{plan.spec.name}_{plan.dtype}_{plan.head_dim}_{plan.value_dim}_{len(w.d_chunks)}_{w.block_n}"


def compile_gluon(plan, work: Path, aot: bool = False, times: dict | None = None):
    """triton.compile of the plan's attn_fwd_gluon for sm_90 (its source written under `work`), with the JIT's
    argument types or (`aot`) the AOT build's (`attnc compile`: sizes and strides i64). With `times`, cold (a fresh
    cache folder), its seconds per stage and in total go there."""
    w = plan.warpgroups.layout
    path = work / f"{stem(plan)}.py"
    path.write_text(generate_gluon(plan))
    module = launch.import_source(path, f"gluon_{path.stem}")
    fn = module.attn_fwd_gluon
    types = argument_types(plan)
    # What the JIT sees at launch for sizes and strides below 2^31: i32 (do_not_specialize keeps sizes unspecialized);
    # the AOT build compiles for any sizes: i64
    names = gluon_signature(spec_args(plan)).names
    signature = {n: ("i32" if types[n] == "i64" and not aot else types[n]) for n in names}
    source = GluonASTSource(fn, signature, {})
    options = {"num_warps": w.consumer_warps, "maxnreg": max_registers(w)}
    if times is None:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    def listener(*, times: object, cache_hit: bool, **_):
        stages["frontend"] = times.ir_initialization / 1e6
        stages.update((stage, us / 1e6) for stage, us in times.lowering_stages)

    stages = times
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope(), triton.knobs.compilation.scope():
        triton.knobs.cache.dir = cache
        triton.knobs.compilation.listener = listener
        start = time.perf_counter()
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        stages["total"] = time.perf_counter() - start
    return compiled


def compile_one(plan, work: Path, stats: bool = False, aot: bool = False, times: bool = False) -> dict:
    seconds = {} if times else None
    compiled = compile_gluon(plan, work, aot, seconds)
    if stats:  # kernel_stats' instruction counts, per loop that holds an MMA too
        kernel_stats.report(stem(plan), compiled)
    return {**ptxas_figures(compiled, work / f"{stem(plan)}.ptx"), "seconds": seconds}


def ptxas_figures(compiled, ptx: Path) -> dict:
    """ptxas' registers, spill bytes, stack and warnings for a compiled kernel (its PTX written to `ptx`), its
    shared bytes and the setmaxnreg budgets of its partitions."""
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    stack = int(re.search(r"(\d+) bytes stack frame", report).group(1))
    # serialized wgmma comes as an info line (C7512: "Potential Performance Loss: wgmma.mma_async instructions are
    # serialized due to insufficient register resources"), not a warning
    warnings = [line for line in report.splitlines() if "warning" in line.lower() or "Performance Loss" in line]
    maxnreg = sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", compiled.asm["ptx"])})
    # local memory (spill) traffic inside the steady-state key loop: spills elsewhere run once per program or tile
    key_loop = re.search(r"LDL=(\d+) STL=(\d+)", kernel_stats.key_tile_loop(get_sass(compiled.asm["cubin"])))
    return dict(regs=regs, spills=spills, stack=stack, shared=compiled.metadata.shared, setmaxnreg=maxnreg,
                warnings=warnings, key_loop_local=sum(map(int, key_loop.groups())) if key_loop else None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", help="only this example spec")
    parser.add_argument("--dims", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "f16"])
    parser.add_argument("--schedule", choices=SCHEDULES, help="force the consumers' schedule")
    parser.add_argument("--persistent", action="store_true", help="persistent programs (PlanOptions(gluon_persistent))")
    parser.add_argument("--weights-under-pv", action="store_true",
                        help="P V reads P from shared memory (PlanOptions(gluon_weights_under_pv))")
    parser.add_argument("--aot", action="store_true", help="the AOT build's argument types (i64 sizes, strides)")
    parser.add_argument("--stats", action="store_true", help="print kernel_stats' instruction counts per kernel")
    parser.add_argument("--times", action="store_true", help="print each kernel's cold compile by stage")
    parser.add_argument("--max-spill", type=int, default=128, help="spill bytes (stores + loads) a kernel may have")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for spec in dense_specs(args.spec):
            bound = spec.dim_values.get("D")
            for dtype in args.dtypes:
                for d in ([bound] if bound else args.dims):
                    dv = spec.dim_values.get("DV", d)
                    plan = plan_kernel(with_dtype(spec, dtype), Target("triton", "cuda", 90), d, dv,
                                       PlanOptions(gluon=True, warpgroup_schedule=args.schedule,
                                                   gluon_persistent=args.persistent or None,
                                                   gluon_weights_under_pv=args.weights_under_pv or None))
                    w = plan.warpgroups
                    label = f"{spec.name:18s} {dtype:4s} D={d:3d} DV={dv:3d}"
                    if w.path != "gluon":
                        print(f"skip {label}  {w.reason}", flush=True)
                        continue
                    try:
                        r = compile_one(plan, work, args.stats, args.aot, args.times)
                    except Exception as e:  # report every kernel, then fail
                        ok = False
                        print(f"FAIL {label}  {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
                        continue
                    ok &= r["spills"] <= args.max_spill and not r["warnings"] and not r["key_loop_local"]
                    print(f"{'ok  ' if r['spills'] == 0 else 'SPILL'} {label}  {w.layout.schedule} "
                          f"BN={w.layout.block_n} stages={w.layout.stages} overlap={w.layout.overlap} "
                          f"under-pv={w.layout.weights_under_pv}  regs={r['regs']} "
                          f"setmaxnreg={r['setmaxnreg']} spills={r['spills']} B stack={r['stack']} B "
                          f"smem={r['shared']} B key-loop LDL+STL={r['key_loop_local']}", flush=True)
                    if r["seconds"]:
                        print("     cold compile " + " ".join(f"{k} {v:.2f}s" for k, v in r["seconds"].items()),
                              flush=True)
                    for line in r["warnings"]:
                        print(f"     {line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
