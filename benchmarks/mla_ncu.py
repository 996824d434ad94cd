"""The MLA decode rows whose limits issue 14's misses ask about, three launches each of the default kernel for ncu
(which profiles the third: `-k regex:attn_decode --launch-skip 2 --launch-count 1`). The argument picks the row:

    0  64 heads, B = 768, KV 1k, bf16 latent          4  128 heads, B = 768, KV 1k, bf16 latent
    1  64 heads, B = 768, KV 8k, bf16 latent          5  64 heads, B = 64, KV 1k, bf16 latent, contiguous
    2  64 heads, B = 768, KV 8k, FP8 latent           6  the same, paged (pages of 64)
    3  the same, queries quantised too

    ncu --clock-control none -k regex:attn_decode --launch-skip 2 --launch-count 1 ... python3 benchmarks/mla_ncu.py 0"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import bench_mla

# (heads, batch, keys, FP8 latent, quantised queries, paged)
ROWS = [(64, 768, 1024, False, False, False), (64, 768, 8192, False, False, False),
        (64, 768, 8192, True, False, False), (64, 768, 8192, True, True, False),
        (128, 768, 1024, False, False, False), (64, 64, 1024, False, False, False), (64, 64, 1024, False, False, True)]
h, b, n, fp8, quantize_q, paged = ROWS[int(sys.argv[1])]
s = replace(bench_mla.fp8_shapes(bench_mla.GPU), quantize_q=quantize_q) if fp8 else bench_mla.GPU
w = bench_mla.DecodeWorkload(b, n, h)
x = bench_mla.decode_inputs(w, s, "cuda")
run = bench_mla.attnc_runners(s, x)[f"attnc-paged{s.page}" if paged else "attnc"]
for _ in range(3):
    run()
torch.cuda.synchronize()
print(w.name, "fp8" if fp8 else "bf16", "quantised queries" if quantize_q else "", "paged" if paged else "")
