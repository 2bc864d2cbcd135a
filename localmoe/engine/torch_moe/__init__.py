"""The native PyTorch engine for Hugging Face MoE checkpoints, with its own tiered expert cache.

Read in the order a checkpoint flows through it:
- options.py      how the engine runs (TorchOptions: slots, budgets, cache policy, dtypes, device, kernels);
- config.py       the architecture, resolved once from config.json (ModelArgs);
- device.py       the device, and the plan of what fits in its memory;
- checkpoint.py   dense weights and experts read from the safetensors shards;
- model.py        the transformer (attention, MoE routing, experts fetched from the store), after gpt-fast;
- expert_store.py the expert cache in fast, warm and cold tiers (layer_cache.py: its replacement policies);
- kernels.py      native C kernels for one-token steps (moe_kernels.c); step.py runs a whole step in C;
- tokenizer.py, sampling.py: chat in and text out; compiled.py: the torch.compile option;
- engine.py       the engine loop (TorchMoEEngine).

Names are imported on first use, so that `TorchOptions` (and the CLI's flags built from it) come without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from localmoe.engine.torch_moe.options import TorchOptions

if TYPE_CHECKING:
    from localmoe.engine.torch_moe.checkpoint import Checkpoint
    from localmoe.engine.torch_moe.config import ARCHS, ModelArgs
    from localmoe.engine.torch_moe.engine import TorchMoEEngine
    from localmoe.engine.torch_moe.sampling import Sampler
    from localmoe.engine.torch_moe.tokenizer import ChatTokenizer, IncrementalDetokenizer

__all__ = ["ARCHS", "ChatTokenizer", "Checkpoint", "IncrementalDetokenizer", "ModelArgs", "Sampler", "TorchMoEEngine",
           "TorchOptions"]

_WHERE = {"ARCHS": "config", "ModelArgs": "config", "Checkpoint": "checkpoint", "TorchMoEEngine": "engine",
          "Sampler": "sampling", "ChatTokenizer": "tokenizer", "IncrementalDetokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
