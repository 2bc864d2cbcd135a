"""Where the torch engine runs: the device it was asked for (or the one found), and the checkpoint plan for the
memory there — free VRAM for a GPU fast tier with the free RAM as its pinned warm tier, free RAM for a CPU one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from localmoe.errors import LocalmoeError
from localmoe.placement.plan import CheckpointPlan, plan_checkpoint
from localmoe.placement.safetensors import TensorInfo


def plan_for(
    model_dir: Path,
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    fast_memory: int | None = None,
    ctx: int | None = None,
    *,
    device: str = "cpu",
    expert_dtype: str = "float32",
    warm_memory: int | None = None,
    fast_slots: int | None = None,
) -> CheckpointPlan:
    """The checkpoint plan on `fast_memory` bytes, or on what is detected: free VRAM for a GPU fast tier (with the
    free RAM as its pinned warm tier), free RAM (cgroup caps included) for a CPU one."""
    from localmoe.placement import hardware

    ram = None
    if warm_memory is None and device.startswith("cuda"):
        ram = warm_memory = hardware.detect(measure=False).ram_available_bytes
    if fast_memory is not None:
        budget, source = fast_memory, "override"
    elif device.startswith("cuda"):
        budget, source = torch.cuda.mem_get_info(torch.device(device))[0], "detected"
    else:
        budget = ram if ram is not None else hardware.detect(measure=False).ram_available_bytes
        source = "detected"
    return plan_checkpoint(config, tensors, budget, ctx=ctx, model=str(model_dir), budget_source=source,
                           expert_dtype=expert_dtype, device=torch.device(device).type,
                           warm_budget_bytes=warm_memory or 0, fast_slots=fast_slots)


def resolve_device(device: str | None) -> str:
    """`None` picks CUDA when torch sees a GPU, else the CPU; an explicit device must exist."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LocalmoeError(f"unsupported device {device!r} (cpu, cuda, cuda:N or mps)") from None
    kind = dev.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise LocalmoeError(f"device {device!r} asked for, but torch sees no CUDA GPU (a CPU-only torch build?)")
    if kind == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LocalmoeError(f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LocalmoeError("device 'mps' asked for, but Metal is not available to torch here")
    if kind not in ("cpu", "cuda", "mps"):
        raise LocalmoeError(f"unsupported device {device!r} (cpu, cuda, cuda:N or mps)")
    return device
