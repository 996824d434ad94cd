"""The MLA decode rows whose limits issue 14's misses ask about, three launches each of the default kernel for
ncu (which profiles them; `-k regex:attn_decode` keeps the kernels): 64 heads, B = 768, KV 1k with the bf16 latent,
and KV 8k with the bf16 latent, the FP8 latent, and the FP8 latent with quantised queries.

    ncu --clock-control none -k regex:attn_decode --launch-skip 2 --launch-count 1 ... python3 benchmarks/mla_ncu.py 0
    (the argument picks the row: 0 bf16 1k, 1 bf16 8k, 2 fp8 8k, 3 fp8 + quantize 8k)"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import bench_mla

ROWS = [(1024, False, False), (8192, False, False), (8192, True, False), (8192, True, True)]
n, fp8, quantize_q = ROWS[int(sys.argv[1])]
s = replace(bench_mla.fp8_shapes(bench_mla.GPU), quantize_q=quantize_q) if fp8 else bench_mla.GPU
w = bench_mla.DecodeWorkload(768, n, 64)
x = bench_mla.decode_inputs(w, s, "cuda")
run = bench_mla.attnc_runners(s, x)["attnc"]
for _ in range(3):
    run()
torch.cuda.synchronize()
print(w.name, "fp8" if fp8 else "bf16", "quantised queries" if quantize_q else "")
