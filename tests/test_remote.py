"""The remote tier against a real local HTTP server speaking the OpenAI streaming protocol."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import run_cli
from localmoe.engine import GenerationConfig
from localmoe.engine.remote import RemoteEngine
from localmoe.errors import LocalmoeError


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # /v1/models
        self._send(200, "application/json", json.dumps({"data": [{"id": "fake-model"}]}).encode())

    def do_POST(self) -> None:  # /v1/chat/completions
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        events = [{"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
                  for piece in ("Paris", " is", " the", " capital.")]
        events.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4}})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, "text/event-stream", payload.encode())

    def _send(self, code: int, ctype: str, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    FakeOpenAI.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_engine_streams_and_reports_usage(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    e = RemoteEngine(server, "fake-model", api_key_env="MY_KEY")
    e.load()
    pieces = list(e.stream([{"role": "user", "content": "Capital of France?"}], GenerationConfig(max_tokens=32)))
    assert pieces == ["Paris", " is", " the", " capital."]
    assert (e.stats.prompt_tokens, e.stats.completion_tokens, e.stats.stop_reason) == (12, 4, "stop")
    assert e.stats.ttft_s is not None and e.stats.ttft_s >= 0
    [req] = FakeOpenAI.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "fake-model" and req["body"]["stream"] is True
    assert req["body"]["messages"][-1] == {"role": "user", "content": "Capital of France?"}


def test_unreachable_remote_is_a_clear_error():
    e = RemoteEngine(f"http://127.0.0.1:{closed_port()}/v1", "m", timeout=2)
    with pytest.raises(LocalmoeError, match="cannot reach the remote tier"):
        e.load()


def test_hard_questions_go_to_the_remote_tier_when_there_is_no_large_model(home, server):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nremote = "{server}"\nremote_model = "fake-model"\n'
                                        '[router]\nstrategy = "features"\npreference = 0.01\n')
    r = run_cli("ask", "What is 17 * 23 + 4? Answer with a number only.", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"] == "Paris is the capital." and out["model"] == "remote:fake-model"
    assert out["route"]["tier"] == "remote" and "no large model" in out["route"]["notice"]
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 4}
    forced = json.loads(run_cli("ask", "hi", "--json", "--tier", "remote").stdout)
    assert forced["model"] == "remote:fake-model"


def test_an_unreachable_remote_falls_back_to_the_small_model(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nremote = "http://127.0.0.1:{closed_port()}/v1"\n'
                                        '[router]\nstrategy = "features"\npreference = 0.01\n')
    r = run_cli("ask", "What is 17 * 23 + 4? Answer with a number only.", "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "smollm2-135m-instruct" and out["route"]["tier"] == "small"
    assert "cannot reach the remote tier" in r.stderr and "Traceback" not in r.stderr


def test_remote_must_be_a_url(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nremote = "file:///etc/passwd"\n')
    r = run_cli("route", "hi")
    assert r.returncode == 1 and "http(s) URL" in r.stderr
