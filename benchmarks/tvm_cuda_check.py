"""The TVM CUDA kernels, built ahead of time here and checked on the GPU machine with only the TVM runtime.

Here (TVM + nvcc, no GPU needed):
    python -m attnc.codegen.tvm.runtime_pack .tvmrt --python 3.12      # trimmed runtime, ~11 MB
    python benchmarks/tvm_cuda_check.py build --aot .tvm-aot            # every dense example, bf16/f16/f32
On the GPU machine (carry .tvmrt and .tvm-aot):
    PYTHONPATH=.tvmrt:. python benchmarks/tvm_cuda_check.py run --aot .tvm-aot --json $OUT/tvm_cuda.json

`run` loads every artifact, runs it on fresh random inputs (outputs poisoned with NaN) against attnc.reference
(float64) at two shapes, then times dense causal bf16 D=128 B=4 H=16 S=4096 against attnc's Triton kernel (and
torch SDPA) in the same process. One failure never stops the rest; it prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
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
BENCH_SCHEDULES = ((4, 64), (8, 64), (4, 32), (8, 32))  # (num_warps, block_n) of the timed tensor-core kernel
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


def build(aot: Path) -> int:
    from attnc.codegen.tvm import aot as tvm_aot
    from test_triton_kernels import example_sizes

    failed = 0
    for name, spec in example_variants():
        sizes = example_sizes(spec)
        start = time.perf_counter()
        try:
            tvm_aot.build(spec, aot / name, "cuda", "sm_90a", sizes["D"], sizes["DV"])
            print(f"built {name:32s} D={sizes['D']:3d} DV={sizes['DV']:3d} {time.perf_counter() - start:5.1f} s",
                  flush=True)
        except Exception as err:  # keep building the rest
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
    import attnc
    from attnc.passes import PlanOptions

    for warps, block_n in BENCH_SCHEDULES:
        name = f"bench_causal_d128-bf16-w{warps}n{block_n}"
        try:
            tvm_aot.build(attnc.parse(BENCH_SPEC)[0], aot / name, "cuda", "sm_90a", 128, 128,
                          PlanOptions(num_warps=warps, block_n=block_n))
            print(f"built {name}", flush=True)
        except Exception as err:
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
    return 1 if failed else 0


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
    import torch

    import attnc
    from attnc.codegen.tvm import aot as tvm_aot

    b, h, s, d = (BENCH_SHAPE[x] for x in ("B", "H", "S", "D"))
    kernels = {f"tvm w{w} n{n}": tvm_aot.load(aot / f"bench_causal_d128-bf16-w{w}n{n}") for w, n in BENCH_SCHEDULES}
    triton_kernel = attnc.compile(next(iter(kernels.values())).spec, backend="triton")
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    runs = {**{name: (lambda kernel=kernel: kernel(q, k, v)) for name, kernel in kernels.items()},
            "triton": lambda: triton_kernel(q, k, v), "sdpa": lambda: sdpa(q, k, v, is_causal=True)}
    want = sdpa(q, k, v, is_causal=True).float()
    result = {"shape": BENCH_SHAPE, "dtype": "bf16", "causal": True}
    flops = 4 * b * h * s * s * d * 0.5
    for name, fn in runs.items():
        try:
            err = (fn().float() - want).abs().max().item()
            ms = _time(fn, reps)
            result[name] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_err_vs_sdpa": err}
        except Exception as e:  # one side failing still reports the others
            result[name] = {"error": f"{type(e).__name__}: {e}"}
    correct = [n for n in kernels if "ms" in result[n] and result[n]["max_abs_err_vs_sdpa"] < 0.05]
    if correct and "ms" in result.get("triton", {}):
        best = min(correct, key=lambda n: result[n]["ms"])
        result["tvm_best_schedule"] = best
        result["tvm_over_triton_speed"] = result["triton"]["ms"] / result[best]["ms"]
    return result


def _time(fn, reps: int) -> float:
    """Median of `reps` CUDA-event timings, after warm-up, in ms."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run(aot: Path, json_path: Path | None, reps: int) -> int:
    import torch

    import attnc.codegen.tvm.launch as launch
    from attnc.codegen.tvm import aot as tvm_aot

    # Poisoned outputs: an element the kernel never writes stays NaN and fails.
    launch.empty = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    rows = []
    for folder in sorted(p for p in aot.iterdir() if (p / tvm_aot.MANIFEST).exists()):
        row = {"artifact": folder.name}
        try:
            kernel = tvm_aot.load(folder)
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
    ap.add_argument("mode", choices=("build", "run"))
    ap.add_argument("--aot", type=Path, default=ROOT / ".tvm-aot")
    ap.add_argument("--json", type=Path, help="run: write the results here")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    return build(args.aot) if args.mode == "build" else run(args.aot, args.json, args.reps)


if __name__ == "__main__":
    sys.exit(main())
