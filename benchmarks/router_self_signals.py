"""One improvement tried for the router's generalisation (issue 19, item 3): the small model's own signals before
it answers. One prompt evaluation of the question (no decoding) gives three numbers: the entropy and the top
probability of the first answer token, and the mean log-probability of the prompt's tokens (how surprising the
question is to the model). A logistic model over the 12 `features` signals plus these three is fitted on the
training labels only (the split `router train` fits on: stratified, first seed; l2 = 1.0, the features model's
own), then scored on that split's held-out rows (in-distribution) and on the independent evaluation set, with the
scorer's labels and the audited ones. A fourth row, added on 2026-12-04 before that day's run, sums the log-odds
of the shipped `learned` estimate and of the signals-alone model (nothing fitted on top). Nothing here is chosen by
looking at the evaluation set.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_self_signals.py [--cache signals.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.home import models
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.probe import SIGNALS, signals_from_logits
from localmoe.routing.router import Router, feature_vector, log_odds

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "benchmarks" / "router_eval_labels.jsonl"
AUDITED = ROOT / "benchmarks" / "router_eval_labels_audited.jsonl"


def self_signals(engine: LlamaCppEngine, question: str) -> list[float]:
    tokens = engine.prompt_tokens([{"role": "user", "content": question}])
    return signals_from_logits(engine.logits(tokens), tokens).tolist()


def report(name: str, scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    small, large = 1 - y, np.ones_like(y)
    return {"auc": router_eval.auc(scores, y), "cpt50": router_eval.cpt(scores, small, large, 0.5),
            "cpt80": router_eval.cpt(scores, small, large, 0.8)}


def paired_gain(a: np.ndarray, b: np.ndarray, y: np.ndarray, n: int = 1000) -> tuple[float, float, float]:
    """Mean and 95% interval of AUC(a) - AUC(b) over bootstrap resamples of the questions (paired)."""
    rng = np.random.default_rng(0)
    d = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i])) == 2:
            d.append(router_eval.auc(a[i], y[i]) - router_eval.auc(b[i], y[i]))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(np.mean(d)), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, help="a JSON file of each question's signals: read if it exists, else "
                                                "written (the prompt evaluations are most of the run)")
    args = ap.parse_args()
    train_rows = router_train.shipped_labels()
    eval_rows = router_train.read_labels(EVAL)
    audited_y = np.array([r["small_wrong"] for r in router_train.read_labels(AUDITED)], dtype=float)
    path = models.default_model().path
    engine = LlamaCppEngine(path, n_ctx=512, logits_all=True, system_prompt=models.system_prompt(path))
    engine.load()
    t0 = time.time()
    sig = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    for n, r in enumerate(train_rows + eval_rows, 1):
        if r["question"] not in sig:
            sig[r["question"]] = self_signals(engine, r["question"])
        print(f"\r{n}/{len(train_rows) + len(eval_rows)}", end="", file=sys.stderr)
    print(f"\nprompt evaluations: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.cache:
        args.cache.write_text(json.dumps(sig))

    def matrix(rows: list[dict]) -> np.ndarray:
        return np.stack([np.concatenate([feature_vector(r["question"]), sig[r["question"]]]) for r in rows])

    x_tr, y_all = matrix(train_rows), np.array([r["small_wrong"] for r in train_rows], dtype=float)
    train_idx, test_idx = router_eval.split(len(train_rows), seed=router_train.EVAL_SEEDS[0],
                                            strata=[r["category"] for r in train_rows])
    n_feat = x_tr.shape[1] - len(SIGNALS)
    both = router_eval.fit_logistic(x_tr[train_idx], y_all[train_idx], l2=1.0)
    alone = router_eval.fit_logistic(x_tr[train_idx][:, n_feat:], y_all[train_idx], l2=1.0)
    router = Router()
    x_ev = matrix(eval_rows)
    y_ev = np.array([r["small_wrong"] for r in eval_rows], dtype=float)
    sets = {"held-out split (in-distribution)": ([train_rows[i] for i in test_idx], x_tr[test_idx], y_all[test_idx]),
            "eval set, scorer labels": (eval_rows, x_ev, y_ev),
            "eval set, audited labels": (eval_rows, x_ev, audited_y)}
    out: dict[str, dict[str, dict[str, float]]] = {}
    gains: dict[str, tuple[float, float, float]] = {}
    for set_name, (rows, x, y) in sets.items():
        learned = np.array([router.score(r["question"], "learned")[0] for r in rows])
        combined = log_odds(learned) + log_odds(alone.predict(x[:, n_feat:]))
        gains[set_name] = paired_gain(combined, learned, y)
        out[set_name] = {
            "features (shipped)": report("f", np.array([router.score(r["question"], "features")[0] for r in rows]), y),
            "learned (shipped)": report("l", learned, y),
            "self signals alone": report("s", alone.predict(x[:, n_feat:]), y),
            "features + self signals": report("b", both.predict(x), y),
            # declared before the 2026-12-04 run, nothing fitted: the sum of the two estimates' log-odds
            "learned + self signals": report("ls", combined, y),
        }
    print(json.dumps({"weights": dict(zip(SIGNALS, both.weights[n_feat:].round(3).tolist(), strict=True)),
                      "results": out}, indent=1))
    for set_name, table in out.items():
        print(f"\n{set_name}")
        for name, r in table.items():
            print(f"  {name:<26} AUC {r['auc']:.3f}  CPT50 {r['cpt50']:.2f}  CPT80 {r['cpt80']:.2f}")
        mean, lo, hi = gains[set_name]
        print(f"  learned + self signals minus learned, paired bootstrap: {mean:+.3f} (95% {lo:+.3f} to {hi:+.3f})")


if __name__ == "__main__":
    main()
