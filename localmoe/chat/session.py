"""A conversation with one model: the engine stays loaded, every exchange is recorded as it happens.

The CLI, the TUI and (later) the HTTP server all talk to this class; none of them touches engines or SQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from localmoe.chat.conversation import Conversation
from localmoe.engine import Engine, GenerationConfig, GenerationStats, Message, create_engine
from localmoe.errors import LocalmoeError, PromptTooLong, UsageError
from localmoe.home import models
from localmoe.record.recorder import Recorder

MAX_PROMPT_CHARS = 200_000


def checked_prompt(prompt: str) -> str:
    """The question without surrounding whitespace, or a one-line refusal: empty, or longer than any model here
    could read (the limit keeps a pasted file from being tokenised before it is refused)."""
    prompt = prompt.strip()
    if not prompt:
        raise UsageError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptTooLong(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return prompt


class Reply:
    """One answer being produced. Iterate it for text pieces; when iteration ends (or is abandoned, or
    interrupted) the answer and its stats are in the database."""

    def __init__(self, session: Session, question_id: int, answer_id: int, history: list[Message],
                 cancel: threading.Event | None, config: GenerationConfig) -> None:
        self.session = session
        self.config = config
        self.question_id = question_id
        self.message_id = answer_id
        self.conversation_id = session.conversation.id
        self.model = session.model.id
        self.backend = session.engine.backend
        self._history = history
        self._cancel = cancel
        self._pieces: list[str] = []
        self.stats: GenerationStats | None = None
        self.energy: Any = None  # meters.EnergyReading once the answer is done
        self.experts: dict[str, Any] | None = None  # the torch engine's expert-cache counters for this answer
        self.status = "pending"

    @property
    def text(self) -> str:
        """The answer; once a loop was stopped, only its first round (the rest was streamed, then taken back)."""
        text = "".join(self._pieces)
        kept = self.stats.kept_chars if self.stats is not None else None
        return text[:kept] if kept is not None else text

    def __iter__(self) -> Iterator[str]:
        engine = self.session.engine
        status = "interrupted"  # what a Ctrl-C or a crash mid-stream leaves behind
        sampler = self.session.sampler()
        try:
            for piece in engine.stream(self._history, self.config, self._cancel):
                self._pieces.append(piece)
                yield piece
            status = "cancelled" if engine.stats.stop_reason == "cancelled" else "complete"
        except LocalmoeError:
            status = "error"
            raise
        except GeneratorExit:
            # Abandoned mid-stream: a stop the caller asked for, or an exception (Ctrl-C) in the caller's loop.
            status = "cancelled" if self._cancel is not None and self._cancel.is_set() else "interrupted"
            raise
        finally:
            if sampler is not None:
                self.energy = sampler.stop()
            self.stats = engine.stats
            self.experts = engine.cache_stats()
            if status in ("interrupted", "error"):
                self.stats.stop_reason = status
            self.status = status
            self.session._finish(self)

    def run(self) -> Reply:
        """Consume the whole answer (for callers that do not stream)."""
        for _ in self:
            pass
        return self

    def to_dict(self) -> dict[str, Any]:
        s = self.stats or GenerationStats()
        return {
            "answer": self.text,
            "model": self.model,
            "backend": self.backend,
            "status": self.status,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            # prompt_eval_tokens: evaluated now; the rest of the prompt was in the engine's KV cache
            # dropped_exchanges: the conversation's oldest exchanges the model did not read (its context was full)
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                      "prompt_eval_tokens": s.prompt_eval_tokens, "dropped_exchanges": s.dropped_exchanges},
            "timing": {"ttft_s": s.ttft_s, "prefill_tokens_per_s": s.prefill_tokens_per_s,
                       "tokens_per_s": s.tokens_per_s, "wall_s": s.wall_s},
            "stop_reason": s.stop_reason,
            **({"repetition": s.repetition} if s.repetition else {}),
            "sampling": self.config.sampling(),
            "energy": None if self.energy is None else self.energy.to_dict(),
            **({"experts": self.experts} if self.experts is not None else {}),
        }


class Session:
    def __init__(
        self,
        model: models.ModelRef | str | None = None,
        *,
        recorder: Recorder | None = None,
        config: GenerationConfig | None = None,
        system_prompt: str | None = None,
        engine: Engine | None = None,
        engine_options: dict[str, Any] | None = None,
        meter: Any = None,
        keep_samples: bool = False,
        idle_watts: float | None = None,
        conversation: Conversation | None = None,
    ) -> None:
        """`meter`: a meters.Meter, None to pick the best available at the first question, a meter's name (the
        settings' [energy] meter) for that one, False for none.
        `keep_samples` stores every power sample (benchmarks); `idle_watts` adds idle-subtracted joules.
        `conversation`: shared with other sessions (the assistant's tiers), else the session's own."""
        self.model = model if isinstance(model, models.ModelRef) else models.resolve(model)
        self.recorder = recorder or Recorder()
        self.config = config or GenerationConfig(**models.generation_defaults(self.model))
        self.system_prompt = system_prompt
        self.engine = engine or create_engine(self.model, **(engine_options or {}))
        self.conversation = conversation if conversation is not None else Conversation()
        self._lock = threading.Lock()
        self._meter = meter
        self.meter_notes: list[str] = []
        self.keep_samples = keep_samples
        self.idle_watts = idle_watts

    @property
    def meter(self) -> Any:
        """The energy meter, chosen once: hardware counters where present, else a labelled estimate; or the one
        named. A named meter this machine cannot read is a one-line error, raised before a question is recorded."""
        if self._meter is None or isinstance(self._meter, str):
            from localmoe.record import meters

            name = self._meter
            try:
                self._meter, self.meter_notes = meters.select_meter(name)
            except LocalmoeError as exc:
                raise LocalmoeError(f"{exc}; settings.toml chose it ([energy] meter = {name!r}; \"auto\" takes the "
                                    "best this machine has)") from None
        return self._meter or None

    def sampler(self) -> Any:
        """A started energy sampler on this session's meter, or None (no meter, or it stopped working)."""
        meter = self.meter
        if meter is None:
            return None
        from localmoe.record import meters

        sampler = meters.Sampler(meter)
        try:
            sampler.start()
        except LocalmoeError as exc:
            # A meter that stops working must not cost the user the answer: go on without energy figures.
            self.meter_notes.append(f"energy metering disabled: {exc}")
            self._meter = False
            return None
        return sampler

    def load(self) -> None:
        self.engine.load()

    @property
    def warnings(self) -> list[str]:
        """What the user should know about how the model runs here (e.g. it is paged from disk)."""
        return self.engine.warnings

    def new_conversation(self) -> None:
        self.conversation.restart()

    def ask(self, prompt: str, cancel: threading.Event | None = None, config: GenerationConfig | None = None,
            again: int | None = None) -> Reply:
        """Record the question now (so it survives anything that happens next) and return the Reply to stream;
        `config` replaces the session's for this answer only. `again`: the id of the recorded question this one
        answers anew (a cascade's escalation, a retry on the large tier): its earlier answer leaves the model's
        context (it stays recorded), and the new answer replies to that question instead of a copy of it."""
        prompt = checked_prompt(prompt)
        _ = self.meter  # chosen now: a named meter that cannot be read refuses the question before it is recorded
        rec, conv = self.recorder, self.conversation
        with self._lock:
            if conv.id is None:
                conv.id = rec.new_conversation(self.model.id, title=prompt[:80], kind=conv.kind)
                if self.system_prompt:
                    rec.add_message(conv.id, "system", self.system_prompt)
                    conv.history = [{"role": "system", "content": self.system_prompt}]
            if again is not None:
                conv.take_back(prompt)
                question_id = again
            else:
                question_id = rec.add_message(conv.id, "user", prompt)
            answer_id = rec.add_message(
                conv.id, "assistant", "", model=self.model.id, status="pending", reply_to=question_id
            )
            conv.history.append({"role": "user", "content": prompt})
            return Reply(self, question_id, answer_id, list(conv.history), cancel, config or self.config)

    def _finish(self, reply: Reply) -> None:
        stats = reply.stats.to_dict() if reply.stats else None
        if stats is not None:
            # the stored answer already is the kept text; the reason stays with the reply
            stats.pop("kept_chars")
            stats.pop("repetition")
            stats.update(model=reply.model, backend=reply.backend)
        energy, samples = None, None
        if reply.energy is not None:
            energy = reply.energy.to_row(reply.stats.completion_tokens if reply.stats else 0, self.idle_watts)
            samples = reply.energy.samples if self.keep_samples else None
        self.recorder.finish_message(reply.message_id, reply.text, reply.status, stats, energy, samples)
        history = self.conversation.history
        if reply.text:
            history.append({"role": "assistant", "content": reply.text})
        elif history and history[-1]["role"] == "user":
            # No answer to show the model next turn; keep the question recorded but out of the context.
            history.pop()

    def close(self) -> None:
        self.engine.close()
        self.recorder.close()
