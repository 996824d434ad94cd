"""MLA benchmark (issue 14): DeepSeek-style latent attention decode on the seed's grid, attnc against SDPA, compiled
FlexAttention and FlashInfer (where installed), in one process on the same inputs; MLA prefill against dense prefill.

Decode grid: batch 64 / 128 / 768 x KV length 1024 / 2048 / 8192 x 64 / 128 heads, one query token, bf16, a 512-wide
latent c_kv plus a 64-wide rope part k_pe, scale 1 / sqrt(192) (DeepSeek's softmax scale: the head dim before
absorption). The cache is one [.., 576] tensor per slot, c_kv | k_pe, as FlashMLA stores it; every runner reads
views of it:
- attnc: examples/specs/mla.attn, q [B, 1, H, 512] and q_pe [B, 1, H, 64] against k = cache[..., :512] and
  kr = cache[..., 512:], contiguous ([B, N, 576]) and paged (pages of 64 slots, [PAGES, 64, 576], a shuffled block
  table): the latent tile is read once for QK^T and PV.
- the baseline a user writes without an MLA kernel, in its absorbed form (the up-projected form, K and V per head
  of 192 / 128, would read B * H * N * 320 * 2 bytes: 515 GB at B = 768, H = 128, 8k keys, which does not fit):
  q = [q_nope | q_pe] (576), k = the cache (576), v = its first 512 columns (a view, so nothing is copied).
  * sdpa-cudnn / sdpa-efficient: the heads folded into the query rows (q [B, 1, H, 576]: one K/V head, H query
    positions, no mask), the form that reads the cache once per sequence; SDPA's GQA form (enable_gqa with
    [B, H, 1, 576] queries) has no kernel at head dim 576 but the math one, which repeats K/V per head.
    FlashAttention's SDPA kernel takes head dims up to 256 only, so it has no row here.
  * flex: compiled flex_attention in its GQA form (q [B, H, 1, 576], k, v [B, 1, N, *], enable_gqa): its decoding
    kernel packs the heads of a K/V head, as attnc does. Compiled with dynamic shapes: one compile serves the
    grid (static shapes recompile per point, minutes in all).
  * flashinfer: BatchMLAPagedAttentionWrapper (backend "auto": FA3 on sm_90) on the paged cache, where `flashinfer`
    imports, else its row says why. The newest wheel (0.7.4: 101 MB, 682 MB unpacked, cuda-python, cutlass-dsl...)
    is over the 64 MiB a device call carries; 0.5.0 (6.9 MB, with apache-tvm-ffi and ninja 10 MB in all) fits, and
    JIT-builds its MLA kernels with nvcc on first use (benchmarks/NOTES.md has the commands).
Figures: GB/s of latent bytes read (B * N * 576 * 2, plus q) and TFLOP/s (2 * B * H * N * (576 + 512)), each also
as a fraction of the H100's floors (3.35 TB/s, 989 TFLOP/s dense bf16), next to the issue's after-PR FlashInfer
figures (TB/s at 64 heads, TFLOP/s at 128).

Prefill (`--prefill`): MLA in its non-absorbed form (D = 192, DV = 128, causal, examples/specs/mla_dv.attn) and
dense causal prefill (D = DV = 128) at the same B, H and S, attnc against SDPA (cuDNN, flash, efficient) and flex:
the issue asks for the MLA rows at the dense rows' TFLOP/s.

`--sweep`: the decode kernel's tiles instead (rows x keys per step, warps, stages, splits) on five paged grid points,
each checked, streamed to <out>/sweep_mla.jsonl (see benchmarks/compile_mla_sm90.py for which compile on sm_90);
`--tiles 64x64:w8:s3 ...` times those tiles only (with --fp8: the FP8 latent's).
`--fp8`: the grid with the latent (and its RoPE part) in float8 e4m3 with a dequant scale, attnc alone: the issue's
target compares its tokens/s with the bf16 grid's. `--fp8 --quantize-q` adds, on the same caches, attnc-q8 columns
(the spec with `quantize q, qr to f8e4m3`: on sm_90 fp8 x fp8 QK^T, checked against the float32 formula over the
queries quantised the same way) and attnc-bf16 columns (the bf16 spec over the dequantised latent, exact in bf16),
so one call gives bf16 / FP8 / FP8 + quantised queries side by side; every timed result has its tokens/s (one query
token per sequence). `--converters 1 2` adds the Gluon kernel with the conflict-free converter (8 e4m3 a thread,
PlanOptions.fp8_conflict_free_converter, the default since session 13) and one and two converter warpgroups
(attnc-c1/-c2, with --quantize-q attnc-q8-c1/-c2; --f16-values also P V in f16, attnc-q8-f16-c1/-c2), each checked
as the column it varies: attnc-c1 is the default's layout, attnc-c1 against attnc-c2 the second converter. `--float32-sum-every 32 128` adds attnc-q8-sum32 / -sum128: the fp8 QK^T's products added in float32 every
32 or 128 (PlanOptions.fp8_float32_sum_every; the default, 0, keeps the tensor cores' own sums).

Every output is checked against a float32 torch formula (attnc's with NaN-poisoned outputs and workspace) before
any timing counts; times are medians of CUDA-graph replays (do_bench_cudagraph: the kernels alone) where the
capture works, else of triton.testing.do_bench (both are in the JSON). The table prints as rows finish; results go to
<out>/mla-decode[-prefill]-<device>-<date>.json (rewritten after every row) and PNGs next to it.

    python benchmarks/bench_mla.py --out $OUT [--quick] [--only REGEX] [--prefill] [--sweep [--tiles ...]] \
        [--fp8 [--quantize-q [--float32-sum-every 64 128 0]] [--converters 1 2 [--f16-values]]]
    TRITON_INTERPRET=1 python benchmarks/bench_mla.py --smoke --out /tmp/mla   # CPU, tiny shapes (a test runs it)
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

import attnc
from attnc.dsl.reference import quantize_rows
from attnc.passes import PlanOptions
from attnc.bench import compiled_flex_attention, draw_panels, environment, error_text, log_row, result_path, save_figure
from sweep_decode import graph_timer, host_timer, poisoned, timer as sweep_timer, unsplit_call

CHECK_TOL = 2e-2  # relative Frobenius error of a bf16 output against the float32 formula
PEAK_BYTES_S = 3.35e12  # H100 SXM HBM3
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
SCALE = 192 ** -0.5
# The bar: the seed's after-PR FlashInfer figures on the H100. (H, B, N) -> (value, unit).
TARGETS = {
    **{(64, 64, n): (tb, "TB/s") for n, tb in ((1024, 1.60), (2048, 2.05), (8192, 2.78))},
    **{(64, 768, n): (tb, "TB/s") for n, tb in ((1024, 2.87), (2048, 3.00), (8192, 3.13))},
    **{(128, 64, n): (tf, "TFLOP/s") for n, tf in ((1024, 330), (2048, 419), (8192, 511))},
    **{(128, 768, n): (tf, "TFLOP/s") for n, tf in ((1024, 432), (2048, 472), (8192, 503))},
}


@dataclass(frozen=True)
class Shapes:
    """The latent's widths, the page and the dtype: the GPU's (DeepSeek-V3's), or the interpreter's tiny ones."""

    D: int  # latent (c_kv), also the value width
    DR: int  # decoupled rope part (k_pe)
    page: int
    dtype: torch.dtype
    spec_dtype: str
    fp8: bool = False  # the latent cache in float8 e4m3
    quantize_q: bool = False  # `quantize q, qr to f8e4m3`: fp8 x fp8 QK^T over the FP8 latent (--quantize-q)

    @property
    def E(self) -> int:
        return self.D + self.DR

    @property
    def latent_bytes(self) -> int:
        """Bytes of one latent element: 1 in FP8, else the queries' dtype's."""
        return 1 if self.fp8 else torch.finfo(self.dtype).bits // 8


GPU = Shapes(512, 64, 64, torch.bfloat16, "bf16")
SMOKE = Shapes(64, 16, 16, torch.float32, "f32")  # the interpreter's bf16 is wrong: f32 there


def mla_spec(s: Shapes, paged: bool) -> attnc.Attention:
    """examples/specs/mla.attn's specs at these widths and dtype (text, so the smoke run's are the GPU's)."""
    k_shape = "PAGES, PAGE, D" if paged else "B, N, D"
    kr_shape = k_shape.replace("D", "DR")
    latent = "f8e4m3" if s.fp8 else s.spec_dtype
    # FP8: the latent and its RoPE part are columns of one e4m3 cache, so one scale (one K/V head: HKV = 1) serves
    # both; decode_inputs stores the latent / FP8_SCALE, and the runners pass k_scale = FP8_SCALE
    scale_decl = "    input k_scale: f32[HKV]\n    dequant k by k_scale\n    dequant kr by k_scale\n" if s.fp8 else ""
    scale_decl += "    quantize q, qr to f8e4m3\n" if s.quantize_q else ""
    text = (f"attention mla_{'paged' if paged else 'contiguous'}{'_q8' if s.quantize_q else ''} {{\n"
            f"    dims D = {s.D}, DR = {s.DR}{f', PAGE = {s.page}' if paged else ''}\n"
            f"    q: {s.spec_dtype}[B, M, H, D]\n    k: {latent}[{k_shape}]\n"
            f"    input qr: {s.spec_dtype}[B, M, H, DR]\n    input kr: {latent}[{kr_shape}]\n{scale_decl}"
            + ("    paged k by block_table, kv_len\n" if paged else "")
            + "    param scale: f32\n    score = (q @ k + qr @ kr) * scale\n    mask causal\n"
              "    return softmax(score) @ k\n}\n")
    return attnc.parse(text, filename="bench_mla.py")[0]


# ---------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodeWorkload:
    B: int
    N: int  # keys per sequence
    H: int

    @property
    def name(self) -> str:
        keys = f"{self.N // 1024}k" if self.N % 1024 == 0 else str(self.N)
        return f"decode H={self.H} B={self.B} KV={keys}"

    def bytes_read(self, s: Shapes) -> int:
        """The latent cache (c_kv and k_pe) once, and the queries."""
        return self.B * self.N * s.E * s.latent_bytes + self.B * self.H * s.E * torch.finfo(s.dtype).bits // 8

    def flops(self, s: Shapes) -> float:
        return 2.0 * self.B * self.H * self.N * (s.E + s.D)


def decode_workloads(quick: bool) -> list[DecodeWorkload]:
    batches, lengths = ((64, 768), (1024, 8192)) if quick else ((64, 128, 768), (1024, 2048, 8192))
    return [DecodeWorkload(b, n, h) for h in (64, 128) for b in batches for n in lengths]


SMOKE_DECODE = (DecodeWorkload(2, 96, 4), DecodeWorkload(1, 160, 8))


@dataclass
class DecodeInputs:
    q: torch.Tensor  # [B, 1, H, E]: q_nope (absorbed) | q_pe
    cache: torch.Tensor  # [B, N, E]: c_kv | k_pe
    pool: torch.Tensor  # [PAGES, PAGE, E]: the same slots in shuffled pages
    table: torch.Tensor  # int32 [B, N / PAGE]
    lengths: torch.Tensor  # int32 [B]
    k_scale: torch.Tensor | None = None  # f32 [1]: an FP8 latent's dequant scale


FP8_SCALE = 0.5  # not 1, so that a kernel that drops the dequant scale fails the check


def decode_inputs(w: DecodeWorkload, s: Shapes, device: str) -> DecodeInputs:
    gen = torch.Generator(device=device).manual_seed(w.B * 100003 + w.N * 7 + w.H)
    q = torch.randn(w.B, 1, w.H, s.E, device=device, dtype=s.dtype, generator=gen)
    cache = torch.randn(w.B, w.N, s.E, device=device, dtype=s.dtype, generator=gen)
    k_scale = None
    if s.fp8:  # the stored values are the latent / FP8_SCALE, rounded to e4m3
        cache = cache.to(torch.float8_e4m3fn)
        k_scale = torch.tensor([FP8_SCALE], dtype=torch.float32, device=device)
    per_seq = w.N // s.page
    table = torch.randperm(w.B * per_seq, device=device, generator=gen).view(w.B, per_seq).int()
    pool = torch.empty(w.B * per_seq, s.page, s.E, device=device, dtype=cache.dtype)
    pool[table.flatten().long()] = cache.view(w.B * per_seq, s.page, s.E)
    lengths = torch.full((w.B,), w.N, dtype=torch.int32, device=device)
    return DecodeInputs(q, cache, pool, table, lengths, k_scale)


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """`quantize ... to f8e4m3` of x's rows in float32: attnc.reference's (ir.Quantize) e4m3 values times the scale."""
    values, scale = quantize_rows(x, "f8e4m3")
    return values.float() * scale


def decode_reference(x: DecodeInputs, d: int, quantize_q: bool = False) -> torch.Tensor:
    """softmax(q . [c_kv | k_pe] * scale) c_kv in float32 (no TF32), [B, H, D]: every key is kept (one query token
    at the end of the cache); a few sequences at a time, so the float32 cache copy stays small. `quantize_q`: q_nope
    and q_pe each quantised per row first (quantized_rows)."""
    b, _, h, e = x.q.shape
    n = x.cache.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float32, device=x.q.device)
    chunk = max(1, (1 << 26) // (n * e))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for b0 in range(0, b, chunk):
            qf, kf = x.q[b0:b0 + chunk, 0].float(), x.cache[b0:b0 + chunk].float()
            if quantize_q:
                qf = torch.cat([quantized_rows(qf[..., :d]), quantized_rows(qf[..., d:])], -1)
            if x.k_scale is not None:  # an FP8 latent, dequantised
                kf = kf * x.k_scale
            p = torch.softmax(qf @ kf.transpose(1, 2) * SCALE, -1)
            out[b0:b0 + chunk] = p @ kf[..., :d]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def decode_runners(w: DecodeWorkload, s: Shapes, x: DecodeInputs, device: str, triton_kernel: bool = False,
                   persistent: bool = False) -> dict:
    """name -> a zero-argument callable returning out [B, H, D] (a view), or the reason the runner cannot run;
    `attnc` is the default kernel (on sm_90 the Gluon MLA decode kernel); `triton_kernel`: also the Triton decode
    kernel (PlanOptions(gluon=False)) on the same caches; `persistent`: also the Gluon kernel on the persistent
    schedule (PlanOptions(mla_persistent=True))."""
    made = attnc_runners(s, x)
    if triton_kernel:
        made.update(attnc_runners(s, x, PlanOptions(gluon=False), "attnc-triton"))
    if persistent:
        made.update(attnc_runners(s, x, PlanOptions(gluon=True, mla_persistent=True), "attnc-persistent"))
    if s.fp8:  # the peers' FP8 latent paths are not wired: compare with the bf16 grid's JSON (the 1.7x target)
        return made
    made.update(sdpa_decode_runners(w, s, x))
    made["flex"] = flex_decode_runner(w, s, x, device)
    made["flashinfer"] = flashinfer_runner(w, s, x)
    return made


def attnc_runners(s: Shapes, x: DecodeInputs, options: PlanOptions | None = None, name: str = "attnc") -> dict:
    """attnc on the contiguous cache (`name`) and on the paged pool (`name`-paged<PAGE>), as decode_runners;
    `options` compile both (PlanOptions(gluon=True): the Gluon kernel, or the reason it would not run)."""
    d = s.D
    q, qr = x.q[..., :d], x.q[..., d:]  # [B, 1, H, D], [B, 1, H, DR]: views
    extra = {} if x.k_scale is None else {"k_scale": x.k_scale}
    kernels = [attnc.compile(mla_spec(s, paged=p), backend="triton", options=options or PlanOptions())
               for p in (False, True)]
    if options is not None and options.gluon:
        why = gluon_unavailable(kernels, q)
        if why:
            return {name: why, f"{name}-paged{s.page}": why}
    contiguous, paged = kernels
    return {name: lambda: contiguous(q, x.cache[..., :d], qr=qr, kr=x.cache[..., d:], scale=SCALE, **extra)[:, 0],
            f"{name}-paged{s.page}": lambda: paged(q, x.pool[..., :d], qr=qr, kr=x.pool[..., d:], block_table=x.table,
                                                   kv_len=x.lengths, scale=SCALE, **extra)[:, 0]}


def gluon_unavailable(kernels, q: torch.Tensor) -> str:
    """Why the Gluon MLA decode kernel would not run these kernels' calls on q's device ("" where it runs)."""
    from attnc.backends.triton.gluon import unavailable_here

    for kern in kernels:
        staged = kern.plan(q.device, q.shape[-1]).decode.warpgroups
        if staged is None or staged.path != "gluon":
            return staged.reason if staged else "not latent attention"
    return unavailable_here()


def sdpa_decode_runners(w: DecodeWorkload, s: Shapes, x: DecodeInputs) -> dict:
    """SDPA with the heads as query rows of the one K/V head: q [B, 1, H, E], k [B, 1, N, E], v [B, 1, N, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = x.cache.unsqueeze(1)
    v = x.cache[..., :s.D].unsqueeze(1)

    def run(backend):
        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(x.q, k, v, scale=SCALE)[:, 0]
        return call

    if x.q.device.type == "cpu":
        return {"sdpa": run(SDPBackend.MATH)}
    return {"sdpa-cudnn": run(SDPBackend.CUDNN_ATTENTION), "sdpa-efficient": run(SDPBackend.EFFICIENT_ATTENTION)}


FLEX_FAILED: dict[str, str] = {}  # the first decode workload whose flex call raised -> its error


def flex_decode_runner(w: DecodeWorkload, s: Shapes, x: DecodeInputs, device: str):
    """flex in its GQA form; once a call has raised (a compile error costs tens of seconds), later workloads say so
    instead of compiling again."""
    if device != "cuda":
        return "needs a GPU (flex's CPU path compiles C++ for minutes)"
    if FLEX_FAILED:
        (first, error), = FLEX_FAILED.items()
        return f"not run: it raised at {first}: {error}"
    try:
        flex = compiled_flex_attention(dynamic=True)
        q = x.q.transpose(1, 2)  # [B, H, 1, E]
        k = x.cache.unsqueeze(1)
        v = x.cache[..., :s.D].unsqueeze(1)
        return lambda: flex(q, k, v, scale=SCALE, enable_gqa=True)[:, :, 0]
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        return error_text(e)


def flashinfer_runner(w: DecodeWorkload, s: Shapes, x: DecodeInputs):
    """FlashInfer's MLA decode (BatchMLAPagedAttentionWrapper, backend "auto": FA3 on sm_90) on the paged cache."""
    try:
        import flashinfer
    except ImportError as e:
        return (f"flashinfer not installed ({e}): carry flashinfer-python 0.5.0 and its wheels (10 MB; the newest, "
                f"0.7.4, is 101 MB) and install them first: benchmarks/NOTES.md, MLA decode")
    if x.q.device.type != "cuda":
        return "needs a GPU"
    try:
        b = w.B
        per_seq = x.table.shape[1]
        wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(
            torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=x.q.device))
        wrapper.plan(qo_indptr=torch.arange(b + 1, dtype=torch.int32, device=x.q.device),
                     kv_indptr=torch.arange(b + 1, dtype=torch.int32, device=x.q.device) * per_seq,
                     kv_indices=x.table.flatten(), kv_len_arr=x.lengths, num_heads=w.H, head_dim_ckv=s.D,
                     head_dim_kpe=s.DR, page_size=s.page, causal=False, sm_scale=SCALE, q_data_type=x.q.dtype,
                     kv_data_type=x.pool.dtype)
        q = x.q[:, 0]  # [B, H, E]
        return lambda: wrapper.run(q_nope=q[..., :s.D], q_pe=q[..., s.D:], ckv_cache=x.pool[..., :s.D],
                                   kpe_cache=x.pool[..., s.D:])
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        return error_text(e)


def dequantized_inputs(x: DecodeInputs) -> DecodeInputs:
    """The FP8 latent's caches dequantised to the queries' dtype (e4m3 values times FP8_SCALE: exact in bf16), for
    the spec without FP8."""
    def dequantized(t):
        return (t.float() * FP8_SCALE).to(x.q.dtype)

    return replace(x, cache=dequantized(x.cache), pool=dequantized(x.pool), k_scale=None)


def run_decode(w: DecodeWorkload, s: Shapes, device: str, triton_kernel: bool = False,
               quantize_q: bool = False, persistent: bool = False, converters: tuple[int, ...] = (),
               f16_values: bool = False, splits: tuple[int, ...] = (), sum_runs: tuple[int, ...] = ()) -> dict:
    x = decode_inputs(w, s, device)
    row = {"workload": w.name, "kind": "decode", **asdict(w), "D": s.D, "DR": s.DR, "page": s.page,
           "dtype": s.spec_dtype, "fp8": s.fp8, "bytes": w.bytes_read(s), "flops": w.flops(s), "results": {}}
    target = TARGETS.get((w.H, w.B, w.N))
    if target:
        row["target"] = {"value": target[0], "unit": target[1]}
    want = decode_reference(x, s.D)
    made = decode_runners(w, s, x, device, triton_kernel, persistent)
    if quantize_q:  # bf16 and FP8 + quantised queries beside the FP8 columns
        made.update(attnc_runners(replace(s, fp8=False), dequantized_inputs(x), name="attnc-bf16"))
    for n in splits:  # the split-KV rule's alternatives, each a fixed count
        made.update(attnc_runners(s, x, PlanOptions(num_splits=n), f"attnc-x{n}"))
    measure(made, want, device, row)
    if quantize_q:  # checked within a third of the quantisation's own effect: a kernel that ignored it fails
        want_q8 = decode_reference(x, s.D, True)
        q8_tol = min(CHECK_TOL, rel_err(want, want_q8) / 3)
        measure(attnc_runners(replace(s, quantize_q=True), x, name="attnc-q8"), want_q8, device, row, tol=q8_tol)
    for n in sum_runs:  # the fp8 QK^T's products in float32 every n (0: one accumulator) beside the default's 0
        measure(attnc_runners(replace(s, quantize_q=True), x, PlanOptions(fp8_float32_sum_every=n), f"attnc-q8-sum{n}"),
                want_q8, device, row, tol=q8_tol)
    for n in converters:  # the conflict-free converter's variants side by side, each checked as its default column
        options = PlanOptions(gluon=True, fp8_conflict_free_converter=True, fp8_converter_warpgroups=n)
        measure(attnc_runners(s, x, options, f"attnc-c{n}"), want, device, row)
        for f16 in (False, True)[:(1 + f16_values) * quantize_q]:
            options = PlanOptions(gluon=True, fp8_conflict_free_converter=True, fp8_converter_warpgroups=n,
                                  fp8_f16_values=f16)
            measure(attnc_runners(replace(s, quantize_q=True), x, options, f"attnc-q8{'-f16' if f16 else ''}-c{n}"),
                    want_q8, device, row, tol=q8_tol)
    flex = row["results"].get("flex", {})  # no peers for the FP8 latent
    if "error" in flex and "rel_err" not in flex and not flex["error"].startswith("not run") and device == "cuda":
        FLEX_FAILED[w.name] = flex["error"]
    return row


# ---------------------------------------------------------------- prefill


@dataclass(frozen=True)
class PrefillWorkload:
    B: int
    H: int
    S: int
    D: int
    DV: int

    @property
    def name(self) -> str:
        form = "mla" if self.D != self.DV else "dense"
        return f"prefill {form} D={self.D}/{self.DV} H={self.H} B={self.B} S={self.S}"

    @property
    def flops(self) -> float:
        return 2.0 * self.B * self.H * self.S * (self.S + 1) / 2 * (self.D + self.DV)  # causal: kept pairs only


def prefill_workloads(quick: bool) -> list[PrefillWorkload]:
    seqs = (4096,) if quick else (4096, 8192)
    return [PrefillWorkload(1, 128, s, d, dv) for s in seqs for d, dv in ((192, 128), (128, 128))]


SMOKE_PREFILL = (PrefillWorkload(1, 2, 40, 24, 16), PrefillWorkload(1, 2, 40, 16, 16))


def prefill_spec(w: PrefillWorkload, s: Shapes) -> attnc.Attention:
    """examples/specs/mla_dv.attn at these dims (its score is qk * rsqrt(D): 1 / sqrt(192) for MLA)."""
    return attnc.parse(f"""attention prefill_{w.D}_{w.DV} {{
    dims D = {w.D}, DV = {w.DV}
    q: {s.spec_dtype}[B, H, M, D]  k: {s.spec_dtype}[B, H, N, D]  v: {s.spec_dtype}[B, H, N, DV]
    mask causal
    return softmax(score) @ v
}}""", filename="bench_mla.py")[0]


def prefill_reference(q, k, v) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v in float32 (no TF32), a few heads at a time."""
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    chunk = max(1, (1 << 27) // (n * n))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for bi in range(b):
            for h0 in range(0, h, chunk):
                sl = slice(h0, h0 + chunk)
                scores = (q[bi, sl].float() @ k[bi, sl].float().transpose(-1, -2)) * d ** -0.5
                out[bi, sl] = torch.softmax(scores.masked_fill(~keep, -math.inf), -1) @ v[bi, sl].float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def run_prefill(w: PrefillWorkload, s: Shapes, device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(w.S * 31 + w.D)
    q, k = (torch.randn(w.B, w.H, w.S, w.D, device=device, dtype=s.dtype, generator=gen) for _ in range(2))
    v = torch.randn(w.B, w.H, w.S, w.DV, device=device, dtype=s.dtype, generator=gen)
    row = {"workload": w.name, "kind": "prefill", **asdict(w), "flops": w.flops, "results": {}}
    kern = attnc.compile(prefill_spec(w, s), backend="triton")
    made: dict = {"attnc": lambda: kern(q, k, v)}

    def sdpa(backend):
        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return call

    backends = ("MATH",) if device == "cpu" else ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
    for name in backends:
        made["sdpa" if name == "MATH" else f"sdpa-{name.split('_')[0].lower()}"] = sdpa(getattr(SDPBackend, name))
    made["flex"] = flex_prefill_runner(w, q, k, v, device)
    measure(made, prefill_reference(q, k, v), device, row)
    return row


def flex_prefill_runner(w: PrefillWorkload, q, k, v, device: str):
    if device != "cuda":
        return "needs a GPU (flex's CPU path compiles C++ for minutes)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, w.S, w.S, device=device)
        flex = compiled_flex_attention(dynamic=False)
        return lambda: flex(q, k, v, block_mask=mask)
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        return error_text(e)


# ---------------------------------------------------------------- checking and timing


def timer(device: str):
    """ms per call: do_bench's median on the GPU (sweep_decode.timer); one host-clock call in the interpreter."""
    return sweep_timer(device) if device == "cuda" else functools.partial(host_timer, reps=1)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - want).norm() / want.norm())


def measure(made: dict, want: torch.Tensor, device: str, row: dict, tol: float = CHECK_TOL) -> None:
    """Each runner once against `want` (attnc's with poisoned outputs), then the agreeing ones timed by do_bench
    (do_bench_ms: as called, launch overhead included) and replayed from a CUDA graph (graph_ms: the kernels alone;
    compiled flex spends ~120-240 us of host time a call, more than a decode kernel at B = 64, 1k keys). `ms` is the
    graph's time where the capture worked, else do_bench's; from it: GB/s of row["bytes"] (decode), TFLOP/s of
    row["flops"], and their fractions of the H100's floors."""
    bench, graph_bench = timer(device), graph_timer(device) if device == "cuda" else None
    for name, fn in made.items():
        res = row["results"][name] = {}
        if isinstance(fn, str):
            res["error"] = fn
            continue
        try:
            out = poisoned(fn, device) if name.startswith("attnc") else fn()
            res["rel_err"] = err = rel_err(out, want)
            del out
            if err > tol:
                res["error"] = f"wrong result: rel err {err:.3g} against the float32 formula (tolerance {tol:.3g})"
                continue
            res["do_bench_ms"] = bench(fn)
        except Exception as e:  # noqa: BLE001  (a runner that cannot run this workload is a result)
            res["error"] = error_text(e)
            continue
        if graph_bench is not None:
            try:
                res["graph_ms"] = graph_bench(fn)
            except Exception as e:  # noqa: BLE001  (a runner that cannot be captured keeps do_bench's time)
                res["graph_error"] = error_text(e)
        ms = res["ms"] = res.get("graph_ms", res["do_bench_ms"])
        res["timed_by"] = "cuda graph" if "graph_ms" in res else "do_bench"
        res["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
        if row.get("kind") == "decode":
            res["tokens_s"] = row["B"] / (ms * 1e-3)  # one query token per sequence
        res["flops_fraction"] = res["tflops"] * 1e12 / PEAK_FLOPS
        if "bytes" in row:
            res["gb_s"] = row["bytes"] / (ms * 1e-3) / 1e9
            res["bytes_fraction"] = res["gb_s"] * 1e9 / PEAK_BYTES_S
            res["floor_fraction"] = max(res["bytes_fraction"], res["flops_fraction"])  # of the roofline's time


# ---------------------------------------------------------------- the MLA decode kernel's tiles (--sweep)


@dataclass(frozen=True)
class TileChoice:
    """The decode kernel's tile: rows per program (the heads packed into one latent tile), keys per step, warps,
    stages as the plan counts them (K/V tiles in flight + 1), and the split count (None: the rule's)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int | None = None

    @property
    def name(self) -> str:
        split = "rule" if self.splits is None else self.splits
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} splits={split}"


def tile_choices(smoke: bool) -> list[TileChoice]:
    """The issue's grid (rows 64 / 32 / 16, keys per step 16 / 32 / 64, 8 / 4 warps, 1-5 stages, split counts),
    ranked by benchmarks/compile_mla_sm90.py's sm_90 results so that the budget cuts the least promising: the plan's
    tile first (64x16 w8 s4, no spills in its loops), its neighbours, the split counts at it, then the rest (configs
    that spill still run: the compile-only ranking may be wrong)."""
    if smoke:
        return [TileChoice(16, 16, 4, 1), TileChoice(16, 32, 4, 2, 2)]
    leading = [TileChoice(64, 16, 8, 4), TileChoice(64, 16, 8, 3), TileChoice(64, 16, 8, 5), TileChoice(64, 32, 8, 2),
               TileChoice(64, 32, 8, 3), *(TileChoice(64, 16, 8, 4, sp) for sp in (1, 2, 4, 8)),
               TileChoice(64, 64, 8, 2), TileChoice(32, 32, 8, 2), TileChoice(32, 64, 8, 3), TileChoice(32, 32, 4, 2),
               TileChoice(16, 32, 4, 2), TileChoice(16, 64, 4, 3), TileChoice(64, 32, 8, 2, 2),
               TileChoice(128, 32, 8, 2)]
    rest = [TileChoice(m, n, w, st) for m, n, w, st in itertools.product((64, 32, 16), (16, 32, 64), (8, 4),
                                                                          (4, 3, 2, 1))]
    return leading + [c for c in rest if c not in leading]


def tile_choice(text: str) -> TileChoice:
    """--tiles' spelling of a tile: ROWSxKEYS:wWARPS:sSTAGES, and :xSPLITS to fix the split count."""
    m = re.fullmatch(r"(\d+)x(\d+):w(\d+):s(\d+)(?::x(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWSxKEYS:wWARPS:sSTAGES[:xSPLITS], e.g. 64x64:w8:s3")
    return TileChoice(*(int(g) for g in m.groups()[:4]), None if m.group(5) is None else int(m.group(5)))


SWEEP_WORKLOADS = (DecodeWorkload(64, 8192, 64), DecodeWorkload(64, 8192, 128), DecodeWorkload(768, 8192, 64),
                   DecodeWorkload(128, 2048, 128), DecodeWorkload(64, 1024, 128))


def sweep(args, s: Shapes, device: str, out_dir: Path) -> list[dict]:
    """Every (tile, workload) on the paged cache, config by config (a config's compile serves every workload):
    checked against the float32 formula with poisoned outputs, then timed; one JSON line each, streamed to
    <out>/sweep_mla.jsonl. A launch already timed for a workload (128 rows pack only 64 heads at H = 64) is not
    timed again. No new config starts after --budget seconds."""
    from attnc.backends.triton import serving
    from attnc.dsl.signature import bind
    from attnc.passes.decode import decode_launch

    t0 = time.time()
    spec = mla_spec(s, paged=True)
    d = s.D
    work = [w for w in (SMOKE_DECODE if args.smoke else SWEEP_WORKLOADS)
            if not args.only or re.search(args.only, w.name)]
    prepared = []
    for w in work:
        x = decode_inputs(w, s, device)
        want = decode_reference(x, d)
        kw = dict(qr=x.q[..., d:], kr=x.pool[..., d:], block_table=x.table, kv_len=x.lengths, scale=SCALE,
                  **({} if x.k_scale is None else {"k_scale": x.k_scale}))
        call = SimpleNamespace(q=x.q[..., :d], k=x.pool[..., :d], v=x.pool[..., :d], kwargs=kw)
        prepared.append((w, want, call, bind(spec, call.q, call.k, call.v, kw)))
    log = out_dir / "sweep_mla.jsonl"
    bench = timer(device)
    rows, seen = [], set()
    for choice in args.tiles or tile_choices(args.smoke):
        if time.time() - t0 > args.budget:
            print(f"budget of {args.budget:.0f}s spent", flush=True)
            break
        for w, want, call, bound in prepared:
            row = {"workload": w.name, "config": asdict(choice), "bytes": w.bytes_read(s), "flops": w.flops(s)}
            try:
                kernel = attnc.compile(spec, backend="triton", options=PlanOptions(num_splits=choice.splits))
                plan = kernel.plan(device, d)
                tile = replace(plan.decode.tile, block_m=choice.block_m, block_n=choice.block_n,
                               num_warps=choice.num_warps, num_stages=choice.num_stages)
                plan = replace(plan, decode=replace(plan.decode, tile=tile, dense_max_m=choice.block_m))
                go = decode_launch(plan, bound.sizes, serving.sm_count(bound.q.device))
                c = go.tiles.config
                row["launch"] = {"block_m": c.block_m, "block_n": c.block_n, "num_warps": c.num_warps,
                                 "triton_stages": c.num_stages, "pack": go.tiles.pack, "splits": go.splits,
                                 "programs": go.q_programs * go.splits * go.head_programs}
                key = (w.name, *row["launch"].values())
                if key in seen:
                    continue
                seen.add(key)
                # the first call through bind()'s path, later ones replayed, as a serving call (sweep_decode.py)
                replay = unsplit_call(call, serving.DecodeLauncher(plan), bound, go)
                fn = lambda: replay()[:, 0]  # noqa: E731
                row["rel_err"] = err = rel_err(poisoned(fn, device), want)
                row["ok"] = err <= CHECK_TOL
                if row["ok"]:
                    ms = row["ms"] = bench(fn)
                    row.update(gb_s=row["bytes"] / (ms * 1e-3) / 1e9, tflops=row["flops"] / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=error_text(e, -1, 300))
            rows.append(row)
            log_row(row, log)
    return rows


def sweep_summary(rows: list[dict]) -> dict:
    """Per workload: the best correct config by GB/s, and the plan's default's (config splits None, the first)."""
    summary = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        ok = [r for r in rows if r["workload"] == name and "gb_s" in r]
        best = max(ok, key=lambda r: r["gb_s"]) if ok else None
        summary[name] = {"best": best and {k: best[k] for k in ("config", "launch", "gb_s", "tflops")},
                         "timed": len(ok), "failed": sum(1 for r in rows if r["workload"] == name and not r["ok"])}
    return summary


# ---------------------------------------------------------------- report


DECODE_PEERS = ("attnc", "attnc-paged64", "attnc-paged16", "attnc-triton", "attnc-triton-paged64", "attnc-triton-paged16",
                "attnc-persistent", "attnc-persistent-paged64", "attnc-q8", "attnc-q8-paged64", "attnc-q8-paged16",
                "attnc-bf16", "attnc-bf16-paged64", "attnc-bf16-paged16", "flashinfer", "sdpa-cudnn", "sdpa-efficient",
                "sdpa", "flex")
PREFILL_PEERS = ("attnc", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa", "flex")


def print_row(row: dict) -> None:
    """One finished row at once: each runner's GB/s and TFLOP/s (or its error), and the target where the issue has
    one."""
    cells = []
    for name, r in row["results"].items():
        if "ms" in r:
            rate = f"{r['gb_s']:.0f} GB/s {r['tflops']:.0f} TFLOP/s" if "gb_s" in r else f"{r['tflops']:.0f} TFLOP/s"
            rate += f" {r['tokens_s'] / 1e3:.0f}k tok/s" if "tokens_s" in r else ""
            cells.append(f"{name} {rate}")
        else:
            cells.append(f"{name} error")
    target = row.get("target")
    tail = f"  [target {target['value']} {target['unit']}]" if target else ""
    print(f"{row['workload']}: {', '.join(cells)}{tail}", flush=True)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["env"]
    decode = [r for r in report["rows"] if r["kind"] == "decode"]
    if decode:
        table = Table(title=f"{env['device']} · torch {env['torch']} · triton {env['triton']} · MLA decode "
                            f"(D=512+64, one token): TB/s | TFLOP/s")
        table.add_column("workload")
        peers = [p for p in DECODE_PEERS if any(p in r["results"] for r in decode)]
        peers += list(dict.fromkeys(p for r in decode for p in r["results"] if p not in DECODE_PEERS))  # --converters
        for p in peers:
            table.add_column(p, justify="right")
        for col in ("target", "attnc / target", "best attnc, % of floor", "paged / contiguous"):
            table.add_column(col, justify="right")
        for row in decode:
            res = row["results"]
            cells = [f"{res[p]['gb_s'] / 1e3:.2f} | {res[p]['tflops']:.0f}" if "ms" in res.get(p, {})
                     else ("err" if p in res else "—") for p in peers]
            ours = [res[p] for p in res if p.startswith("attnc") and "ms" in res[p]]
            best = max(ours, key=lambda r: r["gb_s"]) if ours else None
            target = row.get("target")
            if target and best:
                value = best["gb_s"] / 1e3 if target["unit"] == "TB/s" else best["tflops"]
                ratio = f"{value / target['value']:.2f}×"
            else:
                ratio = "—"
            contiguous, paged = res.get("attnc", {}).get("gb_s"), res.get(f"attnc-paged{row['page']}", {}).get("gb_s")
            table.add_row(row["workload"], *cells, f"{target['value']} {target['unit']}" if target else "—", ratio,
                          f"{best['floor_fraction'] * 100:.0f}%" if best else "—",
                          f"{paged / contiguous:.2f}×" if paged and contiguous else "—")
        Console(width=200).print(table)
    prefill = [r for r in report["rows"] if r["kind"] == "prefill"]
    if prefill:
        table = Table(title=f"{env['device']} · MLA prefill (non-absorbed) against dense prefill, causal: TFLOP/s")
        table.add_column("workload")
        peers = [p for p in PREFILL_PEERS if any(p in r["results"] for r in prefill)]
        for p in peers:
            table.add_column(p, justify="right")
        table.add_column("attnc / attnc dense", justify="right")
        dense = {r["S"]: r["results"].get("attnc", {}).get("tflops") for r in prefill if r["D"] == r["DV"]}
        for row in prefill:
            res = row["results"]
            ours, base = res.get("attnc", {}).get("tflops"), dense.get(row["S"])
            table.add_row(row["workload"], *(f"{res[p]['tflops']:.0f}" if "ms" in res.get(p, {})
                                             else ("err" if p in res else "—") for p in peers),
                          f"{ours / base:.2f}×" if ours and base else "—")
        Console(width=200).print(table)
    for row in report["rows"]:
        for p, r in row["results"].items():
            if "error" in r:
                print(f"{row['workload']} / {p}: {r['error']}")


def plot(report: dict, path: Path) -> list[Path]:
    """Decode: GB/s and TFLOP/s against KV length, a panel per (heads, batch); prefill: TFLOP/s per workload. One
    colour per runner in every panel (attnc.bench.runner_colour)."""
    paths = []
    decode = [r for r in report["rows"] if r["kind"] == "decode"]
    device = report["env"]["device"]
    for metric, label in (("gb_s", "GB/s (latent read)"), ("tflops", "TFLOP/s")):
        panels = {}
        for h, b in dict.fromkeys((r["H"], r["B"]) for r in decode):
            rows = [r for r in decode if r["H"] == h and r["B"] == b]
            runners = dict.fromkeys(p for r in rows for p in r["results"])
            panels[f"H={h} B={b}"] = {p: [(r["N"], r["results"][p][metric]) for r in rows
                                          if metric in r["results"].get(p, {})] for p in runners}
        if panels:
            fig = draw_panels(panels, device, f"{device} — MLA decode, {label}", label, "KV length", logx=True)
            paths.append(save_figure(fig, path.parent / f"{path.stem}-decode-{metric.replace('_', '')}.png"))
    prefill = [r for r in report["rows"] if r["kind"] == "prefill"]
    if prefill:
        panels = {}
        for s in dict.fromkeys(r["S"] for r in prefill):
            rows = [r for r in prefill if r["S"] == s]
            runners = dict.fromkeys(p for r in rows for p in r["results"])
            panels[f"causal prefill S={s}"] = {p: [(f"D={r['D']}/{r['DV']}", r["results"][p]["tflops"]) for r in rows
                                                   if "tflops" in r["results"].get(p, {})] for p in runners}
        fig = draw_panels(panels, device, f"{device} — MLA (192/128) vs dense (128) prefill", "TFLOP/s")
        paths.append(save_figure(fig, path.parent / f"{path.stem}-prefill.png"))
    return paths


def smoke_environment() -> dict:
    import datetime as _dt
    import platform

    import triton

    return {"device": "cpu (Triton interpreter)", "torch": torch.__version__, "triton": triton.__version__,
            "attnc": attnc.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def fp8_shapes(s: Shapes) -> Shapes:
    """The FP8-latent variant of the grid (issue 14, part 3)."""
    fp8 = replace(s, fp8=True)
    try:
        mla_spec(fp8, paged=True)
    except attnc.AttncError as e:
        raise SystemExit(f"--fp8: this attnc does not take the FP8 latent: {e}") from None
    return fp8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON file and the PNGs")
    ap.add_argument("--only", default=None, help="regex: run only workloads whose name matches")
    ap.add_argument("--quick", action="store_true", help="B 64 / 768 and KV 1k / 8k only (8 decode rows)")
    ap.add_argument("--prefill", action="store_true", help="also the prefill rows (MLA 192/128 against dense 128)")
    ap.add_argument("--sweep", action="store_true", help="instead: the decode kernel's tile sweep (sweep_mla.jsonl)")
    ap.add_argument("--tiles", nargs="+", type=tile_choice, default=None,
                    help="--sweep: these tiles only, in this order (ROWSxKEYS:wWARPS:sSTAGES[:xSPLITS])")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; no new row (or sweep config) starts after")
    ap.add_argument("--fp8", action="store_true", help="the latent cache in FP8 e4m3")
    ap.add_argument("--quantize-q", action="store_true",
                    help="with --fp8: decode rows also time the spec with `quantize q, qr to f8e4m3` (attnc-q8) and "
                         "the bf16 spec over the dequantised latent (attnc-bf16)")
    ap.add_argument("--converters", type=int, nargs="*", default=[],
                    help="with --fp8: decode rows also time the Gluon kernel with the conflict-free converter "
                         "(PlanOptions.fp8_conflict_free_converter) and these converter warpgroup counts "
                         "(PlanOptions.fp8_converter_warpgroups): attnc-cN columns, with --quantize-q attnc-q8-cN")
    ap.add_argument("--f16-values", action="store_true",
                    help="with --fp8 --quantize-q --converters: also P V in f16 (PlanOptions.fp8_f16_values): "
                         "attnc-q8-f16-cN columns")
    ap.add_argument("--float32-sum-every", type=int, nargs="*", default=[],
                    help="with --fp8 --quantize-q: decode rows also time the Gluon kernel with the fp8 QK^T's products "
                         "added in float32 every N (PlanOptions.fp8_float32_sum_every; 0: one accumulator, the "
                         "hardware's): attnc-q8-sumN columns")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="decode rows also time the default kernel with these split-KV counts "
                         "(PlanOptions.num_splits): attnc-xN and attnc-xN-paged columns, against the rule's")
    ap.add_argument("--smoke", action="store_true", help="CPU with TRITON_INTERPRET=1: tiny f32 shapes")
    ap.add_argument("--triton-kernel", action="store_true",
                    help="decode rows also time the Triton decode kernel beside the default (on sm_90 the Gluon one): "
                         "attnc-triton, attnc-triton-paged columns")
    ap.add_argument("--persistent", action="store_true",
                    help="decode rows also time the Gluon MLA decode kernel on the persistent schedule "
                         "(PlanOptions(mla_persistent=True)): attnc-persistent, attnc-persistent-paged columns")
    args = ap.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise attnc.CallError("--smoke runs in Triton's interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        raise attnc.CallError("bench_mla needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    device = "cpu" if args.smoke else "cuda"
    shapes = SMOKE if args.smoke else GPU
    if args.quantize_q and not args.fp8:
        raise attnc.CallError("--quantize-q: quantised queries run over the FP8 latent; add --fp8")
    if (args.converters or args.f16_values) and not args.fp8:
        raise attnc.CallError("--converters / --f16-values: the FP8 latent's converter; add --fp8")
    if args.float32_sum_every and not args.quantize_q:
        raise attnc.CallError("--float32-sum-every: the fp8 QK^T of quantised queries; add --fp8 --quantize-q")
    if args.f16_values and not (args.quantize_q and args.converters):
        raise attnc.CallError("--f16-values: P V in f16 needs quantised queries; add --quantize-q and --converters")
    if args.fp8:
        shapes = fp8_shapes(shapes)
    env = smoke_environment() if args.smoke else environment(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{env['device']} · torch {env['torch']} · triton {env['triton']} · attnc {env['attnc']} · {env['date']}",
          flush=True)
    if args.sweep:
        rows = sweep(args, shapes, device, out_dir)
        summary = sweep_summary(rows)
        (out_dir / "sweep_mla_summary.json").write_text(json.dumps({"env": env, "summary": summary}, indent=1))
        for name, s in summary.items():
            print(f"{name}: best {json.dumps(s['best'])}; {s['timed']} timed, {s['failed']} failed")
        return 0
    work: list = list(SMOKE_DECODE if args.smoke else decode_workloads(args.quick))
    if args.prefill:
        work += list(SMOKE_PREFILL if args.smoke else prefill_workloads(args.quick))
    report = {"env": env, "check_tol": CHECK_TOL, "floors": {"bytes_s": PEAK_BYTES_S, "flops": PEAK_FLOPS},
              "rows": []}
    work = [w for w in work if not args.only or re.search(args.only, w.name)]
    kinds = dict.fromkeys("decode" if isinstance(w, DecodeWorkload) else "prefill" for w in work)
    path = result_path(out_dir, env, "-".join(("mla", *(["fp8"] if shapes.fp8 else []), *kinds, "")))
    t0 = time.time()
    for w in work:
        if time.time() - t0 > args.budget:
            print(f"budget of {args.budget:.0f}s spent: {w.name} and later rows not run", flush=True)
            report.setdefault("not_run", []).append(w.name)
            continue
        if isinstance(w, DecodeWorkload):
            report["rows"].append(run_decode(w, shapes, device, args.triton_kernel, args.quantize_q, args.persistent,
                                             tuple(args.converters), args.f16_values, tuple(args.splits),
                                             tuple(args.float32_sum_every)))
        else:
            report["rows"].append(run_prefill(w, shapes, device))
        print_row(report["rows"][-1])
        if device == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(report, indent=1))  # after every row: a run cut short keeps what it measured
    path.write_text(json.dumps(report, indent=1))
    print_table(report)
    for png in plot(report, path):
        print(f"wrote {png}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
