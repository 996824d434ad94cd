"""Compile the Gluon MLA decode kernel (attnc/backends/triton/gluon_decode.py.j2) of examples/specs/mla.attn (contiguous
and paged latent, bf16, D = 512, DR = 64) for sm_90 without a GPU, at key tiles of 32 and 64 and every ring depth
that fits, with and without split-KV, and print ptxas' registers and spills, the shared memory, and the SASS counts
of the score and value warpgroups' key loops (benchmarks/kernel_stats.py), beside the Triton decode kernel's loop
at its DECODE_TUNED tile. Needs Triton 3.6 (the GPU machine's):

    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_gluon_decode_sm90.py [--spec mla_paged] [--tiles 64 32] [--fp8]

--fp8 compiles bench_mla.py --fp8's spec (latent and rope part e4m3): the producer, a converter warpgroup, the two
consumer warpgroups. --fp8 --quantize-q: bench_mla.py --quantize-q's spec (`quantize q, qr to f8e4m3`): QK^T as
fp8 x fp8 wgmma (QGMMA) on the e4m3 slots, the converter converting the latent's 512 columns alone.
--wide-converter: 16 e4m3 a converter thread (PlanOptions(fp8_conflict_free_converter=False); by default 8).
--converters 1 2: each with one and two converter warpgroups (PlanOptions.fp8_converter_warpgroups; a converter loop
line each; two use the conflict-free converter); --f16-values (with --quantize-q): P V in f16
(PlanOptions.fp8_f16_values; the conflict-free converter too). --persistent compiles the persistent schedule
(PlanOptions(mla_persistent=True): a program per SM walking its share's segments; no split form; bf16 latent only).

Exit status 1 if a kernel fails to compile, ptxas warns (serialized wgmma), or a kernel spills."""
import argparse
import itertools
import os
import re
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
from attnc.backends.triton.gluon_decode import generate_gluon_decode
from attnc.backends.triton.signature import argument_types, gluon_decode_signature, spec_args
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.latent_decode import choose_layout, gluon_decode_kernel
from attnc.passes.tiling import LaunchTiles

sys.path.insert(0, str(Path(__file__).parent))
from compile_gluon_sm90 import ptxas_figures  # noqa: E402
from kernel_stats import SASS, count, full_sass, mma_loops  # noqa: E402


def fp8_spec(name: str, quantize_q: bool = False):
    """bench_mla.py --fp8's spec (the latent and its rope part e4m3, one dequant scale) for a contiguous or paged
    latent; `quantize_q`: with its queries quantised (--quantize-q)."""
    import bench_mla

    shapes = replace(bench_mla.fp8_shapes(bench_mla.GPU), quantize_q=quantize_q)
    return bench_mla.mla_spec(shapes, paged=name == "mla_paged")


def plan_with(spec, block_n: int, stages: int | None, converters: int | None = None, f16_values: bool = False,
              conflict_free: bool | None = None, persistent: bool = False, sum_every: int | None = None):
    options = PlanOptions(gluon=True, warpgroup_block_n=block_n, fp8_converter_warpgroups=converters,
                          fp8_f16_values=f16_values, fp8_conflict_free_converter=conflict_free,
                          mla_persistent=persistent or None, fp8_float32_sum_every=sum_every)
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 512, 512, options)
    staged = plan.decode.warpgroups
    assert staged.path == "gluon", staged.reason
    layout = replace(choose_layout(plan, stages), persistent=staged.layout.persistent)
    return replace(plan, decode=replace(plan.decode, warpgroups=replace(staged, layout=layout)))


def compile_decode(plan, work: Path, split: bool):
    w = plan.decode.warpgroups.layout
    path = work / f"{plan.spec.name}_{w.block_n}_{w.stages}_{w.fp8_stages}_{w.converter_warpgroups}v{w.converter_vector}{'h' if w.f16_values else ''}.py"
    path.write_text(generate_gluon_decode(plan))
    fn = launch.import_source(path, f"gluon_decode_{path.stem}").attn_decode_gluon
    types = argument_types(plan)
    types["sched_ptr"] = "*i32"
    signature = {n: ("i32" if types[n] == "i64" else types[n])
                 for n in gluon_decode_signature(spec_args(plan, per_sequence=True), w.persistent).names}
    constexprs = {"BLOCK_MQ": 1, "PACK": 64, "SPLIT": split}
    signature.update({n: "constexpr" for n in constexprs})
    options = gluon_decode_kernel(plan, LaunchTiles(None, constexprs["PACK"], constexprs["BLOCK_MQ"]), split).keywords
    return triton.compile(GluonASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={k: options[k] for k in ("num_warps", "maxnreg")})


def loop_counts(sass: str) -> list[str]:
    """The key loops of the two warpgroups, each the shortest loop holding an MMA (the partitions' loops nest in
    the SASS's branch ranges): the score warpgroup's has the EX2s, the value warpgroup's none. Instructions, the
    SASS counts and the wgmma shapes (multiply-adds per tile = sum of M x N x K over them)."""
    out = []
    for role, wants_ex2 in (("score", True), ("value", False)):
        bodies = [body for *_, body in mma_loops(sass)
                  if any(re.search(SASS["EX2"], x) for x in body) == wants_ex2]
        if not bodies:
            out.append(f"{role} loop: none")
            continue
        body = "\n".join(min(bodies, key=len))
        shapes = re.findall(r"[HQ]GMMA\.(\d+)x(\d+)x(\d+)", body)
        macs = sum(int(m) * int(n) * int(k) for m, n, k in shapes)
        out.append(f"{role} loop: instrs={len(min(bodies, key=len))} {count(SASS, body)} "
                   f"shapes={sorted(set('x'.join(s) for s in shapes))} MACs={macs}")
    # an FP8 latent's converter warpgroups, a loop each: e4m3 -> f16 (-> f32 -> bf16) pairs
    for _, _, _, body in mma_loops(sass, "F2FP"):
        if not any("MMA" in x or "UTMA" in x for x in body):  # not the epilogue's out store
            out.append(f"converter loop: instrs={len(body)} {count(SASS, chr(10).join(body))} "
                       f"F2FP={sum('F2FP' in x for x in body)} HADD2.F32={sum('HADD2.F32' in x for x in body)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", nargs="*", default=["mla_decode", "mla_paged"])
    parser.add_argument("--tiles", type=int, nargs="*", help="key tiles (default 64 and 32; 32 with --fp8)")
    parser.add_argument("--dump", help="folder for the generated sources, PTX and SASS")
    parser.add_argument("--fp8", action="store_true", help="the latent e4m3 (bench_mla.py --fp8's spec, BN = 32)")
    parser.add_argument("--persistent", action="store_true", help="the persistent schedule (PlanOptions(mla_persistent))")
    parser.add_argument("--quantize-q", action="store_true", help="with --fp8: the queries quantised to e4m3 too")
    parser.add_argument("--converters", type=int, nargs="*", default=[1],
                        help="with --fp8: converter warpgroups (PlanOptions.fp8_converter_warpgroups), each compiled")
    parser.add_argument("--f16-values", action="store_true",
                        help="with --fp8 --quantize-q: P V in f16 (PlanOptions.fp8_f16_values)")
    parser.add_argument("--wide-converter", action="store_true",
                        help="with --fp8: 16 e4m3 a converter thread (PlanOptions(fp8_conflict_free_converter=False))")
    parser.add_argument("--float32-sum-every", type=int,
                        help="with --fp8 --quantize-q: QK^T's fp8 products added in float32 every N, 0 never "
                             "(PlanOptions.fp8_float32_sum_every; by default 32)")
    args = parser.parse_args()
    ok = True
    specs = {s.name: s for s in attnc.parse_file("examples/specs/mla.attn")}
    if args.fp8:
        specs = {name: fp8_spec(name, args.quantize_q) for name in specs}
    tiles = args.tiles or ([32] if args.fp8 else [64, 32])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dump or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, block_n, converters in itertools.product(args.spec, tiles, args.converters if args.fp8 else [1]):
            w = plan_with(specs[name], block_n, None, persistent=args.persistent).decode.warpgroups.layout
            fit = w.fp8_stages or w.stages
            for stages in range(2, fit + 1):
                plan = plan_with(specs[name], block_n, stages, converters, args.f16_values, False if args.wide_converter else None,
                                 args.persistent, args.float32_sum_every)
                w = plan.decode.warpgroups.layout
                if w.fp8_stages:
                    name_label = (f"{name} fp8{'+q8' if args.quantize_q else ''}{'+f16' if w.f16_values else ''} "
                                  f"conv={converters}x{w.converter_vector}")
                else:
                    name_label = name
                for split in (False,) if w.persistent else (False, True):
                    label = f"{name_label:14s} BN={block_n} stages={stages} split={int(split)}"
                    try:
                        compiled = compile_decode(plan, work, split)
                    except Exception as e:  # report every kernel, then fail
                        ok = False
                        print(f"FAIL {label}  {type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}",
                              flush=True)
                        continue
                    ptx = work / f"{name}_{block_n}_{stages}_{converters}v{w.converter_vector}{'h' if w.f16_values else ''}_{int(split)}.ptx"
                    r = ptxas_figures(compiled, ptx)
                    sass = full_sass(compiled.asm["cubin"])
                    if args.dump:
                        ptx.with_suffix(".sass").write_text(sass)
                    ok &= r["spills"] == 0 and not r["warnings"]
                    print(f"{'ok  ' if r['spills'] == 0 else 'SPILL'} {label}  regs={r['regs']} "
                          f"setmaxnreg={r['setmaxnreg']} spills={r['spills']} B smem={r['shared']} B (plan "
                          f"{plan.decode.warpgroups.layout.smem})", flush=True)
                    for line in r["warnings"]:
                        print(f"     {line}", flush=True)
                    for line in loop_counts(sass):
                        print(f"     {line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
