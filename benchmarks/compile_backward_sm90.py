"""Compile the Triton backward kernels (atomic and deterministic) of a few example specs for sm_90 without a GPU:
the launcher runs on meta tensors with its launches captured, and each captured launch is compiled by
triton.compile for GPUTarget("cuda", 90, 32). The pipeliner and ptxas reject what the interpreter lets through, so
this finds compile failures of the GPU's Triton version on a CPU machine, e.g. with a venv of Triton 3.6:

    python3 -m venv --system-site-packages /tmp/venv36 && /tmp/venv36/bin/pip install triton==3.6.0
    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_backward_sm90.py

Exit status 1 if any kernel fails to compile. Environment: STATS=1 prints per kernel ptxas's registers and spills and
instruction counts (benchmarks/kernel_stats.py); D=64 plans that head dim; DKDV=BM,BN,warps,stages puts a dK/dV tile
first in BACKWARD_TUNED; MODULE=path compiles a hand-edited backward module in place of the generated one;
NO_TABLE_GRADS=1 compiles the calls whose float tables take no gradient (TABLE_GRADS False)."""
import glob
from pathlib import Path
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
import torch
from dataclasses import replace
import attnc
sys.path.insert(0, "tests")
from test_triton_kernels import example_kwargs, qkv  # noqa: E402
from attnc.backends.triton import gradients
from attnc.dsl.signature import bind
from attnc.passes import Target, plan_kernel
import kernel_stats  # noqa: E402  (benchmarks/)

captured = []
def capture(kernel, grid, args, keywords, *rest):
    captured.append((kernel, args, keywords))
gradients.launch.launch_fitting = capture
# the tile-class summary of a data-dependent mask is a kernel of its own: its table stands in, unwritten
gradients.BackwardLauncher.summary = lambda self, bound, values, kernel: [
    torch.empty(1, dtype=torch.int8, device="meta"), 0, 0]

STATS = os.environ.get("STATS") == "1"  # per kernel: ptxas registers and spills, instruction counts (benchmarks/kernel_stats.py)
HEAD_DIM = int(os.environ.get("D", 128))  # the head dim planned (D and DV)
if os.environ.get("DKDV"):  # a dK/dV tile "BM,BN,warps,stages" for 16-bit HEAD_DIM on sm_90, first in the table
    from attnc.passes import tiling
    from attnc.passes.plan import TileConfig
    tiling.BACKWARD_TUNED = (tiling.BackwardRow(90, 16, HEAD_DIM, TileConfig(*map(int, os.environ["DKDV"].split(","))),
                                                TileConfig(64, 32, 4, 3)),) + tiling.BACKWARD_TUNED
ok = True
for name in sys.argv[1:] or ("causal_lm", "alibi", "dense", "sliding_window", "alibi_doc"):
    spec = next(s for p in glob.glob("examples/specs/*.attn") for s in attnc.parse_file(p) if s.name == name)
    spec = replace(spec, returns_lse=True)
    d = spec.dim_values.get("D", HEAD_DIM)
    dv = spec.dim_values.get("DV", d)
    plan = plan_kernel(spec, Target("triton", "cuda", 90), d, dv)
    # MODULE: a backward module's source to compile in place of the generated one (a hand-edited variant)
    source = os.environ.get("MODULE")
    module = source and gradients.launch.import_source(Path(source), "variant")
    if module:  # modules written before DKDV_HEADS loop over a GQA group in one program per K/V head
        module.DKDV_HEADS = getattr(module, "DKDV_HEADS", "HKV")
    bl = gradients.BackwardLauncher(plan, module)
    B, H, M = 2, 4, 512
    HKV = 2 if spec.is_gqa_shape else H
    sizes = {"B": B, "H": H, "HKV": HKV, "M": M, "N": M, "D": d, "DV": dv}
    q, k, v = (t.to("meta") for t in qkv(spec, sizes, "cpu"))
    kw = {name: t.to("meta") if isinstance(t, torch.Tensor) else t
          for name, t in example_kwargs(spec, sizes, "cpu").items()}
    bound = bind(spec, q, k, v, kw)
    out = torch.empty_like(q); lse = torch.empty(B, H, M, device="meta")
    for det in (False, True):
        captured.clear()
        bl(bound, out, lse, torch.empty_like(out), None, det, () if os.environ.get("NO_TABLE_GRADS") == "1" else None)
        for fn, args, keywords in captured:
            try:
                ck = kernel_stats.compile_sm90(fn, args, keywords)
                print("ok  ", name, "det" if det else "atomic", fn.__name__, flush=True)
                if STATS:  # which source it compiled: attnc's import and the module's file
                    print("   source:", attnc.__file__, fn.fn.__code__.co_filename)
                    kernel_stats.report(f"{name} {'det' if det else 'atomic'} {fn.__name__}", ck)
            except Exception as e:
                ok = False
                print("FAIL", name, "det" if det else "atomic", fn.__name__, type(e).__name__, str(e)[:200], flush=True)
sys.exit(0 if ok else 1)
