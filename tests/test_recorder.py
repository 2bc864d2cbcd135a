from __future__ import annotations

import sqlite3

import pytest
import sqlite_utils

from localmoe.errors import LocalmoeError
from localmoe.recorder import MIGRATIONS, Recorder, migrate


def test_fresh_database_has_tables_wal_and_migrations(home):
    with Recorder() as rec:
        assert rec.path == home / "localmoe.db"
        assert {"conversations", "messages", "generations", "_migrations"} <= set(rec.db.table_names())
        assert rec.db.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert [r["name"] for r in rec.db["_migrations"].rows] == [m.__name__ for m in MIGRATIONS]


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
        names = [r["name"] for r in rec.db["_migrations"].rows]
        assert names == [m.__name__ for m in MIGRATIONS]
        [msg] = rec.conversation_messages(1)
        assert msg["content"] == "an old question" and msg["status"] == "complete"
        assert "generations" in rec.db.table_names()


def test_newer_file_is_refused(home):
    with Recorder() as rec:
        rec.db.execute("insert into _migrations (name, applied_at) values ('m999_from_the_future', 'later')")
    with pytest.raises(LocalmoeError, match="newer localmoe"):
        Recorder()


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


def test_unwritable_home(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("LOCALMOE_HOME", str(blocker / "home"))
    with pytest.raises(LocalmoeError, match="cannot create data directory"):
        Recorder()
