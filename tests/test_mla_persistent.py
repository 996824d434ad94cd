"""The Gluon MLA decode kernel's persistent schedule (PlanOptions(mla_persistent=True), passes/latent_decode.py
balanced_shares) without a GPU: the shares cover every (item, key tile) once and differ by at most one tile, bad
lengths are clamped (and keep a tile, so a program flags them), the device metadata (torch ops) agrees with the pure
rule, the plan and launch show the schedule and fall back where it does not apply, and attn_combine_scheduled (in
Triton's interpreter) merges the pieces of the items the shares cut into out and lse that match a float64 softmax,
leaving the items written whole alone. The kernel itself runs only on an H100: tests/test_mla_gluon_gpu.py -k
persistent."""
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import attnc
from attnc.backends.triton import gluon_decode
from attnc.backends.triton.serving import DecodeLauncher
from attnc.dsl.signature import bind
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.latent_decode import (
    balanced_shares, item_tiles, latent_launch, latent_splits, modelled_us, persistent_programs, persistent_latent,
    share_pieces, share_start, tile_owner,
)
from test_mla_grid import bench_mla, grid_spec
from test_triton_kernels import poisoned_outputs  # noqa: F401  (an autouse fixture: importing enables it)

H100 = Target("triton", "cuda", 90)
PERSISTENT = PlanOptions(gluon=True, mla_persistent=True)
SPECS = {s.name: s for s in attnc.parse_file("examples/specs/mla.attn")}


def _plan(name="mla_paged", options=PERSISTENT, spec=None):
    return plan_kernel(spec or SPECS[name], H100, 512, 512, options)


def _check_shares(tiles: list[int], programs: int):
    shares = balanced_shares(tiles, programs)
    assert len(shares) == programs
    seen = [[0] * t for t in tiles]
    slots = set()
    for p, segments in enumerate(shares):
        for s in segments:
            assert 0 <= s.first < s.end <= tiles[s.item] and s.slot == p + s.item and s.slot not in slots
            slots.add(s.slot)
            for t in range(s.first, s.end):
                seen[s.item][t] += 1
    assert all(count == 1 for row in seen for count in row), "every (item, key tile) in exactly one share"
    sizes = [sum(s.end - s.first for s in segments) for segments in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(tiles)
    # the combine's view: an item's pieces are the slots tile_owner(first) + item onwards, one per program
    total, start = sum(tiles), 0
    for item, t in enumerate(tiles):
        pieces = sorted((s for segments in shares for s in segments if s.item == item), key=lambda s: s.first)
        if t:
            owner = tile_owner(start, total, programs)
            assert [s.slot for s in pieces] == list(range(owner + item, owner + item + len(pieces)))
            assert len(pieces) == tile_owner(start + t - 1, total, programs) - owner + 1
            assert all(s.whole == (len(pieces) == 1) for s in pieces)
        else:
            assert not pieces
        start += t


@pytest.mark.parametrize("seed", range(40))
def test_shares_cover_every_tile_once_and_differ_by_at_most_one(seed):
    rng = random.Random(seed)
    tiles = [rng.choice([0, 0, 1, 2, 3, 16, 17, 130]) for _ in range(rng.randint(0, 40))]
    _check_shares(tiles, rng.randint(1, 140))


def test_shares_at_the_issue_points():
    """B = 64 and 768 sequences of 1k / 2k / 8k keys in 64-key tiles, 64 and 128 heads (one or two head groups), on
    132 SMs; and fewer tiles than programs (empty shares)."""
    for batch, keys, groups in [(64, 1024, 1), (64, 8192, 1), (64, 2048, 2), (768, 1024, 2), (768, 2048, 1)]:
        _check_shares([keys // 64] * batch * groups, 132)
    _check_shares([1, 0, 2], 132)
    assert [share_start(10, 4, p) for p in range(5)] == [0, 2, 5, 7, 10]


def test_bad_lengths_are_clamped_and_keep_a_tile():
    """Lengths are untrusted: negative ones clamp to 0 keys but keep one tile (a program reaches the sequence and
    flags it), ones past the capacity clamp to it; 0 keys take no tile (attn_combine_scheduled writes them)."""
    assert item_tiles([0, 1, 64, 65, -3, 10 ** 9, 130], 256, 64, 2) == [0, 0, 1, 1, 1, 1, 2, 2, 1, 1, 4, 4, 3, 3]
    lengths = torch.tensor([0, 1, 64, 65, -3, 10 ** 9, 130], dtype=torch.int32)
    got = gluon_decode.schedule_tiles(lengths, 7, 256, 64, 2, torch.device("cpu"))
    tiles = item_tiles(lengths.tolist(), 256, 64, 2)
    assert got.dtype == torch.int32 and got.tolist() == [sum(tiles[:i]) for i in range(len(tiles) + 1)]
    dense = gluon_decode.schedule_tiles(None, 3, 130, 64, 1, torch.device("cpu"))
    assert dense.tolist() == [0, 3, 6, 9]


def test_the_option_shows_the_schedule_and_falls_back_where_it_does_not_apply():
    staged = _plan().decode.warpgroups
    assert staged.path == "gluon" and staged.layout.persistent and persistent_latent(_plan())
    assert "persistent, balanced shares" in staged.reason and "persistent: a program per SM" in _plan().describe()
    default = _plan(options=PlanOptions(gluon=True))
    assert not default.decode.warpgroups.layout.persistent and not persistent_latent(default)
    assert "latent_splits' splits (PlanOptions" in default.decode.warpgroups.reason
    assert "a program per (position, head group, split)" in default.describe()
    # an FP8 latent keeps the split rule, saying why
    kept = _plan(spec=grid_spec("paged", "fp8", bench_mla.GPU)).decode.warpgroups
    assert kept.path == "gluon" and not kept.layout.persistent and "does not apply, an FP8 latent" in kept.reason


def _sizes(b=64, h=128, m=1, n=2048):
    return {"B": b, "H": h, "HKV": 1, "M": m, "N": n, "D": 512, "DV": 512}


def test_programs_weigh_tiles_against_cut_pieces():
    """Up to a program per SM, the count of least modelled time (latent_splits' model: a cut segment's partial and
    the merge against the tiles it spreads): B = 64 sequences of 64 heads at 1k / 2k keys stay whole, one program
    each (the H100 ran that unsplit launch fastest, the split rule's choice too); at 8k each is cut in two; where
    items spread evenly over fewer programs, no partials; a few short sequences spread over many programs."""
    plan = _plan()
    assert share_pieces(16, 64, 64) == (16, 0) and share_pieces(16, 64, 128) == (8, 128)
    assert modelled_us(plan, 1, 16, 1024, 0) < modelled_us(plan, 1, 8, 1024, 128)
    assert persistent_programs(plan, 16, 64, 132) == 64 and persistent_programs(plan, 32, 64, 132) == 64
    assert persistent_programs(plan, 128, 64, 132) == 128  # 8k keys: two halves a sequence
    for tiles, batch in ((16, 64), (32, 64), (128, 64)):  # the split rule's count at the same points
        assert persistent_programs(plan, tiles, batch, 132) == batch * latent_splits(
            _plan(options=PlanOptions(gluon=True)), batch, tiles, 132)
    assert persistent_programs(plan, 16, 1536, 132) == 128 and share_pieces(16, 1536, 128) == (192, 0)
    assert persistent_programs(plan, 32, 1536, 132) == 128  # HBM-bound: 132 shares would cut items for nothing
    assert 1 < persistent_programs(plan, 128, 1, 132) < 132  # one long sequence: many pieces, not every SM
    assert persistent_programs(plan, 1, 1, 132) == 1 and persistent_programs(plan, 0, 5, 132) == 5


def test_a_persistent_launch_takes_up_to_a_program_per_sm():
    go = latent_launch(_plan(), _sizes(b=768, h=128), 132)
    assert (go.programs, go.q_programs, go.head_programs, go.tiles.pack) == (128, 128, 1, 64)
    assert go.combine.function == "attn_combine_scheduled" and go.combine in _plan().kernels
    assert 2 ** go.search_steps >= 768 * 2 and go.combine is not None and go.decode.keywords["SPLIT"] is False
    split = latent_launch(_plan(options=PlanOptions(gluon=True)), _sizes(b=64, h=64, n=8192), 132)
    assert split.programs == 0 and split.splits == 2  # today's rule at B = 64, 8k keys: 128 programs


def test_longer_queries_take_the_triton_kernel():
    """The persistent kernel takes one query position a call (M = 1); the launcher sends longer ones to the Triton
    decode kernel."""
    spec = SPECS["mla_paged"]
    q = torch.randn(2, 2, 64, 576, dtype=torch.bfloat16)
    pool = torch.randn(6, 64, 576, dtype=torch.bfloat16)
    kw = dict(qr=q[..., 512:], kr=pool[..., 512:], block_table=torch.tensor([[0, 1, 2], [3, 4, 5]]).int(),
              kv_len=torch.tensor([150, 64]).int(), scale=0.1)
    launcher = type("L", (), {"spec": spec, "persistent": True})()
    why = gluon_decode.GluonDecodeLauncher.uncovered(launcher, bind(spec, q[..., :512], pool[..., :512],
                                                                    pool[..., :512], kw))
    assert "one query position" in why


def test_generated_source_walks_the_segments():
    source = gluon_decode.generate_gluon_decode(_plan())
    for name in ("score_segments", "value_segments", "produce_segments", "first_item", "share_bounds"):
        assert f"def {name}(" in source
    assert source.count("mbarrier.arrive(q_free.index(0), count=1)") == 2  # both warpgroups' stores
    assert "mbarrier.wait(q_free.index(0), (seg & 1) ^ 1)" in source and "if t == q_tile:" in source
    assert "n = ring + t - s_start" in source and "(n + seg) & 1" in source
    assert "def score_segments" not in gluon_decode.generate_gluon_decode(_plan(options=PlanOptions(gluon=True)))
    contiguous = gluon_decode.generate_gluon_decode(_plan("mla_decode"))
    assert "block_table" not in contiguous and "def produce_segments(" in contiguous


@pytest.mark.parametrize("heads, pack, programs", [(4, 2, 5), (2, 2, 3), (4, 4, 16)])
def test_the_scheduled_combine_merges_the_cut_items(heads, pack, programs):
    """The launcher's attn_combine_scheduled call (Triton's interpreter) over partial results simulated per
    segment in float64 (scores drawn at random, values the latent): the items the shares cut come out as the
    softmax over all their keys, 0-key items as out 0 and lse -inf, and the items written whole are left alone."""
    plan = _plan()
    launcher = gluon_decode.GluonDecodeLauncher(plan, SimpleNamespace(attn_decode_gluon=None), DecodeLauncher(plan))
    torch.manual_seed(heads * 100 + programs)
    lengths = [0, 1, 130, 64, 300, 65, 0, 7]
    batch, page = len(lengths), 64
    q = torch.randn(batch, 1, heads, 576, dtype=torch.bfloat16)
    pool = torch.randn(batch * 5, page, 576, dtype=torch.bfloat16)
    kw = dict(qr=q[..., 512:], kr=pool[..., 512:], scale=0.1, kv_len=torch.tensor(lengths, dtype=torch.int32),
              block_table=torch.arange(batch * 5, dtype=torch.int32).reshape(batch, 5))
    bound = bind(SPECS["mla_paged"], q[..., :512], pool[..., :512], pool[..., :512], kw)
    go = latent_launch(plan, bound.sizes, programs)
    go = replace(go, tiles=replace(go.tiles, pack=pack))
    out, lse, ws_out, ws_lse = launcher.outputs(bound, go)
    ws_out.fill_(float("nan"))
    ws_lse.fill_(float("nan"))
    scores = torch.randn(batch, heads, 5 * page, dtype=torch.float64) * 3
    values = torch.randn(batch, 5 * page, 512, dtype=torch.float64)
    tiles = item_tiles(lengths, 5 * page, page, heads // pack)
    for segments in balanced_shares(tiles, go.programs):
        for s in segments:
            b, g = divmod(s.item, heads // pack)
            keys = slice(s.first * page, min(s.end * page, lengths[b]))
            rows = slice(g * pack, (g + 1) * pack)
            part_lse = torch.logsumexp(scores[b, rows, keys], -1)
            part = torch.softmax(scores[b, rows, keys], -1) @ values[b, keys]
            if s.whole:
                out[b, 0, rows], lse[b, rows, 0] = part.to(out.dtype), part_lse.float()
            else:
                ws_out[s.slot, rows, 0], ws_lse[s.slot, rows] = part.float(), (part_lse / math.log(2)).float()
    fn, grid, args, meta = launcher.calls(bound, go, out, lse, ws_out, ws_lse)[1]
    assert fn.__name__ == go.combine.function == "attn_combine_scheduled" and grid[1] == heads
    fn[grid](*args, **{k: v for k, v in meta.items() if k != "num_warps"})
    for b, n in enumerate(lengths):
        if n == 0:
            assert (out[b].float() == 0).all() and (lse[b] == -math.inf).all()
            continue
        want = torch.softmax(scores[b, :, :n], -1) @ values[b, :n]
        torch.testing.assert_close(out[b, 0].double(), want, rtol=1e-2, atol=1e-2)  # out is bf16
        torch.testing.assert_close(lse[b, :, 0].double(), torch.logsumexp(scores[b, :, :n], -1), rtol=1e-5, atol=1e-5)
