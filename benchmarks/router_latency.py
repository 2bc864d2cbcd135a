"""Router decision latency per strategy (model files already opened), and the shipped router's held-out quality.

    .venv/bin/python benchmarks/router_latency.py [--n 200] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import write_section

from localmoe import router_train
from localmoe.router import Router, trained_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    prompts = [r["question"] for r in router_train.shipped_labels()][: args.n]
    rows = []
    for strategy in ("features", "learned", "cascade"):
        router = Router(strategy)
        router.route(prompts[0])  # open the embedder's files once, as a running assistant has
        times = []
        for p in prompts:
            t0 = time.perf_counter()
            router.route(p)
            times.append((time.perf_counter() - t0) * 1000)
        p50, p95 = statistics.median(times), float(np.percentile(times, 95))
        rows.append((strategy, p50, p95))
        print(f"{strategy}: p50 {p50:.2f} ms, p95 {p95:.2f} ms over {len(times)} prompts")
    ev = Router().trained["evaluation"]
    print(f"held-out AUC: {ev['auc']}")
    if args.write:
        lat = "\n".join(f"| {s} | {p50:.2f} | {p95:.2f} |" for s, p50, p95 in rows)
        quality = "\n".join(f"| {s} | {ev['auc'][s]:.3f} | {ev['large_share'][s]:.0%} | {ev['apgr'][s]:.3f} |"
                            for s in ev["auc"])
        write_section("router", f"""
## Router: decision latency and held-out quality

Command: `.venv/bin/python benchmarks/router_latency.py --n {args.n} --write` ({time.strftime('%Y-%m-%d')},
2 cores; the learned strategy's embedder already open). Target: p50 ≤ 15 ms for `features` and `learned`.
The cascade decides before answering only that the small model goes first (its real cost is the small answer).

| strategy | p50 ms | p95 ms |
|---|---|---|
{lat}

Held-out quality: mean over {ev['splits']} stratified 75/25 splits ({ev['n_test']} of
{ev['n_train'] + ev['n_test']} questions held out each time) of the shipped labels: the `router-train` suite answered
by the embedded SmolLM2 (`benchmarks/label_router_suite.py`; small-tier accuracy {ev['small_accuracy']:.1%}). Read
from `{trained_path().name}` (made by `localmoe router train --shipped --out assets/router/router.json`). APGR
assumes a large tier that answers every question right (no real large model ships). Per-split AUC:
{', '.join(f"{k} {[f'{a:.3f}' for a in v]}" for k, v in ev['split_auc'].items())}.

| strategy | AUC | large share (balanced) | APGR |
|---|---|---|---|
{quality}
""")


if __name__ == "__main__":
    main()
