"""The plan's kernel list (passes/kernels.py) holds every kernel a launch can select: checked against the
selectors the launchers use, over many call shapes and several plans, and against what the launchers
really launch on CPU (Triton's interpreter)."""
import random

import pytest
import torch

import attnc
from attnc.backends.triton import launch
from attnc.passes import PlanOptions, Target, launch_tiles, plan_kernel
from attnc.passes.decode import decode_launch
from attnc.passes.kernels import gluon_kernel, gluon_min_m, prefill_kernel, summary_kernel
from attnc.passes.latent_decode import latent_launch
from attnc.passes.warpgroups import max_registers

SPECS = """\
attention gqa_causal {
    q: f16[B, H, M, D]  k: f16[B, HKV, N, D]  v: f16[B, HKV, N, D]
    mask causal
    return softmax(score) @ v, lse
}
attention doc {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    input doc: i32[B, N]
    mask doc[b, i] == doc[b, j]
    return softmax(score) @ v
}
attention paged_cache {
    q: f16[B, M, H, D]  k: f16[PAGES, PAGE, HKV, D]  v: f16[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    return softmax(score) @ v
}
"""


@pytest.mark.parametrize("arch", [None, 80, 90])
@pytest.mark.parametrize("name", ["gqa_causal", "doc", "paged_cache"])
def test_every_selected_kernel_is_listed(arch, name):
    spec = {s.name: s for s in attnc.parse(SPECS)}[name]
    plan = plan_kernel(spec, Target("triton", "cuda" if arch else "cpu", arch), 64, 64)
    listed = set(plan.kernels)
    assert len(listed) == len(plan.kernels) and listed
    storage = spec.kv_storage is not None
    rng = random.Random(0)
    for _ in range(400):
        hkv = rng.choice([1, 2, 4])
        group = rng.choice([1, 2, 3, 4, 6, 8, 16, 32]) if spec.is_gqa_shape else 1
        m, n, b = rng.choice([1, 2, 3, 5, 8, 16, 17, 31, 64, 65, 100, 1024, 4097]), rng.randint(1, 70000), rng.randint(1, 64)
        sizes = {"B": b, "H": hkv * group, "HKV": hkv, "M": m, "N": n, "D": 64, "DV": 64, "PAGE": 16,
                 "MAXP": -(-n // 16), "PAGES": b * -(-n // 16)}
        go = decode_launch(plan, sizes, rng.choice([2, 108, 132])) if storage or plan.decode.dense_max_m else None
        if go is not None:
            assert go.decode in listed, (sizes, go.decode)
            assert go.combine is None or go.combine in listed, (sizes, go.combine)
            continue
        assert not storage
        tiles = launch_tiles(plan, m, group)
        for tma in ((True, False) if plan.triton.tma else (None,)):
            assert prefill_kernel(plan, tiles, tma) in listed, (sizes, tiles)
        if plan.masks.data_dependent:
            assert summary_kernel(tiles) in listed


class Recording:
    """Stands in for a generated module: records each (function, launch keywords) and runs the real kernel."""

    def __init__(self, module, seen: list):
        self.module, self.seen = module, seen

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        seen = self.seen

        class Launcher:
            arg_names = fn.arg_names

            def __getitem__(self, grid):
                def run(*args, **keywords):
                    seen.append((name, tuple(keywords.items())))
                    return fn[grid](*args, **keywords)
                return run
        return Launcher()


def test_launchers_launch_only_listed_kernels():
    """The real launchers, on the interpreter, across decode and prefill shapes of a dense GQA spec."""
    spec = attnc.parse(SPECS)[0]
    plan = plan_kernel(spec, Target("triton", "cpu", None), 16, 16)
    seen: list = []
    from attnc.backends.triton.serving import launcher_for, load_decode_module

    launcher = launcher_for(plan, Recording(launch.load_module(plan), seen),
                            Recording(load_decode_module(plan), seen))
    from attnc.dsl.signature import bind

    torch.manual_seed(0)
    for m, n in [(1, 300), (1, 20), (3, 200), (40, 40), (70, 90)]:
        q, k, v = (torch.randn(1, h, s, 16).half() for h, s in ((2, m), (1, n), (1, n)))
        with launch.poisoned_outputs():
            out, lse = launcher(bind(spec, q, k, v, {}))
        ref, ref_lse = attnc.reference(spec, q, k, v)
        assert (out.double() - ref).abs().max() < 2e-3 and (lse.double() - ref_lse).abs().max() < 2e-3
    listed = {(k.function, k.launch) for k in plan.kernels}
    assert seen and set(seen) <= listed, set(seen) - listed
    assert {"attn_fwd", "attn_decode", "attn_combine"} <= {f for f, _ in seen}


def _long_causal(dims: str):
    return attnc.parse(f"""attention long_causal {{
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    {dims}
    mask causal
    return softmax(score) @ v, lse
}}""")[0]


@pytest.mark.parametrize("dims, options, listed", [
    ("", PlanOptions(), 14),  # 1-64 heads a program, split or not
    ("H = 128,", PlanOptions(), 2),  # one K/V head: the group is H, 64 heads a program
    ("H = 48,", PlanOptions(), 2),  # 16 heads a program
    ("", PlanOptions(gluon=False), 0),
    ("", PlanOptions(mla_persistent=True), 7),  # one persistent launch a call, never split
])
def test_every_gluon_mla_decode_launch_is_listed(dims, options, listed):
    """attn_decode_gluon: every launch latent_launch selects over call shapes is in the list, and the list holds no
    other (none where the plan keeps the Triton decode kernel); its split launches' merges, and a persistent
    launch's scheduled merge, are listed too."""
    spec = attnc.parse(open("examples/specs/mla.attn").read().replace("dims D = 512, DR = 64, PAGE = 64",
                                                                        f"dims {dims} D = 512, DR = 64, PAGE = 64"))[1]
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 512, 512, options)
    gluon_kernels = {k for k in plan.kernels if k.function == "attn_decode_gluon"}
    assert len(gluon_kernels) == listed and all(k.module == "gluon_decode" for k in gluon_kernels)
    if not listed:
        return
    rng = random.Random(0)
    selected = set()
    for _ in range(300):
        h = spec.dim_values.get("H") or rng.choice([1, 2, 3, 6, 12, 16, 24, 96, 64, 128, 256])
        b, n = rng.choice([1, 2, 8, 300]), rng.randint(1, 70000)
        sizes = {"B": b, "H": h, "HKV": 1, "M": 1, "N": n}
        go = latent_launch(plan, sizes, rng.choice([2, 132]))
        selected.add(go.decode)
        assert go.combine is None or go.combine in plan.kernels, (sizes, go.combine)
        assert bool(go.programs) == bool(options.mla_persistent)
    assert selected == gluon_kernels


@pytest.mark.parametrize("dims, options, arch, listed", [
    ("", PlanOptions(), 90, True),
    ("dims M = 4096, N = 8192", PlanOptions(), 90, True),
    ("dims M = 1024", PlanOptions(), 90, True),  # causal: persistent programs from 1024
    ("dims N = 1024", PlanOptions(), 90, True),
    ("dims M = 512", PlanOptions(), 90, False),  # shorter than the default's minimum length: the template's
    ("dims M = 1024", PlanOptions(gluon_persistent=False), 90, False),  # one-tile programs from 4096
    ("dims M = 1024", PlanOptions(gluon=True), 90, True),
    ("", PlanOptions(gluon=False), 90, False),
    ("", PlanOptions(), 80, False),
])
def test_the_gluon_kernel_is_listed_where_a_call_reaches_it(dims, options, arch, listed):
    """attn_fwd_gluon with the options its launcher passes, listed where the plan's prefill path is Gluon unless
    the spec's dims keep every launch short of it; a dense M bound past the decode regime lists no decode kernel."""
    plan = plan_kernel(_long_causal(dims), Target("triton", "cuda", arch), 128, 128, options)
    gluon_kernels = [k for k in plan.kernels if k.function == "attn_fwd_gluon"]
    assert bool(gluon_kernels) == listed
    if listed:
        w = plan.warpgroups.layout
        assert gluon_kernels == [gluon_kernel(plan)] and gluon_kernel(plan).module == "gluon"
        assert gluon_kernel(plan).keywords == {"num_warps": w.consumer_warps, "maxnreg": max_registers(w)}
        assert plan.spec.dim_values.get("M", gluon_min_m(plan)) >= gluon_min_m(plan) > plan.tiling.decode_max_m
    if plan.spec.dim_values.get("M", 0) > plan.decode.dense_max_m:
        assert {k.function for k in plan.kernels} <= {"attn_fwd", "attn_fwd_gluon"}
