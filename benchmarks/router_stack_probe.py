"""Tried for #19 and not shipped: does a third stacked input help the learned router? Options: `probe`, a logistic
model on the question's token-embedding vector; `bow`, a logistic model on hashed word unigrams and bigrams. Each is
stacked (out-of-fold, as `routing/train.py` does) with the features estimate and the neighbours' share (k 30,
sharpness 10).

Decision rule, fixed before running: ship an option only if it beats `current` on both the mean of the five
EVAL_SEEDS held-out splits and the leave-one-category-out AUC on the hand-written training questions. `--cross
LABELS` then fits on every training row and scores the independent evaluation set.

    .venv/bin/python benchmarks/router_stack_probe.py [--cross benchmarks/router_eval_labels.jsonl]
"""

from __future__ import annotations

import argparse
import re
import zlib

import numpy as np

from localmoe.home import models
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import TokenEmbedder, centred, feature_vector, log_odds, neighbour_scores

OPTIONS = ("current", "probe", "bow")
HASH_DIM = 1 << 12
GENERATED = 546  # the first rows of the shipped labels: generated questions and authored facts


def bag_of_words(question: str) -> np.ndarray:
    words = re.findall(r"[a-z0-9']+", question.lower())
    v = np.zeros(HASH_DIM)
    for t in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
        v[zlib.crc32(t.encode()) % HASH_DIM] = 1.0
    return v


class Data:
    def __init__(self, rows: list[dict], embedder: TokenEmbedder) -> None:
        self.y = np.array([r["small_wrong"] for r in rows], dtype=np.float64)
        self.fx = np.stack([feature_vector(r["question"]) for r in rows])
        self.raw = np.stack([embedder.embed(r["question"]) for r in rows])
        self.bx = np.stack([bag_of_words(r["question"]) for r in rows])

    def fit_predict(self, x: np.ndarray, tr: np.ndarray, te: np.ndarray, l2: float) -> np.ndarray:
        if len(set(self.y[tr])) < 2:
            return np.full(len(te), self.y[tr].mean())
        return router_eval.fit_logistic(x[tr], self.y[tr], l2=l2).predict(x[te])

    def best_l2(self, x: np.ndarray, tr: np.ndarray, grid: tuple[float, ...]) -> float:
        return max(grid, key=lambda l2: router_train._cv_auc(lambda a, b: self.fit_predict(x, a, b, l2), tr, self.y))

    def scores(self, tr: np.ndarray, te: np.ndarray, option: str) -> np.ndarray:
        emb = centred(self.raw, self.raw[tr].mean(axis=0))
        inputs = {"features": (self.fx, self.best_l2(self.fx, tr, router_train.L2_GRID))}
        if option == "probe":
            inputs["probe"] = (emb, self.best_l2(emb, tr, (10.0, 30.0, 100.0, 300.0, 1000.0)))
        if option == "bow":
            inputs["bow"] = (self.bx, self.best_l2(self.bx, tr, (3.0, 10.0, 30.0, 100.0, 300.0)))
        oof = {k: np.zeros(len(self.y)) for k in inputs}
        for a, b in router_train._folds(tr, 5, seed=2):
            for k, (x, l2) in inputs.items():
                oof[k][b] = self.fit_predict(x, a, b, l2)
        for k, (x, l2) in inputs.items():
            oof[k][te] = self.fit_predict(x, tr, te, l2)
        every = np.arange(len(self.y))
        similar = neighbour_scores(emb, emb[tr], self.y[tr], 30, exclude=every, ref_idx=tr, sharpness=10.0)
        x = np.stack([log_odds(oof[k]) for k in inputs] + [log_odds(similar)], axis=1)
        return router_eval.fit_logistic(x[tr], self.y[tr], l2=1.0).predict(x[te])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cross", help="evaluation labels to score after fitting on every training row")
    args = ap.parse_args()
    rows = router_train.shipped_labels()
    embedder = TokenEmbedder(models.default_model().path)
    if args.cross:
        evaluation = router_train.read_labels(args.cross)
        data = Data(rows + evaluation, embedder)
        tr, te = np.arange(len(rows)), np.arange(len(rows), len(rows) + len(evaluation))
        for option in OPTIONS:
            print(f"cross-set {option}: {router_eval.auc(data.scores(tr, te, option), data.y[te]):.4f}")
        return
    data = Data(rows, embedder)
    cats = np.array([r["category"] for r in rows])
    split_auc = {o: [] for o in OPTIONS}
    for seed in router_train.EVAL_SEEDS:
        tr, te = router_eval.split(len(rows), seed=seed, strata=list(cats))
        for o in OPTIONS:
            split_auc[o].append(router_eval.auc(data.scores(tr, te, o), data.y[te]))
    print("mean of 5 held-out splits:", {o: round(float(np.mean(v)), 4) for o, v in split_auc.items()})
    varied = np.arange(len(rows)) >= GENERATED
    pooled = {o: np.zeros(len(rows)) for o in OPTIONS}
    for c in sorted(set(cats[varied])):
        held = varied & (cats == c)
        for o in OPTIONS:
            pooled[o][held] = data.scores(np.where(~held)[0], np.where(held)[0], o)
    vi = np.where(varied)[0]
    print("leave-one-category-out on the hand-written questions (pooled AUC):",
          {o: round(router_eval.auc(pooled[o][vi], data.y[vi]), 4) for o in OPTIONS})


if __name__ == "__main__":
    main()
