"""attnc.distributed over gloo on the CPU: one spawn of 4 processes runs every check, in groups of 1, 2 and 4,
each rank holding a shard of q, k, v, against attnc.reference (float64, autograd for the gradients) on the whole
sequence: out, lse, dq, dk, dv and the float tables' gradients (summed over the group), with NaN-poisoned
result buffers. The example specs with dense storage run in float32 on the TVM backend (and a few on the Triton
backend through Triton's interpreter, on machines without a GPU), on a 21-long sequence (uneven shards for both
zigzag and contiguous splits), 3 query heads (no world size here divides them) or 4 with one K/V head; the ranks
share one kernel cache, so each kernel is built once."""
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnc
from test_triton_kernels import example_specs, with_dtype

L = 21
REL_TOL = 4e-5  # of the largest value, float32
# CI time: building each spec's shard kernels (forward and backward) takes 3-5 s of one core
SPECS = ("dense", "causal_lm", "sliding_window", "gqa_causal", "alibi", "document_mask", "sigmoid_causal", "sinks",
         "bshd_causal")
PARAMS = {"window": 5}
# (spec, schedule, sharding, what else): every spec on its automatic choice, then the other schedule and sharding
# for a few, an uneven hand-made split, and a window that leaves every row without keys (each pair skipped)
CASES = [(name, "auto", "auto", None) for name in SPECS] + [
    ("causal_lm", "allgather", "zigzag", None),
    ("sinks", "ring", "contiguous", None),
    ("gqa_causal", "ring", "auto", None),
    ("document_mask", "ring", "contiguous", None),
    ("alibi", "ring", "contiguous", "uneven"),
    ("sliding_window", "ring", "auto", "no keys"),
    ("causal_lm", "auto", "auto", "traced"),
    ("causal_lm", "ring", "auto", "flex"),
]

# On machines without a GPU, the Triton backend through Triton's interpreter (no build; about 1 s a case)
TRITON_CASES = [("causal_lm", "ring", "auto", None), ("document_mask", "ring", "contiguous", None),
                ("sinks", "ring", "contiguous", None), ("alibi", "ring", "contiguous", "uneven")]


def _traced_causal(q, k, v):
    return attnc.softmax((q @ k) * q.D ** -0.5, where=attnc.causal(q, k)) @ v


def _specs():
    found = {s.name: s for s in example_specs()}
    return {name: with_dtype(found[name], "f32") for name in SPECS}


def _sizes(spec):
    dims = spec.dim_values
    gqa = spec.is_gqa_shape
    sizes = {"B": 2 if spec.name == "document_mask" else 1, "H": 4 if gqa else 3, "HKV": 1 if gqa else 3,
             "M": L, "N": L, "D": dims.get("D", 16)}
    sizes["DV"] = dims.get("DV", sizes["D"])
    return sizes


def _inputs(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(spec)
    q, k, v = (torch.randn([sizes[s] for s in t.shape], generator=gen) for t in (spec.q, spec.k, spec.v))
    kwargs = {}
    for t in spec.inputs:
        shape = [sizes[s] for s in t.shape]
        if t.name == "doc":  # 3 documents per sequence
            kwargs[t.name] = torch.sort(torch.randint(0, 3, shape, generator=gen), dim=-1).values.int()
        else:
            kwargs[t.name] = torch.randn(shape, generator=gen)
    kwargs.update({p.name: PARAMS[p.name] for p in spec.params if p.name in PARAMS})
    return q, k, v, kwargs


def _reference(spec, q, k, v, kwargs, dout, dlse, tables):
    spec64 = with_dtype(replace(spec, returns_lse=True), "f64")
    leaves = {role: t.double().requires_grad_() for role, t in zip("qkv", (q, k, v))}
    kw = {n: (x.detach().requires_grad_() if n in tables else x) for n, x in kwargs.items()}
    leaves.update({n: kw[n] for n in tables})
    out, lse = attnc.reference(spec64, leaves["q"], leaves["k"], leaves["v"], **kw)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(lse > -math.inf, lse, 0.0) * dlse.double()).sum()
    return out, lse, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _close(name, got, want, case):
    want = want.double()
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert not math.isnan(err) and err <= REL_TOL * scale, f"{case}: {name} off by {err:.3g} (scale {scale:.3g})"


def _check_case(case, spec, seed, group=None, device="cpu", backend="tvm"):
    from attnc.distributed import context_parallel

    name, schedule, sharding, split = case
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, kwargs = _inputs(spec, seed)
    if split == "no keys":
        kwargs["window"] = 0
    q, k, v = (t.to(device) for t in (q, k, v))
    kwargs = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
    kernel = attnc.compile(spec, backend=backend)
    if split == "traced":  # the decorator's front-end: the same math as causal_lm, so the same kernels
        kernel = attnc.attention(_traced_causal, backend=kernel.backend)
        spec = kernel.trace(q, k, v)
    if split == "flex":  # the flex front-end: the spec its mods trace to, for the whole sequence
        block_mask = attnc.create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L)
        spec = attnc.flex_spec(q, k, v, block_mask=block_mask, return_lse=True)
        kernel = attnc.compile(spec, backend=backend)
    cp = context_parallel(kernel, group=group, schedule=schedule, sharding=sharding)
    qa, ka = spec.q.shape.index("M"), spec.k.shape.index("N")
    if split == "uneven":  # contiguous runs of 13 and 8 (2 ranks) or 9, 1, 8, 3 (4 ranks)
        lengths = {1: [L], 2: [13, 8], 4: [9, 1, 8, 3]}[world]
        start = sum(lengths[:rank])

        def shard(x, dim):
            return x.narrow(dim, start, lengths[rank]).contiguous()
    else:
        def shard(x, dim):
            return cp.shard(x, dim)
    gen = torch.Generator().manual_seed(seed + 1)
    tables = cp.tables
    dout = torch.randn(q.shape[:-1] + (_sizes(spec)["DV"],), generator=gen).to(device)
    dlse = torch.randn(q.shape[0], _sizes(spec)["H"], L, generator=gen).to(device) if spec.returns_lse else None
    ref_out, ref_lse, ref_grads = _reference(spec, q, k, v, kwargs, dout, dlse, tables)

    local = {role: shard(t, ax).requires_grad_() for role, t, ax in (("q", q, qa), ("k", k, ka), ("v", v, ka))}
    kw = {n: (x.clone().requires_grad_() if n in tables else x) for n, x in kwargs.items()}
    result = cp(local["q"], local["k"], local["v"], **kw)
    out, lse = result if spec.returns_lse else (result, None)
    case_text = f"{case} rank {rank}/{world}"
    _close("out", out, shard(ref_out, qa), case_text)
    loss = (out * shard(dout, qa)).sum()
    if lse is not None:
        _close("lse", torch.where(lse > -math.inf, lse, 0.0), shard(torch.where(ref_lse > -math.inf, ref_lse, 0.0), 2),
               case_text)
        assert torch.equal(lse == -math.inf, shard(ref_lse == -math.inf, 2)), f"{case_text}: lse -inf rows"
        loss = loss + (torch.where(lse > -math.inf, lse, 0.0) * shard(dlse, 2)).sum()
    loss.backward()
    for role, ax in (("q", qa), ("k", ka), ("v", ka)):
        _close(f"d{role}", local[role].grad, shard(ref_grads[role], ax), case_text)
    for n in tables:
        grad = kw[n].grad.clone()
        dist.all_reduce(grad, group=group)  # each rank holds its share
        _close(f"d{n}", grad, ref_grads[n], case_text)


def _check_torch_layout(spec, world):
    """Buffers sharded by PyTorch's context_parallel (head-tail) are attnc's zigzag shards: attnc runs on them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel

    from attnc.distributed import context_parallel

    mesh = init_device_mesh("cpu", (world,))
    cp = context_parallel(attnc.compile(spec, backend="tvm"), group=mesh.get_group(), sharding="zigzag")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 3, 24, 16, generator=gen) for _ in range(3))  # torch needs 2W | length
    ref_out, ref_lse = attnc.reference(spec, q, k, v)
    buffers = [q.clone(), k.clone(), v.clone()]
    with torch_context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        assert torch.equal(buffers[0], cp.shard(q, 2))
        out, lse = cp(*buffers)
    _close("out under torch's context_parallel", out, cp.shard(ref_out, 2), f"world {world}")
    _close("lse under torch's context_parallel", lse, cp.shard(ref_lse, 2), f"world {world}")


def _worker(rank, world, init_file, cache_dir):
    os.environ["ATTNC_CACHE_DIR"] = cache_dir
    # Triton imported in interpreter mode (conftest, on a machine without a GPU; the mode cannot change after
    # import) runs its kernels, merge_states' among them, on CPU tensors
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from attnc import merge
        from attnc.backends.triton import launch as triton_launch
        from attnc.backends.tvm import launch

        def poisoned(shape, dtype, device):
            return torch.full(shape, math.nan, dtype=dtype, device=device)

        launch.empty = merge.empty = triton_launch.empty = poisoned
        specs = _specs()
        # World size 1 first, each rank on its own specs: the ranks build the kernels side by side (the ring runs
        # every kernel a spec needs: the all-gather schedule never runs a sink spec's kernel without the sink)
        alone = [dist.new_group([r]) for r in range(world)]
        for index, name in enumerate(SPECS[rank::world]):
            _check_case((name, "ring", "auto", None), specs[name], seed=100 + index, group=alone[rank])
        # Then two groups of 2 at once (ranks 0, 1 and 2, 3: group ranks differ from global ranks), then all 4
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        for group in (pairs[rank // 2], None):
            for index, case in enumerate(CASES):
                _check_case(case, specs[case[0]], seed=index, group=group)
        if interpreter:  # the GPU path's kernels, on the pair groups
            for index, case in enumerate(TRITON_CASES):
                _check_case(case, specs[case[0]], seed=50 + index, group=pairs[rank // 2], backend="triton")
        _check_torch_layout(specs["causal_lm"], world)
        # the errors name the argument
        from attnc.distributed import context_parallel

        cp = context_parallel(attnc.compile(specs["causal_lm"], backend="tvm"))
        q = torch.randn(1, 3, 10 + rank, 16)
        with pytest.raises(attnc.CallError, match="cp_q0"):
            cp(q, q, q, cp_q0=3)
        with pytest.raises(attnc.CallError, match="^k:"):
            cp(q, q[:, :, :9], q[:, :, :9])
    finally:
        dist.destroy_process_group()


def test_context_parallel_gloo(tmp_path, _shared_cache_dir):
    """4 processes: world size 1 on each, two groups of 2, then one group of 4 (module docstring)."""
    pytest.importorskip("tvm")  # the dense specs run on the TVM backend (the GPU machine has no TVM compiler)
    mp.spawn(_worker, args=(4, str(tmp_path / "init"), str(_shared_cache_dir)), nprocs=4, join=True)


@pytest.mark.gpu
def test_world_size_one_on_gpu(tmp_path):
    """The ring (with its zigzag pairs) and all-gather schedules over a one-rank NCCL group, Triton kernels."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        specs = _specs()
        for index, case in enumerate(CASES):
            _check_case(case, specs[case[0]], seed=index, device="cuda", backend=None)
    finally:
        dist.destroy_process_group()


def test_bad_arguments():
    from attnc.distributed import context_parallel

    spec = _specs()["causal_lm"]
    with pytest.raises(attnc.CallError, match="^schedule:"):
        context_parallel(spec, schedule="tree")
    with pytest.raises(attnc.CallError, match="^sharding:"):
        context_parallel(spec, sharding="striped")
    with pytest.raises(attnc.CallError, match="^kernel_or_spec:"):
        context_parallel("causal")
    paged = next(s for s in example_specs() if s.kv_storage is not None)
    with pytest.raises(attnc.CallError, match="paged"):
        context_parallel(paged)


def test_automatic_choices():
    from attnc.distributed import context_parallel

    specs = _specs()
    assert context_parallel(specs["causal_lm"]).sharding == "zigzag"
    assert context_parallel(specs["sliding_window"]).sharding == "zigzag"
    assert context_parallel(specs["dense"]).sharding == "contiguous"
    assert context_parallel(specs["document_mask"]).sharding == "zigzag"
    gqa = {"H": 32, "HKV": 8, "D": 128, "DV": 128}
    assert context_parallel(specs["gqa_causal"]).schedule_for(gqa) == "allgather"
    assert context_parallel(specs["gqa_causal"]).schedule_for({**gqa, "HKV": 32}) == "ring"
    assert context_parallel(specs["gqa_causal"], schedule="ring").schedule_for(gqa) == "ring"


def test_pair_skipping():
    """Shard pairs a mask leaves empty, from the mask analysis on global positions."""
    from attnc.distributed.positions import PairSkipper

    specs = _specs()
    causal, window, dense = (PairSkipper(specs[n]) for n in ("causal_lm", "sliding_window", "dense"))
    env = {"M": 20, "N": 20, "window": 5}
    assert causal.empty(env, 0, 5, 5, 10) and not causal.empty(env, 5, 10, 0, 5) and not causal.empty(env, 4, 6, 5, 6)
    assert window.empty(env, 10, 15, 0, 5) and not window.empty(env, 10, 15, 6, 7) and window.empty(env, 10, 15, 15, 20)
    assert not any(dense.empty(env, a, a + 5, b, b + 5) for a in (0, 10) for b in (0, 10))
    assert window.empty({**env, "window": 0}, 5, 10, 5, 10) and not window.empty({**env, "window": 1}, 5, 10, 5, 10)
    assert causal.empty({"M": 20, "N": 25}, 0, 5, 11, 25) and not causal.empty({"M": 20, "N": 25}, 0, 5, 5, 6)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("length", [6, 13])
def test_shard_helpers(world, length):
    """shard_sequence's shards, put back by the layout, give the sequence; zigzag balances the chunks."""
    from attnc.distributed.sharding import assemble, segments, shard_sequence

    x = torch.arange(2 * length).view(2, length)
    for sharding in ("zigzag", "contiguous"):
        pieces = [shard_sequence(x, 1, r, world, sharding) for r in range(world)]
        layout = segments(sharding, [p.shape[1] for p in pieces])
        assert torch.equal(assemble(pieces, 1, layout), x)
        assert max(p.shape[1] for p in pieces) - min(p.shape[1] for p in pieces) <= (2 if sharding == "zigzag" else 1)
    zig = segments("zigzag", [p.shape[1] for p in (shard_sequence(x, 1, r, world, "zigzag") for r in range(world))])
    assert [[c for c, _ in segs] for segs in zig][0][0] == 0 and zig[0][1][0] + zig[0][1][1] == length
    if world > 1:  # a shard that is not the layout's
        with pytest.raises(attnc.CallError, match="^q: rank 0"):
            segments("zigzag", [length + 1] + [0] * (world - 1))


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_balances_causal_pairs(world):
    """Under a causal mask every rank runs the same number of shard pairs with zigzag shards (the empty ones are
    skipped), and not with contiguous ones."""
    from attnc.distributed.context import _Call
    from attnc.distributed.sharding import segments

    spec = _specs()["causal_lm"]
    length = 8 * world
    counts = {}
    for sharding in ("zigzag", "contiguous"):
        cp = attnc.distributed.context_parallel(spec, sharding=sharding)
        layout = segments(sharding, [length // world] * world)
        env = {"B": 1, "H": 3, "HKV": 3, "D": 16, "DV": 16, "M": length, "N": length}
        counts[sharding] = [sum(len(_Call(cp, r, world, "ring", layout, layout, env, {}).pairs(owner))
                                for owner in range(world)) for r in range(world)]
    assert len(set(counts["zigzag"])) == 1 and counts["zigzag"][0] < 4 * world
    assert counts["contiguous"] == list(range(1, world + 1))
