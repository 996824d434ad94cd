"""Multi-head latent attention (MLA): a score that sums dot products of query-side and key-side tensors
(`(q @ k + qr @ kr) * scale`) and values that are the keys (`@ k`). The language and its checker errors, the
float64 reference against a direct einsum, and the Triton decode kernel (dense, paged at pages of 16 and 64,
ragged; split-KV included; a page size bound by `dims`, whole key tiles to a page or not, with bad page ids)
against the reference with NaN-poisoned outputs, on the CPU through Triton's interpreter. The benchmark's grid
(bf16 and FP8 latents, on the GPU with `-m gpu`): tests/test_mla_grid.py."""
import contextlib
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.dsl.check import check_attention
from attnc.errors import CallError, CompileError, SpecError
from attnc.passes import Target, plan_kernel
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, assert_matches, poisoned_outputs,
)

pytestmark = pytest.mark.shared_cache

D, DR = 64, 16
SPECS = attnc.parse(f"""
attention mla_dense {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: f32[B, N, HKV, D]
    input qr: f32[B, M, H, DR]
    input kr: f32[B, N, HKV, DR]
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    return softmax(score) @ k, lse
}}
attention mla_paged {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: f32[PAGES, PAGE, HKV, D]
    input qr: f32[B, M, H, DR]
    input kr: f32[PAGES, PAGE, HKV, DR]
    paged k by block_table, kv_len
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}}
attention mla_ragged {{
    dims D = {D}, DR = {DR}
    q: f32[T, H, D]
    k: f32[TK, HKV, D]
    input qr: f32[T, H, DR]
    input kr: f32[TK, HKV, DR]
    ragged q by cu_seqlens_q
    ragged k by cu_seqlens_k
    param scale: f32 = 0.125
    score = qk * scale + qr @ kr * scale
    mask causal
    return softmax(score) @ k
}}
""", "mla_test.attn")
DENSE, PAGED, RAGGED = SPECS
SCALE = 0.11


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def _compile(spec):
    return attnc.compile(spec, backend="triton")


# ---------------------------------------------------------------- the language


def test_the_spelling_is_canonical_and_round_trips():
    assert DENSE.shares_kv and DENSE.is_latent and DENSE.decode_only
    assert [attnc.ir.print_expr(d) for d in DENSE.dots] == ["qk", "qr @ kr"]
    assert "score = (qk + qr @ kr) * scale" in DENSE.canonical
    assert "return softmax(score) @ k, lse" in DENSE.canonical and "    v:" not in DENSE.canonical
    assert "paged k by block_table, kv_len" in PAGED.canonical
    for spec in SPECS:
        again = attnc.parse(spec.canonical)[0]
        assert again == spec and again.key == spec.key
    # a spec with `q @ k` is the spec with `qk`: the same key, hence the same kernel
    plain = "attention a {{ q: f32[B, H, M, D] k: f32[B, H, N, D] v: f32[B, H, N, D] score = {} " \
            "return softmax(score) @ v }}"
    assert attnc.parse(plain.format("q @ k * 0.5"))[0].key == attnc.parse(plain.format("qk * 0.5"))[0].key
    assert not attnc.parse(plain.format("qk"))[0].is_latent


def test_the_example_specs_check():
    specs = attnc.parse_file("examples/specs/mla.attn")
    assert [s.name for s in specs] == ["mla_decode", "mla_paged"]
    assert all(s.shares_kv and s.one_kv_head and s.dim_values["D"] == 512 and s.dim_values["DR"] == 64
               for s in specs)
    assert specs[1].dim_values["PAGE"] == 64


def _decl(shape_q="B, M, H, D", shape_k="B, N, HKV, D"):
    return (f"attention a {{\n    dims DR = 16\n    q: f32[{shape_q}]\n    k: f32[{shape_k}]\n"
            f"    input qr: f32[B, M, H, DR]\n    input kr: f32[B, N, HKV, DR]\n")


ERRORS = [
    # (source, line, col, caret, fragment)
    (_decl() + "    score = qr @ q\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 6,
     "a dot product of two query-side tensors (qr and q)"),
    (_decl() + "    score = k @ kr\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 6,
     "a dot product of two key-side tensors"),
    (_decl() + "    score = kr @ qr\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 7,
     "kr is key-side and qr query-side: write `qr @ kr`"),
    (_decl() + "    score = q @ kr\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 6,
     "a dot product pairs one head dim, but q's is D and kr's is DR"),
    (_decl() + "    score = qr @ kx\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 7,
     "kx cannot be in a dot product: not a tensor"),
    (_decl() + "    score = qr @ v\n    return softmax(score) @ k\n}\n", 7, 13, "^" * 6,
     "v cannot be in a dot product"),
    (_decl() + "    input w: f32[H, DR]\n    score = qr @ w\n    return softmax(score) @ k\n}\n", 8, 13, "^" * 6,
     "its shape [H, DR] is not q's or k's"),
    (_decl().replace("input kr: f32", "input kr: f16") + "    score = qr @ kr\n    return softmax(score) @ k\n}\n",
     7, 13, "^" * 7, "it is f16 but k is f32"),
    (_decl() + "    v: f32[B, N, HKV, D]\n    return softmax(score) @ k\n}\n", 8, 29, "^",
     "v is declared, so write `@ v`, not `@ k`"),
    (_decl() + "    v: f32[B, N, HKV, D]\n    return softmax(score) @ qr\n}\n", 8, 29, "^^",
     "write `@ v` (or `@ k` where the keys are"),
    (_decl("B, M, H, D", "PAGES, PAGE, HKV, D").replace("[B, N, HKV, DR]", "[PAGES, PAGE, HKV, DR]")
     + "    paged k, v by block_table, kv_len\n    return softmax(score) @ k\n}\n", 7, 5, "^" * 33,
     "the values are k here (`return softmax(score) @ k`), so there is no v to store: write `paged k by ...`"),
    (_decl("B, M, H, D", "PAGES, PAGE, HKV, D").replace("[B, N, HKV, DR]", "[PAGES, PAGE, HKV, DR]")
     + "    v: f32[PAGES, PAGE, HKV, D]\n    paged k by block_table, kv_len\n    return softmax(score) @ v\n}\n",
     8, 5, "^" * 30, "k and v share their storage: write `paged k, v by block_table, kv_len`"),
    (_decl() + "    mask qr @ kr > 0\n    return softmax(score) @ k\n}\n", 7, 10, "^" * 7, "a mask cannot depend on qk"),
    (_decl("B, M, H, D", "B, N, D") + "    v: f32[B, N, D]\n    return softmax(score) @ v\n}\n", 4, 5, "^" * 15,
     "k's shape lacks its head size H or HKV; write e.g. k: f32[B, HKV, N, D] (one K/V head may go without its "
     "axis only where the values are the keys"),
]


@pytest.mark.parametrize("source, line, col, caret, fragment", ERRORS, ids=[e[4][:40] for e in ERRORS])
def test_checker_errors_point_at_the_misuse(source, line, col, caret, fragment):
    with pytest.raises(SpecError) as info:
        attnc.parse(source, "bad.attn")
    head, *rest = info.value.diagnostics[0].format().split("\n")
    assert head.startswith(f"bad.attn:{line}:{col}: ") and fragment in head, head
    assert rest == [f"    {source.splitlines()[line - 1]}", "    " + " " * (col - 1) + caret]


def test_ir_built_in_python_is_checked_alike():
    bad = replace(DENSE, score=attnc.ir.QK("qr", "q"))
    with pytest.raises(SpecError, match="two query-side tensors"):
        check_attention(bad)


# ---------------------------------------------------------------- the reference


def _dense_call(b, m, h, n, hkv=1):
    q, qr = _randn(b, m, h, D), _randn(b, m, h, DR)
    k, kr = _randn(b, n, hkv, D), _randn(b, n, hkv, DR)
    return q, k, dict(qr=qr, kr=kr, scale=SCALE)


def test_reference_is_the_einsum():
    torch.manual_seed(0)
    q, k, kw = _dense_call(2, 3, 4, 50, hkv=2)
    out, lse = attnc.reference(DENSE, q, k, **kw)
    group = 2  # query head h reads latent head h // 2
    kk, kr = (t.double().repeat_interleave(group, dim=2) for t in (k, kw["kr"]))
    s = (torch.einsum("bmhd,bnhd->bhmn", q.double(), kk)
         + torch.einsum("bmhd,bnhd->bhmn", kw["qr"].double(), kr)) * SCALE
    torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, torch.einsum("bhmn,bnhd->bmhd", s.softmax(-1), kk), rtol=1e-12, atol=1e-12)


def test_calls_name_the_argument():
    q, k, kw = _dense_call(1, 1, 4, 20)
    with pytest.raises(CallError, match=r"v: attention 'mla_dense' returns `@ k`.*mla_dense\(q, k, \*"):
        attnc.reference(DENSE, q, k, k, **kw)
    with pytest.raises(CallError, match="kr: missing input tensor"):
        attnc.reference(DENSE, q, k, qr=kw["qr"], scale=SCALE)
    with pytest.raises(CallError, match="DR"):
        attnc.reference(DENSE, q, k, **dict(kw, kr=_randn(1, 20, 1, DR + 1)))


# ---------------------------------------------------------------- the Triton kernel


@pytest.mark.parametrize("b, m, h, n, hkv", [
    (1, 1, 8, 300, 1),   # decode, all 8 heads packed into one tile's rows; split-KV merged through lse
    (2, 4, 4, 100, 1),   # a few tokens per sequence
    (2, 3, 8, 120, 2),   # two latent heads
    (1, 40, 4, 90, 1),   # prefill rows past the decode tile
])
def test_dense_kernel_matches_the_reference(b, m, h, n, hkv):
    torch.manual_seed(b * 1000 + m * 100 + n)
    q, k, kw = _dense_call(b, m, h, n, hkv)
    assert_matches(DENSE, _compile(DENSE)(q, k, **kw), attnc.reference(DENSE, q, k, **kw), tol=1e-5)


def _paged_call(page, lengths, m, h, hkv=1):
    b = len(lengths)
    maxp = max(1, max(-(-n // page) for n in lengths))
    pages = b * maxp + 2
    table = torch.randperm(pages)[:b * maxp].view(b, maxp).int()  # shuffled pages
    q, qr = _randn(b, m, h, D), _randn(b, m, h, DR)
    k, kr = _randn(pages, page, hkv, D), _randn(pages, page, hkv, DR)
    return q, k, dict(qr=qr, kr=kr, block_table=table.to(DEVICE), kv_len=torch.tensor(lengths).int().to(DEVICE),
                      scale=SCALE)


@pytest.mark.parametrize("page, lengths, m, h", [
    (16, [100, 37, 0, 1], 1, 8),
    (16, [250], 3, 4),   # one sequence: split-KV
    (64, [200, 65, 64], 2, 8),
])
def test_paged_kernel_matches_the_reference(page, lengths, m, h):
    torch.manual_seed(page + sum(lengths))
    q, k, kw = _paged_call(page, lengths, m, h)
    assert_matches(PAGED, _compile(PAGED)(q, k, **kw), attnc.reference(PAGED, q, k, **kw), tol=1e-5)


def _bound_page(page):
    """PAGED with its page size bound by `dims`: the kernel then knows whether a page holds whole key tiles."""
    return replace(PAGED, dims=tuple(sorted({**PAGED.dim_values, "PAGE": page}.items())))


# The interpreter's key tile is 16 wide: pages of 32 hold two whole tiles (one page id a tile, read once, and the
# tile's in-page offsets fixed), pages of 24 do not (a page id per key column, as for an unbound PAGE).
@pytest.mark.parametrize("page", [32, 24])
@pytest.mark.parametrize("lengths, m", [([100, 37, 0, 1], 1), ([250], 1), ([75, 40], 3)], ids=["batch", "split", "causal"])
def test_a_page_bound_by_dims_matches_the_reference(page, lengths, m):
    spec = _bound_page(page)
    torch.manual_seed(page * 7 + sum(lengths) + m)
    q, k, kw = _paged_call(page, lengths, m, 8)  # the table: a random permutation of the pool's pages
    assert_matches(spec, _compile(spec)(q, k, **kw), attnc.reference(spec, q, k, **kw), tol=1e-5)


@pytest.mark.parametrize("page", [32, 24])
def test_bad_page_ids_of_a_bound_page_are_flagged_and_poisoned(page):
    """A page id out of range in a sequence's pages poisons that sequence's rows (NaN) and is recorded; the other
    rows match the reference, and garbage past a sequence's last page is never read."""
    spec = _bound_page(page)
    torch.manual_seed(page)
    lengths = [70, 100, 37]  # none a multiple of 16, 24 or 32
    q, k, kw = _paged_call(page, lengths, 1, 8)
    pages, table = k.shape[0], kw["block_table"]
    want = attnc.reference(spec, q, k, **kw)
    bad = table.clone()
    bad[1, 2] = pages + 1000  # sequence 1's third page, read by the kernel
    bad[2, table.shape[1] - 1] = -5  # past sequence 2's last page: never read
    kern = _compile(spec)
    with contextlib.suppress(CallError):
        attnc.check_errors()  # clears whatever an earlier test left
    out, lse = kern(q, k, **dict(kw, block_table=bad))
    assert out[1].isnan().all() and lse[1].isnan().all()
    for b in (0, 2):
        torch.testing.assert_close(out[b].double(), want[0][b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[b].double(), want[1][b], rtol=1e-5, atol=1e-5)
    with pytest.raises(CallError, match=rf"^block_table: block_table\[1, 2\] = {pages + 1000} is not a page id"):
        attnc.check_errors()
    attnc.check_errors()  # one record: the unread entry of sequence 2 was not flagged


def test_the_paged_example_runs_at_its_page_of_64():
    spec = next(s for s in attnc.parse_file("examples/specs/mla.attn") if s.name == "mla_paged")
    spec = replace(spec, q=replace(spec.q, dtype="f32"), k=replace(spec.k, dtype="f32"),
                   v=replace(spec.v, dtype="f32"),
                   inputs=tuple(replace(t, dtype="f32") if t.dtype == "bf16" else t for t in spec.inputs))
    assert spec.shares_kv
    torch.manual_seed(5)
    lengths, h, m = [130, 7], 4, 1
    b, maxp, pages = 2, 3, 7
    table = torch.randperm(pages)[:b * maxp].view(b, maxp).int()
    q, qr = _randn(b, m, h, 512), _randn(b, m, h, 64)
    k, kr = _randn(pages, 64, 512), _randn(pages, 64, 64)  # one K/V head: no head axis
    kw = dict(qr=qr, kr=kr, block_table=table, kv_len=torch.tensor(lengths).int(), scale=192 ** -0.5)
    assert_matches(spec, _compile(spec)(q, k, **kw), attnc.reference(spec, q, k, **kw), tol=1e-5)


def test_ragged_kernel_matches_the_reference():
    torch.manual_seed(7)
    q_lengths, kv_lengths, h = [3, 0, 1, 6], [40, 0, 1, 70], 4
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()]).int()
    cu_k = torch.tensor([0, *torch.tensor(kv_lengths).cumsum(0).tolist()]).int()
    t, tk = sum(q_lengths), sum(kv_lengths)
    q, qr, k, kr = _randn(t, h, D), _randn(t, h, DR), _randn(tk, 1, D), _randn(tk, 1, DR)
    kw = dict(qr=qr, kr=kr, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_matches(RAGGED, _compile(RAGGED)(q, k, **kw), attnc.reference(RAGGED, q, k, **kw), tol=1e-5)


def test_the_latent_tile_is_read_once():
    from attnc.backends.triton.decode import generate_decode

    for spec in SPECS:
        source = generate_decode(plan_kernel(spec, Target("triton", "cpu", None), D, D))
        assert "v_tile = tl.trans(k_tile)" in source and "v_tile = tl.load" not in source
        assert "qk_1 = tl.dot(qdot1_tile, kdot1_tile" in source


def test_the_latent_tile_fits_shared_memory_once():
    """On sm_90 the D = 512 latent gets DECODE_TUNED's row, and the stages that fit are counted with the latent
    tile once (values are keys) and k_pe's tile beside it, 576 wide: what Triton allocates (benchmarks/
    compile_mla_sm90.py: 64x32 at 3 stages 185344 B, fits; 64x64 at 3 stages 295936 B, does not)."""
    from attnc.passes import PlanOptions
    from attnc.passes.decode import tile_widths
    from attnc.passes.plan import TileConfig

    sm90 = Target("triton", "cuda", 90)
    for spec in attnc.parse_file("examples/specs/mla.attn"):
        plan = plan_kernel(spec, sm90, 512, 512)
        assert tile_widths(plan) == (512 + 64, 0)
        assert plan.decode.tile == TileConfig(64, 64, 8, 2)
        assert plan_kernel(spec, sm90, 512, 512, PlanOptions(block_n=32, num_stages=3)).decode.tile.num_stages == 3
        assert plan_kernel(spec, sm90, 512, 512, PlanOptions(block_n=64, num_stages=3)).decode.tile.num_stages == 2
    plain = attnc.parse("attention a { q: bf16[B, H, M, D] k: bf16[B, H, N, D] v: bf16[B, H, N, D] "
                        "return softmax(score) @ v }")[0]
    assert tile_widths(plan_kernel(plain, sm90, 512, 512)) == (512, 512)


def test_what_mla_does_not_run_on_says_so():
    with pytest.raises(CompileError, match="backend='triton'"):
        plan_kernel(DENSE, Target("tvm", "cpu", None), D, D)
    unbound = attnc.parse(_decl().replace("dims DR = 16\n", "") + "    score = qk + qr @ kr\n"
                          "    return softmax(score) @ k\n}\n")[0]
    with pytest.raises(CompileError, match="dims DR = ..."):
        plan_kernel(unbound, Target("triton", "cpu", None), D, D)
    q, k, kw = _dense_call(1, 1, 4, 20)
    with pytest.raises(CallError, match="q: requires grad.*no backward"):
        _compile(DENSE)(q.requires_grad_(), k, **kw)


ONE_HEAD = attnc.parse(f"""
attention one_head_dense {{
    dims D = {D}, DR = {DR}
    q: f32[B, H, M, D]
    k: f32[B, N, D]
    input qr: f32[B, H, M, DR]
    input kr: f32[B, N, DR]
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    return softmax(score) @ k, lse
}}
attention one_head_paged {{
    dims D = {D}, DR = {DR}
    q: f32[B, M, H, D]
    k: f32[PAGES, PAGE, D]
    input qr: f32[B, M, H, DR]
    input kr: f32[PAGES, PAGE, DR]
    paged k by block_table, kv_len
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}}
attention one_head_ragged {{
    dims D = {D}, DR = {DR}
    q: f32[T, H, D]
    k: f32[TK, D]
    input qr: f32[T, H, DR]
    input kr: f32[TK, DR]
    ragged q by cu_q
    ragged k by cu_k
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}}
""")


@pytest.mark.parametrize("spec", ONE_HEAD, ids=lambda s: s.name)
def test_a_latent_cache_without_a_head_axis(spec):
    """k [.., N, D] without a head axis is one K/V head: the same numbers as the [.., N, 1, D] view through the
    spec with HKV, in the reference and in the kernel."""
    assert spec.one_kv_head and spec.is_gqa_shape
    torch.manual_seed(len(spec.name))
    h = 8
    if isinstance(spec.kv_storage, attnc.ir.Paged):
        q, k, kw = _paged_call(16, [90, 17, 0], 2, h)
        k, kw["kr"] = k[:, :, 0], kw["kr"][:, :, 0]
    elif spec.q_storage is not None:
        cu_q, cu_k = torch.tensor([0, 3, 3, 5]).int(), torch.tensor([0, 40, 41, 100]).int()
        q, k = _randn(5, h, D), _randn(100, D)
        kw = dict(qr=_randn(5, h, DR), kr=_randn(100, DR), cu_q=cu_q, cu_k=cu_k)
    else:
        q, k = _randn(2, h, 3, D), _randn(2, 90, D)
        kw = dict(qr=_randn(2, h, 3, DR), kr=_randn(2, 90, DR))
    kw["scale"] = SCALE
    want = attnc.reference(spec, q, k, **kw)
    axis = spec.q.shape.index("H") if spec.kv_storage is None else len(spec.k.shape) - 1  # where q has its heads

    def with_head(t):  # a head axis of HKV where q's layout has its head axis
        return replace(t, shape=t.shape[:axis] + ("HKV",) + t.shape[axis:])

    k_axis = with_head(spec.k)
    with_axis = replace(spec, k=k_axis, v=k_axis, inputs=tuple(with_head(t) if t.name == "kr" else t
                                                                 for t in spec.inputs))
    check_attention(with_axis)
    viewed = attnc.reference(with_axis, q, k.unsqueeze(axis), **dict(kw, kr=kw["kr"].unsqueeze(axis)))
    torch.testing.assert_close(want, viewed, rtol=0, atol=0)
    assert_matches(spec, _compile(spec)(q, k, **kw), want, tol=1e-5)


# ---------------------------------------------------------------- the decorator


@attnc.attention(layout="BSHD", backend="triton")
def mla_dense(q, k, *, qr: attnc.Tensor, kr: attnc.Tensor, scale: float):
    return attnc.softmax((q @ k + qr @ kr) * scale) @ k


def test_the_decorator_traces_the_text_spec():
    torch.manual_seed(11)
    q, k, kw = _dense_call(2, 2, 4, 80)
    out = mla_dense(q, k, **kw)
    # the text form's spec (which also binds D) with D left to the tensors: the same key, the same kernel
    assert mla_dense.spec.key == replace(DENSE, dims=(("DR", DR),), returns_lse=False).key
    want = attnc.reference(DENSE, q, k, **kw)[0]
    assert not out.isnan().any() and (out.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_decorator_mistakes_are_attnc_errors():
    q, k, kw = _dense_call(1, 1, 4, 20)
    with pytest.raises(CallError, match=r"mla_dense\(q, k, \*"):
        mla_dense(q, k, k, **kw)

    @attnc.attention(layout="BSHD")
    def takes_v(q, k, v, *, qr: attnc.Tensor, kr: attnc.Tensor):
        return attnc.softmax(q @ k + qr @ kr) @ k

    with pytest.raises(attnc.AttncError, match="returns `p @ k`, but takes v"):
        takes_v.trace(q, k, k, qr=kw["qr"], kr=kw["kr"])

    @attnc.attention(layout="BSHD")
    def two_queries(q, k, *, qr: attnc.Tensor, kr: attnc.Tensor):
        return attnc.softmax(q @ k + qr @ qr) @ k

    with pytest.raises(SpecError, match="a dot product of two query-side tensors"):
        two_queries.trace(q, k, qr=kw["qr"], kr=kw["kr"])


# ---------------------------------------------------------------- the parts alone


VARIANTS = attnc.parse(f"""
attention rope_part_with_v {{
    dims DV = 32
    q: f32[B, H, M, D]
    k: f32[B, HKV, N, D]
    v: f32[B, HKV, N, DV]
    input qr: f32[B, H, M, D]
    input kr: f32[B, HKV, N, D]
    score = (qk + qr @ kr) * rsqrt(2 * D)
    mask causal
    return softmax(score) @ v, lse
}}
attention keys_are_values {{
    q: f32[B, H, M, D]
    k: f32[B, HKV, N, D]
    score = qk * rsqrt(D) + (j - i) * 0.01
    mask i + (N - M) - j < 50
    return softmax(score) @ k, lse
}}
""")


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [1, 20])
def test_a_second_dot_product_or_shared_values_alone(spec, m):
    torch.manual_seed(m)
    b, h, hkv, n, d = 2, 4, 2, 130, 32
    q, k = _randn(b, h, m, d), _randn(b, hkv, n, d)
    args = (q, k) if spec.shares_kv else (q, k, _randn(b, hkv, n, 32))
    kw = {} if spec.shares_kv else dict(qr=_randn(b, h, m, d), kr=_randn(b, hkv, n, d))
    assert spec.is_latent
    assert_matches(spec, _compile(spec)(*args, **kw), attnc.reference(spec, *args, **kw), tol=1e-5)


def test_torch_compile_traces_a_latent_call():
    kern = _compile(DENSE)
    torch.manual_seed(3)
    q, k, kw = _dense_call(1, 2, 4, 40)
    run = torch.compile(lambda q, k, qr, kr: kern(q, k, qr=qr, kr=kr, scale=SCALE), fullgraph=True)
    assert_matches(DENSE, run(q, k, kw["qr"], kw["kr"]), attnc.reference(DENSE, q, k, **kw), tol=1e-5)
