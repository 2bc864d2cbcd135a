"""`localmoe pull` against a stand-in hub on 127.0.0.1 serving a tiny real GGUF MoE: a pull that loads and answers,
a pull cut at half and resumed, corrupted bytes, a full disk, an unreachable or offline hub, an unknown name,
--dry-run, and planning an uncatalogued file from its header alone."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hub_standin import StandinHub, tiny_catalog_entry

from helpers import run_cli
from localmoe import cli
from localmoe.home import catalog, library, models, paths, pull, settings
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
    entry = tiny_catalog_entry(gguf_bytes, REPO, FILE)
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


# --- models --available hf:…: a hub model planned from its headers before any download ---------------------------

def available(*args: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert cli.main(["models", "--available", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# llama.cpp in RAM; the native expert cache reading experts from disk; refused by both (512 MiB is the reserve)
@pytest.mark.parametrize("ram", ["8G", "542.2M", "24M"])
def test_models_available_plans_a_hub_gguf_from_its_header_alone_as_the_whole_file(hub, home, capsys, monkeypatch,
                                                                                   gguf_bytes, ram):
    from localmoe.home import inventory
    from localmoe.placement.plan import Budget

    monkeypatch.setattr(pull, "HEADER_PROBE", 64 << 10)
    remote = available(f"hf:{REPO}", "--vram", "0", "--ram", ram, capsys=capsys)["model"]
    gets = hub.gets()
    assert gets and all(r["range"].startswith("bytes=0-") for r in gets)
    assert sum(r["sent"] for r in gets) == remote["header_bytes_read"] < len(gguf_bytes) / 4  # the header only
    assert not paths.models_dir().exists()
    # the same file whole on disk, planned as `localmoe models` plans it
    paths.models_dir().mkdir(parents=True)
    (paths.models_dir() / FILE).write_bytes(gguf_bytes)
    budget = Budget.detect(vram=0, ram=cli._size(ram))
    local = next(m for m in inventory.local_models(budget) if m.id == "tiny-moe-f32")
    assert remote["verdict"] == local.verdict.to_dict() and remote["engine"] == local.engine
    assert remote["verdict"]["kind"] == {"8G": "ram", "542.2M": "disk", "24M": "refused"}[ram]
    assert remote["engine_reason"] == local.engine_reason
    assert (remote["bytes"], remote["layers"], remote["experts"], remote["experts_per_token"]) == \
        (len(gguf_bytes), 3, 8, 2)
    assert remote["pull"] == f"localmoe pull hf:{REPO}/{FILE}"


def test_models_available_for_a_hub_gguf_in_words(hub, home, capsys):
    assert cli.main(["models", "--available", f"hf:{REPO}/{FILE}", "--ram", "8G", "--vram", "0"]) == 0
    out = capsys.readouterr().out
    assert f"hf:{REPO}: {FILE}, " in out and "qwen3moe, 3 layers, 8 experts (top-2), F32" in out
    assert "on this budget: fits in RAM; engine llama.cpp" in out
    assert "from the headers alone" in out and f"get it: localmoe pull hf:{REPO}/{FILE}" in out


def test_models_available_for_a_bad_hub_spec_is_one_line(hub, home, capsys, monkeypatch):
    hub.repos["test-org/no-weights"] = {"README.md": b"# nothing\n", "config.json": b"{}"}
    cases = {"hf:nobody/nothing": "repository nobody/nothing not found",
             "hf:test-org/no-weights": "holds no .gguf file and no safetensors checkpoint",
             f"hf:{REPO}/nope.gguf": f"{REPO}:nope.gguf not found on {hub.url}",
             f"hf:{REPO}/README.md": "name a .gguf file"}
    for spec, words in cases.items():
        assert cli.main(["models", "--available", spec]) != 0
        assert words in one_line(capsys.readouterr().err), spec
    for spec in ("hf:test-org/..", "hf:../x", "hf:test-org/.hidden"):  # a checkpoint's folder stays in models/
        for argv in (["models", "--available", spec], ["pull", spec]):
            assert cli.main(argv) == 2, argv
            assert "OWNER and REPO are letters" in one_line(capsys.readouterr().err), argv
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main(["models", "--available", f"hf:{REPO}"]) == 1
    assert f"cannot reach the hub at http://127.0.0.1:{port}" in one_line(capsys.readouterr().err)


# --- split GGUFs (llama.cpp's gguf-split: NAME-00001-of-00003.gguf) ------------------------------------------------

SPLIT_REPO = "test-org/Tiny-MoE-Split-GGUF"


@pytest.fixture(scope="module")
def split_shards(tiny_moe: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The tiny MoE rewritten by gguf-py's writer with split_max_tensors, as gguf-split and convert_hf_to_gguf's
    --split-max-tensors write it: shard 1 holds the metadata and split.count/no/tensors.count, the others split.*
    and their tensors."""
    import gguf
    import numpy as np
    import synthetic_moe

    out = tmp_path_factory.mktemp("split") / "tiny-moe-F32.gguf"
    r = synthetic_moe.gguf_reader(tiny_moe[1])
    w = gguf.GGUFWriter(out, r.fields["general.architecture"].contents(), split_max_tensors=14)
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, f.contents(), f.types[0],
                            f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = {p.name: p.read_bytes() for p in sorted(out.parent.glob("*.gguf"))}
    assert list(shards) == [f"tiny-moe-F32-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    return shards


@pytest.fixture
def split_hub(split_shards: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with StandinHub({SPLIT_REPO: {**split_shards, "README.md": b"# split\n"}}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield h


def test_a_split_gguf_is_planned_from_every_shard_header_as_the_whole_model(split_hub, home, capsys, tiny_moe,
                                                                             split_shards):
    total = sum(map(len, split_shards.values()))
    remote = available(f"hf:{SPLIT_REPO}", "--vram", "0", "--ram", "8G", capsys=capsys)["model"]
    assert remote["bytes"] == total and remote["files"] == list(split_shards)
    assert sum(r["sent"] for r in split_hub.gets()) == remote["header_bytes_read"] < total / 4
    t = pull.parse(f"hf:{SPLIT_REPO}")
    pull.resolve_remote(t)
    lay, whole = pull.remote_layout(t).to_dict(), read_layout(tiny_moe[1]).to_dict()
    assert lay.pop("file_bytes") == total  # planned on the shards' sum, not the first shard
    for d in (lay, whole):
        d.pop("path"), d.pop("file_bytes", None)
    assert lay == whole  # every shard's tensors counted, as in the single file


def test_a_split_gguf_is_pulled_whole_in_one_progress_and_answers(split_hub, home, capsys, split_shards):
    total = sum(map(len, split_shards.values()))
    first = "tiny-moe-F32-00001-of-00003.gguf"
    assert cli.main(["pull", f"hf:{SPLIT_REPO}"]) == 0  # the repository's one (split) model is chosen
    out, err = capsys.readouterr()
    for name, data in split_shards.items():
        assert (paths.models_dir() / name).read_bytes() == data
    assert "3 files" in out and "SHA-256 verified" in out and "tiny-moe-f32-00001-of-00003 is now the large tier" in out
    from localmoe.units import human_bytes

    assert err.count("100.0%") == 1 and f"{human_bytes(total)} / {human_bytes(total)} 100.0%" in err  # one bar
    entry = pull.registry()[first]
    assert entry["shards"] == list(split_shards) and entry["bytes"] == total
    # listed once, by its first shard, with the whole model's size
    assert cli.main(["models", "--json"]) == 0
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert "tiny-moe-f32-00002-of-00003" not in listed and "tiny-moe-f32-00003-of-00003" not in listed
    assert listed["tiny-moe-f32-00001-of-00003"]["layout"]["file_bytes"] == total
    r = run_cli("ask", "Hi", "--tier", "large", "--max-tokens", "3", "--no-log", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-moe-f32-00001-of-00003"
    # the native engine reads single GGUF files: asked for it, one line, no traceback
    r = run_cli("ask", "Hi", "--model", "tiny-moe-f32-00001-of-00003", "--backend", "torch", "--max-tokens", "3",
                "--no-log", home=home)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "split GGUF" in r.stderr and "llama.cpp" in r.stderr
    # planned as the whole model wherever a local file is planned: `plan`, the engine's own layout
    assert cli.main(["plan", "tiny-moe-f32-00001-of-00003", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["file_bytes"] == total
    from localmoe.placement.layout import read_model_layout

    assert read_model_layout(paths.models_dir() / first).file_bytes == total
    # shards 2..N are not models of their own, by any name
    assert [m.id for m in models.list_models() if "tiny-moe-f32" in m.id] == ["tiny-moe-f32-00001-of-00003"]
    # rm deletes the whole model: every shard, and says it frees all of them
    removal = library.plan_removal("tiny-moe-f32-00001-of-00003")
    assert removal.frees == total and "and its 2 other shards" in removal.describe()
    assert cli.main(["rm", "tiny-moe-f32-00001-of-00003", "--yes"]) == 0
    assert not list(paths.models_dir().glob("tiny-moe-F32-*")) and first not in pull.registry()


def test_a_split_pull_cut_in_a_shard_resumes_there_and_checks_space_on_the_total(split_hub, home, capsys,
                                                                                  split_shards, monkeypatch):
    total = sum(map(len, split_shards.values()))
    names = list(split_shards)
    real_free = pull.free_bytes
    monkeypatch.setattr(pull, "free_bytes", lambda d: total + pull.SPARE_BYTES - 1)
    assert cli.main(["pull", f"hf:{SPLIT_REPO}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"not enough disk space for {names[0]} (3 shards): it needs" in line
    assert split_hub.gets() and all(r["range"] != "bytes=0-" for r in split_hub.gets())  # header probes only
    monkeypatch.setattr(pull, "free_bytes", real_free)

    cut = len(split_shards[names[2]]) // 2  # shards 2 and 3 come first; the cut falls in shard 3
    split_hub.cut_at = cut
    assert cli.main(["pull", f"hf:{SPLIT_REPO}/{names[1]}"]) == 1  # any shard's name means the model
    assert "interrupted" in one_line(capsys.readouterr().err.split("\r")[-1])
    d = paths.models_dir()
    assert (d / names[1]).exists() and (d / (names[2] + ".part")).stat().st_size == cut
    assert not (d / names[0]).exists()  # the first shard, which llama.cpp opens, only once the model is whole
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert [x.split()[0] for x in out.splitlines() if x.startswith("tiny-moe")] == ["tiny-moe-f32-00002-of-00003"]
    assert f"split GGUF whose first shard {names[0]} is not there (an interrupted pull? run it again)" in out
    n = len(split_hub.log)
    assert cli.main(["pull", f"hf:{SPLIT_REPO}/{names[0]}"]) == 0
    capsys.readouterr()
    after = [r for r in split_hub.log[n:] if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert not [r for r in after if r["path"].endswith(names[1])]  # shard 2: not fetched again
    assert [r["range"] for r in after if r["path"].endswith(names[2])] == [f"bytes={cut}-"]
    assert all((d / k).read_bytes() == v for k, v in split_shards.items())


def test_a_corrupted_shard_fails_its_checksum_and_leaves_no_model(split_hub, home, capsys):
    split_hub.corrupt = True
    assert cli.main(["pull", f"hf:{SPLIT_REPO}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "checksum mismatch for tiny-moe-F32-00002-of-00003.gguf" in line
    assert not any(paths.models_dir().glob("*.gguf*"))


# --- safetensors checkpoint folders for the native engine -----------------------------------------------------------

CKPT_REPO = "test-org/Tiny-MoE"


@pytest.fixture(scope="module")
def ckpt_files(tiny_moe: tuple[Path, Path]) -> dict[str, bytes]:
    """The tiny MoE's checkpoint as the hub holds big ones: two safetensors shards and their index, config and
    tokenizer files, plus files a pull must leave: a README and a consolidated copy the index does not name."""
    from safetensors.torch import load_file, save

    src = tiny_moe[0]
    files = {n: (src / n).read_bytes() for n in ("config.json", "generation_config.json", "tokenizer.json",
                                                  "tokenizer_config.json")}
    tensors = load_file(src / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        files[name] = save({k: tensors[k] for k in part}, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": size},
                                                        "weight_map": weight_map}).encode()
    files["README.md"] = b"# tiny\n"
    files["consolidated.safetensors"] = (src / "model.safetensors").read_bytes()
    return files


NEEDED = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def ckpt_hub(ckpt_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with StandinHub({CKPT_REPO: ckpt_files}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield h


def test_a_checkpoint_dry_run_plans_from_config_and_safetensors_headers_as_the_whole_folder(ckpt_hub, home, capsys,
                                                                                           ckpt_files, tmp_path):
    from localmoe.home import inventory
    from localmoe.placement.plan import Budget

    weights = sum(len(ckpt_files[n]) for n in NEEDED if n.endswith(".safetensors"))
    whole = tmp_path / "Tiny-MoE"
    whole.mkdir()
    for n in NEEDED:
        (whole / n).write_bytes(ckpt_files[n])
    for ram in ("8G", "542.2M"):  # every expert held; some read from disk (512 MiB of it is the reserve)
        remote = available(f"hf:{CKPT_REPO}", "--vram", "0", "--ram", ram, capsys=capsys)["model"]
        assert remote["kind"] == "checkpoint" and remote["engine"] == "torch"
        assert remote["verdict"] == inventory.checkpoint_verdict(whole, Budget.detect(vram=0, ram=cli._size(ram))
                                                                 ).to_dict()
    assert remote["verdict"]["kind"] == "disk"
    assert cli.main(["pull", f"hf:{CKPT_REPO}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would fetch 7 files of the checkpoint hf:test-org/Tiny-MoE" in out and "consolidated" not in out
    gets = ckpt_hub.gets()
    weight_gets = [r for r in gets if r["path"].endswith(".safetensors")]
    assert weight_gets and all(r["range"] == f"bytes=0-{pull.SAFETENSORS_PROBE - 1}" for r in weight_gets)
    assert sum(r["sent"] for r in weight_gets) < weights / 20  # headers, not weights
    assert not paths.models_dir().exists() or not any(paths.models_dir().iterdir())


def test_a_checkpoint_folder_is_pulled_resumed_and_answers_on_the_native_engine(ckpt_hub, home, capsys,
                                                                               ckpt_files):
    big = "model-00001-of-00002.safetensors"
    cut = len(ckpt_files[big]) // 2
    ckpt_hub.cut_at = cut  # falls in the big shard (config and tokenizer files are smaller)
    assert cli.main(["pull", f"hf:{CKPT_REPO}"]) == 1
    assert "interrupted" in one_line(capsys.readouterr().err.split("\r")[-1])
    assert not (paths.models_dir() / "Tiny-MoE").exists()  # not a model until every file is there
    assert cli.main(["models", "--json"]) == 0
    assert "tiny-moe" not in {m["id"] for m in json.loads(capsys.readouterr().out)}
    n = len(ckpt_hub.log)
    assert cli.main(["pull", f"hf:{CKPT_REPO}"]) == 0
    out = capsys.readouterr().out
    assert "pulled tiny-moe" in out and "SHA-256 verified; 7 files" in out
    after = [r for r in ckpt_hub.log[n:] if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert [r["range"] for r in after if r["path"].endswith(big)] == [f"bytes={cut}-"]
    assert not [r for r in after if r["path"].endswith(("config.json", "tokenizer.json"))]
    folder = paths.models_dir() / "Tiny-MoE"
    assert sorted(p.name for p in folder.iterdir()) == NEEDED
    assert all((folder / k).read_bytes() == ckpt_files[k] for k in NEEDED)
    assert not [r for r in ckpt_hub.log if r["path"].endswith(("README.md", "consolidated.safetensors"))]
    assert not (paths.models_dir() / pull.PARTIAL_DIR).exists()
    assert pull.registry()["Tiny-MoE"]["kind"] == "checkpoint"
    r = run_cli("ask", "Hi", "--model", "tiny-moe", "--max-tokens", "3", "--no-log", "--json", home=home,
                timeout=300)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["model"] == "tiny-moe" and answer["backend"] == "torch"
    assert cli.main(["rm", "tiny-moe", "--yes"]) == 0 and not folder.exists()


def test_a_hub_checkpoint_under_the_embedded_models_name_is_refused(ckpt_files, home, capsys, monkeypatch):
    """Installed as smollm2-135m-instruct it could be neither used nor removed (the embedded model answers to that
    name): the pull says so in one line and fetches no weights."""
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with StandinHub({repo: ckpt_files}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        assert cli.main(["pull", f"hf:{repo}"]) == 2
        assert "the embedded model's name" in one_line(capsys.readouterr().err)
        # the plan read the shards' headers (ranges), nothing was downloaded whole
        assert all(r["range"] for r in h.log if r["method"] == "GET" and r["path"].endswith(".safetensors"))
    assert not (paths.models_dir() / "SmolLM2-135M-Instruct").exists()
