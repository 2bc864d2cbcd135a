"""OpenAI's chat-completions wire format: requests checked into a `ChatRequest`, answers and errors shaped as the
official clients expect. No I/O here, so every shape can be read (and tested) on its own."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from localmoe.engine.base import REPEAT_LAST_N, Message

AUTO_MODEL = "localmoe/auto"  # the router as a model: each request goes to the tier `localmoe route` names
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    prompt: str  # the last user message: what is asked and recorded
    history: list[Message]  # the messages before it, as the model sees them
    stream: bool = False
    include_usage: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields the request sets


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (what newer clients send)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def _number(body: dict[str, Any], name: str, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}", param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        bounds = f"{'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}"
        raise ApiError(400, f"{name} must be {bounds}, not {value!r}", param=name)
    return value


# llama.cpp's server takes these beside OpenAI's fields, and its clients send them (its web UI sends most of them at
# their neutral values on every request): a neutral value changes nothing, any other would be ignored here, so it is
# refused. Fields in neither this table nor OpenAI's API are left alone, as OpenAI's own server does; so are those
# that act only through a refused one (dry_sequence_breakers) or only order the samplers (samplers).
LLAMA_CPP_NEUTRAL: dict[str, Any] = {
    "mirostat": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "typical_p": 1, "tfs_z": 1,
    "top_n_sigma": -1, "dynatemp_range": 0, "dynatemp_exponent": 1, "xtc_probability": 0,
    "xtc_threshold": 0.1, "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2,
    "dry_penalty_last_n": -1, "repeat_last_n": REPEAT_LAST_N, "penalty_last_n": REPEAT_LAST_N,
    "penalize_nl": False, "ignore_eos": False, "n_probs": 0, "min_keep": 0, "n_predict": -1,
    "n_keep": 0, "grammar": "", "json_schema": {}, "lora": [], "n_indent": 0,
    "t_max_predict_ms": 0, "post_sampling_probs": False,
}
SUPPORTED_INSTEAD = {"n_predict": "max_tokens"}
# (name, lowest, highest, integer, lowest excluded): llama.cpp's sampling fields that GenerationConfig has
LLAMA_CPP_SAMPLING = (("top_k", -1, 1_000_000, True, False), ("min_p", 0, 1, False, False),
                      ("repeat_penalty", 0, 10, False, True))


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body; an ApiError (400) names the first thing wrong with it. Whether the model exists
    is the server's question (404), not this function's."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: a model id from /v1/models, or localmoe/auto", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of system, developer, user, assistant", param="messages")
        turns.append({"role": ROLES[m["role"]], "content": _text(m.get("content"), where)})
    if turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's question", param="messages")
    for name in ("tools", "functions", "stop", "response_format", "logit_bias", "logprobs", "top_logprobs",
                 "frequency_penalty", "presence_penalty"):
        if name == "response_format" and body.get(name) == {"type": "text"}:
            continue  # plain text is what every answer is (some clients send the default explicitly)
        if body.get(name):  # silently ignoring them would return answers the client did not ask for
            raise ApiError(400, f"{name} is not supported by localmoe", param=name)
    for name, neutral in LLAMA_CPP_NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral:
            instead = f": send {SUPPORTED_INSTEAD[name]}" if name in SUPPORTED_INSTEAD else ""
            raise ApiError(400, f"{name} is not supported by localmoe{instead}", param=name)
    n = _number(body, "n", 1, 1, integer=True)
    del n  # only 1 is accepted: one answer per request
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    overrides: dict[str, Any] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) == -1:  # llama.cpp's "no limit" (its web UI sends it): the model's own budget, as unset
            body = {k: v for k, v in body.items() if k != name}
    max_tokens = _number(body, "max_completion_tokens", 1, 1_000_000, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1_000_000, integer=True)
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    for name, lo, hi, lo_open in (("temperature", 0, 2, False), ("top_p", 0, 1, True)):
        value = _number(body, name, lo, hi, lo_open=lo_open)
        if value is not None:
            overrides[name] = float(value)
    for name, lo, hi, integer, lo_open in LLAMA_CPP_SAMPLING:
        value = _number(body, name, lo, hi, integer=integer, lo_open=lo_open)
        if value is not None:  # top_k -1 (vLLM's "off") is llama.cpp's 0
            overrides[name] = max(0, int(value)) if integer else float(value)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    if seed is not None:
        overrides["seed"] = seed
    return ChatRequest(model=model, prompt=turns[-1]["content"], history=turns[:-1], stream=bool(stream),
                       include_usage=bool(options.get("include_usage")), overrides=overrides)


def finish_reason(stop_reason: str | None) -> str:
    """OpenAI's finish_reason for a localmoe stop_reason: `length` when cut off, `stop` for every other end (the model
    ended, a loop was stopped)."""
    return "length" if stop_reason == "length" else "stop"


def usage(out: dict[str, Any]) -> dict[str, int]:
    u = out.get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(out: dict[str, Any]) -> dict[str, Any]:
    """The `localmoe` field: everything `ask --json` reports (route, energy, expert cache, timing, ids) but the
    answer, which is the message's content."""
    return {k: v for k, v in out.items() if k not in ("answer", "usage")}


def completion(request_id: str, out: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": out.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason(out.get("stop_reason")), "logprobs": None}],
        "usage": usage(out), "localmoe": extension(out),
    }


def chunk(request_id: str, model: str, delta: dict[str, Any], finish: str | None = None,
          created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created or int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def model_list(ids: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "localmoe"}
                                       for i in ids]}
