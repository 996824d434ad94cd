"""Context parallelism with attnc.distributed: every rank holds a shard of one long sequence.

    torchrun --standalone --nproc-per-node 2 examples/context_parallel.py   (or python3 -m torch.distributed.run ...)

gloo on CPU tensors, NCCL on GPUs (the same code with device="cuda"). Each rank checks its shard of the output
and of the gradients against attnc.reference on the whole sequence.
"""
import os

import torch
import torch.distributed as dist

import attnc
from attnc.distributed import context_parallel

device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank, before NCCL starts
dist.init_process_group("nccl" if device == "cuda" else "gloo")
torch.set_num_threads(1)

spec = attnc.parse("""
attention causal_alibi {
    q: f32[B, H, M, D]
    k: f32[B, H, N, D]
    v: f32[B, H, N, D]
    input slopes: f32[H]
    score = qk * rsqrt(D) - slopes[h] * (i - j)   # i and j are positions in the whole sequence
    mask causal
    return softmax(score) @ v, lse
}""")[0]
cp = context_parallel(spec)  # sharding "auto": zigzag for a causal mask; schedule "auto": ring (K/V as big as q)

B, H, S, D = 1, 2, 40, 16
torch.manual_seed(0)  # every rank makes the same whole tensors here; a model would load only its shard
q, k, v = (torch.randn(B, H, S, D, device=device) for _ in range(3))
slopes = 2.0 ** -torch.arange(1.0, H + 1, device=device)  # input tables are global: every rank passes all of it

q_local, k_local, v_local = (cp.shard(t, dim=2).requires_grad_() for t in (q, k, v))
out, lse = cp(q_local, k_local, v_local, slopes=slopes)  # this rank's rows of out and lse
out.sum().backward()  # gradients of q_local, k_local, v_local: the ring runs in reverse

ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
ref_out, ref_lse = attnc.reference(spec, ref_q, ref_k, ref_v, slopes=slopes)
ref_out.sum().backward()
assert (out.double() - cp.shard(ref_out, dim=2)).abs().max() < 1e-4
assert (lse.double() - cp.shard(ref_lse, dim=2)).abs().max() < 1e-4
for mine, ref in ((q_local, ref_q), (k_local, ref_k), (v_local, ref_v)):
    assert (mine.grad.double() - cp.shard(ref.grad, dim=2)).abs().max() < 1e-4
assert torch.allclose(cp.unshard(out.detach(), dim=2).double(), ref_out, atol=1e-4)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {cp.sharding} shard of {q_local.shape[2]} positions ok")
dist.destroy_process_group()
