"""The remote tier against a real local HTTP server speaking the OpenAI streaming protocol."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_tui import type_and_send, wait_for
from textual.widgets import Static

from helpers import run_cli
from localmoe.chat.assistant import REMOTE_SEEN_FILE, Assistant
from localmoe.chat.display import stats_line
from localmoe.engine import GenerationConfig
from localmoe.engine.remote import RemoteEngine
from localmoe.errors import LocalmoeError
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []
    listed = ["fake-model", "other-model:latest"]  # what /v1/models lists

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # /v1/models
        listed = FakeOpenAI.listed
        data = None if listed is None else [{"id": i} for i in listed]
        self._send(200, "application/json", json.dumps({"data": data}).encode())

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
    assert "seed" not in req["body"]
    list(e.stream([{"role": "user", "content": "Again?"}], GenerationConfig(max_tokens=32, seed=7)))
    assert FakeOpenAI.requests[-1]["body"]["seed"] == 7  # a client's seed reaches the remote tier


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
    assert out["usage"]["prompt_tokens"] == 12 and out["usage"]["completion_tokens"] == 4
    assert out["usage"]["prompt_eval_tokens"] is None  # the server does not say what it reused
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


def test_a_model_the_remote_does_not_serve_falls_back_to_the_small_model(home, server):
    """A remote_model the endpoint does not list is found out when the tier loads (GET /models), so a routed
    question falls back to the small model with the reason, as for an unreachable server (it failed the question)."""
    with pytest.raises(LocalmoeError, match=r"has no model 'nosuch' \(it serves fake-model, other-model:latest; "
                                            r"remote_model"):
        RemoteEngine(server, "nosuch", timeout=5).load()
    RemoteEngine(server, "fake-model", timeout=5).load()
    RemoteEngine(server, "other-model", timeout=5).load()  # Ollama lists name:latest and answers to name
    RemoteEngine(server, "default", timeout=5).load()  # no model named: whatever the server serves
    try:
        FakeOpenAI.listed = ["/models/the-one.gguf"]  # llama.cpp's server: one model, whatever name is asked
        RemoteEngine(server, "nosuch", timeout=5).load()
        FakeOpenAI.listed = None  # {"data": null}: a listing that says nothing refuses nothing
        RemoteEngine(server, "nosuch", timeout=5).load()
    finally:
        FakeOpenAI.listed = ["fake-model", "other-model:latest"]
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nremote = "{server}"\nremote_model = "nosuch"\n'
                                        '[router]\nstrategy = "features"\npreference = 0.01\n')
    r = run_cli("ask", HARD_Q, "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "smollm2-135m-instruct" and out["route"]["tier"] == "small"
    assert "has no model 'nosuch'" in r.stderr and "Traceback" not in r.stderr
    assert FakeOpenAI.requests == []  # no question was sent


def test_remote_must_be_a_url(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nremote = "file:///etc/passwd"\n')
    r = run_cli("route", "hi")
    assert r.returncode == 1 and "http(s) URL" in r.stderr


# -- nothing leaves silently ---------------------------------------------------------------------------------------
HARD_Q = "What is 17 * 23 + 4? Answer with a number only."
ANNOUNCED = "leaves this machine"


def remote_settings(home, server: str, extra: str = "") -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nremote = "{server}"\nremote_model = "fake-model"\n{extra}'
                                        '[router]\nstrategy = "features"\npreference = 0.01\n')


def test_the_first_remote_question_is_announced_once_then_each_badge_names_the_host(home, server):
    remote_settings(home, server)
    first = run_cli("ask", "hi", "--tier", "remote", "--json")
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(ANNOUNCED) == 1 and f"remote tier at {server}" in first.stderr
    assert json.loads(first.stdout)["endpoint"] == server
    seen = home / REMOTE_SEEN_FILE
    assert seen.read_text().split() == [server] and stat.S_IMODE(seen.stat().st_mode) == 0o600
    second = run_cli("ask", HARD_Q, "--json")  # routed there this time: known, so not announced again
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert out["route"]["tier"] == "remote" and out["endpoint"] == server and ANNOUNCED not in second.stderr
    # the badge (the stats line under the answer, CLI and chat alike) names the host
    assistant = Assistant()
    try:
        routed = assistant.ask("hi", tier="remote").run()
        assert routed.remote_notice is None
        r = routed.reply
        port = server.split(":")[2].split("/")[0]
        assert stats_line(r.model, r.stats, r.status, r.energy).startswith(
            f"remote:fake-model @ 127.0.0.1:{port} · 4 tokens")
    finally:
        assistant.close()
        assistant.recorder.close()
    # another endpoint is another first time
    other = server.replace("127.0.0.1", "localhost")
    remote_settings(home, other)
    third = run_cli("ask", "hi", "--tier", "remote", "--json")
    assert third.returncode == 0 and third.stderr.count(ANNOUNCED) == 1 and other in third.stderr


def test_the_chat_announces_the_first_remote_question_and_badges_the_host(home, server):
    remote_settings(home, server)
    shown: list[str] = []

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=16, temperature=0.0))
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.screen
            notify = screen.notify
            screen.notify = lambda message, **kw: (shown.append(str(message)), notify(message, **kw))[1]
            for n in (1, 2):
                await type_and_send(pilot, HARD_Q)
                await wait_for(pilot, lambda n=n: len(screen.query(Answer)) == n and screen.query(Answer)[-1].done)
                answer = screen.query(Answer)[-1]
                assert answer.decision.tier == "remote" and answer.text == "Paris is the capital."
                assert str(answer.query_one(".stats", Static).render()).startswith(
                    f"remote:fake-model @ {server.split('/')[2]} · ")

    asyncio.run(run())
    announced = [m for m in shown if ANNOUNCED in m]
    assert len(announced) == 1 and server in announced[0]


def test_with_remote_forbidden_nothing_is_sent(home, server):
    remote_settings(home, server, "allow_remote = false\n")
    r = run_cli("ask", HARD_Q, "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    route = json.loads(r.stdout)["route"]
    assert route["wanted"] == "large" and route["tier"] == "small"
    assert "allow_remote = false" in route["notice"] and "allow_remote = false" in r.stderr
    refused = run_cli("ask", "hi", "--tier", "remote")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "allow_remote = false" in refused.stderr
    assert FakeOpenAI.requests == [] and not (home / REMOTE_SEEN_FILE).exists()
    remote_settings(home, server, 'allow_remote = "no"\n')
    bad = run_cli("route", "hi")
    assert bad.returncode == 1 and "allow_remote must be true or false" in bad.stderr


# -- what goes wrong at the other end ------------------------------------------------------------------------------


class Misbehaving(BaseHTTPRequestHandler):
    """An endpoint whose `mode` decides its failure: an HTTP status, a malformed event, or a slow endless stream
    that notes when the client hangs up."""

    mode = "ok"
    sent = 0
    hung_up = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # /v1/models
        if Misbehaving.mode in ("401", "500-always"):
            self.send_error(401 if Misbehaving.mode == "401" else 500)
            return
        data = json.dumps({"data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if Misbehaving.mode == "401":
            self.send_error(401)
            return
        if Misbehaving.mode.startswith("500"):
            self.send_error(500)
            return
        if Misbehaving.mode == "404-openai":  # an OpenAI-shaped error: its message is what the user needs
            data = json.dumps({"error": {"message": "The model `nosuch` does not exist.", "type": "x",
                                         "code": "model_not_found"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # no length: HTTP/1.0, the body ends when the connection does
        event = json.dumps({"choices": [{"delta": {"content": "word "}, "finish_reason": None}]})
        if Misbehaving.mode == "malformed":
            self.wfile.write(f"data: {event}\n\ndata: {{\"choices\": [{{\"delta\": \n\n".encode())
            return
        try:  # "slow": an answer of 200 words at 50 a second, unless the client hangs up first
            for _ in range(200):
                self.wfile.write(f"data: {event}\n\n".encode())
                self.wfile.flush()
                Misbehaving.sent += 1
                time.sleep(0.02)
        except OSError:  # broken pipe or reset: the client closed the connection
            Misbehaving.hung_up.set()


@pytest.fixture()
def bad_server():
    Misbehaving.mode, Misbehaving.sent = "ok", 0
    Misbehaving.hung_up = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("mode", "status"), [("401", "HTTP 401"), ("500", "HTTP 500"),
                                            ("404-openai", "HTTP 404: Not Found: The model `nosuch` does not exist.")])
def test_http_errors_are_one_line_errors_naming_the_status(bad_server, mode, status):
    Misbehaving.mode = mode
    e = RemoteEngine(bad_server, "fake-model", timeout=5)
    if mode == "401":  # refused at the first contact
        with pytest.raises(LocalmoeError) as caught:
            e.load()
    else:  # the server lists its models, then fails the question
        e.load()
        with pytest.raises(LocalmoeError) as caught:
            list(e.stream(ASK, GenerationConfig(max_tokens=8)))
    message = str(caught.value)
    assert "\n" not in message and f"answered {status}" in message and bad_server in message, message


@pytest.mark.parametrize("mode", ["401", "500-always"])
def test_the_cli_reports_an_http_error_of_the_remote_tier_in_one_line(home, bad_server, mode):
    Misbehaving.mode = mode
    remote_settings(home, bad_server)
    (home / "settings.toml").chmod(0o600)  # else a notice says the CLI made it private
    r = run_cli("ask", "hi", "--tier", "remote")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("localmoe: error: "), r.stderr
    assert f"HTTP {mode[:3]}" in lines[0], lines[0]


def test_a_malformed_event_is_a_clear_error(bad_server):
    Misbehaving.mode = "malformed"
    e = RemoteEngine(bad_server, "fake-model", timeout=5)
    got = []
    with pytest.raises(LocalmoeError, match="sent a malformed event") as caught:
        for piece in e.stream(ASK, GenerationConfig(max_tokens=8)):
            got.append(piece)
    assert got == ["word "] and "\n" not in str(caught.value)


def test_cancelling_mid_stream_hangs_up_on_the_server(bad_server):
    Misbehaving.mode = "slow"
    e = RemoteEngine(bad_server, "fake-model", timeout=5)
    cancel = threading.Event()
    got = []
    for piece in e.stream(ASK, GenerationConfig(max_tokens=500), cancel=cancel):
        got.append(piece)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3 and e.stats.stop_reason == "cancelled"
    # the server, still writing, finds the connection closed long before its 200 words are out
    assert Misbehaving.hung_up.wait(5), "the client kept the connection open"
    assert Misbehaving.sent < 100


def test_a_missing_key_variable_is_a_one_line_error_and_nothing_is_sent(home, server, monkeypatch):
    monkeypatch.delenv("LOCALMOE_TEST_UNSET_KEY", raising=False)
    e = RemoteEngine(server, "fake-model", api_key_env="LOCALMOE_TEST_UNSET_KEY")
    with pytest.raises(LocalmoeError) as caught:
        e.load()
    message = str(caught.value)
    assert "\n" not in message and "LOCALMOE_TEST_UNSET_KEY" in message and "not set" in message, message
    with pytest.raises(LocalmoeError, match="LOCALMOE_TEST_UNSET_KEY"):
        list(e.stream(ASK, GenerationConfig(max_tokens=8)))
    assert FakeOpenAI.requests == []  # the question never left without its key
    # through the CLI: the settings name a variable that is not set
    remote_settings(home, server, 'remote_api_key_env = "LOCALMOE_TEST_UNSET_KEY"\n')
    (home / "settings.toml").chmod(0o600)
    r = run_cli("ask", "hi", "--tier", "remote")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("localmoe: error: "), r.stderr
    assert "LOCALMOE_TEST_UNSET_KEY" in lines[0] and FakeOpenAI.requests == []


def test_the_loop_guard_hangs_up_on_a_remote_model_that_loops(bad_server, server):
    """A remote answer repeating "word " is stopped by the same guard as the local engines (stop reason, the text
    to keep) and the server finds the connection closed; an answer that does not loop streams to its end."""
    Misbehaving.mode = "slow"
    e = RemoteEngine(bad_server, "fake-model", timeout=5)
    got = list(e.stream(ASK, GenerationConfig(max_tokens=500, loop_guard=True)))
    assert e.stats.stop_reason == "repetition" and len(got) < 60
    assert 0 < e.stats.kept_chars < len("".join(got))
    assert Misbehaving.hung_up.wait(5) and Misbehaving.sent < 100
    fine = RemoteEngine(server, "fake-model")
    whole = "".join(fine.stream(ASK, GenerationConfig(max_tokens=64, loop_guard=True)))
    assert whole == "".join(fine.stream(ASK, GenerationConfig(max_tokens=64)))
    assert fine.stats.stop_reason != "repetition"
