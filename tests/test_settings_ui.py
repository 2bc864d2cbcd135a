"""The settings screen through Textual's pilot: what it writes is what the CLI reads, and the next question uses it.
Recording and the energy meter are checked against the real SQLite file and the CLI's `ask` too."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tomllib

import pytest
from test_tui import type_and_send, wait_for
from textual.widgets import Input, Select, Static, Switch

from helpers import advancing_rapl, run_cli
from localmoe.engine import GenerationConfig
from localmoe.errors import LocalmoeError
from localmoe.home import settings
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import OFF_THE_RECORD, Answer, ChatScreen
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
            assert "must be in (0, 1)" in error and "\n" not in error and app.screen is screen
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


def write_settings(home, text: str) -> None:
    """settings.toml as the user (or the screen) leaves it: private, so no command adds a notice about its mode."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(text)
    (home / "settings.toml").chmod(0o600)


def messages(db) -> list[tuple[str, str]]:
    """(role, content) of every message row in the real database file; none when the file was never made."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        return conn.execute("select role, content from messages order by id").fetchall()
    finally:
        conn.close()


async def ask(pilot, chat, question: str) -> Answer:
    n = len(chat.query(Answer))
    await type_and_send(pilot, question)
    await wait_for(pilot, lambda: len(chat.query(Answer)) == n + 1 and chat.query(Answer)[n].done)
    return chat.query(Answer)[n]


async def open_settings(pilot, app) -> SettingsScreen:
    await pilot.press("f3")
    await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
    return app.screen


def test_recording_off_in_settings_keeps_tui_answers_out_of_the_database_until_turned_on(home):
    write_settings(home, "[privacy]\nrecord = false\n")
    db = home / "localmoe.db"

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            await wait_for(pilot, lambda: chat.sub_title == "smollm2-135m-instruct" + OFF_THE_RECORD)
            assert chat.active_bindings["ctrl+o"].binding.description == "Record again"
            off = await ask(pilot, chat, "Name a colour.")
            assert off.status == "complete" and off.text.strip() and off.energy is not None
            assert messages(db) == []  # answered and shown, nothing in the real file

            screen = await open_settings(pilot, app)
            switch = screen.query_one("#privacy-record", Switch)
            assert switch.value is False
            switch.value = True
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen is chat and chat.sub_title == "smollm2-135m-instruct")
            assert chat.active_bindings["ctrl+o"].binding.description == "Off the record"
            on = await ask(pilot, chat, "Name a fruit.")
            assert on.status == "complete"

    asyncio.run(run())
    rows = messages(db)
    assert [r for r in rows if r[0] == "user"] == [("user", "Name a fruit.")] and len(rows) == 2
    assert tomllib.loads((home / "settings.toml").read_text()) == {"privacy": {"record": True}}


def test_turning_recording_off_in_settings_applies_to_the_next_question_and_ctrl_o_still_overrides(home):
    db = home / "localmoe.db"

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            await ask(pilot, chat, "Name a colour.")  # recorded: the default
            screen = await open_settings(pilot, app)
            assert screen.query_one("#privacy-record", Switch).value is True
            screen.query_one("#privacy-record", Switch).value = False
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: chat.sub_title == "smollm2-135m-instruct" + OFF_THE_RECORD)
            await ask(pilot, chat, "Name a fruit.")  # off the record, in the same conversation on screen
            await pilot.press("ctrl+o")  # recording again for this chat, whatever the default
            await pilot.pause()
            await ask(pilot, chat, "Name an animal.")

    asyncio.run(run())
    rows = messages(db)
    assert [c for r, c in rows if r == "user"] == ["Name a colour.", "Name an animal."]
    conn = sqlite3.connect(db)
    assert conn.execute("select count(distinct conversation_id) from messages").fetchone() == (1,)
    assert tomllib.loads((home / "settings.toml").read_text()) == {"privacy": {"record": False}}


def test_ask_follows_the_recording_setting_and_log_overrides_it(home):
    write_settings(home, "[privacy]\nrecord = false\n")
    db = home / "localmoe.db"
    r = run_cli("ask", "Say hi.", "--json", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recorded"] is False and out["conversation_id"] is None and out["answer"].strip()
    assert messages(db) == []
    r = run_cli("ask", "And again?", "-c")  # nothing recorded to continue: one line saying how
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--log" in r.stderr, r.stderr
    r = run_cli("ask", "Say hello.", "--json", "--max-tokens", "4", "--log")
    assert r.returncode == 0 and json.loads(r.stdout)["recorded"] is True, r.stderr
    assert [c for role, c in messages(db) if role == "user"] == ["Say hello."]


@pytest.mark.parametrize(("text", "words"), [
    ("[privacy]\nrecord = \"no\"\n", "[privacy] record must be true or false"),
    ("[energy]\nmeter = \"wattmeter\"\n", "unknown energy meter 'wattmeter'"),
    ("energy = 3\n", "energy must be a table"),
    ("[tiers]\nsmall = 3\n", "[tiers] small must be a string, not 3"),
    ("[tiers]\nlarge = [\"a\"]\n", "[tiers] large must be a string, not ['a']"),
    ("[tiers]\nremote = \"http://127.0.0.1:9/v1\"\nremote_api_key_env = 3\n",
     "[tiers] remote_api_key_env must be a string"),
])
def test_bad_privacy_and_energy_settings_are_refused_in_one_line(home, text, words):
    write_settings(home, text)
    with pytest.raises(LocalmoeError) as err:
        settings.load()
    assert words in str(err.value) and "\n" not in str(err.value)
    r = run_cli("ask", "Say hi.", "--max-tokens", "4")  # the CLI reads the file with the same reader
    assert r.returncode != 0 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_meter_names_and_auto(home):
    home.mkdir(parents=True, exist_ok=True)
    assert settings.load().meter is None  # auto
    write_settings(home, '[energy]\nmeter = "Estimate"\n')
    assert settings.load().meter == "estimate"
    write_settings(home, '[energy]\nmeter = "auto"\n')
    assert settings.load().meter is None
    from localmoe.record.meters import METER_NAMES

    assert settings.meter_names() == ("auto", *METER_NAMES)


def test_the_chosen_energy_meter_measures_the_next_answer(home, tmp_path, monkeypatch):
    """A (fake) RAPL counter is what auto would take; the settings choose the estimate, then RAPL from the screen.
    A meter this machine cannot read is refused by the screen in one line."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no GPU meter, whatever this machine has
    root = tmp_path / "sys"
    root.mkdir()
    monkeypatch.setenv("LOCALMOE_SYSFS_ROOT", str(root))
    write_settings(home, '[energy]\nmeter = "estimate"\n')

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            first = await ask(pilot, chat, "Say hi.")
            assert first.energy.meter.startswith("estimate") and first.energy.measured is False
            assert "~" in str(first.query_one(".stats", Static).render())

            screen = await open_settings(pilot, app)
            meter = screen.query_one("#energy-meter", Select)
            assert meter.value == "estimate"
            meter.value = "amdgpu"  # no such sensor in the fake tree: refused, nothing written
            await pilot.press("ctrl+s")
            error = str(screen.query_one("#settings-error", Static).render())
            assert "energy meter 'amdgpu' is not available here" in error and "\n" not in error
            assert app.screen is screen and "estimate" in (home / "settings.toml").read_text()
            meter.value = "rapl"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen is chat and chat.sub_title == "smollm2-135m-instruct")

            second = await ask(pilot, chat, "Say hello.")
            assert second.energy.meter == "rapl(package-0)" and second.energy.measured is True

    with advancing_rapl(root, watts=25):
        asyncio.run(run())
        # `ask` reads the same key: the estimate when the file names it, RAPL (auto's choice here) without it
        assert tomllib.loads((home / "settings.toml").read_text()) == {"energy": {"meter": "rapl"}}
        write_settings(home, '[energy]\nmeter = "estimate"\n')
        out = json.loads(run_cli("ask", "Say hi.", "--json", "--max-tokens", "4").stdout)
        assert out["energy"]["meter"].startswith("estimate") and out["energy"]["measured"] is False
        write_settings(home, "")
        out = json.loads(run_cli("ask", "Say hi.", "--json", "--max-tokens", "4").stdout)
        assert out["energy"]["meter"].startswith("rapl(package-0)") and out["energy"]["measured"] is True
    conn = sqlite3.connect(home / "localmoe.db")
    meters = [r[0] for r in conn.execute("select meter from energy order by message_id")]
    assert meters[0].startswith("estimate") and meters[1] == "rapl(package-0)", meters


def test_a_named_meter_this_machine_cannot_read_refuses_the_question_before_recording_it(home, tmp_path):
    write_settings(home, '[energy]\nmeter = "rapl"\n')
    empty = tmp_path / "sys"
    empty.mkdir()
    # a question the router keeps on the small tier, so that no "no large model" notice joins the one error line
    r = run_cli("ask", "What is the capital of France? Answer with one word.", "--max-tokens", "4",
                env_extra={"LOCALMOE_SYSFS_ROOT": str(empty)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "energy meter 'rapl' is not available here" in r.stderr and "[energy] meter" in r.stderr
    assert messages(home / "localmoe.db") == []


def test_off_the_record_across_a_settings_change_never_joins_another_conversation(home):
    """Off the record, a settings change reloads the models: the exchanges kept in memory go on in the same scratch
    database, so recording again (Ctrl+O) starts a new recorded conversation rather than continuing whichever
    recorded conversation happens to have the scratch one's id."""
    db = home / "localmoe.db"

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            await ask(pilot, chat, "Name a colour.")  # recorded: conversation 1
            await pilot.press("ctrl+n")
            await pilot.press("ctrl+o")
            await pilot.pause()
            await ask(pilot, chat, "Name a fruit.")  # off the record: conversation 1 of the scratch database
            screen = await open_settings(pilot, app)
            screen.query_one("#router-preference", Input).value = "0.9"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen is chat and chat._ready.is_set()
                           and chat.sub_title == "smollm2-135m-instruct" + OFF_THE_RECORD)
            await pilot.press("ctrl+o")  # record again
            await pilot.pause()
            assert chat.assistant.recording
            await ask(pilot, chat, "Name an animal.")

    asyncio.run(run())
    conn = sqlite3.connect(db)
    rows = conn.execute("select conversation_id, content from messages where role = 'user' order by id").fetchall()
    assert [c for _, c in rows] == ["Name a colour.", "Name an animal."]
    assert rows[0][0] != rows[1][0], rows


@pytest.mark.parametrize("broken", ["[router\n", "[router]\npreference = [1]\n"])
def test_saving_never_replaces_a_file_it_could_not_read(home, broken):
    """F3 on a settings.toml that is not TOML: Ctrl+S refuses and the file stays as it was (it held a remote tier
    and a comment); one whose value has the wrong type shows its other values, and mending the value keeps them."""
    home.mkdir(parents=True, exist_ok=True)
    text = ('# my remote box\n[tiers]\nremote = "http://127.0.0.1:9/v1"\nremote_api_key_env = "MY_KEY"\n' + broken)
    (home / "settings.toml").write_text(text)

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await open_settings(pilot, app)
            await pilot.press("ctrl+s")
            error = str(screen.query_one("#settings-error", Static).render())
            assert app.screen is screen and (home / "settings.toml").read_text() == text, error
            if broken.startswith("[router\n"):
                assert "not valid TOML" in error and "mend it in an editor first" in error, error
                return
            assert screen.query_one("#router-preference", Input).value == "[1]"  # shown, to be mended
            assert "preference" in error, error
            screen.query_one("#router-preference", Input).value = "quality"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

    asyncio.run(run())
    if not broken.startswith("[router\n"):
        mended = tomllib.loads((home / "settings.toml").read_text())
        assert mended["tiers"] == {"remote": "http://127.0.0.1:9/v1", "remote_api_key_env": "MY_KEY"}
        assert mended["router"]["preference"] == "quality"


def test_a_model_file_ask_would_refuse_is_refused_as_a_tier(home, tmp_path):
    """F3 and F4 write through settings.save: a file that is not a GGUF model is refused there, as `ask` refuses
    it, by id and by path, and settings.toml stays as it was."""
    (home / "models").mkdir(parents=True)
    junk = home / "models" / "junk.gguf"
    junk.write_bytes(bytes(range(256)) * 64)
    for value in ("junk", str(junk)):
        with pytest.raises(LocalmoeError, match=r"^large tier: .*junk\.gguf") as err:
            settings.update("tiers", {"large": value})
        assert "\n" not in str(err.value)
    assert not (home / "settings.toml").exists()
    r = run_cli("ask", "hi", "--max-tokens", "2", "--model", "junk")
    assert r.returncode != 0 and "junk.gguf" in r.stderr


def test_a_misspelt_setting_is_named_not_silently_ignored(home):
    write_settings(home, '[router]\nprefrence = "quality"\n[privacy]\nrecord = true\n[tierz]\nsmall = "x"\n')
    st = settings.load()
    assert st.unknown == ("[router] prefrence", "tierz") and st.preference == "balanced"
    r = run_cli("ask", "Say hi.", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    [note] = [line for line in r.stderr.splitlines() if "not settings" in line]
    assert note.endswith("settings.toml: [router] prefrence, tierz are not settings (ignored; a typo?)"), note
    routed = run_cli("route", "What is 2+2?")  # where a misspelt preference matters most
    assert routed.returncode == 0 and "[router] prefrence, tierz are not settings" in routed.stdout, routed.stdout
    routed = run_cli("route", "What is 2+2?", "--json")
    assert "[router] prefrence, tierz are not settings" in json.loads(routed.stdout)["notice"]
    write_settings(home, '[router]\npreference = "quality"\n')
    assert settings.load().unknown == () and "not a setting" not in run_cli("ask", "Hi.", "--max-tokens", "2").stderr


@pytest.mark.parametrize(("bad", "words"), [('[router]\nstrategy = "cascde"\n', "unknown router strategy 'cascde'"),
                                           ('[privacy]\nrecord = "false"\n', "record must be true or false")])
def test_a_bad_strategy_or_record_value_shows_in_f3_without_harm(home, bad, words):
    """F3 opens on a strategy it does not know (the Select crashed the app) and shows a record value written as the
    string "false" as off: saving must not turn recording on."""
    write_settings(home, bad)

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await open_settings(pilot, app)
            assert words in str(screen.query_one("#settings-error", Static).render())
            assert screen.query_one("#router-strategy", Select).value == ""
            assert screen.query_one("#privacy-record", Switch).value is ("record" not in bad)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

    asyncio.run(run())
    saved = tomllib.loads((home / "settings.toml").read_text())
    assert "strategy" not in saved.get("router", {}) and saved.get("privacy", {}).get("record", True) is (
        "record" not in bad)


COMMENTED = '''# my box: the remote is the office server
[tiers]
remote = "http://127.0.0.1:9/v1#frag"   # a "#" in a string is not a comment
remote_api_key_env = "MY_KEY"

[router]
# quality: I would rather wait than be wrong
preference = "quality"
'''


def test_a_change_rewrites_only_its_own_lines_and_keeps_the_comments():
    data = tomllib.loads(COMMENTED)
    assert settings.edited_text(COMMENTED, data) == COMMENTED
    data["router"]["preference"] = 0.3
    data["router"]["strategy"] = "learned"
    data["privacy"] = {"record": False}
    del data["tiers"]["remote_api_key_env"]
    text = settings.edited_text(COMMENTED, data)
    assert tomllib.loads(text) == data
    assert text.splitlines()[:3] == COMMENTED.splitlines()[:3]
    assert "# quality: I would rather wait than be wrong\npreference = 0.3\nstrategy = \"learned\"\n" in text
    assert text.endswith("[privacy]\nrecord = false\n") and "MY_KEY" not in text
    # shapes a line editor cannot follow are written afresh by the caller
    assert settings.edited_text("[[tiers]]\nsmall = 'x'\n", {"tiers": {"small": "y"}}) is None
    assert settings.edited_text("[tiers]\nsmall = [\n 1]\n", {"tiers": {"small": "y"}}) is None


def test_saving_in_f3_keeps_the_users_comments(home):
    write_settings(home, COMMENTED)

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await open_settings(pilot, app)
            screen.query_one("#router-strategy", Select).value = "learned"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

    asyncio.run(run())
    text = (home / "settings.toml").read_text()
    assert text == COMMENTED + 'strategy = "learned"\n', text
