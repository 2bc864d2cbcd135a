"""GPU discovery order: NVML, then torch.cuda when NVML is missing, fails, or lists nothing."""

from __future__ import annotations

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
