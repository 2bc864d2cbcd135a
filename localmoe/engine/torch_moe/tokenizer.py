"""Chat for a checkpoint: its tokenizer and chat template (tokenizer.json, tokenizer_config.json) turn messages into
token ids, and an incremental detokenizer turns sampled ids back into text pieces as they come."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import localmoe.engine.chat_template as chat_template
from localmoe.engine.base import Message
from localmoe.errors import LocalmoeError


class ChatTokenizer:
    """A checkpoint's `tokenizer.json` (through `tokenizers`) and the chat template of `tokenizer_config.json`."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (model_dir / name).is_file():
                raise LocalmoeError(f"{model_dir} has no {name}: the torch engine needs the tokenizer to chat")
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise LocalmoeError(f"cannot read {model_dir / 'tokenizer.json'}: {str(e).splitlines()[0]}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        jinja = model_dir / "chat_template.jinja"  # where transformers >= 4.43 saves the template
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos: set[int] = set()
        if self.eos_token and (i := self.tokenizer.token_to_id(self.eos_token)) is not None:
            eos.add(i)
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            ids = _read_json(gen).get("eos_token_id")
            eos.update(i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int))
        self.eos_ids = frozenset(eos)

    def render(self, messages: list[Message]) -> str:
        return chat_template.render(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        # As transformers' apply_chat_template: the template writes any BOS itself, so no special tokens are added.
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalmoeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LocalmoeError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class IncrementalDetokenizer:
    """Text pieces for tokens one at a time, never splitting a multi-byte character.

    Decodes the window from the last emitted boundary: the new text is what the window adds to the previous one,
    held back while it ends in an incomplete character (U+FFFD). Decoding a window rather than single tokens
    also keeps decoders that drop a leading space (sentencepiece's Metaspace) right mid-text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] produced the last piece; ids[read:] are not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prev = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end decodes as U+FFFD)."""
        prev = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :] if len(text) > len(prev) else ""
