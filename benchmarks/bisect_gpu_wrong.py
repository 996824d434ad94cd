"""Which part of a property-test spec makes the GPU wrong: the spec of `--seed` (tests/test_property.py), then
variants with one part removed or simplified (each mask line, each score line, the sink, lse, the dtype), each
run through attnc and the reference on the same inputs. A variant that turns correct points at the part it
removed; then the spec as generated under plan overrides (tiles, warps, stages, descriptors, packing): an override
that turns correct points at the code generator's or Triton's handling of that plan. Seed 1004 (wrong on the H100,
right in the interpreter) was found right with key tiles of 32 or 16 or query tiles of 32 (session 9).

    python3 benchmarks/bisect_gpu_wrong.py --seed 1004 [--dtype bf16] [--device cuda]

Prints one line per variant: the largest output error relative to the reference's largest element, or the
fault that ended it. Each variant runs in a process of its own (a CUDA fault ends the process's context), with
CUDA_LAUNCH_BLOCKING=1 so a fault names its launch; `--sanitize N` runs variant N under compute-sanitizer
memcheck first and prints its first report."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import attnc  # noqa: E402
from attnc.passes import PlanOptions  # noqa: E402
from test_property import case_inputs, generate  # noqa: E402

# The spec as generated, under these plan overrides (the plan's own choice first)
PLANS = {"plan: keys 32": {"block_n": 32}, "plan: keys 16": {"block_n": 16}, "plan: queries 32": {"block_m": 32},
         "plan: 1 stage": {"num_stages": 1}, "plan: 8 warps": {"num_warps": 8}, "plan: descriptors": {"tma": True},
         "plan: heads unpacked": {"pack_heads": False}}


def variants(text: str, dtype: str) -> dict[str, str]:
    lines = text.splitlines()
    out = {"as generated": text}
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("mask "):
            out[f"without `{stripped}`"] = "\n".join(lines[:n] + lines[n + 1:])
        elif stripped.startswith("score ="):
            out[f"`{stripped[:40]}...` -> qk * rsqrt(D)"] = "\n".join(
                lines[:n] + [line[:line.index("score")] + "score = qk * rsqrt(D)"] + lines[n + 1:])
    if "sink=" in text:
        out["without the sink"] = re.sub(r"softmax\(score, sink=.*\) @ v", "softmax(score) @ v", text)
    if ", lse" in text:
        out["without lse"] = text.replace(" @ v, lse", " @ v")
    if dtype != "f32":
        out["in f32"] = text.replace(f"{dtype}[", "f32[")
    return out


def error(text: str, g, seed: int, device: str, options: PlanOptions = PlanOptions()) -> str:
    try:
        (spec,) = attnc.parse(text)
    except attnc.AttncError as e:
        return f"not a spec ({type(e).__name__})"
    q, k, v, kwargs = case_inputs(spec, g, seed, device)
    want = attnc.reference(spec, q, k, v, **kwargs)
    got = attnc.compile(spec, options=options)(q, k, v, **kwargs)
    if spec.returns_lse:
        got, want = got[0], want[0]
    err = (got.double() - want.double()).abs().nan_to_num(float("inf")).max().item()
    return f"{err / max(1.0, want.abs().max().item()):.3g}"


def in_own_process(args, name: str, sanitize: bool = False) -> str:
    """`error` of one variant in a fresh process: its result, or the last lines of the fault that ended it."""
    command = [sys.executable, __file__, "--seed", str(args.seed), "--dtype", args.dtype, "--device", args.device,
               "--variant", name]
    if sanitize:
        command = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", *command]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"},
                          timeout=300)
    if done.returncode == 0 and not sanitize:
        return done.stdout.strip().splitlines()[-1]
    text = (done.stdout + done.stderr).strip().splitlines()
    return "\n".join(text[:60] if sanitize else ["fault:"] + text[-8:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1004)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help="run this variant alone, here (what each child process does)")
    parser.add_argument("--sanitize", type=int, default=None, metavar="N",
                        help="first run variant N (0: as generated) under compute-sanitizer")
    args = parser.parse_args()
    g = generate(args.seed, args.dtype, large=True)
    texts = variants(g.text, args.dtype)
    if args.variant is not None:
        text, options = (g.text, PlanOptions(**PLANS[args.variant])) if args.variant in PLANS else \
            (texts[args.variant], PlanOptions())
        print(error(text, g, args.seed, args.device, options), flush=True)
        return
    print(g.describe(), flush=True)
    if args.sanitize is not None:
        print(in_own_process(args, list(texts)[args.sanitize], sanitize=True), flush=True)
    for name in [*texts, *PLANS]:
        print(f"{in_own_process(args, name):>12}  {name}", flush=True)


if __name__ == "__main__":
    main()
