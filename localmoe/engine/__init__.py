"""The engine protocol: load a model, stream an answer to chat messages (cancellable), report stats, close.

Each backend (llama.cpp today, the native PyTorch MoE engine next) implements this and nothing more, so the
session, CLI and UI never know which one runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


@dataclass
class GenerationConfig:
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    seed: int | None = None
    logprobs: bool = False  # record each token's log-probability (the cascade router's confidence signal)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens sampled and handed out; an end-of-generation token is not counted
    ttft_s: float | None = None  # request → first token, prompt processing included
    tokens_per_s: float | None = None  # decode rate after the first token
    wall_s: float = 0.0
    stop_reason: str = "stop"  # stop | length | cancelled | interrupted | error
    mean_logprob: float | None = None  # with GenerationConfig.logprobs: over the answer's tokens
    min_logprob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_budget(stats: GenerationStats, n_ctx: int, model_id: str, max_tokens: int) -> int:
    """How many tokens an answer may have after `stats.prompt_tokens` of prompt in an `n_ctx` context; a prompt
    that fills the context is the user's cue to start over, said in one line."""
    room = n_ctx - stats.prompt_tokens
    if room <= 0:
        from localmoe.errors import LocalmoeError

        stats.stop_reason = "error"
        raise LocalmoeError(f"the conversation is {stats.prompt_tokens} tokens but {model_id} holds {n_ctx}: "
                            "start a new conversation")
    return min(max_tokens, room)


class DecodeClock:
    """The timings both engines report: time to first token, decode rate after it (the first token's own time is
    prompt processing), wall time, and the log-probability summary."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.received = 0  # sampled tokens, the end-of-generation token included

    def token(self, stats: GenerationStats) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            stats.ttft_s = now - self.t0
        self.t_last = now
        self.received += 1

    def finish(self, s: GenerationStats, logprobs: list[float] | None) -> None:
        s.wall_s = time.perf_counter() - self.t0
        if logprobs:
            s.mean_logprob = sum(logprobs) / len(logprobs)
            s.min_logprob = min(logprobs)
        if self.t_first is not None and self.t_last is not None and self.received > 1 and self.t_last > self.t_first:
            s.tokens_per_s = (self.received - 1) / (self.t_last - self.t_first)


class Engine(Protocol):
    model_id: str
    backend: str

    def load(self) -> None:
        """Load weights; idempotent, so callers may load ahead of the first question."""

    def stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield text pieces; stops before decoding another token once `cancel` is set."""

    @property
    def stats(self) -> GenerationStats:
        """Stats of the last (or current) generation."""

    def close(self) -> None:
        """Free the model."""


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
