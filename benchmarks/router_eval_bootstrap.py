"""Bootstrap intervals for the router's AUC on the independent evaluation set: the shipped router's strategy (by
default `learned`; `--strategy probe` has the small model read every question, and adds `learned` beside it;
`--strategy cascade` scores each labelled answer as the cascade escalates on it, and adds `probe` and `learned`), an
older router file beside it, and the digit-count baseline, all on the same resamples (paired). An older router's
probe is fed the signals of today's probe (today's system prompt), whatever it was fitted on.

    .venv/bin/python benchmarks/router_eval_bootstrap.py [--strategy learned|probe|cascade] [--old OLD.json] [--n 1000]

(`git show REV:assets/router/router.json > old.json` gives an older router.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import Router

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("benchmarks/router_eval_labels.jsonl", "benchmarks/router_eval_labels_audited.jsonl")


def scores(router_file: Path, rows: list[dict], strategy: str = "learned") -> np.ndarray:
    router = Router(strategy=strategy, router_file=router_file)
    try:
        if strategy == "cascade":  # after the labelled answer, with its confidence
            return np.array([router.cascade_score(r["mean_logprob"], r["min_logprob"], r["question"]) for r in rows])
        return np.array([router.route(r["question"]).score for r in rows])
    finally:
        router.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, help="an older router.json to compare with")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--strategy", default="learned", choices=["learned", "probe", "cascade"])
    args = ap.parse_args()
    main_s = args.strategy
    shipped = ROOT / "assets" / "router" / "router.json"
    for name in LABELS:
        rows = router_train.read_labels(ROOT / name)
        questions = [r["question"] for r in rows]
        y = np.array([r["small_wrong"] for r in rows])
        runs = {main_s: scores(shipped, rows, main_s)}
        if main_s == "cascade":
            runs["probe"] = scores(shipped, rows, "probe")
        if main_s != "learned":
            runs["learned"] = scores(shipped, rows)
        runs["digits"] = np.array([router_eval.BASELINES["digits"](q) for q in questions], dtype=np.float64)
        if args.old:
            runs["before"] = scores(args.old, rows, main_s)
        rng = np.random.default_rng(0)
        boot: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.n):
            i = rng.integers(0, len(y), len(y))
            if len(set(y[i])) == 2:
                for k, s in runs.items():
                    boot[k].append(router_eval.auc(s[i], y[i]))
        b = {k: np.array(v) for k, v in boot.items()}
        lo, hi = np.percentile(b[main_s], [2.5, 97.5])
        print(f"{name}: {main_s} AUC {router_eval.auc(runs[main_s], y):.3f} (95% {lo:.2f}-{hi:.2f}, "
              f"se {b[main_s].std():.3f})")
        for other in [k for k in runs if k != main_s]:
            d = b[main_s] - b[other]
            lo, hi = np.percentile(d, [2.5, 97.5])
            print(f"  {main_s} minus {other} ({router_eval.auc(runs[other], y):.3f}): {d.mean():+.3f} "
                  f"({lo:+.3f} to {hi:+.3f})")


if __name__ == "__main__":
    main()
