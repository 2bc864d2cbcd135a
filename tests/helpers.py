"""Shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# What a built test model depends on besides its parameters and its build function: the converter and these
# packages (the initialisation, the file writers, llama.cpp's quantiser). A change to any of them builds anew.
_BUILD_SOURCES = (Path(__file__).with_name("synthetic_moe.py"),)
_BUILD_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy", "llama_cpp_python")


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


def built_once(config: pytest.Config, factory: pytest.TempPathFactory, name: str, params: dict,
               build: Callable[[Path], None]) -> Path:
    """The folder that `build(folder)` fills, kept in pytest's cache (.pytest_cache/d/localmoe-models) and reused by
    later runs while `params`, `build`'s source, synthetic_moe.py and the packages it uses are unchanged: test models
    are made by test code from a fixed seed, so a rebuild would give the same bytes, and only product code reads them.
    Without pytest's cache (`-p no:cacheprovider`) or with LOCALMOE_TEST_FRESH=1 the folder is built afresh in the
    run's temporary directory, as a fresh checkout (CI) does anyway. Callers must treat the folder as read-only."""
    if getattr(config, "cache", None) is None or os.environ.get("LOCALMOE_TEST_FRESH"):
        out = factory.mktemp(name)
        build(out)
        return out
    h = hashlib.sha256(repr(sorted(params.items())).encode())
    h.update(inspect.getsource(build).encode())
    for src in _BUILD_SOURCES:
        h.update(src.read_bytes())
    for pkg in _BUILD_PACKAGES:
        h.update(f"{pkg}={importlib.metadata.version(pkg)}".encode())
    key = h.hexdigest()[:16]
    shelf = config.cache.mkdir("localmoe-models") / name
    out = shelf / key
    if (out / ".complete").exists():
        return out
    shelf.mkdir(parents=True, exist_ok=True)
    # One builder at a time: an xdist worker that needs the same models waits for the other's build instead of
    # making a second copy on the same two cores (which slows both).
    with open(shelf / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return out
        return _build(shelf, key, out, build)


def _build(shelf: Path, key: str, out: Path, build: Callable[[Path], None]) -> Path:
    for old in shelf.iterdir():  # one version per name: older builds and interrupted ones are dead weight (the lock
        if old.name not in (key, ".lock"):  # is held: no other build is under way)
            shutil.rmtree(old, ignore_errors=True)
    part = shelf / f"{key}.{os.getpid()}"  # built aside and renamed: an interrupted build is never reused
    part.mkdir()
    try:
        build(part)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    (part / ".complete").touch()
    try:
        part.rename(out)
    except OSError:  # another process (an xdist worker) finished first: its copy is the same
        shutil.rmtree(part, ignore_errors=True)
    return out
