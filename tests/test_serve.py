"""`localmoe serve` as its users meet it: a real server process on 127.0.0.1, the official `openai` client, the real
embedded model, the server's own SQLite file; and localmoe's remote tier pointed at it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openai import AuthenticationError, BadRequestError, DefaultHttpxClient, NotFoundError, OpenAI

from helpers import run_cli

KEY_ENV = "LOCALMOE_TEST_SERVE_KEY"
KEY = "test-key-0123456789"
QUEUE = 3  # small, so eight clients at once overflow it
QUESTION = "What is the capital of France?"


class Server:
    def __init__(self, url: str, home: Path, proc: subprocess.Popen) -> None:
        self.url, self.home, self.proc = url, home, proc
        self.host, port = url.split("//")[1].split("/")[0].split(":")
        self.port = int(port)

    def client(self, **kw: Any) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=kw.pop("api_key", KEY), max_retries=kw.pop("max_retries", 0), **kw)

    def rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.home / "localmoe.db")
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def post(self, body: bytes | dict, path: str = "/chat/completions", key: str | None = KEY) -> tuple[int, Any]:
        """A raw request, for bodies no client library would send."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def raw(self, method: str, path: str, headers: dict[str, str],
            body: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request sent as a browser would (its own headers, no key unless given)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def declare_huge_body(self) -> tuple[int, Any]:
        """Headers announcing a 9 MiB body, then nothing: the server must refuse it without reading it."""
        host, port = self.url.split("//")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.putrequest("POST", "/v1/chat/completions")
            for name, value in (("Content-Type", "application/json"), ("Content-Length", str(9 * 2**20)),
                                ("Authorization", f"Bearer {KEY}")):
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(home: Path, *args: str, python: str | None = None) -> Server:
    """A `localmoe serve --api-key-env` process on a free port, its data in `home`, its output in home/server.log,
    once it answers /health. `python`: code to run instead of the command (`{port}` in it is the port), for what
    `serve()` takes and the command line does not."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = (["-c", python.format(port=port)] if python is not None else
            ["-m", "localmoe", "serve", "--port", str(port), "--api-key-env", KEY_ENV, *args])
    env = {**os.environ, "LOCALMOE_HOME": str(home), KEY_ENV: KEY}
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {(home / 'server.log').read_text()}")
        time.sleep(0.1)
    return Server(f"http://127.0.0.1:{port}/v1", home, proc)


def stop(server: Server, sig: int | None = signal.SIGTERM) -> str:
    """Stop the server as a user does (SIGTERM, or SIGINT: Ctrl-C; None: it was sent already); it must exit 0.
    Returns what it printed."""
    if sig is not None:
        server.proc.send_signal(sig)
    try:
        code = server.proc.wait(timeout=30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = (server.home / "server.log").read_text()
    assert code == 0, log
    return log


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = spawn(tmp_path_factory.mktemp("serve-home"), "--queue", str(QUEUE))
    yield s
    stop(s)  # a graceful stop: uvicorn finishes, the models close, exit 0


def stream_answer(client: OpenAI, **kw: Any) -> tuple[str, Any, Any]:
    """(streamed text, the usage chunk's usage, the final chunk's `localmoe` field)"""
    text, use, ext = [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            use = ch.usage
        if (ch.model_extra or {}).get("localmoe"):
            ext = ch.model_extra["localmoe"]
    return "".join(text), use, ext


def test_answers_equal_ask_json_streamed_and_not(server):
    r = run_cli("ask", QUESTION, "--json", "--temperature", "0", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout)
    client = server.client()
    ask = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 16}
    for model in ("localmoe/auto", "smollm2-135m-instruct"):
        plain = client.chat.completions.create(model=model, **ask)
        assert plain.choices[0].message.content == expected["answer"]
        assert plain.model == expected["model"]
        assert plain.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert plain.usage.completion_tokens == expected["usage"]["completion_tokens"]
        assert plain.choices[0].finish_reason == ("length" if expected["stop_reason"] == "length" else "stop")
        ext = plain.model_extra["localmoe"]
        assert ext["route"]["tier"] == "small" and ext["sampling"] == expected["sampling"]
        assert ext["energy"]["joules"] > 0 and ext["timing"]["tokens_per_s"] > 0

        text, use, ext = stream_answer(client, model=model, **ask)
        assert text == expected["answer"]
        assert (use.prompt_tokens, use.completion_tokens) == (expected["usage"]["prompt_tokens"],
                                                              expected["usage"]["completion_tokens"])
        assert ext["route"]["tier"] == "small" and ext["message_id"] and ext["energy"]["joules"] > 0
    # the auto answers carry the router's own decision, the named model's the tier it was asked on
    rows = server.rows("select d.strategy, a.content, q.content as prompt, r.client, r.user_agent, r.stream, r.model "
                       "from routing_decisions d join messages a on a.id = d.message_id "
                       "join messages q on q.id = a.reply_to join api_requests r on r.message_id = a.id "
                       "order by a.id desc limit 4")
    assert [x["strategy"] for x in rows][::-1] == [expected["route"]["strategy"]] * 2 + ["override"] * 2
    assert all(x["content"] == expected["answer"] and x["prompt"] == QUESTION for x in rows)
    assert [x["model"] for x in rows][::-1] == ["localmoe/auto"] * 2 + ["smollm2-135m-instruct"] * 2
    assert all(x["client"].startswith("127.0.0.1:") and x["user_agent"].startswith("OpenAI/Python") for x in rows)
    assert [x["stream"] for x in rows][::-1] == [0, 1, 0, 1]


def test_auto_routes_as_the_route_command(server):
    client = server.client()
    prompts = ["What is the capital of France? Answer with one word.",
               "A train leaves at 3:40 pm at 72 km/h and a second one at 4:05 pm at 90 km/h on the same "
               "track; at what time, to the minute, does the second catch up, and how far have they gone?"]
    tiers = set()
    for prompt in prompts:
        r = run_cli("route", prompt, "--json")
        assert r.returncode == 0, r.stderr
        want = json.loads(r.stdout)
        got = client.chat.completions.create(model="localmoe/auto", max_tokens=1, temperature=0,
                                             messages=[{"role": "user", "content": prompt}])
        route = got.model_extra["localmoe"]["route"]
        for key in ("tier", "model", "strategy", "threshold", "wanted", "probably_wrong"):
            assert route[key] == want[key], key
        assert route["score"] == pytest.approx(want["score"], abs=1e-6)
        tiers.add(want["wanted"] or want["tier"])
    assert tiers == {"small", "large"}  # one question for each side of the threshold


def test_disconnect_mid_stream_stops_decoding(server):
    client = server.client()
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=400, temperature=0.8, seed=7, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}])
    pieces = 0
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            pieces += 1
            if pieces == 3:
                break
    stream.close()
    deadline = time.monotonic() + 30
    while True:
        [row] = server.rows("select m.status, g.completion_tokens, g.stop_reason from messages m "
                            "left join generations g on g.message_id = m.id where m.role = 'assistant' "
                            "order by m.id desc limit 1")
        if row["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row["status"] == "cancelled" and row["stop_reason"] == "cancelled"
    assert 3 <= row["completion_tokens"] < 40  # of 400 allowed: the engine stopped soon after the client left
    [req] = server.rows("select * from api_requests order by id desc limit 1")
    assert req["error"] == "client disconnected" and req["stream"] == 1
    assert req["http_status"] == 200  # its stream had begun

    # a client that gives up on a plain (non-streamed) answer stops it too
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 400, "temperature": 0.8, "seed": 7,
                       "messages": [{"role": "user", "content": "Write a long story about a cat and a violin."}]})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 30
        while not server.rows("select id from messages where content = 'Write a long story about a cat and a "
                              "violin.'") and time.monotonic() < deadline:
            time.sleep(0.02)  # until the question is recorded: its answer is being made
    deadline = time.monotonic() + 30
    while True:
        [row] = server.rows("select m.status, g.completion_tokens from messages m join messages q on q.id = "
                            "m.reply_to left join generations g on g.message_id = m.id where q.content = 'Write a "
                            "long story about a cat and a violin.'")
        if row["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row["status"] == "cancelled" and row["completion_tokens"] < 100
    # nothing was sent to it: recorded as nginx's 499, not as a 200 it never got (the row follows the answer's)
    deadline = time.monotonic() + 10
    while not (reqs := server.rows(
            "select r.http_status, r.error from api_requests r join messages m on m.id = r.message_id join "
            "messages q on q.id = m.reply_to where q.content = 'Write a long story about a cat and a violin.'")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(r["http_status"], r["error"]) for r in reqs] == [(499, "client disconnected")]


def test_eight_clients_none_lost_all_recorded_and_the_queue_limit_answers_429(server):
    refused: list[tuple[dict, dict]] = []

    def capture(response: Any) -> None:
        if response.status_code == 429:
            response.read()
            refused.append((dict(response.headers), response.json()))

    before = server.rows("select coalesce(max(id), 0) as n from api_requests")[0]["n"]
    clients, per_client = 8, 10
    answers: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def one_client(i: int) -> None:
        # the client's own retries honour the server's Retry-After: every request ends up answered. Each wait is at
        # least one answer's time, so 100 of them outlast the 80 answers the other clients can take ahead of it
        client = server.client(max_retries=100, http_client=DefaultHttpxClient(event_hooks={"response": [capture]}))
        try:
            answers[i] = [client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=2, temperature=0,
                messages=[{"role": "user", "content": f"Say the number {i}."}]).choices[0].message.content
                for _ in range(per_client)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[0]
    assert sorted(answers) == list(range(clients)) and all(len(a) == per_client for a in answers.values())
    assert all(len(set(a)) == 1 for a in answers.values())  # greedy: each client got the same answer every time
    rows = server.rows("select r.http_status, m.status, q.content as prompt from api_requests r "
                       "left join messages m on m.id = r.message_id left join messages q on q.id = m.reply_to "
                       "where r.id > ?", (before,))
    answered = [r for r in rows if r["http_status"] == 200]
    assert len(answered) == clients * per_client
    assert all(r["status"] == "complete" for r in answered)
    for i in range(clients):
        assert sum(r["prompt"] == f"Say the number {i}." for r in answered) == per_client
    assert refused, "eight clients never overflowed a queue of 3"
    assert len([r for r in rows if r["http_status"] == 429]) == len(refused)
    headers, body = refused[0]
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"


def test_errors_have_openai_shapes_and_the_server_keeps_serving(server):
    def check(status_body: tuple[int, Any], status: int, code: str | None = None, param: str | None = None) -> None:
        got, body = status_body
        assert got == status, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
        if code is not None:
            assert err["code"] == code
        if param is not None:
            assert err["param"] == param

    ok = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    check(server.post(b'{"model": "smollm2-135m-instruct", "messages": [}'), 400, code="invalid_json")
    check(server.post(b"[1, 2]"), 400)
    check(server.post({**ok, "messages": []}), 400, param="messages")
    check(server.post({**ok, "messages": [{"role": "robot", "content": "hi"}]}), 400, param="messages")
    check(server.post({**ok, "temperature": 9}), 400, param="temperature")
    check(server.post({**ok, "max_tokens": 0}), 400, param="max_tokens")
    check(server.post({**ok, "stream": "yes"}), 400, param="stream")
    check(server.post({**ok, "model": "gpt-9"}), 404, code="model_not_found", param="model")
    check(server.post(ok, key="wrong"), 401, code="invalid_api_key")
    check(server.post(ok, key=None), 401, code="invalid_api_key")
    check(server.post(ok, path="/nowhere"), 404)
    # a prompt longer than the model's context, and one over the character limit
    check(server.post({**ok, "messages": [{"role": "user", "content": "word " * 6000}]}), 400,
          code="context_length_exceeded", param="messages")
    check(server.post({**ok, "messages": [{"role": "user", "content": "x" * 200_001}]}), 400,
          code="context_length_exceeded", param="messages")
    # a client's own history too long: refused as OpenAI does, not cut short as the chat's is
    history = [{"role": "user", "content": "word " * 6000}, {"role": "assistant", "content": "ok"}]
    check(server.post({**ok, "messages": [*history, {"role": "user", "content": "Hi"}]}), 400,
          code="context_length_exceeded", param="messages")
    check(server.post({**ok, "response_format": {"type": "json_object"}}), 400, param="response_format")
    for name, value in (("logprobs", True), ("frequency_penalty", 0.5), ("presence_penalty", -1)):
        check(server.post({**ok, name: value}), 400, param=name)
    # the defaults, sent explicitly (many clients do)
    status, body = server.post({**ok, "response_format": {"type": "text"}, "logprobs": False,
                                "frequency_penalty": 0, "presence_penalty": 0.0})
    assert status == 200 and body["choices"][0]["message"]["content"], body
    check(server.declare_huge_body(), 413, code="request_too_large")

    client = server.client()
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(model="localmoe/auto", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert exc.value.body["param"] == "n"
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "localmoe/auto" and "smollm2-135m-instruct" in ids
    answer = client.chat.completions.create(**ok)  # still serving
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    refused = server.rows("select http_status, error from api_requests where http_status >= 400 and "
                          "http_status != 429 order by id desc limit 14")
    assert {r["http_status"] for r in refused} == {400, 401, 404, 413} and all(r["error"] for r in refused)


def test_the_remote_tier_answers_through_localmoe_serve(server, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nremote = "{server.url}"\nremote_model = "localmoe/auto"\n'
                                        f'remote_api_key_env = "{KEY_ENV}"\n')
    r = run_cli("ask", QUESTION, "--tier", "remote", "--json", "--temperature", "0", "--max-tokens", "16",
                env_extra={KEY_ENV: KEY})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    direct = server.client().chat.completions.create(
        model="localmoe/auto", temperature=0, max_tokens=16, messages=[{"role": "user", "content": QUESTION}])
    assert out["answer"] == direct.choices[0].message.content and out["answer"]
    assert out["endpoint"] == server.url and out["model"] == "remote:localmoe/auto"
    assert (out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]) == (direct.usage.prompt_tokens,
                                                                              direct.usage.completion_tokens)
    wrong = run_cli("ask", QUESTION, "--tier", "remote", "--json", env_extra={KEY_ENV: "not-the-key"})
    assert wrong.returncode != 0 and "HTTP 401" in json.loads(wrong.stdout)["error"]


def test_refused_starts_are_one_line():
    r = run_cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and "--api-key-env" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", "--port", "0", "--api-key-env", "LOCALMOE_TEST_UNSET_VARIABLE",
                env_extra={"LOCALMOE_TEST_UNSET_VARIABLE": ""})
    assert r.returncode == 2 and "LOCALMOE_TEST_UNSET_VARIABLE" in r.stderr
    r = run_cli("serve", "--queue", "-1")
    assert r.returncode == 2 and "--queue" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = run_cli("serve", "--port", str(taken.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr



def test_forgetting_a_conversation_forgets_its_requests(server):
    answer = server.client().chat.completions.create(model="smollm2-135m-instruct", max_tokens=2,
                                                     messages=[{"role": "user", "content": "Forget me."}])
    message_id = answer.model_extra["localmoe"]["message_id"]
    assert server.rows("select id from api_requests where message_id = ?", (message_id,))
    r = run_cli("logs", "--delete", str(answer.model_extra["localmoe"]["conversation_id"]), "--yes",
                home=server.home)
    assert r.returncode == 0, r.stderr
    assert not server.rows("select id from api_requests where message_id = ?", (message_id,))


def test_beyond_loopback_with_a_key(tmp_path):
    port = free_port()
    env = {**os.environ, "LOCALMOE_HOME": str(tmp_path / "home"), KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--api-key-env", KEY_ENV], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        server = Server(f"http://127.0.0.1:{port}/v1", tmp_path / "home", proc)
        with pytest.raises(AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert [m.id for m in server.client().models.list()][0] == "localmoe/auto"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a normal stop
        assert proc.wait(timeout=30) == 0
    assert "key required" in proc.stderr.read()


def read_events(resp: http.client.HTTPResponse, until: Any = None) -> list[Any]:
    """The `data:` payloads of a server-sent event stream (JSON, or the string `[DONE]`), up to the one for which
    `until(events so far)` is true, or to the end of the stream."""
    events: list[Any] = []
    while True:
        line = resp.readline()
        if not line:
            return events
        line = line.decode().strip()
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if until is not None and until(events):
                return events


def texts(events: list[Any]) -> int:
    """How many of `events` carry answer text."""
    return sum(1 for e in events if isinstance(e, dict) and e.get("choices")
               and e["choices"][0]["delta"].get("content"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_the_server_mid_stream_tells_the_clients_and_records_each_request_once(tmp_path, sig):
    server = spawn(tmp_path / "home")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "smollm2-135m-instruct", "max_tokens": 1000, "temperature": 0.8, "seed": 7, "stream": True,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = read_events(resp, until=lambda ev: texts(ev) >= 3)
    # a second request waits for the model behind the stream
    queued: dict[str, Any] = {}

    def wait_in_queue() -> None:
        queued["status"], queued["body"] = server.post(
            {"model": "smollm2-135m-instruct", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})

    waiting = threading.Thread(target=wait_in_queue)
    waiting.start()
    deadline = time.monotonic() + 30
    while json.loads(urllib.request.urlopen(f"http://{server.host}:{server.port}/health").read())[
            "queue"]["waiting"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)

    t0 = time.monotonic()
    server.proc.send_signal(sig)
    events += read_events(resp)  # the rest of the stream, to its end
    assert time.monotonic() - t0 < 3  # stopped at once, not after the answer or uvicorn's 5 s of grace
    conn.close()
    waiting.join(timeout=30)
    log = stop(server, None)
    for trace in ("Traceback", "CancelledError", "Event loop is closed", "ERROR"):
        assert trace not in log, log
    # the stream ends with OpenAI's error shape, not [DONE] or a cut connection
    assert events[-1]["error"]["code"] == "server_shutting_down" and "[DONE]" not in events, events[-3:]
    assert events[-1]["error"]["type"] == "server_error"
    assert queued["status"] == 503 and queued["body"]["error"]["code"] == "server_shutting_down"
    rows = server.rows("select r.stream, r.http_status, r.error, m.status, g.completion_tokens from api_requests r "
                       "left join messages m on m.id = r.message_id left join generations g on g.message_id = m.id "
                       "order by r.id")
    assert len(rows) == 2, rows  # one row a request: not "client disconnected" and "internal error" too
    streamed, waited = sorted(rows, key=lambda r: -r["stream"])
    assert streamed["http_status"] == 200 and streamed["status"] == "cancelled"
    assert streamed["error"].startswith("the server is shutting down: the answer was stopped")
    assert 3 <= streamed["completion_tokens"] < 100
    assert waited["http_status"] == 503 and waited["status"] is None
    assert waited["error"].startswith("the server is shutting down: the request was not answered")


def test_the_clients_system_message_and_earlier_turns_are_recorded(server):
    messages = [{"role": "system", "content": "You are a pirate. Answer in one short sentence."},
                {"role": "user", "content": "My name is Zed."},
                {"role": "assistant", "content": "Nice to meet you Zed."},
                {"role": "user", "content": "What is my name?"}]
    answer = server.client().chat.completions.create(model="localmoe/auto", max_tokens=8, temperature=0,
                                                     messages=messages)
    ext = answer.model_extra["localmoe"]
    rows = server.rows("select id, role, content, reply_to, status from messages where conversation_id = ? "
                       "order by id", (ext["conversation_id"],))
    # the conversation as the model read it, then its answer
    assert [(r["role"], r["content"]) for r in rows] == [(m["role"], m["content"]) for m in messages] + [
        ("assistant", answer.choices[0].message.content)]
    assert rows[-1]["id"] == ext["message_id"] and rows[-1]["reply_to"] == rows[3]["id"]
    assert rows[2]["reply_to"] == rows[1]["id"]
    # what the client sent is context, not exchanges of this user's: `logs` lists the question asked, once
    assert [r["status"] for r in rows] == ["context"] * 3 + ["complete"] * 2
    listed = json.loads(run_cli("logs", "--json", home=server.home).stdout)
    assert [x["prompt"] for x in listed if x["conversation_id"] == ext["conversation_id"]] == ["What is my name?"]
    # the model read the client's system message (above), so no model default is stored beside the answer
    assert server.rows("select system_prompt from generations where message_id = ?",
                       (ext["message_id"],)) == [{"system_prompt": None}]
    # a conversation of the server's: its request row ties it to the client
    [req] = server.rows("select r.model, r.client from api_requests r join messages m on m.id = r.message_id "
                        "where m.conversation_id = ?", (ext["conversation_id"],))
    assert req["model"] == "localmoe/auto" and req["client"].startswith("127.0.0.1:")
    r = run_cli("logs", "-q", "Zed", "--json", home=server.home)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert {(f["conversation_id"], f["role"]) for f in found} >= {(ext["conversation_id"], "user"),
                                                                 (ext["conversation_id"], "assistant")}
    r = run_cli("logs", "-q", "pirate", "--json", home=server.home)
    assert [(f["conversation_id"], f["role"]) for f in json.loads(r.stdout)] == [(ext["conversation_id"], "system")]


def test_llama_cpp_sampling_fields_are_applied_checked_or_refused(server):
    client = server.client()
    ask = {"model": "smollm2-135m-instruct", "max_tokens": 24, "messages": [{"role": "user", "content": QUESTION}]}
    greedy = client.chat.completions.create(temperature=0, **ask)
    # top_k 1 keeps only the likeliest token: a hot temperature and any seed then give the greedy answer
    for seed in (1, 2):
        one = client.chat.completions.create(temperature=1.5, seed=seed, extra_body={"top_k": 1}, **ask)
        assert one.choices[0].message.content == greedy.choices[0].message.content
    sampled = client.chat.completions.create(
        temperature=0.7, extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.3}, **ask)
    sampling = sampled.model_extra["localmoe"]["sampling"]
    assert (sampling["top_k"], sampling["min_p"], sampling["repeat_penalty"]) == (20, 0.05, 1.3)
    streamed = stream_answer(client, temperature=0.7, extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.3},
                             **ask)[2]["sampling"]
    assert streamed == sampling

    def refused(field: str, value: Any, words: str) -> None:
        status, body = server.post({**ask, field: value})
        assert status == 400, body
        assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error", body
        assert words in body["error"]["message"], body

    for field, value, words in (("top_k", -2, "at least -1"), ("top_k", 2.5, "an integer"),
                                ("min_p", 1.5, "at most 1"), ("min_p", "0.1", "a number"),
                                ("repeat_penalty", 0, "above 0"), ("repeat_penalty", 11, "at most 10"),
                                ("mirostat", 2, "not supported"), ("typical_p", 0.5, "not supported"),
                                ("grammar", 'root ::= "yes"', "not supported"),
                                ("repeat_last_n", 128, "not supported"), ("n_predict", 50, "max_tokens")):
        refused(field, value, words)
    # what llama.cpp's web UI sends on every request, its values neutral and max_tokens -1 ("no limit": the
    # model's own budget): answered; top_k -1 is off, as in vLLM
    status, body = server.post({**ask, "max_tokens": -1, "top_k": -1, "cache_prompt": True, "samplers": "edkypmxt",
                                "mirostat": 0, "typical_p": 1.0, "xtc_probability": 0, "dry_multiplier": 0,
                                "dynatemp_range": 0, "repeat_last_n": 64, "timings_per_token": False})
    assert status == 200 and body["localmoe"]["sampling"]["top_k"] == 0, body
    assert body["localmoe"]["sampling"]["max_tokens"] > 2, body
    refusals = server.rows("select error from api_requests where http_status = 400 order by id desc limit 11")
    assert len({r["error"] for r in refusals}) == 11


def test_browser_front_ends_on_this_machine_may_call_it_others_may_not(server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    body = {"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://[::1]:8443", "http://localhost"):
        status, headers, _ = server.raw("OPTIONS", "/v1/chat/completions", {"Origin": origin, **preflight})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
        status, headers, data = server.raw("POST", "/v1/chat/completions", {
            "Origin": origin, "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}, body)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
        assert json.loads(data)["choices"][0]["message"]["content"]
    status, headers, _ = server.raw("GET", "/v1/models", {"Origin": "http://localhost:3000",
                                                          "Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    # errors too, so a page can show them; Retry-After readable for its retries
    status, headers, _ = server.raw("POST", "/v1/chat/completions", {"Origin": "http://localhost:3000",
                                                                     "Content-Type": "application/json"}, body)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "retry-after" in headers["Access-Control-Expose-Headers"].lower()
    for origin in ("https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.evil.example:80",
                   "null"):
        status, headers, _ = server.raw("OPTIONS", "/v1/chat/completions", {"Origin": origin, **preflight})
        assert status == 400 and "Access-Control-Allow-Origin" not in headers, origin
        status, headers, data = server.raw("GET", "/v1/models", {"Origin": origin,
                                                                 "Authorization": f"Bearer {KEY}"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers, origin
        assert json.loads(data)["error"]["code"] == "origin_not_allowed"
        # the POST a page may send without asking first (text/plain) is refused too: no answer is made for it
        status, _, data = server.raw("POST", "/v1/chat/completions", {
            "Origin": origin, "Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"}, body)
        assert status == 403 and "--cors-origin" in json.loads(data)["error"]["message"], origin


def test_an_origin_the_user_names_may_call_it_too(tmp_path):
    server = spawn(tmp_path / "home", python=(
        "import sys; from localmoe.server.app import serve; sys.exit(serve(port={port}, api_key_env="
        f"{KEY_ENV!r}, cors_origins=['https://chat.example.com']))"))
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        for origin, allowed in (("https://chat.example.com", True), ("http://localhost:8080", True),
                                ("https://other.example.com", False)):
            status, headers, _ = server.raw("OPTIONS", "/v1/chat/completions", {"Origin": origin, **preflight})
            assert (status, headers.get("Access-Control-Allow-Origin")) == ((200, origin) if allowed else (400, None))
        answer = server.client().chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"Origin": "https://chat.example.com"})
        assert answer.choices[0].message.content
    finally:
        stop(server)
    from localmoe.errors import UsageError
    from localmoe.server.app import cors_origin

    assert cors_origin("https://chat.example.com:8443") == "https://chat.example.com:8443" and cors_origin("*") == "*"
    r = run_cli("serve", "--port", "0", "--cors-origin", "chat.example.com", home=tmp_path / "home")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "scheme://host" in r.stderr, r.stderr
    for wrong in ("chat.example.com", "https://chat.example.com/", "https://chat.example.com/app"):
        with pytest.raises(UsageError, match="scheme://host"):
            cors_origin(wrong)


def test_a_model_that_does_not_let_go_still_ends_the_stream_before_uvicorn_gives_up(caplog):
    """A unit test (the real-model stop is above): a generation stuck where it cannot see the stop (a long prefill)
    must not leave its client to uvicorn's cancellation, which cuts the connection and prints tracebacks."""
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from localmoe.server.app import STOP_GRACE_S, Api, _uvicorn_server, listen

    release = threading.Event()
    recorded: list[str] = []

    class StuckBackend:
        thread = ThreadPoolExecutor(max_workers=1)

        def model_ids(self) -> list[str]:
            return ["stuck"]

        def generate(self, job: Any) -> None:
            job.emit("start", "stuck")
            job.emit_piece("Once")
            release.wait(30)  # blind to job.cancel
            recorded.append("stopped" if job.stopped else "not stopped")

    api = Api(StuckBackend())  # type: ignore[arg-type]
    sock = listen("127.0.0.1", 0)
    server = _uvicorn_server(uvicorn.Config(api.app(), log_level="warning", lifespan="off",
                                            timeout_graceful_shutdown=5), api.stop)
    serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    serving.start()
    try:
        while not server.started:
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "stuck", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}))
        resp = conn.getresponse()
        events = read_events(resp, until=lambda ev: texts(ev) >= 1)
        t0 = time.monotonic()
        server.should_exit = True
        events += read_events(resp)
        waited = time.monotonic() - t0
        serving.join(timeout=10)
        assert not serving.is_alive()
    finally:
        release.set()
        StuckBackend.thread.shutdown(wait=True)
        sock.close()
    assert STOP_GRACE_S <= waited < 5
    assert events[-1]["error"]["code"] == "server_shutting_down"
    assert recorded == ["stopped"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_keyless_server_answers_for_this_machines_names_only(tmp_path):
    """DNS rebinding: a page whose own name was made to point at 127.0.0.1 is same-origin to itself and sends no
    Origin on a GET; it names itself in Host, and a server without a key refuses that."""
    server = spawn(tmp_path / "home", python="import sys; from localmoe.server.app import serve; "
                                             "sys.exit(serve(port={port}))")
    try:
        port = server.url.split(":")[-1].split("/")[0]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            status, _, _ = server.raw("GET", "/v1/models", {"Host": host})
            assert status == 200, host
        for host in (f"rebind.example:{port}", "localhost.rebind.example", f"127.0.0.1.rebind.example:{port}"):
            status, _, data = server.raw("GET", "/v1/models", {"Host": host})
            assert status == 403 and json.loads(data)["error"]["code"] == "host_not_allowed", host
            status, _, data = server.raw("POST", "/v1/chat/completions", {"Host": host}, {
                "model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert status == 403, host
        assert not server.rows("select id from messages")  # nothing was answered for them
    finally:
        stop(server)
