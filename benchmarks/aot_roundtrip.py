"""AOT round trip on the GPU: `python benchmarks/aot_roundtrip.py DIR [DIR ...]`.

Each DIR is an artifact written by `attnc compile FILE --backend triton --arch sm_XX -o DIR` (on a machine without
a GPU, with the Triton version this GPU machine has), or a folder of such artifacts. Every attention is loaded with
`attnc.load`, run on fresh random inputs (decode and prefill shapes, default and small integer params, and a q with
a strided head dim, which takes the artifact's "any"-layout build) with NaN-poisoned outputs, and compared with
`attnc.reference` (float64). Prints the max errors; exits non-zero on a mismatch or if Triton compiled anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

import attnc
import attnc.backends.triton.launch as launch
from attnc.dsl.signature import TORCH_DTYPES
from attnc.backends.triton.aot import MANIFEST, read_artifact

TOL = {"bf16": 3e-2, "f16": 3e-3, "f32": 2e-5}  # max abs error over max(1, max |reference|)
CASES = [(1, 1000), (5, 333), (300, 1000), (1000, 1000)]  # (M, N): decode, small decode, prefill
SPEED_CASE = (1, 16384)  # a split-KV decode launch: the loaded artifact against a JIT build of the same spec


def artifacts(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        found += [p] if (p / MANIFEST).exists() else sorted(d for d in p.iterdir() if (d / MANIFEST).exists())
    if not found:
        sys.exit(f"no attnc AOT artifact (a folder with {MANIFEST}) in {' '.join(paths)}")
    return found


def random_inputs(spec, sizes: dict, head_dim_stride: int) -> tuple:
    def tensor(decl, stride=1):
        shape = [sizes[n] * (stride if n == "D" else 1) for n in decl.shape]
        t = torch.randn(shape, device="cuda", dtype=TORCH_DTYPES[decl.dtype])
        return t[..., ::stride] if stride > 1 else t

    q, k, v = tensor(spec.q, head_dim_stride), tensor(spec.k), tensor(spec.v)
    inputs = {}
    for t in spec.inputs:
        shape = [sizes[n] for n in t.shape]
        if t.dtype == "bool":
            inputs[t.name] = torch.rand(shape, device="cuda") < 0.7
        elif t.dtype.startswith("i") and t.shape[-1] in ("M", "N"):  # segment ids along a sequence (documents)
            inputs[t.name] = torch.sort(torch.randint(0, 3, shape, device="cuda"), dim=-1).values.to(
                TORCH_DTYPES[t.dtype])
        elif t.dtype.startswith("i"):  # lengths and offsets
            inputs[t.name] = torch.randint(0, sizes["N"] + 1, shape, device="cuda").to(TORCH_DTYPES[t.dtype])
        else:
            inputs[t.name] = torch.randn(shape, device="cuda", dtype=TORCH_DTYPES[t.dtype])
    return q, k, v, inputs


def max_errors(spec, got, want) -> tuple[float, float | None, bool]:
    """(out error relative to max(1, |ref|), lse max abs error or None, every output written and -inf agreed)."""
    (out, lse), (ref, ref_lse) = (got, want) if spec.returns_lse else ((got, None), (want, None))
    ok = out.shape == ref.shape and out.dtype == TORCH_DTYPES[spec.q.dtype] and not out.isnan().any().item()
    err = (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    lse_err = None
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        ok &= torch.equal(torch.isfinite(lse), finite)
        lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    return err, lse_err, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    plain, launch.empty = launch.empty, launch.nan_empty  # the checks: an element no kernel writes fails
    compiles = []
    triton.knobs.compilation.listener = lambda **kw: compiles.append(kw["src"].name)
    torch.manual_seed(0)
    failures = checks = 0
    for folder in artifacts(args.dirs):
        artifact = read_artifact(folder)
        kernels = attnc.load(folder)
        print(f"{folder}: built by Triton {artifact.triton} for {artifact.arch.name} ({artifact.command})")
        for attention in artifact.attentions:
            kernel = kernels[attention.name]
            spec = kernel.spec
            for build in attention.builds:
                for m, n in CASES:
                    sizes = {name: 16 for d in (spec.q, spec.k, spec.v, *spec.inputs) for name in d.shape}
                    sizes.update(B=2, H=8, HKV=2 if spec.is_gqa_shape else 8, M=m, N=n, D=build.head_dim,
                                 DV=build.value_dim)
                    sizes.update(spec.dim_values)
                    small = {p.name: max(1, n // 8) for p in spec.params if p.dtype == "i32"}
                    for params, stride in [({}, 1), (small, 1), ({}, 2)] if small else [({}, 1), ({}, 2)]:
                        q, k, v, inputs = random_inputs(spec, sizes, stride)
                        got = kernel(q, k, v, **inputs, **params)
                        want = attnc.reference(spec, q, k, v, **inputs, **params)
                        err, lse_err, ok = max_errors(spec, got, want)
                        ok &= err <= TOL[spec.q.dtype] and (lse_err is None or lse_err <= TOL[spec.q.dtype])
                        checks += 1
                        failures += not ok
                        shown = " ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
                        print(f"  {'ok  ' if ok else 'FAIL'} {attention.name:14s} {spec.q.dtype} D={build.head_dim:3d} "
                              f"M={m:4d} N={n:4d} {'q head-dim stride 2' if stride > 1 else 'contiguous':19s} "
                              f"params {shown:12s} out err {err:.2e}"
                              + ("" if lse_err is None else f"  lse err {lse_err:.2e}"))
    print(f"{checks - failures}/{checks} checks passed; Triton compiled {len(compiles)} kernel(s) during the runs"
          + (f": {compiles}" if compiles else " (every launch ran a saved cubin)"))
    launch.empty = plain
    for folder in artifacts(args.dirs):
        for name, kernel in attnc.load(folder).items():
            speed(kernel)
    return 1 if failures or compiles else 0


def speed(loaded) -> None:
    """Times a split-KV decode call of a loaded kernel against a JIT build of its spec (after the checks, so the
    JIT's compiles do not count there): the artifact must carry the decode kernels to run at the JIT's speed."""
    from triton.testing import do_bench

    spec = loaded.spec
    m, n = SPEED_CASE
    sizes = {name: 16 for d in (spec.q, spec.k, spec.v, *spec.inputs) for name in d.shape}
    sizes.update(B=1, H=8, HKV=2 if spec.is_gqa_shape else 8, M=m, N=n, D=128, DV=128)
    sizes.update(spec.dim_values)
    q, k, v, inputs = random_inputs(spec, sizes, 1)
    jit = attnc.compile(spec)
    times = {label: do_bench(lambda f=f: f(q, k, v, **inputs), warmup=25, rep=200, return_mode="median")
             for label, f in (("aot", loaded), ("jit", jit))}
    print(f"  speed {spec.name:14s} M={m} N={n}: artifact {times['aot'] * 1e3:.1f} us, JIT {times['jit'] * 1e3:.1f} us "
          f"({times['jit'] / times['aot']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
