"""The decode / serving kernels (codegen/triton/decode.py.j2, runtime/serving.py) against attnc.reference
(float64): paged K/V caches with shuffled block tables, packed (ragged) batches, split-KV with its LSE merge,
GQA-packed rows, and every language feature in those layouts. Outputs and the split workspace start as NaN.
On CPU these run in Triton's interpreter; the @gpu tests rerun them at serving sizes on the H100."""
import random
from pathlib import Path

import pytest
import torch

import attnc
from attnc.errors import CompileError
from attnc.ir import Paged
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.decode import decode_launch
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, TORCH, assert_matches, poisoned_outputs, with_dtype,
)

pytestmark = pytest.mark.shared_cache

SPECS_DIR = Path(__file__).resolve().parent.parent / "examples" / "specs"


def parse_one(text):
    return attnc.parse(text, "test.attn")[0]


# ---------------------------------------------------------------- inputs


def offsets(lengths, device=DEVICE):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def paged_cache(lengths, page, hkv, d, dtype, layout="PAGES, PAGE, HKV, D", spare_pages=3, device=DEVICE):
    """k, v pools in `layout`, a block table with shuffled page ids and junk (-1, huge ids) past each sequence's
    last page, and the lengths."""
    need = [-(-n // page) for n in lengths]
    maxp = max(1, max(need))
    pages = sum(need) + spare_pages
    ids = torch.randperm(pages).tolist()
    table = torch.full((len(lengths), maxp), -1, dtype=torch.int32)
    for b, count in enumerate(need):
        table[b, :count] = torch.tensor([ids.pop() for _ in range(count)], dtype=torch.int32)
        table[b, count:] = random.choice([-1, 10 ** 6])
    sizes = {"PAGES": pages, "PAGE": page, "HKV": hkv, "D": d}
    shape = [sizes[x.strip()] for x in layout.split(",")]
    k, v = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    return k, v, table.to(device), torch.tensor(lengths, dtype=torch.int32, device=device)


def check(spec, q, k, v, splits=(None,), **kwargs):
    """Each split count's result against the reference; returns the results."""
    want = attnc.reference(spec, q, k, v, **kwargs)
    results = []
    for n in splits:
        got = attnc.compile(spec, options=PlanOptions(num_splits=n))(q, k, v, **kwargs)
        assert_matches(spec, got, want)
        results.append(got)
    return results


# ---------------------------------------------------------------- the example specs


def stored_examples():
    """(latent attention's paged example: tests/test_mla.py; FP8 caches': tests/test_fp8.py)"""
    return [s for path in sorted(SPECS_DIR.glob("*.attn")) for s in attnc.parse_file(path)
            if (s.q_storage is not None or s.kv_storage is not None) and not s.decode_kernel_only]


def example_call(spec, device=DEVICE, q_lengths=(3, 0, 1, 6), kv_lengths=(40, 0, 1, 70), m=2, page=16):
    """q, k, v and kwargs for an example: 4 sequences with empty and one-token ones."""
    dtype = TORCH[spec.q.dtype if spec.q.dtype != "bf16" or device == "cuda" else "f32"]
    spec = spec if dtype == TORCH[spec.q.dtype] else with_dtype(spec, "f32")
    h, hkv, d = 8, 2 if "HKV" in spec.k.shape else 8, 64
    page = spec.dim_values.get("PAGE", page)
    kwargs = {}
    if spec.q_storage is not None:
        kwargs[spec.q_storage.offsets] = offsets(q_lengths, device)
        q = torch.randn(sum(q_lengths), h, d, device=device).to(dtype)
        # a query needs a key in its sequence: chunked prefill's cache holds the new tokens
        kv_lengths = [max(n, lq) for n, lq in zip(kv_lengths, q_lengths)]
    else:
        q = torch.randn(len(kv_lengths), m, h, d, device=device).to(dtype)
    if spec.kv_storage is None:
        raise AssertionError("examples with storage only")
    if isinstance(spec.kv_storage, Paged):
        k, v, table, lens = paged_cache(kv_lengths, page, hkv, d, dtype, device=device)
        kwargs.update({spec.kv_storage.table: table, spec.kv_storage.lengths: lens})
    else:
        if spec.kv_storage == spec.q_storage:  # self-attention over one offsets tensor
            kv_lengths = q_lengths
        kwargs[spec.kv_storage.offsets] = offsets(kv_lengths, device)
        k, v = (torch.randn(sum(kv_lengths), hkv, d, device=device).to(dtype) for _ in range(2))
    for t in spec.inputs:
        if t.name not in kwargs:
            kwargs[t.name] = torch.randn(h, device=device)  # slopes, sinks: f32[H]
    return spec, q, k, v, kwargs


@pytest.mark.parametrize("spec", stored_examples(), ids=lambda s: s.name)
def test_example_spec(spec):
    spec, q, k, v, kwargs = example_call(spec)
    check(spec, q, k, v, splits=(None, 1, 3), **kwargs)


@pytest.mark.parametrize("spec", [s for s in stored_examples() if s.q.dtype != "f16"][:2], ids=lambda s: s.name)
def test_example_spec_f16(spec):
    spec, q, k, v, kwargs = example_call(with_dtype(spec, "f16"))
    check(spec, q, k, v, **kwargs)


# ---------------------------------------------------------------- random paged decode and ragged batches

PAGED = """attention p {{
    q: {dt}[B, M, H, D]  k: {dt}[{layout}]  v: {dt}[{layout}]
    paged k, v by table, lens
    mask causal
    return softmax(score) @ v, lse
}}"""

# (page, GQA ratio, D, M, kv lengths): page sizes 16 and 64, lengths with 0 and 1, ratios 1/4/8, D 64/128
PAGED_CASES = [
    (16, 1, 64, 1, [0, 1, 37, 100]),
    (16, 4, 128, 1, [129, 1, 0]),
    (64, 8, 64, 2, [1, 64, 150]),
    (64, 4, 64, 3, [0, 65, 3]),
    (16, 8, 128, 4, [50, 4, 17]),
]


@pytest.mark.parametrize("page, ratio, d, m, lengths", PAGED_CASES)
def test_random_paged_decode(page, ratio, d, m, lengths):
    hkv = 2 if ratio < 8 else 1
    spec = parse_one(PAGED.format(dt="f32", layout="PAGES, PAGE, HKV, D"))
    k, v, table, lens = paged_cache(lengths, page, hkv, d, torch.float32)
    q = torch.randn(len(lengths), m, hkv * ratio, d, device=DEVICE)
    first, split = check(spec, q, k, v, splits=(1, 4), table=table, lens=lens)
    assert torch.allclose(first[0], split[0], atol=1e-5) and torch.equal(first[1].isinf(), split[1].isinf())


def test_paged_heads_major_layout_and_a_page_of_one_slot():
    spec = parse_one(PAGED.format(dt="f16", layout="PAGES, HKV, PAGE, D"))
    for page in (1, 16):
        k, v, table, lens = paged_cache([5, 0, 33], page, 2, 64, torch.float16, layout="PAGES, HKV, PAGE, D")
        q = torch.randn(3, 1, 8, 64, device=DEVICE).half()
        check(spec, q, k, v, splits=(None, 2), table=table, lens=lens)


@pytest.mark.parametrize("layout", ["PAGES, PAGE, HKV, D", "PAGES, HKV, PAGE, D"])
def test_a_page_bound_by_dims_holds_whole_key_tiles(layout):
    """PAGE = 32 bound by `dims` is two whole key tiles of the interpreter's 16: the kernel reads one page id a tile
    and steps k and v as a contiguous cache's, in either pool layout, split or not (junk ids past the last pages)."""
    spec = parse_one(PAGED.format(dt="f32", layout=layout).replace("    paged", "    dims PAGE = 32\n    paged"))
    assert spec.dim_values == {"PAGE": 32}
    k, v, table, lens = paged_cache([0, 1, 37, 100], 32, 2, 64, torch.float32, layout=layout)
    q = torch.randn(4, 2, 8, 64, device=DEVICE)
    check(spec, q, k, v, splits=(1, 3), table=table, lens=lens)


VARLEN = """attention r {{
    q: f32[T, H, D]  k: f32[TK, HKV, D]  v: f32[TK, HKV, D]
    ragged q by cu_q
    ragged k, v by cu_k
    {masks}
    return softmax(score) @ v, lse
}}"""


@pytest.mark.parametrize("q_lengths, k_lengths, ratio, d", [
    ([1, 0, 1, 1], [40, 3, 1, 0], 4, 64),  # decode: one token per sequence, an empty one, a cache of 0 keys
    ([5, 0, 33, 1], [5, 0, 60, 30], 1, 128),  # chunked prefill
    ([70, 90], [80, 90], 8, 64),  # long sequences: the prefill tile over a packed batch
])
def test_random_varlen(q_lengths, k_lengths, ratio, d):
    spec = parse_one(VARLEN.format(masks="mask causal"))
    hkv = 2 if ratio < 8 else 1
    q = torch.randn(sum(q_lengths), hkv * ratio, d, device=DEVICE)
    k, v = (torch.randn(sum(k_lengths), hkv, d, device=DEVICE) for _ in range(2))
    check(spec, q, k, v, splits=(None, 3), cu_q=offsets(q_lengths), cu_k=offsets(k_lengths))


def test_ragged_q_over_a_dense_cache_and_no_mask():
    spec = parse_one("attention r { q: f16[T, H, D] k: f16[B, N, HKV, D] v: f16[B, N, HKV, D] ragged q by cu "
                     "return softmax(score) @ v, lse }")
    lengths = [2, 0, 7]
    q = torch.randn(9, 4, 32, device=DEVICE).half()
    k, v = (torch.randn(3, 45, 2, 32, device=DEVICE).half() for _ in range(2))
    check(spec, q, k, v, splits=(None, 2), cu=offsets(lengths))


# ---------------------------------------------------------------- language features in these layouts

FEATURES = """attention f {
    q: f32[T, H, D]  k: f32[PAGES, PAGE, HKV, DV]  v: f32[PAGES, PAGE, HKV, DV]
    ragged q by cu_q
    paged k, v by table, lens
    input slopes: f32[H]
    input sinks: f32[H]
    input tok: f32[T]
    input allowed: bool[B, KMAX]
    param window: i32 = 40
    param cap: f32 = 20.0
    score = cap * tanh(qk * rsqrt(D) / cap) + slopes[h] * (j - i) + tok[cu_q[b] + i]
    mask causal
    mask i + (N - M) - j < window
    mask allowed[b, j]
    return softmax(score, sink=sinks[h]) @ v, lse
}"""


def test_score_mods_masks_lookups_params_and_sinks_in_ragged_and_paged_layouts():
    spec = parse_one(FEATURES.replace("DV]", "D]"))
    q_lengths, kv_lengths = [3, 0, 1, 4], [60, 0, 1, 90]
    k, v, table, lens = paged_cache(kv_lengths, 16, 2, 32, torch.float32)
    q = torch.randn(sum(q_lengths), 4, 32, device=DEVICE)
    kwargs = dict(cu_q=offsets(q_lengths), table=table, lens=lens, slopes=torch.rand(4, device=DEVICE),
                  sinks=torch.randn(4, device=DEVICE), tok=torch.randn(sum(q_lengths), device=DEVICE),
                  allowed=torch.rand(4, table.shape[1] * 16, device=DEVICE) < 0.7)
    for window in (40, 7):
        check(spec, q, k, v, splits=(1, 3), window=window, cap=15.0, **kwargs)


def test_fully_masked_and_empty_sequences_give_zero_and_minus_inf():
    spec = parse_one(VARLEN.format(masks="param w: i32 = 0\n    mask j < w"))
    q_lengths, k_lengths = [2, 1, 0], [5, 0, 4]
    q = torch.randn(3, 2, 16, device=DEVICE)
    k, v = (torch.randn(9, 2, 16, device=DEVICE) for _ in range(2))
    kwargs = dict(cu_q=offsets(q_lengths), cu_k=offsets(k_lengths))
    for splits in (None, 2):
        out, lse = attnc.compile(spec, options=PlanOptions(num_splits=splits))(q, k, v, w=0, **kwargs)
        assert (out == 0).all() and (lse == float("-inf")).all()
    out, lse = check(spec, q, k, v, splits=(2,), w=3, **kwargs)[0]
    assert (out[2] == 0).all() and (lse[:, 2] == float("-inf")).all()  # sequence 1 has no key


def test_sink_joins_once_across_splits_and_gives_lse_of_empty_rows():
    spec = parse_one("attention s { q: f32[B, M, H, D] k: f32[PAGES, PAGE, HKV, D] v: f32[PAGES, PAGE, HKV, D] "
                     "paged k, v by table, lens input sinks: f32[H] "
                     "return softmax(score, sink=sinks[h]) @ v, lse }")
    k, v, table, lens = paged_cache([0, 70], 16, 1, 16, torch.float32)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE)
    for out, lse in check(spec, q, k, v, splits=(1, 4), table=table, lens=lens, sinks=sinks):
        assert torch.allclose(lse[0, :, 0], sinks) and (out[0] == 0).all()


# ---------------------------------------------------------------- dense decode through split-KV

DENSE = """attention g {
    q: f32[B, H, M, D]  k: f32[B, HKV, N, D]  v: f32[B, HKV, N, D]
    mask causal
    return softmax(score) @ v, lse
}"""


@pytest.mark.parametrize("m, n, ratio", [(1, 200, 4), (3, 97, 8), (4, 70, 1)])
def test_dense_decode_launches_split_kv(m, n, ratio, monkeypatch):
    import attnc.backends.triton.serving as serving

    spec = parse_one(DENSE)
    q = torch.randn(2, 2 * ratio, m, 64, device=DEVICE)
    k, v = (torch.randn(2, 2, n, 64, device=DEVICE) for _ in range(2))
    launches = []
    original = serving.DecodeLauncher.calls
    monkeypatch.setattr(serving.DecodeLauncher, "calls", lambda self, bound, go, *a: (
        launches.append(go.splits), original(self, bound, go, *a))[1])
    check(spec, q, k, v, splits=(3,))
    assert launches == [3]
    check(spec, q, k, v, splits=(1,))  # one split: the decode kernel at M = 1, else the prefill kernel
    assert launches == ([3, 1] if m == 1 else [3])


def test_example_mqa_decode_with_splits():
    spec = with_dtype(next(s for s in attnc.parse_file(SPECS_DIR / "mqa_decode.attn")), "f32")
    q = torch.randn(2, 8, 1, 64, device=DEVICE)
    k, v = (torch.randn(2, 1, 300, 64, device=DEVICE) for _ in range(2))
    check(spec, q, k, v, splits=(None, 5))


# ---------------------------------------------------------------- the launch choices (pure)


def plan_for(spec, arch=90, d=128, options=PlanOptions()):
    return plan_kernel(spec, Target("triton", "cuda", arch), d, d, options)


def test_split_count_follows_batch_heads_length_and_sms():
    plan = plan_for(attnc.parse_file(SPECS_DIR / "paged_decode.attn")[0])
    sizes = dict(H=32, HKV=8, M=1, PAGE=16, PAGES=1, D=128, DV=128)

    def splits(b, n, sms=132):
        return decode_launch(plan, {**sizes, "B": b, "N": n, "MAXP": n // 16}, sms).splits

    assert splits(64, 4096) == 1  # 512 programs already fill 132 SMs
    assert splits(1, 32768) == 16  # 8 head programs x 16 splits: about one program per SM
    assert 1 < splits(8, 8192) < splits(1, 8192)
    assert splits(1, 256) == 1  # 4 key tiles: too few to split
    assert splits(1, 32768, sms=16) < splits(1, 32768)
    go = decode_launch(plan, {**sizes, "B": 1, "N": 32768, "MAXP": 2048}, 132)
    assert go.tiles.pack == 4 and go.tiles.config.block_m == 16 and go.head_programs == 8
    assert 32768 // 64 % go.splits == 0 or -(-512 // go.splits) * (go.splits - 1) < 512  # even runs


def test_dense_prefill_shapes_stay_on_the_prefill_kernel():
    plan = plan_for(attnc.parse(DENSE)[0])
    sizes = dict(B=1, H=32, HKV=8, D=128, DV=128)
    assert decode_launch(plan, {**sizes, "M": 1000, "N": 1000}, 132) is None
    assert decode_launch(plan, {**sizes, "M": 1, "N": 100}, 132).splits == 1  # short: no split, decode kernel
    assert decode_launch(plan, {**sizes, "M": 1, "N": 32768}, 132).splits > 1


def test_paged_cache_takes_its_own_key_tile_on_hopper():
    paged = plan_for(attnc.parse_file(SPECS_DIR / "paged_decode.attn")[0])
    dense = plan_for(with_dtype(attnc.parse(DENSE)[0], "bf16"))  # the paged example's dtype
    assert paged.spec.q.dtype == "bf16"
    assert (paged.decode.tile.block_n, dense.decode.tile.block_n) == (128, 64)
    assert plan_for(attnc.parse_file(SPECS_DIR / "paged_decode.attn")[0], arch=80).decode.tile.block_n == 64


def test_ragged_row_tiles_cover_every_sequence_once():
    """The kernel's binary search (mirrored here) gives each (sequence, row tile) exactly one program."""
    plan = plan_for(attnc.parse_file(SPECS_DIR / "varlen.attn")[0])
    for lengths in ([1] * 7, [0, 5, 130, 0, 1, 64, 65], [300], [0, 0, 3]):
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        sizes = dict(B=len(lengths), H=8, HKV=8, T=cu[-1], TK=cu[-1], M=cu[-1], N=cu[-1], D=128, DV=128)
        go = decode_launch(plan, sizes, 132)
        bq = go.tiles.block_mq
        covered = []
        for pid in range(go.q_programs):
            lo, hi = 0, len(lengths)
            for _ in range(go.search_steps):
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if (cu[mid] + mid * (bq - 1)) // bq <= pid else (lo, mid)
            tile = pid - (cu[lo] + lo * (bq - 1)) // bq
            if tile * bq < lengths[lo]:
                covered.append((lo, tile))
        assert sorted(covered) == [(b, t) for b, n in enumerate(lengths) for t in range(-(-n // bq))]
        assert go.q_programs <= cu[-1] // bq + len(lengths)


def test_num_splits_below_one_is_refused():
    with pytest.raises(CompileError, match="num_splits must be at least 1"):
        plan_for(attnc.parse(DENSE)[0], options=PlanOptions(num_splits=0))


def test_plan_shows_the_decode_tile():
    assert "split-KV up to" in plan_for(attnc.parse(DENSE)[0]).describe()


# ---------------------------------------------------------------- on the GPU (bf16 / fp16 at serving sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("spec", stored_examples(), ids=lambda s: s.name)
def test_example_spec_gpu(spec, dtype):
    spec, q, k, v, kwargs = example_call(with_dtype(spec, dtype), "cuda", q_lengths=(1, 0, 300, 17, 1),
                                         kv_lengths=(5000, 0, 700, 4099, 1), m=3)
    check(spec, q, k, v, splits=(None, 1, 7), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("b, n, m", [(1, 32768, 1), (8, 8192, 1), (64, 4096, 1), (5, 3000, 4), (3, 1, 1)])
def test_paged_decode_gpu(dtype, page, b, n, m):
    spec = parse_one(PAGED.format(dt=dtype, layout="PAGES, PAGE, HKV, D"))
    lengths = [max(0, n - 997 * i) for i in range(b)]
    k, v, table, lens = paged_cache(lengths, page, 8, 128, TORCH[dtype], device="cuda")
    q = torch.randn(b, m, 32, 128, device="cuda").to(TORCH[dtype])
    check(spec, q, k, v, splits=(None, 1), table=table, lens=lens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("m, n, h, hkv, d", [(1, 32768, 32, 8, 128), (1, 8192, 32, 8, 64), (4, 5000, 16, 2, 128),
                                             (2, 4097, 8, 1, 256), (1, 100000, 8, 8, 128)])
def test_dense_split_kv_decode_gpu(dtype, m, n, h, hkv, d):
    spec = with_dtype(parse_one(DENSE.replace("[B, H, M, D]", "[B, M, H, D]").replace("[B, HKV, N, D]",
                                                                                     "[B, N, HKV, D]")), dtype)
    q = torch.randn(2, m, h, d, device="cuda").to(TORCH[dtype])
    k, v = (torch.randn(2, n, hkv, d, device="cuda").to(TORCH[dtype]) for _ in range(2))
    check(spec, q, k, v, splits=(None, 1, 16))


@pytest.mark.gpu
def test_varlen_prefill_gpu():
    spec = with_dtype(parse_one(VARLEN.format(masks="mask causal")), "bf16")
    lengths = [1, 0, 2048, 513, 77, 4000]
    q = torch.randn(sum(lengths), 32, 128, device="cuda").bfloat16()
    k, v = (torch.randn(sum(lengths), 8, 128, device="cuda").bfloat16() for _ in range(2))
    check(spec, q, k, v, cu_q=offsets(lengths, "cuda"), cu_k=offsets(lengths, "cuda"))


@pytest.mark.gpu
def test_features_gpu():
    spec = with_dtype(parse_one(FEATURES.replace("DV]", "D]")), "bf16")
    q_lengths, kv_lengths = [3, 0, 1, 400], [6000, 0, 1, 900]
    k, v, table, lens = paged_cache(kv_lengths, 64, 4, 128, torch.bfloat16, device="cuda")
    q = torch.randn(sum(q_lengths), 16, 128, device="cuda").bfloat16()
    kwargs = dict(cu_q=offsets(q_lengths, "cuda"), table=table, lens=lens, slopes=torch.rand(16, device="cuda"),
                  sinks=torch.randn(16, device="cuda"), tok=torch.randn(sum(q_lengths), device="cuda"),
                  allowed=torch.rand(4, table.shape[1] * 64, device="cuda") < 0.8)
    check(spec, q, k, v, splits=(None, 1, 9), window=3000, **kwargs)


@pytest.mark.gpu
def test_launch_does_not_sync_and_captures_in_a_cuda_graph():
    spec = with_dtype(parse_one(PAGED.format(dt="bf16", layout="PAGES, PAGE, HKV, D")), "bf16")
    k, v, table, lens = paged_cache([3000, 17, 0, 9000], 16, 8, 128, torch.bfloat16, device="cuda")
    q = torch.randn(4, 1, 32, 128, device="cuda").bfloat16()
    kernel = attnc.compile(spec)
    want = kernel(q, k, v, table=table, lens=lens)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernel(q, k, v, table=table, lens=lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = kernel(q, k, v, table=table, lens=lens)
    lens.copy_(torch.tensor([100, 17, 0, 8000], dtype=torch.int32))  # new lengths within the pages, same graph
    graph.replay()
    assert_matches(spec, got, attnc.reference(spec, q, k, v, table=table, lens=lens))
    assert not torch.equal(got[0], want[0])


# ---------------------------------------------------------------- the prepared launch (per-call fast path)


class InterpreterDirect:
    """Stands in for launch.DirectLaunch on CPU: runs the interpreted kernel with exactly the argument list a
    direct launch receives (constexprs included, positionally)."""

    def __init__(self, fn, first_constexpr):
        self.fn, self.first, self.launches = fn, first_constexpr, 0

    def stream(self):
        return 0

    def launch(self, stream, grid, args):
        self.launches += 1
        names = self.fn.arg_names
        cut = names.index(self.first)
        self.fn[grid](*args[:cut], **dict(zip(names[cut:], args[cut:])))


def test_later_calls_take_the_prepared_launch(monkeypatch):
    import attnc.backends.triton.launch as launch

    spec = parse_one(PAGED.format(dt="f32", layout="PAGES, PAGE, HKV, D").replace(
        "mask causal", "param w: i32 = 1000\n    mask causal\n    mask i + (N - M) - j < w"))
    kernel = attnc.compile(spec, options=PlanOptions(num_splits=3))
    k, v, table, lens = paged_cache([40, 0, 77], 16, 2, 32, torch.float32)
    q = torch.randn(3, 2, 8, 32, device=DEVICE)
    kernel(q, k, v, table=table, lens=lens)  # builds the launcher
    (launcher,) = kernel._impls.values()
    stand_ins = [InterpreterDirect(launcher.decode_fn, "BLOCK_M"), InterpreterDirect(launcher.combine_fn, "BLOCK_R")]
    made = iter(stand_ins)
    monkeypatch.setattr(launch, "direct_launch", lambda compiled, device: next(made))
    kernel._prepared.clear()
    kernel(q, k, v, table=table, lens=lens, w=7)  # the full path, which prepares (for these keyword names)
    assert len(kernel._prepared) == 1
    for w in (1000, 5):
        lens = torch.tensor([33, 0, 50], dtype=torch.int32, device=DEVICE)  # within each row's pages
        q = torch.randn(3, 2, 8, 32, device=DEVICE)
        got = kernel(q, k, v, table=table, lens=lens, w=w)
        assert_matches(spec, got, attnc.reference(spec, q, k, v, table=table, lens=lens, w=w))
    assert [s.launches for s in stand_ins] == [2, 2]
    with pytest.raises(attnc.CallError, match="w: param i32"):
        kernel(q, k, v, table=table, lens=lens, w=1.5)
