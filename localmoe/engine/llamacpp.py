"""GGUF models through llama-cpp-python.

We drive `Llama.generate` (one token per step) rather than `create_completion`: it lets us stop between two
decode steps the moment the user cancels, count exactly the tokens that were computed, and detokenise
incrementally without the completion API's look-ahead buffering.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localmoe.engine.chat_template as chat_template
from localmoe.engine.base import (
    DecodeClock,
    Engine,
    GenerationConfig,
    GenerationStats,
    Message,
    default_threads,
    fit_context,
    limits,
    reusable_prefix,
    stop_after,
)
from localmoe.errors import LocalmoeError
from localmoe.experts.trace import TraceToken
from localmoe.placement.layout import read_model_layout
from localmoe.placement.plan import Budget, Plan, make_plan

DEFAULT_CTX = 4096


class LlamaCppEngine(Engine):
    backend = "llama.cpp"

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        plan: Plan | None = None,
        telemetry: bool = False,
        logits_all: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        """`system_prompt`: put first where the messages have no system message (a catalog model's own, in place of
        what its chat template would add)."""
        self.path = Path(path)
        self.system_prompt = system_prompt
        self.model_id = model_id or self.path.stem.lower()
        # Validates the file (signature, truncation, shapes) with a clear message before llama.cpp sees it.
        self.layout = read_model_layout(self.path)
        if plan is None:
            plan = make_plan(self.layout, Budget.detect(), n_ctx)
        plan.raise_if_refused()
        self.plan = plan
        self.n_ctx = plan.ctx
        self.n_threads = n_threads or default_threads()
        self.telemetry = telemetry
        self.logits_all = logits_all
        self.routing: list[TraceToken] = []
        self.token_logprobs: list[float] = []  # experts per token of the last generation, when telemetry is on
        self._llm: Any = None
        self._tap: Any = None
        self._keepalive: tuple[Any, ...] = ()
        self.load_log = ""  # llama.cpp's own log of the load, for diagnostics
        self._load_lock = threading.Lock()
        # One generation at a time per model: llama.cpp contexts are not re-entrant.
        self._gen_lock = threading.Lock()
        self._stats = GenerationStats()
        self.load_s: float | None = None

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def load(self) -> None:
        with self._load_lock:
            if self._llm is not None:
                return
            from llama_cpp import Llama

            import localmoe.engine.llama_hooks as llama_hooks

            overrides = llama_hooks.build_overrides(self.plan.overrides) if self.plan.overrides else None
            self._tap = llama_hooks.RoutingTap(max(1, self.layout.n_experts_used)) if self.telemetry else None
            # llama.cpp reads both through raw pointers for the model's lifetime.
            self._keepalive = (overrides, self._tap)
            t0 = time.perf_counter()
            log = llama_hooks.LoadLog()
            try:
                with llama_hooks.patched_defaults(overrides, self._tap.callback if self._tap else None,
                                                  repack=self.plan.repack) as log:
                    self._llm = Llama(
                        model_path=str(self.path),
                        n_ctx=self.n_ctx,
                        n_threads=self.n_threads,
                        n_threads_batch=self.n_threads,
                        n_gpu_layers=self.plan.n_gpu_layers,
                        use_mmap=self.plan.use_mmap,
                        use_mlock=self.plan.use_mlock,
                        logits_all=self.logits_all,
                        verbose=False,
                    )
            except (ValueError, RuntimeError) as exc:
                reason = next(iter(log.errors()), "") or str(exc)
                raise LocalmoeError(f"llama.cpp could not load {self.path.name}: {reason}") from None
            self.load_log = log.text()
            self.load_s = time.perf_counter() - t0
            meta = self._llm.metadata
            self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") == "true"
            self._bos = self._token_text(self._llm.token_bos())
            self._eos = self._token_text(self._llm.token_eos())

    def moe_shape(self) -> tuple[int, int, int] | None:
        lay = self.layout
        return (lay.n_layers, lay.n_experts, lay.n_experts_used) if lay.is_moe else None

    def close(self) -> None:
        with self._load_lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
                self._keepalive = ()

    def logits(self, tokens: list[int]) -> Any:
        """Logits for every position of `tokens` (a fresh sequence); needs `logits_all=True`. For tests."""
        if not self.logits_all:
            raise LocalmoeError("logits() needs an engine created with logits_all=True")
        import numpy as np

        self.load()
        with self._gen_lock:
            self._llm.reset()
            if self._tap is not None:
                self._tap.take()
            self._llm.eval(tokens)
            self.routing = self._collect_routing(tokens, len(tokens), len(tokens))
            return np.array(self._llm.scores[: len(tokens)], copy=True)

    def prompt_logits(self, tokens: list[int]) -> Any:
        """Logits for every position of `tokens`, reusing the longest prefix of the last call's tokens still in the
        context (a chat template's fixed system prompt is evaluated once, not per question); needs
        `logits_all=True`. The same values as `logits()` up to float rounding of batch sizes."""
        if not self.logits_all:
            raise LocalmoeError("prompt_logits() needs an engine created with logits_all=True")
        if not tokens:
            raise LocalmoeError("no tokens to evaluate")
        if len(tokens) > self.n_ctx:
            raise LocalmoeError(f"{len(tokens)} tokens do not fit the {self.n_ctx}-token context")
        import numpy as np

        self.load()
        with self._gen_lock:
            llm = self._llm
            # at least one token is evaluated, so the cache is trimmed to a prefix whose logits are still stored
            llm.n_tokens = reusable_prefix(llm.input_ids[: llm.n_tokens], tokens)
            llm.eval(tokens[llm.n_tokens:])
            return np.array(llm.scores[: len(tokens)], copy=True)

    def _logprob(self, token: int) -> float:
        """log p(token) under the logits that produced it: the context still holds them until the next decode."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),))
        top = float(logits.max())
        return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))

    def _collect_routing(self, ids: list[int], end: int, n_prompt: int) -> list[TraceToken]:
        """Trace rows for the last tokens evaluated before position `end` (those from n_prompt on are decoded)."""
        if self._tap is None:
            return []
        rows = self._tap.take(self.layout.n_layers)
        # The tap saw exactly the tokens evaluated since it was last emptied, in order.
        first = end - len(rows)
        return [TraceToken(pos, int(ids[pos]), "prompt" if pos < n_prompt else "decode", experts)
                for pos, experts in zip(range(first, end), rows, strict=True)]

    def _token_text(self, token: int) -> str:
        return token_text(self._llm, token)

    def _adds_system(self, messages: list[Message]) -> bool:
        # a template adds its own system prompt unless the first message is one, so ours goes first likewise
        return bool(self.system_prompt) and (not messages or messages[0].get("role") != "system")

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        self.load()
        if self._adds_system(messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return encode_chat(self._llm, self.layout.chat_template, messages, self._bos, self._eos, self._add_bos)

    def _stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[str]:
        import llama_cpp

        clock = DecodeClock()  # from here: template rendering and tokenising count towards the first token
        dropped = 0
        if config.fit_context:
            messages, tokens, dropped = fit_context(messages, self.prompt_tokens, self.n_ctx, config.max_tokens)
        else:
            tokens = self.prompt_tokens(messages)
        stats = self._stats = GenerationStats(prompt_tokens=len(tokens), stop_reason="length",
                                              system_prompt=self.system_prompt if self._adds_system(messages) else None,
                                              dropped_exchanges=dropped)
        budget, guard = limits(stats, self.n_ctx, self.model_id, config)
        llm = self._llm
        vocab = llm._model.vocab
        if self._tap is not None:
            self._tap.take()
        # llama-cpp-python keeps a seed for good: without this, one request's seed would fix every later answer's
        # draws (the default seed asks llama.cpp for a fresh random one each time)
        llm.set_seed(config.seed if config.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        # llama-cpp-python's generate keeps the KV cache of the longest common prefix with the last sequence (and
        # evaluates the last prompt token at least): what it will evaluate, for the statistics
        stats.prompt_eval_tokens = len(tokens) - reusable_prefix(llm.input_ids[: llm.n_tokens], tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        logprobs: list[float] | None = [] if config.logprobs else None
        self.token_logprobs = logprobs or []
        gen = llm.generate(
            tokens,
            temp=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            min_p=config.min_p,
            repeat_penalty=config.repeat_penalty,
        )
        try:
            for token in gen:
                clock.token(stats)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.stop_reason = "stop"
                    break
                if logprobs is not None:
                    logprobs.append(self._logprob(token))
                stats.completion_tokens += 1
                piece = decoder.decode(llm.detokenize([token]))
                if piece:
                    yield piece
                if stop_after(token, piece, stats, budget, guard, cancel):
                    break
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        except GeneratorExit:
            stats.stop_reason = "cancelled"
            raise
        finally:
            gen.close()
            clock.finish(stats, logprobs)
            if self._tap is not None:
                ids = list(llm.input_ids[: llm.n_tokens])
                self.routing = self._collect_routing(ids, llm.n_tokens, len(tokens))


def token_text(llm: Any, token: int) -> str:
    """A special token's text in llama.cpp's vocabulary ("" for none)."""
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def encode_chat(llm: Any, template: str | None, messages: list[Message], bos: str, eos: str,
                add_bos: bool) -> list[int]:
    """Messages through the model's chat template (sandboxed) and llama.cpp's tokenizer: a BOS when the model wants
    one and the template did not write it. Shared by this engine and the native engine's GGUF tokenizer."""
    text = chat_template.render(template, messages, bos_token=bos, eos_token=eos)
    add = add_bos and not (bos and text.startswith(bos))
    return llm.tokenize(text.encode("utf-8"), add_bos=add, special=True)
