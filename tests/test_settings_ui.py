"""The settings screen through Textual's pilot: what it writes is what the CLI reads, and the next question uses it."""

from __future__ import annotations

import asyncio
import tomllib

from test_tui import type_and_send, wait_for
from textual.widgets import Input, Select, Static

from localmoe.engine import GenerationConfig
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen
from localmoe.ui.settings_screen import SettingsScreen


def test_a_tier_change_is_written_and_used_by_the_next_question(home, tiny_moe):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nallow_remote = false\n[router]\npreference = 0.99\n')

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            await type_and_send(pilot, "Which city is the capital of Japan?")
            await wait_for(pilot, lambda: chat.query(Answer) and chat.query(Answer)[0].done)
            assert chat.query(Answer)[0].decision.tier == "small"
            conversation = chat.assistant.conversation_id

            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
            screen = app.screen
            assert screen.query_one("#router-preference", Input).value == "0.99"
            screen.query_one("#router-preference", Input).value = "2"  # out of range: a one-line error, no write
            await pilot.press("ctrl+s")
            error = str(screen.query_one("#settings-error", Static).render())
            assert "between 0 and 1" in error and "\n" not in error and app.screen is screen
            assert "0.99" in (home / "settings.toml").read_text()
            screen.query_one("#tiers-large", Input).value = str(tiny_moe[1])
            screen.query_one("#router-preference", Input).value = "0.001"  # everything goes to the large tier
            screen.query_one("#router-strategy", Select).value = "features"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

            await type_and_send(pilot, "And of Italy?")
            await wait_for(pilot, lambda: len(chat.query(Answer)) == 2 and chat.query(Answer)[1].done)
            second = chat.query(Answer)[1]
            assert second.decision.tier == "large" and second.model == "tiny-moe"
            assert chat.assistant.conversation_id == conversation  # the chat went on across the change

    asyncio.run(run())
    written = tomllib.loads((home / "settings.toml").read_text())
    assert written == {"tiers": {"allow_remote": False, "large": str(tiny_moe[1])},
                       "router": {"preference": 0.001, "strategy": "features"}}
