"""Engines: load a model and stream answers. The contract and its types are in `base`; this module picks the
backend for a model (llama.cpp for GGUF, or the native MoE engine when the planner chooses it for a GGUF MoE whose
experts do not fit in memory; the native engine for checkpoints; a remote server) and loads it."""

from __future__ import annotations

from typing import Any

from localmoe.engine.base import DecodeClock, Engine, GenerationConfig, GenerationStats, Message, token_budget

__all__ = ["DecodeClock", "Engine", "GenerationConfig", "GenerationStats", "Message", "create_engine", "load",
           "token_budget"]


# Options only llama.cpp takes: a caller that sets them has chosen llama.cpp, and the planner does not choose.
_LLAMA_CPP_ONLY = frozenset({"plan", "n_threads", "logits_all"})


def create_engine(ref: Any, **options: Any) -> Engine:
    """The engine for a resolved ModelRef (for a GGUF, the one the planner chooses unless `ref.pinned`)."""
    if ref.backend == "remote":
        from localmoe.engine.remote import RemoteEngine

        return RemoteEngine(model_id=ref.id, **ref.options, **options)
    backend, options = backend_for(ref, options)
    if backend == "llama.cpp" and "system_prompt" not in options:
        from localmoe.home.models import system_prompt

        options["system_prompt"] = system_prompt(ref.path)
    return _engine_class(backend)(ref.path, model_id=ref.id, **options)


def backend_for(ref: Any, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The backend that runs `ref` and the engine options for it. A GGUF file not pinned to a backend gets the
    planner's choice on this machine (`placement.plan.choose_engine`: llama.cpp while the experts fit in memory, the
    native expert cache when llama.cpp would page them), from its header and the detected memory, no weights read;
    a refusal by both engines is one line (UsageError). Every ask, chat, bench and serve session comes through here."""
    options = dict(options or {})
    if getattr(ref, "pinned", False) or ref.backend != "llama.cpp" or str(ref.path).lower()[-5:] != ".gguf" \
            or options.keys() & _LLAMA_CPP_ONLY:
        return ref.backend, options
    from localmoe.errors import UsageError
    from localmoe.placement.plan import choose_engine_for

    choice = choose_engine_for(ref.path, options.get("n_ctx"))
    if not choice.fits:
        raise UsageError(f"cannot load {ref.id}: {choice.reason}")
    if choice.backend == "llama.cpp":
        return "llama.cpp", {**options, "plan": choice.plan}  # planned once, not again by the engine
    n_ctx = options.pop("n_ctx", None)
    return "torch", {**options, **({"max_seq_length": n_ctx} if n_ctx else {})}


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
