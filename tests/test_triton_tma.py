"""The Hopper paths of the generated kernel, run in Triton's interpreter: K/V through tensor descriptors (with
the pointer fallback for layouts TMA cannot take) and the warp-specialized loop; and the emitter keeping
position arithmetic in int32 only where it provably fits."""
import math
import types

import pytest
import torch

import attnc
from attnc.backends.triton.generate import generate
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.backends.triton.launch import descriptor_ready
from inline_ptx import INLINE_EX2, interpretable

HOPPER = Target("triton", "cuda", 90)
SPEC = """attention t {
  q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
  param window: i32 = 40
  score = qk * rsqrt(D) + 0.01 * (j - i)
  mask i >= j
  mask i - j < window
  return softmax(score) @ v, lse
}"""




def hopper_module(spec, d, ws, dv=None):
    """The sm_90 source with descriptors on, loaded without a GPU (the interpreter needs no TMA scratch)."""
    plan = plan_kernel(spec, HOPPER, d, dv or d, PlanOptions(block_m=32, block_n=16, tma=True, warp_specialize=ws))
    assert plan.triton.tma and plan.triton.warp_specialize == ws
    # the interpreter has no descriptor scratch allocator and runs no inline assembly
    source = interpretable(generate(plan).replace("scratch.install()", ""))
    module = types.ModuleType("hopper_kernel")
    exec(compile(source, "hopper_kernel.py", "exec"), module.__dict__)
    return module


# D = 48 and 192 are two chunks each (32 + 16, 128 + 64): a descriptor per chunk, at the chunk's first column; 40 is
# one chunk padded to 64 (descriptors pad with zeros). N % BLOCK_N != 0 throughout.
@pytest.mark.parametrize("d, dv", [(48, 48), (40, 40), (192, 128)])
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("kv_layout", ["contiguous", "transposed"])  # transposed: s_kd != 1, pointer fallback
def test_descriptor_path_matches_reference(d, dv, ws, kv_layout):
    spec = attnc.parse(SPEC.replace("v: f32[B, HKV, N, D]", "v: f32[B, HKV, N, DV]"))[0]
    B, H, HKV, M, N, D = 2, 4, 2, 45, 70, d
    module = hopper_module(spec, D, ws, dv)
    assert ("D_CHUNK_1" in module.__dict__) == (d != 40)
    q = torch.randn(B, H, M, D)
    k, v = torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, dv)
    if kv_layout == "transposed":
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
    # the launcher's choice: descriptors for contiguous K/V, the pointer loops for a strided head dim
    tma = descriptor_ready(k, spec.k) and descriptor_ready(v, spec.v)
    assert tma == (kv_layout == "contiguous")
    out = torch.full((B, H, M, dv), math.nan)
    lse = torch.full((B, H, M), math.nan)
    module.attn_fwd[(-(-M // 32), B * H)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        B, H, HKV, M, N, 40, BLOCK_M=32, BLOCK_N=16, BLOCK_MQ=32, PACK=1, UPCAST=False, TMA=tma)
    want_out, want_lse = attnc.reference(spec, q, k, v, window=40)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert float((out.double() - want_out).abs().max()) < 2e-5
    assert float((lse.double() - want_lse).abs().max()) < 2e-5


def test_position_arithmetic_stays_int32_only_when_it_fits():
    spec = attnc.parse(SPEC)[0]
    source = generate(plan_kernel(spec, HOPPER, 64, 64))
    # ALiBi's j - i is a difference of two positions: int32 tile math, converted straight to float
    assert "j_col[None, :] - i_row[:, None]" in source
    # i - window mixes a position with an i32 param of any value: computed in int64 (row level, once)
    assert "i_row.to(tl.int64) - tl.cast(p_window, tl.int64)" in source
    # the key bounds are clamped to [0, N] and then int32
    assert "exact_lo = tl.minimum(exact_lo, sz_N).to(tl.int32)" in source


def test_descriptor_ready_follows_tma_rules():
    spec = attnc.parse(SPEC)[0]
    k = torch.randn(2, 3, 40, 16)  # f32: rows of 64 bytes
    assert descriptor_ready(k, spec.k)
    assert not descriptor_ready(k.transpose(2, 3).contiguous().transpose(2, 3), spec.k)  # head dim not unit-stride
    assert not descriptor_ready(torch.randn(2, 3, 40, 17)[..., :16], spec.k)  # rows 68 bytes apart
    assert not descriptor_ready(torch.randn(2 * 3 * 40 * 16 + 1)[1:].view(2, 3, 40, 16), spec.k)  # base off by 4
    assert descriptor_ready(torch.randn(1, 1, 40, 16), spec.k)
    # a size-1 batch or head dim may have any stride: it never moves the base
    assert descriptor_ready(torch.randn(40 * 16).as_strided((1, 1, 40, 16), (7, 5, 16, 1)), spec.k)


@pytest.mark.parametrize("tma, ws", [(False, False), (True, False), (True, True)])
def test_each_specialization_holds_only_the_loops_it_runs(tma, ws):
    """The K/V path is a constexpr, so a kernel holds only the loops its layout runs. A path is one key loop with
    the mask under a per-tile branch (compile time), except the warp-specialized descriptor path: a loop per tile
    class, so the specialized loop holds no mask (its steady-state speed)."""
    def loops(spec):
        source = generate(plan_kernel(spec, HOPPER, 64, 64, PlanOptions(tma=tma, warp_specialize=ws)))
        assert ("if TMA:" in source) == tma and "tma_ok" not in source
        assert ("warp_specialize=True" in source) == ws
        return source.count("for t in tl.range("), source

    # causal + window: a lower key bound, so partial tiles before and after the full ones
    count, source = loops(attnc.parse(SPEC)[0])
    assert count == {(False, False): 1, (True, False): 2, (True, True): 4}[(tma, ws)]
    assert "if (t < f_start) | (t >= f_end):  # a partial tile" in source
    # causal: no lower bound, the full tiles start at 0
    count, source = loops(attnc.parse(SPEC.replace("  mask i - j < window\n", ""))[0])
    assert count == {(False, False): 1, (True, False): 2, (True, True): 3}[(tma, ws)]
    assert "if t >= f_end:  # a partial tile" in source and "t < f_start" not in source


def test_gpu_kernels_take_exp2_as_inline_ptx():
    """On a GPU every exp2 of the prefill kernel (softmax, tanh, exp2 in the score) is the one-instruction helper,
    so Triton links no libdevice for it; the interpreter, which runs no inline assembly, keeps tl.exp2."""
    spec = attnc.parse(SPEC.replace("0.01 * (j - i)", "tanh(qk / 30.0) + exp2(0.01 * (j - i))"))[0]
    source = generate(plan_kernel(spec, HOPPER, 64, 64))
    assert "tl.exp2(" not in source and INLINE_EX2 in source
    assert source.count("ex2_approx(") == 1 + 4  # the helper's def; tanh, exp2, p and alpha in the key loop
    interpreted = generate(plan_kernel(spec, Target("triton", "cpu", None), 64, 64))
    assert "inline_asm" not in interpreted and "ex2_approx" not in interpreted and "tl.exp2(" in interpreted



def test_gpu_divisions_multiply_by_the_one_instruction_reciprocal():
    """On a GPU a formula's division (tanh's 2 / (e + 1)) multiplies by rcp_approx, and out divides by the row's
    total weight through one rcp_approx a row; the interpreter keeps `/`."""
    spec = attnc.parse(SPEC.replace("0.01 * (j - i)", "tanh(qk / 30.0)"))[0]
    source = generate(plan_kernel(spec, HOPPER, 64, 64))
    # the def, tanh in the key loop, out's
    assert "rcp.approx.ftz.f32" in source and source.count("rcp_approx(") == 1 + 1 + 1
    assert " / " not in source.split("for t in tl.range(")[1]  # no division in the key loop or out
    assert "out = acc * rcp_approx(l_safe)[:, None]" in source
    interpreted = generate(plan_kernel(spec, Target("triton", "cpu", None), 64, 64))
    assert "rcp_approx" not in interpreted and "2.0 / (" in interpreted and "out = acc / l_safe[:, None]" in interpreted
    plain = generate(plan_kernel(attnc.parse(SPEC)[0], HOPPER, 64, 64))
    assert plain.count("rcp_approx(") == 1 + 1  # the def, out's

def test_a_constant_logit_scale_folds_into_the_exponent():
    """Logits qk * c (c a positive literal): s stays qk, the tile's max is scaled, and the exponent is s * c - m (one
    FFMA an element on a GPU); a score with a bias, or the sigmoid normalizer, keeps s scaled."""
    plain = SPEC.replace("score = qk * rsqrt(D) + 0.01 * (j - i)", "score = qk * rsqrt(D)")
    c = repr(1.4426950408889634 / 8)  # log2(e) / sqrt(64)
    source = generate(plan_kernel(attnc.parse(plain)[0], HOPPER, 64, 64))
    loop = source.split("for t in tl.range(")[1]
    assert "s = qk\n" in loop and f"tl.max(s, 1) * {c})" in loop and f"ex2_approx(s * {c} - m_safe[:, None])" in loop
    biased = generate(plan_kernel(attnc.parse(SPEC)[0], HOPPER, 64, 64))
    assert "m_new = tl.maximum(m_i, tl.max(s, 1))" in biased and "ex2_approx(s - m_safe[:, None])" in biased
    sigmoid = generate(plan_kernel(attnc.parse(plain.replace("softmax(score)", "sigmoid(score)"))[0], HOPPER, 64, 64))
    assert "s = qk\n" not in sigmoid.split("for t in tl.range(")[1]


@pytest.mark.gpu
def test_descriptor_scratch_is_one_buffer_per_stream_gpu():
    """Launches on one stream run in order and share one scratch buffer (grown on demand); another stream gets
    its own, so kernels running concurrently never share descriptor scratch."""
    from attnc.backends.triton import scratch

    stream = torch.cuda.current_stream().cuda_stream
    first = scratch.scratch(1024, 128, stream)
    assert scratch.scratch(512, 128, stream).data_ptr() == first.data_ptr()
    grown = scratch.scratch(1 << 20, 128, stream)
    assert grown.numel() >= 1 << 20 and scratch.scratch(1024, 128, stream).data_ptr() == grown.data_ptr()
    other = torch.cuda.Stream()
    assert scratch.scratch(1024, 128, other.cuda_stream).data_ptr() != grown.data_ptr()
