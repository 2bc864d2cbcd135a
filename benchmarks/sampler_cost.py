"""Decode tokens/s with the energy sampler running (10 Hz) vs not, same engine, prompt and run.

    .venv/bin/python benchmarks/sampler_cost.py [--reps 7] [--max-tokens 256] [--write]

Meters: the one auto-selection picks on this machine, and RAPL read from a fake powercap tree (what a sysfs read
per sample costs where RAPL exists). Runs alternate between off and on so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import write_section

from localmoe.engine import GenerationConfig
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.home import models
from localmoe.record import meters

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def fake_rapl(root: Path) -> None:
    dom = root / "class" / "powercap" / "intel-rapl:0"
    dom.mkdir(parents=True)
    (dom / "name").write_text("package-0\n")
    (dom / "energy_uj").write_text("123456789\n")
    (dom / "max_energy_range_uj").write_text("262143328850\n")


def rate(engine: LlamaCppEngine, meter: meters.Meter | None, max_tokens: int) -> float:
    sampler = meters.Sampler(meter, hz=10.0).start() if meter else None
    for _ in engine.stream(PROMPT, GenerationConfig(max_tokens=max_tokens, temperature=0.0)):
        pass
    if sampler:
        sampler.stop()
    return engine.stats.tokens_per_s or 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    engine = LlamaCppEngine(models.default_model().path)
    engine.load()
    auto, _ = meters.select_meter()
    with tempfile.TemporaryDirectory() as tmp:
        fake_rapl(Path(tmp))
        os.environ[meters.SYSFS_ENV] = tmp
        rapl, _ = meters.select_meter("rapl")
        rows = []
        for label, meter in ((auto.name, auto), ("rapl (fake powercap tree)", rapl)):
            off, on = [], []
            for _ in range(args.reps):
                off.append(rate(engine, None, args.max_tokens))
                on.append(rate(engine, meter, args.max_tokens))
            mo, mn = statistics.median(off), statistics.median(on)
            rows.append((label, mo, mn, off, on))
            print(f"{label}: off {mo:.1f} tok/s, on {mn:.1f} tok/s, ratio {mn / mo:.4f}")
    if args.write:
        table = "\n".join(f"| {label} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | "
                          f"{', '.join(f'{x:.0f}' for x in off)} / {', '.join(f'{x:.0f}' for x in on)} |"
                          for label, mo, mn, off, on in rows)
        write_section("sampler_cost", f"""
## Energy sampler overhead (10 Hz, SmolLM2-135M Q4_1 decode)

Command: `.venv/bin/python benchmarks/sampler_cost.py --reps {args.reps} --max-tokens {args.max_tokens} --write`
({time.strftime('%Y-%m-%d')}, 2 cores, greedy, off/on alternating). Target: on/off ≥ 0.99.

| meter | off tok/s | on tok/s | on/off | runs off / on |
|---|---|---|---|---|
{table}
""")


if __name__ == "__main__":
    main()
