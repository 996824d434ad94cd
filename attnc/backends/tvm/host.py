"""The CPU this process runs on: what the kernel cache keys on and the schedules need (read from the OS, without
TVM), and the LLVM target a build compiles for (TVM's compiler, on a cache miss only)."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCpu:
    machine: str  # platform.machine(): x86_64, aarch64, arm64, ...
    model: str  # /proc/cpuinfo's model name (platform.processor() elsewhere)
    features: str  # SHA-256 prefix of the CPU's feature flags: the instructions a kernel built here may use
    vector: int  # float32 lanes per SIMD register: 16 with AVX-512, 8 with AVX2, else 4

    def llvm_names(self) -> tuple[str, str]:
        """LLVM's names for this CPU and system, (mcpu, triple), from TVM's compiler."""
        from tvm.target import codegen

        return codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple()

    def target(self):
        """LLVM's target for this CPU (host mcpu; plain "llvm" would target generic x86-64, half the speed)."""
        import tvm

        mcpu, triple = self.llvm_names()
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": triple})

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686")

    @property
    def label(self) -> str:
        """The cache key's device part: kernels built for one CPU may not run on another. LLVM picks the target
        CPU (mcpu) from the same model and flags, so they stand for it without asking LLVM."""
        return f"cpu:{self.machine}:{self.model}:{self.features}:v{self.vector}"


@functools.lru_cache(maxsize=None)
def host_cpu() -> HostCpu:
    model, flags = _cpu_info()
    vector = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    features = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]
    return HostCpu(platform.machine(), model or platform.processor(), features, vector)


def _cpu_info() -> tuple[str, set[str]]:
    """The model name and feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif not line.strip() and (model or flags):
                    break  # the end of the first CPU's block
    except OSError:
        pass
    return model, flags


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
