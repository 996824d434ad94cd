"""Compile the Gluon dK/dV kernel (attnc/backends/triton/gluon_backward.py.j2) of a few example specs for sm_90
without a GPU and print ptxas' registers, spills, the shared memory and, with --stats, kernel_stats' instruction
counts per loop (compare with the template's attn_bwd_dkdv: STATS=1 benchmarks/compile_backward_sm90.py). Needs
Triton 3.6 (the GPU machine's):

    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_gluon_backward_sm90.py [--dims 64 128] [--stats]
        [--ds-under-dkdv] [--dq-in-dkdv] [--dump DIR] [SPEC...]

Exit status 1 if a kernel fails to compile, spills, ptxas reports serialized wgmma (C7512/C7515) or a spec that should have the
Gluon kernel falls back to the template."""
import argparse
import glob
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

import attnc
from attnc.backends.triton import launch
from attnc.backends.triton.gluon_backward import generate_gluon_dkdv
from attnc.backends.triton.signature import backward_argument_types, gluon_dkdv_signature, spec_args
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.grad import plan_backward
from attnc.passes.warpgroups import dkdv_shared_bytes, max_registers
import kernel_stats
from compile_gluon_sm90 import ptxas_figures

SPECS = ("dense", "causal_lm", "gqa_causal", "sliding_window", "grok_softcap", "sigmoid_causal", "prefix_lm", "dilated_window")


def compile_dkdv(plan, work: Path, gqa: bool):
    """triton.compile of the plan's attn_bwd_dkdv_gluon for sm_90 (its source written under `work`); `gqa`: dK and dV
    are float32 shares (the launcher sums a group's)."""
    layout = plan_backward(plan).gluon_dkdv
    path = work / f"{plan.spec.name}_{plan.head_dim}.py"
    path.write_text(generate_gluon_dkdv(plan))
    fn = launch.import_source(path, f"gluon_dkdv_{path.stem}").attn_bwd_dkdv_gluon
    types = backward_argument_types(plan, dq_kernel=not layout.dq_in_dkdv)
    if gqa:
        types.update(dk_ptr="*fp32", dv_ptr="*fp32")
    # what the JIT sees at launch for sizes and strides below 2^31
    signature = {n: ("i32" if types[n] == "i64" else types[n])
                 for n in gluon_dkdv_signature(spec_args(plan), layout.dq_in_dkdv).names}
    return triton.compile(GluonASTSource(fn, signature, {}), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": layout.consumer_warps, "maxnreg": max_registers(layout)})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=SPECS)
    parser.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--stats", action="store_true", help="print kernel_stats' instruction counts per kernel")
    parser.add_argument("--block-m", type=int, help="query rows per ring slot (PlanOptions.gluon_backward_block_m)")
    parser.add_argument("--ds-under-dkdv", action="store_true",
                        help="P^T and dS^T of the next tile under dV and dK (PlanOptions.gluon_backward_ds_under_dkdv)")
    parser.add_argument("--dq-in-dkdv", action="store_true",
                        help="dQ by TMA reduce-add in the kernel (PlanOptions.gluon_backward_dq_in_dkdv)")
    parser.add_argument("--dump", help="folder for the generated sources, PTX and SASS")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dump or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.specs:
            spec = next(s for p in glob.glob("examples/specs/*.attn") for s in attnc.parse_file(p) if s.name == name)
            spec = replace(spec, returns_lse=True)
            for d in [spec.dim_values["D"]] if "D" in spec.dim_values else args.dims:
                dv = spec.dim_values.get("DV", d)
                plan = plan_kernel(spec, Target("triton", "cuda", 90), d, dv,
                                  PlanOptions(gluon_backward=True, gluon_backward_block_m=args.block_m,
                                              gluon_backward_ds_under_dkdv=args.ds_under_dkdv or None,
                                              gluon_backward_dq_in_dkdv=args.dq_in_dkdv or None))
                bp = plan_backward(plan)
                label = f"{name:18s} {plan.dtype:4s} D={d:3d} DV={dv:3d}"
                if bp.gluon_dkdv is None:
                    print(f"skip {label}  {bp.gluon_reason}", flush=True)
                    continue
                try:
                    compiled = compile_dkdv(plan, work, spec.is_gqa_shape)
                except Exception as e:  # report every kernel, then fail
                    ok = False
                    print(f"FAIL {label}  {type(e).__name__}: {str(e).strip()[-1500:]}", flush=True)
                    continue
                if args.stats:
                    kernel_stats.report(label, compiled)
                ptx = work / f"{name}_{d}.ptx"
                r = ptxas_figures(compiled, ptx)
                if args.dump:
                    ptx.with_suffix(".sass").write_text(kernel_stats.full_sass(compiled.asm["cubin"]))
                ok &= r["spills"] == 0 and not r["warnings"]
                print(f"{'ok  ' if r['spills'] == 0 else 'SPILL'} {label}  BM={bp.gluon_dkdv.block_m} "
                      f"stages={bp.gluon_dkdv.stages} "
                      f"regs={r['regs']} setmaxnreg={r['setmaxnreg']} spills={r['spills']} B stack={r['stack']} B "
                      f"smem={r['shared']} B (planned {dkdv_shared_bytes(plan, bp.gluon_dkdv)}) "
                      f"loop LDL+STL={r['key_loop_local']}", flush=True)
                for line in r["warnings"]:
                    print(f"     {line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
