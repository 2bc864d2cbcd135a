"""The installed `localmoe` command in a real terminal: tmux runs it in an 80×24 pane on a fresh data dir, a question
is typed and answered by the embedded model, every screen is opened and left with Escape, Ctrl+Q quits. No capture
may show a traceback, the process must exit cleanly, and the exchange must be in the SQLite file.

Textual's pilot drives the app from inside its own process; this drives it as a user does (keys through a terminal,
what the terminal shows), through the entry point `make run` starts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (the smoke test drives the real app "
                                "in a tmux pane; apt-get install tmux)")

QUESTION = "What is the capital of France?"
CHAT_HEADER = "localmoe — smollm2-135m-instruct"


def entry_point() -> Path:
    """The `localmoe` script installed beside this interpreter (.venv/bin/localmoe under `make test`)."""
    return Path(sys.executable).with_name("localmoe")


class Pane:
    """One tmux session on a private server (its own socket): nothing touches the user's tmux."""

    def __init__(self, socket: str, name: str = "smoke") -> None:
        self.socket, self.name = socket, name
        self.captures: list[str] = []
        self.socket_path = ""
        self.waited: list[tuple[str, float]] = []  # (what, seconds): where the time went, for a slow run

    def tmux(self, *args: str, check: bool = True) -> str:
        r = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        if check and r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self, command: list[str], config: Path, width: int = 80, height: int = 24) -> None:
        self.tmux("-f", str(config), "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                  shlex.join(command))
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def capture(self) -> str:
        text = self.tmux("capture-pane", "-p", "-t", self.name)
        self.captures.append(text)
        return text

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", self.name, *(["-l"] if literal else []), *keys)

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            screen = self.capture()
            assert "Traceback" not in screen, screen
            if predicate(screen):
                self.waited.append((what, time.monotonic() - t0))
                return screen
            if self.dead() is not None:
                raise AssertionError(f"the app exited while waiting for {what}:\n{screen}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(0.05)

    def dead(self) -> int | None:
        """The exit status once the command has ended (the pane stays, remain-on-exit), minus the signal's number
        when a signal ended it, else None."""
        out = self.tmux("display-message", "-p", "-t", self.name,
                        "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}").strip().split(":")
        if len(out) < 3 or out[0] != "1":
            return None
        return int(out[1]) if out[1] else -int(out[2] or 0)

    def close(self) -> None:
        self.tmux("kill-server", check=False)
        if self.socket_path:  # tmux leaves the socket file behind
            Path(self.socket_path).unlink(missing_ok=True)


def header(screen: str) -> str:
    return screen.splitlines()[0] if screen else ""


def test_start_ask_open_every_screen_and_quit(home, tmp_path):
    entry = entry_point()
    assert entry.exists(), f"{entry} is missing: run `make setup`"
    config = tmp_path / "tmux.conf"
    # no status line (the pane is the whole 80×24), keys forwarded at once, the pane kept after the app exits
    config.write_text("set -g status off\nset -s escape-time 0\nset -g remain-on-exit on\n")
    from localmoe.ui.chat import ChatScreen

    screens = [("f2", "conversations"), ("f3", "settings"), ("f4", "models"), ("f5", "hardware and experts")]
    if any(getattr(b, "key", None) == "f6" for b in ChatScreen.BINDINGS):  # the benchmarks screen, where it exists
        screens.append(("f6", ""))
    pane = Pane(f"localmoe-smoke-{os.getpid()}")
    t0 = time.monotonic()
    try:
        pane.start(["env", f"LOCALMOE_HOME={home}", str(entry)], config)
        pane.wait(lambda s: "is ready" in s and CHAT_HEADER in header(s), "the model to load")
        pane.keys(QUESTION, literal=True)
        pane.keys("Enter")
        pane.wait(lambda s: "tok/s" in s and " J" in s, "the answer's stats line")

        for key, title in screens:
            pane.keys(key.upper())
            opened = pane.wait(lambda s, t=title: CHAT_HEADER not in header(s) and t in header(s), f"the {key} screen")
            if key == "f4":  # the models are listed and planned in a worker: wait for the table
                opened = pane.wait(lambda s: "Planned for" in s, "the models table")
            assert opened.count("\n") >= 20, opened
            pane.keys("Escape")
            pane.wait(lambda s: CHAT_HEADER in header(s), f"the chat after {key}")

        pane.keys("C-q")
        deadline = time.monotonic() + 10
        while (status := pane.dead()) is None:
            assert time.monotonic() < deadline, "the app did not exit after Ctrl+Q"
            time.sleep(0.05)
        final = pane.capture()
    finally:
        pane.close()
    elapsed = time.monotonic() - t0

    assert status == 0, f"exit status {status} (negative: killed by that signal)\n{final}"
    assert not [c for c in pane.captures if "Traceback" in c]
    conn = sqlite3.connect(home / "localmoe.db")
    rows = conn.execute("select role, content, status from messages order by id").fetchall()
    conn.close()
    assert rows[0] == ("user", QUESTION, "complete") and len(rows) == 2, rows
    assert rows[1][0] == "assistant" and rows[1][1].strip() and rows[1][2] == "complete", rows
    # About 8 s on 2 busy cores, most of it loading the model and answering. Not asserted: a slow CI machine is not a
    # broken app (each step has its own deadline above); -s shows where the time went.
    print(f"smoke test: {elapsed:.1f} s: " + ", ".join(f"{what} {s:.1f} s" for what, s in pane.waited))
