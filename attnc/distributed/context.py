"""Context parallelism: one attention over a sequence sharded across the ranks of a torch.distributed group.

Each rank holds a shard of q, k and v along the sequence (sharding.py) and gets its shard of out (and lse). Every
rank runs the shard spec (positions.py) on pairs (a run of its queries, a run of keys) and merges the partial
results with the normalizer's rule (attnc.merge.merge_states: through the lse for softmax, a sum for sigmoid).

Schedules:
  ring       K/V shards travel around the ring (batch_isend_irecv to rank + 1, from rank - 1); the transfer of the
             next shard is posted before the kernel runs on the current one, so it hides under compute (NCCL
             runs it on its own stream; gloo on its own threads). Pairs the mask analysis finds empty are not run.
  allgather  K/V are all-gathered once; each query run attends to the whole sequence in one call, whose own
             tile skipping handles the mask. For K/V much smaller than q (GQA with few K/V heads).
Backward (a torch.autograd.Function): the backward kernels run on the same pairs with the merged out and lse; in
the ring each K/V shard's dK/dV accumulator travels with it and arrives at its owner after a full turn; under
allgather the full dK/dV are summed over the group (all_reduce) and each rank keeps its shard's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..dsl.signature import bind, canonical_view
from ..errors import CallError
from ..ir import Attention
from ..merge import merge_states
from ..passes.grad import derive
from ..runtime import autograd
from ..runtime.kernel import Kernel
from .positions import PairSkipper, shard_names, shard_spec
from .sharding import (SHARDINGS, Segment, all_gather_uneven, assemble, gather_lengths, segments, shard_sequence,
                       unshard_sequence)

SCHEDULES = ("auto", "ring", "allgather")


class ContextParallel:
    """`cp(q, k, v, **params_and_inputs)` on this rank's shards -> this rank's out, or (out, lse). Input tables are
    global: every rank passes the whole table, and their gradients on a rank are that rank's share (the sum over
    the group is the gradient of the global loss, what DDP/FSDP's reduction over this group adds up)."""

    def __init__(self, kernel_or_spec, group: dist.ProcessGroup | None = None, schedule: str = "auto",
                 sharding: str = "auto"):
        if isinstance(kernel_or_spec, Kernel):
            base = kernel_or_spec
        elif isinstance(kernel_or_spec, Attention):
            base = Kernel(kernel_or_spec)
        elif isinstance(getattr(kernel_or_spec, "spec", None), Attention):  # decorated: its spec as last traced
            base = Kernel(kernel_or_spec.spec, getattr(kernel_or_spec, "backend", None))
        else:
            raise CallError(f"kernel_or_spec: expected an attnc.Attention, a kernel from attnc.compile or a "
                            f"decorated attention, got {type(kernel_or_spec).__name__}")
        spec = base.spec
        if spec.q_storage is not None or spec.kv_storage is not None:
            raise CallError(f"kernel_or_spec: attention {spec.name!r} has ragged or paged storage; context "
                            f"parallelism shards dense [.., M, ..] / [.., N, ..] sequences only")
        if schedule not in SCHEDULES:
            raise CallError(f"schedule: expected one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        if sharding not in ("auto", *SHARDINGS):
            raise CallError(f"sharding: expected 'auto' or one of {', '.join(map(repr, SHARDINGS))}, got "
                            f"{sharding!r}")
        self.spec = spec
        self.group = group
        self.names = shard_names(spec)
        self.kernel = base.sibling(shard_spec(spec, self.names))
        # A softmax sink joins each row's denominator once: only the row's own diagonal run carries it.
        self.no_sink = (base.sibling(shard_spec(spec, self.names, sink=False)) if spec.normalizer.sink is not None
                        else self.kernel)
        self.skipper = PairSkipper(spec)
        # zigzag where a key run is reached only from later rows (causal, sliding windows): contiguous shards would
        # leave the first ranks idle
        self.sharding = sharding if sharding != "auto" else ("zigzag" if self.skipper.rows.from_upper else "contiguous")
        self.schedule = schedule
        self.q_axis, self.k_axis = spec.q.shape.index("M"), spec.k.shape.index("N")
        self.tables = derive(self.kernel.spec).tables  # the float inputs that get gradients

    def shard(self, x: torch.Tensor, dim: int, rank: int | None = None) -> torch.Tensor:
        """This rank's (or `rank`'s) shard of a whole sequence `x` along `dim`, in this object's sharding."""
        world = dist.get_world_size(self.group)
        return shard_sequence(x, dim, dist.get_rank(self.group) if rank is None else rank, world, self.sharding)

    def unshard(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence from every rank's shard along `dim` (an all-gather)."""
        return unshard_sequence(local, dim, self.group, self.sharding)

    def schedule_for(self, sizes) -> str:
        """The schedule a call with these sizes (H, HKV, D, DV) runs: under "auto", allgather where K/V per
        position are at most half of q's (GQA with few K/V heads): one all-gather of small K/V, then one kernel
        call per query run instead of a call per shard pair; else ring."""
        if self.schedule != "auto":
            return self.schedule
        small_kv = sizes["HKV"] * (sizes["D"] + sizes["DV"]) * 2 <= sizes["H"] * sizes["D"]
        return "allgather" if small_kv else "ring"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, **kwargs: object):
        call = self._prepare(q, k, v, kwargs)
        tables = [kwargs[name] for name in self.tables]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables)):
            out, lse = _Attention.apply(call, q, k, v, *tables)
        else:
            out, lse = call.forward(q, k, v)
        return (out, lse) if self.spec.returns_lse else out

    def _prepare(self, q, k, v, kwargs: dict) -> "_Call":
        reserved = [n for n in (self.names.q0, self.names.k0, self.names.m, self.names.n) if n in kwargs]
        if reserved:
            raise CallError(f"{reserved[0]}: is set by attnc.distributed (the global position offsets); do not pass it")
        offsets = {self.names.q0: 0, self.names.k0: 0, self.names.m: 0, self.names.n: 0}
        bound = bind(self.kernel.spec, q, k, v, {**kwargs, **offsets})  # CallErrors naming the argument
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        sizes = bound.sizes
        lengths = gather_lengths(sizes["M"], q.device, self.group, sizes["N"])
        q_lengths, k_lengths = [m for m, _ in lengths], [n for _, n in lengths]
        if self.sharding == "zigzag" and q_lengths != k_lengths:
            raise CallError(f"k: zigzag sharding needs q and k cut alike, but the ranks hold {q_lengths} queries and "
                            f"{k_lengths} keys; use sharding='contiguous' for M != N")
        total_m, total_n = sum(q_lengths), sum(k_lengths)
        env = {**sizes, **bound.params, "M": total_m, "N": total_n}
        globals_ = {self.names.m: total_m, self.names.n: total_n}
        return _Call(self, rank, world, self.schedule_for(sizes), segments(self.sharding, q_lengths),
                     segments(self.sharding, k_lengths), env, {**kwargs, **globals_})


@dataclass
class _Call:
    """One call's layout and arguments, shared by its forward and backward."""

    cp: ContextParallel
    rank: int
    world: int
    schedule: str
    q_layout: list[list[Segment]]
    k_layout: list[list[Segment]]
    env: dict  # sizes with the global M and N, params: what the pair skipping evaluates
    kwargs: dict  # the user's params and inputs, and the global lengths

    # ------------------------------------------------------------ pieces

    def q_runs(self, t: torch.Tensor) -> list[tuple[Segment, torch.Tensor]]:
        """This rank's query runs of a q-shaped (or out-shaped) tensor: ((global start, length), slice)."""
        return _runs(t, self.cp.q_axis, self.q_layout[self.rank])

    def k_runs(self, t: torch.Tensor, owner: int) -> list[tuple[Segment, torch.Tensor]]:
        return _runs(t, self.cp.k_axis, self.k_layout[owner])

    def pairs(self, owner: int) -> list[tuple[int, int, bool]]:
        """(query run index, key run index of `owner`'s shard, carries the sink) for the pairs to compute."""
        found = []
        for a, (q0, m) in enumerate(self.q_layout[self.rank]):
            for c, (k0, n) in enumerate(self.k_layout[owner]):
                sink = owner == self.rank and a == c  # the run's own chunk: every row has one
                if sink and self.cp.spec.normalizer.sink is not None:
                    found.append((a, c, True))
                elif not self.cp.skipper.empty(self.env, q0, q0 + m, k0, k0 + n):
                    found.append((a, c, False))
        return found

    def offsets(self, q0: int, k0: int) -> dict:
        names = self.cp.names
        return {**self.kwargs, names.q0: q0, names.k0: k0}

    def kernel(self, sink: bool) -> Kernel:
        return self.cp.kernel if sink else self.cp.no_sink

    def k_shape(self, k: torch.Tensor, owner: int) -> list[int]:
        shape = list(k.shape)
        shape[self.cp.k_axis] = sum(n for _, n in self.k_layout[owner])
        return shape

    # ------------------------------------------------------------ forward

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        runs = self.q_runs(q)
        merged: list = [None] * len(runs)  # per query run: (out as [B, H, M, DV], lse) over the keys so far
        if self.schedule == "allgather":
            k_all, v_all = self.gather_kv(k, v)
            for a, ((q0, _), q_run) in enumerate(runs):
                merged[a] = self._merge(merged[a], self.kernel(True)(q_run, k_all, v_all, **self.offsets(q0, 0)))
        else:
            ring = _Ring(self.cp.group, self.rank, self.world)
            kv = (k.contiguous(), v.contiguous())
            for step in range(self.world):
                owner = (self.rank - step) % self.world
                incoming, works = None, []
                if step < self.world - 1:  # post the next shard's transfer before computing on this one
                    src = (owner - 1) % self.world
                    incoming = tuple(torch.empty(self.k_shape(t, src), dtype=t.dtype, device=t.device) for t in kv)
                    works = ring.post(sends=kv, recvs=incoming)
                k_runs, v_runs = self.k_runs(kv[0], owner), self.k_runs(kv[1], owner)
                for a, c, sink in self.pairs(owner):
                    (q0, _), q_run = runs[a]
                    (k0, _), k_run = k_runs[c]
                    part = self.kernel(sink)(q_run, k_run, v_runs[c][1], **self.offsets(q0, k0))
                    merged[a] = self._merge(merged[a], part)
                _wait(works)
                kv = incoming
        return self._finish(q, runs, merged)

    def gather_kv(self, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [sum(n for _, n in segs) for segs in self.k_layout]
        return tuple(assemble(all_gather_uneven(t, self.cp.k_axis, lengths, self.cp.group), self.cp.k_axis,
                              self.k_layout) for t in (k, v))

    def _merge(self, merged, part) -> tuple[torch.Tensor, torch.Tensor]:
        """A query run's result so far, merged with one more pair's partial (out, lse), by the normalizer's rule."""
        spec = self.cp.spec
        out, lse = canonical_view(part[0], spec.q), part[1]
        if merged is None:
            return out, lse
        return merge_states(merged[0].float(), merged[1], out.float(), lse, layout="bhsd", normalizer=spec)

    def _finish(self, q, runs, merged) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's out (q's layout and dtype) and lse from its query runs' results."""
        spec, sizes = self.cp.spec, self.env
        outs, lses = [], []
        for ((_, m), _), result in zip(runs, merged):
            if result is None:  # the masks leave these rows no key: out = 0, lse = -inf
                result = (q.new_zeros(sizes["B"], sizes["H"], m, sizes["DV"]),
                          torch.full((sizes["B"], sizes["H"], m), -torch.inf, device=q.device))
            outs.append(result[0])
            lses.append(result[1])
        canonical = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        axes = (2, 3, 4, 5)  # distinct sizes show where canonical_view puts each axis of q's layout
        order = [axes.index(n) for n in canonical_view(torch.empty(axes), spec.q).shape]
        out = canonical.permute(*[order.index(axis) for axis in range(4)]).to(q.dtype).contiguous()
        lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
        return out, lse.float().contiguous()

    # ------------------------------------------------------------ backward

    def backward(self, q, k, v, out, lse, dout, dlse) -> dict[str, torch.Tensor | None]:
        if dout is None:
            dout = torch.zeros_like(out)
        if not self.cp.spec.returns_lse:
            dlse = None
        runs = self.q_runs(q)
        outs, douts = self.q_runs(out), self.q_runs(dout.contiguous())
        lses = _runs(lse, 2, self.q_layout[self.rank])
        dlses = _runs(dlse, 2, self.q_layout[self.rank]) if dlse is not None else None
        acc = _Grads()

        def pair_grads(a, kernel, k_run, v_run, k0):
            (q0, _), q_run = runs[a]
            grads = autograd.gradients(kernel, q_run, k_run, v_run, self.offsets(q0, k0), outs[a][1], lses[a][1],
                                       douts[a][1], dlses[a][1] if dlses else None)
            acc.add(("q", a), grads["q"])
            for name in self.cp.tables:
                if name in grads:
                    acc.add(name, grads[name])
            return grads

        if self.schedule == "allgather":
            k_all, v_all = self.gather_kv(k, v)
            dk_all, dv_all = _Grads(), _Grads()
            for a in range(len(runs)):
                grads = pair_grads(a, self.kernel(True), k_all, v_all, 0)
                dk_all.add("k", grads["k"])
                dv_all.add("v", grads["v"])
            dk_full, dv_full = dk_all.get("k", k_all), dv_all.get("v", v_all)
            for t in (dk_full, dv_full):
                dist.all_reduce(t, group=self.cp.group)
            dk = self._own_runs(dk_full)
            dv = self._own_runs(dv_full)
        else:
            ring = _Ring(self.cp.group, self.rank, self.world)
            kv = (k.contiguous(), v.contiguous())
            sent: list = []
            dkv = None
            for step in range(self.world):
                owner = (self.rank - step) % self.world
                incoming, recv = None, []
                if step > 0:  # this shard's accumulator, from the ranks it visited before
                    recv = [torch.empty(self.k_shape(t, owner), dtype=torch.float32, device=t.device) for t in kv]
                if step < self.world - 1:
                    src = (owner - 1) % self.world
                    incoming = tuple(torch.empty(self.k_shape(t, src), dtype=t.dtype, device=t.device) for t in kv)
                works = ring.post(sends=kv if incoming else (), recvs=[*recv, *(incoming or ())])
                local = _Grads()
                k_runs, v_runs = self.k_runs(kv[0], owner), self.k_runs(kv[1], owner)
                for a, c, sink in self.pairs(owner):
                    (k0, _), k_run = k_runs[c]
                    grads = pair_grads(a, self.kernel(sink), k_run, v_runs[c][1], k0)
                    local.add(("k", c), grads["k"])
                    local.add(("v", c), grads["v"])
                _wait(works)
                dkv = [self._shard_grad(local, role, kv[i], owner) for i, role in enumerate("kv")]
                if recv:
                    dkv = [mine + theirs for mine, theirs in zip(dkv, recv)]
                if self.world > 1:  # on to the next rank; after the last step, to the shard's owner
                    _wait(sent)
                    sent = ring.post(sends=dkv, recvs=())
                kv = incoming
            if self.world > 1:
                dkv = [torch.empty(self.k_shape(t, self.rank), dtype=torch.float32, device=t.device) for t in (k, v)]
                _wait(ring.post(sends=(), recvs=dkv))
                _wait(sent)
            dk, dv = dkv
        dq = torch.cat([acc.get(("q", a), run) for a, (_, run) in enumerate(runs)], dim=self.cp.q_axis)
        result = {"q": dq.to(q.dtype), "k": dk.to(k.dtype), "v": dv.to(v.dtype)}
        for name in self.cp.tables:
            table = self.kwargs[name]
            result[name] = acc.get(name, table).to(table.dtype)
        return result

    def _shard_grad(self, grads: "_Grads", role: str, like: torch.Tensor, owner: int) -> torch.Tensor:
        """One K/V shard's gradient (float32) from its runs' parts (zero where no pair reached a run)."""
        runs = self.k_runs(like, owner)
        return torch.cat([grads.get((role, c), run) for c, (_, run) in enumerate(runs)], dim=self.cp.k_axis)

    def _own_runs(self, full: torch.Tensor) -> torch.Tensor:
        return torch.cat([full.narrow(self.cp.k_axis, start, n) for start, n in self.k_layout[self.rank]],
                         dim=self.cp.k_axis)


class _Grads:
    """Gradient parts summed in float32 by key; a key no part reached is zero."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, key, grad: torch.Tensor) -> None:
        self.sums[key] = grad.float() if key not in self.sums else self.sums[key] + grad.float()

    def get(self, key, like: torch.Tensor) -> torch.Tensor:
        found = self.sums.get(key)
        return found if found is not None else torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def _runs(t: torch.Tensor, axis: int, segs: Sequence[Segment]) -> list[tuple[Segment, torch.Tensor]]:
    runs, offset = [], 0
    for start, n in segs:
        runs.append(((start, n), t.narrow(axis, offset, n)))
        offset += n
    return runs


class _Ring:
    """Point-to-point transfers to the next rank of the group and from the previous one. Every rank posts its
    sends and receives in the same order, which is how NCCL (and gloo, per tag) pairs them up."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def post(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor]) -> list:
        ops = ([dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
               + [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recvs])
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class _Attention(torch.autograd.Function):
    """The context-parallel call as one autograd node: inputs q, k, v and the float tables, outputs out and lse."""

    @staticmethod
    def forward(ctx, call: _Call, q, k, v, *tables):
        out, lse = call.forward(q, k, v)
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        if not call.cp.spec.returns_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = ctx.call.backward(q, k, v, out, lse, dout, dlse)
        return (None, grads["q"], grads["k"], grads["v"], *(grads[name] for name in ctx.call.cp.tables))


def context_parallel(kernel_or_spec, group: dist.ProcessGroup | None = None, schedule: str = "auto",
                     sharding: str = "auto") -> ContextParallel:
    """A callable running `kernel_or_spec` (an attnc.Attention, a kernel from attnc.compile or a decorated
    attention) over the ranks of `group` (None: the default group), each passing its shard of the sequence:
    `cp(q, k, v, **params_and_inputs)` -> this rank's out (and lse). schedule: "ring", "allgather" or "auto"
    (allgather where K/V per position are at most half of q's). sharding: "zigzag", "contiguous" or "auto"
    (zigzag for masks that bound keys by the row from above, such as causal and sliding windows); cut the
    tensors with `cp.shard(x, dim)`."""
    return ContextParallel(kernel_or_spec, group, schedule, sharding)
