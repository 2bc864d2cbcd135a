"""Many processes, one database: first use by many commands at once, writers waiting for their turn, and a crash
in the middle of a migration. Real subprocesses on a real SQLite file."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import sqlite_utils
from test_recorder import HOLD_WRITE_LOCK

from helpers import run_cli
from localmoe.record.recorder import MIGRATIONS, PAUSE_ENV, migrate

ALL = [m.__name__ for m in MIGRATIONS]

# One command of a round: imports first, then waits for the start file, so that every process of the round
# reaches the database at the same moment. "rate" is the UI's thumbs up/down (no CLI command gives ratings);
# "open" only opens the recorder and writes one row; anything else is the `localmoe` command line.
WORKER = """
import os, sys, time
go, ready, kind, *args = sys.argv[1:]
if kind == "open":
    from localmoe.record.recorder import Recorder
elif kind == "rate":
    from localmoe.chat.assistant import Assistant
else:
    from localmoe import cli
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
if kind == "rate":
    a = Assistant()
    try:
        a.label(None, args[0], args[1] == "wrong", "thumbs")
    finally:
        a.close()
elif kind == "open":
    with Recorder() as rec:
        rec.new_conversation("m", title=args[0])
else:
    sys.exit(cli.main([kind, *args]))
"""


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def migrations(path: Path) -> list[str]:
    return [n for (n,) in rows(path, "select name from _migrations order by rowid")]


def counts(path: Path, sql: str) -> dict[str, int]:
    return dict(rows(path, sql))


def start_together(tmp: Path, home: Path, commands: list[list[str]]) -> list[tuple[list[str], int, str]]:
    """Run every command in its own process, all released at the same instant; (command, exit code, stderr)."""
    tmp.mkdir(parents=True, exist_ok=True)
    worker, go = tmp / "worker.py", tmp / "go"
    worker.write_text(WORKER)
    env = {**os.environ, "LOCALMOE_HOME": str(home)}
    procs = []
    for i, cmd in enumerate(commands):
        p = subprocess.Popen([sys.executable, str(worker), str(go), str(tmp / f"ready-{i}"), *cmd], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append((cmd, p))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp / f"ready-{i}").exists() for i in range(len(commands))):
            early = [(c, p.returncode, p.stderr.read()) for c, p in procs if p.poll() is not None]
            assert not early, f"exited before the start: {early}"
            assert time.monotonic() < deadline, "workers did not get ready"
            time.sleep(0.02)
        go.touch()
        results = []
        for c, p in procs:
            err = p.communicate(timeout=300)[1]
            results.append((c, p.returncode, err))
        return results
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_first_use_by_many_processes_at_once(tmp_path):
    """16 commands started at the same instant on a fresh data directory, 5 rounds (each orders the commands
    differently): every command succeeds, every question and rating is recorded once, and every migration is applied
    once. One `ask` per round: two model loads at once on two cores take ten times as long, and the race is at open,
    which every command does (the bare race without models has its own test below)."""
    for r in range(5):
        home = tmp_path / f"home{r}"
        asks = [f"Round {r}: what is {r} plus {r}?"]
        ratings = [f"Round {r}, rated question {i}" for i in range(6)]
        commands = ([["ask", q, "--max-tokens", "8", "--temperature", "0"] for q in asks]
                    + [["route", f"Round {r}: prove that there are infinitely many primes ({i})"] for i in range(4)]
                    + [["logs", "-n", "3"] for _ in range(5)]
                    + [["rate", p, "wrong" if i % 2 else "right"] for i, p in enumerate(ratings)])
        random.Random(r).shuffle(commands)  # which kind starts first varies from round to round
        results = start_together(tmp_path / f"run{r}", home, commands)
        failed = [(c[:2], code, err.strip()[-300:]) for c, code, err in results if code != 0 or "error" in err]
        assert not failed, f"round {r}: {failed}"
        db = home / "localmoe.db"
        assert counts(db, "select content, count(*) from messages where role = 'user' group by content") == {
            q: 1 for q in asks}, f"round {r}"
        assert rows(db, "select count(*) from messages where role = 'assistant' and status = 'complete' "
                        "and reply_to is not null") == [(len(asks),)]
        assert counts(db, "select prompt, count(*) from route_labels group by prompt") == {p: 1 for p in ratings}
        assert counts(db, "select name, count(*) from _migrations group by name") == {n: 1 for n in ALL}


def test_first_open_by_many_processes_migrates_once(tmp_path):
    """The bare race, without models: 16 processes open a new file and write one row each, 3 rounds."""
    for r in range(3):
        home = tmp_path / f"home{r}"
        results = start_together(tmp_path / f"run{r}", home, [["open", f"p{i}"] for i in range(16)])
        failed = [(code, err.strip()[-300:]) for _, code, err in results if code != 0]
        assert not failed, f"round {r}: {failed}"
        db = home / "localmoe.db"
        assert counts(db, "select name, count(*) from _migrations group by name") == {n: 1 for n in ALL}
        assert sorted(t for (t,) in rows(db, "select title from conversations")) == sorted(
            f"p{i}" for i in range(16))


def at_version(home: Path, n: int) -> Path:
    """A data directory whose database has the first `n` migrations, as an older localmoe left it."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "localmoe.db"
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    db.enable_wal()
    migrate(db, migrations=MIGRATIONS[:n])
    db.conn.close()
    return path


def paused_in(name: str, seconds: float, home: Path) -> subprocess.Popen:
    """`localmoe logs` held inside migration `name` (its changes made, not committed) by the test hook; returns
    once it is there."""
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "logs"],
                            env={**os.environ, "LOCALMOE_HOME": str(home), PAUSE_ENV: f"{name}:{seconds}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite if the hook is not reached
    watchdog.start()
    line = proc.stderr.readline()
    watchdog.cancel()
    assert f"inside migration {name}" in line, line + proc.stderr.read()
    return proc


def test_kill_inside_a_migration_leaves_the_previous_version(home):
    path = at_version(home, 2)
    target = MIGRATIONS[2].__name__  # m003: adds conversations.kind and the energy and bench tables
    proc = paused_in(target, 120, home)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    assert migrations(path) == ALL[:2]
    tables = {t for (t,) in rows(path, "select name from sqlite_master")}
    assert "energy" not in tables and "bench_runs" not in tables
    assert "kind" not in [c[1] for c in rows(path, "pragma table_info(conversations)")]

    r = run_cli("logs", home=home)
    assert r.returncode == 0, r.stderr
    assert migrations(path) == ALL
    assert "kind" in [c[1] for c in rows(path, "pragma table_info(conversations)")]


def test_a_command_waits_behind_a_migration_and_finds_it_done(home):
    path = at_version(home, 2)
    holder = paused_in(MIGRATIONS[2].__name__, 2, home)
    try:
        t0 = time.monotonic()
        r = run_cli("logs", home=home)
        waited = time.monotonic() - t0
        assert holder.wait(timeout=60) == 0, holder.stderr.read()
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert waited > 1.0  # it waited for the lock instead of migrating alongside
    assert counts(path, "select name, count(*) from _migrations group by name") == {n: 1 for n in ALL}


def test_cli_names_the_process_holding_the_database_in_one_line(home):
    assert run_cli("logs", home=home).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(home / "localmoe.db")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_cli("ask", "Name a colour.", "--max-tokens", "2", home=home, env_extra={"LOCALMOE_DB_TIMEOUT": "0.5"})
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"localmoe: error: database {home / 'localmoe.db'} is busy: still locked after 0.5 s")
    assert f"by process {holder.pid} (" in errors[0]


def test_opening_a_second_recorder_keeps_the_first_ones_locks(tmp_path):
    """The chat keeps one recorder open while F2, F6 or a resume open others on the same file. Opening one must not
    release the first connection's POSIX locks (closing any descriptor of the file does, process-wide): another
    process would then take itself for the last connection, checkpoint and delete the WAL under the chat, whose
    next answers went into a deleted file and were lost (and once the database was corrupted)."""
    from localmoe.record.recorder import Recorder

    db = tmp_path / "localmoe.db"
    chat = Recorder(db)
    first = chat.new_conversation("m", title="first")
    chat.add_message(first, "user", "kept?")
    Recorder(db).close()  # what opening F2 does
    # another process reads and closes: it must see the chat's connection as still open
    reader = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "c.execute('select count(*) from messages').fetchall(); c.close()")
    subprocess.run([sys.executable, "-c", reader, str(db)], check=True, timeout=60)
    assert db.with_name("localmoe.db-wal").exists(), "the WAL was checkpointed and deleted under an open connection"
    second = chat.new_conversation("m", title="second")
    chat.add_message(second, "user", "and this one?")
    subprocess.run([sys.executable, "-c", reader, str(db)], check=True, timeout=60)
    chat.close()
    conn = sqlite3.connect(db)
    got = [r[0] for r in conn.execute("select content from messages order by id")]
    conn.close()
    assert got == ["kept?", "and this one?"]
    assert (db.stat().st_mode & 0o777) == 0o600  # created owner-only, as before
