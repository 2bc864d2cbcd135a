"""Shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def run_cli(*args: str, home: Path | None = None, timeout: float = 120, env_extra: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    if home is not None:
        env["LOCALMOE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "localmoe", *args], capture_output=True, text=True, env=env, timeout=timeout, **kw
    )


@contextlib.contextmanager
def advancing_rapl(root: Path, watts: float = 25.0, interval: float = 0.05) -> Iterator[Path]:
    """A fake sysfs tree at `root` (for $LOCALMOE_SYSFS_ROOT) with one RAPL package counter that a thread
    advances at `watts`, every `interval` seconds, until the block ends."""
    dom = root / "class" / "powercap" / "intel-rapl:0"
    dom.mkdir(parents=True)
    (dom / "name").write_text("package-0\n")
    (dom / "max_energy_range_uj").write_text("262143328850\n")
    energy = dom / "energy_uj"
    energy.write_text("1000000\n")
    stop = threading.Event()

    def advance() -> None:
        t0 = time.monotonic()
        tmp = dom / "energy_uj.tmp"
        while not stop.is_set():
            tmp.write_text(f"{1_000_000 + int((time.monotonic() - t0) * watts * 1e6)}\n")
            os.replace(tmp, energy)  # atomic, as a sysfs read is
            time.sleep(interval)

    thread = threading.Thread(target=advance, daemon=True)
    thread.start()
    try:
        yield root
    finally:
        stop.set()
        thread.join()
