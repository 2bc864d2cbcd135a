"""Energy meters behind one interface, and a sampler that turns one into joules per answer.

A meter is either a *counter* (`read()` gives cumulative joules since the meter was made: RAPL, NVML's energy
counter, the estimate) or *power* (`read()` gives watts now: NVML's power reading, amdgpu hwmon, battery,
powermetrics). `Sampler` reads one in a background thread while a generation runs and produces an
`EnergyReading`; `select_meter()` picks the best meter this machine has and says why it skipped the others.

Linux sysfs paths all go through `sysfs()`, rooted at `$LOCALMOE_SYSFS_ROOT` (default /sys) so tests can build a
fake tree.

RAPL permissions: since Linux 5.10 `energy_uj` is readable only by root, because its fine-grained readings leak
secrets through power side channels (CVE-2020-8694, "PLATYPUS"). Granting read access re-opens that channel to
local users, so it is the owner's choice; `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj` lasts until
reboot, and a udev rule makes it permanent, e.g. in /etc/udev/rules.d/70-localmoe-rapl.rules:

    ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", RUN+="/bin/chmod o+r /sys%p/energy_uj"

The estimate (no hardware meter): P = base_watts + watts_per_core × busy cores, integrated as
base_watts × wall seconds + watts_per_core × system-wide busy CPU seconds. The defaults, 5 W + 4 W per busy core,
are rough laptop-class figures: a modern laptop package idles at a few watts in deep C-states, and a 15-28 W
U/P-series part spreads its sustained budget over 4-8 cores, i.e. about 3-5 W per busy core (Apple M-series
P-cores sit in the same range). Desktops draw more (10-20 W idle, 8-15 W per core), SMT siblings count as two
busy cores, and GPUs, RAM and the display are not included, so treat the figure as ±50% at best and override it
with `LOCALMOE_BASE_WATTS` / `LOCALMOE_WATTS_PER_CORE` (or the constructor) when you know your machine.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from localmoe.errors import LocalmoeError, UsageError

SYSFS_ENV = "LOCALMOE_SYSFS_ROOT"
BASE_WATTS_ENV = "LOCALMOE_BASE_WATTS"
WATTS_PER_CORE_ENV = "LOCALMOE_WATTS_PER_CORE"
DEFAULT_BASE_WATTS = 5.0
DEFAULT_WATTS_PER_CORE = 4.0
# Counters tick in steps (RAPL ~1 ms, NVML's energy counter coarser); watts from a shorter interval are noise.
MIN_RATE_INTERVAL_S = 0.02

RAPL_FIX = "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj"


def sysfs(*parts: str) -> Path:
    """`$LOCALMOE_SYSFS_ROOT/<parts>`, the root read at each call so tests can point it at a fake tree."""
    return Path(os.environ.get(SYSFS_ENV) or "/sys", *parts)


def _read_text(path: Path) -> str:
    # Every sysfs read goes through here: one place where a test can fail a read the way the kernel does.
    return path.read_text().strip()


def _read_opt(path: Path) -> str | None:
    try:
        return _read_text(path)
    except OSError:
        return None


@dataclass
class EnergyReading:
    """What one measurement interval produced."""

    joules: float
    seconds: float
    avg_watts: float
    peak_watts: float | None
    meter: str
    measured: bool  # False for the estimate
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, watts)

    def to_dict(self) -> dict[str, Any]:
        """The reading as an answer reports it (`ask --json`)."""
        return {"joules": self.joules, "avg_watts": self.avg_watts, "peak_watts": self.peak_watts,
                "meter": self.meter, "measured": self.measured}

    def to_row(self, completion_tokens: int, idle_watts: float | None = None) -> dict[str, Any]:
        """The reading as the recorder stores it beside an answer of `completion_tokens` tokens; with `idle_watts`,
        also the joules above idle."""
        row = {**self.to_dict(), "seconds": self.seconds, "measured": int(self.measured),
               "tokens_per_joule": completion_tokens / self.joules if self.joules > 0 else None}
        if idle_watts is not None:
            row.update(idle_watts=idle_watts, net_joules=net_joules(self, idle_watts))
        return row


class Meter(ABC):
    name: str = "meter"
    measured: bool = True
    kind: str = "counter"  # "counter": read() is cumulative joules; "power": read() is watts now

    @abstractmethod
    def read(self) -> float: ...

    def close(self) -> None:  # noqa: B027 - most meters hold nothing to release
        pass

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.kind})>"


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


M = TypeVar("M", bound=Meter)


def _readable(meter: M, notes: list[str] | None, failure: str) -> M | None:
    """`meter` if a first reading works; otherwise a note ("<failure> (<why>)") and None."""
    try:
        meter.read()
    except (OSError, ValueError) as exc:
        _note(notes, f"{failure} ({exc})")
        return None
    return meter


# --- RAPL (Intel and AMD CPUs on Linux) -------------------------------------------------------------------------

_RAPL_DIR = re.compile(r"intel-rapl:(\d+)(?::(\d+))?")


class RaplMeter(Meter):
    """Package energy plus DRAM from powercap; core/uncore are inside the package and psys contains it."""

    kind = "counter"

    def __init__(self, domains: list[tuple[str, Path, int | None]]) -> None:
        self._paths = [p for _, p, _ in domains]
        self._ranges = [r for _, _, r in domains]
        self.name = "rapl(" + "+".join(dict.fromkeys(n for n, _, _ in domains)) + ")"
        self._last = [int(_read_text(p)) for p in self._paths]
        self._total_uj = 0
        # two samplers on one meter (a decision's and an answer's) must not interleave a read: an older value read
        # after a newer one looks like a counter wrap and adds the whole range
        self._lock = threading.Lock()

    def read(self) -> float:
        with self._lock:
            for i, path in enumerate(self._paths):
                value = int(_read_text(path))
                delta = value - self._last[i]
                if delta < 0:
                    # The counter wrapped; without its range the delta is unknowable, so it counts as nothing.
                    rng = self._ranges[i]
                    delta = delta + rng if rng else 0
                self._total_uj += delta
                self._last[i] = value
            return self._total_uj / 1e6

    @staticmethod
    def domains() -> list[tuple[str, Path, int | None]]:
        """(name, energy_uj path, max_energy_range_uj) of the domains to sum, packages first."""
        found = []
        # /sys/class/powercap lists subdomains flat (intel-rapl:0:0) next to packages; intel-rapl-mmio:N
        # repeats package-N through another interface and would double it, so the pattern leaves it out.
        for d in sysfs("class", "powercap").glob("intel-rapl:*"):
            m = _RAPL_DIR.fullmatch(d.name)
            name = _read_opt(d / "name") if m else None
            if m is None or name is None:
                continue
            top = m.group(2) is None
            if not ((top and name.startswith("package")) or name == "dram"):
                continue
            rng = _read_opt(d / "max_energy_range_uj")
            order = (0 if top else 1, int(m.group(1)), int(m.group(2) or 0))
            found.append((order, name, d / "energy_uj", int(rng) if rng and rng.isdigit() else None))
        found.sort()
        return [(name, path, rng) for _, name, path, rng in found]

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> RaplMeter | None:
        domains = [d for d in cls.domains() if d[1].exists()]
        if not domains:
            _note(notes, "RAPL: no powercap intel-rapl package domains (not Linux on Intel/AMD, or a VM)")
            return None
        try:
            return cls(domains)
        except PermissionError:
            raise LocalmoeError(
                "RAPL: energy counters are root-only since Linux 5.10 (CVE-2020-8694); to allow reading them "
                f"(re-opening that side channel to local users): {RAPL_FIX} (until reboot; a udev rule makes it "
                "permanent)"
            ) from None
        except (OSError, ValueError) as exc:
            _note(notes, f"RAPL: energy_uj unreadable ({exc})")
            return None


# --- NVIDIA (NVML) ----------------------------------------------------------------------------------------------


class NvmlMeter(Meter):
    """All NVIDIA GPUs, summed: the energy counter (Volta and later) or, failing that, instant power."""

    def __init__(self, nvml: Any, handles: list[Any], indices: list[int], counter: bool) -> None:
        self._nvml = nvml
        self._handles = handles
        self.kind = "counter" if counter else "power"
        self.name = "nvml(GPU " + "+".join(map(str, indices)) + ")"
        self._base = self._raw() if counter else 0.0

    def _raw(self) -> float:
        if self.kind == "counter":
            return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3  # mJ
        return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3  # mW

    def read(self) -> float:
        return self._raw() - self._base

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> NvmlMeter | None:
        try:
            import pynvml  # nvidia-ml-py, optional
        except ImportError:
            _note(notes, "NVML: nvidia-ml-py not installed")
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            _note(notes, f"NVML: no NVIDIA driver ({exc})")
            return None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if not handles:
                raise LookupError("no GPUs")
            indices = list(range(len(handles)))
            try:
                return cls(pynvml, handles, indices, counter=True)
            except Exception:
                return cls(pynvml, handles, indices, counter=False)  # pre-Volta: no energy counter
        except Exception as exc:
            _note(notes, f"NVML: no usable GPU power reading ({exc})")
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass
            return None


# --- AMD GPUs (amdgpu hwmon) ------------------------------------------------------------------------------------


class AmdGpuMeter(Meter):
    kind = "power"

    def __init__(self, paths: list[Path], cards: list[str]) -> None:
        self._paths = paths
        self.name = "amdgpu(" + "+".join(cards) + ")"

    def read(self) -> float:
        return sum(int(_read_text(p)) for p in self._paths) / 1e6  # µW

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> AmdGpuMeter | None:
        paths, cards = [], []
        for card in sorted(sysfs("class", "drm").glob("card*")):
            if not re.fullmatch(r"card\d+", card.name):
                continue  # card0-DP-1 and friends are connectors
            for hwmon in sorted((card / "device" / "hwmon").glob("hwmon*")):
                # Newer kernels (RDNA3) offer only power1_input; older ones only power1_average.
                path = next((p for p in (hwmon / "power1_average", hwmon / "power1_input") if p.exists()), None)
                if path is not None:
                    paths.append(path)
                    cards.append(card.name)
                    break
        if not paths:
            _note(notes, "amdgpu: no GPU power sensor in /sys/class/drm")
            return None
        return _readable(cls(paths, cards), notes, "amdgpu: power sensor unreadable")


# --- Apple powermetrics -----------------------------------------------------------------------------------------

_PM_COMBINED = re.compile(r"Combined Power \([^)]*\):\s*([\d.]+)\s*mW")
_PM_PART = re.compile(r"^(CPU|GPU) Power:\s*([\d.]+)\s*mW", re.MULTILINE)
_PM_INTEL = re.compile(r"package power \([^)]*\):\s*([\d.]+)\s*W")


def parse_powermetrics(text: str) -> float | None:
    """Watts from one powermetrics sample: the combined figure, else CPU + GPU, else Intel's package power."""
    if m := _PM_COMBINED.search(text):
        return float(m.group(1)) / 1e3
    if parts := _PM_PART.findall(text):
        return sum(float(v) for _, v in parts) / 1e3
    if m := _PM_INTEL.search(text):
        return float(m.group(1))
    return None


class PowermetricsMeter(Meter):
    """macOS: one long-running powermetrics (a start costs ~1 s), its latest sample kept by a reader thread."""

    kind = "power"
    name = "powermetrics(cpu+gpu)"

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._watts = 0.0
        self._first = threading.Event()
        threading.Thread(target=self._follow, name="localmoe-powermetrics", daemon=True).start()

    def _follow(self) -> None:
        assert self._proc.stdout is not None
        block: list[str] = []
        for line in self._proc.stdout:
            if line.startswith("*** Sampled system activity"):
                block = []
            block.append(line)
            if "Power" in line and (watts := parse_powermetrics("".join(block))) is not None:
                self._watts = watts
                self._first.set()

    def read(self) -> float:
        return self._watts

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> PowermetricsMeter | None:
        if sys.platform != "darwin":
            return None
        if shutil.which("powermetrics") is None:
            _note(notes, "powermetrics: not found")
            return None
        root = os.geteuid() == 0
        try:
            if not root and subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=5).returncode:
                _note(notes, "powermetrics: needs root (run `sudo -v` first, or a NOPASSWD sudoers rule)")
                return None
            cmd = ([] if root else ["sudo", "-n"]) + ["powermetrics", "--samplers", "cpu_power,gpu_power", "-i", "200"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (OSError, subprocess.SubprocessError) as exc:
            _note(notes, f"powermetrics: cannot run ({exc})")
            return None
        meter = cls(proc)
        if not meter._first.wait(3.0):
            meter.close()
            _note(notes, "powermetrics: gave no power figure")
            return None
        return meter


# --- Battery (laptops, unplugged) -------------------------------------------------------------------------------


class BatteryMeter(Meter):
    """Whole-system draw from the battery; only meaningful while it is discharging."""

    kind = "power"

    def __init__(self, sources: list[tuple[Path, Path | None]], names: list[str]) -> None:
        self._sources = sources  # (power_now, None) or (current_now, voltage_now)
        self.name = "battery(" + "+".join(names) + ")"

    def read(self) -> float:
        total = 0.0
        for a, b in self._sources:
            # Some firmware reports discharge as a negative current.
            total += abs(int(_read_text(a))) / 1e6 if b is None else abs(int(_read_text(a)) * int(_read_text(b))) / 1e12
        return total

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> BatteryMeter | None:
        sources: list[tuple[Path, Path | None]] = []
        names = []
        batteries = sorted(sysfs("class", "power_supply").glob("BAT*"))
        for bat in batteries:
            status = _read_opt(bat / "status")
            if status != "Discharging":
                _note(notes, f"battery: {bat.name} is {(status or 'unknown').lower()} (measures only on battery)")
            elif (bat / "power_now").exists():
                sources.append((bat / "power_now", None))
                names.append(bat.name)
            elif (bat / "current_now").exists() and (bat / "voltage_now").exists():
                sources.append((bat / "current_now", bat / "voltage_now"))
                names.append(bat.name)
            else:
                _note(notes, f"battery: {bat.name} reports neither power_now nor current_now and voltage_now")
        if not batteries:
            _note(notes, "battery: none")
        if not sources:
            return None
        return _readable(cls(sources, names), notes, "battery: unreadable")


# --- The estimate -----------------------------------------------------------------------------------------------


def _watts_setting(value: float | None, env: str, default: float) -> float:
    if value is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise LocalmoeError(f"{env} must be a number of watts, got {raw!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise LocalmoeError(f"{env} must be a finite number of watts ≥ 0, got {value}")
    return value


def busy_cpu_seconds() -> float:
    """System-wide CPU seconds spent working, all cores together."""
    times = psutil.cpu_times()._asdict()
    # idle/iowait are not work; guest time is already inside user/nice on Linux; steal is time the hypervisor
    # ran someone else instead of us, so its energy is not ours.
    return sum(v for k, v in times.items() if k not in ("idle", "iowait", "guest", "guest_nice", "steal"))


class EstimateMeter(Meter):
    """Joules from CPU time when nothing measures them (see the module docstring for the figures)."""

    kind = "counter"
    measured = False

    def __init__(self, base_watts: float | None = None, watts_per_core: float | None = None) -> None:
        self.base_watts = _watts_setting(base_watts, BASE_WATTS_ENV, DEFAULT_BASE_WATTS)
        self.watts_per_core = _watts_setting(watts_per_core, WATTS_PER_CORE_ENV, DEFAULT_WATTS_PER_CORE)
        self.name = f"estimate(cpu-time: {self.base_watts:g} W + {self.watts_per_core:g} W/core)"
        self._t0 = time.perf_counter()
        self._cpu0 = busy_cpu_seconds()
        self._cores = psutil.cpu_count() or 1

    def read(self) -> float:
        wall = time.perf_counter() - self._t0
        # the kernel counts CPU time in ticks (10 ms): over a short answer the count can run ahead of the clock,
        # which would price more cores than the machine has; no more than every core busy all the time
        busy = min(max(0.0, busy_cpu_seconds() - self._cpu0), wall * self._cores)
        return self.base_watts * wall + self.watts_per_core * busy

    @classmethod
    def probe(cls, notes: list[str] | None = None) -> EstimateMeter:
        return cls()


# --- Composite and selection ------------------------------------------------------------------------------------


class CompositeMeter(Meter):
    """The sum of a CPU and GPU meters. Power-kind as soon as one part is: counter parts then report the
    average watts since the previous read."""

    def __init__(self, parts: Iterable[Meter], clock: Callable[[], float] = time.perf_counter) -> None:
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.measured = all(p.measured for p in self.parts)
        self.kind = "power" if any(p.kind == "power" for p in self.parts) else "counter"
        self._clock = clock
        self._t = clock()
        self._last = [p.read() if p.kind == "counter" else 0.0 for p in self.parts]
        self._watts = [0.0] * len(self.parts)
        self._lock = threading.Lock()  # the rates since the previous read are state: one read at a time

    def read(self) -> float:
        if self.kind == "counter":
            return sum(p.read() for p in self.parts)
        with self._lock:
            return self._rate_read()

    def _rate_read(self) -> float:
        t = self._clock()
        dt = t - self._t
        fresh = dt >= MIN_RATE_INTERVAL_S  # else keep the last rates rather than divide counter noise by ~0
        total = 0.0
        for i, part in enumerate(self.parts):
            if part.kind == "power":
                total += part.read()
                continue
            if fresh:
                value = part.read()
                self._watts[i] = (value - self._last[i]) / dt
                self._last[i] = value
            total += self._watts[i]
        if fresh:
            self._t = t
        return total

    def close(self) -> None:
        for part in self.parts:
            part.close()


_PROBES: dict[str, Callable[[list[str] | None], Meter | None]] = {
    "rapl": RaplMeter.probe,
    "nvml": NvmlMeter.probe,
    "amdgpu": AmdGpuMeter.probe,
    "powermetrics": PowermetricsMeter.probe,
    "battery": BatteryMeter.probe,
    "estimate": EstimateMeter.probe,
}
METER_NAMES = tuple(_PROBES)


def select_meter(prefer: str | None = None) -> tuple[Meter, list[str]]:
    """The best meter here and notes on what was skipped and why.

    Hardware first (powermetrics on macOS; else RAPL for the CPU plus NVML/amdgpu for GPUs, summed), then the
    battery, then the estimate. `prefer` names one meter and raises when it is unavailable.
    """
    notes: list[str] = []
    if prefer is not None:
        key = prefer.strip().lower()
        if key not in _PROBES:
            raise UsageError(f"unknown energy meter {prefer!r} (choose from {', '.join(METER_NAMES)})")
        meter = _PROBES[key](notes)  # RAPL's permission error propagates: it carries the fix
        if meter is None:
            raise LocalmoeError(f"energy meter {key!r} is not available here: {'; '.join(notes) or 'not found'}")
        return meter, notes

    if (pm := PowermetricsMeter.probe(notes)) is not None:
        return pm, notes  # it covers CPU and GPU together
    try:
        cpu = RaplMeter.probe(notes)
    except LocalmoeError as exc:
        notes.append(str(exc))
        cpu = None
    gpus = [m for m in (NvmlMeter.probe(notes), AmdGpuMeter.probe(notes)) if m is not None]
    if cpu is not None or gpus:
        if cpu is None:
            # RAPL is root-only on most Linux installs; a GPU meter alone would count a CPU answer (llama.cpp's
            # default) as the idle GPU's watts, so the CPU's share comes from the estimate and the sum is labelled
            # estimated
            notes.append("CPU energy is estimated from CPU time (no RAPL); the GPU's is measured")
            cpu = EstimateMeter()
        parts = [cpu] + gpus
        return (parts[0] if len(parts) == 1 else CompositeMeter(parts)), notes
    if (bat := BatteryMeter.probe(notes)) is not None:
        return bat, notes
    return EstimateMeter(), notes


# --- Sampling ---------------------------------------------------------------------------------------------------


class Sampler:
    """Reads a meter in a background thread between start() and stop(); usable as a context manager
    (the result is then in `.reading`).

    Counters give joules as last − first read; power meters are integrated with the trapezoid rule. A failed
    read in the background is skipped and counted in `failed_reads`, never raised into the generation.
    """

    def __init__(self, meter: Meter, hz: float = 10.0) -> None:
        if not hz > 0:
            raise ValueError(f"hz must be positive, got {hz}")
        self.meter = meter
        self.interval = 1.0 / hz
        self.reading: EnergyReading | None = None
        self.failed_reads = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Sampler:
        if self._thread is not None:
            raise RuntimeError("sampler already running")
        self._stop.clear()
        self._counter = self.meter.kind == "counter"
        self.failed_reads = 0
        self.reading = None
        self._samples: list[tuple[float, float]] = []
        self._peak: float | None = None
        self._joules = 0.0
        try:
            value = self.meter.read()
        except Exception as exc:  # NVML raises its own error type
            raise LocalmoeError(f"energy meter {self.meter.name} cannot be read: {exc}") from None
        self._t0 = self._t_last = self._t_rate = time.perf_counter()
        self._v0 = self._v_last = self._v_rate = value
        if not self._counter:
            self._record(0.0, value)
        self._thread = threading.Thread(target=self._run, name="localmoe-energy-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        due = self._t0 + self.interval
        while not self._stop.wait(max(0.0, due - time.perf_counter())):
            self._sample(final=False)
            due += self.interval
            now = time.perf_counter()
            if due < now:  # after a stall, resume the rhythm instead of sampling in a burst
                due = now + self.interval

    def _record(self, t: float, watts: float) -> None:
        self._samples.append((t, watts))
        if self._peak is None or watts > self._peak:
            self._peak = watts

    def _sample(self, final: bool) -> None:
        try:
            value = self.meter.read()
        except Exception:
            self.failed_reads += 1
            return
        t = time.perf_counter()
        if self._counter:
            self._t_last, self._v_last = t, value
            dt = t - self._t_rate
            # A sliver of an interval (stop() just after a tick) would turn counter granularity into a fake peak.
            if dt > 0 and (dt >= self.interval / 2 or (final and not self._samples)):
                self._record(t - self._t0, (value - self._v_rate) / dt)
                self._t_rate, self._v_rate = t, value
        else:
            self._joules += (self._v_last + value) / 2 * (t - self._t_last)
            self._t_last, self._v_last = t, value
            self._record(t - self._t0, value)

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise RuntimeError("sampler not started")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample(final=True)
        seconds = self._t_last - self._t0  # up to the last good read, so joules and seconds agree
        joules = max(0.0, self._v_last - self._v0 if self._counter else self._joules)
        self.reading = EnergyReading(
            joules=joules,
            seconds=seconds,
            avg_watts=joules / seconds if seconds > 0 else 0.0,
            peak_watts=self._peak,
            meter=self.meter.name,
            measured=self.meter.measured,
            samples=self._samples,
        )
        return self.reading

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.stop()


def measure_idle(meter: Meter, seconds: float = 2.0) -> float:
    """Average watts over `seconds` while the caller does nothing, for idle-baseline subtraction."""
    sampler = Sampler(meter).start()
    time.sleep(seconds)
    return sampler.stop().avg_watts


def net_joules(reading: EnergyReading, idle_watts: float) -> float:
    """The energy above the idle baseline (gross − idle × seconds), never below zero."""
    return max(0.0, reading.joules - idle_watts * reading.seconds)
