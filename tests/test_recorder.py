from __future__ import annotations

import ast
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils

from localmoe.errors import LocalmoeError
from localmoe.record.recorder import MIGRATIONS, DatabaseBusy, Recorder, migrate

PACKAGE = Path(__file__).resolve().parents[1] / "localmoe"

# Holds the write lock of the database given as argv[1] until killed; says "locked" once it has it.
HOLD_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("insert into conversations (title, model, created_at) values ('holder', 'm', 'now')")
print("locked", flush=True)
time.sleep(120)
"""


def rows(path, sql, params=()):
    """The real file, read with a connection of the test's own."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def table_names(path):
    return {r["name"] for r in rows(path, "select name from sqlite_master where type in ('table', 'view')")}


def test_fresh_database_has_tables_wal_and_migrations(home):
    with Recorder() as rec:
        assert rec.path == home / "localmoe.db"
    assert {"conversations", "messages", "generations", "_migrations"} <= table_names(home / "localmoe.db")
    assert rows(home / "localmoe.db", "pragma journal_mode")[0]["journal_mode"] == "wal"
    names = [r["name"] for r in rows(home / "localmoe.db", "select name from _migrations order by rowid")]
    assert names == [m.__name__ for m in MIGRATIONS]


def test_exchange_roundtrip(home):
    with Recorder() as rec:
        cid = rec.new_conversation("m")
        q = rec.add_message(cid, "user", "hi")
        a = rec.add_message(cid, "assistant", "", model="m", status="pending", reply_to=q)
        rec.finish_message(a, "hello", "complete", {"model": "m", "backend": "b", "prompt_tokens": 3,
                                                   "completion_tokens": 2, "ttft_s": 0.1, "tokens_per_s": 50.0,
                                                   "wall_s": 0.2, "stop_reason": "stop"})
        [row] = rec.recent_exchanges(5)
    assert (row["prompt"], row["answer"], row["status"], row["completion_tokens"]) == ("hi", "hello", "complete", 2)


def test_older_file_is_upgraded_and_keeps_its_rows(home):
    home.mkdir(parents=True)
    path = home / "localmoe.db"
    old = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    assert migrate(old, migrations=MIGRATIONS[:1]) == ["m001_initial"]
    old.execute("insert into conversations (id, title, model, created_at) values (1, 't', 'm', 'then')")
    old.execute("insert into messages (conversation_id, role, content, model, created_at) "
                "values (1, 'user', 'an old question', null, 'then')")
    old.conn.close()

    with Recorder() as rec:
        [msg] = rec.conversation_messages(1)
        assert msg["content"] == "an old question" and msg["status"] == "complete"
    assert [r["name"] for r in rows(path, "select name from _migrations order by rowid")] == [
        m.__name__ for m in MIGRATIONS]
    assert "generations" in table_names(path)


def test_newer_file_is_refused(home):
    Recorder().close()
    conn = sqlite3.connect(home / "localmoe.db", isolation_level=None)
    conn.execute("insert into _migrations (name, applied_at) values ('m999_from_the_future', 'later')")
    conn.close()
    with pytest.raises(LocalmoeError, match="newer localmoe"):
        Recorder()


def test_newer_file_is_refused_even_when_this_one_is_behind(home):
    """The refusal is re-checked inside the lock, before anything is applied."""
    home.mkdir(parents=True)
    db = sqlite_utils.Database(sqlite3.connect(home / "localmoe.db", isolation_level=None))
    migrate(db, migrations=MIGRATIONS[:1])
    db.execute("insert into _migrations (name, applied_at) values ('m999_from_the_future', 'later')")
    db.conn.close()
    with pytest.raises(LocalmoeError, match="newer localmoe"):
        Recorder()
    assert "generations" not in table_names(home / "localmoe.db")


def test_failed_migration_leaves_previous_version(home):
    home.mkdir(parents=True)
    db = sqlite_utils.Database(sqlite3.connect(home / "x.db", isolation_level=None))

    def m002_broken(db):
        db.execute("create table half_done (x integer)")
        raise RuntimeError("boom")

    migrate(db, migrations=MIGRATIONS[:1])
    with pytest.raises(RuntimeError):
        migrate(db, migrations=[MIGRATIONS[0], m002_broken])
    assert "half_done" not in db.table_names()
    assert [r["name"] for r in db["_migrations"].rows] == ["m001_initial"]


def test_second_open_finds_the_work_done(home):
    Recorder().close()
    with Recorder() as rec:
        assert rec.recent_exchanges() == []
    assert rows(home / "localmoe.db", "select count(*) as n from _migrations")[0]["n"] == len(MIGRATIONS)


def test_unwritable_home(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("LOCALMOE_HOME", str(blocker / "home"))
    with pytest.raises(LocalmoeError, match="cannot use data directory"):
        Recorder()


# -- many writers ----------------------------------------------------------------------------------------------

def test_a_write_waits_for_another_writer_then_succeeds(home):
    with Recorder() as rec:
        other = sqlite3.connect(rec.path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("insert into conversations (title, model, created_at) values ('first', 'm', 'now')")
        release = threading.Timer(0.6, lambda: other.execute("COMMIT"))
        release.start()
        try:
            t0 = time.monotonic()
            rec.new_conversation("m", title="second")
            waited = time.monotonic() - t0
        finally:
            release.join()
            other.close()
    assert waited >= 0.5
    titles = [r["title"] for r in rows(home / "localmoe.db", "select title from conversations order by id")]
    assert titles == ["first", "second"]


def test_a_write_gives_up_after_the_timeout_with_one_line_naming_the_holder(home):
    Recorder().close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(home / "localmoe.db")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Recorder(timeout=0.3) as rec:  # a warm open takes no lock: it succeeds while the other one writes
            t0 = time.monotonic()
            with pytest.raises(DatabaseBusy) as info:
                rec.new_conversation("m")
            waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    msg = str(info.value)
    assert 0.25 <= waited < 3
    assert "\n" not in msg and isinstance(info.value, LocalmoeError)
    assert msg.startswith(f"database {home / 'localmoe.db'} is busy: still locked after 0.3 s")
    assert f"process {holder.pid} (" in msg and "-c" in msg
    assert rows(home / "localmoe.db", "select count(*) as n from conversations")[0]["n"] == 0


def test_timeout_from_the_environment(home, monkeypatch):
    monkeypatch.setenv("LOCALMOE_DB_TIMEOUT", "2.5")
    with Recorder() as rec:
        assert rec.timeout == 2.5
    monkeypatch.setenv("LOCALMOE_DB_TIMEOUT", "soon")
    with pytest.raises(LocalmoeError, match="LOCALMOE_DB_TIMEOUT must be a number"):
        Recorder()


# -- named methods: the recorder owns the tables -----------------------------------------------------------------

def test_decisions_and_labels(home):
    with Recorder() as rec:
        cid = rec.new_conversation("m")
        q = rec.add_message(cid, "user", "2+2?")
        a = rec.add_message(cid, "assistant", "4", model="m", reply_to=q)
        for reason in ("first", "again"):  # the same answer decided twice keeps the last decision
            rec.record_decision(a, tier="small", model="m", strategy="features", score=0.2, threshold=0.5,
                                reason=reason, latency_ms=0.3)
        rec.add_label(a, "2+2?", False, "thumbs")
        rec.add_label(None, "hard one", True, "retry")
        assert rec.route_labels() == [{"prompt": "2+2?", "small_wrong": 0, "source": "thumbs"},
                                      {"prompt": "hard one", "small_wrong": 1, "source": "retry"}]
    [d] = rows(home / "localmoe.db", "select message_id, tier, reason, escalated_from from routing_decisions")
    assert d == {"message_id": a, "tier": "small", "reason": "again", "escalated_from": None}


def test_bench_runs_items_and_results(home):
    with Recorder() as rec:
        run = rec.start_bench_run(suite="quick", source="builtin", models=["m"], policies=["direct"],
                                  item_limit=2, hardware={"cpu_model": "cpu", "physical_cores": 2},
                                  fingerprint="fp", meter="estimate", measured=False, version="0")
        row = rec.bench_run(run)
        assert (row["status"], row["models"], row["policies"], row["hardware"]["physical_cores"], row["measured"]) \
            == ("running", ["m"], ["direct"], 2, False)
        assert rec.bench_run(run + 1) is None
        cid = rec.new_conversation("m", kind="bench")
        for n, correct in ((1, 1), (2, 0)):
            q = rec.add_message(cid, "user", f"q{n}")
            a = rec.add_message(cid, "assistant", "x", model="m", reply_to=q)
            rec.finish_message(a, "x", "complete", {"model": "m", "mean_logprob": -0.5 * n, "min_logprob": -n})
            rec.add_bench_item(run, {"model": "m", "policy": "direct", "item_id": f"i{n}", "question": f"q{n}",
                                     "category": "math", "correct": correct, "message_id": a, "joules": 2.0,
                                     "seconds": 1.0, "completion_tokens": 4, "tier": None})
        with pytest.raises(ValueError, match="unknown benchmark item fields: bogus"):
            rec.add_bench_item(run, {"model": "m", "policy": "direct", "item_id": "i3", "bogus": 1})
        assert rec.done_bench_items(run) == {("m", "direct", "i1"), ("m", "direct", "i2")}
        rec.set_bench_run_status(run, "complete", finished=True)
        assert rec.bench_run(run)["status"] == "complete" and rec.bench_run(run)["finished_at"]
        [res] = rec.bench_results(run)
        assert (res["n"], res["accuracy"], res["joules_per_query"], res["avg_watts"]) == (2, 0.5, 2.0, 2.0)
        [listed] = rec.bench_runs()
        assert (listed["id"], listed["status"], listed["items"]) == (run, "complete", 2)
        outcomes = sorted(rec.labelled_outcomes("m"), key=lambda r: r["question"])
        assert [(o["question"], o["correct"], o["mean_logprob"]) for o in outcomes] == [("q1", 1, -0.5),
                                                                                       ("q2", 0, -1.0)]
        assert rec.labelled_outcomes("other") == []


def test_no_generic_sql_entry_points():
    for name in ("query", "insert", "update", "execute", "db"):
        assert not hasattr(Recorder, name), name


SQL = re.compile(r"\b(select\s.+\sfrom|insert\s+(or\s+\w+\s+)?into|update\s+\w+\s+set|delete\s+from|"
                 r"create\s+(table|view|index)|alter\s+table|pragma\s+\w+)\b", re.I | re.S)


def test_only_the_recorder_writes_sql():
    """One owner per concern: SQL text appears in the recorder and nowhere else in the package."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "recorder.py" and path.parent.name == "record":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and SQL.search(node.value)):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value[:60]!r}")
    assert offenders == []


def test_a_commit_that_stays_busy_leaves_no_open_transaction(tmp_path):
    """Rollback-journal mode: a reader's shared lock keeps COMMIT busy. After giving up, the connection must be out
    of the transaction, so the next write on it works once the reader is gone."""
    from localmoe.record.recorder import DatabaseBusy, transaction

    db = tmp_path / "journal.db"
    writer = sqlite3.connect(db, isolation_level=None, timeout=0.05)
    writer.execute("create table t (x integer)")
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("begin")
    reader.execute("select count(*) from t").fetchone()  # holds a SHARED lock until it ends
    with pytest.raises(DatabaseBusy):
        with transaction(writer, path=db, timeout=0.3):
            writer.execute("insert into t values (1)")
    assert not writer.in_transaction
    reader.execute("commit")
    with transaction(writer, path=db, timeout=1):
        writer.execute("insert into t values (2)")
    assert writer.execute("select x from t").fetchall() == [(2,)]
