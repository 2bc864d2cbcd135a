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


def test_a_question_answered_again_keeps_the_later_answer_in_the_context():
    """An escalation or a retry answers a recorded question anew: live, the earlier answer leaves the context
    (take_back), and a resume keeps the later answer, as live."""
    rows = [{**row("user", "Capital of Japan?"), "id": 1}, {**row("assistant", "Kyoto."), "reply_to": 1},
            {**row("assistant", "Tokyo."), "reply_to": 1}, {**row("user", "And Italy?"), "id": 4},
            {**row("assistant", "Rome."), "reply_to": 4}]
    c = Conversation()
    c.resume(3, rows)
    assert [m["content"] for m in c.history] == ["Capital of Japan?", "Tokyo.", "And Italy?", "Rome."]
    c.take_back("And Italy?")
    assert [m["content"] for m in c.history] == ["Capital of Japan?", "Tokyo."]
    c.take_back("Another question")  # not the latest exchange's: nothing leaves
    assert len(c.history) == 2
    c.history.append({"role": "user", "content": "Unanswered"})
    c.take_back("Unanswered")
    assert [m["content"] for m in c.history] == ["Capital of Japan?", "Tokyo."]
