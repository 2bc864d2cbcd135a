"""`localmoe plan` names the native engine's expected decode speed (#16): a disk read bandwidth measured on the model
file's device (cold, cached per device and hardware fingerprint) and the memory bandwidth turn the plan's bytes per
token into tok/s, labelled an estimate at uniform routing. The big model is a header-only GGUF (see
test_engine_choice), so its figures come from caches the tests write, never from reading its hole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_engine_choice import Q4K_EXPERT_BYTES, QWEN3_30B, header_only_gguf

from helpers import run_cli
from localmoe.placement import hardware, plan
from localmoe.placement.gguf_file import read_header
from localmoe.placement.layout import read_layout
from localmoe.placement.plan import Budget, CheckpointPlan, choose_engine, estimate_speed

MiB, GiB = 1024**2, 1024**3


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return header_only_gguf(tmp_path_factory.mktemp("big") / "qwen3-30b-shaped.gguf", **QWEN3_30B)


@pytest.fixture
def real_file(tmp_path: Path) -> Path:
    """32 MiB of data on disk (written and synced: no holes, no dirty pages)."""
    f = tmp_path / "model.bin"
    with f.open("wb") as out:
        for _ in range(32):
            out.write(os.urandom(MiB))
        out.flush()
        os.fsync(out.fileno())
    return f


def _hw(home: Path, fp: str) -> hardware.Hardware:
    home.mkdir(parents=True, exist_ok=True)
    return hardware.Hardware(os="Linux", arch="x86_64", cpu_model="test", physical_cores=2, logical_cores=2,
                             ram_total_bytes=8 * GiB, ram_available_bytes=8 * GiB, swap_total_bytes=0,
                             swap_free_bytes=0, data_dir=str(home), fingerprint=fp)


# --- the disk sampler ----------------------------------------------------------------------------------------


def test_the_sampler_reads_a_real_file_cold(real_file, monkeypatch):
    """Every sampled range is dropped from the page cache before it is read: otherwise the figure is the page
    cache's (the file was just written and is cached in full)."""
    events: list[tuple[str, int, int]] = []
    fadvise, preadv = os.posix_fadvise, os.preadv

    def advise(fd: int, off: int, length: int, how: int) -> None:
        if how == os.POSIX_FADV_DONTNEED:
            events.append(("drop", off, length))
        fadvise(fd, off, length, how)

    def read(fd: int, bufs: list, off: int) -> int:
        events.append(("read", off, 0))
        return preadv(fd, bufs, off)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "preadv", read)
    gbps = hardware.measure_disk_bandwidth(real_file, total=4 * MiB, chunk=512 * 1024)
    assert gbps is not None and gbps > 0
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert len(reads) == 8  # 4 MiB in 512 KiB ranges, at distinct offsets
    assert len({events[i][1] for i in reads}) == 8
    for i in reads:  # each read's range was dropped before the first read
        off = events[i][1]
        assert any(kind == "drop" and o <= off < o + n for kind, o, n in events[:reads[0]]), off


def test_the_figure_is_cached_per_device_and_fingerprint(real_file, home, monkeypatch):
    hw = _hw(home, "fp-a")
    assert hardware.known_disk_bandwidth(real_file, hw) is None
    gbps, cached = hardware.disk_bandwidth(real_file, hw)
    assert gbps is not None and gbps > 0 and cached is False
    data = json.loads((home / hardware.DISK_BANDWIDTH_CACHE).read_text())
    key = f"fp-a:{real_file.stat().st_dev}"
    assert data[key]["disk_read_gbps"] == gbps and hardware.known_disk_bandwidth(real_file, hw) == gbps

    measured: list[Path] = []

    def measure(path, total=0, chunk=0):
        measured.append(path)
        return 1.25

    monkeypatch.setattr(hardware, "measure_disk_bandwidth", measure)
    assert hardware.disk_bandwidth(real_file, hw) == (gbps, True) and measured == []  # the second call: the cache
    other = _hw(home, "fp-b")  # other hardware (another machine sharing the data dir): measured again
    assert hardware.disk_bandwidth(real_file, other) == (1.25, False) and measured == [real_file]
    data = json.loads((home / hardware.DISK_BANDWIDTH_CACHE).read_text())
    assert data[key]["disk_read_gbps"] == gbps and data[f"fp-b:{real_file.stat().st_dev}"]["disk_read_gbps"] == 1.25


def test_a_tiny_or_sparse_file_gives_none_and_caches_nothing(tmp_path, home):
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(os.urandom(64 * 1024))
    sparse = tmp_path / "sparse.gguf"
    with sparse.open("wb") as f:
        f.truncate(64 * MiB)
    for f in (tiny, sparse):
        assert hardware.measure_disk_bandwidth(f) is None and hardware.unsampleable(f)
        assert hardware.disk_bandwidth(f, _hw(home, "fp-a")) == (None, False)
    assert not (home / hardware.DISK_BANDWIDTH_CACHE).exists()


# --- the expected speed --------------------------------------------------------------------------------------


def _native(big_moe: Path, ram_gib: float) -> CheckpointPlan:
    choice = choose_engine(read_layout(big_moe), Budget(0, int(ram_gib * GiB), source="override"),
                           backend="torch" if ram_gib > 16 else None)
    assert choice.backend == "torch" and isinstance(choice.plan, CheckpointPlan)
    return choice.plan


def test_expected_speed_is_disk_time_plus_memory_time_per_token(big_moe):
    cp = _native(big_moe, 8)
    # by hand, from the file's header: dense = every tensor but the experts (in the file's types: Q8_0 attention,
    # embeddings and head; F32 norms and routers); slots = what 8 GiB leaves after reserve, dense and KV cache
    dense = sum(t.n_bytes for t in read_header(big_moe).tensors if "_exps" not in t.name)
    slots = (8 * GiB - plan.RAM_RESERVE - dense - cp.kv_bytes) // (48 * Q4K_EXPERT_BYTES)
    disk = (1 - slots / 128) * 8 * 48 * Q4K_EXPERT_BYTES  # uniform routing: top-8 of 128, `slots` held per layer
    memory = dense + 8 * 48 * Q4K_EXPERT_BYTES
    hand = 1 / (disk / 0.5e9 + memory / 20e9)
    s = estimate_speed(cp, 0.5, 20.0)
    assert cp.dense_bytes == dense and cp.slots_per_layer == slots
    assert s.disk_bytes_per_token == int(disk) and s.memory_bytes_per_token == memory
    assert s.expected_tok_s == pytest.approx(hand, rel=1e-6) and 0.3 < hand < 1.5
    assert s.describe().startswith(f"expected ~{hand:.2g} tok/s (an estimate: per token ")
    assert "uniform routing" in s.describe() and "reads less" in s.describe()

    unknown = estimate_speed(cp, None, 20.0)
    assert unknown.expected_tok_s is None and unknown.describe().startswith("expected speed unknown (no disk read")
    assert estimate_speed(cp, 0.5, None).describe().startswith("expected speed unknown (no memory bandwidth")

    resident = _native(big_moe, 32)  # every expert held: nothing read from disk, no disk figure needed
    assert resident.bytes_per_token == 0
    alone = estimate_speed(resident, None, 20.0)
    assert alone.expected_tok_s == pytest.approx(20e9 / (resident.dense_bytes + 8 * 48 * Q4K_EXPERT_BYTES))


# --- `localmoe plan` -----------------------------------------------------------------------------------------


def _seed(home: Path, big_moe: Path, *, disk: float | None, memory: float) -> None:
    """The caches `plan` reads, for this machine's fingerprint (the CLI subprocess detects the same one)."""
    fp = hardware.fingerprint(hardware.detect(measure=False))
    home.mkdir(parents=True, exist_ok=True)
    (home / hardware.BANDWIDTH_CACHE).write_text(json.dumps({"fingerprint": fp, "memory_bandwidth_gbps": memory}))
    if disk is not None:
        (home / hardware.DISK_BANDWIDTH_CACHE).write_text(
            json.dumps({f"{fp}:{big_moe.stat().st_dev}": {"disk_read_gbps": disk}}))


def test_plan_names_the_native_engine_and_its_expected_speed(big_moe, home):
    _seed(home, big_moe, disk=0.5, memory=20.0)
    cp = _native(big_moe, 8)
    hand = 1 / (cp.bytes_per_token / 0.5e9 + (cp.dense_bytes + 8 * 48 * cp.bytes_per_expert) / 20e9)
    r = run_cli("plan", str(big_moe), "--ram", "8G", "--vram", "0")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("engine   torch: the experts do not fit in memory")
    assert f"; expected ~{hand:.2g} tok/s (an estimate: per token " in first
    assert "at 0.50 GB/s" in first and "at 20.0 GB/s" in first and "uniform routing" in first

    out = json.loads(run_cli("plan", str(big_moe), "--ram", "8G", "--vram", "0", "--json").stdout)
    e = out["engine"]
    assert e["expected_tok_s"] == pytest.approx(hand, rel=1e-6) and e["disk_read_gbps"] == 0.5
    assert e["memory_bandwidth_gbps"] == 20.0 and e["disk_bytes_per_token"] == cp.bytes_per_token
    assert e["speed_basis"].startswith("an estimate")


def test_plan_says_the_speed_is_unknown_rather_than_invent_one(big_moe, home):
    """No cached disk figure and a file that cannot be sampled (the header-only file is a hole): no number."""
    _seed(home, big_moe, disk=None, memory=20.0)
    r = run_cli("plan", str(big_moe), "--ram", "8G", "--vram", "0")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "expected speed unknown (no disk read bandwidth: the file is mostly holes" in first
    assert "tok/s" not in first
    e = json.loads(run_cli("plan", str(big_moe), "--ram", "8G", "--vram", "0", "--json").stdout)["engine"]
    assert e["expected_tok_s"] is None and e["disk_read_gbps"] is None and e["speed_basis"].startswith("unknown")
    assert not (home / hardware.DISK_BANDWIDTH_CACHE).exists()


def test_llama_cpp_choices_carry_no_native_estimate(big_moe, home):
    _seed(home, big_moe, disk=0.5, memory=20.0)
    out = json.loads(run_cli("plan", str(big_moe), "--ram", "32G", "--vram", "0", "--json").stdout)
    assert out["engine"]["backend"] == "llama.cpp" and out["engine"]["expected_tok_s"] is None


def test_choosing_the_engine_measures_nothing(big_moe, monkeypatch):
    """`ask` (and every session) chooses through backend_for: no disk sample, no memory copy, no estimate."""
    from localmoe.engine import backend_for
    from localmoe.home import models

    def refuse(*a, **kw):
        raise AssertionError("measured while choosing the engine")

    monkeypatch.setattr(hardware, "measure_disk_bandwidth", refuse)
    monkeypatch.setattr(hardware, "measure_bandwidth", refuse)
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: Budget(0, 8 * GiB,
                                                                                                source="override")))
    assert backend_for(models.resolve(str(big_moe)), {})[0] == "torch"
