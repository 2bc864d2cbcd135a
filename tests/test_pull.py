"""`localmoe pull` against a stand-in hub on 127.0.0.1 serving a tiny real GGUF MoE: a pull that loads and answers,
a pull cut at half and resumed, corrupted bytes, a full disk, an unreachable or offline hub, an unknown name,
--dry-run, and planning an uncatalogued file from its header alone."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hub_standin import StandinHub

from helpers import run_cli
from localmoe import cli
from localmoe.home import catalog, paths, pull, settings
from localmoe.placement.layout import read_layout

REPO = "test-org/Tiny-MoE-GGUF"
FILE = "tiny-moe-F32.gguf"


@pytest.fixture(scope="module")
def gguf_bytes(tiny_moe: tuple[Path, Path]) -> bytes:
    return tiny_moe[1].read_bytes()


@pytest.fixture
def hub(gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch):
    with StandinHub({REPO: {FILE: gguf_bytes, "README.md": b"# tiny\n"}}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield h


@pytest.fixture
def tiny_entry(monkeypatch: pytest.MonkeyPatch, gguf_bytes: bytes) -> catalog.CatalogEntry:
    """A catalog entry for the tiny MoE (3 layers, 8 experts, top-2), beside the shipped ones."""
    f = catalog.CatalogFile("F32", FILE, len(gguf_bytes), "hub listing", default=True)
    layout = {"architecture": "qwen3moe", "layers": 3, "experts": 8, "experts_per_token": 2,
              "total_params": len(gguf_bytes) / 4, "active_params": len(gguf_bytes) / 16, "context": 4096,
              "hidden": 64, "vocab": 49152, "heads": 4, "kv_heads": 2, "head_dim": 16, "source": "test"}
    entry = catalog.CatalogEntry("tiny-moe", "hub", "large", "Apache-2.0", "a test MoE", repo=REPO, rank=0,
                                 layout=layout, files=(f,))
    shipped = catalog.entries()
    monkeypatch.setattr(catalog, "entries", lambda: (*shipped, entry))
    return entry


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("localmoe: error: ") and "Traceback" not in err
    return lines[0]


def test_pull_by_name_installs_a_model_that_answers_and_becomes_the_large_tier(hub, tiny_entry, home, capsys,
                                                                                  gguf_bytes):
    assert cli.main(["pull", "tiny-moe"]) == 0
    out, err = capsys.readouterr()
    dest = paths.models_dir() / "tiny-moe-f32.gguf"
    assert dest.read_bytes() == gguf_bytes
    assert "pulled tiny-moe-f32" in out and "SHA-256 verified" in out
    assert "tiny-moe-f32 is now the large tier" in out
    assert "tiny-moe-f32: " in err and "/s" in err and "left" in err  # the progress line: rate and time left
    assert settings.load().large == "tiny-moe-f32"
    assert pull.registry()["tiny-moe-f32.gguf"]["repo"] == REPO
    # pulled again: nothing fetched, and the tier is not touched a second time
    n_gets = len(hub.gets())
    assert cli.main(["pull", "tiny-moe"]) == 0
    assert "already installed" in capsys.readouterr().out and len(hub.gets()) == n_gets
    # it loads and answers, as the large tier
    r = run_cli("ask", "Hi", "--tier", "large", "--max-tokens", "3", "--no-log", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-moe-f32"


def test_a_second_moe_does_not_replace_a_large_tier_already_set(hub, tiny_entry, home, capsys):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('# mine\n[router]\nstrategy = "features"\n\n[tiers]\nlarge = "other"\n')
    assert cli.main(["pull", "tiny-moe"]) == 0
    assert "large tier" not in capsys.readouterr().out
    assert settings.load().large == "other"


def test_the_large_tier_is_added_to_an_existing_settings_file_without_losing_it(hub, tiny_entry, home, capsys):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[router]\nstrategy = "features"\n')
    assert cli.main(["pull", "tiny-moe"]) == 0
    s = settings.load()
    assert s.large == "tiny-moe-f32" and s.strategy == "features"


def test_a_pull_cut_at_half_resumes_without_fetching_those_bytes_again(hub, home, capsys, gguf_bytes):
    size = len(gguf_bytes)
    hub.cut_at = size // 2
    spec = f"hf:{REPO}/{FILE}"
    assert cli.main(["pull", spec]) == 1
    line = one_line(capsys.readouterr().err.split("\r")[-1])
    assert "interrupted" in line and "run the same command again to resume" in line
    part = paths.models_dir() / (FILE + ".part")
    assert part.stat().st_size == size // 2
    cut_log = len(hub.log)
    assert cli.main(["pull", spec]) == 0
    assert "resumed at" in capsys.readouterr().out
    assert (paths.models_dir() / FILE).read_bytes() == gguf_bytes and not part.exists()
    after = [r for r in hub.log[cut_log:] if r["method"] == "GET" and "/resolve/" in r["path"]]
    # the header was read from the partial file; the only GET after the cut starts where the cut was
    assert [r["range"] for r in after] == [f"bytes={size // 2}-"]
    # the file's bytes crossed the wire once: the first half before the cut, the rest after (header probes aside)
    downloads = [r for r in hub.gets() if r["range"] in ("bytes=0-", f"bytes={size // 2}-")]
    assert [r["sent"] for r in downloads] == [size // 2, size - size // 2]


def test_corrupted_bytes_fail_the_checksum_and_leave_nothing(hub, home, capsys):
    hub.corrupt = True
    assert cli.main(["pull", f"hf:{REPO}/{FILE}", "--json"]) == 1
    out, err = capsys.readouterr()
    line = one_line(err)
    assert "checksum mismatch for tiny-moe-F32.gguf" in line and "partial download was removed" in line
    assert json.loads(out)["status"] == "error"
    assert not any(paths.models_dir().glob("tiny-moe*"))


def test_a_full_disk_is_refused_before_any_byte_with_the_numbers(hub, tiny_entry, home, capsys, monkeypatch):
    monkeypatch.setattr(pull, "free_bytes", lambda d: 100 << 20)
    assert cli.main(["pull", "tiny-moe"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "not enough disk space for tiny-moe-F32.gguf: it needs" in line and "100.0 MiB free" in line
    assert hub.gets() == [] and list(paths.models_dir().iterdir()) == []


def test_an_unreachable_hub_is_one_line_naming_the_endpoint(home, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main(["pull", f"hf:{REPO}/{FILE}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"cannot reach the hub at http://127.0.0.1:{port}" in line


def test_offline_mode_and_missing_files_are_one_line(hub, home, capsys, monkeypatch):
    assert cli.main(["pull", f"hf:{REPO}/nope.gguf"]) == 1
    assert f"{REPO}:nope.gguf not found on {hub.url}" in one_line(capsys.readouterr().err)
    assert cli.main(["pull", "hf:nobody/nothing"]) == 1
    assert "repository nobody/nothing not found" in one_line(capsys.readouterr().err)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.log)
    assert cli.main(["pull", f"hf:{REPO}/{FILE}"]) == 1
    assert "HF_HUB_OFFLINE is set" in one_line(capsys.readouterr().err)
    assert len(hub.log) == before  # not one request


def test_an_unknown_name_names_the_closest_catalog_models(home):
    r = run_cli("pull", "qwen3-30b-a4b", home=home)
    assert r.returncode == 2
    assert "'qwen3-30b-a4b' is not in the catalog (closest: qwen3-30b-a3b" in one_line(r.stderr)


def test_dry_run_fetches_nothing_and_says_whether_it_fits(hub, tiny_entry, home, capsys):
    assert cli.main(["pull", "tiny-moe", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would fetch {REPO}/{FILE}" in out and "on this machine: fits in" in out
    assert hub.gets() == [] and not paths.models_dir().exists() or not any(paths.models_dir().iterdir())


def test_an_uncatalogued_file_is_planned_from_its_header_alone(hub, home, capsys, tiny_moe, monkeypatch,
                                                               gguf_bytes):
    monkeypatch.setattr(pull, "HEADER_PROBE", 64 << 10)  # start small: the header takes several doublings
    assert cli.main(["pull", f"hf:{REPO}", "--dry-run", "--json"]) == 0  # the repo's one GGUF is chosen
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == FILE and out["dry_run"] and out["path"] is None
    gets = hub.gets()
    assert gets and all(r["range"].startswith("bytes=0-") for r in gets)
    read = max(r["sent"] for r in gets)
    assert read < len(gguf_bytes) / 4  # the header, not the tensors
    t = pull.parse(f"hf:{REPO}/{FILE}")
    pull.resolve_remote(t)
    remote, whole = pull.remote_layout(t).to_dict(), read_layout(tiny_moe[1]).to_dict()
    remote.pop("path"), whole.pop("path")
    assert remote == whole


def test_a_model_that_cannot_run_here_is_not_downloaded_without_force(hub, tiny_entry, home, capsys, monkeypatch):
    from localmoe.placement.plan import Budget

    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: cls(0, 64 << 20)))
    assert cli.main(["pull", "tiny-moe"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "tiny-moe-f32 would not run on this machine" in line and "--force" in line
    assert hub.gets() == []
