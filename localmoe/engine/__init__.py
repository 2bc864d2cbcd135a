"""Engines: load a model and stream answers. The contract and its types are in `base`; this module picks the
backend for a model (llama.cpp for GGUF, the native MoE engine for checkpoints, a remote server) and loads it."""

from __future__ import annotations

from typing import Any

from localmoe.engine.base import DecodeClock, Engine, GenerationConfig, GenerationStats, Message, token_budget

__all__ = ["DecodeClock", "Engine", "GenerationConfig", "GenerationStats", "Message", "create_engine", "load",
           "token_budget"]


def create_engine(ref: Any, **options: Any) -> Engine:
    """The engine for a resolved ModelRef."""
    if ref.backend == "remote":
        from localmoe.engine.remote import RemoteEngine

        return RemoteEngine(model_id=ref.id, **ref.options, **options)
    return _engine_class(ref.backend)(ref.path, model_id=ref.id, **options)


def _engine_class(backend: str) -> Any:
    if backend == "llama.cpp":
        from localmoe.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine
    if backend == "torch":
        from localmoe.engine.torch_moe import TorchMoEEngine  # needs torch (the `native` extra)

        return TorchMoEEngine
    raise ValueError(f"unknown backend {backend!r} (llama.cpp or torch)")


def load(path: Any, backend: str = "llama.cpp", **options: Any) -> Any:
    """Load a model file (GGUF, llama.cpp) or a Hugging Face MoE checkpoint directory (torch) and return the
    engine, ready for `.logits(token_ids)`; options go to the engine (e.g. `expert_slots=` for torch)."""
    engine = _engine_class(backend)(path, **options)
    engine.load()
    return engine
