"""The Gluon MLA decode kernel's staging (passes/latent_decode.py) and its launcher's fallback, without a GPU: which
plans qualify, the layout each gets (shared memory within sm_90's 232448 B), the launch of a call (heads packed into
64 rows, one position a program, the Triton kernel's split rule), and that everything else keeps the Triton decode
kernel, with a warning that names why where PlanOptions(gluon=True) asked for it. The kernel itself runs only on an
H100: tests/test_mla_gluon_gpu.py."""
import warnings
from types import SimpleNamespace

import pytest
import torch

import attnc
from attnc.backends.triton import gluon, gluon_decode
from attnc.dsl.signature import bind
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.latent_decode import SCORE_REGS, ROWS, choose_layout, latent_launch, layout_bytes, score_registers
from attnc.passes.tiling import smem_capacity
from test_triton_kernels import poisoned_outputs  # noqa: F401  (an autouse fixture: importing enables it)

H100 = Target("triton", "cuda", 90)
GLUON = PlanOptions(gluon=True)
SPECS = {s.name: s for s in attnc.parse_file("examples/specs/mla.attn")}


def _plan(name="mla_paged", target=H100, options=GLUON, spec=None):
    return plan_kernel(spec or SPECS[name], target, 512, 512, options)


@pytest.mark.parametrize("name", ["mla_decode", "mla_paged"])
def test_mla_decode_qualifies_on_sm90(name):
    staged = _plan(name).decode.warpgroups
    assert staged.path == "gluon", staged.reason
    w = staged.layout
    assert (w.block_m, w.block_n, w.stages, w.chunks, w.rope) == (64, 64, 2, (128,) * 4, 64)
    assert (w.consumers, w.consumer_warps, w.value_chunks, w.producer_warps) == (2, 4, 2, 1)
    # Q and two 64-key slots of 576 columns (bf16), P, the row scales and the barriers: FlashMLA's budget
    assert w.smem == (64 * 576 + 2 * 64 * 576 + 64 * 64) * 2 + 64 * 4 + 1024 == 230656 <= smem_capacity(90)


def test_key_tile_and_ring_depth():
    """32 keys a tile fit four stages; 64 keys fit two (a third does not fit); other key tiles are refused, and so is
    a forced ring depth that does not fit."""
    narrow = _plan(options=PlanOptions(gluon=True, warpgroup_block_n=32)).decode.warpgroups.layout
    assert (narrow.block_n, narrow.stages, narrow.smem) == (32, 4, 226560)
    assert layout_bytes(64, 3, 64, 2) > smem_capacity(90) >= layout_bytes(64, 2, 64, 2)
    plan = _plan()
    assert choose_layout(plan, 2) == plan.decode.warpgroups.layout
    with pytest.raises(attnc.CompileError, match=r"fits 2 ring stage.*2 or more \(asked 3\)"):
        choose_layout(plan, 3)
    with pytest.raises(attnc.CompileError, match="must be one of 32, 64, got 128"):
        _plan("mla_decode", options=PlanOptions(gluon=True, warpgroup_block_n=128))


def test_the_default_takes_the_gluon_kernel_and_shows_the_layout():
    """Measured right and faster on the H100: the default where it qualifies; gluon=False keeps the Triton kernel
    with the same layout shown."""
    assert _plan().decode.warpgroups.path == "gluon" and _plan(options=GLUON).decode.warpgroups.path == "gluon"
    kept = _plan(options=PlanOptions(gluon=False)).decode.warpgroups
    assert kept.path == "triton" and "gluon=False" in kept.reason and kept.layout == _plan().decode.warpgroups.layout
    text = _plan().describe()
    assert "decode wg  gluon kernel" in text and "score warpgroup (QK^T once" in text and "230656 B shared" in text
    assert _plan("mla_decode") == _plan("mla_decode")  # a pure function of the plan


def _text_spec(page="64", dr="64", normalizer="softmax(score)", dtype="bf16"):
    return attnc.parse(f"""attention mla_variant {{
    dims D = 512, DR = {dr}{', PAGE = ' + page if page else ''}
    q: {dtype}[B, M, H, D]
    k: {dtype}[PAGES, PAGE, D]
    input qr: {dtype}[B, M, H, DR]
    input kr: {dtype}[PAGES, PAGE, DR]
    paged k by block_table, kv_len
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    return {normalizer} @ k, lse
}}""", "test_latent_decode.py")[0]


@pytest.mark.parametrize("plan_args, reason", [
    (dict(target=Target("triton", "cuda", 80)), "sm_80: warpgroup MMA is sm_90 only"),
    (dict(target=Target("triton", "cpu", None)), "no GPU"),
    (dict(spec=_text_spec(dtype="f32")), "f16, bf16"),
    (dict(spec=_text_spec(page="")), "pages of PAGE (unbound) slots"),
    (dict(spec=_text_spec(page="16")), "pages of 16 slots"),
    (dict(spec=_text_spec(dr="128")), "a rope part of 128 columns"),
    (dict(spec=_text_spec(normalizer="softmax(score, sink=0.5)")), "softmax with a sink: the kernel takes"),
    (dict(spec=_text_spec(normalizer="sigmoid(score)")), "sigmoid: the kernel takes normalised exp weights"),
])
def test_what_keeps_the_triton_decode_kernel(plan_args, reason):
    staged = _plan(**plan_args).decode.warpgroups
    assert staged.path == "triton" and reason in staged.reason and staged.layout is None


def test_fp8_latent_converts_in_shared_memory():
    """bench_mla.py --fp8's spec (latent and rope part e4m3, one scale): 32-key tiles, two converted slots and the
    most e4m3 slots that fit (four), a converter warpgroup (96 registers) beside a 160-register value warpgroup; the
    launch's register limit counts its warps. A latent FP8 beside a bf16 rope part keeps the Triton kernel."""
    spec = _fp8_spec(rope="f8e4m3")
    staged = _plan(spec=spec).decode.warpgroups
    assert staged.path == "gluon", staged.reason
    w = staged.layout
    assert (w.block_n, w.stages, w.fp8_stages, w.converter_warps, w.value_regs, w.converter_regs) == (32, 2, 4, 4, 160, 96)
    assert w.smem == layout_bytes(32, 2, 64, 2, 4) == 226560 <= smem_capacity(90)
    go = latent_launch(_plan(spec=spec), dict(B=64, H=64, HKV=1, M=1, N=4096), 132)
    assert go.decode.keywords["maxnreg"] == 128  # 16 warps share the register file
    source = gluon_decode.generate_gluon_decode(_plan(spec=spec))
    assert "def convert(" in source and "upcast_fp8(k8_bufs.index(land * CHUNKS + c).load(CONVERT)" in source
    assert source.count("(convert, (") == 1 and w.converter_vector == 8  # the conflict-free converter by default
    assert "scale = tl.max(" in source  # the values' dequant scale joins each row's 1 / l
    with pytest.raises(attnc.CompileError, match="fits 0 ring stage.* of e4m3 tiles beside two converted ones"):
        _plan(spec=spec, options=PlanOptions(gluon=True, warpgroup_block_n=64))
    staged = _plan(spec=_fp8_spec(rope="bf16")).decode.warpgroups
    assert staged.path == "triton" and "both f8e4m3" in staged.reason


@pytest.mark.parametrize("quantize", [False, True])
def test_conflict_free_converter(quantize):
    """PlanOptions.fp8_conflict_free_converter, the default (None or True): one converter, 8 e4m3 a thread (CONVERT);
    quantize_rows keeps 16 a thread (CVT). False: 16 a thread through CVT, registers and shared memory as with it;
    so set, it refuses the options that need it."""
    spec = _fp8_spec(rope="f8e4m3", quantize=quantize)
    plan = _plan(spec=spec, options=PlanOptions(gluon=True, fp8_conflict_free_converter=True))
    assert gluon_decode.generate_gluon_decode(plan) == gluon_decode.generate_gluon_decode(_plan(spec=spec))
    w = plan.decode.warpgroups.layout
    assert (w.converter_vector, w.converter_warpgroups, w.f16_values) == (8, 1, False)
    source = gluon_decode.generate_gluon_decode(plan)
    assert "upcast_fp8(k8_bufs.index(land * CHUNKS + c).load(CONVERT), k_bufs.dtype)" in source
    assert "CONVERT = gl.constexpr(gl.BlockedLayout([1, 8]," in source and source.count("(convert, (") == 1
    assert ("CVT = gl.constexpr(" in source) == quantize and "allocate_shared_memory(gl.float16" not in source
    assert "1 converter warpgroup(s) of 8 e4m3 a thread" in source.splitlines()[1]
    wide = _plan(spec=spec, options=PlanOptions(gluon=True, fp8_conflict_free_converter=False))
    v = wide.decode.warpgroups.layout
    assert v.converter_vector == 16 and (v.smem, v.value_regs, v.converter_regs) == (w.smem, w.value_regs,
                                                                                      w.converter_regs)
    source = gluon_decode.generate_gluon_decode(wide)
    assert "upcast_fp8(k8_bufs.index(land * CHUNKS + c).load(CVT))" in source and "CONVERT" not in source
    assert "e4m3 a thread" not in source.splitlines()[1]
    for option in (dict(fp8_converter_warpgroups=2), dict(fp8_f16_values=True))[:1 + quantize]:
        with pytest.raises(attnc.CompileError, match="use the conflict-free converter"):
            _plan(spec=spec, options=PlanOptions(gluon=True, fp8_conflict_free_converter=False, **option))


@pytest.mark.parametrize("quantize", [False, True])
def test_two_converter_warpgroups_and_f16_values(quantize):
    """PlanOptions.fp8_converter_warpgroups=2: two converter partitions, each half of a slot's latent chunks (the
    ready barriers count both arrives), the launch's maxnreg down to 96 over 20 warps and the budgets chosen so the
    score warpgroup keeps SCORE_REGS; fp8_f16_values: P and the converted slots f16 where QK^T reads the e4m3 slots
    (quantised queries), ignored where it reads the converted ones."""
    spec = _fp8_spec(rope="f8e4m3", quantize=quantize)
    plan = _plan(spec=spec, options=PlanOptions(gluon=True, fp8_converter_warpgroups=2, fp8_f16_values=True))
    w = plan.decode.warpgroups.layout
    assert (w.converter_warpgroups, w.converter_warps, w.fp8_queries, w.f16_values) == (2, 8, quantize, quantize)
    assert w.converter_vector == 8  # the conflict-free converter
    assert (w.value_regs, w.converter_regs, score_registers(w)) == (160, 40, SCORE_REGS)
    assert w.smem == _plan(spec=spec).decode.warpgroups.layout.smem  # no shared memory added
    go = latent_launch(plan, dict(B=64, H=64, HKV=1, M=1, N=4096), 132)
    assert go.decode.keywords["maxnreg"] == 96 and go.decode.keywords["num_warps"] == 4
    source = gluon_decode.generate_gluon_decode(plan)
    assert source.count("(convert, (") == 2 and ", 0)),\n" in source and ", 1)),\n" in source
    assert "[160, 40, 40, 24]" in source and "CONVERTERS = gl.constexpr(2)" in source
    assert "mbarrier.init(ready.index(s), count=CONVERTERS)" in source
    assert ("probs_buf.store(p.to(gl.float16))" in source) == quantize
    assert ("k_bufs = gl.allocate_shared_memory(gl.float16," in source) == quantize
    assert "2 converter warpgroup(s)" in source.splitlines()[1]
    one = _plan(spec=spec, options=PlanOptions(gluon=True, fp8_converter_warpgroups=1)).decode.warpgroups.layout
    assert (one.converter_warpgroups, one.converter_vector, one.f16_values, score_registers(one)) == (1, 8, False, 232)
    with pytest.raises(attnc.CompileError, match="fp8_converter_warpgroups .* one of 1, 2, got 3"):
        _plan(spec=spec, options=PlanOptions(gluon=True, fp8_converter_warpgroups=3))


@pytest.mark.parametrize("every", [None, 32, 64, 128, 0])
def test_quantised_queries_sum_fp8_products_in_float32(every):
    """PlanOptions.fp8_float32_sum_every: the fp8 x fp8 QK^T's products go into the tensor cores' accumulator in runs
    of 32, 64 or 128, each run added in float32 by Triton's max_num_imprecise_acc on both fp8 wgmmas; 0 (the default)
    leaves one accumulator; without quantised queries it is not used;
    anything but a run of whole fp8 wgmmas within a chunk is a CompileError naming the option."""
    spec = _fp8_spec(rope="f8e4m3", quantize=True)
    plan = _plan(spec=spec, options=PlanOptions(gluon=True, fp8_float32_sum_every=every))
    run = every or 0
    assert plan.decode.warpgroups.layout.fp8_float32_sum_every == run
    source = gluon_decode.generate_gluon_decode(plan)
    assert source.count("max_num_imprecise_acc=FLOAT32_SUM_EVERY") == (4 if run else 0)  # the latent's 4 chunks
    assert source.count("max_num_imprecise_acc=ROPE_FLOAT32_SUM_EVERY") == (1 if run else 0)
    assert (f"\nFLOAT32_SUM_EVERY = gl.constexpr({run})" in source) == bool(run)
    # Triton refuses a run longer than the wgmma's K: the rope dot's is 64
    assert (f"ROPE_FLOAT32_SUM_EVERY = gl.constexpr({min(run, 64)})" in source) == bool(run)
    assert (f"QK^T fp8 x fp8, float32 every {run}" in source.splitlines()[1]) == bool(run)
    unquantised = _plan(spec=_fp8_spec(rope="f8e4m3"), options=PlanOptions(gluon=True, fp8_float32_sum_every=every))
    assert unquantised.decode.warpgroups.layout.fp8_float32_sum_every == 0
    for bad in (16, 48, 256):
        with pytest.raises(attnc.CompileError, match=f"fp8_float32_sum_every .* one of 0, 32, 64, 128 .* got {bad}"):
            _plan(spec=spec, options=PlanOptions(gluon=True, fp8_float32_sum_every=bad))


def _fp8_spec(rope: str, quantize: bool = False):
    """bench_mla.py --fp8's contiguous spec: the latent e4m3, its rope part `rope` (dequantized with it if FP8);
    `quantize`: its queries quantised too (bench_mla.py --quantize-q)."""
    return attnc.parse(f"""attention mla_fp8 {{
    dims D = 512, DR = 64
    q: bf16[B, M, H, D]
    k: f8e4m3[B, N, D]
    input qr: bf16[B, M, H, DR]
    input kr: {rope}[B, N, DR]
    input k_scale: f32[HKV]
    dequant k by k_scale
{"    dequant kr by k_scale" + chr(10) if rope.startswith("f8") else ""}{"    quantize q, qr to f8e4m3" + chr(10) if quantize else ""}    param scale: f32
    score = (q @ k + qr @ kr) * scale
    return softmax(score) @ k
}}""", "test_latent_decode.py")[0]


def test_other_specs_are_not_staged():
    spec = next(s for s in attnc.parse_file("examples/specs/paged_decode.attn") if s.name == "paged_decode")
    assert plan_kernel(spec, H100, 128, 128, GLUON).decode.warpgroups is None


@pytest.mark.parametrize("h, b, m, pack, head_programs", [
    (64, 4, 1, 64, 4),  # DeepSeek's 128 heads over 2 programs a sequence, 64 over one
    (128, 4, 1, 64, 8),
    (16, 2, 1, 16, 2),  # fewer heads than rows: rows past 16 idle
    (128, 2, 3, 64, 4),  # speculative decode: one program a position
])
def test_launch_packs_heads_into_64_rows(h, b, m, pack, head_programs):
    plan = _plan("mla_decode")
    go = latent_launch(plan, dict(B=b, H=h, HKV=1, M=m, N=8192), sm_count=132)
    assert (go.tiles.pack, go.tiles.block_mq, go.q_programs, go.head_programs) == (pack, 1, m, head_programs)
    assert pack <= ROWS
    kw = go.decode.keywords
    assert go.decode.function == "attn_decode_gluon" and (kw["PACK"], kw["BLOCK_MQ"]) == (pack, 1)
    assert kw["num_warps"] == 4 and kw["maxnreg"] == 168 and kw["SPLIT"] == (go.splits > 1)
    # few programs and 128 key tiles: split, never past about one program per SM (latent_splits' bound)
    assert 1 < go.splits <= max(1, min(132 // (m * head_programs), 128 // 4, 64))
    assert (go.combine is None) == (go.splits == 1)


@pytest.mark.parametrize("b, h, n, splits", [
    (64, 64, 1024, 1),  # the H100 sweep (results/mla-splits-*-s11.json): 42.6 us unsplit, 56.2 at 2 splits
    (64, 64, 2048, 1),  # 70.8 against 81.0
    (64, 64, 8192, 2),  # 228.3 against 239.8 unsplit, 250.0 at 3
    (64, 128, 1024, 1),  # 128 programs: 45.6 against 82.4
    (128, 128, 1024, 1),
    (768, 64, 8192, 1),
])
def test_split_counts_follow_the_h100_sweep(b, h, n, splits):
    """The split-KV model picks the count the H100 measured fastest at the points it was fit to; the partials'
    traffic makes a split of a short key list cost more than the SMs it fills."""
    go = latent_launch(_plan("mla_decode"), dict(B=b, H=h, HKV=1, M=1, N=n), sm_count=132)
    assert go.splits == splits


def test_one_long_sequence_still_splits_many_ways():
    plan = _plan("mla_decode")
    one = latent_launch(plan, dict(B=1, H=64, HKV=1, M=1, N=65536), sm_count=132)
    assert one.splits == 64 and one.combine is not None  # the split limit (MAX_SPLITS)
    assert 8 <= latent_launch(plan, dict(B=2, H=64, HKV=1, M=1, N=3008), sm_count=132).splits <= 47


def test_forced_splits_and_short_sequences():
    plan = _plan("mla_decode", options=PlanOptions(gluon=True, num_splits=5))
    assert latent_launch(plan, dict(B=64, H=64, HKV=1, M=1, N=1000), 132).splits == 5
    assert latent_launch(plan, dict(B=64, H=64, HKV=1, M=1, N=100), 132).splits == 2  # one split per key tile at most


class _TritonDecode:
    def __init__(self):
        self.runs = []

    def run(self, bound):
        self.runs.append(bound)
        return "triton", None


def test_a_plan_that_does_not_run_gluon_keeps_the_triton_kernel_quietly(recwarn):
    fallback = _TritonDecode()
    assert gluon_decode.launcher(_plan(options=PlanOptions()), fallback) is fallback
    assert gluon_decode.launcher(_plan(target=Target("triton", "cuda", 80), options=PlanOptions()), fallback) \
        is fallback
    assert not recwarn.list


def test_asking_where_it_cannot_run_warns_and_falls_back(monkeypatch):
    fallback = _TritonDecode()
    with pytest.warns(UserWarning, match=r"Gluon MLA decode kernel was asked for .*sm_80: warpgroup MMA"):
        assert gluon_decode.launcher(_plan(target=Target("triton", "cuda", 80)), fallback) is fallback
    monkeypatch.setattr(gluon, "unavailable_here", lambda: "Triton 9.9: the Gluon kernel is written for 3.6")
    with pytest.warns(UserWarning, match="Triton 9.9"):
        assert gluon_decode.launcher(_plan(), fallback) is fallback


def _call(strided_q=False, split_pages=False):
    """A paged call of mla_paged on CPU tensors: q and qr, the latent and kr as views of one [.., 576] tensor."""
    spec = SPECS["mla_paged"]
    q = torch.randn(2, 1, 64, 576 * (2 if strided_q else 1), dtype=torch.bfloat16)
    q = q[..., ::2] if strided_q else q
    pool = torch.randn(6, 72 if split_pages else 64, 576, dtype=torch.bfloat16)
    if split_pages:  # pages of 64 rows with a gap of 8 rows after each
        pool = pool[:, :64]
    kw = dict(qr=q[..., 512:], kr=pool[..., 512:], block_table=torch.tensor([[0, 1, 2], [3, 4, 5]]).int(),
              kv_len=torch.tensor([150, 64]).int(), scale=0.1)
    return bind(spec, q[..., :512], pool[..., :512], pool[..., :512], kw)


def test_tensors_tma_cannot_read_take_the_triton_kernel():
    """The launcher's per-call check: a non-unit head-dim stride, or pages that are not rows of one matrix."""
    launcher = SimpleNamespace(spec=SPECS["mla_paged"], persistent=False)
    assert gluon_decode.GluonDecodeLauncher.uncovered(launcher, _call()) == ""
    assert "q is not TMA-readable" in gluon_decode.GluonDecodeLauncher.uncovered(launcher, _call(strided_q=True))
    why = gluon_decode.GluonDecodeLauncher.uncovered(launcher, _call(split_pages=True))
    assert "k's pages are not one [PAGES * PAGE, ...] matrix" in why


def test_an_uncovered_call_runs_the_fallback_with_a_warning(monkeypatch):
    launcher = object.__new__(gluon_decode.GluonDecodeLauncher)
    launcher.spec, launcher.fallback, launcher.persistent = SPECS["mla_paged"], _TritonDecode(), False
    gluon_decode._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="does not take this call .*q is not TMA-readable"):
        assert launcher.run(_call(strided_q=True)) == ("triton", None)
    assert len(launcher.fallback.runs) == 1


def test_generated_source_reads_the_plan():
    """One QK^T wgmma per latent chunk plus the rope dot, once per tile; P and alpha handed over through shared
    memory; each warpgroup's P V over its two chunks; the paged producer clamps page ids."""
    source = gluon_decode.generate_gluon_decode(_plan())
    score = source.split("def score_warpgroup(")[1].split("def value_warpgroup(")[0]
    value = source.split("def value_warpgroup(")[1].split("def attn_decode_gluon(")[0]
    assert score.count("warpgroup_mma(q_bufs.index(") == 4 and score.count("warpgroup_mma(qr_buf") == 1
    assert score.count("warpgroup_mma(probs_buf") == 2 and value.count("warpgroup_mma(probs_buf") == 2
    assert "warpgroup_mma(q_bufs" not in value and "k_bufs.index(slot * CHUNKS + VALUE_CHUNKS + 0)" in value
    assert "probs_buf.store(p.to(DTYPE))" in score and "alpha = row_buf.load(ROW)" in value
    assert "page = tl.where((page >= 0) & (page < sz_PAGES), page, 0)" in source
    assert "record_violation(err_ptr, worst >= 0" in source and "ERR_LENGTH" in source
    contiguous = gluon_decode.generate_gluon_decode(_plan("mla_decode"))
    assert "block_table" not in contiguous and "k_tail_desc" not in contiguous


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fallback; the GPU runs test_mla_gluon_gpu.py")
def test_asking_in_the_interpreter_warns_and_computes_with_the_triton_kernel():
    """End to end on CPU tensors (Triton's interpreter, f32 at small widths): the option cannot be met, so the call
    warns and the Triton decode kernel's result matches the reference, every output element written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from test_mla_grid import SMALL, Point, grid_call, grid_spec
    from test_triton_kernels import assert_matches

    spec = grid_spec("paged", "plain", SMALL)
    q, k, kw = grid_call("paged", "plain", SMALL, Point(8, 2, n_max=40))
    with pytest.warns(UserWarning, match="no GPU: the Gluon decode kernel needs sm_90"):
        kern = attnc.compile(spec, backend="triton", options=GLUON)
        got = kern(q, k, **kw)
    assert_matches(spec, got, attnc.reference(spec, q, k, **kw), tol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gluon.unavailable_here()  # judged without warnings
