"""A compile-only probe of FlashMLA's FP8 form, which attnc does not generate: the queries quantized per row to e4m3
(scale max|q row| / 448), QK^T (and qr @ kr) as an fp8 x fp8 wgmma straight on the staged e4m3 tile, times the row's
scale; only PV converts the latent tile to bf16. It patches the FP8 decode source (bench_mla.py --fp8's spec) and
compiles it for sm_90 through compile_mla_sm90.py, with that script's arguments, e.g.

    PYTHONPATH=$PWD /tmp/venv36/bin/python benchmarks/compile_mla_fp8_qk_sm90.py --out /tmp/fp8qk --fp8 \
        --storage paged --rows 64 --block-n 64 --warps 8 --stages 3

The numbers are not attnc's semantics (the reference does not quantize q): benchmarks/NOTES.md compares its SASS with
the shipped FP8 and bf16 kernels' to decide whether the form is worth a spec statement."""
import re
import runpy
import sys
from pathlib import Path

import attnc.backends.triton.decode as decode

QUANTIZE = """    q_amax = tl.max(tl.abs(q_tile.to(tl.float32)), 1)
    q_rs = tl.where(q_amax > 0, q_amax / 448.0, 1.0)
    q8 = (q_tile.to(tl.float32) / q_rs[:, None]).to(tl.float8e4nv)
    qd_amax = tl.max(tl.abs(qdot1_tile.to(tl.float32)), 1)
    qd_rs = tl.where(qd_amax > 0, qd_amax / 448.0, 1.0)
    qd8 = (qdot1_tile.to(tl.float32) / qd_rs[:, None]).to(tl.float8e4nv)
"""
shipped = decode.generate_decode


def fp8_qk(plan) -> str:
    src = shipped(plan).replace("    kdot1_base = t_kr\n", QUANTIZE + "    kdot1_base = t_kr\n", 1)
    src = re.sub(r"k_tile = upcast_fp8\(k_tile, q_tile.dtype\).*\n\s+qk = tl.dot\(q_tile, k_tile\)",
                 "qk = tl.dot(q8, k_tile) * q_rs[:, None]", src)
    src = re.sub(r"kdot1_tile = upcast_fp8\(kdot1_tile, qdot1_tile.dtype\)\n\s+qk_1 = tl.dot\(qdot1_tile, kdot1_tile\)",
                 "qk_1 = tl.dot(qd8, kdot1_tile) * qd_rs[:, None]", src)
    src = src.replace("v_tile = tl.trans(k_tile)", "v_tile = tl.trans(upcast_fp8(k_tile, q_tile.dtype))")
    if src.count("tl.dot(q8, k_tile)") != 3 or src.count("tl.dot(qd8, kdot1_tile)") != 3:
        raise SystemExit("the FP8 MLA decode source changed: this probe's patterns no longer match it")
    return src


if __name__ == "__main__":
    decode.generate_decode = fp8_qk  # serving.py imports it at each build
    sys.argv[0] = str(Path(__file__).with_name("compile_mla_sm90.py"))
    runpy.run_path(sys.argv[0], run_name="__main__")
