"""One conversation: its database id, its kind (chat or bench) and the messages a model sees next turn. The assistant
and each of its tier sessions hold the same object, so a question answered on one tier is history for the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localmoe.engine.base import Message


@dataclass
class Conversation:
    id: int | None = None  # set when its first question is recorded
    kind: str = "chat"  # "bench" keeps benchmark exchanges out of `logs`
    history: list[Message] = field(default_factory=list)

    def resume(self, conversation_id: int, messages: list[dict[str, Any]]) -> None:
        """Continue a recorded conversation: `messages` are its rows in order. The model sees what it saw before:
        answered questions and their answers (a question whose answer failed stays recorded but out of the context)."""
        history: list[Message] = []
        asked = None  # the id of the latest question
        for m in messages:
            if m["role"] == "assistant":
                # as Session keeps them live: any answer with text, a stopped one included
                if m["content"] and history and history[-1]["role"] == "user":
                    history.append({"role": "assistant", "content": m["content"]})
                elif history and history[-1]["role"] == "user":
                    history.pop()
                elif m["content"] and history and m.get("reply_to") == asked and asked is not None:
                    # the same question answered again (an escalation, a retry): the later answer is the one kept
                    history[-1] = {"role": "assistant", "content": m["content"]}
            elif m["role"] in ("user", "system"):
                if history and history[-1]["role"] == "user":
                    history.pop()  # a question with no answer row at all
                history.append({"role": m["role"], "content": m["content"]})
                asked = m.get("id") if m["role"] == "user" else asked
        if history and history[-1]["role"] == "user":
            history.pop()
        self.id, self.history = conversation_id, history

    def take_back(self, prompt: str) -> None:
        """The latest exchange out of the context when it is `prompt`'s, before the question is answered anew."""
        h, question = self.history, {"role": "user", "content": prompt}
        if len(h) >= 2 and h[-1]["role"] == "assistant" and h[-2] == question:
            del h[-2:]
        elif h and h[-1] == question:
            h.pop()

    def restart(self) -> None:
        """A new conversation from the next question on (the kind stays)."""
        self.id = None
        self.history = []
