"""What each named preference of the shipped router does on questions it was not trained on: the share of
questions it sends large and the share of the small model's failures among them, per label file.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_preference_shares.py \
        benchmarks/router_eval_labels.jsonl benchmarks/router_eval_labels_audited.jsonl

The probe reads each question on the embedded model (about 0.2 s each here); a fresh LOCALMOE_HOME is advised, so
that no user router or settings are loaded."""

from __future__ import annotations

import argparse
import json

import numpy as np

from localmoe.routing.router import Router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", nargs="+", help="label files (question, small_correct per line)")
    ap.add_argument("--strategy", default="probe")
    args = ap.parse_args()
    router = Router(args.strategy, tiers=(None, None))
    prefs = router.preferences(args.strategy)
    scores: dict[str, float] = {}
    print("| labels | preference | threshold | sent large | small failures sent large | accuracy if large is right |")
    print("|---|---|---|---|---|---|")
    for path in args.labels:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        for r in rows:
            if r["question"] not in scores:
                scores[r["question"]] = router.routed_score(r["question"], args.strategy)
        s = np.array([scores[r["question"]] for r in rows])
        wrong = np.array([1 - int(r["small_correct"]) for r in rows])
        for name, t in prefs.items():
            large = s >= t
            print(f"| {path.rsplit('/', 1)[-1]} ({len(rows)}) | {name} | {t:.3f} | {large.mean():.2f} | "
                  f"{large[wrong == 1].mean():.2f} | {np.where(large, 1, 1 - wrong).mean():.3f} |")
    router.close()


if __name__ == "__main__":
    main()
