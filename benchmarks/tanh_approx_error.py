"""The hardware tanh's error on this GPU: `tanh.approx.f32` (one MUFU instruction, what FlashAttention's softcap
calls through cutlass::fast_tanh) against float64 tanh over every float32 exponent, as the largest absolute error,
the largest relative error and the largest relative error where |tanh(x)| >= 2^-10. It decides whether attnc's
half-precision kernels may take it in place of the 1.7-ulp formula (ops.TANH).

    python benchmarks/tanh_approx_error.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh_approx(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(y_ptr + offs, y, mask=offs < n)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    # magnitudes 2^-30 .. 2^5 (tanh is +-1 in float32 from 9.01 on), uniform in each binade, both signs
    exponents = torch.randint(-30, 5, (1 << 22,), generator=gen).double()
    x64 = (1 + torch.rand(1 << 22, generator=gen, dtype=torch.float64)) * torch.pow(2.0, exponents)
    x64 = torch.where(torch.rand(1 << 22, generator=gen) < 0.5, -x64, x64)
    x = x64.float().cuda()
    y = torch.empty_like(x)
    _tanh_approx[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.tanh(x.double())
    err = (y.double() - exact).abs()
    rel = err / exact.abs()
    big = exact.abs() >= 2.0 ** -10
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}; tanh.approx.f32 over {x.numel()} points")
    print(f"max abs error {err.max().item():.3e} (2^{torch.log2(err.max()).item():.2f})")
    print(f"max rel error {rel.max().item():.3e} (2^{torch.log2(rel.max()).item():.2f})")
    print(f"max rel error where |tanh| >= 2^-10: {rel[big].max().item():.3e} (2^{torch.log2(rel[big].max()).item():.2f})")
    for lo, hi in ((0.0, 0.01), (0.01, 0.1), (0.1, 1.0), (1.0, 3.0), (3.0, 10.0), (10.0, 40.0)):
        sel = (x64.abs() >= lo) & (x64.abs() < hi)
        print(f"|x| in [{lo}, {hi}): max abs {err.cpu()[sel].max().item():.3e}, max rel {rel.cpu()[sel].max().item():.3e}")


if __name__ == "__main__":
    main()
