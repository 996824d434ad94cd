"""A small GPT whose attention is an attnc variant (tanh softcap + sliding window + grouped-query heads), trained on
a synthetic copy task: each sequence is random tokens followed by the same tokens again, so the second half is
predictable only by attending `HALF` positions back, inside the window.

    python examples/train_gpt.py                                  # CPU, attnc (TVM kernels), 300 steps
    python examples/train_gpt.py --device cuda --compile          # GPU: Triton kernels under torch.compile
    python examples/train_gpt.py --attention torch --steps 30     # the same model with attention in plain torch

`--attention torch` computes the same attention with torch operations (tests/test_train_example.py checks it
against attnc.reference in float64, and the loss curves of the two against each other).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnc

SPEC = """attention gpt_attention {{
    q: {dtype}[B, H, M, D]
    k: {dtype}[B, HKV, N, D]
    v: {dtype}[B, HKV, N, D]
    param window: i32 = 48
    param cap: f32 = 30.0
    score = cap * tanh(qk * rsqrt(D) / cap)
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v
}}"""
VOCAB, SEQ, HALF = 32, 64, 32
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def torch_attention(q, k, v, window: int, cap: float):
    """The spec's math in torch operations: the independent implementation the attnc model is compared with."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    m, n = q.shape[2], k.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = cap * torch.tanh(s / cap)
    i = torch.arange(m, device=q.device).view(-1, 1) + (n - m)
    j = torch.arange(n, device=q.device).view(1, -1)
    s = s.masked_fill(~((i >= j) & (i - j < window)), -math.inf)
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, attention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.attention = attention

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        y = self.attention(q, k, v, window=48, cap=30.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, attention, width: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, kv_heads, attention) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(generator: torch.Generator, size: int, device) -> torch.Tensor:
    first = torch.randint(0, VOCAB, (size, HALF), generator=generator)
    return torch.cat([first, first], 1).to(device)


def attention_fn(kind: str, dtype: str, backend: str | None = None):
    if kind == "torch":
        return torch_attention
    return attnc.compile(attnc.parse(SPEC.format(dtype=dtype))[0], backend=backend)


def train(steps: int, attention: str = "attnc", device: str = "cpu", dtype: str = "f32", compile: bool = False,
          batch_size: int = 16, seed: int = 0, log_every: int = 0, backend: str | None = None) -> list[float]:
    """The loss of every step; the model and the data depend only on `seed`. `backend` goes to attnc.compile."""
    torch.manual_seed(seed)
    model = GPT(attention_fn(attention, dtype, backend)).to(device=device, dtype=DTYPES[dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_fn = model
    if compile:
        step_fn = torch.compile(model, fullgraph=True)
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        tokens = batch(data, batch_size, device)
        logits = step_fn(tokens[:, :-1])
        # only the copied half is predictable: the loss counts it
        loss = F.cross_entropy(logits[:, HALF - 1:].float().reshape(-1, VOCAB), tokens[:, HALF:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: f32 on CPU, bf16 on CUDA")
    ap.add_argument("--attention", default="attnc", choices=["attnc", "torch"])
    ap.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    args = ap.parse_args()
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "f32")
    losses = train(args.steps, args.attention, args.device, dtype, args.compile, log_every=max(args.steps // 10, 1))
    print(f"final loss {losses[-1]:.4f} (chance: {math.log(VOCAB):.4f})")


if __name__ == "__main__":
    main()
