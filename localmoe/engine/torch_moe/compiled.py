"""torch.compile for the torch engine (its `compile` option): the dense part of each layer as fused kernels, the
expert loop an opaque custom op inside the graph (model.py), and a compile failure said in one line.

Nothing here imports torch._dynamo until a compiled engine runs: importing it costs ~50 MiB of RAM.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from localmoe.errors import LocalmoeError


def compile_model(model: nn.Module, device: torch.device) -> Any:
    """`model` wrapped by torch.compile; it compiles at its first calls."""
    if device.type == "cpu":
        _require_cpp_compiler()
    if not os.environ.get("TORCH_LOGS"):  # torch's warnings would precede our one-line error on failure
        torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
        # advice to the compiler's developers (TF32, online softmax), not to someone chatting
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
    # each engine's modules are new objects to dynamo's guards: room for more than a few engines a process
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    # dynamic: one graph for every prompt length and cache position (a decode step, length 1, gets its own)
    # no size/alignment asserts in the generated Python around the kernels: ~100 checks per decode step
    # that test what the graph's own shapes already guarantee
    quiet = {k: False for k in ("size_asserts", "alignment_asserts", "scalar_asserts")
             if hasattr(torch._inductor.config, k)}
    return torch.compile(model, dynamic=True, options=quiet)


def _require_cpp_compiler() -> None:
    # inductor's CPU code is C++, and without a compiler it fails only after tracing the whole model (~15 s here)
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise LocalmoeError(f"torch.compile failed ({root_cause(e)}); run without compile") from None


def call(run: Any, idx: Tensor, pos: Tensor, end: int) -> Any:
    """`run(idx, pos, end)`, with a compile failure turned into a one-line LocalmoeError."""
    from torch._dynamo.exc import TorchDynamoException

    try:
        return run(idx, pos, end)
    except TorchDynamoException as e:  # no C++ compiler, an unsupported device, ...
        raise LocalmoeError(f"torch.compile failed ({root_cause(e)}); run without compile") from None


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost of the exceptions torch.compile wraps around each other."""
    seen = {id(e)}
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith("raised:")]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
