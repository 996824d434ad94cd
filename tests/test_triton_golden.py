"""Golden files: the generated Triton and Gluon source for a few specs, so a change to a generator shows up as a
diff. After an intended change, rewrite them with `python -m pytest tests/test_triton_golden.py --update-golden`."""
from dataclasses import replace
from pathlib import Path

import pytest

import attnc
from attnc.backends.triton.generate import generate
from attnc.backends.triton.gluon import generate_gluon
from attnc.backends.triton.gluon_backward import generate_gluon_dkdv
from attnc.backends.triton.gluon_decode import generate_gluon_decode
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.grad import plan_backward

GOLDEN = Path(__file__).resolve().parent / "golden"
SPECS = Path(__file__).resolve().parent.parent / "examples" / "specs"
# (golden file, spec file, attention name, target, D): a dense causal prefill on Hopper, a data-dependent mask,
# sinks + GQA + a param window, D = 80 (64 + 16: two dots over D's chunks) in the interpreter, and MLA's D = 192 / DV =
# 128 (128 + 64: a tensor descriptor per chunk) on Hopper, and a tanh soft cap in bf16 on Hopper (tanh.approx.f32).
CASES = [
    ("causal_lm_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128),
    ("document_mask_sm90.py", "document_mask.attn", "document_mask", Target("triton", "cuda", 90), 128),
    ("sinks_sm90.py", "sinks.attn", "sinks", Target("triton", "cuda", 90), 64),
    ("alibi_d80_interpreter.py", "alibi.attn", "alibi", Target("triton", "cpu", None), 80),
    ("mla_prefill_sm90.py", "mla_dv.attn", "mla_prefill", Target("triton", "cuda", 90), 192),
    ("grok_softcap_sm90.py", "softcap.attn", "grok_softcap", Target("triton", "cuda", 90), 128),
]


# The Gluon warpgroup prefill (sm_90, PlanOptions(gluon=True)): a causal prefill with lse (overlapped QK^T and P V),
# a data-dependent mask (every tile masked, narrower key tiles), sinks + GQA + a window at D = 64, and MLA's
# D = 192 / DV = 128 (Q and K in chunks of 128 and 64 columns, QK^T two chained wgmmas; 128-key tiles; DV != D).
GLUON_CASES = [
    ("causal_lm_gluon_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128),
    ("document_mask_gluon_sm90.py", "document_mask.attn", "document_mask", Target("triton", "cuda", 90), 128),
    ("sinks_gluon_sm90.py", "sinks.attn", "sinks", Target("triton", "cuda", 90), 64),
    ("mla_prefill_gluon_sm90.py", "mla_dv.attn", "mla_prefill", Target("triton", "cuda", 90), 192),
]
GLUON = PlanOptions(gluon=True, gluon_persistent=False)  # one program per query tile; the persistent cases below
# Its persistent programs (PlanOptions(gluon_persistent=True)): the causal prefill, a program per SM over the work
# tiles, and MLA's D = 192 / DV = 128 (4-D descriptors per chunk of D, out reshaped to its box).
PERSISTENT_CASES = [
    ("causal_lm_gluon_persistent_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128),
    ("mla_prefill_gluon_persistent_sm90.py", "mla_dv.attn", "mla_prefill", Target("triton", "cuda", 90), 192),
]
PERSISTENT = PlanOptions(gluon=True, gluon_persistent=True)
# Its softmax under P V (PlanOptions(gluon_weights_under_pv=True)): P through two shared buffers per consumer, the wait
# for P V at the step after next; one-tile and persistent programs (the latter's out through Q's buffer then).
UNDER_PV_CASES = [
    ("causal_lm_gluon_under_pv_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions(gluon=True, gluon_persistent=False, gluon_weights_under_pv=True)),
    ("causal_lm_gluon_persistent_under_pv_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions(gluon=True, gluon_persistent=True, gluon_weights_under_pv=True)),
]


# The Gluon MLA decode kernel (sm_90, PlanOptions(gluon=True)) over the paged latent: a producer warp, QK^T once per
# key tile in the score warpgroup, P handed to the value warpgroup; page ids checked and clamped. Over an FP8 latent
# with quantised queries: Q quantised in place, QK^T fp8 x fp8 on the e4m3 ring, the converter for P V's columns.
GLUON_DECODE_CASES = [
    ("mla_paged_gluon_decode_sm90.py", "mla.attn", "mla_paged", Target("triton", "cuda", 90), 512),
    ("fp8_mla_paged_q8_gluon_decode_sm90.py", "fp8_cache.attn", "fp8_mla_paged_q8", Target("triton", "cuda", 90), 512),
]
# Its persistent schedule (PlanOptions(mla_persistent=True)): every partition walks its share's segments, Q reloaded
# at a segment boundary (q_free), cut segments written to their workspace rows.
GLUON_DECODE_PERSISTENT_CASES = [
    ("mla_paged_gluon_decode_persistent_sm90.py", "mla.attn", "mla_paged", Target("triton", "cuda", 90), 512),
]
# ...with the conflict-free converter (8 e4m3 a thread) alone, and with two converter warpgroups (half of each slot's
# chunks each) and P V in f16
FP8_CONVERTER_CASES = [
    ("fp8_mla_paged_q8_cvt8_gluon_decode_sm90.py", "fp8_cache.attn", "fp8_mla_paged_q8", Target("triton", "cuda", 90),
     512, PlanOptions(gluon=True, fp8_conflict_free_converter=True)),
    ("fp8_mla_paged_q8_conv2_f16_gluon_decode_sm90.py", "fp8_cache.attn", "fp8_mla_paged_q8", Target("triton", "cuda", 90),
     512, PlanOptions(gluon=True, fp8_converter_warpgroups=2, fp8_f16_values=True)),
]


# The backward's Gluon dK/dV kernel (sm_90, PlanOptions(gluon_backward=True)): a sliding window with GQA at D = 64
# (a lower key bound: the query tiles' range from both sides), dQ by the dQ kernel.
GLUON_BACKWARD_CASES = [
    ("sliding_window_gluon_dkdv_sm90.py", "sliding_window.attn", "sliding_window", Target("triton", "cuda", 90), 64),
]
GLUON_BACKWARD = PlanOptions(gluon_backward=True)
DS_UNDER_DKDV_CASES = [
    # ...causal at D = 128 at 32 query rows (full and partial query tiles), dQ by the dQ kernel
    ("causal_lm_gluon_dkdv_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions(gluon_backward=True, gluon_backward_block_m=32, gluon_backward_dq_in_dkdv=False)),
    # ...skewed by a tile, P^T and dS^T of the next query tile computed under dV and dK (P^T, dS^T in shared memory)
    ("causal_lm_gluon_dkdv_ds_under_dkdv_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions(gluon_backward=True, gluon_backward_ds_under_dkdv=True)),
    # ...and dQ^T = K^T dS^T beside dV and dK, reduce-added into the float32 dQ by TMA (no dQ kernel)
    ("causal_lm_gluon_dkdv_dq_in_dkdv_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions(gluon_backward=True, gluon_backward_dq_in_dkdv=True, gluon_backward_block_m=32)),
    # the default at D = 128: 64 query rows, dQ = dS K split by columns between the consumers (no dQ kernel)
    ("causal_lm_gluon_dkdv_split_dq_sm90.py", "causal.attn", "causal_lm", Target("triton", "cuda", 90), 128,
     PlanOptions()),
]


def _source(file, name, target, d, kernel: str, options: PlanOptions) -> str:
    """kernel: "template" (the Triton prefill), "gluon" (the Gluon prefill), "gluon_decode" (the MLA decode) or
    "gluon_dkdv" (the backward's Gluon dK/dV kernel)."""
    spec = next(s for s in attnc.parse_file(SPECS / file) if s.name == name)
    if kernel == "gluon_dkdv":
        spec = replace(spec, returns_lse=True)
    plan = plan_kernel(spec, target, d, spec.dim_values.get("DV", d), options)
    if kernel == "gluon_dkdv":
        assert plan_backward(plan).gluon_dkdv is not None, plan_backward(plan).gluon_reason
        return generate_gluon_dkdv(plan)
    if kernel == "gluon":
        assert plan.warpgroups.path == "gluon", plan.warpgroups.reason
        return generate_gluon(plan)
    if kernel == "gluon_decode":
        assert plan.decode.warpgroups.path == "gluon", plan.decode.warpgroups.reason
        return generate_gluon_decode(plan)
    return generate(plan)


@pytest.mark.parametrize("golden, file, name, target, d, kernel, options",
                         [c + ("template", PlanOptions()) for c in CASES] + [c + ("gluon", GLUON) for c in GLUON_CASES]
                         + [c + ("gluon", PERSISTENT) for c in PERSISTENT_CASES]
                         + [c[:5] + ("gluon", c[5]) for c in UNDER_PV_CASES]
                         + [c + ("gluon_decode", GLUON) for c in GLUON_DECODE_CASES]
                         + [c + ("gluon_decode", PlanOptions(gluon=True, mla_persistent=True))
                            for c in GLUON_DECODE_PERSISTENT_CASES]
                         + [c[:5] + ("gluon_decode", c[5]) for c in FP8_CONVERTER_CASES]
                         + [c + ("gluon_dkdv", GLUON_BACKWARD) for c in GLUON_BACKWARD_CASES]
                         + [c[:5] + ("gluon_dkdv", c[5]) for c in DS_UNDER_DKDV_CASES],
                         ids=[c[0] for c in CASES + GLUON_CASES + PERSISTENT_CASES + [c[:5] for c in UNDER_PV_CASES]
                              + GLUON_DECODE_CASES + GLUON_DECODE_PERSISTENT_CASES
                              + [c[:5] for c in FP8_CONVERTER_CASES] + GLUON_BACKWARD_CASES
                              + [c[:5] for c in DS_UNDER_DKDV_CASES]])
def test_generated_source_matches_golden(golden, file, name, target, d, kernel, options, request):
    source = _source(file, name, target, d, kernel, options)
    compile(source, golden, "exec")  # it is valid Python
    path = GOLDEN / golden
    if request.config.getoption("--update-golden"):
        path.write_text(source, encoding="utf-8")
    assert path.exists(), f"no golden file {path}; create it with --update-golden"
    assert source == path.read_text(encoding="utf-8"), f"generated source differs from {path} (--update-golden)"
