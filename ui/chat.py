"""The chat screen: the conversation, a prompt, and the stats of each answer.

Loading and generation run in thread workers; they talk back with posted messages, which are thread-safe and
never block the decode loop on the UI.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Input, Markdown, Static

from localmoe.chat.assistant import Assistant
from localmoe.chat.display import SEPARATOR, ending_note, joules_text, stats_parts, wrap_figures
from localmoe.engine import GenerationConfig, GenerationStats
from localmoe.errors import LocalmoeError
from localmoe.home import paths, settings
from localmoe.record.recorder import Recorder
from localmoe.ui.footer import FitFooter

# Rendering shares two cores (and the GIL) with the decode loop: batch tokens into ten appends a second.
UPDATE_INTERVAL_S = 0.1
OFF_THE_RECORD = " · off the record"


class Question(Static):
    pass


class Conversation(VerticalScroll, can_focus=False):
    """The questions and answers. Not focusable: the prompt keeps the keyboard, and PgUp/PgDn scroll this from
    there."""


class Figures(Static):
    """An answer's stats line, wrapped between its figures (never "first token 0.06" / "s")."""

    def __init__(self, text: str = "", **kwargs: Any) -> None:
        super().__init__(text, **kwargs)
        self.parts: list[str] | None = None  # None: plain text, as Static shows it

    def show_parts(self, parts: list[str]) -> None:
        self.parts = parts
        self.update(SEPARATOR.join(parts))  # the plain line: update lays the widget out again

    def _lines(self, width: int) -> list[str]:
        return wrap_figures(self.parts or [], width)

    def render(self) -> Any:
        if self.parts is None:
            return super().render()
        return Text("\n".join(self._lines(self.content_size.width or 10**6)))

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        if self.parts is None:
            return super().get_content_height(container, viewport, width)
        return len(self._lines(width))


def recorded_note(message: dict[str, Any], facts: dict[str, Any]) -> str:
    """A recorded answer's stats line: model, when, status, tokens and joules (as live), `recorded`."""
    when = (message["completed_at"] or message["created_at"] or "")[:16].replace("T", " ")
    parts = [message["model"] or "", f"{when} UTC"]
    if message["status"] != "complete":
        parts.append(message["status"])
    if facts.get("completion_tokens"):
        parts.append(f"{facts['completion_tokens']} tokens")
    if message["status"] == "complete" and (note := ending_note(facts.get("stop_reason"),
                                                                 facts.get("completion_tokens"))):
        parts.append(note)
    if facts.get("joules") is not None:
        parts.append(joules_text(facts["joules"], bool(facts.get("measured"))))
    return " · ".join([*parts, "recorded"])


@dataclass
class LastAnswer:
    """The answer Ctrl+G / Ctrl+B / Ctrl+L act on: the one that finished last, or a resumed conversation's last."""

    prompt: str
    tier: str  # the tier that answered ("small" for a model the user pinned: see `Assistant.pinned`)
    message_id: int
    question_id: int | None
    answer: Answer
    reply: Any = None  # the live reply (what the model was given), None for a recorded one


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
        self.rating: bool | None = None  # True good, False bad, None unrated

    def compose(self) -> ComposeResult:
        yield Markdown("", classes="body")
        yield Figures("…", classes="stats")
        yield Static("", classes="route")
        yield Static("", classes="rating")

    def show_rating(self, good: bool | None) -> None:
        self.rating = good
        mark = {True: "rated good (Ctrl+G again to undo)", False: "rated bad (Ctrl+B again to undo)"}
        line = self.query_one(".rating", Static)
        line.update(mark[good] if good is not None else "")
        line.display = good is not None

    async def append(self, delta: str) -> None:
        """Add streamed text; Markdown.append re-parses only the last block, not the whole answer."""
        self.text += delta
        await self.query_one(Markdown).append(delta)

    async def show_recorded(self, text: str, note: str) -> None:
        """An answer from the record (a resumed conversation): its text and when it was given, nothing to stream."""
        self.text, self.done, self.status = text, True, "complete"
        await self.query_one(Markdown).update(text)
        self.query_one(".stats", Static).update(Text(note))

    async def keep(self, n_chars: int) -> None:
        """Take back what streamed after the first round of a loop the engine stopped."""
        self.text = self.text[:n_chars]
        await self.query_one(Markdown).update(self.text)

    def finish(self, stats: GenerationStats | None, status: str, error: str | None = None,
               energy: Any = None, decision: Any = None, experts: dict[str, Any] | None = None) -> None:
        self.done, self.stats, self.status, self.energy, self.decision = True, stats, status, energy, decision
        self.experts = experts
        line = self.query_one(".stats", Static)
        if error:
            self.add_class("error")
            line.update(Text(f"error: {error}"))
        elif stats is not None:
            line.show_parts(stats_parts(self.model, stats, status, energy, experts))
        if decision is not None and not error:
            tier = "large (escalated)" if decision.escalated else decision.tier
            route = self.query_one(".route", Static)
            route.update(Text(f"{tier} tier · {decision.reason}"))  # reasons name settings like [tiers]: no markup
            if decision.warning:
                self.add_class("doubtful")
                route.update(Text(f"⚠ {decision.warning}\n{tier} tier · {decision.reason}"))


class ChatScreen(Screen):
    # where the footer is too narrow for every key: Esc and Ctrl+N are named in the input's placeholder, and the rest
    # stay in the command palette
    FOOTER_DROP_FIRST = ("stop", "new_conversation", "thumbs_down", "thumbs_up", "recording", "retry_large")
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        # short names: the five screens and Quit fit an 80-column footer
        Binding("f2", "conversations", "History", tooltip="Conversations"),
        Binding("f3", "settings", "Settings"),
        Binding("f4", "models", "Models"),
        Binding("f5", "hardware", "Hardware"),
        Binding("f6", "benchmarks", "Bench", tooltip="Benchmarks"),
        Binding("ctrl+l", "retry_large", "Retry on large"),
        Binding("ctrl+g", "thumbs_up", "Good"),
        Binding("ctrl+b", "thumbs_down", "Bad"),
        # One key, two labels: check_action shows the one that applies, so the footer says which mode is on.
        Binding("ctrl+o", "recording(False)", "Off the record"),
        Binding("ctrl+o", "recording(True)", "Record again"),
        Binding("pageup", "scroll_answers(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll_answers(1)", "Scroll down", show=False),
        Binding("up", "recall(-1)", "Earlier question", show=False),
        Binding("down", "recall(1)", "Later question", show=False),
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

    class AnswerFinished(Message):
        """Posted to the screen in front when an answer ends: the hardware screen shows its experts."""

    class Loaded(Message):
        def __init__(self, model: str | None, error: str | None, load_s: float | None) -> None:
            super().__init__()
            self.model, self.error, self.load_s = model, error, load_s

    def __init__(self, model: str | None = None, config: GenerationConfig | None = None) -> None:
        super().__init__()
        self.model_name = model
        self.config = config
        self.assistant: Assistant | None = None
        self.last: LastAnswer | None = None  # for retry and ratings
        self.last_recorded = True  # whether that answer went into the database (not off the record)
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._cancel: threading.Event | None = None
        self.generating = False
        self._shown_notices: set[str] = set()
        self._outgrown: set[int | None] = set()  # conversations told that their oldest exchanges leave the prompt
        self.asked: list[str] = []  # this screen's questions, for Up/Down recall
        self._recall: int | None = None  # index into `asked` while recalling
        self._draft = ""  # what was typed before Up recalled an earlier question
        # routing telemetry on MoE engines, for the hardware screen's heat map; off by default: observing costs speed
        self.telemetry = False
        # the engine and statistics of the latest finished answer, for the hardware screen (see _last_run)
        self.last_run: dict[str, Any] | None = None
        self.answering: Any = None  # the RoutedReply being streamed, for the hardware screen's live view

    def compose(self) -> ComposeResult:
        yield Header()
        with Conversation(id="conversation"):
            yield Static("Loading the model… you can type your question now.", id="notice")
        yield Input(placeholder="Ask anything (Enter to send, Esc to stop, Ctrl+N for a new chat)", id="prompt")
        yield FitFooter()

    def on_mount(self) -> None:
        self.title = "localmoe"
        self.sub_title = "loading model…"
        self.query_one("#prompt", Input).focus()
        self.load_model()

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, previous: Assistant | None = None) -> None:
        """`previous`: the assistant before a settings change; its conversation and recording mode go on (its
        scratch database too, off the record), unless the change was to [privacy] record, which then applies."""
        try:
            overrides = {k: v for k, v in vars(self.config).items()} if self.config else None
            user_settings = settings.load()
            if previous is None:  # [privacy] record = false: the chat starts off the record; nothing is opened
                recorder = None if user_settings.record else Recorder.in_memory()
            else:
                recorder = None if previous.recording else previous.recorder
            assistant = Assistant(overrides=overrides, pinned_model=self.model_name, user_settings=user_settings,
                                  recorder=recorder)
            if previous is not None:
                assistant.conversation.id = previous.conversation.id
                assistant.conversation.history = previous.conversation.history
                previous.close()
                for rec in {previous.recorder, previous._log} - {recorder, None}:
                    rec.close()
                if previous.settings.record != user_settings.record:
                    assistant.set_recording(user_settings.record)
            self.assistant = assistant
            t0 = time.perf_counter()
            session = assistant.session_for("small")
            session.load()
            self.post_message(self.Loaded(session.model.id, None, time.perf_counter() - t0))
            assistant.warm_router()  # the probe's model, while the user types the first question
        except LocalmoeError as exc:
            self.load_error = str(exc)
            self.post_message(self.Loaded(None, str(exc), None))
        finally:
            self._ready.set()

    def on_chat_screen_loaded(self, message: Loaded) -> None:
        notice = self.query_one("#notice", Static)
        if message.error:
            self.sub_title = "no model"
            notice.update(Text(f"Could not start the model: {message.error}"))
            return
        off = self.assistant is not None and not self.assistant.recording
        self.sub_title = (message.model or "") + (OFF_THE_RECORD if off else "")
        self.refresh_bindings()  # Ctrl+O's label follows the mode the chat starts in
        notice.update(Text(f"{message.model} is ready (loaded in {message.load_s:.1f} s). Ask a question below."))
        a = self.assistant
        if paths.tightened:
            self.notify(f"Made {', '.join(dict.fromkeys(paths.tightened))} readable by you only.", title="Privacy",
                        markup=False)
            paths.tightened.clear()
        for warning in dict.fromkeys(a.session_for("small").warnings + a.notices) if a else []:
            self._shown_notices.add(warning)  # the first decision carries the router's again: said once
            self.notify(warning, title="Note", severity="warning", timeout=15, markup=False)

    @on(Input.Submitted, "#prompt")
    async def ask(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.generating:  # refused for now: the question stays in the prompt, to send once the answer ends
            self.notify("Still answering: press Esc to stop it first (your question stays in the prompt).",
                        severity="warning")
            return
        event.input.clear()
        if not self.asked or self.asked[-1] != prompt:
            self.asked.append(prompt)
        self._recall, self._draft = None, ""
        await self._ask(prompt)

    def action_recall(self, step: int) -> None:
        """Up/Down in the prompt: earlier and later questions of this session, then back to an empty prompt."""
        if not self.asked or (self._recall is None and step > 0):
            return  # Down with nothing recalled keeps what is being typed
        prompt = self.query_one("#prompt", Input)
        if self._recall is None:
            self._draft = prompt.value  # what was being typed comes back below the newest question
        i = (len(self.asked) if self._recall is None else self._recall) + step
        if i >= len(self.asked):
            self._recall, prompt.value = None, self._draft
        else:
            self._recall = max(0, i)
            prompt.value = self.asked[self._recall]
        prompt.cursor_position = len(prompt.value)

    def action_scroll_answers(self, pages: int) -> None:
        conversation = self.query_one("#conversation", Conversation)
        (conversation.scroll_page_down if pages > 0 else conversation.scroll_page_up)(animate=False)

    async def _ask(self, prompt: str, tier: str | None = None, again: int | None = None) -> None:
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        conversation = self.query_one("#conversation", Conversation)
        answer = Answer(self.model_name or "model")
        await conversation.mount(Question(prompt, markup=False))  # a question is text, not Rich markup
        await conversation.mount(answer)
        conversation.scroll_end(animate=False)
        self.generating = True
        self._cancel = threading.Event()
        self.generate(prompt, answer, self._cancel, tier, again)

    @work(thread=True, group="generate")
    def generate(self, prompt: str, answer: Answer, cancel: threading.Event, tier: str | None = None,
                 again: int | None = None) -> None:
        self._ready.wait()
        if self.assistant is None:
            self.post_message(self.Done(answer, "", None, "error", self.load_error or "no model"))
            return
        routed = None
        try:
            routed = self.assistant.ask(prompt, cancel=cancel, tier=tier, again=again)
            self._apply_telemetry(self.assistant.session_for(routed.decision.tier).engine)
            self.answering = routed
            self._tell_remote(routed)
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
                self.post_message(self.Chunk(answer, "\n\n---\n*The small answer looks wrong; the large model "
                                                     "answers:*\n\n"))
                state["sent"] = 0
                self._tell_remote(routed)
                self._apply_telemetry(self.assistant.session_for(routed.decision.tier).engine)  # the tier escalated to

            routed.on_escalate = escalated
            for _ in routed:
                flush()
            flush(force=True)
            reply = routed.reply
            self.last_recorded = self.assistant.recording  # recording cannot change while an answer is produced
            self.last = LastAnswer(prompt, routed.decision.tier, reply.message_id, reply.question_id, answer, reply)
            self.last_run = self._last_run(reply)
            self.post_message(self.Done(answer, None, reply.stats, reply.status, energy=reply.energy,
                                        decision=routed.decision, model=reply.model, experts=reply.experts))
        except LocalmoeError as exc:
            self.post_message(self.Done(answer, None, None, "error", str(exc)))

    async def on_chat_screen_chunk(self, message: Chunk) -> None:
        if not message.answer.done and message.text:
            await message.answer.append(message.text)
            self.query_one("#conversation", Conversation).scroll_end(animate=False)

    async def on_chat_screen_done(self, message: Done) -> None:
        if message.model:
            message.answer.model = message.model
        s, d = message.stats, message.decision
        if s is not None and s.kept_chars is not None and not (d is not None and d.escalated):
            await message.answer.keep(s.kept_chars)
        message.answer.finish(message.stats, message.status, message.error, message.energy, message.decision,
                              message.experts)
        self.generating, self.answering = False, None
        # once per session: the stats line keeps the tier
        fresh = [n for n in (message.decision.notices if message.decision is not None else [])
                 if n not in self._shown_notices]
        if fresh:
            self._shown_notices.update(fresh)
            self.notify("; ".join(fresh), title="Router", severity="warning", timeout=10, markup=False)
        cid = self.assistant.conversation_id if self.assistant is not None else None
        if s is not None and s.dropped_exchanges and cid not in self._outgrown:  # once per conversation
            self._outgrown.add(cid)
            self.notify(f"This conversation outgrew {message.answer.model}'s context: its oldest exchanges are left "
                        "out of what the model reads (they stay recorded). Ctrl+N starts a new conversation.",
                        title="Context", severity="warning", timeout=15, markup=False)
        self.query_one("#conversation", Conversation).scroll_end(animate=False)
        if self.app.screen is not self:
            self.app.screen.post_message(self.AnswerFinished())

    def _apply_telemetry(self, engine: Any) -> None:
        """Routing telemetry as the hardware screen asked, on local MoE engines only (a dense model has no routing to
        observe). Both local engines take it as their `telemetry` option: torch reads it per step, llama.cpp installs
        its tap at load, so it is closed here and the next prompt loads it again (once per change)."""
        if engine.backend not in ("llama.cpp", "torch") or engine.telemetry == self.telemetry:
            return
        if engine.moe_shape() is None:
            return
        engine.telemetry = self.telemetry
        if engine.backend == "llama.cpp":
            engine.close()

    @staticmethod
    def _last_run(reply: Any) -> dict[str, Any]:
        """What the hardware screen shows of an answer, taken in the generation worker before the next answer can
        replace the engine's routing: the cache statistics, a copy of the routing telemetry and the MoE shape."""
        engine = reply.session.engine
        return {"model": reply.model, "backend": reply.backend, "stats": reply.stats, "experts": reply.experts,
                "per_expert": engine.expert_cache_counts(), "routing": list(engine.routing),
                "shape": engine.moe_shape(), "plan": engine.plan}

    def live_run(self) -> dict[str, Any] | None:
        """The answer being streamed, as `_last_run` describes a finished one, from an engine whose statistics grow
        as it decodes (one with an expert cache: its counters and routing are kept step by step; llama.cpp's routing
        is collected when the answer ends). None otherwise. Read from the UI thread while the worker decodes: plain
        counters and a list that is only appended to, so a snapshot is at worst a step behind."""
        routed = self.answering
        reply = routed.reply if routed is not None else None
        if reply is None or reply.session.engine.cache_stats() is None:
            return None
        engine = reply.session.engine
        return {"model": reply.model, "backend": reply.backend, "stats": engine.stats, "experts": engine.cache_stats(),
                "per_expert": engine.expert_cache_counts(), "routing": list(engine.routing),
                "shape": engine.moe_shape(), "plan": engine.plan}

    async def action_retry_large(self) -> None:
        """Re-ask the last question on the large tier; the small answer was not good enough: a label."""
        if self.last is None or self.assistant is None:
            self.notify("Nothing to retry yet.")
            return
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        try:
            self.assistant.available("large", load=False, fall_back=False)
        except LocalmoeError as exc:
            self.notify(str(exc), title="No large model", severity="warning", timeout=15, markup=False)
            return
        last = self.last
        if last.tier == "small" and self.assistant.pinned is None:
            self.assistant.label(last.message_id, last.prompt, True, "retry")
        # the same question answered anew: the small answer leaves the model's context, not the record
        await self._ask(last.prompt, tier="large", again=last.question_id)

    def _thumbs(self, good: bool) -> None:
        """Rate the latest answer; the same key again takes the rating back, the other key changes it. One rating
        per answer is stored (the router learns from small-tier answers' ratings)."""
        if self.last is None or self.assistant is None:
            self.notify("No answer to rate yet.")
            return
        last = self.last  # the answer that finished last, even while another streams
        rating = None if last.answer.rating is good else good
        small = last.tier == "small" and self.assistant.pinned is None
        stored = self.assistant.rate(last.message_id, last.prompt, rating, small=small, recorded=self.last_recorded)
        last.answer.show_rating(rating)
        if rating is None:
            self.notify("Rating removed.")
        elif not small:
            self.notify("Thanks. (Only small-model answers teach the router.)")
        elif not stored:
            self.notify("Thanks. (The answer was off the record: its rating is not stored either.)")
        else:
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

    def _tell_remote(self, routed: Any) -> None:
        """From a generation worker: the first question to a remote endpoint is announced before it is sent."""
        notice = routed.remote_notice
        if notice and notice not in self._shown_notices:
            self._shown_notices.add(notice)
            self.app.call_from_thread(self.notify, notice, title="Leaving this machine", severity="warning",
                                      timeout=20, markup=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "recording":  # the Ctrl+O that applies: off when recording, back on when off
            recording = self.assistant is None or self.assistant.recording
            return bool(parameters[0]) != recording
        return True

    def action_recording(self, on: bool) -> None:
        """Off the record (or back): the next questions are answered and stay in the conversation, but nothing of
        them is stored."""
        if self.assistant is None or not self._ready.is_set():
            self.notify("The model is still loading: try again in a moment.")
            return
        if self.generating:  # the answer under way would be split between two databases
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        self.assistant.set_recording(on)
        self.last = None  # its ids belong to the other database: no rating or retry label may land on them
        base = self.sub_title.removesuffix(OFF_THE_RECORD)
        self.sub_title = base if on else base + OFF_THE_RECORD
        self.refresh_bindings()
        self.notify("Recording again: the next questions and answers are saved." if on else
                    "Off the record: the next questions and answers are not saved (Ctrl+O to record again).",
                    title="Privacy", markup=False)

    async def action_new_conversation(self) -> None:
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        if self.assistant is not None:
            self.assistant.new_conversation()
        self.last = None
        self._outgrown.clear()  # a new conversation may get a deleted one's id: it is told afresh
        conversation = self.query_one("#conversation", Conversation)
        await conversation.query("Question, Answer").remove()
        self.query_one("#notice", Static).update("New conversation.")
        self.query_one("#prompt", Input).focus()

    def action_conversations(self) -> None:
        from localmoe.ui.conversations import ConversationsScreen

        self.app.push_screen(ConversationsScreen(), self._back_from_conversations)

    async def _back_from_conversations(self, result: dict[str, Any] | None) -> None:
        if not result:
            return
        a = self.assistant
        if a is not None and a.conversation_id in result["deleted"] and a.recording:
            await self.action_new_conversation()  # its rows are gone: the next question starts a new one
        if result["resume"] is not None:
            await self.resume(result["resume"])

    async def resume(self, conversation_id: int) -> None:
        """Continue a recorded conversation: its exchanges on screen, and in the context of the next question."""
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        if self.assistant is None or not self._ready.is_set():
            self.notify("The model is still loading: try again in a moment." if self.load_error is None else
                        f"No model to continue with: {self.load_error}", markup=False)
            return
        from localmoe.record.recorder import Recorder

        try:
            with Recorder() as rec:  # the real database, also when this chat is off the record
                row, messages = rec.conversation(conversation_id), rec.conversation_messages(conversation_id)
                facts = rec.answer_facts(conversation_id)
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        if row is None:
            self.notify(f"There is no conversation {conversation_id}.", severity="error")
            return
        self.assistant.conversation.resume(conversation_id, messages)
        self._recall = None
        view = self.query_one("#conversation", Conversation)
        await view.query("Question, Answer").remove()
        questions = {m["id"]: m for m in messages if m["role"] == "user"}
        self.asked = [m["content"] for m in questions.values()]
        last = None
        for m in messages:
            if m["role"] == "user":
                await view.mount(Question(m["content"], markup=False))
            elif m["role"] == "assistant":
                answer = Answer(m["model"] or "model")
                await view.mount(answer)
                f = facts.get(m["id"], {})
                await answer.show_recorded(m["content"] or "", recorded_note(m, f))
                if f.get("rating") is not None:
                    answer.show_rating(f["rating"])
                asked = questions.get(m["reply_to"])
                if asked is not None and m["status"] != "pending" and m["content"]:
                    # Ctrl+G / Ctrl+B / Ctrl+L act on the last recorded answer, as on one just given
                    # no decision recorded: a model named by the user, not a small-tier answer
                    last = LastAnswer(asked["content"], f.get("tier") or "large", m["id"], asked["id"], answer)
        self.last_recorded, self.last = True, last  # from the database, also when this chat is off the record
        title = row["title"] or f"conversation {conversation_id}"
        self.query_one("#notice", Static).update(Text(f"Resumed {title!r}: the next question continues it."))
        view.scroll_end(animate=False)
        self.query_one("#prompt", Input).focus()

    def action_settings(self) -> None:
        if self.generating:  # a settings change reloads the models: not under an answer
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        from localmoe.ui.settings_screen import SettingsScreen

        self.app.push_screen(SettingsScreen(), self._back_from_settings)

    def action_models(self) -> None:
        if self.generating:  # a tier change reloads the models: not under an answer
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        from localmoe.ui.models_screen import ModelsScreen

        self.app.push_screen(ModelsScreen(), self._back_from_settings)

    def action_hardware(self) -> None:
        from localmoe.ui.hardware_screen import HardwareScreen

        self.app.push_screen(HardwareScreen(self))

    def action_benchmarks(self) -> None:
        from localmoe.ui.bench_screen import BenchScreen

        self.app.push_screen(BenchScreen())

    def _back_from_settings(self, saved: bool | None) -> None:
        """From the settings or models screen: True when settings.toml changed."""
        if not saved:
            return
        previous, self.assistant = self.assistant, None
        self._ready.clear()
        self.sub_title = "loading model…"
        self.load_model(previous)
