"""The TVM backend's CUDA kernels and AOT artifacts.

Without a GPU: CUDA kernels compile through nvcc and use tensor cores (mma.sync / ldmatrix / cp.async in the
source); AOT artifacts round-trip on the CPU with only the TVM runtime (no `tvm` package) and check their
calls. On the GPU (`-m gpu`): every artifact benchmarks/tvm_cuda_check.py built into .tvm-aot against
attnc.reference, outputs poisoned with NaN (the GPU machine has no TVM compiler, so artifacts come from here).
"""
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnc
from attnc.codegen.tvm import aot
from attnc.passes import Target, plan_kernel

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


def cuda_source(spec, d, dv=None):
    import tvm

    from attnc.codegen.tvm.backend import compile_module, cuda_target
    from attnc.codegen.tvm.cuda import build_cuda_primfunc, cuda_schedule

    plan = plan_kernel(spec, Target("tvm", "cuda", 90), d, dv or d)
    module = compile_module({"attn": build_cuda_primfunc(plan, cuda_schedule(plan))}, plan, cuda_target(90), "test")
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


@needs_nvcc
def test_cuda_kernel_odd_head_dims_and_evaluated_masks():
    """D not a multiple of 8 stages element by element; DV != D; lookups and dilation masks compile."""
    text = spec_text("f16", "input doc: i32[B, N]\n    mask doc[b, i] == doc[b, j]\n    mask (i - j) % 3 == 0",
                     "DV")
    src = cuda_source(attnc.parse(text)[0], 20, 72)
    assert "mma.sync.aligned.m16n8k16" in src


def test_f32_is_refused_on_tensor_cores():
    from attnc.codegen.tvm.cuda import build_cuda_primfunc, cuda_schedule

    plan = plan_kernel(attnc.parse(spec_text("f32"))[0], Target("tvm", "cuda", 90), 64, 64)
    with pytest.raises(attnc.CompileError, match="f16 or bf16"):
        build_cuda_primfunc(plan, cuda_schedule(plan))


def test_aot_target_and_arch_errors(tmp_path):
    spec = attnc.parse(spec_text())[0]
    with pytest.raises(attnc.CompileError, match="--emit source"):
        aot.build(spec, tmp_path / "a", target="metal", head_dim=64)
    with pytest.raises(attnc.CompileError, match="sm_90a"):
        aot.build(spec, tmp_path / "a", target="cuda", arch="hopper", head_dim=64)
    with pytest.raises(attnc.CompileError, match="not an attnc TVM artifact"):
        aot.load(tmp_path)


def test_aot_round_trip_with_only_the_tvm_runtime(tmp_path):
    """Built here, loaded in a process where `import tvm` fails: tvm_ffi plus the trimmed runtime folder."""
    from attnc.codegen.tvm.runtime_pack import pack

    spec = attnc.parse(spec_text("f32", "mask causal\n    param window: i32 = 8\n    mask i + (N - M) - j < window"))[0]
    aot.build(spec, tmp_path / "art", target="llvm", head_dim=24)
    runtime = pack(tmp_path / "rt", f"{sys.version_info.major}.{sys.version_info.minor}")
    script = textwrap.dedent(f"""
        import sys, math
        sys.modules["tvm"] = None  # the GPU machine has no TVM: only tvm_ffi and libtvm_runtime.so
        import torch, attnc
        import attnc.codegen.tvm.launch as launch
        from attnc.codegen.tvm import aot
        launch.empty = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
        kernel = attnc.codegen.tvm.aot.load({str(tmp_path / "art")!r})
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


def _artifacts():
    if not AOT_DIR.is_dir():
        return []
    return sorted(p for p in AOT_DIR.iterdir() if (p / aot.MANIFEST).exists())


@pytest.mark.gpu
@pytest.mark.parametrize("folder", _artifacts(), ids=lambda p: p.name)
def test_cuda_artifact_matches_reference(folder, monkeypatch):
    import attnc.codegen.tvm.launch as launch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tvm_cuda_check import SHAPES, check_one

    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))
    kernel = aot.load(folder)
    for shape in SHAPES:
        result = check_one(kernel, shape)
        assert result["ok"], result


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(100, 800), (16, 130), (37, 75)])
def test_cuda_very_negative_logits_after_empty_tiles(shape, monkeypatch):
    """test_tvm_kernels.VERY_NEGATIVE on the GPU: the running max stays -inf through a row's empty key tiles."""
    import attnc.codegen.tvm.launch as launch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tvm_cuda_check import check_one

    folder = AOT_DIR / "very_negative-bf16"
    assert (folder / aot.MANIFEST).exists(), f"build it first: python benchmarks/tvm_cuda_check.py build (no {folder})"
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))
    result = check_one(aot.load(folder), shape)
    assert result["ok"], result
