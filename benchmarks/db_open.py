"""What the migration lock costs a warm start: open an up-to-date database, write one row, close, in a fresh process.

    .venv/bin/python benchmarks/db_open.py [--n 40] [--write]

Three ways to open, interleaved so machine noise hits them alike:
- `before`: the open localmoe did before the lock (a copy of that code: no busy handling, migrations checked
  outside any lock) with the same one-row write;
- `recorder`: `Recorder()` as it is now (migrations read without a lock, the exclusive lock taken only when the file
  is behind) and `new_conversation`;
- `always-lock`: `before` plus a `BEGIN EXCLUSIVE` re-read of `_migrations` on every open, i.e. what the lock would
  cost if a warm start took it.
Each sample's time is measured inside the child, from just before the open to just after the close: interpreter
start and imports are left out, as they would only add their own noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_section

from localmoe.record.recorder import Recorder

BEFORE = """
import sqlite3, sys, time
import sqlite_utils
path = sys.argv[1]
t0 = time.perf_counter()
conn = sqlite3.connect(path, check_same_thread=False, timeout=10, isolation_level=None)
db = sqlite_utils.Database(conn)
db.enable_wal()
db.execute("PRAGMA synchronous=FULL")
db.execute("PRAGMA foreign_keys=ON")
db.execute("create table if not exists _migrations (name text primary key, applied_at text)")
done = {r["name"] for r in db["_migrations"].rows}
if LOCK:
    conn.execute("BEGIN EXCLUSIVE")
    done = {r[0] for r in conn.execute("select name from _migrations")}
    conn.execute("COMMIT")
conn.execute("BEGIN IMMEDIATE")
conn.execute("insert into conversations (title, model, created_at, kind) values ('bench', 'm', 'now', 'chat')")
conn.execute("COMMIT")
conn.close()
print((time.perf_counter() - t0) * 1000)
"""

RECORDER = """
import sys, time
from localmoe.record.recorder import Recorder
t0 = time.perf_counter()
with Recorder(sys.argv[1]) as rec:
    rec.new_conversation("m", title="bench")
print((time.perf_counter() - t0) * 1000)
"""

MODES = {
    "before": ("before the lock (old open, a copy)", BEFORE.replace("LOCK", "False")),
    "recorder": ("`Recorder()` now (lock only when behind)", RECORDER),
    "always-lock": ("old open + `BEGIN EXCLUSIVE` re-check every time", BEFORE.replace("LOCK", "True")),
}


def sample(code: str, path: Path) -> tuple[float, float]:
    """(open + write + close ms inside the child, whole process ms)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()), (time.perf_counter() - t0) * 1000


def p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="samples per mode")
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "localmoe.db"
        Recorder(path).close()  # up to date: every sample is a warm start
        inner: dict[str, list[float]] = {m: [] for m in MODES}
        wall: dict[str, list[float]] = {m: [] for m in MODES}
        for _label, code in MODES.values():  # one unmeasured run each: the page cache holds the files
            sample(code, path)
        for _ in range(args.n):
            for m, (_, code) in MODES.items():
                a, b = sample(code, path)
                inner[m].append(a)
                wall[m].append(b)

    rows = []
    for m, (label, _) in MODES.items():
        rows.append(f"| {label} | {statistics.median(inner[m]):.2f} | {p90(inner[m]):.2f} | "
                    f"{statistics.median(wall[m]):.0f} |")
    ratio = statistics.median(inner["recorder"]) / statistics.median(inner["before"])
    load = os.getloadavg()[0]
    body = "\n".join([
        "## Warm start: open an up-to-date database and write one row (the migration lock, issue 22)",
        "",
        f"Command: `.venv/bin/python benchmarks/db_open.py --n {args.n} --write` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, load {load:.1f}). Each sample is a fresh process; the time is open + one "
        "`conversations` row + close, measured inside it (interpreter start and imports excluded); the three ways "
        "alternate.",
        "",
        "| open | median ms | p90 ms | whole process, median ms |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Recorder now / before: **{ratio:.2f}**. A warm start reads `_migrations` without a lock, as before; the "
        "exclusive lock is taken only when the file is behind. The third row is what taking it on every open "
        "would cost.",
    ])
    print(body)
    if args.write:
        write_section("db_open", body)


if __name__ == "__main__":
    main()
