"""Compile the MLA decode kernel (attn_decode of bench_mla.py's spec, examples/specs/mla.attn's without lse: D = 512
latent, DR = 64 rope part, bf16 or --fp8) for sm_90 without a GPU, over the tile grid the H100 sweep (bench_mla.py
--sweep) times, and print ptxas' registers, spills and the shared memory per config, so the sweep and the
DECODE_TUNED row start from configs that build.

A config is rows per program (BLOCK_M: the heads packed into one tile), keys per step (BLOCK_N), warps and
num_stages as the plan counts them (K/V tiles in flight + 1; passes/decode.pipeline_stages turns it into Triton's,
more for a paged cache). The tile is set on the plan directly, past plan_decode's shared-memory estimate, so that
Triton's own shared-memory figure decides what fits (232448 bytes a block on sm_90). Needs Triton 3.6 (the GPU
machine's), e.g.

    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_mla_sm90.py --out /tmp/mla-compile [--storage paged] [--fp8]

--fp8 compiles bench_mla.py --fp8's spec (the latent and its rope part e4m3, one dequant scale k_scale). Each config's
PTX, TTGIR and cubin are kept in <out> for reading (nvdisasm -c the cubin for the SASS).

One JSON line per config (2-25 s each on a 2-core machine) on stdout and in <out>/compile_mla_sm90.jsonl: registers,
spill bytes, local-memory instructions per key loop (loop_spills), shared bytes and whether they fit, Triton's
num_stages, the tensor-core layouts, and for splits > 1 the merge kernel's figures. benchmarks/NOTES.md (MLA decode
on sm_90) has the table. Exit status 1 if any config fails for a reason other than running out of shared memory."""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

import attnc
from attnc.backends.triton import serving
from attnc.dsl.signature import bind
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.decode import decode_launch
from attnc.passes.plan import TileConfig

sys.path.insert(0, str(Path(__file__).parent))
import bench_mla  # noqa: E402  (the benchmark's spec, so both compile the same kernel)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SMEM_CAP = 232448  # bytes of shared memory a block may have on sm_90
H100_SMS = 132


def mla_spec(storage: str, fp8: bool):
    """bench_mla.py's spec: the latent and its rope part bf16, or e4m3 with one dequant scale (k_scale)."""
    return bench_mla.mla_spec(replace(bench_mla.GPU, fp8=fp8), paged=storage == "paged")


def meta_call(spec, storage: str, batch: int, heads: int, keys: int, fp8: bool):
    """q, k and keywords of a decode call on meta tensors (one query token per sequence)."""
    d, dr, page = 512, 64, 64
    latent = torch.float8_e4m3fn if fp8 else torch.bfloat16
    q = torch.empty(batch, 1, heads, d, dtype=torch.bfloat16, device="meta")
    kw = {"qr": torch.empty(batch, 1, heads, dr, dtype=torch.bfloat16, device="meta"), "scale": 192 ** -0.5}
    if fp8:
        kw["k_scale"] = torch.empty(1, dtype=torch.float32, device="meta")
    if storage == "paged":
        pages = batch * keys // page
        k = torch.empty(pages, page, d + dr, dtype=latent, device="meta")[..., :d]
        kw.update(kr=torch.empty(pages, page, d + dr, dtype=latent, device="meta")[..., d:],
                  block_table=torch.empty(batch, keys // page, dtype=torch.int32, device="meta"),
                  kv_len=torch.empty(batch, dtype=torch.int32, device="meta"))
    else:
        k = torch.empty(batch, keys, d + dr, dtype=latent, device="meta")[..., :d]
        kw["kr"] = torch.empty(batch, keys, d + dr, dtype=latent, device="meta")[..., d:]
    return q, k, kw


def compile_config(spec, storage: str, tile: TileConfig, splits: int, work: Path, fp8: bool) -> dict:
    """attn_decode's figures at this tile; with splits > 1, attn_combine's (the merge) under "combine"."""
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 512, 512, PlanOptions(num_splits=splits))
    plan = replace(plan, decode=replace(plan.decode, tile=tile, dense_max_m=tile.block_m))
    launcher = serving.DecodeLauncher(plan)
    q, k, kw = meta_call(spec, storage, 64, tile.block_m, 8192, fp8)
    bound = bind(spec, q, k, k, kw)
    go = decode_launch(plan, bound.sizes, H100_SMS)
    stem = (f"mla_{'fp8_' if fp8 else ''}{storage}_{tile.block_m}x{tile.block_n}_w{tile.num_warps}"
            f"_s{tile.num_stages}_x{splits}")
    decode, *combine = (compile_call(fn, args, keywords, work / f"{stem}_{fn.__name__}")
                        for fn, _, args, keywords in launcher.calls(bound, go, *launcher.outputs(bound, go)))
    return {**decode, **({"combine": {k: combine[0][k] for k in ("regs", "spills", "shared")}} if combine else {})}


def compile_call(fn, args, keywords, path: Path) -> dict:
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param, value) in enumerate(zip(fn.arg_names, fn.params, [*args, *[None] * len(fn.params)])):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", keywords.get(name)
            continue
        # as the JIT specializes: integers divisible by 16 and aligned pointers become attributes
        signature[name], attr = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize, True)
        if signature[name] == "constexpr":
            constexprs[name] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    options = {k: v for k, v in keywords.items() if k not in fn.arg_names}
    t0 = time.time()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    ptx = path.with_suffix(".ptx")
    ptx.write_text(compiled.asm["ptx"])
    path.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
    report = subprocess.run([str(BIN / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return dict(regs=int(re.search(r"Used (\d+) registers", report).group(1)), spills=spills,
                stack=int(re.search(r"(\d+) bytes stack frame", report).group(1)), shared=compiled.metadata.shared,
                loop_spills=loop_spills(compiled.asm["cubin"], path.with_suffix(".cubin")),
                # each tensor-core layout: version, warps per CTA, instruction shape. At 64 rows and 8 warps QK^T's
                # is v3 [8, 1]: both warpgroups compute the same 64 rows of scores, and PV's [4, 2] splits DV
                mma=re.findall(r"nvidia_mma<\{versionMajor = (\d), versionMinor = \d, warpsPerCTA = (\[[\d, ]+\]), "
                               r"instrShape = (\[[\d, ]+\])", compiled.asm["ttgir"]),
                fits=compiled.metadata.shared <= SMEM_CAP, triton_stages=options.get("num_stages"),
                wgmma="wgmma" in compiled.asm["ptx"], compile_s=round(time.time() - t0, 1))


def loop_spills(cubin: bytes, path: Path) -> list[int]:
    """Local-memory instructions (STL, LDL) inside each key loop of the SASS (a backward branch around tensor-core
    instructions: HGMMA, QGMMA for e4m3, HMMA), in program order: the kernel's three loops (partial tiles, full
    tiles, partial tiles). Spills outside the loops (prologue, epilogue) cost once per program; inside, once per key
    tile."""
    path.write_bytes(cubin)
    sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    counts = []
    for end, line in enumerate(sass):
        m = re.search(r"\bBRA\b.*?\.(L_x_\d+)", line)
        start = labels.get(m.group(1), end) if m else end
        body = sass[start:end + 1]
        if start < end and any(re.search(r"\b(HGMMA|QGMMA|HMMA)\b", b) for b in body):
            counts.append(sum(bool(re.search(r"\b(STL|LDL)\b", b)) for b in body))
    return counts


def configs(storages, rows, block_ns, warps, stages):
    for storage, m, n, w, s in itertools.product(storages, rows, block_ns, warps, stages):
        yield storage, TileConfig(m, n, w, s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/mla-compile")
    ap.add_argument("--storage", nargs="*", default=["paged", "contiguous"])
    ap.add_argument("--rows", type=int, nargs="*", default=[64, 32, 16, 128])
    ap.add_argument("--block-n", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--warps", type=int, nargs="*", default=[8, 4])
    ap.add_argument("--stages", type=int, nargs="*", default=[4, 3, 2, 1])
    ap.add_argument("--fp8", action="store_true", help="the latent and its rope part in e4m3 (bench_mla.py --fp8)")
    ap.add_argument("--splits", type=int, default=1, help="1: the kernel writes out itself; more: the split form")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "compile_mla_sm90.jsonl"
    ok = True
    for storage, tile in configs(args.storage, args.rows, args.block_n, args.warps, args.stages):
        row = {"storage": storage, "fp8": args.fp8, "block_m": tile.block_m, "block_n": tile.block_n,
               "num_warps": tile.num_warps,
               "num_stages": tile.num_stages, "splits": args.splits}
        try:
            row.update(compile_config(mla_spec(storage, args.fp8), storage, tile, args.splits, out, args.fp8))
        except Exception as e:  # noqa: BLE001  (a config that does not build is a result)
            text = str(e).strip().splitlines()
            row["error"] = f"{type(e).__name__}: {text[-1][:300] if text else ''}"
            ok &= "shared memory" in row["error"].lower() or "OutOfResources" in row["error"]
        line = json.dumps(row)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
