"""Nothing cut off at 80 columns: the footer leaves out whole keys (which still work) rather than cutting one, and
an answer's stats line wraps between its figures, never inside one. On the real chat screen and embedded model."""

from __future__ import annotations

import asyncio

from test_models_ui import screen_lines
from test_tui import type_and_send, wait_for
from textual.widgets import Static

from localmoe.chat.display import SEPARATOR, wrap_figures
from localmoe.engine import GenerationConfig
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen
from localmoe.ui.footer import FitFooter, FooterKey, key_width

FIGURES = ["smollm2-135m-instruct", "12 tokens", "104.2 tok/s", "first token 0.06 s (40 prompt tokens reused)",
           "~0.8 J"]


def test_figures_wrap_between_figures_and_a_long_one_alone():
    for width in (24, 30, 48, 60, 80, 200):
        lines = wrap_figures(FIGURES, width)
        assert all(len(line) <= width for line in lines), (width, lines)
        if width >= max(map(len, FIGURES)):  # every figure fits a line: each stays whole, in order
            assert SEPARATOR.join(lines) == SEPARATOR.join(FIGURES), (width, lines)
        else:
            # nothing lost or reordered: the same words, the separators aside
            assert [w for w in " ".join(lines).split() if w != "·"] == " ".join(FIGURES).split()
    assert wrap_figures(FIGURES, 200) == [SEPARATOR.join(FIGURES)]
    assert wrap_figures(FIGURES, 48) == ["smollm2-135m-instruct · 12 tokens · 104.2 tok/s",
                                         "first token 0.06 s (40 prompt tokens reused)", "~0.8 J"]
    assert wrap_figures([], 10) == [""]


def footer_keys(app) -> list[FooterKey]:
    return [k for k in app.screen.query_one(FitFooter).query(FooterKey) if not k.has_class("-command-palette")]


def test_the_footer_shows_whole_keys_at_80_columns_and_every_key_at_200(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=24, temperature=0.0))
        async with app.run_test(size=(200, 60)) as pilot:
            chat = app.screen
            assert isinstance(chat, ChatScreen)
            listed = {b.action.split("(")[0] for b in chat.BINDINGS if b.show} | {"quit"}

            def shown() -> set[str]:
                return {k.action.split("(")[0] for k in footer_keys(app)}

            await wait_for(pilot, lambda: listed <= shown(), timeout=30)  # the footer lays out after the screen
            wide = shown()
            assert "Stop answer" in screen_lines(app)[-1]

            await pilot.resize_terminal(80, 24)
            await wait_for(pilot, lambda: len(footer_keys(app)) < len(wide))
            await pilot.pause(0.3)
            keys = footer_keys(app)
            shown = {k.action for k in keys}
            assert {"conversations", "settings", "models", "hardware", "benchmarks"} <= shown
            assert "stop" not in shown and "new_conversation" not in shown  # the first to go: the input names them
            last = screen_lines(app)[-1]
            for k in keys:  # each key whole on the last line, none under the palette key at the right edge
                assert f"{k.key_display} {k.description}" in last
                assert k.region.right <= app.screen.query_one(".-command-palette").region.x
            assert sum(map(key_width, keys)) <= 80 - key_width(app.screen.query_one(".-command-palette"))

            # an answer at 80 columns: its stats line breaks between figures; a key not shown still works
            await type_and_send(pilot, "What is the capital of France?")
            answer = chat.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            await pilot.pause(0.2)
            stats = answer.query_one(".stats", Static)
            lines = str(stats.render()).split("\n")
            assert lines == wrap_figures(stats.parts, stats.content_size.width)
            assert all(len(line) <= stats.content_size.width for line in lines)
            assert stats.size.height == len(lines)
            shown_text = "\n".join(screen_lines(app))
            for part in stats.parts:
                assert part in shown_text, part  # every figure on one line of the screen
            await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: not chat.query(Answer))

    asyncio.run(run())
