"""Paged K/V caches and packed (ragged) batches: the `paged` / `ragged` statements, their checks, the binder and
the float64 reference against per-sequence formulas written out in torch."""
import math
import random
from dataclasses import dataclass

import pytest
import torch

import attnc
from attnc import ir
from attnc.dsl.check import attention_diagnostics, check_attention
from attnc.dsl.parser import parse
from attnc.dsl.signature import bind, canonical_view, lse_shape, out_shape
from attnc.errors import CallError, SpecError

pytestmark = pytest.mark.shared_cache

TOL = dict(rtol=1e-10, atol=1e-12)
INF = math.inf

# q, k, v declarations per storage; `DV` only where a test wants a distinct value head dim.
Q_DECL = {
    "dense": "q: f32[B, H, M, D]",
    "bshd": "q: f32[B, M, H, D]",
    "ragged": "q: f32[T, H, D]\n    ragged q by cu_q",
}
KV_DECL = {
    "dense": "k: f32[B, HKV, N, D]\n    v: f32[B, HKV, N, DV]",
    "bshd": "k: f32[B, N, HKV, D]\n    v: f32[B, N, HKV, DV]",
    "ragged": "k: f32[TK, HKV, D]\n    v: f32[TK, HKV, DV]\n    ragged k, v by cu_k",
    "paged": "k: f32[PAGES, PAGE, HKV, D]\n    v: f32[PAGES, PAGE, HKV, DV]\n    paged k, v by table, lens",
    "paged_bhsd": "k: f32[PAGES, HKV, PAGE, D]\n    v: f32[PAGES, HKV, PAGE, DV]\n    paged k, v by table, lens",
}


def make_spec(q_kind: str, kv_kind: str, body: str = "", lse: bool = True, sink: str | None = None):
    sink_arg = "" if sink is None else f", sink={sink}"
    text = (f"attention t {{\n    {Q_DECL[q_kind]}\n    {KV_DECL[kv_kind]}\n{body}"
            f"    return softmax(score{sink_arg}) @ v{', lse' if lse else ''}\n}}\n")
    (spec,) = parse(text, "t.attn")
    return spec


# ---------------------------------------------------------------- language: parse, print, keys


def test_paged_statement_gives_storage_and_declares_its_tensors():
    spec = make_spec("bshd", "paged", "    mask causal\n")
    assert spec.kv_storage == ir.Paged("table", "lens") and spec.q_storage is None
    assert spec.inputs == (ir.TensorDecl("lens", "i32", ("B",)), ir.TensorDecl("table", "i32", ("B", "MAXP")))
    assert spec.masks == (ir.causal_mask(),)
    assert "    paged k, v by table, lens\n" in spec.canonical and "input" not in spec.canonical


def test_ragged_statements_share_one_offsets_tensor():
    (spec,) = parse("attention s { q: f16[T, H, D] k: f16[TK, H, D] v: f16[TK, H, D] ragged q by cu "
                    "ragged k, v by cu return softmax(score) @ v }")
    assert spec.q_storage == spec.kv_storage == ir.Ragged("cu")
    assert spec.inputs == (ir.TensorDecl("cu", "i32", ("B1",)),)


@pytest.mark.parametrize("q_kind, kv_kind", [
    (q, kv) for q in ("dense", "bshd", "ragged") for kv in ("dense", "bshd", "ragged", "paged", "paged_bhsd")
    if (q, kv) not in (("dense", "bshd"), ("bshd", "dense"))])  # dense q, k and v share one layout
def test_every_combination_round_trips_through_the_printer(q_kind, kv_kind):
    spec = make_spec(q_kind, kv_kind, "    input slopes: f32[H]\n    param w: i32 = 7\n"
                                      "    score = qk * rsqrt(D) + slopes[h] * (j - i)\n    mask causal\n"
                                      "    mask i + (N - M) - j < w\n", sink="slopes[h]")
    (again,) = parse(spec.canonical, "printed.attn")
    assert again == spec and again.key == spec.key and again.canonical == spec.canonical
    assert attention_diagnostics(spec) == []


def test_example_specs_use_the_new_storage():
    specs = {s.name: s for name in ("paged_decode", "varlen")
             for s in attnc.parse_file(f"examples/specs/{name}.attn")}
    assert specs["paged_decode"].kv_storage == ir.Paged("block_table", "kv_len")
    assert specs["paged_decode_local"].dim_values == {"PAGE": 16}
    assert specs["paged_prefill"].q_storage == ir.Ragged("cu_seqlens_q")
    assert specs["varlen_causal"].kv_storage == ir.Ragged("cu_seqlens_k")
    assert specs["varlen_alibi_sinks"].q_storage == specs["varlen_alibi_sinks"].kv_storage == ir.Ragged("cu_seqlens")


QKV_PAGED = "q: bf16[B, H, M, D]\nk: bf16[PAGES, PAGE, HKV, D]\nv: bf16[PAGES, PAGE, HKV, D]\n"
QKV_RAGGED = "q: bf16[T, H, D]\nk: bf16[TK, HKV, D]\nv: bf16[TK, HKV, D]\n"


def one(text: str) -> ir.Attention:
    (spec,) = parse(f"attention a {{\n{text}return softmax(score) @ v\n}}\n", "t.attn")
    return spec


@pytest.mark.parametrize("a, b", [
    # the statement's place among the declarations
    (QKV_PAGED + "paged k, v by bt, kl\nmask causal\n", "mask causal\npaged k, v by bt, kl\n" + QKV_PAGED),
    # k and v in either order
    (QKV_PAGED + "paged k, v by bt, kl\n", QKV_PAGED + "paged v, k by bt, kl\n"),
    (QKV_RAGGED + "ragged q by cq\nragged k, v by ck\n", "ragged v, k by ck\n" + QKV_RAGGED + "ragged q by cq\n"),
    # the storage's tensors declared by the statement join the inputs sorted by name
    (QKV_RAGGED + "ragged q by cq\nragged k, v by ck\ninput a: f32[H]\nscore = qk + a[h]\n",
     "input a: f32[H]\n" + QKV_RAGGED + "score = qk + a[h]\nragged k, v by ck\nragged q by cq\n"),
])
def test_equivalent_spellings_give_one_key(a, b):
    x, y = one(a), one(b)
    assert x == y and x.key == y.key


def test_different_storage_gives_different_keys():
    keys = {one(text).key for text in (
        QKV_PAGED + "paged k, v by bt, kl\n",
        QKV_PAGED + "paged k, v by kl, bt\n",  # the roles of the two tensors swap
        QKV_PAGED.replace("[PAGES, PAGE, HKV, D]", "[PAGES, HKV, PAGE, D]") + "paged k, v by bt, kl\n",
        QKV_RAGGED + "ragged q by cq\nragged k, v by ck\n",
        QKV_RAGGED + "ragged q by c\nragged k, v by c\n",
        "q: bf16[T, H, D]\n" + QKV_PAGED.split("\n", 1)[1] + "ragged q by cq\npaged k, v by bt, kl\n",
        "q: bf16[B, H, M, D]\nk: bf16[B, HKV, N, D]\nv: bf16[B, HKV, N, D]\n",
    )}
    assert len(keys) == 7


def test_storage_roles_and_index_tensors_can_be_used_in_expressions():
    # a per-token bias of a packed batch reads the sequence start from the offsets; PAGE and MAXP are sizes
    spec = one("q: bf16[T, H, D]\nk: bf16[PAGES, PAGE, HKV, D]\nv: bf16[PAGES, PAGE, HKV, D]\n"
               "ragged q by cq\npaged k, v by bt, kl\ninput tok: f32[T]\n"
               "score = qk + tok[cq[b] + i]\nmask j < MAXP * PAGE and kl[b] > 0 and i < M and j < N and b < B\n")
    assert attention_diagnostics(spec) == []
    assert ir.Lookup("tok", (ir.Binary("+", ir.Lookup("cq", (ir.IndexVar("b"),)), ir.IndexVar("i")),)) \
        in list(ir.walk(spec.score))


# ---------------------------------------------------------------- language: misuse


def _at(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """(line, col) of the nth occurrence of `needle` in `text`, 1-based."""
    pos = -1
    for _ in range(nth + 1):
        pos = text.index(needle, pos + 1)
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def spec_text(q="q: bf16[B, H, M, D]", k="k: bf16[PAGES, PAGE, HKV, D]", v="v: bf16[PAGES, PAGE, HKV, D]",
              extra="paged k, v by bt, kl") -> str:
    return f"attention a {{\n    {q}\n    {k}\n    {v}\n    {extra}\n    return softmax(score) @ v\n}}\n"


# (source, the text the first diagnostic points at, message fragment)
MISUSE = [
    # paged without the lengths, or with too many tensors
    (spec_text(extra="paged k, v by bt"), "paged k, v by bt",
     "paged takes two tensors, the block table and the key lengths, but 1 is given: write `paged k, v by "
     "block_table, kv_len`"),
    (spec_text(extra="paged k, v by bt, kl, x"), "paged k, v by bt, kl, x", "but 3 are given"),
    # a paged shape without the statement, and the statement with a dense shape
    (spec_text(extra="mask causal"), "k: bf16[PAGES",
     "k's shape may hold only the roles B, H, HKV, N, D, not 'PAGES'; [PAGES, PAGE, HKV, D] is the shape of a "
     "paged k: add `paged k, v by block_table, kv_len`"),
    (spec_text(k="k: bf16[B, HKV, N, D]", v="v: bf16[B, HKV, N, D]"), "k: bf16[B",
     "k's shape may hold only the roles PAGES, PAGE, H, HKV, D, not 'B'; k is paged, so its shape is "
     "[PAGES, PAGE, HKV, D] in some order"),
    (spec_text(k="k: bf16[PAGES, HKV, D]"), "k: bf16[PAGES, HKV",
     "k's shape lacks its page slot size PAGE; write e.g. k: bf16[PAGES, PAGE, HKV, D]"),
    (spec_text(v="v: bf16[PAGE, PAGES, HKV, D]"), "v: bf16[PAGE,",
     "v's layout [PAGE, PAGES, HKV, D] differs from k's [PAGES, PAGE, HKV, D]: k and v must share one layout"),
    # only k and v are paged, together
    (spec_text(extra="paged q by bt, kl"), "q by", "q cannot be paged"),
    (spec_text(extra="paged k by bt, kl"), "paged k by", "k and v share their storage: write `paged k, v by"),
    (spec_text(extra="paged k, w by bt, kl"), "w by", "paged applies to k, v, not 'w'"),
    # ragged q: its shape, its statement
    (spec_text(q="q: bf16[T, H, D]", extra="paged k, v by bt, kl"), "q: bf16[T",
     "q's shape may hold only the roles B, H, M, D, not 'T'; [T, H, D] is the shape of a ragged q: add "
     "`ragged q by cu_seqlens_q`"),
    (spec_text(extra="ragged q by cu\n    paged k, v by bt, kl"), "q: bf16[B",
     "q's shape may hold only the roles T, H, D, not 'B'; q is ragged, so its shape is [T, H, D] in some order"),
    (spec_text(q="q: bf16[T, H, D]", extra="ragged q by cu, cu2\n    paged k, v by bt, kl"), "ragged q by cu, cu2",
     "ragged takes one tensor, the sequence offsets, but 2 are given: write `ragged q by cu_seqlens_q`"),
    (spec_text(q="q: bf16[T, H, D]", k="k: bf16[TK, HKV, D]", v="v: bf16[TK, HKV, D]",
               extra="ragged q, k, v by cu"), "ragged q, k, v by cu",
     "ragged q and ragged k, v are two statements (they may name the same offsets)"),
    # ragged q with 4-D k: ragged k, v must be [TK, HKV, D]
    (spec_text(q="q: bf16[T, H, D]", k="k: bf16[B, HKV, N, D]", v="v: bf16[B, HKV, N, D]",
               extra="ragged q by cu\n    ragged k, v by cu"), "k: bf16[B",
     "k's shape may hold only the roles TK, H, HKV, D, not 'B'; k is ragged, so its shape is [TK, HKV, D]"),
    # k and v are ragged or paged, not both; one statement per tensor
    (spec_text(extra="paged k, v by bt, kl\n    ragged k, v by cu"), "ragged k, v by cu",
     "a second storage for k and v: line 5 already has `paged ...` (ragged and paged do not combine"),
    (spec_text(extra="paged k, v by bt, kl\n    paged v, k by bt, kl"), "paged v, k", "a second storage"),
    # the tensors a statement declares are not declared again, and keep to their roles
    (spec_text(extra="input kl: i32[B]\n    paged k, v by bt, kl"), "input kl",
     "'kl' is declared by `paged ...` on line 6 (as i32[B]); remove this `input` line"),
    (spec_text(extra="paged k, v by bt, bt"), "paged k, v by bt, bt",
     "bt is the key lengths of `paged k, v by bt, bt`, so it must be i32[B], but it is i32[B, MAXP]"),
    (spec_text(q="q: bf16[T, H, D]", extra="ragged q by bt\n    paged k, v by bt, kl"), "paged k, v by bt, kl",
     "bt is the block table of `paged k, v by bt, kl`, so it must be i32[B, MAXP], but it is i32[B1]"),
    (spec_text(extra="param kl: f32\n    paged k, v by bt, kl"), "paged k, v by bt, kl",
     "'kl' is declared twice (first as a param)"),
    (spec_text(extra="paged k, v by bt, lse"), "paged k, v by bt, lse", "'lse' is a reserved word"),
    # per-sequence lengths are no tensor sizes
    (spec_text(extra="paged k, v by bt, kl\n    input doc: i32[B, N]"), "input doc",
     "input doc uses N, but no shape of q, k or v does (k and v are paged: N is each sequence's own length"),
    (spec_text(q="q: bf16[T, H, D]", extra="ragged q by cu\n    paged k, v by bt, kl\n    dims M = 1"), "M = 1",
     "dims uses M, but no shape of q, k or v does (q is ragged"),
    # the new keywords are reserved
    (spec_text(extra="paged k, v by bt, kl\n    param by: f32"), "by:", "'by' is a reserved word"),
    (spec_text(extra="paged k, v bt, kl"), "bt, kl", "unexpected name 'bt'; expected"),
]


@pytest.mark.parametrize("source, needle, fragment", MISUSE, ids=[f"{n}-{m[2][:30]}" for n, m in enumerate(MISUSE)])
def test_misuse_is_reported_at_its_place(source, needle, fragment):
    with pytest.raises(SpecError) as info:
        parse(source, "bad.attn")
    first = info.value.diagnostics[0]
    head, shown, caret = first.format().split("\n")
    line, col = _at(source, needle)
    assert head.startswith(f"bad.attn:{line}:{col}: "), (head, line, col)
    assert fragment in head, head
    assert shown == "    " + source.splitlines()[line - 1] and caret.startswith("    " + " " * (col - 1) + "^")


def test_check_attention_of_ir_built_elsewhere():
    q, k, v = (ir.TensorDecl("q", "f16", ("B", "H", "M", "D")),
               ir.TensorDecl("k", "f16", ("PAGES", "PAGE", "HKV", "D")),
               ir.TensorDecl("v", "f16", ("PAGES", "PAGE", "HKV", "D")))
    good = ir.make_attention("g", q, k, v, kv_storage=ir.Paged("bt", "kl"), masks=[ir.causal_mask()])
    check_attention(good)
    assert (ir.TensorDecl("bt", "i32", ("B", "MAXP")) in good.inputs)
    # the storage's tensors missing from inputs (an Attention built without make_attention), or mis-declared
    bare = ir.Attention("b", q, k, v, kv_storage=ir.Paged("bt", "kl"))
    wrong = ir.make_attention("w", q, k, v, kv_storage=ir.Paged("bt", "kl"),
                              inputs=[ir.TensorDecl("kl", "i64", ("B",))])
    paged_q = ir.make_attention("p", ir.TensorDecl("q", "f16", ("T", "H", "D")), k, v,
                                q_storage=ir.Paged("bt", "kl"), kv_storage=ir.Paged("bt", "kl"))
    for spec, fragment in ((bare, "`paged k, v by bt, kl` names bt, but no input bt: i32[B, MAXP] is declared"),
                           (wrong, "kl is the key lengths of `paged k, v by bt, kl`, so it must be i32[B], but it "
                                   "is i64[B]"),
                           (paged_q, "q cannot be paged")):
        messages = [d.message for d in attention_diagnostics(spec)]
        assert any(fragment in m for m in messages), (fragment, messages)
        with pytest.raises(SpecError):
            check_attention(spec)


# ---------------------------------------------------------------- data: per-sequence tensors, packed and paged


@dataclass
class Batch:
    """Random per-sequence q_b [H, M_b, D], k_b [HKV, N_b, D], v_b [HKV, N_b, DV] (float32 values), and the
    same data laid out for a call: stacked (dense), packed (ragged, with offsets) or written into shuffled pages
    of a pool (paged, with a block table whose unused entries hold garbage ids)."""

    q_seqs: list
    k_seqs: list
    v_seqs: list
    args: tuple
    kwargs: dict


def make_batch(q_kind, kv_kind, m_lens, n_lens, H=4, HKV=2, D=16, DV=16, page=4, spare_pages=3, maxp=None,
               device="cpu"):
    B = len(m_lens)
    q_seqs = [torch.randn(H, m, D) for m in m_lens]
    k_seqs = [torch.randn(HKV, n, D) for n in n_lens]
    v_seqs = [torch.randn(HKV, n, DV) for n in n_lens]
    kwargs = {}
    if q_kind == "ragged":
        q = torch.cat([t.transpose(0, 1) for t in q_seqs])
        kwargs["cu_q"] = offsets(m_lens)
    else:
        q = torch.stack(q_seqs)
        q = q.transpose(1, 2).contiguous() if q_kind == "bshd" else q
    if kv_kind == "ragged":
        k, v = (torch.cat([t.transpose(0, 1) for t in seqs]) for seqs in (k_seqs, v_seqs))
        kwargs["cu_k"] = offsets(n_lens)
    elif kv_kind.startswith("paged"):
        k, v, kwargs["table"] = pool(k_seqs, v_seqs, page, spare_pages, maxp)
        kwargs["lens"] = torch.tensor(n_lens, dtype=torch.int32)
        if kv_kind == "paged_bhsd":
            k, v = (t.transpose(1, 2).contiguous() for t in (k, v))
    else:
        k, v = torch.stack(k_seqs), torch.stack(v_seqs)
        k, v = (t.transpose(1, 2).contiguous() for t in (k, v)) if kv_kind == "bshd" else (k, v)
    assert B == len(n_lens)
    to = lambda t: t.to(device)  # noqa: E731
    return Batch(q_seqs, k_seqs, v_seqs, (to(q), to(k), to(v)), {n: to(t) for n, t in kwargs.items()})


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def pool(k_seqs, v_seqs, page, spare_pages, maxp):
    """k, v [PAGES, PAGE, HKV, D] holding each sequence's keys in pages taken in a shuffled order, key j of
    sequence b in slot j % page of page table[b, j // page], written one key at a time."""
    need = [-(-k.shape[1] // page) for k in k_seqs]
    maxp = max(max(need), 1) if maxp is None else maxp
    pages = sum(need) + spare_pages
    heads, d, dv = k_seqs[0].shape[0], k_seqs[0].shape[2], v_seqs[0].shape[2]
    k, v = torch.randn(pages, page, heads, d), torch.randn(pages, page, heads, dv)  # unused pages stay random
    ids = torch.randperm(pages).tolist()
    garbage = [-1, pages, pages + 1000, 2**31 - 1]
    table = torch.tensor([[random.choice(garbage) for _ in range(maxp)] for _ in k_seqs], dtype=torch.int32)
    for b, (kb, vb) in enumerate(zip(k_seqs, v_seqs)):
        for p in range(need[b]):
            table[b, p] = ids.pop()
        for j in range(kb.shape[1]):
            k[table[b, j // page], j % page] = kb[:, j]
            v[table[b, j // page], j % page] = vb[:, j]
    return k, v, table


def per_sequence(out, lse, q_kind, m_lens):
    """The reference's out and lse cut back into [H, M_b, DV] and [H, M_b] per sequence."""
    if q_kind == "ragged":
        cu = offsets(m_lens).tolist()
        return [(out[a:b].transpose(0, 1), lse[:, a:b]) for a, b in zip(cu, cu[1:])]
    out = out.transpose(1, 2) if q_kind == "bshd" else out
    return [(out[b], lse[b]) for b in range(len(m_lens))]


def formula(batch: Batch, score=None, keep=None, sink=None):
    """Plain softmax attention per sequence in float64: score(s, h, i, j, b, M, N) and keep(h, i, j, b, M, N)
    on [H, M_b, N_b] grids, sink [H] joining the denominator."""
    results = []
    for b, (qb, kb, vb) in enumerate(zip(batch.q_seqs, batch.k_seqs, batch.v_seqs)):
        H, M, D = qb.shape
        N = kb.shape[1]
        group = H // kb.shape[0]
        kb, vb = (t.double().repeat_interleave(group, dim=0) for t in (kb, vb))
        s = qb.double() @ kb.transpose(1, 2) / math.sqrt(D)
        h, i, j = torch.arange(H)[:, None, None], torch.arange(M)[None, :, None], torch.arange(N)[None, None, :]
        if score is not None:
            s = score(s, h, i, j, b, M, N)
        if keep is not None:
            s = s.masked_fill(~keep(h, i, j, b, M, N).expand(s.shape), -INF)
        logits = s if sink is None else torch.cat([s, sink.double()[:, None, None].expand(H, M, 1)], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - torch.where(lse > -INF, lse, 0.0)[..., None])[..., :N]
        results.append((p @ vb, lse))
    return results


def assert_sequences_match(got, want):
    assert len(got) == len(want)
    for (out, lse), (out_w, lse_w) in zip(got, want):
        torch.testing.assert_close(out, out_w, **TOL)
        torch.testing.assert_close(lse, lse_w, **TOL)


def causal(h, i, j, b, M, N):
    return i + (N - M) >= j


# ---------------------------------------------------------------- reference against the formulas


@pytest.mark.parametrize("kv_kind", ["paged", "paged_bhsd"])
@pytest.mark.parametrize("q_kind", ["dense", "bshd"])
@pytest.mark.parametrize("page", [1, 4, 16])
@pytest.mark.parametrize("m", [1, 3])
def test_paged_decode_matches_gathered_attention(kv_kind, q_kind, page, m):
    n_lens = [0, 1, 37, page * 3, 5, 64]  # empty cache, one key, partial and full last pages
    batch = make_batch(q_kind, kv_kind, [m] * len(n_lens), n_lens, page=page)
    spec = make_spec(q_kind, kv_kind, "    mask causal\n")
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs)
    assert out.shape == batch.args[0].shape and lse.shape == (len(n_lens), 4, m)
    assert_sequences_match(per_sequence(out, lse, q_kind, [m] * len(n_lens)), formula(batch, keep=causal))
    assert bool((lse[0] == -INF).all()) and bool((out[0] == 0).all())  # kv_len = 0: no key, never NaN


@pytest.mark.parametrize("q_kind, kv_kind", [("ragged", "ragged"), ("ragged", "paged"), ("ragged", "dense"),
                                             ("ragged", "bshd"), ("dense", "ragged"), ("bshd", "ragged")])
def test_ragged_matches_sliced_attention(q_kind, kv_kind):
    B = 6
    if q_kind == "ragged" and kv_kind in ("dense", "bshd"):
        m_lens, n_lens = [3, 0, 1, 9, 4, 2], [11] * B
    elif q_kind == "ragged":
        m_lens, n_lens = [3, 0, 1, 9, 4, 1], [5, 0, 1, 9, 40, 2]  # prefill-like: M_b <= N_b, and M_b = N_b = 0
    else:
        m_lens, n_lens = [2] * B, [5, 0, 1, 9, 40, 2]
    batch = make_batch(q_kind, kv_kind, m_lens, n_lens, DV=24)
    spec = make_spec(q_kind, kv_kind, "    mask causal\n")
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs)
    if q_kind == "ragged":
        assert out.shape == (sum(m_lens), 4, 24) and lse.shape == (4, sum(m_lens))  # lse [H, T]
    assert_sequences_match(per_sequence(out, lse, q_kind, m_lens), formula(batch, keep=causal))


def test_score_mods_lookups_params_and_sinks_in_a_paged_prefill():
    m_lens, n_lens = [2, 1, 7, 0], [30, 1, 7, 12]
    batch = make_batch("ragged", "paged", m_lens, n_lens, H=8, HKV=2, page=8)
    slopes, sinks, bias = torch.rand(8), torch.randn(8), torch.randn(4)
    spec = make_spec("ragged", "paged", "    input slopes: f32[H]\n    input sinks: f32[H]\n    input bias: f32[B]\n"
                                        "    param cap: f32 = 5.0\n    param window: i32\n"
                                        "    score = cap * tanh(qk * rsqrt(D) / cap) + slopes[h] * (j - i) + bias[b]\n"
                                        "    mask causal\n    mask i + (N - M) - j < window\n", sink="sinks[h]")
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs, slopes=slopes, sinks=sinks, bias=bias, window=4)

    def score(s, h, i, j, b, M, N):
        return 5.0 * torch.tanh(s / 5.0) + slopes.double()[h] * (j - i) + float(bias[b])

    def keep(h, i, j, b, M, N):
        return (i + (N - M) >= j) & (i + (N - M) - j < 4)

    assert_sequences_match(per_sequence(out, lse, "ragged", m_lens), formula(batch, score, keep, sinks))
    assert bool((lse[:, 0:0] == 0).all())  # the empty sequence has no rows; with a sink no row is -inf
    assert bool(torch.isfinite(lse).all())


def test_index_variables_and_sizes_are_per_sequence():
    # b, i, j, M and N of each sequence, as numbers in the score: the weights show which values were used
    m_lens, n_lens = [2, 3], [4, 6]
    batch = make_batch("ragged", "ragged", m_lens, n_lens, H=2, HKV=1)
    spec = make_spec("ragged", "ragged", "    score = qk * 0.0 + 0.1 * (b + 2 * i - j + 3 * M - N + T + TK + B)\n")
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs)

    def score(s, h, i, j, b, M, N):
        return s * 0.0 + 0.1 * (b + 2 * i - j + 3 * M - N + 5 + 10 + 2).double()

    assert_sequences_match(per_sequence(out, lse, "ragged", m_lens), formula(batch, score))


def test_paged_equals_dense_per_sequence():
    """The same keys in pages and contiguous: the paged reference equals the dense one of each sequence."""
    n_lens = [9, 16, 3]
    batch = make_batch("dense", "paged", [4] * 3, n_lens, page=4)
    paged = make_spec("dense", "paged", "    mask causal\n")
    dense = make_spec("dense", "dense", "    mask causal\n")
    out, lse = attnc.reference(paged, *batch.args, **batch.kwargs)
    for b in range(3):
        want_out, want_lse = attnc.reference(dense, batch.args[0][b:b + 1], batch.k_seqs[b][None],
                                             batch.v_seqs[b][None])
        torch.testing.assert_close(out[b:b + 1], want_out, **TOL)
        torch.testing.assert_close(lse[b:b + 1], want_lse, **TOL)


@pytest.mark.parametrize("seed", range(4))
def test_random_lengths_and_tables(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B = rng.randint(1, 5)
    page = rng.choice([1, 2, 8])
    n_lens = [rng.choice([0, 1, rng.randint(0, 40)]) for _ in range(B)]
    m_lens = [rng.randint(0, n) if n else rng.choice([0, 1]) for n in n_lens]
    maxp = max(-(-n // page) for n in n_lens) + rng.randint(0, 2) or 1
    batch = make_batch("ragged", "paged", m_lens, n_lens, H=6, HKV=rng.choice([1, 3, 6]), page=page, maxp=maxp)
    spec = make_spec("ragged", "paged", "    mask causal\n")
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs)
    assert_sequences_match(per_sequence(out, lse, "ragged", m_lens), formula(batch, keep=causal))


def test_lookups_are_per_sequence_and_read_zero_out_of_range():
    batch = make_batch("ragged", "ragged", [2, 3], [4, 6])
    spec = make_spec("ragged", "ragged", "    input pos: f32[TK]\n    score = qk * rsqrt(D) + pos[cu_k[b] + j]\n")
    pos = torch.randn(10) + 3.0  # far from 0, so a lookup that read 0 would show
    out, lse = attnc.reference(spec, *batch.args, **batch.kwargs, pos=pos, validate=True)

    def score(s, h, i, j, b, M, N):
        return s + pos.double()[[0, 4][b] + j]

    assert_sequences_match(per_sequence(out, lse, "ragged", [2, 3]), formula(batch, score))
    # one past: the last key of the last sequence reads pos[10], outside pos: it reads 0
    bad = make_spec("ragged", "ragged", "    input pos: f32[TK]\n    score = qk * rsqrt(D) + pos[cu_k[b] + j + 1]\n")
    out, lse = attnc.reference(bad, *batch.args, **batch.kwargs, pos=pos)
    padded = torch.cat([pos.double(), torch.zeros(1, dtype=torch.float64)])

    def shifted(s, h, i, j, b, M, N):
        return s + padded[[0, 4][b] + j + 1]

    assert_sequences_match(per_sequence(out, lse, "ragged", [2, 3]), formula(batch, shifted))
    with pytest.raises(CallError, match=r"^pos: index 0 of `pos\[cu_k\[b\] \+ j \+ 1\]` is 10 at b=1, h=0, i=0, "
                                        r"j=5, outside dim 0 \(TK\) of pos, which has size 10; an out-of-range lookup "
                                        r"reads 0"):
        attnc.reference(bad, *batch.args, **batch.kwargs, pos=pos, validate=True)


# ---------------------------------------------------------------- the data the reference checks


def test_reference_checks_offsets():
    spec = make_spec("ragged", "ragged")
    batch = make_batch("ragged", "ragged", [2, 3], [4, 6])
    cases = [
        (dict(cu_q=torch.tensor([1, 3, 5], dtype=torch.int32)),
         r"^cu_q: the offsets must start at 0, but cu_q\[0\] = 1"),
        (dict(cu_q=torch.tensor([0, 4, 5], dtype=torch.int32), cu_k=torch.tensor([0, 7, 6], dtype=torch.int32)),
         r"^cu_k: the offsets must never decrease, but cu_k\[2\] = 6 < cu_k\[1\] = 7"),
        (dict(cu_q=torch.tensor([0, 2, 4], dtype=torch.int32)),
         r"^cu_q: the offsets must end at T = 5, the number of packed tokens, but cu_q\[2\] = 4"),
    ]
    for change, message in cases:
        with pytest.raises(CallError, match=message):
            attnc.reference(spec, *batch.args, **dict(batch.kwargs, **change))


def test_reference_checks_lengths_and_page_ids_in_use():
    spec = make_spec("dense", "paged")
    batch = make_batch("dense", "paged", [1, 1], [5, 8], page=4, maxp=2)
    table, lens = batch.kwargs["table"], batch.kwargs["lens"]
    pages = batch.args[1].shape[0]
    too_long = lens.clone()
    too_long[1] = 9
    negative = lens.clone()
    negative[0] = -1
    bad_page = table.clone()
    bad_page[1, 1] = pages
    bad_first = table.clone()
    bad_first[0, 0] = -3
    cases = [
        (dict(lens=too_long), r"^lens: lens\[1\] = 9, but a sequence holds 0 to MAXP \* PAGE = 8 keys"),
        (dict(lens=negative), r"^lens: lens\[0\] = -1"),
        (dict(table=bad_page), rf"^table: table\[1, 1\] = {pages} is not a page id: k and v have PAGES = {pages}"),
        (dict(table=bad_first), r"^table: table\[0, 0\] = -3 is not a page id"),
    ]
    for change, message in cases:
        with pytest.raises(CallError, match=message):
            attnc.reference(spec, *batch.args, **dict(batch.kwargs, **change))
    # entries past a sequence's last page are never read: garbage there is fine
    short = lens.clone()
    short[1] = 4
    unused = table.clone()
    unused[1, 1] = -7
    attnc.reference(spec, *batch.args, **dict(batch.kwargs, lens=short, table=unused))


# ---------------------------------------------------------------- the binder


PAGED = make_spec("bshd", "paged", "    mask causal\n")
VARLEN = make_spec("ragged", "ragged", "    mask causal\n")
PREFILL = make_spec("ragged", "paged", "    mask causal\n")


def test_bound_sizes_of_paged_and_ragged_calls_on_meta_tensors():
    """Meta tensors have no data: binding them proves B, M and N come from shapes alone (no host sync)."""
    batch = make_batch("bshd", "paged", [3, 3], [5, 11], page=4, maxp=4, device="meta")
    bound = bind(PAGED, *batch.args, batch.kwargs)
    assert dict(bound.sizes) == dict(B=2, M=3, H=4, D=16, PAGES=batch.args[1].shape[0], PAGE=4, HKV=2, DV=16,
                                     MAXP=4, N=16)
    assert out_shape(PAGED, bound) == (2, 3, 4, 16) and lse_shape(bound) == (2, 4, 3)

    batch = make_batch("ragged", "ragged", [3, 0, 2], [5, 1, 7], device="meta")
    bound = bind(VARLEN, *batch.args, batch.kwargs)
    assert dict(bound.sizes) == dict(T=5, H=4, D=16, TK=13, HKV=2, DV=16, B1=4, B=3, M=5, N=13)
    assert out_shape(VARLEN, bound) == (5, 4, 16) and lse_shape(bound) == (4, 5)

    batch = make_batch("ragged", "paged", [1, 2], [4, 9], page=2, device="meta")
    bound = bind(PREFILL, *batch.args, batch.kwargs)
    assert (bound.sizes["B"], bound.sizes["M"], bound.sizes["N"]) == (2, 3, 10)


def test_canonical_views_of_packed_and_paged_tensors():
    batch = make_batch("ragged", "paged", [1, 2], [4, 9], page=2)
    q, k, _ = batch.args
    assert canonical_view(q, PREFILL.q).shape == (4, 3, 16)  # [H, T, D]
    assert torch.equal(canonical_view(k, PREFILL.k), k.permute(0, 2, 1, 3))  # [PAGES, HKV, PAGE, D]


def raises(match, spec, args, kwargs):
    with pytest.raises(CallError, match=match):
        bind(spec, *args, kwargs)


def test_binder_errors_name_the_argument():
    batch = make_batch("bshd", "paged", [1, 1, 1], [5, 11, 2], page=4, maxp=3)
    args, kw = batch.args, batch.kwargs
    q, k, v = args
    raises(r"^table: expected dtype i32 \(torch.int32\) as declared i32\[B, MAXP\], got torch.int64; convert",
           PAGED, args, dict(kw, table=kw["table"].long()))
    raises(r"^lens: expected 1 dims \[B\], got 2 dims", PAGED, args, dict(kw, lens=kw["lens"][:, None]))
    raises(r"^q: dim 0 \(B\) is 3 but table: dim 0 \(B\) is 2", PAGED, args, dict(kw, table=kw["table"][:2]))
    raises(r"^q: dim 0 \(B\) is 3 but lens: dim 0 \(B\) is 4", PAGED, args,
           dict(kw, lens=torch.zeros(4, dtype=torch.int32)))
    raises(r"^k: dim 1 \(PAGE\) is 4 but v: dim 1 \(PAGE\) is 2", PAGED, (q, k, v[:, :2]), kw)
    raises(r"^k: expected 4 dims \[PAGES, PAGE, HKV, D\], got 3 dims", PAGED, (q, k[0], v), kw)
    raises(r"^lens: missing input tensor i32\[B\]; pass lens=", PAGED, args,
           {n: t for n, t in kw.items() if n != "lens"})
    raises(r"^table: is on meta but q is on cpu", PAGED, args, dict(kw, table=kw["table"].to("meta")))

    batch = make_batch("ragged", "ragged", [2, 3], [4, 6])
    args, kw = batch.args, batch.kwargs
    raises(r"^cu_k: dim 0 \(B1\) is 4 but cu_q: dim 0 \(B1\) is 3", VARLEN, args,
           dict(kw, cu_k=torch.tensor([0, 1, 2, 10], dtype=torch.int32)))
    raises(r"^cu_q: has 1 offset, so no sequence", VARLEN, args,
           dict(kw, cu_q=torch.zeros(1, dtype=torch.int32), cu_k=torch.zeros(1, dtype=torch.int32)))
    raises(r"^q: expected 3 dims \[T, H, D\], got 4 dims", VARLEN, (args[0][None], *args[1:]), kw)

    batch = make_batch("ragged", "paged", [1, 2], [4, 9], page=2)
    raises(r"^cu_q: has 4 offsets, so 3 sequences, but lens: dim 0 \(B\) is 2; the offsets of B sequences are "
           r"B \+ 1 numbers", PREFILL, batch.args, dict(batch.kwargs, cu_q=torch.tensor([0, 1, 2, 3],
                                                                                       dtype=torch.int32)))


def test_compile_time_page_size_is_checked():
    spec = next(s for s in attnc.parse_file("examples/specs/paged_decode.attn") if s.name == "paged_decode_local")
    batch = make_batch("bshd", "paged", [1], [5], page=8)
    args = tuple(t.to(torch.bfloat16) for t in batch.args)
    kwargs = dict(block_table=batch.kwargs["table"], kv_len=batch.kwargs["lens"])
    with pytest.raises(CallError, match=r"^k: dim 1 \(PAGE\) is 8 but the spec binds PAGE = 16"):
        bind(spec, *args, kwargs)
