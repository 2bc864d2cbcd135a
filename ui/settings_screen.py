"""The settings screen: the tiers, the router, recording and the energy meter, written to settings.toml and checked by
the same reader every command uses (`localmoe.home.settings.load`), so the screen can never save a file the CLI would
refuse. A meter newly chosen here must also be readable on this machine (the CLI would refuse an answer with it)."""

from __future__ import annotations

import tomllib
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Header, Input, Label, Select, Static, Switch

from localmoe.errors import LocalmoeError
from localmoe.home import paths, settings
from localmoe.ui.footer import FitFooter

FIELDS = (("tiers", "small", "Small tier (model id or .gguf path; empty: the embedded model)"),
          ("tiers", "large", "Large tier (empty: the largest installed MoE that fits)"),
          ("router", "preference", "Router preference: quality, balanced, energy or a threshold in (0, 1)"))


class SettingsScreen(Screen[bool]):
    """Dismissed with True when settings.toml was written: the chat then answers the next question with them."""

    BINDINGS = [Binding("ctrl+s", "save", "Save", priority=True), Binding("escape", "back", "Back")]

    def __init__(self) -> None:
        super().__init__()
        self.path = paths.data_dir() / settings.FILENAME
        self.raw: dict[str, Any] = {}
        self.unreadable: str | None = None  # why the file could not be read at all (then it is never saved over)

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="settings", can_focus=False):  # Tab goes from field to field
            yield Static("", id="settings-file")
            for table, key, label in FIELDS:
                yield Label(label)
                yield Input(id=f"{table}-{key}")
            yield Label("Router strategy")
            yield Select([("default (the router file's best; shipped: probe)", ""),
                          *((s, s) for s in settings.STRATEGIES)], allow_blank=False,
                         id="router-strategy")
            yield Label("Record conversations (off: chats and `ask` are off the record by default)")
            yield Switch(True, id="privacy-record")
            yield Label("Energy meter (auto: the best this machine has)")
            yield Select([(name, name) for name in settings.meter_names()], allow_blank=False, id="energy-meter")
        yield Static("", id="settings-error")  # outside the scroll: on a short terminal the error stays in view
        yield FitFooter()

    def on_mount(self) -> None:
        self.title, self.sub_title = "localmoe", "settings"
        self.query_one("#settings-file", Static).update(Text(f"{self.path} (Ctrl+S saves, Esc goes back)"))
        problem = ""
        try:
            settings.load(self.path)  # a broken file is shown, not half-read
        except LocalmoeError as exc:
            problem = str(exc)
            self.error(problem)
        try:  # a value of the wrong type still shows, to be mended here; a file that is not TOML cannot be
            self.raw = tomllib.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
            if any(not isinstance(self.raw.get(t, {}), dict) for t in settings.TABLES):
                raise ValueError("a table is not a table")
        except (OSError, UnicodeDecodeError, ValueError):  # TOMLDecodeError is a ValueError
            self.raw, self.unreadable = {}, problem or f"cannot read {self.path}"
        for table, key, _ in FIELDS:
            value = self.raw.get(table, {}).get(key)
            self.query_one(f"#{table}-{key}", Input).value = "" if value is None else str(value)
        strategy = self.raw.get("router", {}).get("strategy")
        # a strategy the file misspells shows as the default (the error line names it), not as a crash of the Select
        self.query_one("#router-strategy", Select).value = strategy if strategy in settings.STRATEGIES else ""
        # only a real `true` shows recording on: "false" as a string meant off, and saving must not turn it on
        self.query_one("#privacy-record", Switch).value = self.raw.get("privacy", {}).get("record", True) is True
        self.query_one("#energy-meter", Select).value = self._meter_in_file() or settings.AUTO_METER
        # the form is taller than 24 lines: it opens at its top (the file's path first), not scrolled to the field
        self.query_one("#tiers-small", Input).focus(scroll_visible=False)
        self.call_after_refresh(self.query_one("#settings", VerticalScroll).scroll_home, animate=False)

    def error(self, message: str) -> None:
        line = self.query_one("#settings-error", Static)
        line.update(Text(message))
        line.set_class(bool(message), "shown")

    def action_back(self) -> None:
        self.dismiss(False)

    def _meter_in_file(self) -> str | None:
        try:
            return settings.parse_meter(self.raw.get("energy", {}).get("meter"))
        except LocalmoeError:
            return None  # the error line already says what is wrong with the file

    def action_save(self) -> None:
        if self.unreadable:  # saving would replace whatever the file holds with this empty form
            self.error(f"{self.unreadable}: mend it in an editor first (saving here would replace everything in "
                       "it)")
            return
        data: dict[str, dict[str, Any]] = {t: dict(self.raw.get(t, {})) for t in settings.TABLES}
        for table, key, _ in FIELDS:
            value = self.query_one(f"#{table}-{key}", Input).value.strip()
            if value:
                data[table][key] = value
            else:
                data[table].pop(key, None)
        strategy = self.query_one("#router-strategy", Select).value
        if strategy:
            data["router"]["strategy"] = strategy
        else:
            data["router"].pop("strategy", None)
        record = self.query_one("#privacy-record", Switch).value
        if not record or "record" in data["privacy"]:  # on is the default: a file without the key stays without
            data["privacy"]["record"] = record
        meter = settings.parse_meter(self.query_one("#energy-meter", Select).value)
        if meter is None:
            data["energy"].pop("meter", None)
        else:
            data["energy"]["meter"] = meter
            if meter != self._meter_in_file() and (problem := self._unreadable(meter)):
                self.error(problem)
                return
        try:
            settings.save({**{k: v for k, v in self.raw.items() if k not in data}, **data}, self.path)
        except LocalmoeError as exc:
            self.error(str(exc))
            return
        self.notify(f"Saved {self.path}; the next question uses it.", title="Settings", markup=False)
        self.dismiss(True)

    @staticmethod
    def _unreadable(name: str) -> str | None:
        """Why the meter `name` cannot be read on this machine (one line), or None when it can."""
        from localmoe.record import meters

        try:
            meter, _notes = meters.select_meter(name)
        except LocalmoeError as exc:
            return f"[energy] meter: {exc}"
        meter.close()
        return None
