"""Energy meters against fake sysfs trees written here ($LOCALMOE_SYSFS_ROOT), and the sampler on top of them."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import types
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from localmoe.errors import LocalmoeError, UsageError
from localmoe.record import meters
from localmoe.record.meters import (
    AmdGpuMeter,
    BatteryMeter,
    CompositeMeter,
    EnergyReading,
    EstimateMeter,
    Meter,
    NvmlMeter,
    RaplMeter,
    Sampler,
    measure_idle,
    net_joules,
    parse_powermetrics,
    select_meter,
)


@pytest.fixture(autouse=True)
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake /sys; NVML absent whatever this machine has; no watt overrides from the environment."""
    r = tmp_path / "sys"
    r.mkdir()
    monkeypatch.setenv(meters.SYSFS_ENV, str(r))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    monkeypatch.delenv(meters.BASE_WATTS_ENV, raising=False)
    monkeypatch.delenv(meters.WATTS_PER_CORE_ENV, raising=False)
    return r


def put(path: Path, value: object) -> Path:
    # Atomic, as the kernel's reads are: a reader never sees a half-written number.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)
    return path


def rapl(root: Path, idx: str, name: str, uj: int, max_range: int | None = 2**32, prefix: str = "intel-rapl") -> Path:
    d = root / "class" / "powercap" / f"{prefix}:{idx}"
    put(d / "name", name)
    if max_range is not None:
        put(d / "max_energy_range_uj", max_range)
    return put(d / "energy_uj", uj)


def battery(root: Path, name: str = "BAT0", status: str = "Discharging", **values: int) -> Path:
    d = root / "class" / "power_supply" / name
    put(d / "status", status)
    for key, value in values.items():
        put(d / key, value)
    return d


def amd_card(root: Path, card: str, file: str, microwatts: int) -> Path:
    return put(root / "class" / "drm" / card / "device" / "hwmon" / "hwmon3" / file, microwatts)


def add(path: Path, delta: int) -> None:
    put(path, int(path.read_text()) + delta)


class FakeMeter(Meter):
    """A meter whose readings the test dictates: `fn()` gives the value, and may raise."""

    def __init__(self, kind: str, fn) -> None:
        self.kind, self.name, self._fn = kind, f"fake-{kind}", fn

    def read(self) -> float:
        return self._fn()


# --- RAPL -------------------------------------------------------------------------------------------------------


def test_rapl_sums_packages_and_dram_but_not_core_psys_or_mmio(root: Path) -> None:
    pkg0 = rapl(root, "0", "package-0", 1_000_000)
    core0 = rapl(root, "0:0", "core", 500_000)
    dram0 = rapl(root, "0:1", "dram", 7)
    pkg1 = rapl(root, "1", "package-1", 0)
    dram1 = rapl(root, "1:0", "dram", 0)
    psys = rapl(root, "2", "psys", 0)
    mmio = rapl(root, "0", "package-0", 0, prefix="intel-rapl-mmio")

    m = RaplMeter.probe()
    assert m is not None and m.kind == "counter" and m.measured
    assert m.name == "rapl(package-0+package-1+dram)"
    assert m.read() == 0.0

    add(pkg0, 10_000_000)  # +10 J
    add(pkg1, 3_000_000)  # +3 J
    add(dram0, 2_000_000)  # +2 J
    add(dram1, 500_000)  # +0.5 J
    for inside in (core0, psys, mmio):  # all inside or duplicates of the packages: never counted
        add(inside, 100_000_000)
    assert m.read() == pytest.approx(15.5)
    add(pkg0, 1_250_000)
    assert m.read() == pytest.approx(16.75)  # cumulative since the probe


def test_rapl_counter_wraps_around_its_range(root: Path) -> None:
    rng = 262_143_328_850  # a real package's max_energy_range_uj
    pkg = rapl(root, "0", "package-0", rng - 1_000_000, max_range=rng)
    m = RaplMeter.probe()
    assert m is not None
    put(pkg, 500_000)  # wrapped: 1 J to the top, then 0.5 J
    assert m.read() == pytest.approx(1.5)
    put(pkg, 2_500_000)
    assert m.read() == pytest.approx(3.5)


def test_rapl_wrap_without_a_range_counts_nothing_rather_than_garbage(root: Path) -> None:
    pkg = rapl(root, "0", "package-0", 9_000_000, max_range=None)
    m = RaplMeter.probe()
    assert m is not None
    put(pkg, 1_000_000)
    assert m.read() == 0.0
    put(pkg, 3_000_000)
    assert m.read() == pytest.approx(2.0)


def deny_energy_uj(monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores chmod 000, so fail the read the way open() does for a non-root user on Linux ≥ 5.10.
    real = meters._read_text

    def read(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(meters, "_read_text", read)


def test_rapl_permission_denied_says_how_to_fix_it_and_selection_falls_back(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rapl(root, "0", "package-0", 1_000_000)
    deny_energy_uj(monkeypatch)

    with pytest.raises(LocalmoeError) as err:
        RaplMeter.probe()
    msg = str(err.value)
    assert "\n" not in msg
    assert "CVE-2020-8694" in msg and "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj" in msg

    with pytest.raises(LocalmoeError, match="chmod o\\+r"):
        select_meter("rapl")

    battery(root, power_now=9_000_000)
    meter, notes = select_meter()
    assert isinstance(meter, BatteryMeter) and meter.read() == pytest.approx(9.0)
    assert msg in notes


def test_rapl_absent_is_none_with_a_note(root: Path) -> None:
    notes: list[str] = []
    assert RaplMeter.probe(notes) is None
    assert len(notes) == 1 and notes[0].startswith("RAPL:")


# --- NVML -------------------------------------------------------------------------------------------------------


def test_nvml_absent_is_none_with_a_note() -> None:
    notes: list[str] = []
    assert NvmlMeter.probe(notes) is None
    assert notes == ["NVML: nvidia-ml-py not installed"]


def fake_pynvml(energy_mj: list[int] | None, power_mw: list[int]) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def energy(h: int) -> int:
        if energy_mj is None:
            raise NVMLError("Not Supported")
        return energy_mj[h]

    mod.NVMLError = NVMLError
    mod.shutdowns = 0
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(power_mw)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    mod.nvmlDeviceGetPowerUsage = lambda h: power_mw[h]

    def shutdown() -> None:
        mod.shutdowns += 1

    mod.nvmlShutdown = shutdown
    return mod


def test_nvml_prefers_the_energy_counter_summed_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    energy = [5_000_000, 7_000_000]
    fake = fake_pynvml(energy, [100_000, 50_000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    m = NvmlMeter.probe()
    assert m is not None and m.kind == "counter" and m.name == "nvml(GPU 0+1)"
    assert m.read() == 0.0
    energy[0] += 3_000
    energy[1] += 1_500
    assert m.read() == pytest.approx(4.5)
    m.close()
    assert fake.shutdowns == 1


def test_nvml_falls_back_to_power_without_an_energy_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None, [123_400, 56_600]))
    m = NvmlMeter.probe()
    assert m is not None and m.kind == "power"
    assert m.read() == pytest.approx(180.0)


# --- amdgpu, battery --------------------------------------------------------------------------------------------


def test_amdgpu_hwmon_power_in_watts(root: Path) -> None:
    notes: list[str] = []
    assert AmdGpuMeter.probe(notes) is None and notes[0].startswith("amdgpu:")

    amd_card(root, "card0", "power1_average", 45_000_000)
    amd_card(root, "card0-DP-1", "power1_average", 99_000_000)  # a connector, not a GPU
    m = AmdGpuMeter.probe()
    assert m is not None and m.kind == "power" and m.name == "amdgpu(card0)"
    assert m.read() == pytest.approx(45.0)

    amd_card(root, "card1", "power1_input", 30_500_000)  # newer kernels have only power1_input
    m = AmdGpuMeter.probe()
    assert m is not None and m.name == "amdgpu(card0+card1)"
    assert m.read() == pytest.approx(75.5)


def test_battery_absent_or_charging_is_none(root: Path) -> None:
    notes: list[str] = []
    assert BatteryMeter.probe(notes) is None
    assert notes == ["battery: none"]

    battery(root, status="Charging", power_now=20_000_000)
    battery(root, "BAT1", status="Full", power_now=0)
    notes = []
    assert BatteryMeter.probe(notes) is None
    assert notes == [
        "battery: BAT0 is charging (measures only on battery)",
        "battery: BAT1 is full (measures only on battery)",
    ]


def test_battery_discharging_gives_watts(root: Path) -> None:
    d = battery(root, power_now=12_500_000)
    m = BatteryMeter.probe()
    assert m is not None and m.kind == "power" and m.name == "battery(BAT0)"
    assert m.read() == pytest.approx(12.5)
    put(d / "power_now", 8_000_000)
    assert m.read() == pytest.approx(8.0)


def test_battery_without_power_now_multiplies_current_and_voltage(root: Path) -> None:
    # Some firmware reports the discharge current as negative.
    battery(root, current_now=-1_500_000, voltage_now=11_400_000)
    m = BatteryMeter.probe()
    assert m is not None
    assert m.read() == pytest.approx(17.1)


# --- the estimate -----------------------------------------------------------------------------------------------

Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_estimate_defaults_are_labelled_and_at_least_base_load() -> None:
    m = EstimateMeter.probe()
    assert m.measured is False and m.kind == "counter"
    assert m.name == "estimate(cpu-time: 5 W + 4 W/core)"
    time.sleep(0.05)
    assert m.read() >= 5.0 * 0.05


def test_estimate_integrates_busy_cpu_time_with_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(meters.BASE_WATTS_ENV, "7")
    monkeypatch.setenv(meters.WATTS_PER_CORE_ENV, "3.5")
    now = Times(100.0, 1.0, 20.0, 500.0, 3.0, 0.5, 0.5, 0.2, 4.0, 0.0)
    monkeypatch.setattr(psutil, "cpu_times", lambda: now)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 10**9)  # room for 2.6 busy seconds in 20 ms

    before = time.perf_counter()
    m = EstimateMeter()
    after_start = time.perf_counter()
    assert m.name == "estimate(cpu-time: 7 W + 3.5 W/core)"
    # 2 s of user time (1 s of it a guest's, already inside user), 0.5 s system, 0.1 s irq: 2.6 busy seconds;
    # idle, iowait and steal are not our work.
    now = Times(102.0, 1.0, 20.5, 510.0, 4.0, 0.6, 0.5, 1.2, 5.0, 0.0)
    time.sleep(0.02)
    before_read = time.perf_counter()
    joules = m.read()
    after = time.perf_counter()
    assert 7 * (before_read - after_start) + 3.5 * 2.6 <= joules <= 7 * (after - before) + 3.5 * 2.6 + 1e-9

    # on 2 cores, 2.6 busy seconds counted within 20 ms are tick rounding: never more than both cores all along
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    now = Times(100.0, 1.0, 20.0, 500.0, 3.0, 0.5, 0.5, 0.2, 4.0, 0.0)
    before = time.perf_counter()
    m = EstimateMeter()
    now = Times(102.0, 1.0, 20.5, 510.0, 4.0, 0.6, 0.5, 1.2, 5.0, 0.0)
    time.sleep(0.02)
    joules = m.read()
    wall = time.perf_counter() - before
    assert joules <= (7 + 3.5 * 2) * wall + 1e-9

    assert EstimateMeter(base_watts=2, watts_per_core=1).name == "estimate(cpu-time: 2 W + 1 W/core)"
    monkeypatch.setenv(meters.BASE_WATTS_ENV, "lots")
    with pytest.raises(LocalmoeError, match="LOCALMOE_BASE_WATTS"):
        EstimateMeter()


# --- composite and selection ------------------------------------------------------------------------------------


def test_composite_turns_counters_into_watts_when_a_part_is_power(root: Path) -> None:
    pkg = rapl(root, "0", "package-0", 0)
    amd_card(root, "card0", "power1_average", 45_000_000)
    clock = [100.0]
    m = CompositeMeter([RaplMeter.probe(), AmdGpuMeter.probe()], clock=lambda: clock[0])
    assert m.kind == "power" and m.measured and m.name == "rapl(package-0)+amdgpu(card0)"
    clock[0] += 0.5
    add(pkg, 10_000_000)  # 10 J in 0.5 s: 20 W
    assert m.read() == pytest.approx(65.0)
    clock[0] += 0.001  # too short to tell a rate from counter granularity: keep the last one
    add(pkg, 1_000_000)
    assert m.read() == pytest.approx(65.0)
    clock[0] += 0.1  # 1 J (from before) + 0.5 J over 0.101 s
    add(pkg, 500_000)
    assert m.read() == pytest.approx(1.5 / 0.101 + 45.0)


def test_composite_of_counters_stays_a_counter(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = rapl(root, "0", "package-0", 0)
    energy = [0]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy, [0]))
    meter, notes = select_meter()
    assert isinstance(meter, CompositeMeter) and meter.kind == "counter"
    assert meter.name == "rapl(package-0)+nvml(GPU 0)"
    add(pkg, 2_000_000)
    energy[0] += 3_000
    assert meter.read() == pytest.approx(5.0)


def test_select_meter_on_an_empty_tree_is_the_estimate_with_reasons() -> None:
    meter, notes = select_meter()
    assert isinstance(meter, EstimateMeter) and meter.measured is False
    assert "NVML: nvidia-ml-py not installed" in notes
    assert [n.split(":")[0] for n in notes] == ["RAPL", "NVML", "amdgpu", "battery"]


def test_select_meter_prefers_hardware(root: Path) -> None:
    rapl(root, "0", "package-0", 0)
    battery(root, power_now=9_000_000)
    meter, notes = select_meter()
    assert isinstance(meter, RaplMeter)
    assert not any(n.startswith("RAPL") for n in notes)

    amd_card(root, "card0", "power1_average", 45_000_000)
    meter, _ = select_meter()
    assert isinstance(meter, CompositeMeter) and meter.kind == "power"


def test_select_meter_without_rapl_adds_the_cpu_estimate_to_a_gpu_meter(root: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU answer on a machine whose only sensor is the GPU's must not cost the idle GPU's watts alone."""
    energy = [0]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy, [0]))
    monkeypatch.setenv("LOCALMOE_BASE_WATTS", "0")
    monkeypatch.setenv("LOCALMOE_WATTS_PER_CORE", "10")
    busy = [100.0]
    monkeypatch.setattr(meters, "busy_cpu_seconds", lambda: busy[0])
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 10**9)  # 2 busy seconds fit in the instant
    meter, notes = select_meter()
    assert "CPU energy is estimated from CPU time (no RAPL); the GPU's is measured" in notes
    assert isinstance(meter, CompositeMeter) and meter.kind == "counter" and meter.measured is False
    assert meter.name.startswith("estimate(cpu-time") and meter.name.endswith("+nvml(GPU 0)")
    start = meter.read()
    busy[0] += 2.0  # two busy CPU seconds: 20 J at 10 W per core
    energy[0] += 3_000  # 3 J on the GPU
    assert meter.read() - start == pytest.approx(23.0)
    from localmoe.bench.report import energy_note

    note = energy_note({"meter": meter.name, "measured": meter.measured})
    assert "PARTLY ESTIMATED" in note and "GPU's measured" in note
    assert "ESTIMATED (no power sensor" in energy_note({"meter": EstimateMeter().name, "measured": False})

    amd_card(root, "card0", "power1_average", 45_000_000)
    monkeypatch.delitem(sys.modules, "pynvml")
    meter, _ = select_meter()
    assert isinstance(meter, CompositeMeter) and meter.kind == "power" and meter.measured is False
    assert [type(p) for p in meter.parts] == [EstimateMeter, AmdGpuMeter]


def test_select_meter_prefer(root: Path) -> None:
    assert isinstance(select_meter("estimate")[0], EstimateMeter)
    with pytest.raises(UsageError, match="unknown energy meter"):
        select_meter("joulemeter")
    with pytest.raises(LocalmoeError, match="'battery' is not available here: battery: none"):
        select_meter("battery")
    battery(root, power_now=9_000_000)
    assert isinstance(select_meter("Battery")[0], BatteryMeter)


def test_powermetrics_parsing_and_absence() -> None:
    apple = "CPU Power: 1234 mW\nGPU Power: 56 mW\nANE Power: 0 mW\nCombined Power (CPU + GPU + ANE): 1290 mW\n"
    assert parse_powermetrics(apple) == pytest.approx(1.29)
    assert parse_powermetrics("CPU Power: 1000 mW\nGPU Power: 500 mW\n") == pytest.approx(1.5)
    assert parse_powermetrics("Intel energy model derived package power (CPUs+GT+SA): 3.45W\n") == pytest.approx(3.45)
    assert parse_powermetrics("nothing here") is None
    if sys.platform != "darwin":
        assert meters.PowermetricsMeter.probe() is None


# --- the sampler ------------------------------------------------------------------------------------------------


def test_sampler_over_rapl_at_20_watts(root: Path) -> None:
    pkg = rapl(root, "0", "package-0", 0)
    t0 = time.perf_counter()
    done = threading.Event()

    def advance() -> None:  # the "CPU": 20 W, i.e. 20 µJ per µs
        while not done.is_set():
            put(pkg, int(20e6 * (time.perf_counter() - t0)))
            time.sleep(0.002)

    writer = threading.Thread(target=advance)
    writer.start()
    try:
        meter = RaplMeter.probe()
        assert meter is not None
        with Sampler(meter, hz=10) as sampler:
            time.sleep(0.55)
    finally:
        done.set()
        writer.join()

    r = sampler.reading
    assert r is not None and r.meter == "rapl(package-0)" and r.measured
    # Bounds that two busy cores cannot break: a sleep only ever overruns, and the writer thread may lag the
    # clock by a few of its 2 ms steps, or more when it is not scheduled (0.1 s allowed).
    assert 0.55 - 0.01 <= r.seconds < 0.55 + 0.5
    assert r.joules == pytest.approx(20 * r.seconds, abs=20 * 0.1)
    assert r.avg_watts == pytest.approx(20, abs=20 * 0.1 / r.seconds)
    assert len(r.samples) >= 5 and len(r.samples) / r.seconds >= 5.0
    assert statistics.median(w for _, w in r.samples) == pytest.approx(20, rel=0.25)
    assert r.peak_watts is not None and r.peak_watts >= statistics.median(w for _, w in r.samples)
    times = [t for t, _ in r.samples]
    assert times == sorted(set(times))


def test_sampler_integrates_power_with_the_trapezoid_rule() -> None:
    # P = 10 W/s × t: a ramp, which the trapezoid rule integrates exactly: E = 5 (b² − a²).
    zero = time.perf_counter()
    meter = FakeMeter("power", lambda: 10.0 * (time.perf_counter() - zero))
    r = Sampler(meter, hz=50).start()
    time.sleep(0.2)
    reading = r.stop()
    a = reading.samples[0][1] / 10.0
    b = a + reading.seconds
    assert reading.samples[0][0] == 0.0
    assert reading.joules == pytest.approx(5 * (b * b - a * a), rel=1e-3)
    assert reading.peak_watts == pytest.approx(10 * b, rel=1e-3)
    assert len(reading.samples) >= 8


def test_sampler_on_a_constant_battery_and_measure_idle(root: Path) -> None:
    battery(root, power_now=7_000_000)
    meter = BatteryMeter.probe()
    assert meter is not None
    assert measure_idle(meter, seconds=0.15) == pytest.approx(7.0)
    with Sampler(meter, hz=20) as s:
        time.sleep(0.1)
    assert s.reading is not None
    assert s.reading.joules == pytest.approx(7.0 * s.reading.seconds)
    assert s.reading.peak_watts == pytest.approx(7.0)


def test_sampler_stop_is_prompt_and_a_short_run_still_has_a_rate() -> None:
    counter = FakeMeter("counter", lambda: 3.0 * time.perf_counter())
    s = Sampler(counter, hz=0.05).start()  # the next tick would be 20 s away
    time.sleep(0.02)
    t = time.perf_counter()
    reading = s.stop()
    assert time.perf_counter() - t < 5.0  # far below the 20 s a stop waiting for the tick would take, even busy
    assert reading.avg_watts == pytest.approx(3.0, rel=1e-3)
    assert len(reading.samples) == 1 and reading.peak_watts == pytest.approx(3.0, rel=1e-3)


def test_sampler_skips_failed_reads() -> None:
    state = {"fail": False, "value": 1.0}

    def read() -> float:
        if state["fail"]:
            raise OSError(5, "Input/output error")
        return state["value"]

    s = Sampler(FakeMeter("counter", read), hz=50).start()
    state["fail"] = True
    time.sleep(0.1)
    state.update(fail=False, value=3.0)
    reading = s.stop()
    assert s.failed_reads >= 2
    assert reading.joules == pytest.approx(2.0)

    state["fail"] = True
    with pytest.raises(LocalmoeError, match="fake-counter cannot be read"):
        Sampler(FakeMeter("counter", read)).start()


def test_net_joules_subtracts_idle_and_floors_at_zero() -> None:
    r = EnergyReading(joules=30.0, seconds=2.0, avg_watts=15.0, peak_watts=20.0, meter="x", measured=True)
    assert net_joules(r, 10.0) == pytest.approx(10.0)
    assert net_joules(r, 20.0) == 0.0


# --- how the reading is shown -----------------------------------------------------------------------------------


def _reading_from_the_selected_meter(pkg: Path | None = None) -> EnergyReading:
    """What `select_meter()` picks here, read by a Sampler over 0.2 s while (with `pkg`) a thread advances that
    RAPL counter at 10 W."""
    meter, _ = select_meter()
    done = threading.Event()

    def advance() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            put(pkg, int(10e6 * (time.perf_counter() - t0)))
            time.sleep(0.002)

    writer = threading.Thread(target=advance) if pkg is not None else None
    try:
        with Sampler(meter, hz=20) as sampler:
            if writer is not None:
                writer.start()
            time.sleep(0.2)
    finally:
        done.set()
        if writer is not None:
            writer.join()
    assert sampler.reading is not None
    return sampler.reading


def test_the_stats_line_marks_estimated_joules_and_only_those(root: Path) -> None:
    """The "~" in the CLI's and the TUI's stats line: absent for a RAPL counter, present for the estimate."""
    from localmoe.chat.display import joules_text, stats_line
    from localmoe.engine import GenerationStats

    stats = GenerationStats(completion_tokens=8)
    estimate = _reading_from_the_selected_meter()  # the empty tree: no sensor
    assert estimate.measured is False and estimate.meter.startswith("estimate") and estimate.joules > 0
    line = stats_line("m", stats, energy=estimate)
    assert line.endswith(f" · ~{estimate.joules:.1f} J")
    assert joules_text(estimate.joules, estimate.measured).startswith("~")

    pkg = rapl(root, "0", "package-0", 0)
    measured = _reading_from_the_selected_meter(pkg)
    assert measured.measured is True and measured.meter == "rapl(package-0)"
    # from the counter, not the clock: no more than the counter advanced in all (the writer thread may start late
    # on two busy cores, so a rate check would be flaky)
    assert 0 < measured.joules <= int(pkg.read_text()) / 1e6
    line = stats_line("m", stats, energy=measured)
    assert line.endswith(f" · {measured.joules:.1f} J") and "~" not in line
