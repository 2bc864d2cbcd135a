"""A conversation with one model: the engine stays loaded, every exchange is recorded as it happens.

The CLI, the TUI and (later) the HTTP server all talk to this class; none of them touches engines or SQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from localmoe import models
from localmoe.engine import Engine, GenerationConfig, GenerationStats, Message, create_engine
from localmoe.errors import LocalmoeError, UsageError
from localmoe.recorder import Recorder
from localmoe.units import human_bytes

MAX_PROMPT_CHARS = 200_000


def experts_text(experts: dict[str, Any]) -> str:
    """The torch engine's expert cache for one answer: fast-tier hit rate and the bytes it had to move."""
    rate = experts.get("hit_rate")
    moved = (experts.get("bytes_read") or 0) + (experts.get("bytes_copied") or 0)
    hit = f"{rate:.0%}" if rate is not None else "-"
    return f"experts {hit} hit, {human_bytes(moved)} moved"


class Reply:
    """One answer being produced. Iterate it for text pieces; when iteration ends (or is abandoned, or
    interrupted) the answer and its stats are in the database."""

    def __init__(self, session: Session, question_id: int, answer_id: int, history: list[Message],
                 cancel: threading.Event | None) -> None:
        self.session = session
        self.question_id = question_id
        self.message_id = answer_id
        self.conversation_id = session.conversation_id
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
        return "".join(self._pieces)

    def __iter__(self) -> Iterator[str]:
        engine = self.session.engine
        status = "interrupted"  # what a Ctrl-C or a crash mid-stream leaves behind
        sampler = self.session._sampler()
        try:
            for piece in engine.stream(self._history, self.session.config, self._cancel):
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
            cache_stats = getattr(engine, "cache_stats", None)
            if cache_stats is not None:
                self.experts = cache_stats()
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
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens},
            "timing": {"ttft_s": s.ttft_s, "tokens_per_s": s.tokens_per_s, "wall_s": s.wall_s},
            "stop_reason": s.stop_reason,
            "energy": None if self.energy is None else {
                "joules": self.energy.joules, "avg_watts": self.energy.avg_watts,
                "peak_watts": self.energy.peak_watts, "meter": self.energy.meter,
                "measured": self.energy.measured,
            },
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
    ) -> None:
        """`meter`: a meters.Meter, None to pick the best available at the first question, False for none.
        `keep_samples` stores every power sample (benchmarks); `idle_watts` adds idle-subtracted joules."""
        self.model = model if isinstance(model, models.ModelRef) else models.resolve(model)
        self.recorder = recorder or Recorder()
        self.config = config or GenerationConfig(**self.model.defaults)
        self.system_prompt = system_prompt
        self.engine = engine or create_engine(self.model, **(engine_options or {}))
        self.conversation_id: int | None = None
        self.conversation_kind = "chat"
        self.history: list[Message] = []
        self._lock = threading.Lock()
        self._meter = meter
        self.meter_notes: list[str] = []
        self.keep_samples = keep_samples
        self.idle_watts = idle_watts

    @property
    def meter(self) -> Any:
        """The energy meter, chosen once: hardware counters where present, else a labelled estimate."""
        if self._meter is None:
            from localmoe import meters

            self._meter, self.meter_notes = meters.select_meter()
        return self._meter or None

    def _sampler(self) -> Any:
        meter = self.meter
        if meter is None:
            return None
        from localmoe import meters

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
        plan = getattr(self.engine, "plan", None)
        return list(plan.warnings) if plan else []

    def new_conversation(self) -> None:
        self.conversation_id = None
        self.history = []

    def ask(self, prompt: str, cancel: threading.Event | None = None) -> Reply:
        """Record the question now (so it survives anything that happens next) and return the Reply to stream."""
        prompt = prompt.strip()
        if not prompt:
            raise UsageError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UsageError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        rec = self.recorder
        with self._lock:
            if self.conversation_id is None:
                self.conversation_id = rec.new_conversation(self.model.id, title=prompt[:80],
                                                            kind=self.conversation_kind)
                if self.system_prompt:
                    rec.add_message(self.conversation_id, "system", self.system_prompt)
                    self.history = [{"role": "system", "content": self.system_prompt}]
            question_id = rec.add_message(self.conversation_id, "user", prompt)
            answer_id = rec.add_message(
                self.conversation_id, "assistant", "", model=self.model.id, status="pending", reply_to=question_id
            )
            self.history.append({"role": "user", "content": prompt})
            return Reply(self, question_id, answer_id, list(self.history), cancel)

    def _finish(self, reply: Reply) -> None:
        stats = reply.stats.to_dict() if reply.stats else None
        if stats is not None:
            stats.update(model=reply.model, backend=reply.backend)
        energy, samples = None, None
        if reply.energy is not None:
            e = reply.energy
            tokens = reply.stats.completion_tokens if reply.stats else 0
            energy = {
                "joules": e.joules, "avg_watts": e.avg_watts, "peak_watts": e.peak_watts, "seconds": e.seconds,
                "tokens_per_joule": tokens / e.joules if e.joules > 0 else None,
                "meter": e.meter, "measured": int(e.measured),
            }
            if self.idle_watts is not None:
                from localmoe import meters

                energy.update(idle_watts=self.idle_watts, net_joules=meters.net_joules(e, self.idle_watts))
            samples = e.samples if self.keep_samples else None
        self.recorder.finish_message(reply.message_id, reply.text, reply.status, stats, energy, samples)
        if reply.text:
            self.history.append({"role": "assistant", "content": reply.text})
        elif self.history and self.history[-1]["role"] == "user":
            # No answer to show the model next turn; keep the question recorded but out of the context.
            self.history.pop()

    def close(self) -> None:
        self.engine.close()
        self.recorder.close()
