"""Tried and measured: does a real sentence encoder shipped on PyPI with its weights, `wordllama` (MIT; the wheel
bundles the 16 MB `l2_supercat_256` static embeddings), make the learned router generalise better than the mean of
SmolLM2 token embeddings (`TokenEmbedder`)?

Options, all stacked out-of-fold as `routing/train.py` and `router_stack_probe.py` do (k 30, sharpness 10):
- `current`: as shipped, the features estimate plus the neighbours' share over SmolLM2 vectors;
- `wl-nb-centred`: the neighbours' share over wordllama vectors, centred on the training mean and normalised as
  the shipped vectors are;
- `wl-nb-cosine`: the same over wordllama's own unit vectors, not centred (plain cosine);
- `wl-probe`: `current` plus a third stacked input, a logistic model on the (centred) wordllama vector, its l2
  chosen by inner cross-validation on the training rows as in `router_stack_probe.py`.

Decision rule, fixed before running: an option is worth shipping only if it beats `current` on BOTH the mean AUC of
the five EVAL_SEEDS held-out splits AND the leave-one-category-out pooled AUC over the hand-written training
questions (ids starting `tv-`). The cross-set AUC and CPT(80%) on the independent evaluation files
(`benchmarks/router_eval_labels.jsonl`, `..._audited.jsonl`), fitted on every training row, are reported and not
used to choose; nothing is fitted or tuned on them.

wordllama is not a project dependency: install it outside the venv and put it on PYTHONPATH. It loads offline only
with `cache_dir` set to its own package folder (`load()` with defaults looks for `wordllama/tokenizer/`, the wheel
has `wordllama/tokenizers/`, and so it downloads the tokenizer from Hugging Face).

    .venv/bin/pip install --target /tmp/wl --no-deps wordllama-0.4.0.post1-*.whl toml
    PYTHONPATH=/tmp/wl .venv/bin/python benchmarks/router_encoder_probe.py --labels /tmp/enc/labels.jsonl \
        --cross benchmarks/router_eval_labels.jsonl benchmarks/router_eval_labels_audited.jsonl [--load-cost]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from localmoe.home import models
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import TokenEmbedder, centred, feature_vector, log_odds, neighbour_scores

OPTIONS = ("current", "wl-nb-centred", "wl-nb-cosine", "wl-probe")
K, SHARPNESS = 30, 10.0
PROBE_L2 = (10.0, 30.0, 100.0, 300.0, 1000.0)


def load_wordllama():  # noqa: ANN201 - wordllama is optional and untyped here
    import wordllama
    from wordllama import WordLlama

    return WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


class Data:
    def __init__(self, rows: list[dict], embedder: TokenEmbedder, wl) -> None:  # noqa: ANN001
        self.y = np.array([r["small_wrong"] for r in rows], dtype=np.float64)
        self.fx = np.stack([feature_vector(r["question"]) for r in rows])
        self.raw = np.stack([embedder.embed(r["question"]) for r in rows])
        self.wl = np.asarray(wl.embed([r["question"] for r in rows]), dtype=np.float64)
        self.wl_unit = np.asarray(wl.embed([r["question"] for r in rows], norm=True), dtype=np.float64)
        self._l2: dict[tuple, float] = {}

    def fit_predict(self, x: np.ndarray, tr: np.ndarray, te: np.ndarray, l2: float) -> np.ndarray:
        if len(set(self.y[tr])) < 2:
            return np.full(len(te), self.y[tr].mean())
        return router_eval.fit_logistic(x[tr], self.y[tr], l2=l2).predict(x[te])

    def best_l2(self, name: str, x: np.ndarray, tr: np.ndarray, grid: tuple[float, ...]) -> float:
        key = (name, tr.tobytes())  # the same training rows give the same choice: compute it once per split
        if key not in self._l2:
            self._l2[key] = max(grid, key=lambda l2: router_train._cv_auc(
                lambda a, b: self.fit_predict(x, a, b, l2), tr, self.y))
        return self._l2[key]

    def scores(self, tr: np.ndarray, te: np.ndarray, option: str) -> np.ndarray:
        emb = centred(self.raw, self.raw[tr].mean(axis=0))
        wl_emb = centred(self.wl, self.wl[tr].mean(axis=0))
        inputs = {"features": (self.fx, self.best_l2("features", self.fx, tr, router_train.L2_GRID))}
        if option == "wl-probe":
            inputs["probe"] = (wl_emb, self.best_l2("wl-probe", wl_emb, tr, PROBE_L2))
        oof = {k: np.zeros(len(self.y)) for k in inputs}
        for a, b in router_train._folds(tr, 5, seed=2):
            for k, (x, l2) in inputs.items():
                oof[k][b] = self.fit_predict(x, a, b, l2)
        for k, (x, l2) in inputs.items():
            oof[k][te] = self.fit_predict(x, tr, te, l2)
        space = {"wl-nb-centred": wl_emb, "wl-nb-cosine": self.wl_unit}.get(option, emb)
        every = np.arange(len(self.y))
        similar = neighbour_scores(space, space[tr], self.y[tr], K, exclude=every, ref_idx=tr, sharpness=SHARPNESS)
        x = np.stack([log_odds(oof[k]) for k in inputs] + [log_odds(similar)], axis=1)
        return router_eval.fit_logistic(x[tr], self.y[tr], l2=router_train.STACK_L2).predict(x[te])


LOAD_SNIPPET = r"""
import time, resource
import numpy  # the project has numpy loaded already: not counted
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
r0, t0 = rss(), time.perf_counter()
from pathlib import Path
import wordllama
from wordllama import WordLlama
wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
v = wl.embed(["How many minutes are there in three and a half hours?"])
t1 = time.perf_counter()
print(t1 - t0, rss() - r0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - r0)
"""


def load_cost(n: int = 5) -> None:
    runs = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], capture_output=True, text=True, check=True)
        runs.append([float(v) for v in out.stdout.split()])
    secs, rss, peak = (statistics.median(c) for c in zip(*runs, strict=True))
    print(f"wordllama import+load+embed one question, fresh process, median of {n}: {secs * 1000:.0f} ms "
          f"(all: {', '.join(f'{r[0] * 1000:.0f}' for r in runs)}); resident memory added {rss:.1f} MiB "
          f"(peak {peak:.1f} MiB) over python+numpy")


def paired_gap(a: np.ndarray, b: np.ndarray, y: np.ndarray, n: int = 2000) -> str:
    """AUC(a) - AUC(b) on the same rows, with a 95% interval from resampling the rows (stratified by label)."""
    rng = np.random.default_rng(0)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    gaps = []
    for _ in range(n):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        gaps.append(router_eval.auc(a[i], y[i]) - router_eval.auc(b[i], y[i]))
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return f"{router_eval.auc(a, y) - router_eval.auc(b, y):+.4f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", help="training labels (default: the shipped file)")
    ap.add_argument("--cross", nargs="*", default=[], help="evaluation labels, scored after fitting on every row")
    ap.add_argument("--load-cost", action="store_true", help="also time wordllama's load in fresh processes")
    args = ap.parse_args()
    if args.load_cost:
        load_cost()
    path = args.labels or str(Path(router_train.__file__).parent.parent / "assets" / "router" / "labels.jsonl")
    rows = router_train.read_labels(path)
    ids = [json.loads(line)["id"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    embedder = TokenEmbedder(models.default_model().path)
    wl = load_wordllama()
    evaluations = [router_train.read_labels(p) for p in args.cross]
    data = Data(rows + [r for ev in evaluations for r in ev], embedder, wl)
    n = len(rows)
    base = np.arange(n)
    cats = np.array([r["category"] for r in rows])
    split_auc = {o: [] for o in OPTIONS}
    for seed in router_train.EVAL_SEEDS:
        tr, te = router_eval.split(n, seed=seed, strata=list(cats))
        for o in OPTIONS:
            split_auc[o].append(router_eval.auc(data.scores(tr, te, o), data.y[te]))
    mean_split = {o: float(np.mean(v)) for o, v in split_auc.items()}
    print("mean of 5 held-out splits:", {o: round(v, 4) for o, v in mean_split.items()})
    print("  per split:", {o: [round(a, 3) for a in v] for o, v in split_auc.items()})
    hand = np.array([i.startswith("tv-") for i in ids])
    pooled = {o: np.zeros(n) for o in OPTIONS}
    for c in sorted(set(cats[hand])):
        held = hand & (cats == c)
        for o in OPTIONS:
            pooled[o][held] = data.scores(base[~held], base[held], o)
    loco = {o: router_eval.auc(pooled[o][hand], data.y[:n][hand]) for o in OPTIONS}
    print(f"leave-one-category-out, {int(hand.sum())} tv- questions, {len(set(cats[hand]))} categories "
          "(pooled AUC):", {o: round(v, 4) for o, v in loco.items()})
    for o in OPTIONS[1:]:
        ok = mean_split[o] > mean_split["current"] and loco[o] > loco["current"]
        print(f"  rule: {o} {'BEATS' if ok else 'does not beat'} current on both; LOCO gap (bootstrap 95%) "
              f"{paired_gap(pooled[o][hand], pooled['current'][hand], data.y[:n][hand])}")
    start = n
    for p, ev in zip(args.cross, evaluations, strict=True):
        te = np.arange(start, start + len(ev))
        start += len(ev)
        small = 1 - data.y[te]
        large = np.array([r["large_correct"] for r in ev])
        scored = {o: data.scores(base, te, o) for o in OPTIONS}
        for o, s in scored.items():
            gap = "" if o == "current" else f"  gap {paired_gap(s, scored['current'], data.y[te])}"
            print(f"cross-set {Path(p).name} ({len(ev)} rows, {int(data.y[te].sum())} small-wrong) {o:<14} "
                  f"AUC {router_eval.auc(s, data.y[te]):.4f}  CPT(80%) {router_eval.cpt(s, small, large, 0.8):.3f}"
                  f"{gap}")


if __name__ == "__main__":
    main()
