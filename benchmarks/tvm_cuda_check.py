"""The TVM CUDA kernels, built ahead of time here and checked on the GPU machine with only the TVM runtime.

Here (TVM + nvcc, no GPU needed):
    python -m attnc.backends.tvm.runtime_pack .tvmrt --python 3.12      # trimmed runtime, ~11 MB
    python benchmarks/tvm_cuda_check.py build --aot .tvm-aot            # every dense example, bf16/f16/f32
    python benchmarks/tvm_cuda_check.py ptxas                           # registers / spills of the bench kernels
On the GPU machine (carry .tvmrt and .tvm-aot):
    PYTHONPATH=.tvmrt:. python benchmarks/tvm_cuda_check.py run --aot .tvm-aot --json $OUT/tvm_cuda.json

`run` loads every artifact, runs it on fresh random inputs (outputs poisoned with NaN) against attnc.reference
(float64) at two shapes, then times dense causal bf16 D=128 B=4 H=16 S=4096 against attnc's Triton kernel (and
torch SDPA) in the same process, once per tensor-core schedule in BENCH_SCHEDULES. One failure never stops the
rest; it prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BENCH_SPEC = """
attention bench_causal_d128 {
    dims D = 128
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    mask causal
    return softmax(score) @ v
}
"""
BENCH_SHAPE = dict(B=4, H=16, S=4096, D=128)
# The timed tensor-core schedules (cuda.CudaSchedule): (warps, rows per warp, block_n, Q in registers, scale
# folded into exp2). The first is session 2's kernel; rows per warp 32 is FA2's split (each K / V fragment feeds
# two row blocks), which needs Q in shared memory for its registers.
BENCH_SCHEDULES = (
    (4, 16, 64, True, False), (4, 16, 64, True, True), (8, 16, 64, True, True), (4, 16, 64, False, True),
    (4, 32, 64, False, True), (4, 32, 64, False, False), (4, 32, 32, False, True), (4, 32, 32, False, False),
    (8, 32, 64, False, True), (8, 32, 32, False, True),
)
# bf16 examples up to D=128 also built at this many rows per warp (artifact suffix -r16): the default is 32
# (cuda.DEFAULT_ROW_BLOCKS), so session 2's split stays checked too
EXAMPLE_ROWS_PER_WARP = 16
SHAPES = ((37, 75), (300, 300))  # (M, N): tails everywhere; then several tiles with a causal diagonal


def example_variants():
    """(artifact name, spec) for every dense example in bf16 and f16 (the tensor-core kernel) and f32 (the plain
    GPU kernel, gpu.py, which Metal / ROCm / OpenCL source comes from), the benchmark's spec and the
    very-negative-logits regression spec."""
    import attnc
    from test_triton_kernels import example_specs, with_dtype

    for spec in example_specs():
        if spec.q_storage is not None or spec.kv_storage is not None:
            continue  # ragged / paged: not lowered by the TVM backend
        for dtype in ("bf16", "f16", "f32"):
            yield f"{spec.name}-{dtype}", with_dtype(spec, dtype)
    from test_tvm_kernels import VERY_NEGATIVE  # logits ~ -1440 after key tiles a row keeps nothing of

    yield "very_negative-bf16", with_dtype(attnc.parse(VERY_NEGATIVE)[0], "bf16")


def bench_name(warps: int, rows: int, block_n: int, q_in_registers: bool, fold_scale: bool) -> str:
    """The artifact folder of a BENCH_SCHEDULES entry, e.g. bench_causal_d128-bf16-w4r32n64-qsmem-fma."""
    return (f"bench_causal_d128-bf16-w{warps}r{rows}n{block_n}-q{'reg' if q_in_registers else 'smem'}-"
            f"{'fma' if fold_scale else 'mul'}")


def bench_schedule(warps: int, rows: int, block_n: int, q_in_registers: bool, fold_scale: bool):
    from attnc.backends.tvm.cuda import CudaSchedule

    return CudaSchedule(warps=warps, block_n=block_n, row_blocks=rows // 16, q_in_registers=q_in_registers,
                        fold_scale=fold_scale)


def build_jobs():
    """(artifact name, spec, D, DV, PlanOptions, CudaSchedule or None) of every artifact `build` makes."""
    import attnc
    from attnc.passes import PlanOptions
    from test_triton_kernels import example_sizes

    for name, spec in example_variants():
        sizes = example_sizes(spec)
        d, dv = sizes["D"], sizes["DV"]
        yield name, spec, d, dv, PlanOptions(), None
        if spec.q.dtype == "bf16" and max(d, dv) <= 128:  # wider heads take 16 rows per warp already
            yield (f"{name}-r{EXAMPLE_ROWS_PER_WARP}", spec, d, dv,
                   PlanOptions(num_warps=4, block_m=4 * EXAMPLE_ROWS_PER_WARP), None)
    spec = attnc.parse(BENCH_SPEC)[0]
    for entry in BENCH_SCHEDULES:
        yield bench_name(*entry), spec, 128, 128, PlanOptions(), bench_schedule(*entry)


def build(aot: Path, only: str | None = None) -> int:
    from attnc.backends.tvm import aot as tvm_aot

    failed = 0
    for name, spec, d, dv, options, schedule in build_jobs():
        if only and not re.search(only, name):
            continue
        start = time.perf_counter()
        try:
            tvm_aot.build(spec, aot / name, "cuda", "sm_90a", d, dv, options, schedule)
            print(f"built {name:44s} D={d:3d} DV={dv:3d} {time.perf_counter() - start:5.1f} s", flush=True)
        except Exception as err:  # keep building the rest
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
    return 1 if failed else 0


def ptxas_report() -> int:
    """ptxas's registers, spills and stack per BENCH_SCHEDULES kernel (nvcc with the backend's options; no GPU)."""
    import subprocess
    import tempfile

    import attnc
    from attnc.backends.tvm.backend import compile_module, cuda_target, nvcc_options
    from attnc.backends.tvm.cuda import build_cuda_primfunc
    from attnc.passes import Target, plan_kernel

    plan = plan_kernel(attnc.parse(BENCH_SPEC)[0], Target("tvm", "cuda", 90), 128, 128)
    with tempfile.TemporaryDirectory() as tmp:
        for entry in BENCH_SCHEDULES:
            sched = bench_schedule(*entry)
            module = compile_module({"attn": build_cuda_primfunc(plan, sched)}, plan, cuda_target(90), str(sched))
            source = Path(tmp) / "k.cu"
            source.write_text(module.mod.imports[0].inspect_source())
            done = subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", *nvcc_options(plan), "-Xptxas", "-v", "-o",
                                   str(Path(tmp) / "k.cubin"), str(source)], capture_output=True, text=True)
            info = " ".join(done.stderr.split())
            registers = re.search(r"Used (\d+) registers", info)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            print(f"{bench_name(*entry):48s} " + (f"{registers[1]} registers, spill stores {spills[1]} B, loads "
                                                   f"{spills[2]} B" if registers and spills else info[-300:]))
    return 0


def check_one(kernel, shape) -> dict:
    import torch

    import attnc
    from test_triton_kernels import TOL, TORCH, example_kwargs, example_sizes

    spec = kernel.spec
    sizes = example_sizes(spec, *shape)
    sizes.update(D=kernel.manifest["head_dim"], DV=kernel.manifest["value_dim"])
    q, k, v = (torch.randn([sizes[n] for n in d.shape], device="cuda").to(TORCH[d.dtype])
               for d in (spec.q, spec.k, spec.v))
    kwargs = example_kwargs(spec, sizes, "cuda")
    got = kernel(q, k, v, **kwargs)
    torch.cuda.synchronize()
    want = attnc.reference(spec, q, k, v, **kwargs)
    if spec.returns_lse:
        (got, got_lse), (want, want_lse) = got, want
        finite = want_lse > -math.inf
        lse_ok = bool(torch.equal(got_lse == -math.inf, want_lse == -math.inf)) and not got_lse.isnan().any()
        lse_err = (got_lse[finite].double() - want_lse[finite]).abs().max().item() if finite.any() else 0.0
    else:
        lse_ok, lse_err = True, 0.0
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    tol = TOL[spec.q.dtype]
    ok = (not got.isnan().any()) and err <= tol * scale and lse_ok and lse_err <= tol * 4
    return {"M": shape[0], "N": shape[1], "max_abs_err": err, "lse_err": lse_err, "tol": tol * scale, "ok": bool(ok)}


def bench(aot: Path, reps: int) -> dict:
    """Every BENCH_SCHEDULES kernel, attnc's Triton kernel and SDPA on one input, each checked against SDPA and
    then timed in interleaved rounds (a slow phase of the GPU hits every kernel alike)."""
    import torch

    import attnc
    from attnc.backends.tvm import aot as tvm_aot

    b, h, s, d = (BENCH_SHAPE[x] for x in ("B", "H", "S", "D"))
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    result = {"shape": BENCH_SHAPE, "dtype": "bf16", "causal": True}
    runs = {}
    for entry in BENCH_SCHEDULES:
        label = "tvm " + bench_name(*entry).split("-bf16-")[1]
        try:
            kernel, = tvm_aot.load(aot / bench_name(*entry)).values()
            runs[label] = lambda kernel=kernel: kernel(q, k, v)
        except Exception as e:
            result[label] = {"error": f"{type(e).__name__}: {e}"}
    triton_kernel = attnc.compile(attnc.parse(BENCH_SPEC)[0], backend="triton")
    runs.update(triton=lambda: triton_kernel(q, k, v), sdpa=lambda: sdpa(q, k, v, is_causal=True))
    want = sdpa(q, k, v, is_causal=True).float()
    flops = 4 * b * h * s * s * d * 0.5
    for name, fn in list(runs.items()):
        try:
            result[name] = {"max_abs_err_vs_sdpa": (fn().float() - want).abs().max().item()}
        except Exception as e:  # one side failing still reports the others
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            del runs[name]
    for name, ms in _time_interleaved(runs, reps).items():
        result[name].update(ms=ms, tflops=flops / ms / 1e9)
    correct = [n for n in runs if n.startswith("tvm") and result[n]["max_abs_err_vs_sdpa"] < 0.05]
    if "triton" in runs:
        for name in correct:
            result[name]["over_triton"] = result["triton"]["ms"] / result[name]["ms"]
        if correct:
            best = min(correct, key=lambda n: result[n]["ms"])
            result["tvm_best_schedule"] = best
            result["tvm_over_triton_speed"] = result["triton"]["ms"] / result[best]["ms"]
    return result


def _time_interleaved(runs: dict, reps: int, rounds: int = 5) -> dict:
    """name -> median ms of `reps` CUDA-event timings per function, taken `rounds` times round-robin."""
    import torch

    times = {name: [] for name in runs}
    for fn in runs.values():
        for _ in range(3):  # warm-up
            fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            for _ in range(max(1, reps // rounds)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def run(aot: Path, json_path: Path | None, reps: int) -> int:
    import torch

    import attnc.backends.tvm.launch as launch
    from attnc.backends.tvm import aot as tvm_aot

    # Poisoned outputs: an element the kernel never writes stays NaN and fails.
    launch.empty = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    rows = []
    for folder in sorted(p for p in aot.iterdir() if (p / tvm_aot.MANIFEST).exists()):
        row = {"artifact": folder.name}
        try:
            kernel, = tvm_aot.load(folder).values()
            row["checks"] = [check_one(kernel, shape) for shape in SHAPES]
            row["ok"] = all(c["ok"] for c in row["checks"])
        except Exception as err:  # the next artifact still runs
            row.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=4))
        rows.append(row)
        errs = " ".join(f"{c['max_abs_err']:.1e}/{c['tol']:.0e}" for c in row.get("checks", []))
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {folder.name:34s} {errs or row.get('error', '')}", flush=True)
    try:
        perf = bench(aot, reps)
    except Exception as err:
        perf = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    print(json.dumps(perf, indent=2))
    passed = sum(r["ok"] for r in rows)
    print(f"{passed}/{len(rows)} artifacts correct; tvm/triton speed "
          f"{perf.get('tvm_over_triton_speed', float('nan')):.2f}x (target >= 0.6)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "bench": perf}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed == len(rows) and rows else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("build", "run", "ptxas"))
    ap.add_argument("--aot", type=Path, default=ROOT / ".tvm-aot")
    ap.add_argument("--json", type=Path, help="run: write the results here")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", help="build: only the artifacts whose name matches this regex")
    args = ap.parse_args()
    if args.mode == "ptxas":
        return ptxas_report()
    return build(args.aot, args.only) if args.mode == "build" else run(args.aot, args.json, args.reps)


if __name__ == "__main__":
    sys.exit(main())
