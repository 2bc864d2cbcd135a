"""The conversations screen driven through Textual's pilot, against the real database file and embedded model."""

from __future__ import annotations

import asyncio
import json

from test_tui import type_and_send, wait_for
from textual.widgets import DataTable, Input, Static

from localmoe.engine import GenerationConfig
from localmoe.record.recorder import Recorder
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen, Question
from localmoe.ui.conversations import ConversationsScreen


def test_search_finds_an_old_answer_and_resume_continues_with_its_history(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=24, temperature=0.0))
        async with app.run_test(size=(100, 30)) as pilot:
            chat = app.screen
            await type_and_send(pilot, "Which city is the capital of Japan?")
            await wait_for(pilot, lambda: chat.query(Answer) and chat.query(Answer)[0].done)
            old_answer, old_id = chat.query(Answer)[0].text, chat.assistant.conversation_id
            assert "Tokyo" in old_answer
            tokens = chat.query(Answer)[0].stats.completion_tokens
            await pilot.press("ctrl+b")  # rated bad, then taken back after the resume
            await pilot.press("ctrl+n")
            await type_and_send(pilot, "Say hello.")
            await wait_for(pilot, lambda: chat.query(Answer) and chat.query(Answer)[0].done)
            assert chat.assistant.conversation_id != old_id

            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
            screen = app.screen
            assert screen.query_one(DataTable).row_count == 2
            await pilot.press(*"tokyo")
            await wait_for(pilot, lambda: screen.query_one(DataTable).row_count == 1)
            assert [r["id"] for r in screen.rows] == [old_id]
            assert "[Tokyo]" in str(screen.query_one("#match", Static).render())
            await pilot.press("enter")  # resume the highlighted one
            await wait_for(pilot, lambda: app.screen is chat)
            assert chat.assistant.conversation_id == old_id
            assert [q.render().plain for q in chat.query(Question)] == ["Which city is the capital of Japan?"]
            assert chat.query(Answer)[0].text == old_answer
            # the recorded answer keeps its figures and its rating, and the rating keys act on it
            resumed = chat.query(Answer)[0]
            note = str(resumed.query_one(".stats", Static).render())
            assert f"{tokens} tokens" in note and " J · recorded" in note, note
            assert resumed.rating is False
            await pilot.press("ctrl+b")  # the same key again takes it back
            assert resumed.rating is None
            with Recorder() as rec:
                assert rec.route_labels() == []
            await pilot.press("ctrl+g")
            with Recorder() as rec:
                assert [(r["prompt"], r["small_wrong"]) for r in rec.route_labels()] == [
                    ("Which city is the capital of Japan?", 0)]

            await type_and_send(pilot, "And of Italy?")
            await wait_for(pilot, lambda: len(chat.query(Answer)) == 2 and chat.query(Answer)[1].done)
            sent = chat.last.reply._history  # what the model was given for the new answer
            assert [m["content"] for m in sent if m["role"] != "system"] == [
                "Which city is the capital of Japan?", old_answer, "And of Italy?"]

    asyncio.run(run())
    with Recorder() as rec:
        [italy] = [m for m in rec.search_messages("italy") if m["role"] == "user"]
        assert italy["title"] == "Which city is the capital of Japan?"  # the old conversation went on


def test_rename_delete_undo_and_export_from_the_screen(home):
    with Recorder() as rec:
        cid = rec.new_conversation("smollm2-135m-instruct", title="birds")
        q = rec.add_message(cid, "user", "Which bird talks?")
        a = rec.add_message(cid, "assistant", "", model="smollm2-135m-instruct", status="pending", reply_to=q)
        rec.finish_message(a, "The parrot, a chatterbox.", "complete", None, {"joules": 0.5, "measured": 0})
        stored = rec.conversation_messages(cid)

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert "Conversations" in {c.title for c in app.get_system_commands(app.screen)}
            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
            screen = app.screen
            palette = {c.title for c in app.get_system_commands(screen)}
            assert {"Resume", "Rename", "Delete", "Undo delete", "Export"} <= palette
            assert screen.rows[0]["joules"] == 0.5 and screen.rows[0]["messages"] == 2

            await pilot.press("ctrl+r")
            rename = screen.query_one("#rename", Input)
            assert app.focused is rename
            rename.value = ""
            await pilot.press(*"talking birds", "enter")
            await pilot.pause()
            assert screen.rows[0]["title"] == "talking birds" and app.focused.id == "search"

            await pilot.press("ctrl+d")
            await pilot.pause()
            assert screen.rows == []
            with Recorder() as rec:
                assert rec.conversation_messages(cid) == [] and rec.search_messages("parrot") == []
            await pilot.press("ctrl+z")
            await pilot.pause()
            assert [r["id"] for r in screen.rows] == [cid]
            with Recorder() as rec:
                assert rec.conversation_messages(cid) == stored and rec.search_messages("parrot")

            await pilot.press("ctrl+e")
            await pilot.pause()
            md, js = screen.last_export
            assert json.loads(js.read_text())["messages"] == stored
            assert "The parrot, a chatterbox." in md.read_text() and md.parent == home / "exports"
            with Recorder() as rec:
                assert rec.conversation(cid)["title"] == "talking birds"
            # deleted for good on leaving: the toast that offered Ctrl+Z leaves with the screen
            await pilot.press("ctrl+d")
            await pilot.pause()
            assert any("Ctrl+Z brings it back" in n.message for n in app._notifications)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
            assert not any("Ctrl+Z" in n.message for n in app._notifications)
            assert any(n.message.startswith("Exported to ") for n in app._notifications)  # that one may stay

    asyncio.run(run())
    with Recorder() as rec:
        assert rec.conversation(cid) is None


def test_resumed_answers_are_rated_in_the_database_and_a_pinned_models_teach_nothing(home):
    """A resumed answer comes from the database, so its rating goes there even in a chat that is off the record
    (it said "off the record: not stored"); an answer of a model the user pinned is no small-tier label."""
    with Recorder() as rec:
        rows = {}
        for strategy in ("features", "pinned"):
            cid = rec.new_conversation("smollm2-135m-instruct", title=strategy)
            q = rec.add_message(cid, "user", f"question {strategy}")
            a = rec.add_message(cid, "assistant", "an answer", model="smollm2-135m-instruct", reply_to=q)
            rec.record_decision(a, tier="small", model="smollm2-135m-instruct", strategy=strategy, score=0.9,
                                threshold=0.5, reason="r", latency_ms=1.0)
            rows[strategy] = (cid, a)
        assert rec.answer_facts(rows["features"][0])[rows["features"][1]]["tier"] == "small"
        assert rec.answer_facts(rows["pinned"][0])[rows["pinned"][1]]["tier"] == "pinned"

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 30)) as pilot:
            chat = app.screen
            await wait_for(pilot, lambda: chat.assistant is not None and chat._ready.is_set())
            await pilot.press("ctrl+o")  # off the record
            await pilot.pause()
            assert not chat.assistant.recording
            notes: list[str] = []
            chat.notify = lambda message, *a, **k: notes.append(str(message))
            for strategy in ("features", "pinned"):
                await chat.resume(rows[strategy][0])
                await pilot.press("ctrl+b")
                assert chat.query(Answer)[-1].rating is False
                assert notes and "off the record" not in notes[-1], notes
                if strategy == "pinned":
                    assert "Only small-model answers teach the router" in notes[-1]

    asyncio.run(run())
    with Recorder() as rec:
        assert [(r["prompt"], r["small_wrong"]) for r in rec.route_labels()] == [("question features", 1)]


def test_the_list_refits_when_the_terminal_narrows(home):
    """Opened at 120 columns and narrowed to 80, the titles were still cut for 120: the message count and joules
    went off the screen."""
    with Recorder() as rec:
        for n in range(2):
            cid = rec.new_conversation("smollm2-135m-instruct", title=f"a rather long title about question {n} " * 3)
            rec.add_message(cid, "user", f"Question {n}?")
    second = rec_id = None

    async def run() -> None:
        nonlocal second, rec_id
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen) and app.screen.rows)
            screen = app.screen
            table = screen.query_one(DataTable)
            table.move_cursor(row=1)
            rec_id = screen.rows[1]["id"]
            await pilot.resize_terminal(80, 24)
            await wait_for(pilot, lambda: screen.size.width == 80)
            await pilot.pause()
            widths = sum(c.get_render_width(table) for c in table.columns.values())
            assert widths <= 80, [c.get_render_width(table) for c in table.columns.values()]
            assert str(table.get_cell_at((0, 0))).endswith("…")
            second = screen.selected()["id"]  # the highlighted conversation stays highlighted

    asyncio.run(run())
    assert second == rec_id
