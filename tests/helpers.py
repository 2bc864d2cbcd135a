"""Shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, home: Path | None = None, timeout: float = 120, env_extra: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    if home is not None:
        env["LOCALMOE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "localmoe", *args], capture_output=True, text=True, env=env, timeout=timeout, **kw
    )
