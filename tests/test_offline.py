"""Nothing is downloaded at run time: with every network connection refused, the embedded model still answers."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from test_tui import type_and_send, wait_for

from localmoe import cli
from localmoe.chat.session import Session
from localmoe.engine import GenerationConfig
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer


@pytest.fixture()
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every way out of this process (connect, create_connection, a DNS lookup) recorded and refused."""
    tried: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        tried.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tried


def test_the_blocking_is_real(attempts):
    with pytest.raises(OSError, match="blocked by the test"), socket.socket() as s:
        s.connect(("127.0.0.1", 9))
    assert attempts == [(("127.0.0.1", 9),)]
    attempts.clear()


def test_ask_answers_with_the_network_blocked(home, attempts, capsys):
    assert cli.main(["ask", "Say hi.", "--max-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"].strip() and out["model"] == "smollm2-135m-instruct" and out["status"] == "complete"
    assert attempts == []


def test_a_session_answers_with_the_network_blocked(home, smollm, attempts):
    session = Session(smollm, config=GenerationConfig(max_tokens=4, temperature=0.0))
    try:
        reply = session.ask("Name a color.").run()
    finally:
        session.close()
        session.recorder.close()
    assert reply.status == "complete" and reply.text.strip() and reply.stats.completion_tokens > 0
    assert attempts == []


def test_the_chat_answers_with_the_network_blocked(home, attempts):
    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=4, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            await type_and_send(pilot, "Say hi.")
            answer = app.screen.query_one(Answer)
            await wait_for(pilot, lambda: answer.done)
            assert answer.status == "complete" and answer.text.strip()

    asyncio.run(run())
    assert attempts == []
