"""The chat UI driven through Textual's pilot, on the real embedded model."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys

import pytest
from textual.widgets import Input, Markdown, Static

from helpers import advancing_rapl
from localmoe.engine import GenerationConfig
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen, Question


async def wait_for(pilot, predicate, timeout: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.05)


async def type_and_send(pilot, text: str) -> None:
    await pilot.click("#prompt")
    await pilot.press(*text)
    await pilot.press("enter")


def test_typed_question_gets_a_streamed_answer(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=60, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            # the prompt takes input before the model has finished loading
            assert app.focused is screen.query_one("#prompt", Input)
            await type_and_send(pilot, "Which city is the capital of Japan?")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            assert answer.status == "complete", screen.query_one(".stats", Static).render()
            assert "Tokyo" in answer.text
            assert "Tokyo" in answer.query_one(Markdown).source
            assert screen.query_one(Question).render().plain == "Which city is the capital of Japan?"
            stats = str(answer.query_one(".stats", Static).render())
            assert "tok/s" in stats and "first token" in stats and "smollm2-135m-instruct" in stats
            assert stats.endswith(" J") and answer.energy is not None and answer.energy.joules > 0
            assert screen.sub_title == "smollm2-135m-instruct"

            # a second question keeps the first on screen and goes to the same conversation
            await type_and_send(pilot, "And of Italy?")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 2 and screen.query(Answer)[1].done)
            assert len(screen.query(Question)) == 2
            cid = screen.assistant.conversation_id

            # new conversation: the screen clears and the next question starts a new one
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert len(screen.query(Answer)) == 0
            await type_and_send(pilot, "Hello!")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 1 and screen.query(Answer)[0].done)
            assert screen.assistant.conversation_id != cid

    asyncio.run(run())
    conn = sqlite3.connect(home / "localmoe.db")
    rows = conn.execute("select conversation_id, role, status from messages order by id").fetchall()
    assert [r[1] for r in rows] == ["user", "assistant"] * 3
    assert all(r[2] == "complete" for r in rows)
    assert len({r[0] for r in rows}) == 2


def test_stop_key_ends_a_long_answer_early(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=1500, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await type_and_send(pilot, "Write a very long story about a dragon who bakes bread.")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: len(answer.text) > 20)
            # a question sent while it answers is refused and stays in the prompt, to send afterwards
            prompt = screen.query_one("#prompt", Input)
            prompt.value = "And then?"  # set, not typed: typing nine keys under a stream can outlast the answer
            await pilot.press("enter")
            assert screen.generating and prompt.value == "And then?" and len(screen.query(Answer)) == 1
            # the UI stays responsive while tokens stream: it takes the stop key
            await pilot.press("escape")
            await wait_for(pilot, lambda: answer.done, timeout=10)
            assert answer.status == "cancelled"
            assert answer.stats.stop_reason == "cancelled"
            assert 0 < answer.stats.completion_tokens < 1500
            assert "stopped" in str(answer.query_one(".stats", Static).render())
            return answer.stats.completion_tokens

    n = asyncio.run(run())
    conn = sqlite3.connect(home / "localmoe.db")
    status, tokens = conn.execute(
        "select m.status, g.completion_tokens from messages m join generations g on g.message_id = m.id"
    ).fetchone()
    assert status == "cancelled" and tokens == n


def test_bad_model_shows_an_error_not_a_crash(home, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")

    async def run() -> None:
        app = LocalmoeApp(model=str(bad))
        async with app.run_test() as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.sub_title == "no model")
            assert "not a GGUF" in str(screen.query_one("#notice", Static).render())
            await type_and_send(pilot, "hi")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            assert answer.status == "error"

    asyncio.run(run())


def test_retry_on_the_large_tier_and_thumbs_become_labels(home, tiny_moe):
    home.mkdir(parents=True, exist_ok=True)
    # a threshold near 1 keeps the first answer on the small tier whatever the router thinks of the question
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n[router]\npreference = 0.99\n')

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=16, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await type_and_send(pilot, "Which city is the capital of Japan?")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 1 and screen.query(Answer)[0].done)
            first = screen.query(Answer)[0]
            assert first.decision.tier == "small"
            assert "small tier" in str(first.query_one(".route", Static).render())
            await pilot.press("ctrl+g")  # thumbs up on a small answer
            await pilot.press("ctrl+l")  # not good enough after all: ask the large tier
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 2 and screen.query(Answer)[1].done)
            second = screen.query(Answer)[1]
            assert second.decision.tier == "large" and second.model == "tiny-moe"
            assert "large tier" in str(second.query_one(".route", Static).render())
            # the same question answered anew: the small answer is not in the large model's context
            sent = screen.last.reply._history
            assert [m["content"] for m in sent if m["role"] != "system"] == ["Which city is the capital of Japan?"]
            assert screen.assistant.conversation.history[-1] == {"role": "assistant", "content": second.text}

    asyncio.run(run())
    conn = sqlite3.connect(home / "localmoe.db")
    labels = conn.execute("select prompt, small_wrong, source from route_labels order by id").fetchall()
    assert labels == [("Which city is the capital of Japan?", 0, "thumbs"),
                      ("Which city is the capital of Japan?", 1, "retry")]
    # recorded as one question with two answers, both kept
    rows = conn.execute("select id, role, reply_to from messages order by id").fetchall()
    assert [r[1] for r in rows] == ["user", "assistant", "assistant"] and rows[1][2] == rows[2][2] == rows[0][0]


def test_an_escalated_cascade_answer_shows_the_break_between_the_two_answers(home, tiny_moe):
    home.mkdir(parents=True, exist_ok=True)
    # the cascade with a threshold of 0.001: any doubt in the small answer escalates to the tiny MoE
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n'
                                        '[router]\nstrategy = "cascade"\npreference = 0.001\n')

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await type_and_send(pilot, "Which city is the capital of Japan?")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 1 and screen.query(Answer)[0].done)
            answer = screen.query(Answer)[0]
            assert answer.decision.tier == "large" and answer.model == "tiny-moe"
            small, brk, large = answer.text.partition(
                "\n\n---\n*The small answer looks wrong; the large model answers:*\n\n")
            assert brk and small.strip() and large.strip()  # the small answer, the break, then the large one

    asyncio.run(run())


def test_torch_answers_show_the_expert_cache(home, tiny_moe):
    """A checkpoint directory answers on the native engine; its stats line names the expert hit rate and bytes."""
    async def run() -> None:
        app = LocalmoeApp(model=str(tiny_moe[0]), config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.screen
            await type_and_send(pilot, "Hello there")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            stats = str(answer.query_one(".stats", Static).render())
            assert answer.status == "complete", stats
            assert answer.experts is not None and answer.experts["hits"] + answer.experts["misses"] > 0
            assert f"experts {answer.experts['hit_rate']:.0%} hit" in stats and "moved" in stats

    asyncio.run(run())


def test_the_prompt_keeps_the_keyboard_recalls_questions_and_rates_once(home):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=24, temperature=0.0))
        async with app.run_test(size=(100, 30)) as pilot:
            screen = app.screen
            prompt = screen.query_one("#prompt", Input)
            for q in ("Name a color.", "Name a fruit.", "Name an animal."):
                await type_and_send(pilot, q)
                await wait_for(pilot, lambda: all(a.done for a in screen.query(Answer)))
            # Tab leaves nothing else to focus: typing still goes into the prompt
            await pilot.press("tab")
            assert app.focused is prompt
            await pilot.press("x")
            assert prompt.value == "x"
            # Up/Down walk back and forth through this session's questions, and back to what was being typed
            await pilot.press("up")
            assert prompt.value == "Name an animal."
            await pilot.press("up", "up", "up")
            assert prompt.value == "Name a color."
            await pilot.press("down")
            assert prompt.value == "Name a fruit."
            await pilot.press("down", "down")
            assert prompt.value == "x"
            prompt.value = ""
            # PgUp scrolls the answers while the prompt keeps focus
            conversation = screen.query_one("#conversation")
            await pilot.pause()
            bottom = conversation.scroll_y
            assert conversation.max_scroll_y > 0 and bottom > 0
            await pilot.press("pageup")
            await pilot.pause()
            assert conversation.scroll_y < bottom and app.focused is prompt
            await pilot.press("pagedown")
            await pilot.pause()
            assert conversation.scroll_y > bottom - 1
            # ratings: bad, then good replaces it, then good again takes it back; one label at most
            answer = screen.query(Answer).last()
            await pilot.press("ctrl+b")
            assert answer.rating is False and "rated bad" in str(answer.query_one(".rating", Static).render())
            await pilot.press("ctrl+g")
            assert answer.rating is True
            labels = sqlite3.connect(home / "localmoe.db").execute(
                "select small_wrong, source from route_labels").fetchall()
            assert labels == [(0, "thumbs")]
            await pilot.press("ctrl+g")
            assert answer.rating is None
            assert sqlite3.connect(home / "localmoe.db").execute("select count(*) from route_labels").fetchone() \
                == (0,)
            # the footer names the rating and quit keys
            footer_keys = {b.binding.action for b in screen.active_bindings.values() if b.binding.show}
            assert {"thumbs_up", "thumbs_down", "quit"} <= footer_keys
            # a new chat puts the keyboard back in the prompt
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert app.focused is prompt
            await pilot.press("h", "i")
            assert prompt.value == "hi"

    asyncio.run(run())


def test_a_stopped_loop_is_taken_back_on_screen(home):
    async def run() -> None:
        config = GenerationConfig(max_tokens=300, temperature=0.0, repeat_penalty=1.0, loop_guard=True)
        app = LocalmoeApp(config=config)
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            # greedy with no penalty the embedded model loops here: "Il capo di Roma, il territore di Roma, …"
            await type_and_send(pilot, "What is the capital of Italy?")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            assert answer.stats.stop_reason == "repetition"
            assert answer.text.count("il territore") == 1 and answer.query_one(Markdown).source == answer.text
            assert "repeating itself" in str(answer.query_one(".stats", Static).render())

    asyncio.run(run())


@pytest.mark.parametrize("sensor", ["rapl", "none"])
def test_the_stats_line_marks_only_estimated_joules(home, tmp_path, monkeypatch, sensor):
    """With a (fake) RAPL counter the joules are plain; with no sensor they carry the estimate's "~"."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no GPU meter, whatever this machine has
    root = tmp_path / "sys"
    root.mkdir()
    monkeypatch.setenv("LOCALMOE_SYSFS_ROOT", str(root))

    async def run() -> str:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await type_and_send(pilot, "Say hi.")
            answer = screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            assert answer.status == "complete"
            assert answer.energy.measured is (sensor == "rapl")
            return str(answer.query_one(".stats", Static).render())

    if sensor == "rapl":
        with advancing_rapl(root, watts=25):
            stats = asyncio.run(run())
        assert re.search(r" · \d+\.\d J( · |\n|$)", stats) and "~" not in stats, stats
    else:
        stats = asyncio.run(run())
        assert re.search(r" · ~\d+\.\d J( · |\n|$)", stats), stats


def test_a_missing_large_tier_is_explained_once_per_session(home):
    """Two hard questions without a large model: both answers are marked probably wrong, the way to add one is
    said with the first only (#19 item 5)."""
    hard = "What is 4821 * 317 - 96? Answer with a number only."

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=4, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            for n in (1, 2):
                await type_and_send(pilot, hard)
                await wait_for(pilot, lambda n=n: len(screen.query(Answer)) == n and screen.query(Answer)[-1].done)
            routes = [str(a.query_one(".route", Static).render()) for a in screen.query(Answer)]
            assert all("likely wrong" in r for r in routes), routes
            assert "likely wrong — " in routes[0] and "likely wrong — " not in routes[1], routes  # — the hint

    asyncio.run(run())
