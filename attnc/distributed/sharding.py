"""How a sequence is cut across the ranks of a group, and helpers that shard and unshard a tensor.

contiguous: rank r holds one run of the sequence; the runs follow rank order and may differ in length (any split
    works: each rank passes what it holds, the group exchanges the lengths).
zigzag: the sequence is cut into 2W chunks (the first L % 2W one element longer) and rank r holds chunks r and
    2W - 1 - r, in that order, as one tensor. Under a causal or sliding-window mask every rank then gets the same
    amount of work: an early chunk (few keys to its left) pairs with a late one (many). It is the head-tail
    layout of torch.distributed.tensor.experimental.context_parallel, so buffers it shards fit here too.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import CallError

SHARDINGS = ("contiguous", "zigzag")
Segment = tuple[int, int]  # (global start, length) of one run a rank holds, in the order its tensor holds them


def zigzag_chunks(length: int, world: int) -> list[Segment]:
    """The 2W chunks of a sequence of `length`, as (start, length)."""
    n = 2 * world
    sizes = [length // n + (c < length % n) for c in range(n)]
    starts = [sum(sizes[:c]) for c in range(n)]
    return list(zip(starts, sizes))


def segments(sharding: str, lengths: Sequence[int]) -> list[list[Segment]]:
    """Every rank's segments, given every rank's local length (contiguous) or the zigzag layout's local lengths
    (checked against the global length they add up to)."""
    world = len(lengths)
    if sharding == "contiguous":
        starts = [sum(lengths[:r]) for r in range(world)]
        return [[(starts[r], lengths[r])] for r in range(world)]
    chunks = zigzag_chunks(sum(lengths), world)
    layout = [[chunks[r], chunks[2 * world - 1 - r]] for r in range(world)]
    for r, (a, b) in enumerate(layout):
        if a[1] + b[1] != lengths[r]:
            raise CallError(f"q: rank {r} holds {lengths[r]} positions, but a zigzag shard of a {sum(lengths)}-long "
                            f"sequence over {world} ranks holds {a[1] + b[1]} (chunks {r} and {2 * world - 1 - r} "
                            f"of {2 * world}); cut the sequence with attnc.distributed.shard_sequence")
    return layout


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world: int, sharding: str = "zigzag") -> torch.Tensor:
    """Rank `rank`'s shard of the whole sequence `x` (its positions along `dim`), contiguous in memory. A
    contiguous split gives the first L % W ranks one more position."""
    _check_sharding(sharding)
    length = x.shape[dim]
    if sharding == "contiguous":
        sizes = [length // world + (r < length % world) for r in range(world)]
        parts = [(sum(sizes[:rank]), sizes[rank])]
    else:
        chunks = zigzag_chunks(length, world)
        parts = [chunks[rank], chunks[2 * world - 1 - rank]]
    return torch.cat([x.narrow(dim, start, size) for start, size in parts], dim=dim).contiguous()


def unshard_sequence(local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None,
                     sharding: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather over `group`; lengths may differ)."""
    _check_sharding(sharding)
    lengths = gather_lengths(local.shape[dim], local.device, group)
    pieces = all_gather_uneven(local, dim, lengths, group)
    return assemble(pieces, dim, segments(sharding, lengths))


def assemble(pieces: Sequence[torch.Tensor], dim: int, layout: list[list[Segment]]) -> torch.Tensor:
    """The global sequence from each rank's tensor (pieces[r]) and the layout's segments."""
    runs = []
    for piece, segs in zip(pieces, layout):
        offset = 0
        for start, size in segs:
            runs.append((start, piece.narrow(dim, offset, size)))
            offset += size
    return torch.cat([run for _, run in sorted(runs, key=lambda item: item[0])], dim=dim)


def gather_lengths(length: int, device: torch.device, group, *more: int) -> list:
    """Every rank's `length` (and `more`), by rank: [int] per rank, or tuples when `more` is given."""
    world = dist.get_world_size(group)
    mine = torch.tensor([length, *more], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    values = [tuple(t.tolist()) for t in every]
    return [v[0] for v in values] if not more else values


def all_gather_uneven(local: torch.Tensor, dim: int, lengths: Sequence[int], group) -> list[torch.Tensor]:
    """Every rank's tensor, whose sizes along `dim` are `lengths` (padded to the longest for the collective)."""
    longest = max(lengths)
    padded = local
    if local.shape[dim] < longest:
        shape = list(local.shape)
        shape[dim] = longest - local.shape[dim]
        padded = torch.cat([local, local.new_zeros(shape)], dim=dim)
    padded = padded.contiguous()
    every = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(every, padded, group=group)
    return [t.narrow(dim, 0, n) for t, n in zip(every, lengths)]


def _check_sharding(sharding: str) -> None:
    if sharding not in SHARDINGS:
        raise CallError(f"sharding: expected one of {', '.join(map(repr, SHARDINGS))}, got {sharding!r}")
