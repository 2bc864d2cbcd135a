"""GPU discovery order (NVML, then torch.cuda when NVML is missing, fails, or lists nothing), the memory-bandwidth
figure cached per hardware fingerprint, and the cgroup v1/v2 memory cap."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from localmoe.placement import hardware

GPU = hardware.GPU(0, "Test GPU", "nvidia", 80 * 2**30, 79 * 2**30, "torch.cuda")
NVML_GPU = hardware.GPU(0, "Test GPU", "nvidia", 80 * 2**30, 78 * 2**30, "nvml")


def test_nvml_first(monkeypatch):
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda: [NVML_GPU])
    monkeypatch.setattr(hardware, "_torch_gpus", lambda: [GPU])
    assert hardware.detect_gpus() == [NVML_GPU]


def test_torch_when_nvml_is_missing_or_lists_nothing(monkeypatch):
    monkeypatch.setattr(hardware, "_torch_gpus", lambda: [GPU])
    for nvml in (None, []):
        monkeypatch.setattr(hardware, "_nvml_gpus", lambda nvml=nvml: nvml)
        assert hardware.detect_gpus() == [GPU]


def test_no_gpu_anywhere(monkeypatch):
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda: [])
    monkeypatch.setattr(hardware, "_torch_gpus", lambda: [])
    assert hardware.detect_gpus() == []


def test_bandwidth_is_measured_once_per_fingerprint(home, monkeypatch):
    """Cold on the first call (measured, file written), warm on the second (read back, not measured), measured
    again when the hardware's fingerprint changes."""
    monkeypatch.setattr(hardware, "detect_gpus", lambda: [])
    measured = []

    def measure() -> float:
        measured.append(12.5 + len(measured))
        return measured[-1]

    monkeypatch.setattr(hardware, "measure_bandwidth", measure)
    cache = home / hardware.BANDWIDTH_CACHE

    cold = hardware.detect()
    assert (cold.memory_bandwidth_gbps, cold.bandwidth_cached, measured) == (12.5, False, [12.5])
    assert json.loads(cache.read_text())["fingerprint"] == cold.fingerprint
    assert json.loads(cache.read_text())["memory_bandwidth_gbps"] == 12.5

    warm = hardware.detect()
    assert (warm.memory_bandwidth_gbps, warm.bandwidth_cached, measured) == (12.5, True, [12.5])
    assert warm.fingerprint == cold.fingerprint

    # another machine (here: a different CPU name) has another fingerprint, so the figure is measured again
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Another CPU 9000")
    moved = hardware.detect()
    assert moved.fingerprint != cold.fingerprint
    assert (moved.memory_bandwidth_gbps, moved.bandwidth_cached, measured) == (13.5, False, [12.5, 13.5])
    assert json.loads(cache.read_text()) | {"measured_at": 0} == {
        "fingerprint": moved.fingerprint, "memory_bandwidth_gbps": 13.5, "measured_at": 0}
    assert hardware.detect().bandwidth_cached is True

    # an unreadable cache file is measured over, not an error
    cache.write_text("{not json")
    again = hardware.detect()
    assert (again.bandwidth_cached, measured[-1]) == (False, 14.5)


GiB = 2**30


def fake_cgroup(monkeypatch, tmp_path, proc_cgroup: str, files: dict[str, str]) -> None:
    """A fake /proc/self/cgroup and /sys/fs/cgroup under tmp_path, on a 64 GiB host."""
    for rel, text in {"proc/self/cgroup": proc_cgroup, **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(hardware, "Path", lambda p: tmp_path / str(p).lstrip("/"))
    monkeypatch.setattr(hardware.psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * GiB))


@pytest.mark.parametrize(("limit", "expect"), [
    (str(4 * GiB), (4 * GiB, 4 * GiB - GiB + 256 * 2**20)),  # limit − usage + reclaimable file cache
    ("max", None),  # v2's "no limit"
])
def test_cgroup_v2_memory_cap(monkeypatch, tmp_path, limit, expect):
    d = "sys/fs/cgroup/user.slice/job.scope"
    fake_cgroup(monkeypatch, tmp_path, "0::/user.slice/job.scope\n", {
        f"{d}/memory.max": f"{limit}\n", f"{d}/memory.current": f"{GiB}\n",
        f"{d}/memory.stat": f"anon 1000\ninactive_file {256 * 2**20}\nactive_file 5\n"})
    assert hardware.cgroup_memory() == expect


@pytest.mark.parametrize(("limit", "expect"), [
    (2 * GiB, (2 * GiB, 2 * GiB - 1536 * 2**20 + 100 * 2**20)),
    (9223372036854771712, None),  # v1's "no limit": 2**63 rounded down to a page
    (128 * GiB, None),  # a cap above the host's RAM caps nothing
])
def test_cgroup_v1_memory_cap(monkeypatch, tmp_path, limit, expect):
    d = "sys/fs/cgroup/memory/docker/abc"
    fake_cgroup(monkeypatch, tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n", {
        f"{d}/memory.limit_in_bytes": f"{limit}\n", f"{d}/memory.usage_in_bytes": f"{1536 * 2**20}\n",
        f"{d}/memory.stat": f"cache 7\ntotal_inactive_file {100 * 2**20}\n",
        # a v2 file the v1 reading must not take instead
        "sys/fs/cgroup/docker/abc/memory.max": f"{GiB}\n", "sys/fs/cgroup/docker/abc/memory.current": "0\n"})
    assert hardware.cgroup_memory() == expect


def test_no_cgroup_file_means_no_cap(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "Path", lambda p: tmp_path / str(p).lstrip("/"))
    assert hardware.cgroup_memory() is None


def test_detect_plans_against_the_cgroup_cap(monkeypatch):
    monkeypatch.setattr(hardware, "cgroup_memory", lambda: (GiB, 300 * 2**20))
    monkeypatch.setattr(hardware, "detect_gpus", lambda: [])
    hw = hardware.detect(measure=False)
    assert hw.memory_limit_bytes == GiB and hw.ram_available_bytes == 300 * 2**20
