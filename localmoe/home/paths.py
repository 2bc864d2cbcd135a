"""Where localmoe keeps its data: one directory, `LOCALMOE_HOME` or the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from localmoe.errors import LocalmoeError

HOME_ENV = "LOCALMOE_HOME"


# Conversations are private: the directory is the owner's alone, and so is every file localmoe writes there.
DIR_MODE = 0o700
FILE_MODE = 0o600
PRIVATE_FILES = ("localmoe.db", "localmoe.db-wal", "localmoe.db-shm", "localmoe.db-journal", "settings.toml",
                 "router.json", "hardware.json")
tightened: list[str] = []  # what this process made private in an older install, for one notice
_checked: set[Path] = set()


def data_dir(create: bool = True) -> Path:
    """The data directory; created private (and checked writable) unless `create` is False. An existing one from an
    older install is tightened once per process (see `tightened`); one named by LOCALMOE_HOME keeps its own mode,
    only localmoe's files in it are made private."""
    override = os.environ.get(HOME_ENV)
    path = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("localmoe"))
    if create:
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            what = "it is a file, not a directory" if path.is_file() else exc.strerror or exc
            raise LocalmoeError(f"cannot use data directory {path}: {what} (set {HOME_ENV} to another "
                                "directory)") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise LocalmoeError(f"data directory {path} is not writable (set {HOME_ENV} to another directory)")
        if path not in _checked:
            _checked.add(path)
            _tighten(path, own_dir=not override)
    return path


def _tighten(path: Path, own_dir: bool) -> None:
    candidates = [(path, DIR_MODE)] if own_dir else []
    candidates += [(path / name, FILE_MODE) for name in PRIVATE_FILES]
    for p, mode in candidates:
        try:
            st = p.stat()
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                p.chmod(mode)
                tightened.append(p.name)
        except OSError:
            continue  # missing, or not ours to change: nothing to tighten


def private_file(path: Path) -> None:
    """Create `path` readable by its owner only when it does not exist yet, before a library such as sqlite3 opens
    it (SQLite gives its WAL and shared-memory files the database file's mode). An existing file is never opened
    here: closing any descriptor of a file drops every POSIX lock this process holds on it, an open SQLite
    connection's included, and another process would then checkpoint and delete the WAL under that connection. A
    file made here with O_EXCL is new, so this process holds no lock on it yet."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    except OSError:
        pass  # there already (someone else made it), or the caller's own open reports the problem in its words


def write_private(path: Path, text: str) -> None:
    """Write a text file readable by its owner only (replacing it whole)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), FILE_MODE)  # an existing file keeps its mode through O_CREAT
        f.write(text)


def models_dir() -> Path:
    """Where user-installed GGUF files live (`<data dir>/models`)."""
    return data_dir() / "models"


def db_path() -> Path:
    return data_dir() / "localmoe.db"
