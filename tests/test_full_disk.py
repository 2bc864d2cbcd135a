"""A data dir on a full disk: one line that says the disk is full, nothing recorded lost, and answers recorded again
once there is room. A real full file system (a 16 MiB tmpfs), where this machine lets the test mount one."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    try:
        with open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError:  # ENOSPC: full
        pass
    return filler


def test_a_full_disk_is_named_and_nothing_recorded_is_lost(small_disk):
    home = small_disk / "home"
    first = run_cli("ask", "What is the capital of France?", "--max-tokens", "8", home=home)
    assert first.returncode == 0, first.stderr
    db = home / "localmoe.db"
    # as a machine left it after a reboot: everything in the main file, no WAL or shared-memory file
    conn = sqlite3.connect(db)
    conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    filler = fill(small_disk)
    # SQLite says "disk I/O error" when it cannot make the shared-memory file: the disk being full is the cause
    for argv in (["ask", "What is the capital of Japan?", "--max-tokens", "8"], ["logs"]):
        r = run_cli(*argv, home=home)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert "the disk is full (free some disk space; nothing already recorded was lost)" in lines[0], lines
    filler.unlink()
    again = run_cli("ask", "What is the capital of Japan?", "--max-tokens", "8", home=home)
    assert again.returncode == 0, again.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    asked = [q for (q,) in conn.execute("select content from messages where role = 'user' order by id")]
    conn.close()
    assert asked == ["What is the capital of France?", "What is the capital of Japan?"], asked
