"""What this machine has. Everything else asks this module; nobody re-detects.

GPU discovery tries NVML first (cheap, exact free VRAM), then torch.cuda (only when an NVIDIA driver is
present, because importing torch costs seconds), then Apple MPS. The memory-bandwidth figure is measured once
per hardware fingerprint and cached in the data dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from localmoe.home import paths

BANDWIDTH_CACHE = "hardware.json"


@dataclass
class GPU:
    index: int
    name: str
    vendor: str  # nvidia | apple
    vram_total_bytes: int
    vram_free_bytes: int
    source: str  # nvml | torch.cuda | mps
    unified_memory: bool = False


@dataclass
class Hardware:
    os: str
    arch: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    memory_limit_bytes: int | None = None
    gpus: list[GPU] = field(default_factory=list)
    data_dir: str = ""
    disk_free_bytes: int = 0
    memory_bandwidth_gbps: float | None = None
    bandwidth_cached: bool = False
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, available) bytes of this process's cgroup, or None when it has no limit.

    Containers and `memcap` cap memory (page cache included) below what /proc/meminfo shows; planning against
    the host's RAM there would plan a model that gets killed. Reclaimable file cache counts as available.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            d = root / "memory" / rel.lstrip("/")
            limit, usage = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            inactive = _stat_value(d / "memory.stat", "total_inactive_file")
            break
    else:
        rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
        if rel is None:
            return None
        d = root / rel.lstrip("/")  # cgroup v2
        limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
        inactive = _stat_value(d / "memory.stat", "inactive_file")
    # v1 reports "no limit" as a page-rounded 2**63.
    if limit is None or usage is None or limit >= psutil.virtual_memory().total:
        return None
    return limit, max(0, limit - usage + inactive)


def _nvml_gpus() -> list[GPU] | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None  # library present, driver absent
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GPU(i, name, "nvidia", int(mem.total), int(mem.free), "nvml"))
        return gpus
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def _torch_gpus() -> list[GPU]:
    if importlib.util.find_spec("torch") is None:
        return []
    on_mac_arm = sys.platform == "darwin" and platform.machine() == "arm64"
    if not (_nvidia_driver_present() or on_mac_arm):
        return []
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GPU(i, torch.cuda.get_device_name(i), "nvidia", int(total), int(free), "torch.cuda"))
    elif on_mac_arm and torch.backends.mps.is_available():
        vm = psutil.virtual_memory()
        # Unified memory: the GPU shares system RAM, so "VRAM" is what the OS would give us.
        gpus.append(GPU(0, "Apple GPU (MPS)", "apple", int(vm.total), int(vm.available), "mps", True))
    return gpus


def detect_gpus() -> list[GPU]:
    gpus = _nvml_gpus()
    if gpus:
        return gpus
    # NVML absent, failing, or initialised yet listing no device (e.g. a container without the device nodes)
    return _torch_gpus()


def measure_bandwidth(seconds: float = 0.25, size_mb: int = 64) -> float:
    """Memory-copy bandwidth in GB/s (bytes read + bytes written per second), best of several copies."""
    import numpy as np

    src = np.ones(size_mb * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 50:
            break
    return round(2 * src.nbytes / best / 1e9, 2)


def fingerprint(hw: Hardware) -> str:
    key = json.dumps(
        [hw.cpu_model, hw.physical_cores, hw.logical_cores, hw.ram_total_bytes, [g.name for g in hw.gpus]]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def detect(measure: bool = True) -> Hardware:
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    ddir = paths.data_dir()
    cg = cgroup_memory()
    hw = Hardware(
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        cpu_model=cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=min(int(vm.available), cg[1]) if cg else int(vm.available),
        swap_total_bytes=int(sw.total),
        swap_free_bytes=int(sw.free),
        memory_limit_bytes=cg[0] if cg else None,
        gpus=detect_gpus(),
        data_dir=str(ddir),
        disk_free_bytes=int(shutil.disk_usage(ddir).free),
    )
    hw.fingerprint = fingerprint(hw)
    if measure:
        hw.memory_bandwidth_gbps, hw.bandwidth_cached = _cached_bandwidth(ddir / BANDWIDTH_CACHE, hw.fingerprint)
    return hw


def known_bandwidth(hw: Hardware) -> float | None:
    """The bandwidth measured earlier on this machine, from the cache `detect` keeps; None when never measured.
    Measures nothing: for screens that open on `detect(measure=False)`."""
    return _read_bandwidth(Path(hw.data_dir) / BANDWIDTH_CACHE, hw.fingerprint)


def _read_bandwidth(cache: Path, fp: str) -> float | None:
    try:
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == fp and isinstance(data.get("memory_bandwidth_gbps"), (int, float)):
            return float(data["memory_bandwidth_gbps"])
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable cache
    return None


def _cached_bandwidth(cache: Path, fp: str) -> tuple[float, bool]:
    known = _read_bandwidth(cache, fp)
    if known is not None:
        return known, True
    bw = measure_bandwidth()
    try:
        tmp = cache.with_suffix(".tmp")
        paths.write_private(tmp, json.dumps({"fingerprint": fp, "memory_bandwidth_gbps": bw,
                                             "measured_at": time.time()}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only data dir costs a re-measurement next time, nothing more
    return bw, False


def memory_bandwidth(hw: Hardware) -> tuple[float, bool]:
    """(GB/s, cached): the figure `detect(measure=True)` keeps, measured now (~0.25 s) and cached when there is none.
    For display commands (`localmoe plan`), which may measure; the others read `known_bandwidth`."""
    return _cached_bandwidth(Path(hw.data_dir) / BANDWIDTH_CACHE, hw.fingerprint)


# --- Disk read bandwidth, per device ---------------------------------------------------------------------------
#
# What a token costs once experts are read from disk. Measured on the model file itself (its device, with whatever
# filesystem, encryption or network mount is in between) as the native engine reads a missed expert: a buffered
# pread of an expert-sized range at a random offset. Cached per device (st_dev) and hardware fingerprint.

DISK_BANDWIDTH_CACHE = "disk_bandwidth.json"
DISK_SAMPLE_BYTES = 96 * 1024**2  # ~0.2-0.5 s on an SSD, enough expert-sized reads to average over
DISK_CHUNK_BYTES = 1024**2  # about one matrix of a Qwen3-30B-A3B Q4_K expert (gate, up or down)
MIN_SAMPLE_FILE = 16 * 1024**2  # smaller files would measure little more than the page cache and one seek


def unsampleable(path: str | os.PathLike[str]) -> str | None:
    """Why `measure_disk_bandwidth` cannot measure the disk on `path`, or None when it can."""
    st = os.stat(path)
    if st.st_size < MIN_SAMPLE_FILE:
        return f"the file is too small to sample (under {MIN_SAMPLE_FILE // 1024**2} MiB)"
    if getattr(st, "st_blocks", st.st_size // 512) * 512 < st.st_size // 2:
        return "the file is mostly holes, and a sparse file reads as zeros without touching the disk"
    return None


def measure_disk_bandwidth(path: str | os.PathLike[str], total: int = DISK_SAMPLE_BYTES,
                           chunk: int = DISK_CHUNK_BYTES) -> float | None:
    """Read bandwidth in GB/s of `total` bytes (at most a quarter of the file) in `chunk`-sized buffered preads at
    distinct random aligned offsets of `path`, cold. None for a file too small to sample or mostly holes (a sparse
    file's holes read as zeros without touching the disk)."""
    import random

    if unsampleable(path):
        return None
    st = os.stat(path)
    size = st.st_size
    total = min(total, size // 4)
    chunk = max(4096, min(chunk, total // 8)) // 4096 * 4096
    slots = random.Random(st.st_ino).sample(range(size // chunk), max(1, total // chunk))
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        advise = hasattr(os, "posix_fadvise")
        if advise:
            # Pages already cached would be read at memory speed and the figure would be the page cache's, not the
            # disk's: drop the sampled ranges first. DONTNEED leaves dirty pages (a file just written or downloaded)
            # in place, hence the fdatasync; pages another process maps stay too, which only makes the figure high.
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            for s in slots:
                os.posix_fadvise(fd, s * chunk, chunk, os.POSIX_FADV_DONTNEED)
        done = 0
        t0 = time.perf_counter()
        for s in slots:
            n, off = 0, s * chunk
            while n < chunk:
                got = os.preadv(fd, [memoryview(buf)[n:]], off + n)
                if got <= 0:
                    break
                n += got
            done += n
        seconds = time.perf_counter() - t0
        if advise:  # leave the page cache as it was: a sample of the model is not worth keeping
            for s in slots:
                os.posix_fadvise(fd, s * chunk, chunk, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return round(done / max(seconds, 1e-9) / 1e9, 3) if done else None


def _disk_key(path: str | os.PathLike[str], hw: Hardware) -> str:
    return f"{hw.fingerprint}:{os.stat(path).st_dev}"


def _read_disk_cache(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def known_disk_bandwidth(path: str | os.PathLike[str], hw: Hardware) -> float | None:
    """The read bandwidth measured earlier for `path`'s device on this hardware; None when never measured.
    Measures nothing: what `ask` and the engine choice may use."""
    try:
        entry = _read_disk_cache(Path(hw.data_dir) / DISK_BANDWIDTH_CACHE).get(_disk_key(path, hw))
    except OSError:
        return None
    gbps = entry.get("disk_read_gbps") if isinstance(entry, dict) else None
    return float(gbps) if isinstance(gbps, (int, float)) and gbps > 0 else None


def disk_bandwidth(path: str | os.PathLike[str], hw: Hardware,
                   chunk: int = DISK_CHUNK_BYTES) -> tuple[float | None, bool]:
    """(GB/s, cached) for `path`'s device: the cached figure, else measured on `path` now and cached (None, not
    cached, when the file cannot be sampled). For display commands only (`localmoe plan`): measuring takes ~0.5 s."""
    known = known_disk_bandwidth(path, hw)
    if known is not None:
        return known, True
    try:
        gbps = measure_disk_bandwidth(path, chunk=chunk)
    except OSError:
        return None, False
    if gbps is None:
        return None, False
    cache = Path(hw.data_dir) / DISK_BANDWIDTH_CACHE
    data = _read_disk_cache(cache)
    data[_disk_key(path, hw)] = {"disk_read_gbps": gbps, "sampled": str(path), "measured_at": time.time()}
    try:
        tmp = cache.with_suffix(".tmp")
        paths.write_private(tmp, json.dumps(data))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only data dir costs a re-measurement next time, nothing more
    return gbps, False
