"""The "triton" backend: its plan target per device, the launcher for a plan (launch.py for dense specs,
serving.py for ragged or paged storage and split-KV decode), and the backward of a plan (gradients.py)."""
from __future__ import annotations

import torch

from ...errors import CompileError
from ...passes import KernelPlan, Target
from . import gluon, gluon_decode
from .gradients import BackwardLauncher
from .launch import TritonLauncher, interpreting, load_module
from .serving import launcher_for


class TritonBackend:
    name = "triton"

    def target(self, device: torch.device) -> Target:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            return Target("triton", "cuda", major * 10 + minor)
        if not interpreting():
            raise CompileError(f"the triton backend runs on CUDA tensors (got tensors on {device}); set "
                               f"TRITON_INTERPRET=1 before importing triton to use its CPU interpreter, or use "
                               f"backend='tvm' for CPU tensors")
        return Target("triton", "cpu", None)

    def build(self, plan: KernelPlan) -> TritonLauncher:
        # sm_90: the Gluon warpgroup kernels take the prefill launches (passes/warpgroups.py) and the MLA decode calls
        # (passes/latent_decode.py) the plan gives them
        if plan.spec.decode_only:
            return gluon_decode.launcher(plan, launcher_for(plan, None))
        return gluon.launcher(plan, launcher_for(plan, load_module(plan)))

    def build_backward(self, plan: KernelPlan) -> BackwardLauncher:
        return BackwardLauncher(plan)
