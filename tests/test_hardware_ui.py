"""The hardware and experts screen through Textual's pilot, after answers from real engines: the tiny MoE on llama.cpp
(routing telemetry turned on from the screen), the same weights on the native torch engine (its cache statistics),
and the embedded dense model (one line: no expert statistics)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter

from test_models_ui import screen_lines
from test_tui import type_and_send, wait_for
from textual.widgets import Static

from localmoe.engine import GenerationConfig
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen
from localmoe.ui.hardware_screen import SHADES, HardwareScreen


async def open_hardware(pilot, app) -> HardwareScreen:
    await pilot.press("f5")
    await wait_for(pilot, lambda: isinstance(app.screen, HardwareScreen) and app.screen.hardware is not None)
    return app.screen


async def ask(pilot, chat, question: str) -> Answer:
    n = len(chat.query(Answer))
    await type_and_send(pilot, question)
    await wait_for(pilot, lambda: len(chat.query(Answer)) == n + 1 and chat.query(Answer)[n].done)
    return chat.query(Answer)[n]


def summary(screen: HardwareScreen) -> str:
    return str(screen.query_one("#experts-summary", Static).render())


def uses(routing) -> dict[tuple[int, int], int]:
    """The test's own count of the engine's telemetry: (layer, expert) -> tokens routed there."""
    return Counter((layer, e) for t in routing for layer, experts in enumerate(t.experts) for e in experts)


def test_llama_cpp_moe_heat_map_counts_its_routing_once_telemetry_is_on(home, tiny_moe):
    (home / "models").mkdir(parents=True)
    shutil.copy(tiny_moe[1], home / "models" / "tiny-moe.gguf")

    async def run() -> None:
        app = LocalmoeApp(model="tiny-moe", config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            screen = await open_hardware(pilot, app)
            assert "No answer yet" in summary(screen)
            hw = "\n".join(screen_lines(app))
            assert "RAM" in hw and "available of" in hw and "free in" in hw and "Memory bandwidth" in hw
            await pilot.press("escape")

            await ask(pilot, chat, "Which city is the capital of Japan?")  # telemetry off: nothing to show
            screen = await open_hardware(pilot, app)
            line = summary(screen)
            assert line.startswith("No expert statistics for tiny-moe") and "\n" not in line
            assert "t turns it on" in line and screen.counts is None
            await pilot.press("t")
            assert chat.telemetry
            await pilot.press("escape")

            await ask(pilot, chat, "And of Italy?")
            engine = chat.assistant.session_for("small").engine
            assert engine.telemetry and engine.routing
            screen = await open_hardware(pilot, app)
            assert screen.counts is not None and len(screen.counts) == 3  # layers
            assert all(len(row) == 8 for row in screen.counts)  # experts
            counted = uses(engine.routing)
            assert {(la, e): c for la, row in enumerate(screen.counts) for e, c in enumerate(row) if c} == counted
            assert "Routing telemetry" in summary(screen) and f"{len(engine.routing)} tokens" in summary(screen)
            # every layer's row is on an 80x24 screen, the hottest cell drawn full
            lines = screen_lines(app)
            rows = [v for v in lines if v.split() and v.split()[0] in ("L0", "L1", "L2")]
            assert len(rows) == 3 and SHADES[-1] in "".join(rows)
            for layer, row in enumerate(rows):
                assert f"{sum(screen.counts[layer])} uses" in row

    asyncio.run(run())


def test_native_engine_heat_map_matches_its_cache_statistics(home, tiny_moe):
    async def run() -> None:
        app = LocalmoeApp(model=str(tiny_moe[0]), config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(200, 60)) as pilot:
            chat = app.screen
            await ask(pilot, chat, "Which city is the capital of Japan?")  # no telemetry: the cache per layer
            engine = chat.assistant.session_for("small").engine
            stats = engine.cache_stats()
            screen = await open_hardware(pilot, app)
            # without telemetry the map is the cache's own count per expert: hits and misses together
            assert "shade is its expert's uses (cache hits and misses)" in summary(screen)
            shown = "\n".join(screen_lines(app))
            for row, s in zip(screen.counts, stats["layers"], strict=True):
                assert sum(row) == s["hits"] + s["warm_hits"] + s["misses"] > 0
                assert f"{sum(row)} uses · hit {s['hit_rate']:.0%} · {s['misses']} miss" in shown
            for view, key in (("misses", "misses"), ("hits", "hits"), ("prefetch hits", "prefetch_hits")):
                await pilot.press("v")
                await pilot.pause()
                assert screen.view == view and f"shade is its expert's {view} (" in summary(screen)
                assert [sum(row) for row in screen.counts] == [s[key] + (s["warm_hits"] if key == "misses" else 0)
                                                               for s in stats["layers"]]
            await pilot.press("v")  # back to uses
            await pilot.pause()
            assert screen.view == "uses"
            await pilot.press("t")
            await pilot.press("escape")
            await ask(pilot, chat, "And of Italy?")
            assert engine.backend == "torch"
            stats = engine.cache_stats()
            screen = await open_hardware(pilot, app)
            assert len(screen.counts) == len(stats["layers"]) == 3
            counted = uses(engine.routing)
            prompt = [t for t in engine.routing if t.phase == "prompt"]
            decoded = [t for t in engine.routing if t.phase == "decode"]
            for layer, (row, s) in enumerate(zip(screen.counts, stats["layers"], strict=True)):
                assert all(c == counted.get((layer, e), 0) for e, c in enumerate(row))
                assert sum(row) == s["experts_used"]  # (token, expert) pairs computed
                # the cache is asked once per expert a step uses: the prompt in one step, then each decoded token
                fetches = len({e for t in prompt for e in t.experts[layer]}) + sum(len(t.experts[layer])
                                                                                   for t in decoded)
                assert s["hits"] + s["warm_hits"] + s["misses"] == fetches
                # and per expert: the cache's hits and misses of each expert add up to the times a step asked for it
                per = chat.last_run["per_expert"][layer]
                for e in range(len(row)):
                    asked = (e in {x for t in prompt for x in t.experts[layer]}) + sum(
                        t.experts[layer].count(e) for t in decoded)
                    assert per["hits"][e] + per["misses"][e] == asked, (layer, e)
            text = summary(screen)
            assert f"{stats['slots']} slots per layer" in text and f"Decode path: {stats['decode_step']} step" in text
            assert "stalled" in text and "per token" in text
            shown = "\n".join(screen_lines(app))
            assert all(f"{sum(row)} uses · hit " in shown for row in screen.counts)

    asyncio.run(run())


def test_a_dense_model_says_so_in_one_line_and_the_view_follows_answers(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            screen = await open_hardware(pilot, app)
            assert "Hardware" in {c.title for c in app.get_system_commands(chat)}
            assert {"Refresh", "Telemetry on", "Measure bandwidth"} <= {
                c.title for c in app.get_system_commands(screen)}
            await pilot.press("escape")
            await type_and_send(pilot, "Which city is the capital of Japan?")
            await pilot.press("f5")  # opened while the answer is written: it follows when the answer ends
            await wait_for(pilot, lambda: isinstance(app.screen, HardwareScreen))
            screen = app.screen
            await wait_for(pilot, lambda: chat.query(Answer)[0].done and "No expert statistics" in summary(screen))
            line = summary(screen)
            assert line == ("No expert statistics: the last answer came from smollm2-135m-instruct on llama.cpp, "
                            "which is not a mixture of experts.")
            assert not screen.query_one("#heatmap-grid").display
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

    asyncio.run(run())


def test_the_view_follows_an_answer_on_the_native_engine_while_it_is_written(home, tiny_moe, monkeypatch):
    from localmoe.engine.torch_moe.engine import TorchMoEEngine
    from localmoe.ui import hardware_screen

    monkeypatch.setattr(hardware_screen, "LIVE_INTERVAL_S", 0.05)
    # The answer holds after its first piece until the test has seen the view follow it: neither how fast a machine
    # decodes nor when the random model's greedy path meets an end token (which moves with the CPU's float
    # arithmetic) may decide whether the answer is still being written when the view looks. A CI machine once
    # ended the answer before the first look.
    seen = threading.Event()
    stream = TorchMoEEngine._stream

    def held_stream(self, messages, config, cancel):
        for i, piece in enumerate(stream(self, messages, config, cancel)):
            if i == 0:
                assert seen.wait(60), "the view never followed the answer"
            yield piece

    monkeypatch.setattr(TorchMoEEngine, "_stream", held_stream)

    async def run() -> None:
        app = LocalmoeApp(model=str(tiny_moe[0]), config=GenerationConfig(max_tokens=64, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            chat = app.screen
            screen = await open_hardware(pilot, app)
            await pilot.press("t")
            await pilot.press("escape")
            await type_and_send(pilot, "Tell me a long story about a lighthouse.")
            screen = await open_hardware(pilot, app)
            try:
                await wait_for(pilot, lambda: summary(screen).startswith("Answering now") or not chat.generating)
                assert chat.generating, "the answer ended before the view followed it"
                assert screen.counts is not None and sum(map(sum, screen.counts)) > 0
                live_uses = sum(map(sum, screen.counts))
            finally:
                seen.set()
            await wait_for(pilot, lambda: not chat.generating and summary(screen).startswith("Last answer"))
            assert sum(map(sum, screen.counts)) >= live_uses
            assert sum(map(sum, screen.counts)) == sum(len(e) for t in chat.last_run["routing"] for e in t.experts)

    asyncio.run(run())
