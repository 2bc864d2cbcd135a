"""Chat for a checkpoint: its tokenizer and chat template (tokenizer.json, tokenizer_config.json) turn messages into
token ids, and an incremental detokenizer turns sampled ids back into text pieces as they come."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import localmoe.engine.chat_template as chat_template
from localmoe.engine.base import Message
from localmoe.engine.llamacpp import encode_chat, token_text
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


class GGUFChatTokenizer:
    """A GGUF's own tokenizer (llama.cpp, vocabulary only: no weights are read) and chat template (rendered in the
    sandbox), with the attributes of ChatTokenizer: the native engine runs a GGUF as it comes."""

    def __init__(self, path: Path) -> None:
        import llama_cpp
        from llama_cpp import Llama

        from localmoe.engine.llama_hooks import patched_defaults
        from localmoe.placement.layout import read_layout

        try:
            with patched_defaults():  # keeps llama.cpp's load log off the terminal
                self._llm = Llama(str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise LocalmoeError(f"llama.cpp could not read the tokenizer of {path.name}: {e}") from None
        self.tokenizer = _LlamaVocab(self._llm)
        self.template: str | None = read_layout(path).chat_template
        self.bos_token = token_text(self._llm, self._llm.token_bos())
        self.eos_token = token_text(self._llm, self._llm.token_eos())
        self._add_bos = self._llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
        vocab = self._llm._model.vocab
        # every end-of-generation token (eos, eot, <|im_end|>, ...), as llama.cpp's own generation stops at
        self.eos_ids = frozenset(i for i in range(self._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i))

    def render(self, messages: list[Message]) -> str:
        return chat_template.render(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return encode_chat(self._llm, self.template, messages, self.bos_token, self.eos_token, self._add_bos)


class _LlamaVocab:
    """llama.cpp's detokenizer with the one method IncrementalDetokenizer calls."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._llm.detokenize(ids, special=not skip_special_tokens).decode("utf-8", errors="replace")


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
