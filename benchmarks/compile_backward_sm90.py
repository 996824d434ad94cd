"""Compile the Triton backward kernels (atomic and deterministic) of a few example specs for sm_90 without a GPU:
the launcher runs on meta tensors with its launches captured, and each captured launch is compiled by
triton.compile for GPUTarget("cuda", 90, 32). The pipeliner and ptxas reject what the interpreter lets through, so
this finds compile failures of the GPU's Triton version on a CPU machine, e.g. with a venv of Triton 3.6:

    python3 -m venv --system-site-packages /tmp/venv36 && /tmp/venv36/bin/pip install triton==3.6.0
    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_backward_sm90.py

Exit status 1 if any kernel fails to compile."""
import glob
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
from dataclasses import replace
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
import attnc
from attnc.backends.triton import gradients
from attnc.dsl.signature import bind
from attnc.passes import Target, plan_kernel

captured = []
def capture(kernel, grid, args, keywords, *rest):
    captured.append((kernel, args, keywords))
gradients.launch.launch_fitting = capture

ok = True
for name in ("causal_lm", "alibi", "dense"):
    spec = next(s for p in glob.glob("examples/specs/*.attn") for s in attnc.parse_file(p) if s.name == name)
    spec = replace(spec, returns_lse=True)
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 128, 128)
    bl = gradients.BackwardLauncher(plan)
    B, H, M = 2, 4, 512
    HKV = 2 if spec.is_gqa_shape else H
    sizes = {"B": B, "H": H, "HKV": HKV, "M": M, "N": M, "D": 128, "DV": 128}
    mk = lambda d: torch.empty([sizes[n] for n in d.shape], dtype=torch.bfloat16, device="meta")
    q, k, v = mk(spec.q), mk(spec.k), mk(spec.v)
    kw = {t.name: torch.empty([H], dtype=torch.float32, device="meta") for t in spec.inputs}
    bound = bind(spec, q, k, v, kw)
    out = torch.empty_like(q); lse = torch.empty(B, H, M, device="meta")
    for det in (False, True):
        captured.clear()
        bl(bound, out, lse, torch.empty_like(out), None, det)
        for kernel, args, keywords in captured:
            fn = kernel
            signature, constexprs = {}, {}
            for an, param, value in zip(fn.arg_names, fn.params, [*args, *[None] * (len(fn.params) - len(args))]):
                if param.is_constexpr:
                    signature[an], constexprs[an] = "constexpr", keywords.get(an)
                else:
                    signature[an] = mangle_type(value)
            options = {k2: v2 for k2, v2 in keywords.items() if k2 not in fn.arg_names}
            try:
                triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
                print("ok  ", name, "det" if det else "atomic", fn.__name__, flush=True)
            except Exception as e:
                ok = False
                print("FAIL", name, "det" if det else "atomic", fn.__name__, type(e).__name__, str(e)[:200], flush=True)
sys.exit(0 if ok else 1)
