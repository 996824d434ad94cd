"""The CPU this process runs on, as TVM sees it: the LLVM target (host mcpu), SIMD width and thread count."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCpu:
    mcpu: str  # LLVM's name for the host CPU; plain "llvm" would target generic x86-64 (half the speed)
    triple: str
    vector: int  # float32 lanes per SIMD register: 16 with AVX-512, 8 with AVX2, else 4

    def target(self):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "mtriple": self.triple})

    @property
    def x86(self) -> bool:
        return self.triple.startswith(("x86_64", "i386", "i686"))

    @property
    def label(self) -> str:
        """The cache key's device part: kernels built for one CPU may not run on another."""
        return f"cpu:{self.triple}:{self.mcpu}:v{self.vector}"


@functools.lru_cache(maxsize=None)
def host_cpu() -> HostCpu:
    from tvm.target import codegen

    flags = _cpu_flags()
    vector = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return HostCpu(codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple(), vector)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's thread pool before its first parallel launch. TVM defaults to half the logical cores
    (it assumes hyper-threading), which is 1 on a 2-core VM; attnc uses what torch uses, so both libraries
    get the same cores. `TVM_NUM_THREADS` set by the user wins. Returns the count in effect."""
    if threads is None:
        threads = int(os.environ.get("TVM_NUM_THREADS", "0")) or _torch_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def _torch_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())
