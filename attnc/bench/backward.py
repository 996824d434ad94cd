"""`attnc bench --backward` on a GPU: training steps (forward + backward) of attnc against torch SDPA
(FlashAttention-2 and cuDNN backends, through torch.nn.attention.sdpa_kernel) and compiled FlexAttention, in one
process on the same inputs.

Workloads: attnc.bench.prefill_workloads (bf16; dense and causal at S = 1k / 4k / 16k with 16k tokens per batch,
GQA 32/8, sliding window 1024, softcap 30, ALiBi, head dims 64 / 128 / 256). Each runner computes out and the
gradients of q, k and v for a fixed random dout; the gradients are checked against the first peer that ran
(relative Frobenius error) before any timing counts. Times are the median of triton.testing.do_bench over the
whole step; FLOPs count the forward as 4 * B * H * D * (kept query-key pairs) and the backward as 2.5 times that,
so TFLOP/s = 3.5 * forward FLOPs / time. Peak memory is torch.cuda.max_memory_allocated during one step, less
what was allocated before it. Results: `<out>/backward-<device>-<date>.json` and PNG plots beside it.

attnc runs through `--api`: `autograd` calls the compiled kernel and torch.autograd.grad (the autograd layer of
attnc/runtime), `backend` plans the forward with lse and calls TritonBackend.build / build_backward directly (no
autograd needed), `auto` (default) takes autograd where the kernel's output requires grad.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

import attnc
from attnc.backends import get_backend
from attnc.bench import (
    BACKWARD_FLOPS, Workload, compiled_flex_attention, kept_pairs, measure, plot, prefill_workloads, print_errors,
    run_report,
)
from attnc.dsl.signature import bind
from attnc.passes import plan_kernel

CHECK_TOL = 3e-2  # relative Frobenius error of the concatenated gradients against the anchor (bf16)
PEERS = ("attnc", "sdpa-cudnn", "sdpa-flash", "flex")


def gradients(out: torch.Tensor, leaves: tuple, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv of `out` for `dout`: a training step's result. They are concatenated for the check only; a cat in
    the timed step copied all three (0.13 ms of a 0.9-1.7 ms step at S = 1k on the H100, session 16)."""
    return torch.autograd.grad(out, leaves, dout)


def attnc_runner(w: Workload, q, k, v, dout, extra, api: str, deterministic: bool):
    spec = attnc.parse(w.spec)[0]
    kwargs = {**w.params, **extra}
    if api != "backend":
        kern = attnc.compile(spec, deterministic=deterministic)
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        if api == "autograd" or kern(*leaves, **kwargs).requires_grad:
            return lambda: gradients(kern(*leaves, **kwargs), leaves, dout)
    # the backend's API: the forward planned with lse, then the backward kernels
    spec = replace(spec, returns_lse=True)
    backend = get_backend("triton")
    plan = plan_kernel(spec, backend.target(q.device), w.D, w.D)
    forward, backward = backend.build(plan), backend.build_backward(plan)

    def step():
        bound = bind(spec, q, k, v, kwargs)
        out, lse = forward(bound)
        grads = backward(bound, out, lse, dout, None, deterministic)
        return tuple(grads[n] for n in "qkv")

    return step


def sdpa_runner(w: Workload, q, k, v, dout, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not w.sdpa:
        return None
    backend = getattr(SDPBackend, backend_name)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))

    def step():
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=w.causal,
                                                                   enable_gqa=w.HKV != w.H)
        return gradients(out, leaves, dout)

    return step


def flex_runner(w: Workload, q, k, v, dout, extra):
    from torch.nn.attention.flex_attention import create_block_mask

    if w.flex is None:
        return None
    score_mod, mask_mod = w.flex(extra)
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, w.S, w.S, device=q.device)
    fn = compiled_flex_attention()
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    return lambda: gradients(fn(*leaves, score_mod=score_mod, block_mask=block_mask, enable_gqa=w.HKV != w.H),
                             leaves, dout)


def workload_inputs(w: Workload, device: str, batch: int | None = None) -> tuple:
    """(q, k, v, dO, the spec's other inputs) of a workload on seeded random bf16 data; `batch`: B other than the
    workload's (a host-time measurement, whose work does not depend on it)."""
    b = w.B if batch is None else batch
    gen = torch.Generator(device=device).manual_seed(hash(w.name) & 0xFFFF)
    q, k, v = (torch.randn(b, h, w.S, w.D, device=device, dtype=torch.bfloat16, generator=gen)
               for h in (w.H, w.HKV, w.HKV))
    dout = torch.randn(b, w.H, w.S, w.D, device=device, dtype=torch.bfloat16, generator=gen)
    extra = w.inputs(b, w.H, w.S, device) if w.inputs else {}
    return q, k, v, dout, extra


def run_workload(w: Workload, device: str, api: str = "auto", deterministic: bool = False) -> dict:
    q, k, v, dout, extra = workload_inputs(w, device)
    forward_flops = 4.0 * w.B * w.H * w.D * kept_pairs(w)
    flops = forward_flops * (1 + BACKWARD_FLOPS)
    row: dict = {"workload": w.name, "group": w.group, "B": w.B, "H": w.H, "HKV": w.HKV, "S": w.S, "D": w.D,
                 "forward_flops": forward_flops, "flops": flops, "results": {}}
    makers = {
        "attnc": lambda: attnc_runner(w, q, k, v, dout, extra, api, deterministic),
        "sdpa-cudnn": lambda: sdpa_runner(w, q, k, v, dout, "CUDNN_ATTENTION"),
        "sdpa-flash": lambda: sdpa_runner(w, q, k, v, dout, "FLASH_ATTENTION"),
        "flex": lambda: flex_runner(w, q, k, v, dout, extra),
    }
    measure(makers, row["results"], flops, CHECK_TOL)
    return row


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    table = Table(title=f"{env['device']} · torch {env['torch']} · triton {env['triton']} · bf16 forward + "
                        f"backward, TFLOP/s (backward = {BACKWARD_FLOPS}x forward FLOPs) · peak extra MiB")
    for col in ("workload", *PEERS, "attnc / flex", "attnc / cudnn"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for row in report["rows"]:
        res = row["results"]
        tf = {p: res.get(p, {}).get("tflops") for p in PEERS}
        cells = [f"{tf[p]:.0f} · {res[p]['peak_extra_bytes'] / 2**20:.0f}" if tf[p] else
                 ("err" if p in res else "—") for p in PEERS]
        ratios = [f"{tf['attnc'] / tf[p]:.2f}×" if tf["attnc"] and tf[p] else "—" for p in ("flex", "sdpa-cudnn")]
        table.add_row(row["workload"], *cells, *ratios)
    Console().print(table)
    print_errors(report)


def run(args: argparse.Namespace) -> int:
    """The GPU training benchmark for `attnc bench --backward [--api ...] [--deterministic]`."""
    def run_one(w: Workload, device: str) -> dict:
        return run_workload(w, device, args.api, args.deterministic)

    report, path = run_report("attnc bench --backward", prefill_workloads(args.quick), run_one, args.out,
                              "backward-", args.only)
    report["settings"] = {"api": args.api, "deterministic": args.deterministic}
    path.write_text(json.dumps(report, indent=1))
    plot(report, path.parent, path.stem)
    print_table(report)
    print(f"wrote {path}")
    return 0
