"""Every exchange goes into one SQLite file, with versioned migrations (the simonw/llm way).

This is the only module that knows SQL and table names: the rest of localmoe records and reads through the
Recorder's named methods.

Migrations are small functions applied in order at open and recorded in `_migrations`; a file written by a
newer localmoe (a migration we do not know) is refused rather than guessed at. Many processes may use the file
at once (a chat, a script, a benchmark): each migration is checked and applied under an exclusive lock in its own
transaction, and every writer waits its turn (a busy timeout, then bounded retries) instead of failing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from localmoe.engine.base import ending_note
from localmoe.errors import LocalmoeError
from localmoe.home import paths

T = TypeVar("T")

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        "create table conversations (id integer primary key, title text, model text, created_at text)"
    )
    db.execute(
        """create table messages (
            id integer primary key,
            conversation_id integer references conversations(id),
            role text, content text, model text, created_at text)"""
    )
    db.execute("create index idx_messages_conversation_id on messages(conversation_id)")


@migration
def m002_generations(db: sqlite_utils.Database) -> None:
    # An answer starts `pending` and ends `complete`, `cancelled`, `interrupted` or `error`;
    # `reply_to` ties it to the question it answers.
    db.execute("alter table messages add column status text not null default 'complete'")
    db.execute("alter table messages add column reply_to integer references messages(id)")
    db.execute("alter table messages add column completed_at text")
    db.execute(
        """create table generations (
            message_id integer primary key references messages(id),
            model text, backend text,
            prompt_tokens integer, completion_tokens integer,
            ttft_s real, tokens_per_s real, wall_s real, stop_reason text, created_at text)"""
    )


@migration
def m003_energy_and_bench(db: sqlite_utils.Database) -> None:
    # Benchmark questions are real exchanges (same engine path, same stats) but stay out of `logs`.
    db.execute("alter table conversations add column kind text not null default 'chat'")
    db.execute(
        """create table energy (
            message_id integer primary key references messages(id),
            joules real, net_joules real, idle_watts real, avg_watts real, peak_watts real, seconds real,
            tokens_per_joule real, meter text, measured integer, created_at text)"""
    )
    db.execute(
        """create table power_samples (
            message_id integer references messages(id), t real, watts real)"""
    )
    db.execute("create index idx_power_samples_message_id on power_samples(message_id)")
    db.execute(
        """create table bench_runs (
            id integer primary key, suite text, source text, models text, policies text, item_limit integer,
            hardware text, fingerprint text, meter text, measured integer, status text,
            started_at text, finished_at text, localmoe_version text)"""
    )
    db.execute(
        """create table bench_items (
            run_id integer references bench_runs(id), model text, policy text, item_id text,
            question text, expected text, kind text, category text, difficulty integer,
            output text, extracted text, correct integer, method text, tier text,
            message_id integer references messages(id),
            joules real, avg_watts real, seconds real, prompt_tokens integer, completion_tokens integer,
            ttft_s real, tokens_per_s real, created_at text,
            primary key (run_id, model, policy, item_id))"""
    )
    # IPW (Stanford): accuracy / average power. Accuracy per joule: accuracy / mean energy per query.
    db.execute(
        """create view bench_results as
        select b.run_id, b.model, b.policy, count(*) as n, avg(b.correct) as accuracy,
               sum(b.joules) as joules, sum(b.joules) / count(*) as joules_per_query,
               sum(b.joules) / sum(b.seconds) as avg_watts,
               avg(b.correct) / (sum(b.joules) / sum(b.seconds)) as ipw,
               avg(b.correct) / (sum(b.joules) / count(*)) as accuracy_per_joule,
               avg(b.seconds) as latency_s, sum(b.completion_tokens) / sum(b.seconds) as tokens_per_s,
               avg(case when b.tier = 'large' then 1.0 else 0.0 end) as large_share,
               r.meter, r.measured, r.fingerprint, r.started_at
        from bench_items b join bench_runs r on r.id = b.run_id
        group by b.run_id, b.model, b.policy"""
    )


@migration
def m004_routing(db: sqlite_utils.Database) -> None:
    db.execute("alter table generations add column mean_logprob real")
    db.execute("alter table generations add column min_logprob real")
    # One row per routed answer: the decision, and whether the cascade escalated after a small-tier answer.
    db.execute(
        """create table routing_decisions (
            message_id integer primary key references messages(id),
            tier text, model text, strategy text, score real, threshold real, reason text, latency_ms real,
            notice text, escalated_from integer references messages(id), created_at text)"""
    )
    # What users and benchmarks tell us about the small tier: label 1 = the small tier's answer was not good.
    db.execute(
        """create table route_labels (
            id integer primary key, message_id integer references messages(id), prompt text,
            small_wrong integer, source text, created_at text)"""
    )


@migration
def m005_prefill(db: sqlite_utils.Database) -> None:
    # the prompt tokens an engine evaluated (the rest came from its KV cache of the conversation so far) and the
    # rate it evaluated them at: time to first token explained
    db.execute("alter table generations add column prompt_eval_tokens integer")
    db.execute("alter table generations add column prefill_tokens_per_s real")
    db.execute("alter table bench_items add column prompt_eval_tokens integer")


@migration
def m006_api_requests(db: sqlite_utils.Database) -> None:
    # One row per request to `localmoe serve`: who asked (address, user agent) and how it ended, refused ones too.
    # No text: the question and answer are messages. Cascade: forgetting a conversation forgets its requests.
    db.execute(
        """create table api_requests (
            id integer primary key, message_id integer references messages(id) on delete cascade,
            client text, user_agent text, endpoint text, model text, stream integer, http_status integer,
            error text, created_at text)"""
    )
    db.execute("create index idx_api_requests_message_id on api_requests(message_id)")


@migration
def m007_message_search(db: sqlite_utils.Database) -> None:
    # Full-text search over every message. External content: the index holds tokens only and reads the text from
    # `messages`, so the text is not stored twice. The triggers keep it in step with every insert, update and
    # delete whoever makes them (the CLI, the UI, the server, an older localmoe's rows indexed by the rebuild).
    db.execute("create virtual table messages_fts using fts5(content, content='messages', content_rowid='id', "
               "tokenize='unicode61 remove_diacritics 2')")
    db.execute("create trigger messages_fts_insert after insert on messages begin "
               "insert into messages_fts (rowid, content) values (new.id, new.content); end")
    db.execute("create trigger messages_fts_delete after delete on messages begin "
               "insert into messages_fts (messages_fts, rowid, content) values ('delete', old.id, old.content); end")
    db.execute("create trigger messages_fts_update after update of content on messages begin "
               "insert into messages_fts (messages_fts, rowid, content) values ('delete', old.id, old.content); "
               "insert into messages_fts (rowid, content) values (new.id, new.content); end")
    db.execute("insert into messages_fts (messages_fts) values ('rebuild')")


@migration
def m008_calibration_runs(db: sqlite_utils.Database) -> None:
    # `localmoe router calibrate` runs are benchmark runs of both tiers on the same questions; `purpose` tells them
    # from a user's `bench` runs (NULL) so `router calibrate --resume` finds the one it left.
    db.execute("alter table bench_runs add column purpose text")


@migration
def m009_decision_energy(db: sqlite_utils.Database) -> None:
    # what choosing the tier cost (the probe strategy evaluates the question on the small model), by the small
    # tier's meter; NULL for decisions made before it was measured and for the escalated half of a cascade
    db.execute("alter table routing_decisions add column joules real")


@migration
def m010_generation_system_prompt(db: sqlite_utils.Database) -> None:
    # the system message the engine put first when the conversation had none (a catalog model's own): NULL when
    # the conversation's own system message, stored among its messages, was used, and for answers before this
    db.execute("alter table generations add column system_prompt text")


@migration
def m011_generation_dropped_exchanges(db: sqlite_utils.Database) -> None:
    # how many of the conversation's oldest exchanges were left out of the prompt because it no longer fit the
    # model's context: the record of what the model was given; 0 for answers before this
    db.execute("alter table generations add column dropped_exchanges integer not null default 0")


@migration
def m012_bench_run_settings(db: sqlite_utils.Database) -> None:
    # what every answer of a run was given, so `bench --resume` asks the rest the same way (it used its own flags'
    # defaults: one run mixed 24- and 128-token answers); NULL for runs before this (the defaults then: 128, 0)
    db.execute("alter table bench_runs add column max_tokens integer")
    db.execute("alter table bench_runs add column idle_seconds real")
    # with --idle: the item's joules less the idle power over its seconds (what answering added), else NULL
    db.execute("alter table bench_items add column net_joules real")


def _unspaced(ch: str) -> bool:
    """A character of a script written without spaces between words (CJK, kana, Thai...): the FTS index holds a
    whole run of them as one token, so a word inside it cannot be found there."""
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x0E00 <= o <= 0x0EFF
            or 0x20000 <= o <= 0x3FFFF)


def substring_words(text: str) -> list[str] | None:
    """The query's words when it has any character of an unspaced script (searched as substrings instead of
    index tokens), else None."""
    words = _query_words(text)
    return words if any(_unspaced(c) for w in words for c in w) else None


def _query_words(text: str) -> list[str]:
    """What a person typed, as words: letters, digits and combining marks (Thai vowels and tone marks belong to
    their word: split there, one Thai word became letters matching almost anything); the rest separates."""
    return "".join(c if c.isalnum() or unicodedata.category(c).startswith("M") else " " for c in text).split()


def _like(word: str) -> str:
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _substring_snippet(content: str, words: list[str], width: int = 30) -> str:
    """A stretch of `content` around its first match, each word in [brackets], as FTS5's snippet() shows them."""
    low = content.lower()
    at = min((i for i in (low.find(w.lower()) for w in words) if i >= 0), default=0)
    start, end = max(0, at - width), min(len(content), at + width * 2)
    piece = content[start:end]
    for w in words:
        piece = re.sub(re.escape(w), lambda m: f"[{m.group(0)}]", piece, flags=re.IGNORECASE)
    return ("…" if start else "") + piece + ("…" if end < len(content) else "")


def fts_query(text: str) -> str:
    """What a person types, as an FTS5 query: every word must occur, each as a prefix (search as you type), and
    no character of theirs is FTS5 syntax (quotes, `-`, `:`, `*`, AND/OR/NOT are words here)."""
    return " ".join(f'"{w}"*' for w in _query_words(text))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# How long a writer waits for another process to finish before giving up (seconds). Long enough for any one
# transaction of ours (a migration, an answer's stats); the variable exists so tests can make it tiny.
TIMEOUT_ENV = "LOCALMOE_DB_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
# Test-only hook: "<migration name>:<seconds>" holds the process inside that migration, its changes made but not
# committed, so a test can kill -9 it there. Unset in normal use.
PAUSE_ENV = "LOCALMOE_TEST_MIGRATION_PAUSE"


class DatabaseBusy(LocalmoeError):
    """Another process kept the database locked for longer than the timeout."""


def busy_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise LocalmoeError(f"{TIMEOUT_ENV} must be a number of seconds, not {raw!r}") from None


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; the message on 3.10
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED, with their extended codes
    msg = str(exc)
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


def _retry(fn: Callable[[], T], conn: sqlite3.Connection, path: Path | str, timeout: float) -> T:
    """Run `fn` until it gets past SQLITE_BUSY or `timeout` seconds have gone. SQLite's own busy handler does most
    of the waiting, but some lock conflicts (changing the journal mode of a new file, WAL recovery) return BUSY at
    once, so we retry as well; each retry's busy handler gets only the time left, which keeps the bound."""
    deadline = time.monotonic() + timeout
    pause, shortened = 0.002, False
    try:
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatabaseBusy(busy_message(Path(path), timeout)) from None
            # jitter, so processes that collided do not collide again in step
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
            pause = min(pause * 2, 0.1)
            conn.execute(f"PRAGMA busy_timeout = {max(int((deadline - time.monotonic()) * 1000), 0)}")
            shortened = True
    finally:
        if shortened:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")


def _lock_holders(path: Path) -> tuple[list[int], bool]:
    """Other processes that hold a write lock on the database or its WAL index (Linux /proc/locks), else those
    that merely have it open (/proc/*/fd); the flag says which. Best effort: empty where /proc is not readable."""
    me = os.getpid()
    files = [path, path.with_name(path.name + "-shm"), path.with_name(path.name + "-wal")]
    inodes = set()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        inodes.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    holders: set[int] = set()
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                parts = line.split()
                # "1: POSIX  ADVISORY  WRITE 4242 fd:01:123456 0 EOF"; "1: -> POSIX ..." lines are waiters
                if len(parts) < 6 or parts[1] == "->" or parts[3] != "WRITE":
                    continue
                major, minor, ino = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) in inodes and int(parts[4]) not in (me, -1):
                    holders.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    if holders:
        return sorted(holders), True
    targets = {str(f) for f in files}
    try:
        procs = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    except OSError:
        return [], False
    for pid in procs:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in fds):
                holders.add(int(pid))
        except OSError:
            continue
    return sorted(holders), False


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return "?"
    text = " ".join(raw.decode(errors="replace").split("\0")).strip()
    text = " ".join(text.split())  # one line, whatever the arguments held
    return text if len(text) <= 80 else text[:77] + "..."


def busy_message(path: Path, timeout: float) -> str:
    pids, locked = _lock_holders(path.resolve())
    who = ", ".join(f"process {pid} ({_command_line(pid)})" for pid in pids[:3])
    if not who:
        by = "by another process"
    else:
        by = f"by {who}" if locked else f"(open in {who})"
    return f"database {path} is busy: still locked after {timeout:g} s {by}; try again when it has finished"


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, exclusive: bool = False, path: Path | str | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """All-or-nothing writes, DDL included: the connection runs in autocommit mode and we BEGIN ourselves,
    because Python's implicit transactions do not cover DDL and `with conn:` blocks commit early. The write lock
    is taken at BEGIN (IMMEDIATE), so the body never meets a busy database; only BEGIN and COMMIT wait."""
    timeout = busy_timeout() if timeout is None else timeout
    where = path if path is not None else _file_of(conn)
    _retry(lambda: conn.execute("BEGIN EXCLUSIVE" if exclusive else "BEGIN IMMEDIATE"), conn, where, timeout)
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise
    # A COMMIT that finds readers in rollback-journal mode fails with BUSY and leaves the transaction open to retry.
    try:
        _retry(lambda: conn.execute("COMMIT"), conn, where, timeout)
    except BaseException:
        # Given up (or failed otherwise): close the transaction, or every later write on this shared connection would
        # fail with "cannot start a transaction within a transaction".
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        msg = str(exc)
        if "full" in msg or ("disk I/O error" in msg and _disk_full(path)):
            # SQLite says "disk I/O error" when a full disk stops it creating the WAL's shared-memory file
            msg = "the disk is full" if "full" not in msg else msg
            msg += " (free some disk space; nothing already recorded was lost)"
        raise LocalmoeError(f"database {path}: {msg}") from None


def _disk_full(path: Path) -> bool:
    """Whether the file system holding `path` has (almost) no room left: under 64 KiB, less than a WAL's
    shared-memory file and a few pages need."""
    try:
        return shutil.disk_usage(Path(path).parent).free < 64 * 1024
    except OSError:
        return False


def _enable_wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    # Switching needs the file to itself; when another process is opening the same new file SQLite may answer
    # BUSY, or just keep the old mode: both mean try again.
    if conn.execute("PRAGMA journal_mode=wal").fetchone()[0] != "wal":
        raise sqlite3.OperationalError("database is locked")


MEMORY = ":memory:"

BENCH_ITEM_FIELDS = frozenset({
    "model", "policy", "item_id", "question", "expected", "kind", "category", "difficulty", "output", "extracted",
    "correct", "method", "tier", "message_id", "joules", "avg_watts", "seconds", "prompt_tokens",
    "completion_tokens", "ttft_s", "tokens_per_s", "prompt_eval_tokens", "net_joules",
})


class Recorder:
    """The SQLite log. Open it, record and read through its methods, close it; safe to keep open for a whole
    session and to share between threads.

    `timeout`: seconds a write waits for other processes before failing with DatabaseBusy (default 30, or
    LOCALMOE_DB_TIMEOUT).

    `Recorder(":memory:")` (or `Recorder.in_memory()`) records nowhere lasting: answering off the record goes
    through the same code, and what it wrote is gone at close."""

    def __init__(self, path: str | Path | None = None, *, timeout: float | None = None) -> None:
        self.persistent = str(path) != MEMORY  # False: kept in this process only, gone at close
        self.path = Path(path) if path else paths.db_path()
        self.timeout = busy_timeout() if timeout is None else timeout
        if self.persistent:
            # Created owner-only before SQLite opens it: its WAL and shared-memory files copy the database's mode.
            paths.private_file(self.path)
        with _db_errors(self.path):
            # Shared by the UI thread and generation workers; sqlite serialises calls, the lock our transactions.
            conn = sqlite3.connect(self.path if self.persistent else MEMORY, check_same_thread=False,
                                   timeout=self.timeout, isolation_level=None)
            self._db = sqlite_utils.Database(conn)
            self._lock = threading.RLock()
            try:
                if self.persistent:
                    # WAL keeps the file consistent if we die mid-write, and lets readers go on while one writes
                    # (an in-memory database has neither problem, and cannot use WAL).
                    self._retry(lambda: _enable_wal(conn))
                    # FULL sync so an answer reported is on disk. Both pragmas are per connection: no lock needed.
                    conn.execute("PRAGMA synchronous=FULL")
                    # Only here: off the record, a conversation may go on under the id the real database gave it,
                    # which has no row in the scratch database.
                    conn.execute("PRAGMA foreign_keys=ON")
                migrate(self._db, self.path, timeout=self.timeout)
            except BaseException:
                conn.close()  # a refused or busy file is not left open behind the error
                raise

    @classmethod
    def in_memory(cls) -> Recorder:
        """A recorder whose database lives in this process only (`ask --no-log`, the chat's off-the-record mode)."""
        return cls(MEMORY)

    def close(self) -> None:
        self._db.conn.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing: the only SQL runners ------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T]) -> T:
        return _retry(fn, self._db.conn, self.path, self.timeout)

    @contextmanager
    def _write(self) -> Iterator[None]:
        with _db_errors(self.path), self._lock, transaction(self._db.conn, path=self.path, timeout=self.timeout):
            yield

    def _insert(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int:
        """One row into `table`, inside a `_write()` block; returns its rowid."""
        verb = "insert or replace" if replace else "insert"
        cur = self._db.execute(
            f"{verb} into {table} ({', '.join(row)}) values ({', '.join('?' * len(row))})", list(row.values())
        )
        return int(cur.lastrowid)

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with _db_errors(self.path), self._lock:
            return self._retry(lambda: list(self._db.query(sql, params or [])))

    # -- conversations ----------------------------------------------------------------------------------------
    def new_conversation(self, model: str, title: str | None = None, kind: str = "chat") -> int:
        with self._write():
            return self._insert("conversations", {"title": title, "model": model, "created_at": now(), "kind": kind})

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        model: str | None = None,
        status: str = "complete",
        reply_to: int | None = None,
    ) -> int:
        row = {
            "conversation_id": conversation_id,
            "role": role,
            "content": content,
            "model": model,
            "created_at": now(),
            "status": status,
            "reply_to": reply_to,
            "completed_at": now() if status == "complete" else None,
        }
        with self._write():
            return self._insert("messages", row)

    def add_context(self, model: str, title: str, kind: str, messages: list[dict[str, Any]]) -> int:
        """A new conversation holding `messages` (role, content) as status `context`: the history an API client
        sent with its question, recorded in one transaction; returns the conversation's id. A client's assistant
        turn replies to the user turn before it, as a recorded answer does."""
        with self._write():
            cid = self._insert("conversations", {"title": title, "model": model, "created_at": now(), "kind": kind})
            asked = None
            for m in messages:
                added = self._insert("messages", {
                    "conversation_id": cid, "role": m["role"], "content": m["content"], "created_at": now(),
                    "status": "context", "reply_to": asked if m["role"] == "assistant" else None})
                asked = added if m["role"] == "user" else None
        return cid

    def finish_message(
        self,
        message_id: int,
        content: str,
        status: str,
        stats: dict[str, Any] | None,
        energy: dict[str, Any] | None = None,
        samples: list[tuple[float, float]] | None = None,
    ) -> None:
        """Store an answer's final text, its generation stats and its energy in one transaction."""
        with self._write():
            self._db.execute(
                "update messages set content = ?, status = ?, completed_at = ? where id = ?",
                [content, status, now(), message_id],
            )
            if stats is not None:
                self._insert("generations", {"message_id": message_id, "created_at": now(), **stats}, replace=True)
            if energy is not None:
                self._insert("energy", {"message_id": message_id, "created_at": now(), **energy}, replace=True)
            if samples:
                self._db.conn.executemany(
                    "insert into power_samples (message_id, t, watts) values (?, ?, ?)",
                    [(message_id, t, w) for t, w in samples],
                )

    def latest_conversation_id(self) -> int | None:
        """The chat conversation of this user's own written to last (a resumed old one counts; benchmark ones are
        not chats; one a `serve` client's request made is that program's), or None before the first question."""
        rows = self._rows(
            "select c.id from conversations c where c.kind = 'chat' and not exists (select 1 from messages m join "
            "api_requests r on r.message_id = m.id where m.conversation_id = c.id) and not exists (select 1 from "
            "messages m where m.conversation_id = c.id and m.status = 'context') order by (select max(m.id) from "
            "messages m where m.conversation_id = c.id) desc nulls last, c.id desc limit 1")
        return rows[0]["id"] if rows else None

    def conversation_messages(self, conversation_id: int) -> list[dict[str, Any]]:
        return self._rows("select * from messages where conversation_id = ? order by id", [conversation_id])

    def recent_exchanges(self, limit: int = 10) -> list[dict[str, Any]]:
        """The last `limit` questions with their answers and stats, newest first."""
        sql = """
            select q.id as question_id, q.conversation_id, q.content as prompt, q.created_at,
                   a.id as answer_id, a.content as answer, a.model, a.status,
                   g.prompt_tokens, g.completion_tokens, g.ttft_s, g.tokens_per_s, g.wall_s, g.stop_reason,
                   e.joules, e.avg_watts, e.meter, e.measured
            from messages q
            join conversations c on c.id = q.conversation_id and c.kind = 'chat'
            left join messages a on a.reply_to = q.id and a.role = 'assistant'
            left join generations g on g.message_id = a.id
            left join energy e on e.message_id = a.id
            where q.role = 'user' and q.status != 'context'
            order by q.id desc
            limit ?
        """
        return self._rows(sql, [limit])

    def conversation(self, conversation_id: int) -> dict[str, Any] | None:
        """The conversation's row (id, title, model, created_at, kind), or None when there is none."""
        rows = self._rows("select * from conversations where id = ?", [conversation_id])
        return rows[0] if rows else None

    # -- forgetting ---------------------------------------------------------------------------------------------
    def conversations_matching(self, ids: list[int] | None = None, before: str | None = None) -> list[dict[str, Any]]:
        """Chat conversations (benchmark runs are not the user's chats): those with these `ids`, or those whose last
        message was written before `before` (an ISO date or time, UTC; a conversation still going on after it is
        kept whole), or all when neither is given. Each: id, title, created_at, last_at and how many messages."""
        sql = ("select c.id, c.title, c.created_at, coalesce(max(m.created_at), c.created_at) as last_at, "
               "count(m.id) as messages from conversations c left join messages m on m.conversation_id = c.id "
               "where c.kind = 'chat'")
        params: list[Any] = []
        if ids is not None:
            sql += f" and c.id in ({', '.join('?' * len(ids))})"
            params += ids
        sql += " group by c.id"
        if before is not None:
            sql += " having last_at < ?"
            params.append(before)
        return self._rows(sql + " order by c.id", params)

    def delete_conversations(self, ids: list[int]) -> dict[str, int]:
        """Delete these conversations, their messages and every row tied to those messages (stats, energy, power
        samples, routing decisions, labels, benchmark items) in one transaction: all of it or nothing. Returns the
        rows deleted per table. `vacuum()` afterwards takes them off the disk."""
        counts: dict[str, int] = {}
        with self._write():
            # Temporary tables rather than `in (?, ?, ...)`: a long history has more messages than SQLite takes
            # parameters in one statement.
            self._db.execute("create temp table if not exists doomed_conversations (id integer primary key)")
            self._db.execute("create temp table if not exists doomed_messages (id integer primary key)")
            self._db.execute("delete from temp.doomed_conversations")
            self._db.execute("delete from temp.doomed_messages")
            self._db.conn.executemany("insert or ignore into temp.doomed_conversations (id) values (?)",
                                      [(int(i),) for i in ids])
            self._db.execute("insert into temp.doomed_messages (id) select id from messages where conversation_id "
                             "in (select id from temp.doomed_conversations)")
            doomed = "(select id from temp.doomed_messages)"
            # Children before parents: the real database holds every row to its references.
            for table in ("generations", "energy", "power_samples", "route_labels", "bench_items"):
                counts[table] = self._db.execute(f"delete from {table} where message_id in {doomed}").rowcount
            counts["routing_decisions"] = self._db.execute(
                f"delete from routing_decisions where message_id in {doomed} or escalated_from in {doomed}"
            ).rowcount
            counts["messages"] = self._db.execute(f"delete from messages where id in {doomed}").rowcount
            counts["conversations"] = self._db.execute(
                "delete from conversations where id in (select id from temp.doomed_conversations)").rowcount
            self._db.execute("drop table temp.doomed_messages")
            self._db.execute("drop table temp.doomed_conversations")
            # The triggers only mark the words deleted; merging the index drops them, so the vacuum that follows
            # leaves no trace of the deleted text in the search index either.
            self._db.execute("insert into messages_fts (messages_fts) values ('optimize')")
        return counts

    # Rows tied to a message, by table; what a snapshot keeps and a restore puts back (children after parents).
    _TIED = ("generations", "energy", "power_samples", "routing_decisions", "route_labels", "api_requests")

    def snapshot_conversations(self, ids: list[int]) -> dict[str, list[dict[str, Any]]]:
        """Every row of these conversations, by table, as `restore_conversations` takes them back: what an undo of
        a delete needs. Chat conversations only (benchmark items belong to their run)."""
        found = [c["id"] for c in self.conversations_matching(ids=[int(i) for i in ids])]
        marks = ", ".join("?" * len(found)) or "null"
        snap = {"conversations": self._rows(f"select * from conversations where id in ({marks}) order by id", found),
                "messages": self._rows(f"select * from messages where conversation_id in ({marks}) order by id",
                                       found)}
        for table in self._TIED:
            snap[table] = self._rows(f"select * from {table} where message_id in (select id from messages where "
                                     f"conversation_id in ({marks})) order by rowid", found)
        return snap

    def restore_conversations(self, snapshot: dict[str, list[dict[str, Any]]]) -> None:
        """Put back what `snapshot_conversations` took, under the same ids, in one transaction: all or nothing.
        Refused when another exchange has taken one of those ids since."""
        try:
            with self._write():
                for table in ("conversations", "messages", *self._TIED):
                    for row in snapshot.get(table, []):
                        self._insert(table, row)
        except sqlite3.IntegrityError:
            raise LocalmoeError("cannot undo the delete: its ids have been used by a newer conversation") from None

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise LocalmoeError("a conversation needs a title")
        with self._write():
            if not self._db.execute("update conversations set title = ? where id = ? and kind = 'chat'",
                                    [title, conversation_id]).rowcount:
                raise LocalmoeError(f"there is no conversation {conversation_id}")

    def conversation_list(self, query: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Chat conversations, the latest first: id, title, model, created_at, last_at, messages, joules (the sum
        over its answers, None when none was metered) and measured (0 when any of it was estimated). With `query`:
        only those with a message matching it (see `search_messages`), each with `snippet`, its best match."""
        params: list[Any] = []
        match = ""
        if query is not None and substring_words(query) is not None:
            rows = self.conversation_list(None, limit=1_000_000)
            hits = {r["conversation_id"]: r["snippet"] for r in reversed(self.search_messages(query, 1_000_000))}
            return [{**r, "snippet": hits[r["id"]]} for r in rows if r["id"] in hits][:limit]
        if query is not None:
            q = fts_query(query)
            if not q:
                return []
            match = ("join (select m2.conversation_id as cid, min(f.rank) as best, "
                     "(select snippet(messages_fts, 0, '[', ']', '…', 10) from messages_fts "
                     " join messages m3 on m3.id = messages_fts.rowid "
                     " where messages_fts match ? and m3.conversation_id = m2.conversation_id "
                     " order by rank limit 1) as snippet "
                     "from messages_fts f join messages m2 on m2.id = f.rowid where messages_fts match ? "
                     "group by m2.conversation_id) hit on hit.cid = c.id ")
            params += [q, q]
        sql = (f"select c.id, c.title, c.model, c.created_at, coalesce(max(m.created_at), c.created_at) as last_at, "
               f"count(m.id) as messages, sum(e.joules) as joules, min(e.measured) as measured"
               f"{', hit.snippet' if match else ''} "
               f"from conversations c {match}left join messages m on m.conversation_id = c.id "
               f"left join energy e on e.message_id = m.id where c.kind = 'chat' group by c.id "
               f"order by last_at desc, c.id desc limit ?")
        return self._rows(sql, [*params, limit])

    def search_messages(self, query: str, limit: int = 50) -> list[dict[str, Any]]:
        """Messages of chat conversations matching `query` (every word, each as a prefix), best first: message_id,
        conversation_id, title, role, content, created_at, and `snippet` with the matches in [brackets]."""
        if (words := substring_words(query)) is not None:
            rows = self._rows(
                "select m.id as message_id, m.conversation_id, c.title, m.role, m.content, m.created_at "
                "from messages m join conversations c on c.id = m.conversation_id and c.kind = 'chat' where "
                + " and ".join(["m.content like ? escape '\\'"] * len(words))
                + " order by m.id desc limit ?", [*map(_like, words), limit])
            return [{**r, "snippet": _substring_snippet(r["content"], words)} for r in rows]
        q = fts_query(query)
        if not q:
            return []
        return self._rows(
            "select m.id as message_id, m.conversation_id, c.title, m.role, m.content, m.created_at, "
            "snippet(messages_fts, 0, '[', ']', '…', 12) as snippet "
            "from messages_fts join messages m on m.id = messages_fts.rowid "
            "join conversations c on c.id = m.conversation_id and c.kind = 'chat' "
            "where messages_fts match ? order by rank limit ?", [q, limit])

    def export_conversation(self, conversation_id: int, directory: Path, fmt: str) -> Path:
        """Write the conversation to `directory` as Markdown (`md`, to read) or JSON (`json`: its row and its
        messages exactly as stored, so it reads back equal); returns the file's path."""
        conv = self.conversation(conversation_id)
        if conv is None or conv["kind"] != "chat":
            raise LocalmoeError(f"there is no conversation {conversation_id}")
        if fmt not in ("md", "json"):
            raise LocalmoeError(f"unknown export format {fmt!r} (md or json)")
        messages = self.conversation_messages(conversation_id)
        slug = "-".join("".join(c if c.isalnum() else " " for c in (conv["title"] or "")).lower().split()[:6])
        # the start time tells apart conversations that had the same id (SQLite reuses a deleted last row's id): an
        # export of one never overwrites another's, while exporting the same one again updates its files
        started = "".join(c for c in (conv["created_at"] or "")[:19] if c.isdigit())
        path = Path(directory) / f"conversation-{conversation_id}-{started}{'-' + slug if slug else ''}.{fmt}"
        if fmt == "json":
            text = json.dumps({"conversation": conv, "messages": messages}, indent=2, ensure_ascii=False) + "\n"
        else:
            lines = [f"# {conv['title'] or 'Conversation ' + str(conversation_id)}", "",
                     f"*{conv['model']} · started {conv['created_at'][:19].replace('T', ' ')} UTC · "
                     f"{len(messages)} messages*", ""]
            facts = self.answer_facts(conversation_id)
            for m in messages:
                who = {"user": "You", "assistant": m["model"] or "assistant"}.get(m["role"], m["role"])
                note = "" if m["status"] == "complete" else f" ({m['status']})"
                f = facts.get(m["id"], {})
                if m["role"] == "assistant" and not note and (ending := ending_note(f.get("stop_reason"),
                                                                                   f.get("completion_tokens"))):
                    note = f" {ending}"
                lines += [f"## {who}{note}", "", m["content"] or "*(no text)*", ""]
            text = "\n".join(lines)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.write_private(path, text)
        except OSError as exc:
            raise LocalmoeError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def vacuum(self) -> None:
        """Rewrite the file without the pages deleted rows left behind: until then the deleted text is still in the
        file (and the WAL), readable by anyone who opens it raw. The file shrinks accordingly."""
        if not self.persistent:
            return
        with _db_errors(self.path), self._lock:
            self._retry(lambda: self._db.execute("vacuum"))
            # In WAL mode the rewrite lands in the WAL; the checkpoint moves it into the file and empties the WAL,
            # which held the old pages too.
            self._retry(lambda: self._db.execute("pragma wal_checkpoint(truncate)").fetchall())

    # -- routing ------------------------------------------------------------------------------------------------
    def record_decision(
        self,
        message_id: int | None,
        *,
        tier: str,
        model: str | None,
        strategy: str,
        score: float,
        threshold: float,
        reason: str,
        latency_ms: float,
        notice: str | None = None,
        escalated_from: int | None = None,
        joules: float | None = None,
    ) -> None:
        """Which tier answered `message_id` and why (and what deciding cost); recording the same answer again
        replaces the first."""
        with self._write():
            self._insert("routing_decisions", {
                "message_id": message_id, "tier": tier, "model": model, "strategy": strategy, "score": score,
                "threshold": threshold, "reason": reason, "latency_ms": latency_ms, "notice": notice,
                "escalated_from": escalated_from, "joules": joules, "created_at": now(),
            }, replace=True)

    # -- the API server -----------------------------------------------------------------------------------------
    def record_api_request(self, message_id: int | None, *, client: str | None, user_agent: str | None,
                           endpoint: str, model: str | None, stream: bool, http_status: int,
                           error: str | None = None) -> int:
        """One request to the server and its outcome; `message_id` is the answer it produced, if any."""
        with self._write():
            return self._insert("api_requests", {
                "message_id": message_id, "client": client, "user_agent": user_agent, "endpoint": endpoint,
                "model": model, "stream": int(stream), "http_status": http_status, "error": error,
                "created_at": now(),
            })

    def add_label(self, message_id: int | None, prompt: str, small_wrong: bool, source: str) -> int:
        """A signal about the small tier's answer to `prompt` (`source`: retry, thumbs, ...); returns its id."""
        with self._write():
            return self._insert("route_labels", {"message_id": message_id, "prompt": prompt,
                                                 "small_wrong": int(small_wrong), "source": source,
                                                 "created_at": now()})

    def set_label(self, message_id: int, prompt: str, small_wrong: bool | None, source: str) -> None:
        """The one label of `source` on an answer: replaces an earlier one, and None removes it (a rating taken
        back)."""
        with self._write():
            self._db.execute("delete from route_labels where message_id = ? and source = ?", [message_id, source])
            if small_wrong is not None:
                self._insert("route_labels", {"message_id": message_id, "prompt": prompt,
                                              "small_wrong": int(small_wrong), "source": source, "created_at": now()})

    def answer_facts(self, conversation_id: int) -> dict[int, dict[str, Any]]:
        """Per answer of a conversation, what its stats line showed: completion_tokens, stop_reason, joules,
        measured, the tier that answered ('pinned' for a model the user chose), and the user's rating (True good,
        False bad, None) — for a resumed chat."""
        rows = self._rows(
            "select m.id, g.completion_tokens, g.stop_reason, e.joules, e.measured, "
            # a model the user pinned is recorded as the small tier, but its answers say nothing about the router's
            "case when d.strategy = 'pinned' then 'pinned' else d.tier end as tier, "
            "(select l.small_wrong from route_labels l where l.message_id = m.id and l.source = 'thumbs' "
            "order by l.id desc limit 1) as small_wrong "
            "from messages m left join generations g on g.message_id = m.id left join energy e on e.message_id = m.id "
            "left join routing_decisions d on d.message_id = m.id "
            "where m.conversation_id = ? and m.role = 'assistant'", [conversation_id])
        return {r.pop("id"): {**r, "rating": None if r["small_wrong"] is None else not r["small_wrong"]}
                for r in rows}

    def route_labels(self) -> list[dict[str, Any]]:
        """Every label that carries its question: prompt, small_wrong (0/1), source; oldest first."""
        return self._rows("select prompt, small_wrong, source from route_labels where prompt is not null order by id")

    def labelled_outcomes(self, model: str) -> list[dict[str, Any]]:
        """Benchmark verdicts of `model`: question, correct (0/1), category and the answer's log-probabilities."""
        return self._rows(
            "select b.question, b.correct, b.category, g.mean_logprob, g.min_logprob "
            "from bench_items b left join generations g on g.message_id = b.message_id where b.model = ?",
            [model],
        )

    # -- benchmarks --------------------------------------------------------------------------------------------
    def start_bench_run(
        self,
        *,
        suite: str,
        source: str,
        models: list[str],
        policies: list[str],
        item_limit: int | None,
        hardware: dict[str, Any],
        fingerprint: str,
        meter: str,
        measured: bool,
        version: str,
        max_tokens: int | None = None,
        idle_seconds: float | None = None,
    ) -> int:
        """A new run, status `running`; returns its id."""
        with self._write():
            return self._insert("bench_runs", {
                "suite": suite, "source": source, "models": json.dumps(models), "policies": json.dumps(policies),
                "item_limit": item_limit, "hardware": json.dumps(hardware), "fingerprint": fingerprint,
                "meter": meter, "measured": int(measured), "status": "running", "started_at": now(),
                "localmoe_version": version, "max_tokens": max_tokens, "idle_seconds": idle_seconds,
            })

    def bench_run(self, run_id: int) -> dict[str, Any] | None:
        """A run as started (models, policies and hardware decoded, measured a bool), or None if there is none."""
        rows = self._rows("select * from bench_runs where id = ?", [run_id])
        if not rows:
            return None
        row = rows[0]
        row["models"], row["policies"] = json.loads(row["models"] or "[]"), json.loads(row["policies"] or "[]")
        row["hardware"] = json.loads(row["hardware"] or "{}")
        row["measured"] = bool(row["measured"])
        return row

    def set_bench_run_status(self, run_id: int, status: str, *, finished: bool = False) -> None:
        """`finished` stamps the end time too (the run stopped, whether complete or interrupted)."""
        with self._write():
            if finished:
                self._db.execute("update bench_runs set status = ?, finished_at = ? where id = ?",
                                 [status, now(), run_id])
            else:
                self._db.execute("update bench_runs set status = ? where id = ?", [status, run_id])

    def add_bench_item(self, run_id: int, item: dict[str, Any]) -> None:
        """One graded question of a run, committed on its own so an interrupted run keeps it. `item` holds
        model, policy and item_id and any of BENCH_ITEM_FIELDS."""
        unknown = set(item) - BENCH_ITEM_FIELDS
        if unknown:
            raise ValueError(f"unknown benchmark item fields: {', '.join(sorted(unknown))}")
        with self._write():
            key = [run_id, item["model"], item["policy"], item["item_id"]]
            if self._db.execute("select 1 from bench_items where run_id = ? and model = ? and policy = ? and "
                                "item_id = ?", key).fetchone():
                # only another process writing the same run gets here: this one skipped what was done when it began
                raise LocalmoeError(f"benchmark run {run_id} is being run by another process as well (item "
                                    f"{item['item_id']} of {item['model']}/{item['policy']} is already recorded); "
                                    "let one finish")
            self._insert("bench_items", {"run_id": run_id, **item, "created_at": now()})

    def bench_net_joules(self, run_id: int) -> dict[tuple[str, str], tuple[int, float]]:
        """Per (model, policy) of a run: how many items have idle-subtracted joules, and their sum."""
        rows = self._rows("select model, policy, count(net_joules) as n, sum(net_joules) as net from bench_items "
                          "where run_id = ? group by model, policy", [run_id])
        return {(r["model"], r["policy"]): (r["n"], r["net"] or 0.0) for r in rows}

    def done_bench_items(self, run_id: int) -> set[tuple[str, str, str]]:
        """(model, policy, item_id) of every item the run already has."""
        rows = self._rows("select model, policy, item_id from bench_items where run_id = ?", [run_id])
        return {(r["model"], r["policy"], r["item_id"]) for r in rows}

    def mark_calibration_run(self, run_id: int) -> None:
        """Tag a benchmark run as a router calibration (`router calibrate`)."""
        with self._write():
            self._db.execute("update bench_runs set purpose = 'calibration' where id = ?", [run_id])

    def latest_calibration_run(self) -> dict[str, Any] | None:
        """The newest calibration run (as `bench_run` gives it), or None."""
        rows = self._rows("select id from bench_runs where purpose = 'calibration' order by id desc limit 1")
        return self.bench_run(rows[0]["id"]) if rows else None

    def calibration_items(self, run_id: int) -> list[dict[str, Any]]:
        """Every graded answer of a run with its answer's log-probabilities: model, item_id, question, category,
        correct, joules, completion_tokens, mean_logprob, min_logprob; in the order they were recorded."""
        return self._rows(
            "select b.model, b.item_id, b.question, b.category, b.correct, b.joules, b.seconds, "
            "b.completion_tokens, g.mean_logprob, g.min_logprob "
            "from bench_items b left join generations g on g.message_id = b.message_id where b.run_id = ? "
            "order by b.rowid",
            [run_id],
        )

    def bench_results(self, run_id: int) -> list[dict[str, Any]]:
        """Per (model, policy) of a run: accuracy, energy, IPW and the rest of the `bench_results` view."""
        return self._rows("select * from bench_results where run_id = ? order by model, policy", [run_id])

    def bench_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest runs, newest first: id, suite, status, started_at, meter and how many items each holds."""
        return self._rows(
            "select r.id, r.suite, r.status, r.started_at, r.meter, count(b.item_id) as items "
            "from bench_runs r left join bench_items b on b.run_id = r.id group by r.id order by r.id desc limit ?",
            [limit],
        )


def _file_of(conn: sqlite3.Connection) -> str:
    try:
        return conn.execute("PRAGMA database_list").fetchone()[2] or "(in memory)"
    except sqlite3.Error:
        return "(unknown file)"


def _applied(db: sqlite_utils.Database) -> set[str]:
    try:
        return {r[0] for r in db.execute("select name from _migrations").fetchall()}
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return set()
        raise


def _refuse_newer(done: set[str], known: list[str], where: Path | str) -> None:
    newer = sorted(done - set(known))
    if newer:
        raise LocalmoeError(
            f"database {where} was written by a newer localmoe (it has migration {newer[-1]}); "
            "upgrade localmoe or set LOCALMOE_HOME to another directory"
        )


def _test_pause(name: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    target, _, seconds = spec.partition(":")
    if target == name:
        print(f"localmoe: test pause inside migration {name}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


def migrate(
    db: sqlite_utils.Database,
    path: Path | None = None,
    migrations: list[Migration] | None = None,
    *,
    timeout: float | None = None,
) -> list[str]:
    """Apply the migrations this file lacks (all of MIGRATIONS unless told); returns the names this call applied.

    Safe against other processes migrating the same file: each migration is checked and applied under an
    exclusive lock, in its own transaction with its `_migrations` row, so it is applied once, and a crash leaves
    the file at the previous migration for the next start to continue from."""
    migrations = MIGRATIONS if migrations is None else migrations
    timeout = busy_timeout() if timeout is None else timeout
    where: Path | str = path or _file_of(db.conn)
    known = [m.__name__ for m in migrations]
    # Without the lock: migrations are only ever added, so a file that has them all stays so, and a warm start
    # (the common case) takes no lock at all.
    done = _retry(lambda: _applied(db), db.conn, where, timeout)
    _refuse_newer(done, known, where)
    applied = []
    for fn in migrations:
        if fn.__name__ in done:
            continue
        with transaction(db.conn, exclusive=True, path=where, timeout=timeout):
            db.execute("create table if not exists _migrations (name text primary key, applied_at text)")
            done = _applied(db)  # again, inside the lock: another process may have done it while we waited
            _refuse_newer(done, known, where)
            if fn.__name__ in done:
                continue
            fn(db)
            _test_pause(fn.__name__)
            db.execute("insert into _migrations (name, applied_at) values (?, ?)", [fn.__name__, now()])
        applied.append(fn.__name__)
    return applied
