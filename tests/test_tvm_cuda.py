"""The TVM backend's GPU kernels, AOT artifacts and kernel source for other targets.

Without a GPU: CUDA kernels compile through nvcc and use tensor cores (mma.sync / ldmatrix / cp.async in the
source; f32 takes the plain GPU kernel); Metal / ROCm / OpenCL source is generated from the plain GPU kernel
(not run: no such device here); AOT artifacts round-trip on the CPU with only the TVM runtime (no `tvm`
package), also through `attnc compile --backend tvm` and `attnc.load`. On the GPU (`-m gpu`): every artifact
benchmarks/tvm_cuda_check.py built into .tvm-aot (tensor-core and plain kernels) against attnc.reference,
outputs poisoned with NaN (the GPU machine has no TVM compiler, so artifacts come from here).
"""
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnc
from attnc.backends.tvm import aot
from attnc.backends.tvm import runtime as tvm_runtime
from attnc.passes import PlanOptions, Target, plan_kernel

ROOT = Path(__file__).resolve().parent.parent
AOT_DIR = ROOT / ".tvm-aot"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA kernels are built by it)")


def spec_text(dtype="bf16", masks="mask causal", v_dim="D"):
    return f"""
attention t {{
    q: {dtype}[B, H, M, D]  k: {dtype}[B, HKV, N, D]  v: {dtype}[B, HKV, N, {v_dim}]
    {masks}
    return softmax(score) @ v, lse
}}
"""


def cuda_source(spec, d, dv=None, options=PlanOptions(), **schedule):
    """The tensor-core kernel's CUDA C for cuda_schedule(plan) with `schedule`'s fields replaced."""
    import tvm

    from attnc.backends.tvm.backend import compile_module, cuda_target
    from attnc.backends.tvm.cuda import build_cuda_primfunc, cuda_schedule

    plan = plan_kernel(spec, Target("tvm", "cuda", 90), d, dv or d, options)
    sched = dataclasses.replace(cuda_schedule(plan), **schedule)
    module = compile_module({"attn": build_cuda_primfunc(plan, sched)}, plan, cuda_target(90), "test")
    assert isinstance(module, tvm.runtime.Executable)
    return module.mod.imports[0].inspect_source()


@needs_nvcc
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_cuda_kernel_uses_tensor_cores(dtype):
    src = cuda_source(attnc.parse(spec_text(dtype))[0], 64)
    ptx = {"bf16": "bf16", "f16": "f16"}[dtype]
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx}.{ptx}.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src  # Q and K fragments
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in src  # V fragments
    assert "cp_async" in src and "__shfl_xor_sync" in src  # async K/V staging; quad row max / sum


REGISTER_VIEW = re.compile(r"\(\((unsigned|float) \*\)\((_ptr_\d+) \+ (\d+)\)\)\[(\d+)\]")


def register_views_out_of_bounds(src: str) -> list[str]:
    """Every `((unsigned *)(frag + off))[r]` / `((float *)(acc + off))[r]` (ldmatrix / mma operands and
    accumulators) that reaches past the array's declared elements: such a write lands in a neighbouring local
    array, which no CPU run can show."""
    sizes = {name: (int(n), 2 if dtype in ("half", "nv_bfloat16") else 4)
             for dtype, name, n in re.findall(r"(half|nv_bfloat16|float) (_ptr_\d+)\[(\d+)\];", src)}
    bad = []
    for _, name, off, reg in REGISTER_VIEW.findall(src):
        n, width = sizes[name]
        if int(off) * width + 4 * (int(reg) + 1) > n * width:
            bad.append(f"{name}[{n}] + {off} register {reg}")
    return sorted(set(bad))


def test_register_view_check_catches_an_overflow():
    """The check itself: session 2's bug (an 8-element ldmatrix.x4 fragment declared with 4) is reported."""
    src = "nv_bfloat16 _ptr_7[4];\n float _ptr_6[8];\n ((unsigned *)(_ptr_7 + 0))[3] ((float *)(_ptr_6 + 4))[3]"
    assert register_views_out_of_bounds(src) == ["_ptr_7[4] + 0 register 3"]


# (PlanOptions, schedule fields replaced): session 2's kernel, the scale folded into exp2, Q in shared memory at
# 16 rows, 32 rows per warp with Q in shared memory (the default there at D >= 64) and in registers, and with
# block_n 32 at 8 warps.
FRAGMENT_CASES = {
    "r16-qreg-mul": (PlanOptions(), {"fold_scale": False}),
    "r16-qreg-fma": (PlanOptions(), {"fold_scale": True}),
    "r16-qsmem-fma": (PlanOptions(), {"q_in_registers": False}),
    "r32-qsmem-fma": (PlanOptions(num_warps=4, block_m=128), {}),
    "r32-qreg-fma": (PlanOptions(num_warps=2, block_m=64), {"q_in_registers": True}),
    "r32n32-qsmem-mul": (PlanOptions(num_warps=8, block_m=256, block_n=32), {"fold_scale": False}),
}


@needs_nvcc
@pytest.mark.parametrize("d, case", [(128, "r16-qreg-mul"), (128, "r16-qreg-fma"), (128, "r32-qsmem-fma"),
                                     (128, "r32n32-qsmem-mul"), (64, "r32-qreg-fma"), (96, "r32-qsmem-fma"),
                                     (64, "r16-qsmem-fma")])
def test_cuda_fragments_stay_inside_their_arrays(d, case):
    options, schedule = FRAGMENT_CASES[case]
    src = cuda_source(attnc.parse(spec_text("bf16"))[0], d, None, options, **schedule)
    assert "((unsigned *)(" in src and "((float *)(" in src  # the pattern still matches TVM's mma operands
    assert register_views_out_of_bounds(src) == []


@needs_nvcc
@pytest.mark.parametrize("q_in_registers", [False, True])
def test_two_row_blocks_share_each_k_and_v_fragment(q_in_registers):
    """32 rows per warp: each K / V ldmatrix feeds four mma.sync (two n8 halves x two row blocks); Q's fragments
    are loaded once (registers) or once per key tile (shared memory), for both row blocks."""
    d, block_n = 64, 32
    src = cuda_source(attnc.parse(spec_text("bf16"))[0], d, None,
                      PlanOptions(num_warps=4, block_m=128, block_n=block_n), q_in_registers=q_in_registers)
    kv_loads = (d // 16) * (block_n // 16) * 2  # K for S = Q K^T, V for O = P V (DV = D)
    assert src.count("mma.sync.aligned.m16n8k16") == 4 * kv_loads
    assert src.count("ldmatrix.sync.aligned") == kv_loads + 2 * (d // 16)


SCALED_SPEC = """
attention s {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    score = qk * rsqrt(D) + 0.5
    return softmax(score) @ v
}
"""


def test_cuda_schedule_choices_and_refusals():
    from attnc.backends.tvm.cuda import build_cuda_primfunc, cuda_schedule

    def plan(text, d, **options):
        return plan_kernel(attnc.parse(text)[0], Target("tvm", "cuda", 90), d, d, PlanOptions(**options))

    s = cuda_schedule(plan(spec_text(), 128))  # the default: 32 rows per warp, block_n 32, Q in shared memory
    assert (s.rows_per_warp, s.block_m, s.block_n, s.q_in_registers, s.fold_scale) == (32, 128, 32, False, True)
    s = cuda_schedule(plan(spec_text(), 128, block_m=64))  # session 2's kernel: 16 rows per warp, block_n 64
    assert (s.rows_per_warp, s.block_m, s.block_n, s.q_in_registers) == (16, 64, 64, True)
    s = cuda_schedule(plan(spec_text(), 256))  # wider heads: one row block per warp
    assert (s.rows_per_warp, s.block_n) == (16, 32)
    s = cuda_schedule(plan(spec_text(), 128, num_warps=4, block_m=128))
    assert (s.row_blocks, s.block_m, s.threads, s.q_in_registers) == (2, 128, 128, False)  # too many registers
    assert cuda_schedule(plan(spec_text(), 32, num_warps=2, block_m=64, block_n=32)).q_in_registers
    shifted = plan(SCALED_SPEC, 64)
    assert not cuda_schedule(shifted).fold_scale  # qk * c + 0.5 is not c * qk
    with pytest.raises(attnc.CompileError, match="c \\* qk"):
        build_cuda_primfunc(shifted, dataclasses.replace(cuda_schedule(shifted), fold_scale=True))
    with pytest.raises(attnc.CompileError, match="16 or 32 rows per warp"):
        cuda_schedule(plan(spec_text(), 64, num_warps=2, block_m=128))  # 64 rows per warp


@needs_nvcc
def test_cuda_kernel_odd_head_dims_and_evaluated_masks():
    """D not a multiple of 8 stages element by element; DV != D; lookups and dilation masks compile."""
    text = spec_text("f16", "input doc: i32[B, N]\n    mask doc[b, i] == doc[b, j]\n    mask (i - j) % 3 == 0",
                     "DV")
    src = cuda_source(attnc.parse(text)[0], 20, 72)
    assert "mma.sync.aligned.m16n8k16" in src


def test_f32_is_refused_on_tensor_cores():
    from attnc.backends.tvm.cuda import build_cuda_primfunc, cuda_schedule

    plan = plan_kernel(attnc.parse(spec_text("f32"))[0], Target("tvm", "cuda", 90), 64, 64)
    with pytest.raises(attnc.CompileError, match="f16 or bf16"):
        build_cuda_primfunc(plan, cuda_schedule(plan))


@needs_nvcc
def test_f32_on_cuda_takes_the_plain_gpu_kernel():
    from attnc.backends.tvm.cuda import build_cuda_kernel
    from attnc.backends.tvm.gpu import GpuSchedule

    plan = plan_kernel(attnc.parse(spec_text("f32"))[0], Target("tvm", "cuda", 90), 64, 64)
    sched, _ = build_cuda_kernel(plan)
    assert isinstance(sched, GpuSchedule)
    src = aot.emit_source(plan.spec, "cuda", "sm_90a", 64)
    assert "mma.sync" not in src and "cp.async" not in src
    assert re.search(r"__shared__ [^;]*float", src) and "__syncthreads()" in src


# Every emitter path the plain GPU kernel has: a score with a lookup and tanh, an affine and a lookup mask, a
# sink, lse, a param, GQA, DV != D and a head dim that is not a power of two.
SOURCE_SPEC = """
attention everything {
    q: f16[B, H, M, D]  k: f16[B, HKV, N, D]  v: f16[B, HKV, N, DV]
    input slopes: f32[H]
    input doc: i32[B, N]
    input sinks: f32[H]
    param cap: f32 = 30.0
    score = qk * rsqrt(D) + slopes[h] * (j - i)
    score = cap * tanh(score / cap)
    mask causal
    mask doc[b, i] == doc[b, j]
    return softmax(score, sink=sinks[h]) @ v, lse
}
"""
SOURCE_MARKS = {  # what makes each a real kernel of that language: entry point, on-chip tile memory, barrier
    "metal": ("kernel void attn_kernel(", "threadgroup float", "threadgroup_barrier(mem_flags::mem_threadgroup)"),
    "rocm": ('.amdgcn_target "amdgcn-amd-amdhsa-hcc-gfx90a"', "ds_read", "s_barrier"),
    "opencl": ("__kernel void attn_kernel(", "__local float", "barrier(CLK_LOCAL_MEM_FENCE)"),
}


@pytest.mark.parametrize("target", sorted(SOURCE_MARKS))
def test_kernel_source_for_other_gpus(target):
    spec = attnc.parse(SOURCE_SPEC)[0]
    src = aot.emit_source(spec, target, "gfx90a" if target == "rocm" else None, head_dim=40, value_dim=24)
    header = src.split("\n", 4)
    assert "attention everything" in header[1] and "D=40 DV=24" in header[1] and "GpuSchedule" in header[1]
    assert "q, k, v, out, lse, t_doc, t_sinks, t_slopes, p_cap" in header[2]  # inputs in canonical order, mangled
    for mark in SOURCE_MARKS[target]:
        assert mark in src, mark
    assert "mma" not in src and "ldmatrix" not in src  # PTX-only instructions stay in the CUDA kernel


def test_kernel_source_refusals():
    spec = attnc.parse(spec_text())[0]
    for target, words in (("vulkan", "SPIR-V"), ("webgpu", "64-bit integers"), ("hexagon", "metal, rocm")):
        with pytest.raises(attnc.CompileError, match=words):
            aot.emit_source(spec, target, head_dim=64)
    with pytest.raises(attnc.CompileError, match="gfx942"):
        aot.emit_source(spec, "rocm", "sm_90a", head_dim=64)
    with pytest.raises(attnc.CompileError, match="takes no architecture"):
        aot.emit_source(spec, "metal", "sm_90a", head_dim=64)
    with pytest.raises(attnc.CompileError, match="--dim"):  # D is not bound: it must be given
        aot.emit_source(spec, "metal")


def test_compile_command_tvm_artifact_and_source(tmp_path):
    """`attnc compile --backend tvm`: a CPU artifact attnc.load runs (a dict by name, and each attention's folder
    alone), and --emit source writes one file per attention."""
    from attnc import cli

    spec_file = tmp_path / "two.attn"
    second = spec_text("f32", "").replace("attention t", "attention u")
    spec_file.write_text(spec_text("f32", "mask causal", "DV") + second)
    assert cli.main(["compile", str(spec_file), "--backend", "tvm", "--target", "llvm", "--dims", "D=24,DV=40",
                     "-o", str(tmp_path / "art")]) == 0
    kernels = attnc.load(tmp_path / "art")
    assert sorted(kernels) == ["t", "u"]
    q, k, v = torch.randn(2, 3, 37, 24), torch.randn(2, 3, 50, 24), torch.randn(2, 3, 50, 40)
    (out, lse), (want, want_lse) = kernels["t"](q, k, v), attnc.reference(kernels["t"].spec, q, k, v)
    assert (out.double() - want).abs().max() < 2e-5 and (lse.double() - want_lse).abs().max() < 2e-5
    one = attnc.load(tmp_path / "art" / "u", name="u")  # each attention's own folder loads alone
    assert list(attnc.load(tmp_path / "art" / "u")) == ["u"]
    with pytest.raises(attnc.CallError, match=r"^name: .* has no attention named 'uu'; did you mean 'u'\? "
                                              r"\(it has: t, u\)"):
        attnc.load(tmp_path / "art", name="uu")
    q, k, v = torch.randn(1, 2, 5, 24), torch.randn(1, 2, 9, 24), torch.randn(1, 2, 9, 24)
    assert one.spec.name == "u"
    assert (one(q, k, v)[0].double() - attnc.reference(one.spec, q, k, v)[0]).abs().max() < 2e-5  # decode function

    assert cli.main(["compile", str(spec_file), "--backend", "tvm", "--target", "metal", "--emit", "source",
                     "--dims", "D=24,DV=40", "-o", str(tmp_path / "src")]) == 0
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["t.metal", "u.metal"]
    assert "kernel void attn_kernel(" in (tmp_path / "src" / "t.metal").read_text()
    # metal is source only; triton builds CUDA only: both say what to use instead (exit status 2)
    assert cli.main(["compile", str(spec_file), "--backend", "tvm", "--target", "metal", "--dims", "D=24",
                     "-o", str(tmp_path / "x")]) == 2
    assert cli.main(["compile", str(spec_file), "--target", "metal", "--arch", "sm_90a", "-o",
                     str(tmp_path / "x")]) == 2


def test_aot_target_and_arch_errors(tmp_path):
    spec = attnc.parse(spec_text())[0]
    with pytest.raises(attnc.CompileError, match="--emit source"):
        aot.build(spec, tmp_path / "a", target="metal", head_dim=64)
    with pytest.raises(attnc.CompileError, match="sm_90a"):
        aot.build(spec, tmp_path / "a", target="cuda", arch="hopper", head_dim=64)
    with pytest.raises(attnc.CacheError, match="not an attnc TVM artifact"):
        aot.load(tmp_path)


def test_aot_round_trip_with_only_the_tvm_runtime(tmp_path):
    """Built here, loaded in a process where `import tvm` fails: tvm_ffi plus the trimmed runtime folder."""
    from attnc.backends.tvm.runtime_pack import pack

    spec = attnc.parse(spec_text("f32", "mask causal\n    param window: i32 = 8\n    mask i + (N - M) - j < window"))[0]
    aot.build(spec, tmp_path / "art", target="llvm", head_dim=24)
    runtime = pack(tmp_path / "rt", f"{sys.version_info.major}.{sys.version_info.minor}")
    script = textwrap.dedent(f"""
        import sys, math
        sys.modules["tvm"] = None  # the GPU machine has no TVM: only tvm_ffi and libtvm_runtime.so
        import torch, attnc
        import attnc.backends.tvm.launch as launch
        from attnc.backends.tvm import aot
        launch.empty = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
        kernel, = attnc.backends.tvm.aot.load({str(tmp_path / "art")!r}).values()
        for m, n in ((1, 40), (45, 45), (70, 33)):  # decode and prefill functions
            q, k, v = torch.randn(2, 3, m, 24), torch.randn(2, 3, n, 24), torch.randn(2, 3, n, 24)
            (out, lse), (want, want_lse) = kernel(q, k, v, window=5), attnc.reference(kernel.spec, q, k, v, window=5)
            assert not out.isnan().any() and (out.double() - want).abs().max() < 1e-5, (m, n)
            assert torch.allclose(lse.double(), want_lse, atol=1e-5), (m, n)
        try:
            kernel(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32))
        except attnc.CallError as e:
            assert "D=24" in str(e), e
        else:
            raise AssertionError("a head dim the artifact was not built for must be refused")
        print("ok", "tvm" in sys.modules and sys.modules["tvm"] is not None)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(runtime), str(ROOT)]), "ATTNC_TVM_RUNTIME": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "False"]


FATBIN_MAGIC = bytes([0x50, 0xED, 0x55, 0xBA])  # nvcc's fatbin header


@needs_nvcc
@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None, reason="needs gcc and nm")
def test_cuda_artifact_ships_a_fatbin_and_loads_without_nvcc(tmp_path):
    """The GPU machine has only the TVM runtime: kernel.so must carry compiled CUDA (a fatbin), not source that
    the runtime would hand to tvm.support.nvcc. Loaded here in a process without `tvm`, through the trimmed runtime
    and a stand-in libcuda.so.1 (no GPU here: every driver call fails), up to looking the kernel function up."""
    from attnc.backends.tvm.runtime_pack import pack

    spec = attnc.parse(spec_text("f16"))[0]
    library = aot.build(spec, tmp_path / "art", target="cuda", arch="sm_90a", head_dim=64) / aot.LIBRARY
    data = library.read_bytes()
    assert FATBIN_MAGIC in data
    assert b"mma.sync" not in data and b"__global__" not in data  # the CUDA source is not shipped

    runtime = pack(tmp_path / "rt", f"{sys.version_info.major}.{sys.version_info.minor}")
    cuda_lib = runtime / tvm_runtime.RUNTIME_DIR / "libtvm_runtime_cuda.so"
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(cuda_lib)], capture_output=True, text=True,
                               check=True).stdout.split()
    driver = sorted({s.split("@")[0] for s in undefined if re.match(r"cu[A-Z]", s)})
    (tmp_path / "stub.c").write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in driver))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_path / "libcuda.so.1"),
                    str(tmp_path / "stub.c")], check=True)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tvm"] = None  # no tvm, so no tvm.support.nvcc and no tvm_callback_cuda_compile
        from pathlib import Path
        from attnc.backends.tvm import runtime
        module = runtime.load_module(Path({str(library)!r}), cuda=True)
        device = module.imports[0]
        try:
            device.inspect_source("fatbin")
        except UnicodeDecodeError as err:  # the runtime's module holds the fatbin as its code
            print(device.kind, err.object[:4].hex(), module["attn"] is not None)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(runtime), str(ROOT)]), "ATTNC_TVM_RUNTIME": "",
           "LD_LIBRARY_PATH": os.pathsep.join([str(tmp_path), os.environ.get("LD_LIBRARY_PATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cuda", FATBIN_MAGIC.hex(), "True"]


def _artifacts():
    if not AOT_DIR.is_dir():
        return []
    return sorted(p for p in AOT_DIR.iterdir() if (p / aot.MANIFEST).exists())


@pytest.mark.gpu
@pytest.mark.parametrize("folder", _artifacts(), ids=lambda p: p.name)
def test_cuda_artifact_matches_reference(folder, monkeypatch):
    import attnc.backends.tvm.launch as launch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tvm_cuda_check import SHAPES, check_one

    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))
    kernel, = aot.load(folder).values()
    for shape in SHAPES:
        result = check_one(kernel, shape)
        assert result["ok"], result


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(100, 800), (16, 130), (37, 75)])
def test_cuda_very_negative_logits_after_empty_tiles(shape, monkeypatch):
    """test_tvm_kernels.VERY_NEGATIVE on the GPU: the running max stays -inf through a row's empty key tiles."""
    import attnc.backends.tvm.launch as launch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tvm_cuda_check import check_one

    folder = AOT_DIR / "very_negative-bf16"
    assert (folder / aot.MANIFEST).exists(), f"build it first: python benchmarks/tvm_cuda_check.py build (no {folder})"
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))
    kernel, = aot.load(folder).values()
    result = check_one(kernel, shape)
    assert result["ok"], result
