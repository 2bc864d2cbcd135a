"""The chat screen: the conversation, a prompt, and the stats of each answer.

Loading and generation run in thread workers; they talk back with posted messages, which are thread-safe and
never block the decode loop on the UI.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Markdown, Static

from localmoe.assistant import Assistant
from localmoe.engine import GenerationConfig, GenerationStats
from localmoe.errors import LocalmoeError
from localmoe.session import experts_text

# Rendering shares two cores (and the GIL) with the decode loop: batch tokens into ten appends a second.
UPDATE_INTERVAL_S = 0.1


def joules_text(energy: Any) -> str:
    """`~` marks an estimate: no power sensor was readable, so the figure comes from CPU time."""
    return f"{'' if energy.measured else '~'}{energy.joules:.1f} J"


def stats_line(model: str, stats: GenerationStats, status: str, energy: Any = None,
               experts: dict[str, Any] | None = None) -> str:
    parts = [model, f"{stats.completion_tokens} tokens"]
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tok/s")
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    if experts:
        parts.append(experts_text(experts))
    if energy is not None:
        parts.append(joules_text(energy))
    if status != "complete":
        parts.append({"cancelled": "stopped"}.get(status, status))
    return " · ".join(parts)


class Question(Static):
    pass


class Answer(VerticalScroll, can_focus=False):
    """One answer: markdown that grows as tokens arrive, and a stats line once it is done."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.text = ""
        self.done = False
        self.stats: GenerationStats | None = None
        self.energy: Any = None
        self.decision: Any = None
        self.status = "pending"

    def compose(self) -> ComposeResult:
        yield Markdown("", classes="body")
        yield Static("…", classes="stats")
        yield Static("", classes="route")

    async def append(self, delta: str) -> None:
        """Add streamed text; Markdown.append re-parses only the last block, not the whole answer."""
        self.text += delta
        await self.query_one(Markdown).append(delta)

    def finish(self, stats: GenerationStats | None, status: str, error: str | None = None,
               energy: Any = None, decision: Any = None, experts: dict[str, Any] | None = None) -> None:
        self.done, self.stats, self.status, self.energy, self.decision = True, stats, status, energy, decision
        self.experts = experts
        line = self.query_one(".stats", Static)
        if error:
            self.add_class("error")
            line.update(f"error: {error}")
        elif stats is not None:
            line.update(stats_line(self.model, stats, status, energy, experts))
        if decision is not None and not error:
            tier = "large (escalated)" if decision.escalated else decision.tier
            self.query_one(".route", Static).update(f"{tier} tier · {decision.reason}")


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+l", "retry_large", "Retry on large"),
        Binding("ctrl+g", "thumbs_up", "Good", show=False),
        Binding("ctrl+b", "thumbs_down", "Bad answer", show=False),
        Binding("ctrl+q", "app.quit", "Quit"),
    ]

    class Chunk(Message):
        def __init__(self, answer: Answer, text: str) -> None:
            super().__init__()
            self.answer, self.text = answer, text

    class Done(Message):
        def __init__(self, answer: Answer, text: str | None, stats: GenerationStats | None, status: str,
                     error: str | None = None, energy: Any = None, decision: Any = None,
                     model: str | None = None, experts: dict[str, Any] | None = None) -> None:
            super().__init__()
            self.answer, self.text, self.stats, self.status, self.error = answer, text, stats, status, error
            self.energy, self.decision, self.model, self.experts = energy, decision, model, experts

    class Loaded(Message):
        def __init__(self, model: str | None, error: str | None, load_s: float | None) -> None:
            super().__init__()
            self.model, self.error, self.load_s = model, error, load_s

    def __init__(self, model: str | None = None, config: GenerationConfig | None = None) -> None:
        super().__init__()
        self.model_name = model
        self.config = config
        self.assistant: Assistant | None = None
        self.last: tuple[str, Any] | None = None  # (prompt, RoutedReply) of the latest answer, for retry and labels
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._cancel: threading.Event | None = None
        self.generating = False
        self._shown_notices: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="conversation"):
            yield Static("Loading the model… you can type your question now.", id="notice")
        yield Input(placeholder="Ask anything (Enter to send, Esc to stop, Ctrl+N for a new chat)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "localmoe"
        self.sub_title = "loading model…"
        self.query_one("#prompt", Input).focus()
        self.load_model()

    @work(thread=True, exclusive=True, group="load")
    def load_model(self) -> None:
        try:
            overrides = {k: v for k, v in vars(self.config).items()} if self.config else None
            assistant = Assistant(overrides=overrides, pinned_model=self.model_name)
            self.assistant = assistant
            t0 = time.perf_counter()
            session = assistant.session_for("small")
            session.load()
            self.post_message(self.Loaded(session.model.id, None, time.perf_counter() - t0))
        except LocalmoeError as exc:
            self.load_error = str(exc)
            self.post_message(self.Loaded(None, str(exc), None))
        finally:
            self._ready.set()

    def on_chat_screen_loaded(self, message: Loaded) -> None:
        notice = self.query_one("#notice", Static)
        if message.error:
            self.sub_title = "no model"
            notice.update(f"Could not start the model: {message.error}")
            return
        self.sub_title = message.model or ""
        notice.update(f"{message.model} is ready (loaded in {message.load_s:.1f} s). Ask a question below.")
        a = self.assistant
        for warning in (a.session_for("small").warnings + a.notices) if a else []:
            self.notify(warning, title="Note", severity="warning", timeout=15)

    @on(Input.Submitted, "#prompt")
    async def ask(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        event.input.clear()
        await self._ask(prompt)

    async def _ask(self, prompt: str, tier: str | None = None) -> None:
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        conversation = self.query_one("#conversation", VerticalScroll)
        answer = Answer(self.model_name or "model")
        await conversation.mount(Question(prompt))
        await conversation.mount(answer)
        conversation.scroll_end(animate=False)
        self.generating = True
        self._cancel = threading.Event()
        self.generate(prompt, answer, self._cancel, tier)

    @work(thread=True, group="generate")
    def generate(self, prompt: str, answer: Answer, cancel: threading.Event, tier: str | None = None) -> None:
        self._ready.wait()
        if self.assistant is None:
            self.post_message(self.Done(answer, "", None, "error", self.load_error or "no model"))
            return
        routed = None
        try:
            routed = self.assistant.ask(prompt, cancel=cancel, tier=tier)
            state = {"last": 0.0, "sent": 0}

            def flush(force: bool = False) -> None:
                now = time.monotonic()
                if force or now - state["last"] >= UPDATE_INTERVAL_S:
                    text = routed.text
                    state["last"] = now
                    self.post_message(self.Chunk(answer, text[state["sent"]:]))
                    state["sent"] = len(text)

            def escalated(_: Any) -> None:
                flush(force=True)  # the rest of the small answer, then a visible break
                self.post_message(self.Chunk(answer, "\n\n---\n*The small model was unsure; the large model "
                                                     "answers:*\n\n"))
                state["sent"] = 0

            routed.on_escalate = escalated
            for _ in routed:
                flush()
            flush(force=True)
            reply = routed.reply
            self.last = (prompt, routed)
            self.post_message(self.Done(answer, None, reply.stats, reply.status, energy=reply.energy,
                                        decision=routed.decision, model=reply.model, experts=reply.experts))
        except LocalmoeError as exc:
            self.post_message(self.Done(answer, None, None, "error", str(exc)))

    async def on_chat_screen_chunk(self, message: Chunk) -> None:
        if not message.answer.done and message.text:
            await message.answer.append(message.text)
            self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)

    async def on_chat_screen_done(self, message: Done) -> None:
        if message.model:
            message.answer.model = message.model
        message.answer.finish(message.stats, message.status, message.error, message.energy, message.decision,
                              message.experts)
        self.generating = False
        notice = message.decision.notice if message.decision is not None else None
        if notice and notice not in self._shown_notices:  # once per session: the stats line keeps the tier
            self._shown_notices.add(notice)
            self.notify(notice, title="Router", severity="warning", timeout=10)
        self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)

    async def action_retry_large(self) -> None:
        """Re-ask the last question on the large tier; the small answer was not good enough: a label."""
        if self.last is None or self.assistant is None:
            self.notify("Nothing to retry yet.")
            return
        prompt, routed = self.last
        if routed.decision.tier == "small":
            self.assistant.label(routed.reply.message_id, prompt, True, "retry")
        await self._ask(prompt, tier="large")

    def _thumbs(self, good: bool) -> None:
        if self.last is None or self.assistant is None:
            self.notify("No answer to rate yet.")
            return
        prompt, routed = self.last
        if routed.decision.tier != "small":
            self.notify("Thanks. (Only small-model answers teach the router.)")
            return
        self.assistant.label(routed.reply.message_id, prompt, not good, "thumbs")
        self.notify("Thanks: recorded for `localmoe router train`.")

    def action_thumbs_up(self) -> None:
        self._thumbs(True)

    def action_thumbs_down(self) -> None:
        self._thumbs(False)

    def on_unmount(self) -> None:
        # Quitting mid-answer: stop the decode loop so the worker thread ends and records the partial answer.
        if self._cancel is not None:
            self._cancel.set()

    def action_stop(self) -> None:
        if self._cancel is not None and self.generating:
            self._cancel.set()

    async def action_new_conversation(self) -> None:
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        if self.assistant is not None:
            self.assistant.new_conversation()
        self.last = None
        conversation = self.query_one("#conversation", VerticalScroll)
        await conversation.query("Question, Answer").remove()
        self.query_one("#notice", Static).update("New conversation.")
