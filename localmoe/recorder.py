"""Every exchange goes into one SQLite file, with versioned migrations (the simonw/llm way).

Migrations are small functions applied in order at open and recorded in `_migrations`; a file written by a
newer localmoe (a migration we do not know) is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from localmoe import paths
from localmoe.errors import LocalmoeError

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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """All-or-nothing writes, DDL included: the connection runs in autocommit mode and we BEGIN ourselves,
    because Python's implicit transactions do not cover DDL and `with conn:` blocks commit early."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        msg = str(exc)
        if "full" in msg:
            msg += " (free some disk space; nothing already recorded was lost)"
        raise LocalmoeError(f"database {path}: {msg}") from None


class Recorder:
    """The SQLite log. Open it, record through its methods, close it; safe to keep open for a whole session."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else paths.db_path()
        with _db_errors(self.path):
            # Shared by the UI thread and generation workers; sqlite serialises calls, the lock our transactions.
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10, isolation_level=None)
            self.db = sqlite_utils.Database(conn)
            self._lock = threading.RLock()
            # WAL keeps the file consistent if we die mid-write; FULL sync so an answer reported is on disk.
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrate(self.db, self.path)

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_conversation(self, model: str, title: str | None = None, kind: str = "chat") -> int:
        with self._write():
            cur = self.db.execute(
                "insert into conversations (title, model, created_at, kind) values (?, ?, ?, ?)",
                [title, model, now(), kind],
            )
            return int(cur.lastrowid)

    def insert(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int:
        """One row, in its own transaction; returns its rowid."""
        with self._write():
            return self._insert(table, row, replace=replace)

    def _insert(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int:
        verb = "insert or replace" if replace else "insert"
        cur = self.db.execute(
            f"{verb} into {table} ({', '.join(row)}) values ({', '.join('?' * len(row))})", list(row.values())
        )
        return int(cur.lastrowid)

    def update(self, table: str, pk: dict[str, Any], values: dict[str, Any]) -> None:
        where = " and ".join(f"{k} = ?" for k in pk)
        with self._write():
            self.db.execute(f"update {table} set {', '.join(f'{k} = ?' for k in values)} where {where}",
                            [*values.values(), *pk.values()])

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with _db_errors(self.path):
            return list(self.db.query(sql, params or []))

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
            cur = self.db.execute(
                f"insert into messages ({', '.join(row)}) values ({', '.join('?' * len(row))})", list(row.values())
            )
            return int(cur.lastrowid)

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
            self.db.execute(
                "update messages set content = ?, status = ?, completed_at = ? where id = ?",
                [content, status, now(), message_id],
            )
            if stats is not None:
                self._insert("generations", {"message_id": message_id, "created_at": now(), **stats}, replace=True)
            if energy is not None:
                self._insert("energy", {"message_id": message_id, "created_at": now(), **energy}, replace=True)
            if samples:
                self.db.conn.executemany(
                    "insert into power_samples (message_id, t, watts) values (?, ?, ?)",
                    [(message_id, t, w) for t, w in samples],
                )

    @contextmanager
    def _write(self) -> Iterator[None]:
        with _db_errors(self.path), self._lock, transaction(self.db.conn):
            yield

    def conversation_messages(self, conversation_id: int) -> list[dict[str, Any]]:
        with _db_errors(self.path):
            return list(
                self.db.query(
                    "select * from messages where conversation_id = ? order by id", [conversation_id]
                )
            )

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
            where q.role = 'user'
            order by q.id desc
            limit ?
        """
        with _db_errors(self.path):
            return list(self.db.query(sql, [limit]))


def migrate(
    db: sqlite_utils.Database, path: Path | None = None, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply the migrations this file lacks (all of MIGRATIONS unless told); returns their names."""
    migrations = MIGRATIONS if migrations is None else migrations
    db.execute("create table if not exists _migrations (name text primary key, applied_at text)")
    done = {r["name"] for r in db["_migrations"].rows}
    known = [m.__name__ for m in migrations]
    newer = sorted(done - set(known))
    if newer:
        raise LocalmoeError(
            f"database {path or db.conn} was written by a newer localmoe (it has migration {newer[-1]}); "
            "upgrade localmoe or set LOCALMOE_HOME to another directory"
        )
    applied = []
    for fn in migrations:
        if fn.__name__ in done:
            continue
        with transaction(db.conn):  # a crash leaves the file at the previous version
            fn(db)
            db.execute("insert into _migrations (name, applied_at) values (?, ?)", [fn.__name__, now()])
        applied.append(fn.__name__)
    return applied
