"""GPU discovery order (NVML, then torch.cuda when NVML is missing, fails, or lists nothing), and the memory-bandwidth
figure cached per hardware fingerprint."""

from __future__ import annotations

import json

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
