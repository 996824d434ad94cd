"""An attention variant written as a decorated Python function: Gemma-2-style softcapping, ALiBi slopes,
a sliding window and a document mask, with grouped-query heads. attnc traces the function into its IR on
the first call, compiles a kernel and caches it; later calls with the same dtypes reuse it.

Runs anywhere: on a machine without a GPU it uses Triton's interpreter on small shapes.
    python examples/python/decorator.py
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import attnc  # noqa: E402


@attnc.attention
def gemma_alibi_doc(q, k, v, *, slopes: attnc.Tensor, doc: attnc.Tensor, cap: float = 50.0, window: int = 48):
    s = (q @ k) * q.D ** -0.5
    s = cap * attnc.tanh(s / cap) + slopes[q.head] * (k.pos - q.pos)
    same_doc = doc[q.batch, q.pos] == doc[k.batch, k.pos]
    keep = attnc.causal(q, k) & (q.pos - k.pos < window) & same_doc
    return attnc.softmax(s, where=keep) @ v


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, heads, kv_heads, length, dim = (2, 8, 2, 256, 64) if device == "cuda" else (1, 4, 2, 64, 32)
    torch.manual_seed(0)
    q = torch.randn(batch, heads, length, dim, device=device)
    k = torch.randn(batch, kv_heads, length, dim, device=device)
    v = torch.randn(batch, kv_heads, length, dim, device=device)
    slopes = 2.0 ** -torch.arange(1.0, heads + 1, device=device)
    doc = (torch.arange(length, device=device) * 3 // length).int().expand(batch, length)  # 3 packed documents

    out = gemma_alibi_doc(q, k, v, slopes=slopes, doc=doc, cap=30.0)
    print(gemma_alibi_doc.spec.canonical)
    expected = attnc.reference(gemma_alibi_doc.spec, q, k, v, slopes=slopes, doc=doc, cap=30.0)
    error = (out.double() - expected).abs().max().item()
    print(f"out {tuple(out.shape)} {out.dtype} on {device}: max abs error vs attnc.reference = {error:.2e}")
    return 0 if error < (1e-4 if device == "cpu" else 2e-3) else 1  # GPU fp32 dots may run in tf32


if __name__ == "__main__":
    sys.exit(main())
