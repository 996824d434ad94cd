"""FlexAttention code running on attnc: the `score_mod` / `mask_mod` functions and the call are written
exactly as for torch.nn.attention.flex_attention; only the import changes. A tensor a mod captures
(`rel_bias` below) becomes an input of the kernel and is passed automatically.

Runs anywhere: on a machine without a GPU it uses Triton's interpreter on small shapes.
    python examples/python/flex.py
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import attnc  # noqa: E402
from attnc import create_block_mask, flex_attention  # noqa: E402  (was: from torch.nn.attention.flex_attention)
from attnc.dsl.flex import flex_spec  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, HEADS, KV_HEADS, LENGTH, DIM = (2, 8, 2, 256, 64) if device == "cuda" else (1, 4, 2, 64, 32)
WINDOW = 40
torch.manual_seed(0)
rel_bias = 0.1 * torch.randn(HEADS, LENGTH, device=device)  # a learned bias per head and causal distance


def relative_softcap(score, b, h, q_idx, kv_idx):
    score = 20.0 * torch.tanh(score / 20.0)
    # clamped so that masked-out keys (kv_idx > q_idx) still index inside the table
    return score + rel_bias[h, (q_idx - kv_idx).clamp(min=0)]


def sliding_window_causal(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def main() -> int:
    q = torch.randn(BATCH, HEADS, LENGTH, DIM, device=device)
    k = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, device=device)
    v = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, device=device)
    block_mask = create_block_mask(sliding_window_causal, None, None, LENGTH, LENGTH, device=device)

    out, lse = flex_attention(q, k, v, score_mod=relative_softcap, block_mask=block_mask, enable_gqa=True,
                              return_lse=True)
    spec = flex_spec(q, k, v, relative_softcap, block_mask, enable_gqa=True, return_lse=True)
    print(spec.canonical)
    expected_out, expected_lse = attnc.reference(spec, q, k, v, rel_bias=rel_bias)
    error = max((out.double() - expected_out).abs().max().item(), (lse.double() - expected_lse).abs().max().item())
    print(f"out {tuple(out.shape)}, lse {tuple(lse.shape)} on {device}: max abs error vs attnc.reference = "
          f"{error:.2e}")
    return 0 if error < (1e-4 if device == "cpu" else 2e-3) else 1  # GPU fp32 dots may run in tf32


if __name__ == "__main__":
    sys.exit(main())
