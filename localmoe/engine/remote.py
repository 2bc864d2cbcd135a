"""An OpenAI-compatible chat endpoint as the `remote` tier: used only when the user configures a URL.

Streams `POST {url}/chat/completions` with `stream: true` (server-sent events) through the standard library.
The API key, if any, is read from an environment variable named in the settings, never stored.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

from localmoe.engine.base import Engine, GenerationConfig, GenerationStats, Message, stop_after
from localmoe.engine.loopguard import LoopGuard
from localmoe.errors import LocalmoeError

TIMEOUT_S = 30.0


def _said(exc: urllib.error.HTTPError) -> str:
    """What the server said with its error status: an OpenAI-shaped error's message, else the start of its body."""
    try:
        body = exc.read(4096).decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - a body cut short (IncompleteRead is no OSError): the status alone
        body = ""
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = body
    text = " ".join(str(message or "").split())[:200]
    return f"{exc.reason}: {text}" if text else str(exc.reason)


class RemoteEngine(Engine):
    backend = "remote"

    def __init__(self, url: str, model: str, *, model_id: str | None = None, api_key_env: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.model_id = model_id or f"remote:{model}"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self._stats = GenerationStats()
        self._loaded = False

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if self.api_key_env and not key:
            # The settings say this endpoint needs a key: asking without it would only fail there, or worse not.
            raise LocalmoeError(f"the remote tier {self.url} needs its API key in the environment variable "
                                f"{self.api_key_env} (remote_api_key_env), which is not set")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise LocalmoeError(f"remote tier {self.url} answered HTTP {exc.code}: {_said(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LocalmoeError(f"cannot reach the remote tier {self.url}: {reason}") from None

    def load(self) -> None:
        """Check the endpoint answers (`GET /models`) and serves the model asked for, so an unreachable server or a
        wrong model name falls back before a question rather than failing it."""
        if not self._loaded:
            resp = self._request("/models")
            try:
                listed = json.loads(resp.read(1 << 20) or b"null")
            except (ValueError, OSError):
                listed = None  # a server that does not list its models: the question will tell
            finally:
                resp.close()
            data = listed.get("data") if isinstance(listed, dict) else None
            ids = [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []
            # Ollama lists `name:latest` and takes `name`; llama.cpp's server lists its one model and answers to
            # any name: refuse only a name a server with several models lists in no form
            known = {*ids, *(i.split(":", 1)[0] for i in ids)}
            if self.model != "default" and len(ids) > 1 and self.model not in known:
                shown = ", ".join(str(i) for i in ids[:5]) + (" …" if len(ids) > 5 else "")
                raise LocalmoeError(f"the remote tier {self.url} has no model {self.model!r} (it serves {shown}; "
                                    "remote_model in settings.toml)")
            self._loaded = True

    def stream(self, messages: list[Message], config: GenerationConfig,
               cancel: threading.Event | None = None) -> Iterator[str]:
        t0 = time.perf_counter()
        stats = self._stats = GenerationStats(stop_reason="stop")
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": config.max_tokens,
                "temperature": config.temperature, "top_p": config.top_p,
                "stream_options": {"include_usage": True}}
        if config.seed is not None:  # OpenAI's own field; llama.cpp's top_k / min_p / repeat_penalty are not, and an
            body["seed"] = config.seed  # OpenAI server refuses what it does not know
        t_first = t_last = None
        pieces = 0
        # the loop guard runs here too, on the streamed pieces (about a token each; their checksum stands for the
        # token id the server does not send): a remote model that loops costs its energy as much as a local one
        guard = LoopGuard() if config.loop_guard else None
        resp = self._request("/chat/completions", body)
        try:
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    raise LocalmoeError(f"remote tier {self.url} sent a malformed event: {payload[:80]}") from None
                usage = event.get("usage") or {}
                if usage:
                    stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    stats.completion_tokens = int(usage.get("completion_tokens") or stats.completion_tokens)
                stop = False
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason") == "length":
                        stats.stop_reason = "length"
                    if text:
                        now = time.perf_counter()
                        if t_first is None:
                            t_first, stats.ttft_s = now, now - t0
                        t_last = now
                        pieces += 1
                        stats.completion_tokens = max(stats.completion_tokens, pieces)
                        yield text
                        # Closing the connection is all a client can do (on a loop, a cancel, the budget); the server
                        # decides when it stops.
                        # (the server keeps the token budget and says when it cut the answer)
                        stop = stop_after(zlib.crc32(text.encode()), text, stats, sys.maxsize, guard, cancel)
                        if stop:
                            break
                if stop:
                    break
                if cancel is not None and cancel.is_set():
                    stats.stop_reason = "cancelled"
                    break
        except GeneratorExit:
            stats.stop_reason = "cancelled"
            raise
        except OSError as exc:
            raise LocalmoeError(f"the remote tier {self.url} dropped the connection: {exc}") from None
        finally:
            resp.close()
            stats.wall_s = time.perf_counter() - t0
            if t_first is not None and t_last is not None and pieces > 1 and t_last > t_first:
                stats.tokens_per_s = (pieces - 1) / (t_last - t_first)

    def close(self) -> None:
        self._loaded = False
