"""Resuming a recorded conversation gives the model what it saw live (worked out by hand on message rows)."""

from __future__ import annotations

from localmoe.chat.conversation import Conversation


def row(role: str, content: str, status: str = "complete") -> dict:
    return {"role": role, "content": content, "status": status}


def test_resume_keeps_answered_turns_and_drops_failed_ones():
    rows = [row("system", "Be brief."), row("user", "Hi"), row("assistant", "Hello!"),
            row("user", "Crash?"), row("assistant", "", "error"),  # no text: out of the context, as live
            row("user", "Stop?"), row("assistant", "Partial", "cancelled"),  # stopped with text: kept, as live
            row("user", "Lost?")]  # no answer row at all (killed before it was written)
    c = Conversation()
    c.resume(7, rows)
    assert c.id == 7
    assert c.history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Stop?"},
                         {"role": "assistant", "content": "Partial"}]
    c.restart()
    assert c.id is None and c.history == [] and c.kind == "chat"
