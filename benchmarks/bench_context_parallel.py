"""Context parallelism on ONE GPU: the ring's compute/transfer overlap, with ranks simulated by streams.

Not run yet (written on a CPU machine; run it in the next session with a GPU):

    python3 benchmarks/bench_context_parallel.py                      # causal, 32q/8kv heads, D=128, bf16
    python3 benchmarks/bench_context_parallel.py --seq 65536 --ranks 8 --link h2d

Two measurements:
1. world size 1: attnc.distributed over a one-rank NCCL group against the plain kernel on the same sequence
   (the cost of the shard spec, the zigzag pairs and the merges when nothing travels).
2. W simulated ranks on one GPU: rank 0's ring schedule, step by step: the shard pairs of step s run on the
   compute stream while the next K/V shard is copied on a second stream (device-to-device, or host-to-device
   from pinned memory with --link h2d, closer to a link slower than HBM), as the ring posts it before computing.
   Reported: compute alone, transfer alone, both overlapped, and the overlap
   (compute + transfer - overlapped) / min(compute, transfer): 1.0 means the transfer hid completely.
Times are medians over --reps CUDA-event timings after a warm-up; name the card with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist

import attnc
from attnc.distributed import context_parallel

SPEC = """
attention cp_bench {{
    q: {dtype}[B, H, M, D]
    k: {dtype}[B, HKV, N, D]
    v: {dtype}[B, HKV, N, D]
    param window: i32 = 4096
    {mask}
    return softmax(score) @ v, lse
}}"""
MASKS = {"causal": "mask causal", "window": "mask causal and i + (N - M) - j < window", "dense": ""}


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps, by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--mask", choices=sorted(MASKS), default="causal")
    ap.add_argument("--ranks", type=int, default=4, help="simulated ranks (streams) for the overlap measurement")
    ap.add_argument("--link", choices=("d2d", "h2d"), default="d2d")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    spec = attnc.parse(SPEC.format(dtype="bf16", mask=MASKS[args.mask]))[0]
    kernel = attnc.compile(spec)
    b, h, hkv, s, d = 1, args.heads, args.kv_heads, args.seq, args.dim
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    window = {"window": 4096} if args.mask == "window" else {}
    results = {"device": torch.cuda.get_device_name(), "args": vars(args)}

    # 1. world size 1: the whole attnc.distributed path against the plain kernel
    plain = timed(lambda: kernel(q, k, v, **window), args.reps)
    for schedule in ("ring", "allgather"):
        cp = context_parallel(kernel, schedule=schedule)
        results[f"world1_{schedule}_ms"] = timed(lambda: cp(q, k, v, **window), args.reps)
    results["plain_ms"] = plain

    # 2. rank 0 of a simulated ring of W ranks (zigzag shards), the transfer on a second stream
    world = args.ranks
    cp = context_parallel(kernel, schedule="ring", sharding="zigzag")
    from attnc.distributed.sharding import segments, shard_sequence

    shards = [tuple(shard_sequence(t, 2, r, world, "zigzag") for t in (q, k, v)) for r in range(world)]
    layout = segments("zigzag", [sh[0].shape[2] for sh in shards])
    names = cp.names
    fixed = {**window, names.m: s, names.n: s}

    def pairs(step: int):
        owner = (0 - step) % world
        for (q0, m), q_off in zip(layout[0], (0, layout[0][0][1])):
            for (k0, n), k_off in zip(layout[owner], (0, layout[owner][0][1])):
                if not cp.skipper.empty({"M": s, "N": s, "B": b, "H": h, "HKV": hkv, "D": d, "DV": d, **window},
                                        q0, q0 + m, k0, k0 + n):
                    yield (shards[0][0].narrow(2, q_off, m), shards[owner][1].narrow(2, k_off, n),
                           shards[owner][2].narrow(2, k_off, n), {**fixed, names.q0: q0, names.k0: k0})

    def compute():
        for step in range(world):
            for qs, ks, vs, kw in pairs(step):
                cp.kernel(qs, ks, vs, **kw)

    host = args.link == "h2d"
    sources = [tuple((t.cpu().pin_memory() if host else t.clone()) for t in sh[1:]) for sh in shards]
    targets = [tuple(torch.empty_like(t, device="cuda") for t in sh[1:]) for sh in shards]
    comm = torch.cuda.Stream()

    def transfer_all():
        for step in range(world - 1):
            for src, dst in zip(sources[(0 - step - 1) % world], targets[(0 - step - 1) % world]):
                dst.copy_(src, non_blocking=True)

    def overlapped():
        main = torch.cuda.current_stream()
        for step in range(world):
            done = None
            if step < world - 1:  # post the next shard's copy before computing on this one
                comm.wait_stream(main)
                with torch.cuda.stream(comm):
                    for src, dst in zip(sources[(0 - step - 1) % world], targets[(0 - step - 1) % world]):
                        dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(comm)
            for qs, ks, vs, kw in pairs(step):
                cp.kernel(qs, ks, vs, **kw)
            if done is not None:
                main.wait_event(done)

    t_compute = timed(compute, args.reps)
    t_transfer = timed(transfer_all, args.reps)
    t_both = timed(overlapped, args.reps)
    results.update(ranks=world, compute_ms=t_compute, transfer_ms=t_transfer, overlapped_ms=t_both,
                   overlap=(t_compute + t_transfer - t_both) / max(min(t_compute, t_transfer), 1e-9))
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()
    with contextlib.suppress(FileNotFoundError):  # the file store removes its file when the group ends
        os.unlink(store)


if __name__ == "__main__":
    main()
