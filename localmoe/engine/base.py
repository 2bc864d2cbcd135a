"""The engine contract and its shared types: what every backend (llama.cpp, the native MoE engine, a remote
server) takes and reports, so that the session, CLI and UI never know which one runs. Imports no backend."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from localmoe.engine.loopguard import LoopGuard
from localmoe.errors import LocalmoeError, UsageError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


def default_threads() -> int:
    """LOCALMOE_THREADS when set (a machine shared with other work), else one thread per physical core: llama.cpp
    decodes fastest so, hyperthreads only add contention, and its threads spin while they wait, so two engines that
    each take every core slow each other down far more than two times."""
    import psutil

    value = os.environ.get("LOCALMOE_THREADS", "").strip()
    if value:
        if not (value.isascii() and value.isdecimal()) or int(value) < 1:
            raise UsageError(f"LOCALMOE_THREADS must be a whole number of threads, 1 or more (got {value!r})")
        return int(value)
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


@dataclass
class GenerationConfig:
    """How to decode. The defaults here are neutral (no penalty, no loop guard): an engine does exactly what it is
    told. What a model runs with in the product comes from `localmoe.home.models.generation_defaults`."""

    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    seed: int | None = None
    logprobs: bool = False  # record each token's log-probability (the cascade router's confidence signal)
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one
    repeat_penalty: float = 1.0  # llama.cpp's classic penalty on the last REPEAT_LAST_N tokens (1.0: off)
    loop_guard: bool = False  # stop a degenerate loop (localmoe.engine.loopguard) with stop_reason "repetition"
    # a conversation longer than the context loses its oldest exchanges (as Ollama's chat does) instead of being
    # refused; an API client, which sends its own history, is told instead
    fit_context: bool = False

    def sampling(self) -> dict[str, Any]:
        """The settings an answer was decoded with, as `ask --json` and the stats line report them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "max_tokens": self.max_tokens}


def ending_note(stop_reason: str | None, completion_tokens: int | None) -> str | None:
    """How a complete answer ended when the model did not end it: said live, in a resumed chat and in an export."""
    if stop_reason == "length":
        return f"(cut off at {completion_tokens} tokens)"
    if stop_reason == "repetition":
        return "(stopped: it was repeating itself)"
    return None


REPEAT_LAST_N = 64  # llama.cpp's default window for the repeat penalty


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens sampled and handed out; an end-of-generation token is not counted
    ttft_s: float | None = None  # request → first token, prompt processing included
    # prompt tokens the engine evaluated: the rest of the prompt was in its KV cache from an earlier call
    prompt_eval_tokens: int | None = None
    prefill_tokens_per_s: float | None = None  # prompt_eval_tokens / ttft_s
    tokens_per_s: float | None = None  # decode rate after the first token
    wall_s: float = 0.0
    stop_reason: str = "stop"  # stop | length | repetition | cancelled | interrupted | error
    # with stop_reason "repetition": how many characters of the streamed text the answer keeps (the first round of
    # the loop), and what the guard found
    kept_chars: int | None = None
    repetition: str | None = None
    mean_logprob: float | None = None  # with GenerationConfig.logprobs: over the answer's tokens
    min_logprob: float | None = None
    # the model's own system message the engine put first (the conversation had none), stored with the answer so a
    # recorded exchange says everything the model was given
    system_prompt: str | None = None
    # with GenerationConfig.fit_context: the oldest exchanges (a question and its answer) left out of this prompt
    # because the conversation no longer fit the context; they stay recorded
    dropped_exchanges: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reusable_prefix(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens of `tokens` a KV cache holding `held` (from position 0) can keep: their longest
    common prefix, short of the last token, which is evaluated again for its logits."""
    n = 0
    for a, b in zip(held, tokens[:-1], strict=False):
        if a != b:
            break
        n += 1
    return n


DROP_BLOCK = 4  # exchanges leave in blocks: the kept history starts at the same message for several turns


def fit_context(messages: list[Message], encode: Callable[[list[Message]], list[int]], n_ctx: int,
                max_tokens: int) -> tuple[list[Message], list[int], int]:
    """(the messages, their tokens, how many exchanges were dropped): when the prompt leaves no room for an answer
    (its budget, at most a quarter of the context), the oldest exchanges leave it. A leading system message and the
    latest question always stay: a question that does not fit alone is refused by `token_budget`.

    The fewest exchanges that fit are found by bisection (a long chat is not tokenised once per exchange), then
    rounded up to a multiple of DROP_BLOCK, so the next turns keep the same first message and the engine reuses
    its cached prefix instead of evaluating most of the context again on every turn."""
    tokens = encode(messages)
    room = min(max_tokens, n_ctx // 4)
    if len(tokens) + room <= n_ctx:
        return messages, tokens, 0
    first = 1 if messages and messages[0].get("role") == "system" else 0
    # dropping k exchanges keeps the head and messages[cuts[k - 1]:]; the last cut is the question itself
    cuts = [i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user"]
    if not cuts:
        return messages, tokens, 0

    def kept(k: int) -> list[Message]:
        return [*messages[:first], *messages[cuts[k - 1]:]]

    lo, hi = 1, len(cuts)  # the smallest k that fits is in [lo, hi] (hi: all of the history gone)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(kept(mid))) + room <= n_ctx:
            hi = mid
        else:
            lo = mid + 1
    blocked = -(-lo // DROP_BLOCK) * DROP_BLOCK
    k = blocked if blocked < len(cuts) else lo  # a short history loses no more than it must
    out = kept(k)
    return out, encode(out), k


def limits(stats: GenerationStats, n_ctx: int, model_id: str, config: GenerationConfig) -> tuple[int, LoopGuard | None]:
    """What ends an answer besides the model: its token budget and, when asked for, a loop guard."""
    return token_budget(stats, n_ctx, model_id, config.max_tokens), LoopGuard() if config.loop_guard else None


def token_budget(stats: GenerationStats, n_ctx: int, model_id: str, max_tokens: int) -> int:
    """How many tokens an answer may have after `stats.prompt_tokens` of prompt in an `n_ctx` context; a prompt
    that fills the context is the user's cue to start over, said in one line."""
    room = n_ctx - stats.prompt_tokens
    if room <= 0:
        stats.stop_reason = "error"
        # a single long question fills it as well as a long conversation: say what to do for both
        raise LocalmoeError(f"the prompt is {stats.prompt_tokens} tokens but {model_id} holds {n_ctx} here: "
                            "shorten the question, or start a new conversation if earlier turns fill it")
    return min(max_tokens, room)


def stop_after(token: int, piece: str, stats: GenerationStats, budget: int, guard: LoopGuard | None,
               cancel: threading.Event | None) -> bool:
    """After a token was streamed: stop here? At the token budget, on a loop (the stats then say what to keep), or
    when cancelled — checked before the engine computes another token."""
    if guard is not None and guard.push(token, piece):
        stats.stop_reason = "repetition"
        stats.kept_chars = len(guard.keep_text)
        stats.repetition = guard.reason
        return True
    if stats.completion_tokens >= budget:
        return True
    if cancel is not None and cancel.is_set():
        stats.stop_reason = "cancelled"
        return True
    return False


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
        if s.prompt_eval_tokens and s.ttft_s:
            s.prefill_tokens_per_s = s.prompt_eval_tokens / s.ttft_s
        if self.t_first is not None and self.t_last is not None and self.received > 1 and self.t_last > self.t_first:
            s.tokens_per_s = (self.received - 1) / (self.t_last - self.t_first)


class Engine:
    """What callers may ask of any engine. Loading, streaming, stats and closing are required; the rest are optional
    capabilities with neutral defaults, so callers never probe with getattr or branch on the backend."""

    model_id: str
    backend: str
    _gen_lock: threading.Lock
    plan: Any = None  # the placement plan the engine runs (localmoe.placement.plan), where it has one
    # with GenerationConfig.logprobs: the last answer's log-probability per token
    token_logprobs: Sequence[float] = ()
    # with telemetry on (MoE models): the experts each evaluated token used, per layer (localmoe.experts.trace)
    routing: Sequence[Any] = ()

    def load(self) -> None:
        """Load weights; idempotent, so callers may load ahead of the first question."""
        raise NotImplementedError

    def stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield text pieces; stops before decoding another token once `cancel` is set. One generation at a time
        (a local model's context is shared state): engines implement `_stream` and hold a `_gen_lock`."""
        with self._gen_lock:
            yield from self._stream(messages, config, cancel)

    def _stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[str]:
        raise NotImplementedError

    @property
    def stats(self) -> GenerationStats:
        """Stats of the last (or current) generation."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model."""

    @property
    def warnings(self) -> list[str]:
        """What the user should know about how the model runs here (e.g. it is paged from disk)."""
        return list(self.plan.warnings) if self.plan is not None else []

    def cache_stats(self) -> dict[str, Any] | None:
        """The expert cache's statistics (hits, misses, bytes moved, per layer), for engines that have one."""
        return None

    def expert_cache_counts(self) -> list[dict[str, list[int]]] | None:
        """Per layer, the expert cache's counters per expert (`hits`, `misses`, `prefetch_hits`) over the same span
        as cache_stats, for engines that have a cache; kept apart from cache_stats, which is recorded and served
        with every answer, because it grows with layers × experts."""
        return None

    def moe_shape(self) -> tuple[int, int, int] | None:
        """(layers, experts per layer, experts used per token) for a MoE model, else None; may load the model."""
        return None
