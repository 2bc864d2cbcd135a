"""Conversations are readable by their owner only: modes of the data directory and of every file localmoe writes.
And the user decides what is kept: answers off the record (`ask --no-log`, Ctrl+O in the chat), deletion with
everything tied to it (`logs --delete/--before/--all`)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sqlite3
import stat
import subprocess
from pathlib import Path

from test_tui import type_and_send, wait_for
from textual.widgets import Static

from helpers import run_cli
from localmoe.engine import GenerationConfig
from localmoe.record.recorder import Recorder
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, Question


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def default_dir_env(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """No LOCALMOE_HOME: the platform's data dir, under a fake home."""
    monkeypatch.delenv("LOCALMOE_HOME")
    return {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "share")}


def test_a_fresh_default_data_dir_and_its_files_are_private(tmp_path, monkeypatch):
    env = default_dir_env(tmp_path, monkeypatch)
    r = run_cli("ask", "Say hi.", "--max-tokens", "4", env_extra=env)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "share" / "localmoe"
    assert mode(d) == 0o700
    files = [p for p in d.iterdir() if p.name.startswith("localmoe.db") or p.suffix == ".json"]
    assert any(p.name == "localmoe.db" for p in files)
    assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
    assert "notice: made" not in r.stderr  # nothing to tighten on a fresh install


def test_an_old_install_is_tightened_once_with_a_notice(tmp_path, monkeypatch):
    env = default_dir_env(tmp_path, monkeypatch)
    d = tmp_path / "share" / "localmoe"
    assert run_cli("route", "hi", env_extra=env).returncode == 0
    d.chmod(0o755)
    (d / "localmoe.db").chmod(0o644)
    (d / "settings.toml").write_text("[router]\n")
    (d / "settings.toml").chmod(0o644)
    r = run_cli("route", "hi", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert mode(d) == 0o700 and mode(d / "localmoe.db") == 0o600 and mode(d / "settings.toml") == 0o600
    assert r.stderr.count("notice: made") == 1 and "settings.toml" in r.stderr
    again = run_cli("route", "hi", env_extra=env)
    assert "notice: made" not in again.stderr


def test_a_data_dir_named_by_the_user_keeps_its_mode_but_our_files_are_private(home):
    home.mkdir(mode=0o755, parents=True)
    home.chmod(0o755)
    assert run_cli("ask", "Say hi.", "--max-tokens", "4").returncode == 0
    assert mode(home) == 0o755
    assert mode(home / "localmoe.db") == 0o600
    wal = home / "localmoe.db-wal"
    if wal.exists():
        assert mode(wal) == 0o600


# -- recording under the user's control -----------------------------------------------------------------------------

def every_row(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table (an absent file has none): what `--no-log` must leave as it found."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
        return {t: sorted(conn.execute(f"select * from {t}").fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


def test_no_log_answers_with_its_energy_and_stores_nothing(home):
    db = home / "localmoe.db"
    # a fresh data dir: not even the database file is needed
    r = run_cli("ask", "Say hi.", "--no-log", "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"].strip() and out["status"] == "complete" and out["recorded"] is False
    assert out["energy"]["joules"] > 0 and out["conversation_id"] is None and out["message_id"] is None
    assert all(rows == [] for rows in every_row(db).values())
    # next to a recorded history, with a tier named, in text mode too: nothing changes in any table
    recorded = json.loads(run_cli("ask", "Say hello.", "--json", "--max-tokens", "4").stdout)
    assert recorded["recorded"] is True and recorded["conversation_id"] == 1
    before = every_row(db)
    assert before["messages"] and before["generations"] and before["routing_decisions"]
    r = run_cli("ask", "What is 2 + 2?", "--no-log", "--tier", "small", "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["route"]["tier"] == "small"
    text = run_cli("ask", "Name a colour.", "--no-log", "--max-tokens", "8")
    assert text.returncode == 0 and text.stdout.strip(), text.stderr
    assert every_row(db) == before
    assert "Name a colour." not in run_cli("logs").stdout
    # continuing a recorded conversation off the record is refused, in one line
    for flags in (["-c"], ["--conversation", "1"]):
        r = run_cli("ask", "And then?", "--no-log", *flags)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--no-log" in r.stderr, r.stderr
    assert every_row(db) == before


SECRET = "the-password-is-swordfish "


def fill(db: Path) -> dict[str, list[int]]:
    """Three chat conversations and a benchmark one, each answer with every kind of row tied to it, and large enough
    that deleting two shows in the file size. Returns the message ids of each conversation (by title)."""
    ids: dict[str, list[int]] = {}
    with Recorder(db) as rec:
        run = rec.start_bench_run(suite="s", source="t", models=["m"], policies=["direct"], item_limit=None,
                                  hardware={}, fingerprint="f", meter="estimate", measured=False, version="0")
        for title, kind in (("old", "chat"), ("old but continued", "chat"), ("new", "chat"), ("bench", "bench")):
            cid = rec.new_conversation("m", title=title, kind=kind)
            q = rec.add_message(cid, "user", f"{title}: " + SECRET * 4000)
            small = rec.add_message(cid, "assistant", "", model="m", status="pending", reply_to=q)
            rec.finish_message(small, SECRET * 4000, "complete", {"model": "m", "completion_tokens": 3},
                               {"joules": 1.0, "measured": 0}, [(0.0, 5.0), (0.1, 6.0)])
            large = rec.add_message(cid, "assistant", "", model="big", status="pending", reply_to=q)
            rec.finish_message(large, "large answer", "complete", {"model": "big"}, {"joules": 9.0, "measured": 0})
            rec.record_decision(small, tier="small", model="m", strategy="cascade", score=0.7, threshold=0.5,
                                reason="unsure", latency_ms=1.0)
            rec.record_decision(large, tier="large", model="big", strategy="cascade", score=0.7, threshold=0.5,
                                reason="escalated", latency_ms=1.0, escalated_from=small)
            rec.set_label(small, f"{title} question", True, "thumbs")
            rec.add_bench_item(run, {"model": "m", "policy": "direct", "item_id": title, "message_id": small})
            ids[title] = [q, small, large]
    conn = sqlite3.connect(db)
    with conn:  # dated as if written long ago; the continued one has a recent last message
        conn.execute("update conversations set created_at = '2020-01-01T10:00:00.000+00:00' where title like 'old%'")
        conn.execute("update messages set created_at = '2020-01-01T10:00:00.000+00:00' where id in (?, ?, ?, ?, ?)",
                     [*ids["old"], ids["old but continued"][0], ids["old but continued"][1]])
    conn.close()
    return ids


def rows_tied_to(db: Path, conversation_ids: list[int], message_ids: list[int]) -> list[tuple[str, tuple]]:
    """Every row, in any table, that names one of these conversations or messages."""
    conn = sqlite3.connect(db)
    found = []
    tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
    for table in tables:
        columns = [r[1] for r in conn.execute(f"pragma table_info({table})")]
        for row in conn.execute(f"select * from {table}"):
            values = dict(zip(columns, row, strict=True))
            if (table == "conversations" and values["id"] in conversation_ids
                    or table == "messages" and values["id"] in message_ids
                    or values.get("conversation_id") in conversation_ids
                    or any(values.get(c) in message_ids for c in ("message_id", "reply_to", "escalated_from"))):
                found.append((table, row))
    conn.close()
    return found


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def test_deleting_a_conversation_removes_every_row_tied_to_it_and_shrinks_the_file(home):
    home.mkdir(parents=True)
    db = home / "localmoe.db"
    ids = fill(db)
    conversation = {r[0]: r[1] for r in sqlite3.connect(db).execute("select title, id from conversations")}
    assert rows_tied_to(db, [conversation["new"]], ids["new"])  # the query sees them before
    size = db_bytes(db)
    r = run_cli("logs", "--delete", str(conversation["new"]), "--yes", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["conversation_ids"] == [conversation["new"]]
    assert out["deleted"] == {"conversations": 1, "messages": 3, "generations": 2, "energy": 2, "power_samples": 2,
                              "routing_decisions": 2, "route_labels": 1, "bench_items": 1}
    assert rows_tied_to(db, [conversation["new"]], ids["new"]) == []
    assert db_bytes(db) < size - 100_000 and out["bytes_after"] < out["bytes_before"]
    # the others are whole
    for title in ("old", "old but continued", "bench"):
        assert len(rows_tied_to(db, [conversation[title]], ids[title])) == 14, title
    # an id that is not there is refused
    r = run_cli("logs", "--delete", "99", "--yes")
    assert r.returncode == 2 and "no conversation 99" in r.stderr


def test_before_and_all_pick_the_right_conversations_and_the_deleted_text_is_gone_from_the_disk(home):
    home.mkdir(parents=True)
    db = home / "localmoe.db"
    ids = fill(db)
    conversation = {r[0]: r[1] for r in sqlite3.connect(db).execute("select title, id from conversations")}
    r = run_cli("logs", "--before", "2021-01-01", "--yes")
    assert r.returncode == 0, r.stderr
    assert "deleted 1 conversation, 3 messages" in r.stdout
    assert rows_tied_to(db, [conversation["old"]], ids["old"]) == []
    # a conversation still going on after the date is kept whole
    assert len(rows_tied_to(db, [conversation["old but continued"]], ids["old but continued"])) == 14
    assert run_cli("logs", "--before", "2021-13-01").returncode == 2  # not a date: refused by the parser
    r = run_cli("logs", "--all", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["conversation_ids"] == [conversation["old but continued"], conversation["new"]]
    assert run_cli("logs").stdout.strip() == "no exchanges recorded yet"
    # the benchmark conversation is not a chat: kept; and the deleted text is in no byte of the files
    assert len(rows_tied_to(db, [conversation["bench"]], ids["bench"])) == 14
    disk = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("localmoe.db"))
    assert disk.count(b"old but continued: the-password") == 0 and disk.count(b"new: the-password") == 0
    assert disk.count(b"bench: the-password") == 1


def test_deleting_asks_first_and_refuses_without_a_terminal(home):
    home.mkdir(parents=True)
    db = home / "localmoe.db"
    fill(db)
    before = every_row(db)
    r = run_cli("logs", "--all", stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "delete 3 conversations (9 messages): needs a confirmation" in r.stderr and "--yes" in r.stderr
    assert every_row(db) == before
    for answer, kept in (("n", True), ("y", False)):
        primary, secondary = pty.openpty()
        os.write(primary, f"{answer}\n".encode())
        r = run_cli("logs", "--all", stdin=secondary)
        os.close(primary)
        os.close(secondary)
        assert r.returncode == 0, r.stderr
        assert "delete 3 conversations (9 messages)? [y/N]" in r.stderr
        assert (every_row(db) == before) is kept


def test_off_the_record_in_the_chat(home):
    """Ctrl+O: the question and answer appear on screen, nothing new reaches the database; Ctrl+O again and the next
    one is recorded, in the same conversation."""
    db = home / "localmoe.db"

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=16, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.sub_title == "smollm2-135m-instruct")
            assert screen.active_bindings["ctrl+o"].binding.description == "Off the record"
            await type_and_send(pilot, "Name a colour.")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 1 and screen.query(Answer)[0].done)
            recorded = every_row(db)
            assert len(recorded["messages"]) == 2

            await pilot.press("ctrl+o")
            await pilot.pause()
            assert screen.sub_title == "smollm2-135m-instruct · off the record"
            assert screen.active_bindings["ctrl+o"].binding.description == "Record again"
            await type_and_send(pilot, "Name a fruit.")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 2 and screen.query(Answer)[1].done)
            off = screen.query(Answer)[1]
            assert off.status == "complete" and off.text.strip()
            assert screen.query(Question)[1].render().plain == "Name a fruit."
            stats = str(off.query_one(".stats", Static).render())
            assert off.energy is not None and f"{off.energy.joules:.1f} J" in stats  # the energy is still shown
            # rating it is shown, and said not to be stored (it said "recorded for router train")
            notes: list[str] = []
            screen.notify = lambda message, *a, **k: notes.append(str(message))
            await pilot.press("ctrl+g")
            assert off.rating is True and notes and "off the record" in notes[-1] and "recorded" not in notes[-1]
            assert every_row(db) == recorded

            await pilot.press("ctrl+o")
            await pilot.pause()
            assert screen.sub_title == "smollm2-135m-instruct"
            await type_and_send(pilot, "Name an animal.")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 3 and screen.query(Answer)[2].done)

    asyncio.run(run())
    conn = sqlite3.connect(db)
    rows = conn.execute("select conversation_id, role, content from messages order by id").fetchall()
    assert [r[2] for r in rows if r[1] == "user"] == ["Name a colour.", "Name an animal."]
    assert len(rows) == 4 and len({r[0] for r in rows}) == 1
    assert conn.execute("select count(*) from routing_decisions").fetchone() == (2,)
