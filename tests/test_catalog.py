"""The curated catalog: every entry parses, its sizes agree with its layout, and `models --available` gives the
verdicts of a hand-worked table on three machines."""

from __future__ import annotations

import json

import pytest

from localmoe import cli
from localmoe.errors import UsageError
from localmoe.home import catalog, models
from localmoe.placement.plan import RAM_RESERVE, Budget

GiB = 1024**3
# Nominal bits per weight of llama.cpp's quantisations (its own quantize tool's table, 7B llama). Files differ from
# params × bpw because some tensors (embeddings, norms, MXFP4 models' attention) keep another type: ±15% allowed.
BPW = {"Q3_K_M": 3.91, "Q4_K_M": 4.85, "Q5_K_M": 5.69, "Q6_K": 6.56, "Q8_0": 8.5, "MXFP4": 4.25}
MARGIN = 0.15


def test_every_entry_parses_with_its_facts_and_their_sources():
    entries = catalog.entries()
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids))
    assert len(set(catalog.names())) == len(catalog.names())  # no alias shadows another name
    for want in ("qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b",
                 "gpt-oss-20b", "granite-3.1-3b-a800m", "smollm2-135m-instruct"):
        assert want in ids
    assert sum(1 for e in entries if e.tier == "small" and e.source == "hub") >= 2
    assert any(e.is_moe and e.default_file.size_bytes < 4 * 10**9 for e in entries if e.files)
    for e in entries:
        assert e.license and e.description
        if e.source == "embedded":
            continue
        assert e.repo and "/" in e.repo and e.files, e.id
        lay = e.layout
        assert lay["source"] and lay["layers"] > 0 and lay["context"] > 0, e.id
        assert 0 < lay["active_params"] <= lay["total_params"], e.id
        if e.is_moe:
            assert 0 < lay["experts_per_token"] < lay["experts"], e.id
        assert sum(f.default for f in e.files) == 1, e.id
        for f in e.files:
            assert f.size_source in ("hub listing", "estimate"), (e.id, f.quant)
            assert f.sha256 is None or len(f.sha256) == 64
            assert f.file.endswith(".gguf")
            # the layout the planner sees from these facts places every byte of the file
            layout = catalog.layout_of(e, f)
            placed = layout.dense_bytes + layout.expert_bytes
            assert abs(placed - f.size_bytes) <= 0.01 * f.size_bytes, (e.id, f.quant)


@pytest.mark.parametrize("entry", [e for e in catalog.entries() if e.files], ids=lambda e: e.id)
def test_sizes_agree_with_parameters_times_bits_per_weight(entry):
    for f in entry.files:
        expected = entry.layout["total_params"] * BPW[f.quant] / 8
        assert abs(f.size_bytes / expected - 1) <= MARGIN, (f.quant, f.size_bytes, expected)


def test_the_existing_embedded_entry_still_resolves(smollm):
    assert models.resolve("smollm2").path == smollm.path
    assert models.resolve("default").id == "smollm2-135m-instruct"


def test_lookup_of_names_quantisations_and_misspellings():
    e, f = catalog.lookup("qwen3-30b-a3b")
    assert f.quant == "Q4_K_M" and e.local_id(f) == "qwen3-30b-a3b-q4_k_m"
    assert catalog.lookup("mixtral:q8_0")[1].file == "mixtral-8x7b-instruct-v0.1.Q8_0.gguf"
    with pytest.raises(UsageError, match=r"no Q2_K file .*Q4_K_M"):
        catalog.lookup("qwen3-30b-a3b:Q2_K")
    with pytest.raises(UsageError, match=r"'qwen3-30b-a3' is not in the catalog \(closest: qwen3-30b-a3b"):
        catalog.lookup("qwen3-30b-a3")
    with pytest.raises(UsageError, match="closest: .*mixtral-8x7b"):
        catalog.lookup("mixtrall-8x7b")


# Hand-worked verdicts. Usable RAM is the budget less the 0.5 GiB reserve; a file "fits" when its weights plus the
# KV cache and llama.cpp's compute buffer (~0.4 GiB for a 152k vocabulary) stay within it.
CPU_16 = Budget(vram_bytes=0, ram_bytes=16 * GiB)                       # 15.5 GiB usable
GPU_8_32 = Budget(vram_bytes=8 * GiB, ram_bytes=32 * GiB, gpu_name="GPU")  # 7.5 GiB VRAM, 31.5 GiB RAM usable
APPLE_24 = Budget(vram_bytes=24 * GiB, ram_bytes=24 * GiB, unified=True, gpu_name="Apple M")  # one pool, 23.5
TABLE = {
    # name: (CPU-only 16 GB, 8 GB GPU + 32 GB, 24 GB Apple)
    # 18.6 GB = 17.3 GiB: over 15.5 on the CPU box (paged); on the GPU box the dense layers and some experts go to
    # VRAM and the rest of the experts (<10 GiB) sit in RAM; in 23.5 GiB unified it fits whole.
    "qwen3-30b-a3b:Q4_K_M": ("disk", "ram", "vram"),
    # 25.1 GB = 23.4 GiB + KV + buffers: over 23.5 GiB of unified memory by ~0.5 GiB
    "qwen3-30b-a3b:Q6_K": ("disk", "ram", "disk"),
    "qwen3-30b-a3b:Q8_0": ("disk", "ram", "disk"),    # 30.3 GiB: 22.8 of it in RAM beside 7.5 in VRAM
    "gpt-oss-20b:MXFP4": ("ram", "ram", "vram"),      # 11.3 GiB: RAM on the CPU box, too big for 7.5 GiB VRAM
    "deepseek-v2-lite:Q4_K_M": ("ram", "ram", "vram"),  # 9.7 GiB
    "deepseek-v2-lite:Q8_0": ("disk", "ram", "vram"),   # 15.6 GiB: just over 15.5 with its buffers
    "mixtral-8x7b:Q3_K_M": ("disk", "ram", "vram"),     # 19.0 GiB
    "mixtral-8x7b:Q4_K_M": ("disk", "ram", "disk"),     # 24.6 GiB
    "mixtral-8x7b:Q8_0": ("disk", "disk", "disk"),      # 46.2 GiB: 38.7 GiB left for 31.5 of RAM
    "qwen1.5-moe-a2.7b:Q4_K_M": ("ram", "ram", "vram"),  # 8.1 GiB
    "olmoe-1b-7b:Q4_K_M": ("ram", "vram", "vram"),       # 3.9 GiB: the whole model in 7.5 GiB of VRAM
    "granite-3.1-3b-a800m:Q4_K_M": ("ram", "vram", "vram"),
    "qwen3-0.6b:Q8_0": ("ram", "vram", "vram"),
    "smollm2-1.7b-instruct:Q4_K_M": ("ram", "vram", "vram"),
}
RECOMMENDED = ("gpt-oss-20b:MXFP4", "qwen3-30b-a3b:Q4_K_M", "qwen3-30b-a3b:Q4_K_M")


@pytest.mark.parametrize(("column", "budget"), [(0, CPU_16), (1, GPU_8_32), (2, APPLE_24)],
                         ids=["cpu-16", "gpu-8-ram-32", "apple-24"])
def test_models_available_gives_the_hand_worked_verdicts(column, budget, monkeypatch, capsys):
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: budget))
    assert cli.main(["models", "--available", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = {m["name"]: m["verdict"] for m in out["models"]}
    assert {name: got[name]["kind"] for name in TABLE} == {name: kinds[column] for name, kinds in TABLE.items()}
    assert out["recommended_large"]["name"] == RECOMMENDED[column]
    for v in got.values():  # a disk verdict says how much a token reads; the others read nothing per token
        assert (v["disk_bytes_per_token"] > 0) == (v["kind"] == "disk")
    if column == 0:
        # Qwen3-30B-A3B Q4_K_M on 16 GiB: 17.3 GiB of weights + 0.375 GiB KV (4096 tokens) + 0.37 GiB compute
        # - 15.5 GiB usable = 2.57 GiB paged, of which a token touches 8 of 128 experts: ~164 MiB.
        per_token = got["qwen3-30b-a3b:Q4_K_M"]["disk_bytes_per_token"]
        assert 150 * 2**20 < per_token < 180 * 2**20
    assert cli.main(["models", "--available"]) == 0
    text = capsys.readouterr().out
    assert f"* recommended large tier for this machine: {RECOMMENDED[column]}" in text


def test_a_machine_too_small_refuses_with_the_reason_and_recommends_nothing(monkeypatch, capsys):
    tiny = Budget(vram_bytes=0, ram_bytes=RAM_RESERVE + 256 * 2**20)
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: tiny))
    assert cli.main(["models", "--available"]) == 0
    text = capsys.readouterr().out
    assert "refused: mixtral-8x7b:Q8_0: llama model (46.2 GiB) does not fit this machine" in text
    assert "no catalog MoE runs on this machine" in text


def test_an_installed_pull_is_marked_and_resolves_by_its_catalog_name(home, tiny_moe, monkeypatch, capsys):
    d = home / "models"
    d.mkdir(parents=True)
    (d / "olmoe-1b-7b-q4_k_m.gguf").symlink_to(tiny_moe[1])
    assert models.resolve("olmoe").id == "olmoe-1b-7b-q4_k_m"
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: GPU_8_32))
    assert cli.main(["models", "--available", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in out["models"] if m["installed"]] == ["olmoe-1b-7b:Q4_K_M"]
    with pytest.raises(Exception, match=r"not installed \(run `localmoe pull qwen3-30b-a3b`\)"):
        models.resolve("qwen3-moe")


def test_the_missing_large_tier_notice_names_the_model_recommended_here(monkeypatch):
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: CPU_16))
    models.large_tier_hint.cache_clear()
    try:
        hint = models.large_tier_hint()
    finally:
        models.large_tier_hint.cache_clear()
    assert hint.startswith("get gpt-oss-20b (MXFP4, fits in RAM here) with `localmoe pull gpt-oss-20b`")
