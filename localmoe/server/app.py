"""The HTTP side of `localmoe serve`: routes, API key, the generation queue, and the bridge from the event loop to
the thread that runs the models.

One generation thread answers every request, one at a time: the models share this machine's memory bandwidth, so
two answers at once would each run at half speed, and a local model's context is shared state. Requests wait in a
bounded FIFO queue; when it is full the server answers 429 with Retry-After (estimated from recent answers) instead
of letting clients pile up. Each request is a new conversation (OpenAI's API is stateless: the client sends the
history), recorded like `localmoe ask` plus one `api_requests` row naming its client and outcome.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from localmoe.chat.assistant import Assistant
from localmoe.chat.session import checked_prompt
from localmoe.engine import GenerationConfig
from localmoe.errors import LocalmoeError, PromptTooLong, UsageError
from localmoe.home import models
from localmoe.server.protocol import (
    AUTO_MODEL,
    ApiError,
    ChatRequest,
    chunk,
    completion,
    extension,
    finish_reason,
    model_list,
    parse_chat_request,
    usage,
)

DEFAULT_PORT = 8765
DEFAULT_QUEUE = 16  # requests that may wait behind the one being answered
MAX_BODY_BYTES = 8 * 2**20  # a prompt is capped at 200,000 characters; this leaves room for a long history
POLL_S = 0.2  # how often a request waiting for the model checks whether its client is still there
FLUSH_S = 0.02  # how often streamed text is sent: about two tokens an event at 100 tokens/s, unnoticeable to a reader
CLOSED = 499  # recorded (never sent) for a client that left before its answer began: nginx's "client closed request"
GRACEFUL_S = 5  # how long a stopping server waits for the responses in flight
# An answer still making its first token when the server stops (a long prompt's prefill) is told so after this, so
# its client hears why before uvicorn gives up waiting and cuts the connection
STOP_GRACE_S = 3.0
# Browser front ends served from this machine (a dev server on any port) may call the API, as Ollama allows; a web
# page from anywhere else may not read its answers unless the user names its origin
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?"
# The names a browser may put in Host for a keyless server on loopback: a page whose own name was made to point at
# 127.0.0.1 (DNS rebinding) sends its own name, is same-origin to itself, and sends no Origin on a GET
LOOPBACK_HOSTS = r"(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?"

T = TypeVar("T")


class ClientGone(Exception):
    pass


class ServerStopping(Exception):
    pass


def stopping_error(begun: bool) -> ApiError:
    """What a request the server's shutdown cut short is told (and recorded with)."""
    what = "the answer was stopped" if begun else "the request was not answered"
    return ApiError(503, f"the server is shutting down: {what}; send it again once the server is back",
                    type="server_error", code="server_shutting_down")


class Lane:
    """One answer at a time, the others waiting in arrival order, at most `limit` of them. Lives on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0  # the request being answered plus those waiting
        self.mean_s: float | None = None  # recent answer time, for Retry-After
        self._returning: deque[float] = deque()  # when the clients refused so far said they would be back
        self._lock = asyncio.Lock()  # FIFO: waiters are woken in the order they came

    async def acquire(self) -> None:
        if self.count > self.limit:
            wait = self.retry_after() * random.uniform(1.0, 1.5)  # jitter: refused clients do not return in step
            self._returning.append(time.monotonic() + wait)
            raise ApiError(429, f"the server is busy: {self.count - 1} requests are waiting for the model (the limit "
                           f"is {self.limit}); retry in {wait:.1f} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(wait))),
                                    "retry-after-ms": str(max(1, round(wait * 1000)))})
        self.count += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.count -= 1
            raise

    def release(self, seconds: float | None) -> None:
        """`seconds`: how long the answer took (None: no answer was made, the pace is unchanged)."""
        if seconds is not None:
            self.mean_s = seconds if self.mean_s is None else 0.8 * self.mean_s + 0.2 * seconds
        self.count -= 1
        self._lock.release()

    def retry_after(self) -> float:
        """Seconds until a slot is likely free for this client, at the recent pace.

        Clients refused before this one will be back first, and each takes a slot: counting them spreads the returns
        out, so a refused client is not sent back into the same crowd every few milliseconds until its retries run
        out (eight clients against a queue of 3 starved one that way)."""
        now = time.monotonic()
        self._returning = deque(t for t in self._returning if t > now - 1.0)  # the others are back, or gave up
        ahead = max(self.count - self.limit, 1) + len(self._returning)
        return max(0.1, (self.mean_s or 1.0) * ahead)


@dataclass(eq=False)  # compared, and kept in a set, by identity
class Job:
    """One request on its way through the generation thread; events come back on `queue` in the loop's thread."""

    request: ChatRequest
    client: str | None
    user_agent: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    # Streamed text waits here for the event loop, which collects it every FLUSH_S: waking the loop (and the client)
    # for every token would take CPU time and the GIL from the decode, which needs every core.
    pieces: deque[str] = field(default_factory=deque)
    begun: bool = False
    stopped: bool = False  # cancelled by the server's shutdown, not by its client

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` on the event loop; nothing when the loop has closed (the server has stopped: no one is left)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def emit(self, kind: str, value: Any) -> None:
        self.call(self.queue.put_nowait, (kind, value))

    def emit_piece(self, piece: str) -> None:
        """Queue streamed text; only the first piece wakes the loop (the answer has begun: send the headers)."""
        self.pieces.append(piece)
        if not self.begun:
            self.begun = True
            self.emit("piece", None)

    def take_pieces(self) -> str:
        text = []
        while self.pieces:
            text.append(self.pieces.popleft())
        return "".join(text)


class Backend:
    """The models behind the API: one Assistant for `localmoe/auto` and the tiers' models (loaded once, shared),
    an Assistant pinned to each other installed model asked for by name. Touched only by the generation thread
    once serving starts."""

    def __init__(self, *, strategy: str | None = None, preference: str | None = None) -> None:
        self.assistant = Assistant(strategy=strategy, preference=preference)
        self.recorder = self.assistant.recorder
        self._pinned: dict[str, Assistant] = {}
        self._defaults: dict[str, dict[str, Any]] = {}
        self._ids: tuple[float, list[str]] = (0.0, [])
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localmoe-generate")

    def warm_up(self) -> list[str]:
        """Load the small tier, the router and the energy meter now, so the first request is not the slow one;
        returns what the user should know (tier fallbacks, an unreadable router file)."""
        a = self.assistant
        a.available("small")
        a.warm_router()
        a.router.route("What is the capital of France?", a.routing_strategy())
        _ = a.session_for("small").meter
        # what the router said while warming (the probe's model failing, say) is told here, not to the first client
        return list(dict.fromkeys([*a.notices, *a.router.told]))

    def model_ids(self) -> list[str]:
        """`localmoe/auto` and every installed model; the directory is scanned at most every few seconds."""
        at, ids = self._ids
        if time.monotonic() - at > 5:
            ids = [AUTO_MODEL, *dict.fromkeys(ref.id for ref in models.list_models())]
            self._ids = (time.monotonic(), ids)
        return ids

    def _assistant_for(self, model: str) -> tuple[Assistant, str | None]:
        """Who answers `model`, and on which tier: a tier's own model is asked on that tier (as `ask --tier`), so
        it is never loaded twice."""
        a = self.assistant
        if model == AUTO_MODEL:
            return a, None
        for tier in ("small", "large"):
            ref = a.tier_ref(tier)
            if ref is not None and ref.id == model:
                return a, tier
        if model not in self._pinned:
            self._pinned[model] = Assistant(recorder=self.recorder, pinned_model=model)
        return self._pinned[model], None

    def _configure(self, a: Assistant, tier: str, cascade: bool) -> None:
        """The request's sampling on the sessions that may answer it, as `ask` builds its config: the model's own
        defaults under what the request sets."""
        tiers = {tier} | ({a.available("large", load=False)} if cascade else set())
        for t in tiers:
            session = a.session_for(t)
            ref = session.model
            if ref.id not in self._defaults:
                self._defaults[ref.id] = models.generation_defaults(ref)
            # a client sends its own history: one too long for the context is refused (context_length_exceeded),
            # not cut short behind its back
            session.config = GenerationConfig(**{**self._defaults[ref.id], **a.overrides, "fit_context": False})

    def generate(self, job: Job) -> None:
        """Answer one request (on the generation thread): events `start` (the model), `piece`s when streaming, then
        `done` (the answer as `ask --json` has it, and its text) or `error` (an ApiError). The request is recorded
        once, before its last event, so a client that has its answer also finds it in the database."""
        req = job.request
        routed = None
        sent = False
        try:
            a, tier = self._assistant_for(req.model)
            a.overrides = dict(req.overrides)
            a.conversation.restart()
            a.conversation.history = [dict(m) for m in req.history]
            routed = a.ask(req.prompt, job.cancel, tier=tier)
            self._configure(a, routed.decision.tier, routed.decision.strategy == "cascade")
            self._record_history(a, routed.decision.model or req.model, req)
            job.emit("start", routed.decision.model or req.model)
            for piece in routed:
                if req.stream:
                    job.emit_piece(piece)
                    sent = True
            out = routed.to_dict()
        except Exception as exc:  # every failure becomes an answer: the server must keep serving
            api = self._api_error(exc, routed)
            reply = routed.reply if routed is not None else None
            self._record(job, reply.message_id if reply is not None else None, 200 if sent else api.status,
                         api.message)
            job.emit("error", api)
            return
        if job.stopped and out.get("status") == "cancelled":  # one that ended before the stop is still delivered
            api = stopping_error(begun=True)
            self._record(job, out.get("message_id"), 200 if sent else api.status, api.message)
            job.emit("error", api)
            return
        gone = job.cancel.is_set() and not job.stopped and out.get("status") == "cancelled"
        # nothing reached a client that left before its first streamed text (or its whole answer): no 200 was sent
        self._record(job, out.get("message_id"), CLOSED if gone and not sent else 200,
                     "client disconnected" if gone else None)
        job.emit("done", (out, routed.text))

    def _record_history(self, a: Assistant, model: str, req: ChatRequest) -> None:
        """The client's messages before its question, recorded first in the request's conversation: the record says
        everything the model was given (the client's system message, the earlier turns), and `logs -q` finds
        them. The session then adds the question and the answer to the same conversation."""
        if not req.history:
            return  # the session makes the conversation with the question, as for `ask`
        conv = a.conversation
        # one transaction (a long history is not one disk sync per message before the first token), stored as
        # `context`: what the client sent, not exchanges of this user's, so `logs` does not list each turn again
        # for every later request of the same chat
        conv.id = a.recorder.add_context(model, checked_prompt(req.prompt)[:80], conv.kind, req.history)

    def _record(self, job: Job, message_id: int | None, status: int, error: str | None) -> None:
        """The request's row: the model it asked for (the answer's own row names the model that answered)."""
        try:
            self.recorder.record_api_request(
                message_id, client=job.client, user_agent=job.user_agent, endpoint="/v1/chat/completions",
                model=job.request.model, stream=job.request.stream, http_status=status, error=error)
        except LocalmoeError as exc:
            print(f"localmoe: warning: request not recorded: {exc}", file=sys.stderr)

    @staticmethod
    def _api_error(exc: Exception, routed: Any) -> ApiError:
        reply = routed.reply if routed is not None else None
        stats = reply.stats if reply is not None else None
        plan = reply.session.engine.plan if reply is not None else None
        ctx = getattr(plan, "ctx", None)
        if (isinstance(exc, LocalmoeError) and stats is not None and ctx and stats.completion_tokens == 0
                and stats.prompt_tokens >= ctx):
            return ApiError(400, f"this model's maximum context length is {ctx} tokens, but the messages are "
                            f"{stats.prompt_tokens} tokens ({reply.model}): shorten them",
                            param="messages", code="context_length_exceeded")
        if isinstance(exc, PromptTooLong):
            return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
        if isinstance(exc, UsageError):
            return ApiError(400, str(exc), param="messages")
        if isinstance(exc, LocalmoeError):
            return ApiError(500, str(exc), type="server_error")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        for a in [self.assistant, *self._pinned.values()]:
            a.close()
        self.recorder.close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, default=str)}\n\n"


class Api:
    """The routes, around one Backend."""

    def __init__(self, backend: Backend, *, api_key: str | None = None, queue: int = DEFAULT_QUEUE,
                 cors_origins: list[str] | None = None, host: str | None = None) -> None:
        """`host`: the loopback name the server was started on, when it needs no key (requests must name a
        loopback host then); None: any Host."""
        self.host = host
        self.backend = backend
        self.api_key = api_key
        self.lane = Lane(queue)
        self.cors_origins = list(cors_origins or [])
        self.stopping_since: float | None = None  # when the server began to shut down
        self._jobs: set[Job] = set()  # those on the generation thread, or waiting for it

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.list_models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"])],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
            # no cookies: a browser sends the key itself, in the Authorization header
            middleware=[Middleware(CORSMiddleware, allow_origin_regex=LOOPBACK_ORIGINS,
                                   allow_origins=self.cors_origins, allow_methods=["GET", "POST"],
                                   allow_headers=["*"], expose_headers=["Retry-After", "retry-after-ms"])],
        )

    def stop(self) -> None:
        """The server is shutting down (called on the event loop before uvicorn waits for the responses in flight):
        the answers being made stop before their next token and end with a `server_shutting_down` error, and the
        requests waiting for the model are refused with it, so every response ends in time and says why."""
        self.stopping_since = time.monotonic()
        for job in self._jobs:
            job.stopped = True
            job.cancel.set()

    def _stop_due(self, grace: float) -> bool:
        return self.stopping_since is not None and time.monotonic() - self.stopping_since >= grace

    async def _until_disconnect(self, aw: Awaitable[T], request: Request, stop_grace: float = STOP_GRACE_S,
                                dropped: Callable[[T], None] | None = None) -> T:
        """`aw`'s result, unless the client goes away first (ClientGone) or the server has been stopping for
        `stop_grace` seconds (ServerStopping); `aw` is then cancelled, and a result it had just made (while the
        client was being checked) goes to `dropped`, so a lane it acquired is not held for good."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone
                if self._stop_due(stop_grace):
                    raise ServerStopping
        except (ClientGone, ServerStopping):
            if task.done() and not task.cancelled() and task.exception() is None and dropped is not None:
                dropped(task.result())
            raise
        finally:
            if not task.done():
                task.cancel()

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return self._error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return self._error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def _admit(self, request: Request) -> None:
        """Every check a request to the API passes first: the host it names, the page it comes from, its key."""
        self._check_host(request)
        self._check_origin(request)
        self._check_key(request)

    def _check_host(self, request: Request) -> None:
        if self.host is None:  # a server with a key: the key is the check
            return
        named = request.headers.get("host", "")
        if not re.fullmatch(LOOPBACK_HOSTS, named) and named.rsplit(":", 1)[0].strip("[]") != self.host:
            raise ApiError(403, f"this server answers requests for this machine only, not for {named!r}",
                           code="host_not_allowed")

    def _check_origin(self, request: Request) -> None:
        """A browser names the page's origin on every cross-site request, also on the plain `text/plain` POST it
        makes without asking first (CORS only hides the answer from the page): refused here, as Ollama refuses it,
        so no web page the user visits can spend this machine's power on questions of its own."""
        origin = request.headers.get("origin")
        if origin is None or re.fullmatch(LOOPBACK_ORIGINS, origin) or "*" in self.cors_origins \
                or origin in self.cors_origins:
            return
        raise ApiError(403, f"web pages from {origin} may not call this server (pages on this machine may; "
                       "`localmoe serve --cors-origin ORIGIN` allows another)", code="origin_not_allowed")

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key: send the server's key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @staticmethod
    async def _json(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise too_big
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    async def _record(self, request: Request, model: str | None, stream: bool, status: int, error: str) -> None:
        """A request refused before it reached the model, recorded off the event loop (SQLite syncs to disk)."""
        try:
            await asyncio.to_thread(
                self.backend.recorder.record_api_request, None, client=_client(request),
                user_agent=request.headers.get("user-agent"), endpoint=request.url.path, model=model, stream=stream,
                http_status=status, error=error)
        except LocalmoeError as exc:
            print(f"localmoe: warning: request not recorded: {exc}", file=sys.stderr)

    # -- routes --------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        lane = self.lane
        return JSONResponse({"status": "ok", "queue": {"active": min(lane.count, 1),
                                                       "waiting": max(lane.count - 1, 0), "limit": lane.limit}})

    async def list_models(self, request: Request) -> Response:
        try:
            self._admit(request)
        except ApiError as err:
            return self._error(err)
        return JSONResponse(model_list(await asyncio.to_thread(self.backend.model_ids)))

    async def chat_completions(self, request: Request) -> Response:
        req: ChatRequest | None = None
        try:
            self._admit(request)
            req = parse_chat_request(await self._json(request))
            if req.model not in await asyncio.to_thread(self.backend.model_ids):
                raise ApiError(404, f"the model {req.model!r} does not exist here (see /v1/models)", param="model",
                               code="model_not_found")
            return await self._answer(request, req)
        except ApiError as err:
            await self._record(request, req.model if req else None, bool(req and req.stream), err.status,
                               err.message)
            return self._error(err)

    async def _answer(self, request: Request, req: ChatRequest) -> Response:
        loop = asyncio.get_running_loop()
        job = Job(req, _client(request), request.headers.get("user-agent"), loop)
        if self.stopping_since is not None:
            raise stopping_error(begun=False)
        try:
            await self._until_disconnect(self.lane.acquire(), request, stop_grace=0,
                                         dropped=lambda _: self.lane.release(None))
        except ClientGone:
            await self._record(request, req.model, req.stream, CLOSED, "client disconnected while queued")
            return Response(status_code=CLOSED)
        except ServerStopping:
            raise stopping_error(begun=False) from None
        if self.stopping_since is not None:  # its turn came as the server began to stop
            self.lane.release(None)
            raise stopping_error(begun=False)
        t0 = time.monotonic()
        self._jobs.add(job)
        running = self.backend.thread.submit(self.backend.generate, job)
        running.add_done_callback(lambda _: job.call(self._finished, job, time.monotonic() - t0))
        model = req.model
        try:
            while True:  # until the answer has begun: an error before it still gets its own status code
                kind, value = await self._until_disconnect(job.queue.get(), request)
                if kind != "start":
                    break
                model = value
        except ClientGone:
            job.cancel.set()  # the generation thread records the request and its partial answer
            return Response(status_code=CLOSED)
        except ServerStopping:  # the generation thread records it when its model lets go
            return self._error(stopping_error(begun=True))
        if kind == "error":
            return self._error(value)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            out, text = value
            return JSONResponse(completion(request_id, out, text))
        if kind == "done":  # an answer without text (the model ended at once): the stream still ends with it
            job.queue.put_nowait((kind, value))
        return StreamingResponse(self._events(job, request_id, model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _finished(self, job: Job, seconds: float) -> None:
        self._jobs.discard(job)
        self.lane.release(seconds)

    async def _events(self, job: Job, request_id: str, model: str) -> AsyncIterator[str]:
        created = int(time.time())
        try:
            yield _sse(chunk(request_id, model, {"role": "assistant", "content": ""}, created=created))
            while True:
                text = job.take_pieces()
                if text:
                    yield _sse(chunk(request_id, model, {"content": text}, created=created))
                try:
                    kind, value = job.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if self._stop_due(STOP_GRACE_S):  # the model has not let go: the client still hears why
                        yield _sse(stopping_error(begun=True).body())
                        return
                    await asyncio.sleep(FLUSH_S)
                    continue
                if kind == "piece":  # the wake-up of the first piece, already sent
                    continue
                text = job.take_pieces()  # the last pieces came before the end was announced
                if text:
                    yield _sse(chunk(request_id, model, {"content": text}, created=created))
                if kind == "error":  # the stream has begun: the error travels as an event
                    yield _sse(value.body())
                    return
                out, _text = value
                last = chunk(request_id, out.get("model") or model, {}, finish_reason(out.get("stop_reason")),
                             created=created)
                last["localmoe"] = extension(out)
                yield _sse(last)
                if job.request.include_usage:
                    yield _sse({**chunk(request_id, out.get("model") or model, {}, created=created),
                                "choices": [], "usage": usage(out)})
                yield "data: [DONE]\n\n"
                return
        finally:
            # Also reached when the client disconnects (the response task is cancelled): the engine stops before its
            # next token, and the answer is recorded as cancelled with the tokens it had.
            job.cancel.set()


def _client(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise LocalmoeError(f"cannot resolve --host {host}: {exc.strerror or exc}") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened before any model loads so a port in use is one line at once."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise LocalmoeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise LocalmoeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _uvicorn_server(config: Any, on_shutdown: Callable[[], None]) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # before uvicorn waits for the responses in flight: they end sooner, and each says why
            on_shutdown()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises a captured signal once it has shut down; here Ctrl-C or SIGTERM is the normal way to
            # stop (exit 0, not "interrupted"). A second Ctrl-C still forces the exit.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server(config)


def cors_origin(text: str) -> str:
    """An origin a browser sends (`scheme://host[:port]`, no path), or `*` for any; a UsageError otherwise."""
    if text == "*" or re.fullmatch(r"https?://[^/?#\s]+", text):
        return text
    raise UsageError(f"--cors-origin {text}: an origin is scheme://host[:port] with no path (such as "
                     "https://chat.example.com), or * for any")


def serve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key_env: str | None = None,
          queue: int = DEFAULT_QUEUE, strategy: str | None = None, preference: str | None = None,
          cors_origins: list[str] | None = None) -> int:
    """Serve until Ctrl-C / SIGTERM. Refuses to listen beyond loopback without an API key. Browser pages from
    localhost, 127.0.0.1 and [::1] may call it (CORS); `cors_origins` adds others (`*`: any)."""
    import uvicorn

    origins = [cors_origin(o) for o in cors_origins or []]
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env) or None
        if key is None:
            raise UsageError(f"--api-key-env {api_key_env}: that environment variable is not set or is empty; put "
                             "the key clients must send in it")
    if key is None and not is_loopback(host):
        raise UsageError(f"--host {host} would let other machines use the models without a key: set one with "
                         "--api-key-env VAR (the key in $VAR), or serve on 127.0.0.1")
    sock = listen(host, port)
    backend = Backend(strategy=strategy, preference=preference)
    try:
        for notice in backend.warm_up():
            print(f"localmoe: notice: {notice}", file=sys.stderr)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"localmoe: serving an OpenAI-compatible API at http://{shown}:{bound}/v1 "
              f"(models: {', '.join(backend.model_ids())}; key {'required' if key else 'not required'}); "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        api = Api(backend, api_key=key, queue=queue, cors_origins=origins, host=host if key is None else None)
        config = uvicorn.Config(api.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_S)
        gc.freeze()  # the loaded model, web stack and their imports are permanent: keep the collector off them
        _uvicorn_server(config, api.stop).run(sockets=[sock])
    finally:
        sock.close()
        backend.close()
    return 0
