"""A conversation longer than the model's context: the chat drops its oldest exchanges (as Ollama does) and says so
once; the record keeps every message and how many the model did not read; an API client is refused instead."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from localmoe.engine import GenerationConfig
from localmoe.engine.base import fit_context
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.errors import LocalmoeError

# ~80 tokens: three exchanges of these overflow a 256-token context
LONG = 2 * ("Here is a note about my garden, which has tomatoes, beans, carrots, onions, lettuce, peppers, "
            "cucumbers, squash and herbs in raised beds along the fence that gets sun all afternoon. ")


def words(messages: list[dict[str, str]]) -> list[int]:
    return [0] * sum(len(m["content"].split()) for m in messages)


def test_the_oldest_exchanges_leave_first_and_the_system_message_and_question_stay():
    system = {"role": "system", "content": "be brief"}
    turns = [m for i in range(3) for m in ({"role": "user", "content": f"q{i} " * 10},
                                          {"role": "assistant", "content": f"a{i} " * 10})]
    question = {"role": "user", "content": "last " * 10}
    kept, tokens, dropped = fit_context([system, *turns, question], words, n_ctx=56, max_tokens=8)
    # 2 + 60 + 10 words and room for min(8, 56 // 4) = 8: two exchanges go (52 + 8 > 56, 32 + 8 <= 56)
    assert dropped == 2 and kept == [system, *turns[4:], question] and len(tokens) == 32
    assert fit_context([system, *turns, question], words, n_ctx=200, max_tokens=8)[2] == 0
    # a long chat: found by bisection, not one tokenisation per exchange; dropped in blocks, so the first kept
    # message stays the same over the next turns (the engine's cached prefix with it)
    calls = []

    def counted(ms: list[dict[str, str]]) -> list[int]:
        calls.append(1)
        return words(ms)

    long = [m for i in range(200) for m in ({"role": "user", "content": f"q{i} " * 10},
                                            {"role": "assistant", "content": f"a{i} " * 10})]
    firsts = []
    for turn in range(6):
        calls.clear()
        chat = [system, *long[: 2 * (150 + turn)], question]
        kept, tokens, dropped = fit_context(chat, counted, n_ctx=2048, max_tokens=64)
        assert len(tokens) + 64 <= 2048 and dropped % 4 == 0 and kept[0] == system and kept[-1] == question
        assert len(calls) <= 12, len(calls)
        firsts.append(kept[1]["content"])
    assert len(set(firsts)) <= 3, firsts  # six turns, the kept history started anew at most twice more
    # a question too long alone is left as it is, for token_budget to refuse in one line
    alone = [{"role": "user", "content": "x " * 100}]
    assert fit_context(alone, words, n_ctx=56, max_tokens=8) == (alone, [0] * 100, 0)
    # an answer with no question before it (a client's history) leaves first, on its own
    odd = [{"role": "assistant", "content": "hello " * 30}, *turns[:2], question]
    assert fit_context(odd, words, n_ctx=56, max_tokens=8)[0] == [*turns[:2], question]


def test_the_engine_fits_a_long_conversation_only_when_asked(smollm):
    engine = LlamaCppEngine(smollm.path, model_id=smollm.id, n_ctx=256)
    history = [m for i in range(3) for m in ({"role": "user", "content": LONG + f"Note {i}."},
                                             {"role": "assistant", "content": "Thanks for the note."})]
    messages = [*history, {"role": "user", "content": "What is the capital of France?"}]
    try:
        with pytest.raises(LocalmoeError, match="start a new conversation"):
            list(engine.stream(messages, GenerationConfig(max_tokens=16, temperature=0.0)))
        text = "".join(engine.stream(messages, GenerationConfig(max_tokens=16, temperature=0.0, fit_context=True)))
        s = engine.stats
        assert 1 <= s.dropped_exchanges < 3 and s.prompt_tokens + 16 <= 256, s
        assert "Paris" in text, text
    finally:
        engine.close()


def test_the_chat_keeps_answering_tells_once_and_records_everything(home, monkeypatch):
    from test_tui import wait_for
    from textual.widgets import Input

    from localmoe.placement import plan
    from localmoe.ui.app import LocalmoeApp
    from localmoe.ui.chat import Answer

    monkeypatch.setattr(plan, "DEFAULT_CTX", 256)  # the embedded model's context, as a small machine might plan

    async def run() -> list[str]:
        app = LocalmoeApp()  # the product's own generation settings
        seen: dict[int, str] = {}  # notifications leave after their timeout: each is collected as it shows
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            for i in range(4):
                # set, not typed: 400 key presses take half a minute
                screen.query_one("#prompt", Input).value = f"{LONG}Note {i}. Reply with just the word OK."
                await pilot.press("enter")
                await wait_for(pilot, lambda i=i: len(screen.query(Answer)) == i + 1 and screen.query(Answer)[i].done,
                               timeout=120)
                assert screen.query(Answer)[i].status in ("complete", "length"), screen.query(Answer)[i].status
                seen.update((id(n), n.message) for n in app._notifications)
            return list(seen.values())

    shown = asyncio.run(run())
    assert sum("outgrew" in n for n in shown) == 1, shown
    conn = sqlite3.connect(home / "localmoe.db")
    questions = conn.execute("select count(*) from messages where role = 'user'").fetchone()[0]
    dropped = [d for (d,) in conn.execute("select g.dropped_exchanges from generations g order by message_id")]
    assert questions == 4 and len(dropped) == 4
    assert dropped[0] == 0 and dropped[-1] >= 1, dropped


def test_ask_continuing_a_long_conversation_says_what_left_the_prompt(home, monkeypatch, capsys):
    from localmoe import cli
    from localmoe.placement import plan

    monkeypatch.setattr(plan, "DEFAULT_CTX", 256)
    assert cli.main(["ask", f"{LONG}Note 0. Reply with just the word OK."]) == 0
    assert "outgrew" not in capsys.readouterr().err
    assert cli.main(["ask", "-c", f"{LONG}Note 1. Reply with just the word OK."]) == 0
    err = capsys.readouterr().err
    assert "localmoe: note: the conversation outgrew smollm2-135m-instruct's context: its 1 oldest exchange left " \
           "the prompt (still recorded)" in err, err
    assert cli.main(["ask", "-c", "--json", f"{LONG}Note 2. Reply with just the word OK."]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["dropped_exchanges"] >= 1


def test_the_native_engine_fits_a_long_conversation_too(tiny_moe):
    from localmoe.engine.torch_moe import TorchMoEEngine

    engine = TorchMoEEngine(tiny_moe[0], expert_slots=2, max_seq_length=128)
    history = [m for i in range(3) for m in ({"role": "user", "content": "tell me a long story " * 8},
                                             {"role": "assistant", "content": "once upon a time " * 4})]
    messages = [*history, {"role": "user", "content": "and then?"}]
    try:
        with pytest.raises(LocalmoeError, match="start a new conversation"):
            list(engine.stream(messages, GenerationConfig(max_tokens=8, temperature=0.0)))
        list(engine.stream(messages, GenerationConfig(max_tokens=8, temperature=0.0, fit_context=True)))
        s = engine.stats
        assert s.dropped_exchanges >= 1 and s.prompt_tokens + 8 <= 128 and s.completion_tokens > 0, s
    finally:
        engine.close()
