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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("serve-home")
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    env = {**os.environ, "LOCALMOE_HOME": str(home), KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "serve", "--port", str(port), "--queue", str(QUEUE),
                             "--api-key-env", KEY_ENV], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
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
    yield Server(url, home, proc)
    proc.send_signal(signal.SIGTERM)  # a graceful stop: uvicorn finishes, the models close, exit 0
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert code == 0, (home / "server.log").read_text()


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
