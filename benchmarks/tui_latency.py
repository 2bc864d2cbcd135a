"""The chat UI's latency in a real terminal (tmux, 80×24): start to first screen, key-press-to-echo in the prompt while
an answer streams, and whether the displayed answer keeps up with generation.

    .venv/bin/python benchmarks/tui_latency.py [--starts 10] [--keys 60] [--write]

- **Start to first screen (warm)**: `.venv/bin/localmoe` (what `make run` starts) is exec'd in a tmux pane whose output
  tmux also pipes to a file (`pipe-pane`); the clock starts just before the key that execs it and stops when the
  chat screen's first frame (its footer) has been written to the terminal. One unmeasured start warms the page cache.
  Also reported: until the model is loaded ("is ready").
- **Key-press-to-echo while streaming**: the same app asked for long stories (the full answer budget, the embedded
  SmolLM2 at its own speed, i.e. as fast as this machine decodes); while an answer streams, one character (`§`, which
  no answer contains) is sent every 80-200 ms with `tmux send-keys`, and the latency is until the prompt line holding
  one more `§` has been written to the terminal. Only keys whose echo came before the answer's stats line count as
  "while streaming"; the same measurement with no answer running is the idle baseline. The decode rate is the answers'
  own `tokens_per_s` from the database.
- **Streaming keeps up**: the app runs with a hook (this file, `--app`) that logs, for every answer, the delay from the
  generation worker's last text to the moment the UI has it in the answer's Markdown, whether the displayed text then
  equals the recorded answer, and how late each batch of text was applied. Real answers (SmolLM2), and a stand-in
  engine that streams 4-character tokens at fixed rates (150, 400 and 1000 tok/s) to show the headroom.

Polling reads a file (no tmux client per poll), so measuring costs the 2 cores almost nothing; tmux's own forwarding
(send-keys → pane → pipe) is inside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(sys.executable).with_name("localmoe")
KEY = "§"
STORY = "Write a long story about a dragon who bakes bread in a small village."
FAKE_RATES = (150, 400, 1000)
# In the chat screen's first frame whether or not the model has loaded (the footer's F2 key). Not the prompt's
# placeholder: the focused prompt draws its cursor on its first letter, in another style, half the time.
FIRST_SCREEN = b"Conversations"
MAX_TYPED = 30  # keys in the prompt at once: all in view on 80 columns, also beside a notification toast


# --- the terminal --------------------------------------------------------------------------------------------------


class Pane:
    """A tmux pane on a private server whose output is appended to a file as it is written."""

    count = 0

    def __init__(self, work: Path, command: list[str], env: dict[str, str]) -> None:
        Pane.count += 1
        self.socket = f"localmoe-lat-{os.getpid()}-{Pane.count}"  # its own server: the last may still be ending
        self.out = work / f"pane-{Pane.count}.out"
        self.out.write_bytes(b"")
        conf = work / "tmux.conf"
        conf.write_text("set -g status off\nset -s escape-time 0\nset -g remain-on-exit on\n")
        envs = [f"{k}={v}" for k, v in env.items()]
        # the command waits for one Enter: the output pipe is attached before the app writes anything
        script = "read _; exec env " + " ".join(map(_q, envs + command))
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "b", "-x", "80", "-y", "24", "sh", "-c", script)
        self.tmux("pipe-pane", "-t", "b", "-o", f"cat >> {_q(str(self.out))}")
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()
        self._f = open(self.out, "rb")  # noqa: SIM115 - read as it grows, closed in close()
        self.data = b""

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "b", *(["-l"] if literal else []), *keys)

    def read(self) -> bytes:
        self.data += self._f.read()
        return self.data

    def wait_for(self, pattern: bytes | re.Pattern[bytes], start: int = 0, timeout: float = 60.0) -> tuple[float, int]:
        """(the time it appeared, where it ends in the output) for the first `pattern` after byte `start`."""
        deadline = time.perf_counter() + timeout
        while True:
            data = self.read()
            if isinstance(pattern, bytes):
                i = data.find(pattern, start)
                end = i + len(pattern) if i >= 0 else -1
            else:
                m = pattern.search(data, start)
                end = m.end() if m else -1
            if end >= 0:
                return time.perf_counter(), end
            if time.perf_counter() > deadline:
                screen = self.tmux("capture-pane", "-p", "-t", "b")
                raise TimeoutError(f"{pattern!r} did not appear in the terminal; it shows:\n{screen}")
            time.sleep(0.0005)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        Path(self.socket_path).unlink(missing_ok=True)  # tmux leaves the socket file behind
        self._f.close()


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def echo_pattern(n: int) -> re.Pattern[bytes]:
    """The prompt line as the terminal receives it with exactly n keys typed: a run of n `§` between two styles."""
    k = re.escape(KEY.encode())
    return re.compile(rb"m" + k * n + rb"\x1b")


# --- 1. start to first screen --------------------------------------------------------------------------------------


def start_times(n: int, work: Path) -> list[tuple[float, float]]:
    """(seconds to the first screen, seconds to the model loaded) per start; the first start is not counted."""
    out = []
    for i in range(n + 1):
        home = work / f"start-{i}"
        home.mkdir()
        pane = Pane(work, [str(ENTRY)], {"LOCALMOE_HOME": str(home)})
        try:
            time.sleep(0.3)  # the pane and its pipe settle before the clock starts
            t0 = time.perf_counter()
            pane.keys("Enter")
            t_screen, _ = pane.wait_for(FIRST_SCREEN)
            t_ready, _ = pane.wait_for(b"is ready")
            pane.keys("C-q")
        finally:
            pane.close()
        if i:
            out.append((t_screen - t0, t_ready - t0))
            print(f"start {i}: first screen {t_screen - t0:.3f} s, model ready {t_ready - t0:.3f} s", flush=True)
    return out


# --- 2. key-press-to-echo, 3. keeping up ---------------------------------------------------------------------------


def typing(pane: Pane, typed: int, rng: random.Random, until: float | None = None, count: int | None = None,
           stop: bytes | None = None, stop_from: int = 0) -> tuple[list[tuple[float, bool]], int]:
    """Send keys one at a time; each sample is (echo latency, before `stop` appeared). Returns them and the keys now
    in the prompt."""
    samples = []
    while ((count is None or len(samples) < count) and (until is None or time.perf_counter() < until)
           and typed < MAX_TYPED):
        start = len(pane.read())
        t0 = time.perf_counter()
        pane.keys(KEY, literal=True)
        typed += 1
        t1, _ = pane.wait_for(echo_pattern(typed), start, timeout=10)
        streaming = stop is None or pane.data.find(stop, stop_from) < 0
        samples.append((t1 - t0, streaming))
        if stop is not None and not streaming:
            break
        time.sleep(rng.uniform(0.08, 0.2))
    return samples, typed


def clear(pane: Pane, typed: int) -> None:
    if typed:
        pane.keys(*["BSpace"] * typed)
    time.sleep(0.3)


def echo_and_keeping_up(n_keys: int, work: Path, rate: int | None = None) -> dict[str, Any]:
    """Stories answered by the app (the embedded model, or the stand-in engine at `rate` tok/s), keys typed while they
    stream; the app's own log of how its display kept up."""
    home = work / f"echo-{rate or 'model'}"
    home.mkdir()
    log = work / f"keepup-{rate or 'model'}.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), "--app", str(log)]
    command += ["--rate", str(rate)] if rate else []
    pane = Pane(work, command, {"LOCALMOE_HOME": str(home)})
    rng = random.Random(7)
    streaming: list[float] = []
    idle: list[float] = []
    answers = 0
    try:
        time.sleep(0.3)
        pane.keys("Enter")
        pane.wait_for(b"is ready")
        time.sleep(0.5)
        if rate is None:  # the idle baseline, once: nothing is being answered
            samples, typed = typing(pane, 0, rng, count=max(10, n_keys // 2))
            idle = [s for s, _ in samples]
            clear(pane, typed)
        deadline = time.perf_counter() + 240
        while len(streaming) < n_keys and time.perf_counter() < deadline:
            pane.keys("C-n")  # a new chat: no earlier answer's stats line on screen to be taken for this one's
            time.sleep(0.2)
            start = len(pane.read())
            pane.keys(STORY, literal=True)
            pane.keys("Enter")
            answers += 1
            time.sleep(0.6)  # the prompt processed, text streaming
            samples, typed = typing(pane, 0, rng, until=time.perf_counter() + 60, stop=b"tok/s", stop_from=start)
            streaming += [s for s, during in samples if during]
            pane.wait_for(b"tok/s", start, timeout=120)
            clear(pane, typed)
        if rate is None:
            time.sleep(0.5)
        pane.keys("C-q")
        time.sleep(1.0)
    finally:
        pane.close()
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    tok_s = []
    if rate is None:
        conn = sqlite3.connect(home / "localmoe.db")
        tok_s = [r[0] for r in conn.execute("select tokens_per_s from generations where tokens_per_s is not null")]
        conn.close()
    return {"streaming": streaming, "idle": idle, "answers": answers, "keepup": rows, "tok_s": tok_s}


def ask_speed(work: Path, n: int = 2) -> list[float]:
    """The same story through `localmoe ask` (no UI): the decode rate this machine gives the model on its own."""
    rates = []
    for _ in range(n):
        r = subprocess.run([str(ENTRY), "ask", STORY, "--json", "--no-log"], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "LOCALMOE_HOME": str(work / "ask")})
        rates.append(json.loads(r.stdout)["timing"]["tokens_per_s"])
    return rates


# --- the app, with the keeping-up hook (run inside the pane) -------------------------------------------------------


def run_app(log: Path, rate: int | None) -> None:
    from textual.widgets import Markdown

    from localmoe.chat import session as session_module
    from localmoe.ui import chat
    from localmoe.ui.app import LocalmoeApp

    lock = threading.Lock()
    chunks: dict[int, list[tuple[float, int]]] = {}  # answer id -> (seconds late, chars applied)

    original_chunk_init = chat.ChatScreen.Chunk.__init__
    original_done_init = chat.ChatScreen.Done.__init__
    original_on_chunk = chat.ChatScreen.on_chat_screen_chunk
    original_on_done = chat.ChatScreen.on_chat_screen_done

    def chunk_init(self, answer, text):  # in the generation worker, as the text leaves it
        original_chunk_init(self, answer, text)
        self.posted = time.perf_counter()

    def done_init(self, answer, text, stats, status, *args, **kw):
        original_done_init(self, answer, text, stats, status, *args, **kw)
        self.posted = time.perf_counter()

    async def on_chunk(self, message):
        await original_on_chunk(self, message)
        with lock:
            chunks.setdefault(id(message.answer), []).append((time.perf_counter() - message.posted,
                                                              len(message.text)))

    async def on_done(self, message):
        await original_on_done(self, message)
        shown = time.perf_counter()
        answer = message.answer
        final = self.last[1].text if self.last is not None and self.last[2] is answer else None
        late = chunks.pop(id(answer), [])
        row = {"status": message.status, "tokens": message.stats.completion_tokens if message.stats else None,
               "tokens_per_s": message.stats.tokens_per_s if message.stats else None,
               "end_lag_s": shown - message.posted, "complete": final is not None
               and answer.query_one(Markdown).source == final == answer.text,
               "chars": len(final or ""), "chunks": len(late), "chunk_lag_max_s": max((s for s, _ in late), default=0),
               "chunk_lag_median_s": statistics.median([s for s, _ in late]) if late else 0}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")

    chat.ChatScreen.Chunk.__init__ = chunk_init
    chat.ChatScreen.Done.__init__ = done_init
    chat.ChatScreen.on_chat_screen_chunk = on_chunk
    chat.ChatScreen.on_chat_screen_done = on_done
    if rate:
        real = session_module.create_engine
        session_module.create_engine = lambda model, **kw: StandIn(real(model, **kw), rate)
    LocalmoeApp().run()


class StandIn:
    """The real engine's identity with a text stream of fixed speed: 4-character tokens at `rate` per second, as many
    as the answer budget allows."""

    def __init__(self, engine: Any, rate: int) -> None:
        from localmoe.engine import GenerationStats

        self._engine, self.rate = engine, rate
        self.model_id, self.backend, self.plan, self.routing, self.telemetry = engine.model_id, "stand-in", None, (), 0
        self._stats = GenerationStats()

    def load(self) -> None:
        pass  # the real weights are not needed

    def stream(self, messages, config, cancel=None):
        from localmoe.engine import GenerationStats

        words = "the dragon kneads the dough and the whole village waits for bread ".split()
        self._stats = s = GenerationStats(prompt_tokens=len(messages))
        t0 = time.perf_counter()
        for i in range(max(config.max_tokens, self.rate * 6)):  # about six seconds of text to type against
            if cancel is not None and cancel.is_set():
                s.stop_reason = "cancelled"
                break
            wait = t0 + (i + 1) / self.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            s.completion_tokens += 1
            if i == 0:
                s.ttft_s = time.perf_counter() - t0
            yield (words[i % len(words)] + " ") if i % 40 != 39 else "bread.\n\n"
        else:
            s.stop_reason = "length"
        s.wall_s = time.perf_counter() - t0
        if s.completion_tokens > 1 and s.ttft_s is not None:
            s.tokens_per_s = (s.completion_tokens - 1) / (s.wall_s - s.ttft_s)

    @property
    def stats(self):
        return self._stats

    @property
    def warnings(self) -> list[str]:
        return []

    def cache_stats(self) -> None:
        return None

    def moe_shape(self) -> None:
        return None

    def close(self) -> None:
        self._engine.close()


# --- report --------------------------------------------------------------------------------------------------------


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=20) if len(values) >= 2 else values * 19
    return f"{statistics.median(values) * 1000:.0f} / {q[18] * 1000:.0f} / {max(values) * 1000:.0f}"


def keepup_line(name: str, rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["status"] == "complete"]
    rate = statistics.median([r["tokens_per_s"] for r in done if r["tokens_per_s"]]) if done else 0
    return (f"| {name} | {len(done)} | {rate:.0f} | {sum(r['complete'] for r in done)}/{len(done)} | "
            f"{max((r['end_lag_s'] for r in done), default=0) * 1000:.0f} | "
            f"{statistics.median([r['chunk_lag_median_s'] for r in done]) * 1000 if done else 0:.1f} | "
            f"{max((r['chunk_lag_max_s'] for r in done), default=0) * 1000:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--keys", type=int, default=60, help="keys to time while answers stream")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--app", type=Path, help=argparse.SUPPRESS)  # inside the pane: the app with the keeping-up hook
    ap.add_argument("--rate", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.app:
        run_app(args.app, args.rate)
        return
    if shutil.which("tmux") is None:
        sys.exit("tmux is needed")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tui-latency-") as tmp:
        work = Path(tmp)
        starts = start_times(args.starts, work)
        model = echo_and_keeping_up(args.keys, work)
        alone = ask_speed(work)
        fake = {rate: echo_and_keeping_up(max(10, args.keys // 3), work, rate) for rate in FAKE_RATES}
    screen = [s for s, _ in starts]
    ready = [r for _, r in starts]
    print(f"first screen: median {statistics.median(screen):.3f} s (min {min(screen):.3f}, max {max(screen):.3f}); "
          f"model ready: median {statistics.median(ready):.3f} s")
    print(f"echo while streaming ({len(model['streaming'])} keys over {model['answers']} answers at "
          f"{statistics.median(model['tok_s']) if model['tok_s'] else 0:.0f} tok/s): median/p95/max ms "
          f"{ms(model['streaming'])}; idle {ms(model['idle'])}")
    print(f"`ask` alone: {statistics.median(alone):.0f} tok/s")
    for rate, r in fake.items():
        print(f"stand-in {rate} tok/s: echo {ms(r['streaming'])} ms over {len(r['streaming'])} keys")
    for name, rows in [("SmolLM2", model["keepup"])] + [(f"stand-in {k}", v["keepup"]) for k, v in fake.items()]:
        print(keepup_line(name, rows))
    if not args.write:
        return
    from common import write_section

    cores = os.cpu_count()
    tok_s = statistics.median(model["tok_s"]) if model["tok_s"] else 0
    echo_rows = "\n".join(
        [f"| idle (no answer) | {len(model['idle'])} | {ms(model['idle'])} |",
         f"| SmolLM2 streaming, {tok_s:.0f} tok/s | {len(model['streaming'])} | {ms(model['streaming'])} |"]
        + [f"| stand-in streaming, {rate} tok/s | {len(r['streaming'])} | {ms(r['streaming'])} |"
           for rate, r in fake.items()])
    keep_rows = "\n".join(keepup_line(name, rows) for name, rows in
                          [("SmolLM2", model["keepup"])] + [(f"stand-in {k} tok/s", v["keepup"])
                                                             for k, v in fake.items()])
    median_echo = statistics.median(model["streaming"]) * 1000 if model["streaming"] else float("nan")
    first = statistics.median(screen)
    write_section("tui_latency", f"""
## The chat UI in a terminal: start, key echo while streaming, keeping up (issue #17)

Command: `.venv/bin/python benchmarks/tui_latency.py --starts {args.starts} --keys {args.keys} --write`
({time.strftime('%Y-%m-%d')}, {cores} cores, load average {load:.1f} when it began; tmux 80×24, the pane's output read
from `pipe-pane` as it is written; the file's docstring says what each figure spans).

**Start to first screen (warm)**: `.venv/bin/localmoe` exec'd in the pane until the chat's first frame is on the
terminal, {len(screen)} starts: median **{first:.2f} s** (min {min(screen):.2f}, max {max(screen):.2f}); target
≤ 1.0 s: {'met' if first <= 1.0 else 'not met'}. The model is loaded (its "is ready" line) at a median
{statistics.median(ready):.2f} s; the prompt takes keys before that.

**Key press to echo** in the prompt, from `tmux send-keys` until the prompt line with the key reaches the terminal
(ms: median / p95 / max). Target ≤ 50 ms median while an answer streams at full speed: **{median_echo:.0f} ms**,
{'met' if median_echo <= 50 else 'not met'}. Full speed: the chat's SmolLM2 answers decoded at {tok_s:.0f} tok/s
while keys were typed; the same story through `localmoe ask` (no UI, no keys) decoded at
{statistics.median(alone):.0f} tok/s just after. The stand-in engine streams text at a fixed rate with no model
behind it: it isolates what the UI's rendering costs as text arrives faster.

| while | keys | echo ms (median / p95 / max) |
|---|---|---|
{echo_rows}

**Streaming keeps up**: per answer, from the generation worker's last text to the UI holding the whole answer in its
Markdown ("end lag"), whether the displayed text then equals the recorded answer ("complete"), and how late the
batches of text (ten a second) were applied.

| engine | answers | tok/s | complete | end lag max ms | batch lag median ms | batch lag max ms |
|---|---|---|---|---|---|---|
{keep_rows}
""")


if __name__ == "__main__":
    main()
