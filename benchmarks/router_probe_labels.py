"""Adds the probe's signals (the small model's reading of each question: first-token entropy and top probability,
prompt mean log-probability; `localmoe/routing/probe.py`) to a label file, in place, so that `router train`
fits the `probe` strategy without reading every shipped question again. Signals come from the embedded model.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_probe_labels.py assets/router/labels.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from localmoe.home import models
from localmoe.routing.probe import Prober


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("labels", type=Path)
    args = ap.parse_args()
    lines = args.labels.read_text(encoding="utf-8").splitlines()
    prober = Prober(models.default_model().path)
    out, t0 = [], time.time()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        sig = prober.signals(row["question"])
        row["probe"] = None if sig is None else [round(float(v), 6) for v in sig]
        out.append(json.dumps(row))
        print(f"\r{n}/{len(lines)}", end="", file=sys.stderr)
    args.labels.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"\n{len(out)} rows in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
