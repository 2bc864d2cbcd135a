"""Models already on disk: fake LM Studio, Ollama (its real manifest layout) and hub-cache trees holding tiny real
GGUFs are listed with their name and source and load by name; `import` links or copies; `rm` deletes only what
localmoe downloaded or copied."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from localmoe import cli
from localmoe.errors import UsageError
from localmoe.home import library, models, paths, pull


@pytest.fixture
def stores(tmp_path: Path, tiny_moe: tuple[Path, Path], smollm: models.ModelRef, monkeypatch: pytest.MonkeyPatch):
    gguf = tiny_moe[1]
    lms = tmp_path / "lmstudio"
    (lms / "someone" / "Tiny-GGUF").mkdir(parents=True)
    (lms / "someone" / "Tiny-GGUF" / "Tiny-MoE-Q8_0.gguf").symlink_to(gguf)
    (lms / "someone" / "Tiny-GGUF" / "mmproj-tiny.gguf").symlink_to(gguf)  # a vision projector: not a model

    ollama = tmp_path / "ollama"
    digest = hashlib.sha256(smollm.path.name.encode()).hexdigest()  # any digest: Ollama names blobs by theirs
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / f"sha256-{digest}").symlink_to(smollm.path)
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 485},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                    "size": smollm.path.stat().st_size},
                   {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64,
                    "size": 1156}]}))

    hf = tmp_path / "hf-hub"
    repo = hf / "models--test-org--Other-MoE-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").symlink_to(gguf)
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / "other-moe-F32.gguf").symlink_to(Path("../../blobs/abc123"))

    monkeypatch.setenv("LOCALMOE_LMSTUDIO_DIR", str(lms))
    monkeypatch.setenv("LOCALMOE_OLLAMA_DIR", str(ollama))
    monkeypatch.setenv("LOCALMOE_HF_CACHE", str(hf))
    return {"lmstudio": lms, "ollama": ollama, "hf": hf}


def test_models_on_disk_are_listed_with_name_and_source_and_load_by_name(stores, home, capsys):
    assert cli.main(["models", "--json"]) == 0
    found = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert {i: found[i]["source"] for i in ("tiny-moe-q8_0", "smollm2:135m", "other-moe-f32")} == {
        "tiny-moe-q8_0": "lmstudio", "smollm2:135m": "ollama", "other-moe-f32": "hf-cache"}
    assert not any("mmproj" in i for i in found)
    assert found["tiny-moe-q8_0"]["layout"]["n_experts"] == 8
    assert found["smollm2:135m"]["layout"]["architecture"] == "llama"  # the blob is read though it has no suffix
    for name in ("tiny-moe-q8_0", "smollm2:135m", "other-moe-f32"):
        models.check_loadable(models.resolve(name))
    env = {k: os.environ[k] for k in ("LOCALMOE_LMSTUDIO_DIR", "LOCALMOE_OLLAMA_DIR", "LOCALMOE_HF_CACHE")}
    r = run_cli("ask", "What is the capital of France?", "--model", "smollm2:135m", "--no-log", "--json",
                "--max-tokens", "8", home=home, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "smollm2:135m"


def test_rm_of_a_discovered_model_forgets_it_and_leaves_its_file(stores, home, capsys):
    blob = models.resolve("smollm2:135m").path
    assert cli.main(["rm", "smollm2:135m", "--yes"]) == 0
    assert "smollm2:135m: forgotten, the file kept" in capsys.readouterr().out
    assert blob.exists() and "smollm2:135m" not in {r.id for r in models.list_models()}
    assert {"tiny-moe-q8_0", "other-moe-f32"} <= {r.id for r in models.list_models()}


def test_import_links_by_default_and_rm_keeps_the_original(home, tiny_moe, tmp_path, capsys):
    src = tmp_path / "mine" / "My-MoE.gguf"
    src.parent.mkdir()
    shutil.copy(tiny_moe[1], src)
    assert cli.main(["import", str(src)]) == 0
    assert "imported my-moe (linked" in capsys.readouterr().out
    dest = paths.models_dir() / "my-moe.gguf"
    assert dest.is_symlink() and models.resolve("my-moe").path == dest
    assert cli.main(["rm", "my-moe", "--yes"]) == 0
    assert "link removed, the file kept" in capsys.readouterr().out
    assert src.exists() and not dest.exists() and not dest.is_symlink()
    # a checkpoint folder: the message names models/, where the link is, not the folder's own parent
    assert cli.main(["import", str(tiny_moe[0]), "--name", "my-ckpt"]) == 0
    assert f"imported my-ckpt (linked from its place into {paths.models_dir()})" in capsys.readouterr().out
    assert (paths.models_dir() / "my-ckpt").is_symlink()


def test_import_copy_then_rm_deletes_the_copy_and_says_what_it_frees(home, tiny_moe, capsys):
    assert cli.main(["import", str(tiny_moe[1]), "--copy", "--name", "copied"]) == 0
    dest = paths.models_dir() / "copied.gguf"
    assert dest.is_file() and not dest.is_symlink()
    r = library.plan_removal("copied")
    assert r.action == "delete" and r.frees == tiny_moe[1].stat().st_size
    assert "freeing 26.4 MiB" in r.describe()
    assert cli.main(["rm", "copied", "--yes"]) == 0
    assert not dest.exists() and tiny_moe[1].exists() and "copied.gguf" not in pull.registry()


def test_import_refuses_what_is_not_a_model_and_a_name_taken(home, tmp_path, tiny_moe, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    assert cli.main(["import", str(junk)]) == 1
    assert "not a GGUF model file" in capsys.readouterr().err
    assert cli.main(["import", str(tiny_moe[1])]) == 0
    assert cli.main(["import", str(tiny_moe[1])]) == 2
    assert "already installed" in capsys.readouterr().err
    # a name is a file name inside models/: nothing outside it, nothing hidden, not the embedded model's
    for bad in ("../../escaped", "a/b", ".hidden", "-x", "..", "smollm2-135m-instruct"):
        for how in ([], ["--copy"]):
            assert cli.main(["import", str(tiny_moe[1]), f"--name={bad}", *how]) == 2, bad
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and ("cannot name a model" in err or "embedded model's name" in err), err
    assert not (home / "escaped.gguf").exists() and not list(tmp_path.glob("escaped*"))
    assert sorted(p.name for p in paths.models_dir().iterdir() if not p.name.startswith(".")) == [
        f"{tiny_moe[1].stem.lower()}.gguf"]
    assert cli.main(["import", str(tiny_moe[1]), "--name", "Tiny_MoE-v1.q8"]) == 0
    assert (paths.models_dir() / "tiny_moe-v1.q8.gguf").is_symlink()
    odd = tmp_path / "My Model (1).gguf"  # a file's own name is made into one a model may have
    shutil.copy(tiny_moe[1], odd)
    assert cli.main(["import", str(odd)]) == 0
    assert (paths.models_dir() / "my-model-1.gguf").is_symlink()


def test_rm_never_deletes_a_file_localmoe_did_not_put_there(home, tiny_moe, capsys):
    d = paths.models_dir()
    d.mkdir(parents=True)
    shutil.copy(tiny_moe[1], d / "hand-placed.gguf")
    with pytest.raises(UsageError, match="not downloaded by localmoe"):
        library.plan_removal("hand-placed")
    assert cli.main(["rm", "smollm2", "--yes"]) == 2  # the embedded model
    assert (d / "hand-placed.gguf").exists()


def test_rm_asks_first_and_a_script_must_say_yes(home, tiny_moe, monkeypatch, capsys):
    assert cli.main(["import", str(tiny_moe[1]), "--copy", "--name", "asked"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["rm", "asked"]) == 2
    assert "needs a confirmation" in capsys.readouterr().err
    assert (paths.models_dir() / "asked.gguf").exists()
