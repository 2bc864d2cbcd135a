"""Text snapshots of every screen at 80×24 (chat, conversations F2, settings F3, models F4, hardware F5, benchmarks
F6), so that a layout regression (a widget that moves, shrinks, wraps or is cut
off) fails a test.

Each screen is rendered the way `export_screenshot` renders it, as text (`test_models_ui.screen_lines`), and compared
with `tests/snapshots/<name>.txt`. After a deliberate layout change, regenerate them and review the diff:

    LOCALMOE_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_snapshots.py

Nothing on screen may depend on the machine or the day, since CI runs elsewhere: the hardware is a fixed fake (which
also fixes every plan and verdict), model discovery is off, the data dir has a fixed-length name that is masked, the
conversations and their dates come from a database this test writes, and no generated text is shown (the chat shows
a recorded conversation and an answer whose text and figures the test sets). Colours are not compared: text only.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from test_models_ui import screen_lines
from test_tui import wait_for
from textual.widgets import DataTable

from localmoe.engine import GenerationStats
from localmoe.experts.trace import TraceToken
from localmoe.placement import hardware
from localmoe.record.meters import EnergyReading
from localmoe.record.recorder import Recorder
from localmoe.routing.router import Decision
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen, Question

SNAPSHOTS = Path(__file__).with_name("snapshots")
UPDATE_ENV = "LOCALMOE_UPDATE_SNAPSHOTS"
SIZE = (80, 24)
MODEL = "smollm2-135m-instruct"
HOME_PREFIX = "localmoe-snap-"
HOME_MASK = f"/tmp/{HOME_PREFIX}XXXXXXXX"  # mkdtemp's names: the prefix and 8 characters
GiB = 1024**3

# A machine that no test machine is: every screen that shows or plans for the hardware sees this one.
FAKE_HARDWARE = hardware.Hardware(
    os="Linux 6.8.0", arch="x86_64", cpu_model="Snapshot CPU 8-Core Processor", physical_cores=8, logical_cores=16,
    ram_total_bytes=32 * GiB, ram_available_bytes=24 * GiB, swap_total_bytes=0, swap_free_bytes=0, gpus=[],
    data_dir="/home/user/.local/share/localmoe", disk_free_bytes=200 * GiB, fingerprint="snapshot")


@pytest.fixture
def fixed_home(monkeypatch) -> Path:
    """A data dir whose path has the same length on every machine (masked in the snapshots), on a fake machine."""
    d = Path(tempfile.mkdtemp(prefix=HOME_PREFIX, dir="/tmp"))
    assert len(str(d)) == len(HOME_MASK), d
    monkeypatch.setenv("LOCALMOE_HOME", str(d))
    monkeypatch.setenv("LOCALMOE_DISCOVER", "0")  # the models other apps keep on this machine
    monkeypatch.setattr(hardware, "detect", lambda measure=True: copy.deepcopy(FAKE_HARDWARE))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def check(shots: dict[str, list[str]], home: Path) -> None:
    """Compare each screen's text with its snapshot (or write them, with LOCALMOE_UPDATE_SNAPSHOTS=1); one failure
    lists every screen that differs, with its diff."""
    problems = []
    for name, lines in shots.items():
        text = "\n".join(line.rstrip() for line in lines).replace(str(home), HOME_MASK) + "\n"
        path = SNAPSHOTS / f"{name}.txt"
        if os.environ.get(UPDATE_ENV) == "1":
            SNAPSHOTS.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
        elif not path.exists():
            problems.append(f"no snapshot {path.name} yet: run with {UPDATE_ENV}=1 and review it")
        elif text != (want := path.read_text(encoding="utf-8")):
            problems.append("\n".join(difflib.unified_diff(want.splitlines(), text.splitlines(),
                                                           f"snapshots/{name}.txt", f"{name} now", lineterm="")))
    if problems:
        pytest.fail(f"{len(problems)} screen(s) differ from their snapshots ({UPDATE_ENV}=1 rewrites them after a "
                    "deliberate change):\n" + "\n".join(problems), pytrace=False)


def write_conversations(home: Path) -> int:
    """Three recorded chats with fixed dates and joules; returns the id of the one the chat screen resumes."""
    home.mkdir(parents=True, exist_ok=True)
    chats = [
        ("Which city is the capital of Japan?", "The capital of Japan is **Tokyo**.", 0.42, 1),
        ("Name three primary colours", "Red, yellow and blue.", 0.31, 0),
        ("A packing list for a weekend of hiking in the mountains, with a tent",
         "- tent and sleeping bag\n- water filter\n- warm layers", 2.5, 0),
    ]
    with Recorder() as rec:
        ids = []
        for question, answer, joules, measured in chats:
            cid = rec.new_conversation(MODEL, title=question[:80])
            q = rec.add_message(cid, "user", question)
            a = rec.add_message(cid, "assistant", "", model=MODEL, status="pending", reply_to=q)
            rec.finish_message(a, answer, "complete", {"model": MODEL, "completion_tokens": 9},
                               {"joules": joules, "measured": measured})
            ids.append(cid)
    conn = sqlite3.connect(home / "localmoe.db")
    with conn:
        for n, cid in enumerate(ids):
            when = f"2025-03-0{n + 1}T09:1{n}:00.000+00:00"
            conn.execute("update conversations set created_at = ? where id = ?", (when, cid))
            conn.execute("update messages set created_at = ?, completed_at = ? where conversation_id = ?",
                         (when, when, cid))
    conn.close()
    return ids[0]


def fixed_last_run() -> dict:
    """What the hardware screen shows after an answer on a small MoE (3 layers × 8 experts, top-2, native engine)."""
    routing = [TraceToken(pos, 0, "prompt" if pos < 4 else "decode",
                          [[pos % 8, (pos * 3 + layer) % 8] for layer in range(3)]) for pos in range(12)]
    layers = [{"hit_rate": 0.75, "misses": 6, "prefetch_hits": 2, "prefetches": 4} for _ in range(3)]
    experts = {"slots": 4, "policy": "lru", "prefetch": True, "hit_rate": 0.75, "misses": 18, "prefetch_hits": 6,
               "bytes_read": 48 * 1024**2, "bytes_copied": 0, "stall_s": 0.05, "decode_step": "native",
               "expert_kernel": "packed", "expert_dtype": "q8_0", "device": "cpu", "compiled": False,
               "layers": layers}
    stats = GenerationStats(prompt_tokens=4, completion_tokens=8, prompt_eval_tokens=4, wall_s=0.5)
    per_expert = [{"hits": [3, 2, 3, 2, 2, 2, 2, 2], "misses": [1, 1, 1, 1, 1, 1, 0, 0],
                   "prefetch_hits": [1, 0, 0, 1, 0, 0, 0, 0]} for _ in range(3)]
    return {"model": "tiny-moe", "backend": "torch", "stats": stats, "experts": experts, "routing": routing,
            "shape": (3, 8, 2), "plan": None, "per_expert": per_expert}


async def settle(pilot, app) -> None:
    """No toasts (their timing is not the layout's) and nothing left to lay out."""
    app.clear_notifications()
    await pilot.pause(0.2)


def test_every_screen_matches_its_snapshot(fixed_home):
    home = fixed_home
    resumed = write_conversations(home)
    (home / "settings.toml").write_text('[tiers]\nsmall = "smollm2-135m-instruct"\n[router]\npreference = 0.3\n'
                                        'strategy = "features"\n[privacy]\nrecord = true\n[energy]\n'
                                        'meter = "estimate"\n')
    (home / "settings.toml").chmod(0o600)
    shots: dict[str, list[str]] = {}

    async def run() -> None:
        app = LocalmoeApp()
        async with app.run_test(size=SIZE) as pilot:
            chat = app.screen
            assert isinstance(chat, ChatScreen)
            # loaded, and the router warmed (until then a resume says the model is still loading)
            await wait_for(pilot, lambda: chat.sub_title == MODEL and chat._ready.is_set())

            # the chat: a recorded exchange, then an answer as it looks once finished, with fixed figures
            await chat.resume(resumed)
            view = chat.query_one("#conversation")
            await view.mount(Question("What is 4821 * 317?", markup=False))
            answer = Answer(MODEL)
            await view.mount(answer)
            await answer.append("4821 × 317 = 1,528,257.")
            answer.finish(
                GenerationStats(prompt_tokens=41, completion_tokens=12, prompt_eval_tokens=41, ttft_s=0.06,
                                tokens_per_s=104.2, wall_s=0.18),
                "complete",
                energy=EnergyReading(joules=0.8, seconds=0.18, avg_watts=4.4, peak_watts=5.0,
                                     meter="estimate(cpu-time: 5 W + 4 W/core)", measured=False),
                decision=Decision("small", MODEL, "features", 0.93, 0.5, "arithmetic on big numbers", 0.4,
                                  warning="the small model answered; estimated 93% likely wrong"))
            view.scroll_end(animate=False)
            await settle(pilot, app)
            shots["chat"] = screen_lines(app)

            await pilot.press("f2")
            await wait_for(pilot, lambda: app.screen is not chat and app.screen.query(DataTable))
            await settle(pilot, app)
            shots["conversations"] = screen_lines(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is chat)

            await pilot.press("f3")
            await wait_for(pilot, lambda: app.screen is not chat)
            await settle(pilot, app)
            shots["settings"] = screen_lines(app)
            settings_screen = app.screen
            settings_screen.query_one("#router-preference").value = "2"  # refused: the error line stays in view
            await pilot.press("ctrl+s")
            settings_screen.query_one("#settings").scroll_end(animate=False)
            await settle(pilot, app)
            shots["settings_end"] = screen_lines(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is chat)

            await pilot.press("f4")
            await wait_for(pilot, lambda: app.screen is not chat and getattr(app.screen, "rows", None))
            models_screen = app.screen
            table = models_screen.query_one(DataTable)
            # a catalog row: the embedded model's detail line names where its file lies on this machine
            table.move_cursor(row=next(i for i, m in enumerate(models_screen.rows) if m.source == "catalog"))
            await settle(pilot, app)
            shots["models"] = screen_lines(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is chat)

            chat.last_run = fixed_last_run()
            await pilot.press("f5")
            await wait_for(pilot, lambda: app.screen is not chat and app.screen.hardware is not None)
            await settle(pilot, app)
            shots["hardware"] = screen_lines(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is chat)

            # the benchmarks screen before any run: the suites and models are listed in a worker
            await pilot.press("f6")
            await wait_for(pilot, lambda: app.screen is not chat and app.screen.query("#bench-models")
                           and app.screen.query_one("#bench-models").option_count > 0)
            await settle(pilot, app)
            shots["benchmarks"] = screen_lines(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is chat)

    asyncio.run(run())
    check(shots, home)
