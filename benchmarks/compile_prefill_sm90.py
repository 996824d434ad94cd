"""Compile the Triton template's prefill kernel (attn_fwd, attnc/backends/triton/kernel.py.j2) of bench_mla.py's
prefill specs for sm_90 without a GPU, and print ptxas' registers and spills, the shared memory and the instruction
counts per loop (benchmarks/kernel_stats.py): MLA's non-absorbed D = 192 / DV = 128 with D in chunks (128 + 64, one
dot each: passes/tiling.py head_dim_chunks) and padded to 256 (PlanOptions(chunk_head_dim=False), what main does),
and dense D = 128 for scale (--dims: other D/DV pairs); K through tensor descriptors (TMA) and through pointers. PlanOptions(gluon=False): the
Gluon kernel (which takes these launches from M = 4096 by default) pads D either way. Needs Triton 3.6 (the GPU
machine's), e.g.

    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_prefill_sm90.py [--tile 128,128,8,2] [--tma 1] [--dims 96/96]
    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_prefill_sm90.py --gluon [--keys 64 128]

--tile BM,BN,warps,stages overrides the plan's prefill tile (stages: as the plan counts them, fitted to shared memory).
--gluon builds the Gluon warpgroup kernel (attn_fwd_gluon, PlanOptions(gluon=True)) instead, D in chunks and padded,
at the key tiles of --keys (PlanOptions.warpgroup_block_n; default the plan's). Exit status 1 if a kernel fails to
compile."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
import torch

from attnc.backends.triton import launch
from attnc.dsl.signature import bind
from attnc.errors import CompileError
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.kernels import prefill_kernel
from attnc.passes.tiling import head_dim_chunks

sys.path.insert(0, str(Path(__file__).parent))
import bench_mla  # noqa: E402  (the benchmark's specs, so both compile the same kernel)
import compile_gluon_sm90  # noqa: E402
import kernel_stats  # noqa: E402


def gluon_kernels(label: str, d: int, dv: int, chunk, keys: list[int], work: Path) -> bool:
    """Compile and report attn_fwd_gluon of the variant at each key tile; False if one fails to compile."""
    ok = True
    spec = bench_mla.prefill_spec(bench_mla.PrefillWorkload(1, 128, 4096, d, dv), bench_mla.GPU)
    for block_n in keys or [None]:
        options = PlanOptions(gluon=True, chunk_head_dim=chunk, warpgroup_block_n=block_n)
        name = f"gluon {label} D={d} DV={dv} BN={block_n or 'plan'}"
        try:
            plan = plan_kernel(spec, Target("triton", "cuda", 90), d, dv, options)
        except CompileError as e:  # a key tile whose ring does not fit
            print(f"skip {name}: {e}", flush=True)
            continue
        w = plan.warpgroups.layout
        name = (f"gluon {label} D={d} DV={dv} chunks={'+'.join(map(str, w.d_chunks))} BN={w.block_n} "
                f"stages={w.stages} overlap={w.overlap}")
        try:
            kernel_stats.report(name, compile_gluon_sm90.compile_gluon(plan, work))
        except Exception as e:  # report every kernel, then fail
            ok = False
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
    return ok



def workload_kernels(pattern: str, tile_text: str | None, tmas: list[int]) -> int:
    """Compile and report the template kernel of `attnc bench`'s first workload whose name matches `pattern`."""
    import re

    import attnc
    from attnc.bench import prefill_workloads

    w = next(w for w in prefill_workloads() if re.search(pattern, w.name))
    spec = attnc.parse(w.spec)[0]
    tile = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), map(int, tile_text.split(",")))) \
        if tile_text else {}
    plan = plan_kernel(spec, Target("triton", "cuda", 90), w.D, w.D, PlanOptions(gluon=False, **tile))
    launcher = launch.TritonLauncher(plan, launch.load_module(plan))
    q = torch.empty(w.B, w.H, w.S, w.D, dtype=torch.bfloat16, device="meta")
    k, v = (torch.empty(w.B, w.HKV, w.S, w.D, dtype=torch.bfloat16, device="meta") for _ in range(2))
    extra = {name: t.to("meta") for name, t in (w.inputs(w.B, w.H, w.S, "cpu") if w.inputs else {}).items()}
    bound = bind(spec, q, k, v, {**extra, **w.params})
    tiles = launcher.tiles(w.S, 1)
    out = torch.empty(w.B, w.H, w.S, w.D, dtype=torch.bfloat16, device="meta")
    fn_args = launcher.kernel_arguments(bound, out, None, tiles)
    for tma in tmas:
        kernel = prefill_kernel(plan, tiles, bool(tma))
        c = tiles.config
        kernel_stats.report(f"{w.name} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} tma={tma}",
                            kernel_stats.compile_sm90(launcher.fwd, fn_args, dict(kernel.keywords)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", help="BM,BN,warps,stages: the prefill tile instead of the plan's")
    ap.add_argument("--tma", type=int, choices=(0, 1), nargs="*", default=[1, 0], help="the TMA constexprs to build")
    ap.add_argument("--seq", type=int, default=4096, help="M = N (the launch's tile regime)")
    ap.add_argument("--dims", nargs="*", default=["192/128", "128/128"],
                    help="D/DV pairs; a D in chunks is built chunked and padded")
    ap.add_argument("--gluon", action="store_true", help="the Gluon warpgroup kernel instead of the template")
    ap.add_argument("--keys", type=int, nargs="*", default=[], help="--gluon: key tiles (warpgroup_block_n)")
    ap.add_argument("--workload", help="regex: the spec of `attnc bench`'s first matching workload (e.g. softcap, "
                                       "alibi) instead of bench_mla's prefill spec; --dims then defaults to 128/128")
    args = ap.parse_args()
    if args.workload:
        return workload_kernels(args.workload, args.tile, args.tma)
    pairs = [tuple(map(int, p.split("/"))) for p in args.dims]
    variants = [(label, d, dv, chunk) for d, dv in pairs
                for label, chunk in ((("chunked", None), ("padded", False)) if len(head_dim_chunks(d)) > 1
                                     else (("one chunk", None),))]
    tile = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), map(int, args.tile.split(",")))) \
        if args.tile else {}
    ok = True
    if args.gluon:
        with tempfile.TemporaryDirectory() as tmp:
            for label, d, dv, chunk in variants:
                ok &= gluon_kernels(label, d, dv, chunk, args.keys, Path(tmp))
        return 0 if ok else 1
    for label, d, dv, chunk in variants:
        w = bench_mla.PrefillWorkload(1, 128, args.seq, d, dv)
        spec = bench_mla.prefill_spec(w, bench_mla.GPU)
        plan = plan_kernel(spec, Target("triton", "cuda", 90), d, dv,
                           PlanOptions(gluon=False, chunk_head_dim=chunk, **tile))
        launcher = launch.TritonLauncher(plan, launch.load_module(plan))
        q, k = (torch.empty(w.B, w.H, w.S, d, dtype=torch.bfloat16, device="meta") for _ in range(2))
        v = torch.empty(w.B, w.H, w.S, dv, dtype=torch.bfloat16, device="meta")
        bound = bind(spec, q, k, v, {})
        tiles = launcher.tiles(w.S, 1)
        out = torch.empty(w.B, w.H, w.S, dv, dtype=torch.bfloat16, device="meta")
        fn_args = launcher.kernel_arguments(bound, out, None, tiles)
        for tma in args.tma:
            kernel = prefill_kernel(plan, tiles, bool(tma))
            c = tiles.config
            name = (f"{label} D={d} DV={dv} chunks={'+'.join(map(str, plan.tiling.d_chunks))} "
                    f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} tma={tma}")
            try:
                kernel_stats.report(name, kernel_stats.compile_sm90(launcher.fwd, fn_args, dict(kernel.keywords)))
            except Exception as e:  # report every kernel, then fail
                ok = False
                print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
