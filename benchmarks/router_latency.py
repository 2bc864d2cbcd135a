"""Router decision latency per strategy (model files already opened), the shipped router's held-out quality, and
the learned-vs-features comparison on 50 further splits (seeds 100-149, never used to design the router).

    .venv/bin/python benchmarks/router_latency.py [--n 200] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import write_section

from localmoe.home import models
from localmoe.routing import train as router_train
from localmoe.routing.router import Router, TokenEmbedder, trained_path

FRESH_SEEDS = tuple(range(100, 150))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    prompts = [r["question"] for r in router_train.shipped_labels()][: args.n]
    rows = []
    for strategy in ("features", "learned", "probe", "cascade"):
        router = Router(strategy)
        t0 = time.perf_counter()
        router.route(prompts[0])  # open the embedder's files once, as a running assistant has
        first = (time.perf_counter() - t0) * 1000
        times = []
        for p in prompts:
            t0 = time.perf_counter()
            router.route(p)
            times.append((time.perf_counter() - t0) * 1000)
        p50, p95 = statistics.median(times), float(np.percentile(times, 95))
        rows.append((strategy, p50, p95, first))
        print(f"{strategy}: p50 {p50:.2f} ms, p95 {p95:.2f} ms over {len(times)} prompts; first {first:.0f} ms")
    ev = Router().trained["evaluation"]
    print(f"held-out AUC: {ev['auc']}")
    fresh = router_train.train(router_train.shipped_labels(), TokenEmbedder(models.default_model().path),
                               seeds=FRESH_SEEDS)["evaluation"]["split_auc"]
    learned, feats = np.array(fresh["learned"]), np.array(fresh["features"])
    diff = learned - feats
    se, wins = diff.std(ddof=1) / np.sqrt(diff.size), int((diff > 0).sum())
    fresh_line = (f"learned {learned.mean():.4f} vs features {feats.mean():.4f} (difference {diff.mean():+.4f} ± "
                  f"{se:.4f} standard error; learned ahead on {wins} of {diff.size} splits)")
    print(f"{len(FRESH_SEEDS)} fresh splits: {fresh_line}")
    if args.write:
        lat = "\n".join(f"| {s} | {p50:.2f} | {p95:.2f} | {first:.0f} |" for s, p50, p95, first in rows)
        quality = "\n".join(f"| {s} | {ev['auc'][s]:.3f} | {ev['large_share'][s]:.0%} | {ev['apgr'][s]:.3f} |"
                            for s in ev["auc"])
        write_section("router", f"""
## Router: decision latency and held-out quality

Command: `.venv/bin/python benchmarks/router_latency.py --n {args.n} --write` ({time.strftime('%Y-%m-%d')},
2 cores; the learned strategy's embedder already open). Target: p50 ≤ 15 ms for `features` and `learned`.
`probe` and `cascade` have the small model read the question (the cascade judges the answer with those signals
later), so theirs is a prompt evaluation on the small model; their "first" includes loading its second copy.
"First" is a process's first decision, which for `learned` loads the small model's tokenizer (llama.cpp, vocab only).
The cascade's held-out AUC below is after the answer: it scores the labelled answer's confidence with the probe's
signals.

| strategy | p50 ms | p95 ms | first decision ms |
|---|---|---|---|
{lat}

Held-out quality: mean over {ev['splits']} stratified 75/25 splits ({ev['n_test']} of
{ev['n_train'] + ev['n_test']} questions held out each time) of the shipped labels: the `router-train` suite answered
by the embedded SmolLM2 (`benchmarks/label_router_suite.py`; small-tier accuracy {ev['small_accuracy']:.1%}). Read
from `{trained_path().name}` (made by `localmoe router train --shipped --out assets/router/router.json`). APGR
assumes a large tier that answers every question right (no real large model ships). Per-split AUC:
{', '.join(f"{k} {[f'{a:.3f}' for a in v]}" for k, v in ev['split_auc'].items())}.
On these five splits of {ev['n_test']} questions the means of `learned` and `features` differ by
{ev['auc']['learned'] - ev['auc']['features']:+.4f}; on {len(FRESH_SEEDS)} further splits (seeds
{FRESH_SEEDS[0]}-{FRESH_SEEDS[-1]}, never used to design or tune the router), mean held-out AUC: {fresh_line}.

| strategy | AUC | large share (balanced) | APGR |
|---|---|---|---|
{quality}
""")


if __name__ == "__main__":
    main()
