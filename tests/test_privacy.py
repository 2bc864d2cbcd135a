"""Conversations are readable by their owner only: modes of the data directory and of every file localmoe writes."""

from __future__ import annotations

import stat
from pathlib import Path

from helpers import run_cli


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
