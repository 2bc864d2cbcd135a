"""Where localmoe keeps its data: one directory, `LOCALMOE_HOME` or the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from localmoe.errors import LocalmoeError

HOME_ENV = "LOCALMOE_HOME"


def data_dir(create: bool = True) -> Path:
    """The data directory; created (and checked writable) unless `create` is False."""
    override = os.environ.get(HOME_ENV)
    path = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("localmoe"))
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalmoeError(f"cannot create data directory {path}: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise LocalmoeError(f"data directory {path} is not writable (set {HOME_ENV} to another directory)")
    return path


def models_dir() -> Path:
    """Where user-installed GGUF files live (`<data dir>/models`)."""
    return data_dir() / "models"


def db_path() -> Path:
    return data_dir() / "localmoe.db"
