"""Hopper pipeline staging (passes/warpgroups.py) and the Gluon path's fallback, without a GPU: which plans qualify,
the layout each gets, what `attnc show --emit plan` prints, and that a launch the Gluon kernel does not cover (or a
Triton without it) runs the Triton template."""
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.backends.triton import gluon
from attnc.passes import PlanOptions, Target, plan_kernel
from attnc.passes.kernels import gluon_kernel
from attnc.passes.tiling import smem_capacity
from attnc.passes.warpgroups import AUTO_MIN_LENGTH, BARRIER_BYTES, PERSISTENT_MIN_LENGTH, gluon_d_chunks, max_registers
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    EXAMPLES, poisoned_outputs, with_dtype,
)

H100 = Target("triton", "cuda", 90)
GLUON = PlanOptions(gluon=True, gluon_persistent=False)  # one program per query tile (causal_lm would run persistent)


def _plan(name="causal_lm", d=128, dv=None, dtype="bf16", target=H100, options=GLUON):
    return plan_kernel(with_dtype(EXAMPLES[name], dtype), target, d, dv or d, options)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_dense_prefill_qualifies_on_sm90(d, dtype):
    w = _plan(d=d, dtype=dtype).warpgroups
    assert w.path == "gluon" and w.layout is not None
    assert (w.layout.consumers, w.layout.consumer_warps, w.layout.schedule) == (2, 4, "pingpong")
    assert w.layout.producer_warps == 1 and w.layout.block_m == 128


def test_layouts_per_head_dim():
    """D <= 128: 128-key tiles with QK^T(j+1) and P V(j) under the softmax; D = 256: 64-key tiles, each MMA waited
    for (the 128-register accumulator leaves no room for a second score tile); the ring fits shared memory."""
    d64, d128, d256 = (_plan("dense", d=d).warpgroups.layout for d in (64, 128, 256))
    assert (d64.block_n, d64.overlap, d64.stages) == (128, True, 4)
    assert (d128.block_n, d128.overlap, d128.stages) == (128, True, 3)
    assert (d256.block_n, d256.overlap, d256.stages) == (64, False, 2)
    for layout, d in ((d64, 64), (d128, 128), (d256, 256)):
        smem = (layout.block_m * d + layout.stages * layout.block_n * 2 * d) * 2
        assert smem <= 232448 - 1024


def test_per_element_work_narrows_the_key_tile():
    """Element-wise masks (data-dependent ones too) and (i, j) table reads take registers per element: half the
    key tile, and no overlap at D >= 128; a score depending on j (ALiBi) only at D = 256."""
    doc = _plan("document_mask").warpgroups.layout
    assert (doc.block_n, doc.overlap) == (64, False)
    assert _plan("document_mask", d=64).warpgroups.layout.overlap
    assert _plan("relative_bias").warpgroups.layout.block_n == 64
    assert _plan("alibi").warpgroups.layout.block_n == 128
    assert _plan("alibi", d=256).warpgroups.layout.block_n == 32


def test_cooperative_schedule_on_request():
    """One consumer partition of 8 warps (two warpgroups sharing every step) instead of two of 4."""
    plan = _plan(options=PlanOptions(gluon=True, gluon_persistent=False, warpgroup_schedule="cooperative"))
    w = plan.warpgroups.layout
    assert (w.schedule, w.consumers, w.consumer_warps, w.rows_per_consumer) == ("cooperative", 1, 8, 128)
    source = gluon.generate_gluon(plan)
    compile(source, "cooperative.py", "exec")
    assert source.count("(consume, (") == 1 and "], [1],\n       [24])" in source
    assert max_registers(plan.warpgroups.layout) == max_registers(_plan().warpgroups.layout)  # 12 warps either way
    assert "turns" not in source  # the handoff is ping-pong's
    with pytest.raises(attnc.CompileError, match="warpgroup_schedule must be one of pingpong, parallel, cooperative"):
        _plan(options=PlanOptions(gluon=True, gluon_persistent=False, warpgroup_schedule="three"))


def test_pingpong_hands_the_tensor_cores_over():
    """Ping-pong: the consumers alternate turns at issuing MMAs (consumer 0 first), one wait and one arrive per
    group of issues in each, so both take the same number of turns; parallel drops the handoff."""
    source = gluon.generate_gluon(_plan())
    assert source.count("mbarrier.wait(turns.index(CONSUMER), turn & 1)") == 3  # first QK^T, loop, last P V
    assert source.count("mbarrier.arrive(turns.index(1 - CONSUMER), count=1)") == 3
    assert "mbarrier.arrive(turns.index(0), count=1)" in source
    serial = gluon.generate_gluon(_plan("dense", d=256))  # no overlap: QK^T and P V in turns of their own
    assert serial.count("mbarrier.wait(turns.index(CONSUMER), turn & 1)") == 2
    parallel = gluon.generate_gluon(_plan(options=PlanOptions(gluon=True, gluon_persistent=False, warpgroup_schedule="parallel")))
    assert "turns" not in parallel and parallel.count("(consume, (") == 2


def test_mla_value_dim():
    """MLA's D = 192 / DV = 128: Q and K in chunks of 128 and 64 columns (passes/tiling.py head_dim_chunks) take
    dense D = 128's 128-key tile with two ring stages in shared memory; D padded to 256 fits three stages of 64 keys
    (PlanOptions(chunk_head_dim=False), what main ran)."""
    chunked = _plan("mla_prefill", d=192, dv=128).warpgroups
    assert chunked.path == "gluon" and chunked.layout.overlap
    assert (chunked.layout.d_chunks, chunked.layout.block_n, chunked.layout.stages) == ((128, 64), 128, 2)
    padded = _plan("mla_prefill", d=192, dv=128, options=PlanOptions(gluon=True, gluon_persistent=False, chunk_head_dim=False)).warpgroups
    assert (padded.layout.d_chunks, padded.layout.block_n, padded.layout.stages) == ((256,), 64, 3)
    for layout, columns in ((chunked.layout, 192), (padded.layout, 256)):
        need = (layout.block_m * columns + layout.stages * layout.block_n * (columns + 128)) * 2 + BARRIER_BYTES
        assert need <= smem_capacity(90)
    assert (128 * 256 + 2 * 128 * (256 + 128)) * 2 > smem_capacity(90)  # why padded D keeps 64 keys
    assert "QK^T over D's chunks 128+64" in _plan("mla_prefill", d=192, dv=128).describe()


@pytest.mark.parametrize("d, dv, chunks", [(192, 128, (128, 64)), (192, 64, (128, 64)), (80, 64, (64, 16)),
                                           (96, 96, (128,)), (80, 80, (128,)), (128, 128, (128,))])
def test_gluon_head_dim_chunks(d, dv, chunks):
    """The Gluon kernel takes the plan's chunks of D where out's tile fits in Q's first chunk (out leaves through
    that buffer); DV = 96 (BLOCK_DV 128) does not fit D = 96's chunk of 64, so Q and K stay padded to 128."""
    plan = _plan("mla_prefill", d=d, dv=dv)
    assert plan.warpgroups.layout.d_chunks == chunks
    assert gluon_d_chunks(plan) == chunks


def test_chunked_source_chains_one_wgmma_per_chunk():
    """D = 192 in chunks: a descriptor, a shared buffer and a TMA copy per chunk at the chunk's first column, one
    expect of both chunks' bytes per barrier, and QK^T as two async wgmmas, the second accumulating onto the first,
    at every site (first tile, loop); out leaves through Q's first chunk (its shape: no reinterpret)."""
    source = gluon.generate_gluon(_plan("mla_prefill", d=192, dv=128))
    compile(source, "mla.py", "exec")
    assert "BLOCK_D]" not in source and "D_CHUNK_0 = tl.constexpr(128)" in source and "D_CHUNK_1 = tl.constexpr(64)" in source
    for name in ("q_desc", "k_desc"):
        assert f"{name}_0.block_type.nbytes + {name}_1.block_type.nbytes)" in source
        assert source.count(f"{name}_1 = tma.make_tensor_descriptor(") == 1
    assert "q_bufs_1.index(c))" in source and ", 128], q_ready.index(c), q_bufs_1.index(c))" in source
    assert "[t * BLOCK_N, 128], k_ready.index(slot), k_bufs_1.index(slot))" in source
    first = [ln.strip() for ln in source.splitlines() if "warpgroup_mma(q_smem_0" in ln]
    second = [ln.strip() for ln in source.splitlines() if "warpgroup_mma(q_smem_1" in ln]
    assert len(first) == len(second) == 2  # the first tile and the loop (overlapped)
    assert all("s_zero, use_acc=False, is_async=True)" in ln for ln in first)
    assert all(ln.endswith(".permute((1, 0)), qk, is_async=True)") for ln in second)
    lines = source.splitlines()
    for n, ln in enumerate(lines):  # each chained pair is adjacent: no wait between the chunks
        if "warpgroup_mma(q_smem_0" in ln:
            assert "warpgroup_mma(q_smem_1" in lines[n + 1]
    assert "o_smem = q_smem_0  #" in source and "_reinterpret" not in source
    narrow_out = gluon.generate_gluon(_plan("mla_prefill", d=192, dv=64))
    assert "o_smem = q_smem_0._reinterpret(DTYPE, [BLOCK_M, BLOCK_DV], O_SMEM)" in narrow_out


def test_warpgroup_key_tile_on_request():
    """PlanOptions(warpgroup_block_n=...) for A/B runs: the ring fits its stages to it, and a key tile whose two
    stages do not fit beside Q is refused (one slot would deadlock the overlapped consumer)."""
    chunked64 = _plan("mla_prefill", d=192, dv=128, options=PlanOptions(gluon=True, gluon_persistent=False, warpgroup_block_n=64))
    assert (chunked64.warpgroups.layout.block_n, chunked64.warpgroups.layout.stages) == (64, 4)
    with pytest.raises(attnc.CompileError, match="two ring stages of 128 keys at D=192 DV=128 do not fit"):
        _plan("mla_prefill", d=192, dv=128, options=PlanOptions(gluon=True, gluon_persistent=False, chunk_head_dim=False, warpgroup_block_n=128))
    with pytest.raises(attnc.CompileError, match="warpgroup_block_n must be one of 32, 64, 128, got 96"):
        _plan(options=PlanOptions(gluon=True, gluon_persistent=False, warpgroup_block_n=96))


@pytest.mark.parametrize("change, reason", [
    (dict(dtype="f32"), "f16, bf16"),
    (dict(target=Target("triton", "cuda", 80)), "sm_80"),
    (dict(target=Target("triton", "cuda", 100)), "sm_100"),
    (dict(target=Target("triton", "cpu", None)), "no GPU"),
    (dict(d=512), "up to 256"),
    (dict(d=64, dv=128), "DV <= D"),
    (dict(d=100), "multiples of 8"),
])
def test_what_keeps_the_template(change, reason):
    w = _plan(**change).warpgroups
    assert w.path == "triton" and reason in w.reason


def test_paged_and_ragged_keep_the_decode_kernel():
    spec = next(s for s in attnc.parse_file("examples/specs/paged_decode.attn") if s.name == "paged_decode")
    w = plan_kernel(spec, H100, 128, 128, GLUON).warpgroups
    assert w.path == "triton" and "paged" in w.reason


def test_the_default_takes_gluon_where_it_measured_faster():
    """PlanOptions() (gluon=None): the Gluon kernel for long prefill launches of the spec kinds where it beat the
    template on the H100, with persistent programs from shorter launches at D = 128 and where the mask leaves tiles
    unequal work (causal, D = 64 to 256); the template, with the reason and the layout the kernel would run,
    elsewhere."""
    auto = PlanOptions()
    dense256 = _plan("dense", d=256, options=auto).warpgroups
    assert dense256.path == "gluon" and not dense256.layout.persistent and dense256.min_length == AUTO_MIN_LENGTH
    assert "4096" in dense256.reason
    # (a tanh soft cap since tanh runs as one instruction, session 17)
    for name, d in (("dense", 128), ("causal_lm", 128), ("gqa_causal", 128), ("alibi", 128), ("grok_softcap", 128),
                    ("causal_lm", 256)):
        w = _plan(name, d=d, dv=d, options=auto).warpgroups
        assert w.path == "gluon" and w.layout.persistent and w.min_length == PERSISTENT_MIN_LENGTH, (name, d)
        assert "1024" in w.reason, name
    assert not _plan("mla_prefill", d=192, dv=128, options=auto).warpgroups.layout.persistent  # not timed persistent
    one_tile = _plan(options=PlanOptions(gluon_persistent=False)).warpgroups
    assert not one_tile.layout.persistent and one_tile.min_length == AUTO_MIN_LENGTH
    one_tile_auto = PlanOptions(gluon_persistent=False)
    for name, d, options, reason in (("dense", 64, auto, "below 128"), ("causal_lm", 64, one_tile_auto, "below 128"),
                                     ("sliding_window", 128, one_tile_auto, "key window"),
                                     ("grok_softcap", None, PlanOptions(approx_functions=False), "function of qk"),
                                     ("document_mask", 128, auto, "evaluated per element")):
        w = _plan(name, d=d or EXAMPLES[name].dim_values.get("D", 128), options=options).warpgroups
        assert w.path == "triton" and reason in w.reason and "gluon=True" in w.reason and w.layout, name
    # persistent programs beat the template at D = 64 and under a key window (sessions 13 and 16)
    for name, d in (("causal_lm", 64), ("sliding_window", 128)):
        w = _plan(name, d=d, options=auto).warpgroups
        assert w.path == "gluon" and w.layout.persistent and w.min_length == PERSISTENT_MIN_LENGTH, name
    forced = _plan(d=64).warpgroups  # gluon=True: wherever it qualifies, with no length bound
    assert forced.path == "gluon" and forced.min_length == 0
    off = _plan(options=PlanOptions(gluon=False)).warpgroups
    assert off.path == "triton" and "gluon=False" in off.reason and off.layout == _plan(options=auto).warpgroups.layout


def test_the_decision_is_a_pure_function_of_the_plan():
    assert _plan() == _plan() and hash(_plan().warpgroups) == hash(_plan().warpgroups)
    assert _plan().warpgroups != _plan(d=256).warpgroups


def test_plan_text_states_the_path_and_layout():
    text = _plan().describe()
    assert "prefill    gluon kernel" in text
    assert "producer 1 warp (TMA, 24 regs) -> ring of 3 K/V stages" in text and "pingpong" in text
    assert "QK^T(j+1) and PV(j) async" in text
    assert "prefill    triton kernel: q, k, v are f32" in _plan(dtype="f32").describe()


def test_cli_shows_the_staging(capsys):
    from attnc.cli import main

    assert main(["show", "examples/specs/causal.attn", "--emit", "plan"]) == 0
    out = capsys.readouterr().out
    assert "warpgroups producer 1 warp" in out and "M and N >= 1024" in out and "persistent" in out
    assert main(["show", "examples/specs/paged_decode.attn", "--name", "paged_decode", "--emit", "gluon"]) == 0
    assert "no Gluon kernel (ragged or paged storage" in capsys.readouterr().out
    assert main(["show", "examples/specs/causal.attn", "--emit", "gluon"]) == 0
    assert "def attn_fwd_gluon(" in capsys.readouterr().out


class _Template:
    """Stands for the template's launcher: records the launches handed to it."""

    def __init__(self):
        self.runs = []

    def run(self, bound):
        self.runs.append(bound)
        return "template", None


def test_a_plan_that_does_not_run_gluon_keeps_the_template_quietly(recwarn):
    fallback = _Template()
    assert gluon.launcher(_plan(options=PlanOptions()), fallback) is fallback
    assert gluon.launcher(_plan(dtype="f32", options=PlanOptions()), fallback) is fallback
    assert not recwarn.list


def test_asking_where_it_cannot_run_warns_and_falls_back():
    fallback = _Template()
    with pytest.warns(UserWarning, match=r"Gluon warpgroup kernel was asked for .*sm_80: warpgroup MMA is sm_90"):
        assert gluon.launcher(_plan(target=Target("triton", "cuda", 80)), fallback) is fallback


def test_a_triton_without_the_gluon_kernel_falls_back(monkeypatch):
    monkeypatch.setattr(gluon, "unavailable_here", lambda: "Triton 9.9: the Gluon kernel is written for Triton 3.6")
    fallback = _Template()
    with pytest.warns(UserWarning, match="Triton 9.9"):
        assert gluon.launcher(_plan(), fallback) is fallback


def test_this_triton_is_judged_by_its_release():
    import triton

    why = gluon.unavailable_here()
    release = ".".join(triton.__version__.split(".")[:2])
    assert (why == "") == (release in gluon.GLUON_TRITON), why
    if why:
        assert triton.__version__ in why


def test_only_prefill_launches_with_tma_ready_tensors_run_gluon():
    """M in the decode regime, and q/k/v that TMA cannot read (a non-unit head-dim stride), go to the template."""
    from attnc.dsl.signature import bind

    plan = _plan("gqa_causal")
    fallback = _Template()
    module = type("Module", (), {"attn_fwd_gluon": None})
    launcher = gluon.GluonLauncher(plan, module, fallback)
    spec = plan.spec

    def bound(m, strided=False):
        q = torch.randn(2, 8, m, 256 if strided else 128, dtype=torch.bfloat16)
        q = q[..., ::2] if strided else q
        k, v = (torch.randn(2, 2, 300, 128, dtype=torch.bfloat16) for _ in range(2))
        return bind(spec, q, k, v, {})

    # the decode kernel's M (split-KV included) stays with the template
    assert launcher.min_m == max(plan.tiling.decode_max_m, plan.decode.dense_max_m) + 1
    assert not launcher.covers(bound(launcher.min_m - 1))
    assert launcher.covers(bound(launcher.min_m))
    assert not launcher.covers(bound(300, strided=True))
    assert launcher.run(bound(1)) == ("template", None) and len(fallback.runs) == 1


def test_max_registers_leave_the_default_partition_240():
    """setmaxnreg budgets: the launch's maxnreg over 12 warps (2 consumer warpgroups, the producer warp's group)
    leaves the first consumer (the default partition) what the second and the producer do not take."""
    plan = _plan()
    w = plan.warpgroups.layout
    total = max_registers(w) * 32 * 12
    assert total <= 65536
    assert (total - 128 * (w.consumer_regs + w.producer_regs)) // 128 >= w.consumer_regs


def test_generated_source_names_every_hook():
    """The Gluon kernel takes the spec's params and tables (mangled) and its sink from the same IR as the template."""
    plan = _plan("sinks", d=64)
    source = gluon.generate_gluon(plan)
    compile(source, "sinks.py", "exec")
    assert "t_sinks" in source and "p_window" in source and "sink = " in source
    assert source.count("warpgroup_mma(") == 4  # QK^T and P V: first tile, loop, and the last P V
    no_lse = gluon.generate_gluon(_plan("dense"))
    assert "lse_ptr + b" not in no_lse and "lse_ptr + b" in gluon.generate_gluon(_plan("causal_lm"))
    sigmoid = gluon.generate_gluon(_plan("sigmoid_causal"))
    assert "p = rcp_approx(1.0 + ex2_approx(-s))" in sigmoid and "def rcp_approx(" in sigmoid and "m_i =" not in sigmoid


def test_hostile_names_reach_gluon_only_mangled():
    from test_names import PLAIN, _renamed, _text, _without_key

    def source(rename):
        spec = with_dtype(attnc.parse(_text(rename))[0], "bf16")
        return gluon.generate_gluon(plan_kernel(spec, H100, 64, 64, GLUON))

    hostile, plain = source(lambda n: n), source(PLAIN.get)
    compile(hostile, "hostile.py", "exec")
    assert _without_key(hostile) == _without_key(_renamed(plain)) and "zq" not in _renamed(plain)


def test_hooks_match_the_template():
    """Scores, masks and the normalizer come from the same emitter as the Triton template: the lines agree but
    for the vectors' constructors and the exp2 the GPU module defines."""
    from attnc.backends.triton.generate import generate

    plan = _plan("gemma2_local", d=256)
    template = generate(replace(plan, options=PlanOptions()))
    source = gluon.generate_gluon(plan)
    for line in ("cap * tanh", "keep = (j_col[None, :] >= exact_lo[:, None])"):
        assert (line in template) == (line in source)
    score = [ln.strip() for ln in source.splitlines() if ln.strip().startswith("x") and "qk" in ln]
    assert score and all(line in template for line in score)


def test_a_covered_launch_packs_the_kernel_signature(monkeypatch):
    """The launch the GPU runs, with the kernel stubbed: one argument per parameter of attn_fwd_gluon, the grid over
    128-row query tiles and (batch, head), the consumers' warps and the register limit, outputs from launch.empty."""
    from attnc.backends.triton import launch
    from attnc.dsl.signature import bind

    plan = _plan("sinks", d=64)
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **options: calls.append((grid, args, options))

    launcher = gluon.GluonLauncher(plan, type("Module", (), {"attn_fwd_gluon": Kernel()}), _Template())
    made = []
    monkeypatch.setattr(launch, "empty", lambda *a: made.append(a) or torch.full(a[0], float("nan"), dtype=a[1]))
    q = torch.randn(2, 8, 300, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 500, 64, dtype=torch.bfloat16) for _ in range(2))
    out = launcher(bind(plan.spec, q, k, v, {"sinks": torch.randn(8)}))
    (grid, args, options), = calls
    names = gluon.gluon_signature(gluon.spec_args(plan)).names
    assert grid == (3, 16) and len(args) == len(names)
    assert options == {"num_warps": 4, "maxnreg": max_registers(plan.warpgroups.layout)}
    assert gluon_kernel(plan) in plan.kernels and options == gluon_kernel(plan).keywords
    assert args[names.index("sz_M")] == 300 and args[names.index("sz_HKV")] == 2 and args[3] is out
    assert len(made) == 1 and out.shape == q.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fallback; the GPU runs test_gluon_gpu.py")
def test_asking_in_the_interpreter_warns_and_computes_with_the_template():
    """End to end on CPU tensors (Triton's interpreter): the option cannot be met, so the call warns once and the
    template's result matches the reference, every output element written."""
    from test_triton_kernels import example_sizes, run_and_check

    spec = with_dtype(EXAMPLES["sinks"], "f16")
    with pytest.warns(UserWarning, match="no GPU: the Gluon kernel needs sm_90"):
        run_and_check(spec, example_sizes(spec, m=20, n=45), options=GLUON)


PERSISTENT = PlanOptions(gluon=True, gluon_persistent=True)


def _one_tile(w):
    """The one-tile layout a persistent one extends."""
    return replace(w, persistent=False, producer_regs=24, consumer_regs=240, out_buffer=False)


def test_persistent_programs_on_request():
    """PlanOptions(gluon_persistent=True): the same tiles and ring, with the producer at 40 registers and both
    consumers at 232, which the launch's register pool holds, and out through a buffer of its own where shared
    memory holds one beside the ring (D = 64); the default keeps a program per query tile."""
    assert not _plan().warpgroups.layout.persistent
    one, persistent = _plan().warpgroups.layout, _plan(options=PERSISTENT).warpgroups.layout
    assert persistent.persistent and _one_tile(persistent) == one
    pool = max_registers(persistent) * 32 * 12
    assert pool - 128 * (persistent.consumer_regs + persistent.producer_regs) == 128 * persistent.consumer_regs
    assert "persistent: a program per SM over the work tiles" in _plan(options=PERSISTENT).describe()
    assert "persistent" not in _plan().describe()
    for name, d, out_buffer in (("causal_lm", 64, True), ("causal_lm", 128, False), ("dense", 256, False),
                                ("mla_prefill", 192, False)):
        dv = 128 if d == 192 else d
        w = _plan(name, d=d, dv=dv, options=PERSISTENT).warpgroups.layout
        assert _one_tile(w) == _plan(name, d=d, dv=dv).warpgroups.layout and w.out_buffer == out_buffer
        out = w.block_m * dv * 2 if out_buffer else 0
        ring = w.stages * w.block_n * (sum(w.d_chunks) + dv)
        assert (w.block_m * sum(w.d_chunks) + ring) * 2 + out + BARRIER_BYTES <= smem_capacity(90)
        assert (w.block_m * sum(w.d_chunks) + ring) * 2 + w.block_m * dv * 2 + BARRIER_BYTES > smem_capacity(90) \
            or out_buffer


def _calls(tree, function):
    """The calls in `function` of the module `tree`, in source order, as text, with a persistent partition's call of
    its work-tile function (`function`_tile) replaced by that function's calls."""
    import ast

    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    calls = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    text = []
    for call in calls:
        if ast.unparse(call.func) == f"{function}_tile":
            text += _calls(tree, f"{function}_tile")[0]
        else:
            text.append(ast.unparse(call))
    return text, fn


@pytest.mark.parametrize("schedule, d", [("pingpong", 128), ("cooperative", 128), ("pingpong", 256)])
def test_persistent_partitions_step_through_the_same_tiles(schedule, d):
    """Every partition loops over the same work units (unit_coords: two query tiles of a head) and finds each tile's
    key range with the same function; the barriers are made once, outside the loops, so the ring's phases run on
    across tiles; the producer loads a tile's Q into a consumer's buffer only after that consumer's out store left
    it (q_free), and the consumer frees it after its last QK^T where out has a buffer of its own (D = 128), else
    only after the out store's read (tma.store_wait; D = 256)."""
    import ast

    plan = _plan(d=d, options=replace(PERSISTENT, warpgroup_schedule=schedule))
    source = gluon.generate_gluon(plan)
    tree = ast.parse(source)
    loop = "range(tl.program_id(0), work_units(batch_i32, heads_i32, rows_i32), tl.num_programs(0))"
    for function in ("produce", "consume"):
        calls, fn = _calls(tree, function)
        unit_loops = [n for n in ast.walk(fn) if isinstance(n, ast.For) and ast.unparse(n.iter) == loop]
        assert len(unit_loops) == 1 and unit_loops[0] in fn.body
        tiles = unit_loops[0].body[-1]  # the unit's query tiles, the longer first
        assert ast.unparse(tiles.iter) == "range(tiles)" and \
            ast.unparse(tiles.body[0]) == "pid_m = tl.where(half == 0, long_m, short_m)"
        assert sum(c.startswith("tile_range(pid_m, tile_b, tile_h, ") for c in calls) == 1
        assert not any(c.startswith("mbarrier.init") for c in calls)
    calls, _ = _calls(tree, "attn_fwd_gluon")
    assert "mbarrier.init(q_free.index(c), count=1)" in calls and not any("make_tensor_descriptor(q_ptr +" in c
                                                                         for c in calls)
    produce, _ = _calls(tree, "produce")
    first_kv = produce.index(next(c for c in produce if c.startswith("mbarrier.wait(empty.index(slot)")))
    assert first_kv < produce.index("mbarrier.wait(q_free.index(c), done & 1 ^ 1)")  # K/V before Q's wait
    consume, _ = _calls(tree, "consume")
    store = consume.index(next(c for c in consume if c.startswith("tma.async_copy_shared_to_global")))
    free = consume.index("mbarrier.arrive(q_free.index(CONSUMER), count=1)")
    last_qk = max(i for i, c in enumerate(consume) if c.startswith("warpgroup_mma(q_smem"))
    if plan.warpgroups.layout.out_buffer:  # and the buffer is rewritten only after the last store read it
        assert last_qk < free < consume.index("tma.store_wait(0)") < consume.index("o_smem.store(out.to(DTYPE))") \
            < store and consume.count("tma.store_wait(0)") == 2  # the last one after the work loop
    else:
        assert store < consume.index("tma.store_wait(0)") < free
    assert "mbarrier.wait(q_ready.index(CONSUMER), done & 1)" in consume


def test_persistent_launch_takes_a_program_per_sm(monkeypatch):
    """The grid is the SM count, or the work tiles where there are fewer; the arguments are the one-tile kernel's."""
    from attnc.backends.triton import launch
    from attnc.dsl.signature import bind

    plan = _plan("sinks", d=64, options=PERSISTENT)
    grids = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **options: grids.append(grid)

    launcher = gluon.GluonLauncher(plan, type("Module", (), {"attn_fwd_gluon": Kernel()}), _Template())
    monkeypatch.setattr(gluon, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(launch, "empty", lambda *a: torch.full(a[0], float("nan"), dtype=a[1]))
    k, v = (torch.randn(2, 2, 500, 64, dtype=torch.bfloat16) for _ in range(2))
    for h, m in ((8, 300), (8, 1300), (2, 300)):  # 48, 176 and 12 work tiles of 128 rows
        launcher(bind(plan.spec, torch.randn(2, h, m, 64, dtype=torch.bfloat16), k, v, {"sinks": torch.randn(h)}))
    assert grids == [(48,), (132,), (12,)]


def test_the_gpu_ab_times_one_tile_against_persistent_programs():
    """benchmarks/gluon_schedules.py --persistent: cuDNN (the anchor), the template, and the Gluon kernel with a
    program per query tile and with persistent programs, which the runners' options select."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gluon_schedules

    makers = gluon_schedules.gluon_makers(gluon_schedules.PERSISTENT_VARIANTS)(None, None, None, None, {}, {})
    assert list(makers) == ["sdpa-cudnn", "attnc", "attnc-gluon", "attnc-gluon-persistent"]
    layouts = [_plan(options=o).warpgroups.layout for o in gluon_schedules.PERSISTENT_VARIANTS.values()]
    assert [w.persistent for w in layouts] == [False, True]


def test_persistent_programs_take_no_expanded_heads():
    """A K/V head stride of 0 (k.expand over heads), or a size-1 batch's stride off 16 bytes, has no TMA stride in
    the persistent kernel's one descriptor over all heads, so that launch runs the template; a program per tile
    takes it (the stride goes into its base)."""
    from attnc.dsl.signature import bind

    q = torch.randn(2, 8, 300, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1, 300, 128, dtype=torch.bfloat16).expand(2, 2, 300, 128) for _ in range(2))
    module = type("Module", (), {"attn_fwd_gluon": None})
    for options, covered in ((PERSISTENT, False), (GLUON, True)):
        plan = _plan("gqa_causal", options=options)
        launcher = gluon.GluonLauncher(plan, module, _Template())
        assert launcher.covers(bind(plan.spec, q, k, v, {})) == covered
        assert launcher.covers(bind(plan.spec, q, k.contiguous(), v.contiguous(), {}))
        # a batch of one whose batch stride is no multiple of 16 bytes: a per-head base never moves by it
        odd = q[:1].as_strided((1, 8, 300, 128), (3, 300 * 128, 128, 1))
        assert launcher.covers(bind(plan.spec, odd, k[:1].contiguous(), v[:1].contiguous(), {})) == covered


UNDER_PV = replace(GLUON, gluon_weights_under_pv=True)


@pytest.mark.parametrize("name, d, persistent", [("causal_lm", 128, False), ("causal_lm", 128, True),
                                                 ("causal_lm", 64, True), ("dense", 64, False),
                                                 ("gqa_causal", 128, False)])
def test_weights_under_pv_fits_beside_the_ring(name, d, persistent):
    """PlanOptions(gluon_weights_under_pv=True) where the layout overlaps: two P buffers per consumer's rows join Q
    and the ring in shared memory (the ring keeps its four stages at D = 64 and gives up its third at D = 128;
    persistent out keeps a buffer of its own only where it still fits: D = 64)."""
    plan = _plan(name, d=d, options=replace(UNDER_PV, gluon_persistent=persistent))
    w, t = plan.warpgroups.layout, plan.tiling
    assert w.weights_under_pv and w.overlap and w.persistent == persistent
    default = _plan(name, d=d, options=replace(GLUON, gluon_persistent=persistent)).warpgroups.layout.stages
    assert (default, w.stages) == ((4, 4) if d == 64 else (3, 2))
    shared = (w.block_m * t.block_d + w.stages * w.block_n * (t.block_d + t.block_dv) + 2 * w.block_m * w.block_n) * 2
    assert shared + BARRIER_BYTES <= smem_capacity(90)
    assert w.out_buffer == (persistent and shared + BARRIER_BYTES + w.block_m * t.block_dv * 2 <= smem_capacity(90))
    assert "weights under P V" in gluon.plan_line(plan)


def test_weights_under_pv_needs_the_overlap_and_room_for_p():
    """D = 256 (DV > 128) does not overlap QK^T and P V, and MLA's D = 192 has no room for P beside two stages: the
    option leaves them as they were."""
    for name, d, dv in (("dense", 256, 256), ("mla_prefill", 192, 128)):
        assert _plan(name, d=d, dv=dv, options=UNDER_PV).warpgroups.layout \
            == _plan(name, d=d, dv=dv).warpgroups.layout


@pytest.mark.parametrize("persistent", [False, True])
def test_weights_under_pv_waits_for_p_v_a_step_later(persistent):
    """In the key loop the wait for the last step's P V comes after the v_ready wait (a branch ptxas does not move
    it across) and before the weights' QK^T wait, releasing the slot of the tile before last (none in the first
    two steps); P goes to the buffer the in-flight P V does not read, fenced, and a thread barrier precedes the P V
    that reads it."""
    import ast

    source = gluon.generate_gluon(_plan(options=replace(UNDER_PV, gluon_persistent=persistent)))
    _, fn = _calls(ast.parse(source), "consume_tile" if persistent else "consume")
    loop = next(n for n in ast.walk(fn) if isinstance(n, ast.For) and ast.unparse(n.iter) == "range(run_start + 1, run_end)")
    calls = sorted((n for n in ast.walk(loop) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    body = [ast.unparse(n) for n in calls]
    order = ["mbarrier.wait(v_ready.index(prev)", "warpgroup_mma_wait(0, deps=[acc])",
             "mbarrier.arrive(empty.index((n + STAGES - 2) % STAGES), count=1, pred=k >= 2)", "gl.thread_barrier()",
             "mbarrier.wait(k_ready.index(slot)", "warpgroup_mma(prob_bufs.index(CONSUMER * 2 + (k - 1) % 2)",
             "warpgroup_mma_wait(1, deps=[qk])", "prob_bufs.index(CONSUMER * 2 + k % 2).store(", "fence_async_shared()"]
    found = [next(i for i, c in enumerate(body) if c.startswith(o)) for o in order]
    assert found == sorted(found), body
    assert "probs" not in source and source.count("warpgroup_mma_wait(0, deps=[acc])") == 2


def test_the_gpu_ab_times_p_in_registers_against_shared_memory():
    """benchmarks/gluon_schedules.py --weights-under-pv: cuDNN, the template, the Gluon kernel as it is and with
    PlanOptions(gluon_weights_under_pv=True)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gluon_schedules

    makers = gluon_schedules.gluon_makers(gluon_schedules.UNDER_PV_VARIANTS)(None, None, None, None, {}, {})
    assert list(makers) == ["sdpa-cudnn", "attnc", "attnc-gluon", "attnc-gluon-under-pv"]
    layouts = [_plan(options=o).warpgroups.layout for o in gluon_schedules.UNDER_PV_VARIANTS.values()]
    assert [w.weights_under_pv for w in layouts] == [False, True]
