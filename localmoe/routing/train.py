"""Training and evaluating the router from labelled outcomes.

Labels say whether the small tier answered a question wrongly. They come from the shipped file (the project's
own suite answered by the embedded model), from benchmark runs on this machine, and from user signals
(retry on the large tier, thumbs up/down). `localmoe router train` fits every strategy on a stratified
75% split, reports held-out AUC, and writes `<data dir>/router.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from localmoe.errors import LocalmoeError
from localmoe.record.recorder import Recorder
from localmoe.routing import evaluate as router_eval
from localmoe.routing.probe import SIGNALS, Prober
from localmoe.routing.router import (
    CASCADE_INPUTS,
    FEATURE_NAMES,
    ROUTER_VERSION,
    TokenEmbedder,
    cascade_inputs,
    centred,
    combine_probe,
    encode_matrix,
    feature_vector,
    neighbour_scores,
    stack_inputs,
)

SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    rows, p = [], Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LocalmoeError(f"cannot read labels {p}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"question": str(row["question"]), "small_wrong": 1 - int(row["small_correct"]),
                         "large_correct": float(row.get("large_correct", 1)),
                         "category": row.get("category", ""), "mean_logprob": row.get("mean_logprob"),
                         "min_logprob": row.get("min_logprob"), "probe": _probe_signals(row.get("probe")),
                         "source": "shipped"})
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalmoeError(f"{p}:{n}: bad label line ({exc})") from None
    return rows


def _probe_signals(value: Any) -> list[float] | None:
    """A label's stored probe signals (the small model's reading of the question), or None."""
    if value is None:
        return None
    out = [float(v) for v in value]
    if len(out) != len(SIGNALS) or not all(np.isfinite(out)):
        raise ValueError(f"probe needs {len(SIGNALS)} finite numbers")
    return out


def shipped_labels() -> list[dict[str, Any]]:
    return read_labels(Path(str(files("localmoe.assets").joinpath("router", "labels.jsonl"))))


def collected_labels(rec: Recorder, small_model: str) -> list[dict[str, Any]]:
    """Labels this machine produced: benchmark verdicts of the small model, and user signals."""
    rows = [{"question": r["question"], "small_wrong": 1 - r["correct"], "large_correct": 1.0,
             "category": r["category"] or "", "mean_logprob": r["mean_logprob"], "min_logprob": r["min_logprob"],
             "probe": None, "source": "bench"}
            for r in rec.labelled_outcomes(small_model)]
    rows += [{"question": r["prompt"], "small_wrong": r["small_wrong"], "large_correct": 1.0, "category": "user",
              "mean_logprob": None, "min_logprob": None, "probe": None, "source": r["source"]}
             for r in rec.route_labels()]
    return rows


L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# Neighbour count and sharpness for the learned strategy, chosen per training split by inner cross-validation. The
# grid was set on development splits (seeds 10-59) that are not the reported ones (EVAL_SEEDS); AUC is flat across it.
K_GRID = (20, 30, 40)
SHARPNESS_GRID = (5.0, 10.0)
STACK_L2 = 1.0  # the learned strategy's two-input logistic model; with ~400 rows and 2 inputs it barely matters
STACK_FOLDS = 5
PROBE_L2 = 1.0  # three inputs over hundreds of rows: the penalty barely matters


def _folds(idx: np.ndarray, k: int = 4, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    parts = np.array_split(np.random.default_rng(seed).permutation(idx), k)
    return [(np.concatenate([parts[j] for j in range(k) if j != i]), parts[i]) for i in range(k)]


def _cv_auc(fit_predict: Any, idx: np.ndarray, y: np.ndarray) -> float:
    """Mean AUC over 4 folds of the training rows: hyperparameters are chosen without touching the test split."""
    aucs = []
    for tr, va in _folds(idx):
        if len(set(y[va])) == 2 and len(set(y[tr])) == 2:
            aucs.append(router_eval.auc(fit_predict(tr, va), y[va]))
    return float(np.mean(aucs)) if aucs else 0.0


def _fit_predict(x: np.ndarray, y: np.ndarray, tr: np.ndarray, rows: np.ndarray, l2: float) -> np.ndarray:
    """P(label 1) for `rows` from a logistic model fitted on `tr`; the base rate if `tr` holds one class only."""
    if len(set(y[tr])) < 2:
        return np.full(len(rows), float(y[tr].mean()))
    return router_eval.fit_logistic(x[tr], y[tr], l2=l2).predict(x[rows])


EVAL_SEEDS = (0, 1, 2, 3, 4)


def fill_probe(rows: list[dict[str, Any]], prober: Prober | None,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Give rows without the probe's signals those of `prober` (the small model reads each question once). A
    small model the prober cannot load leaves them without: the probe strategy is then not trained."""
    todo = [r for r in rows if r.get("probe") is None]
    if prober is None or not todo:
        return
    for n, r in enumerate(todo, 1):
        try:
            sig = prober.signals(r["question"])
        except LocalmoeError:
            return
        r["probe"] = None if sig is None else sig.tolist()
        if progress:
            progress(n, len(todo))


def train(rows: list[dict[str, Any]], embedder: TokenEmbedder, *, seeds: tuple[int, ...] = EVAL_SEEDS,
          prober: Prober | None = None) -> dict[str, Any]:
    """Fit on the split of the first seed (that is the model written out); evaluate on every seed's held-out
    split and report the mean, because a single split of a few hundred questions moves AUC by ±0.03.
    `prober`: the small model's probe, for rows that do not carry its signals (the shipped labels do)."""
    if len(rows) < 20 or len({r["small_wrong"] for r in rows}) < 2:
        raise LocalmoeError(f"need at least 20 labels with both outcomes to train a router (have {len(rows)})")
    fill_probe(rows, prober)
    # the questions' signals and embeddings do not depend on the split: worked out once, not once per seed
    fx = np.stack([feature_vector(r["question"]) for r in rows])
    raw = np.stack([embedder.embed(r["question"]) for r in rows])
    sx = np.array([r.get("probe") or [0.0] * len(SIGNALS) for r in rows], dtype=np.float64)
    has_sig = np.array([r.get("probe") is not None for r in rows])
    runs = [_train_split(rows, fx, raw, sx, has_sig, seed=s) for s in seeds]
    out = runs[0]
    ev = out["evaluation"]
    ev["split_auc"] = {name: [r["evaluation"]["auc"].get(name) for r in runs] for name in ev["auc"]}
    for key in ("auc", "large_share", "apgr"):
        ev[key] = {name: float(np.mean([r["evaluation"][key][name] for r in runs if name in r["evaluation"][key]]))
                   for name in ev[key]}
    ev["curve"] = {name: [(share, float(np.mean([r["evaluation"]["curve"][name][i][1] for r in runs
                                                  if name in r["evaluation"]["curve"]])))
                          for i, (share, _) in enumerate(ev["curve"][name])] for name in ev["curve"]}
    ev["splits"] = len(runs)
    out["default_strategy"] = _default(ev["auc"])
    return out


def _default(auc: dict[str, float]) -> str:
    """The best strategy that decides before answering: the cascade answers every question on the small tier
    first, and those it escalates twice, so it is chosen by name only."""
    before = {name: v for name, v in auc.items() if name != "cascade"}
    return max(before, key=before.get) if before else "features"


def _train_split(rows: list[dict[str, Any]], fx: np.ndarray, raw: np.ndarray, sx: np.ndarray, has_sig: np.ndarray,
                 *, seed: int = 0) -> dict[str, Any]:
    y = np.array([r["small_wrong"] for r in rows], dtype=np.float64)
    has_lp = np.array([r["mean_logprob"] is not None and r["min_logprob"] is not None for r in rows])
    cx = np.array([[r["mean_logprob"] or 0.0, r["min_logprob"] or 0.0] for r in rows])
    train_idx, test_idx = router_eval.split(len(rows), seed=seed, strata=[r["category"] for r in rows])
    # Centre on the training questions' mean: otherwise the boilerplate every question shares ("Answer with a
    # number only.") dominates the similarities.
    centre = raw[train_idx].mean(axis=0)
    emb = centred(raw, centre)
    # router.json keeps the reference embeddings in float16 (encode_matrix): neighbours are found among the values
    # that ship, so the evaluation written beside them is the shipped router's own
    refs16 = emb.astype("<f2").astype(emb.dtype)

    def fit_features(l2: float) -> Any:
        return lambda tr, va: router_eval.fit_logistic(fx[tr], y[tr], l2=l2).predict(fx[va])

    f_l2 = max(L2_GRID, key=lambda l2: _cv_auc(fit_features(l2), train_idx, y))

    def similar(refs: np.ndarray, rows_idx: np.ndarray, k: int, sharpness: float) -> np.ndarray:
        # rows that are also references leave themselves out of their own neighbours (leave-one-out)
        return neighbour_scores(emb[rows_idx], refs16[refs], y[refs], k, exclude=rows_idx, ref_idx=refs,
                                sharpness=sharpness)

    k_best, sharp_best = max(((k, s) for k in K_GRID for s in SHARPNESS_GRID),
                             key=lambda ks: _cv_auc(lambda tr, va: similar(tr, va, *ks), train_idx, y))
    features_model = router_eval.fit_logistic(fx[train_idx], y[train_idx], l2=f_l2)
    # Stacking: the learned model's inputs for a training row are out-of-fold (the features estimate from a model
    # that did not see the row, the neighbours' share without the row itself), so its weights are those that hold
    # on unseen questions; a held-out row gets the final features model and all training rows as neighbours.
    p_features = np.zeros(len(rows))
    for tr, va in _folds(train_idx, STACK_FOLDS, seed=2):
        p_features[va] = _fit_predict(fx, y, tr, va, f_l2)
    p_features[test_idx] = features_model.predict(fx[test_idx])
    learned_x = stack_inputs(p_features, similar(train_idx, np.arange(len(rows)), k_best, sharp_best))

    models_: dict[str, router_eval.LogisticModel] = {
        "features": features_model,
        "learned": router_eval.fit_logistic(learned_x[train_idx], y[train_idx], l2=STACK_L2),
    }
    lp_train = train_idx[has_lp[train_idx]]
    lp_test = test_idx[has_lp[test_idx]]
    sig_train = train_idx[has_sig[train_idx]]
    p_learned = models_["learned"].predict(learned_x)
    if len(sig_train) >= 20 and len(set(y[sig_train])) == 2:
        # the probe's own estimate from the three signals; the strategy adds its log-odds to learned's
        models_["probe"] = router_eval.fit_logistic(sx[sig_train], y[sig_train], l2=PROBE_L2)
    # both estimates start from the same base rate: counted once, so the sum stays a probability (the ranking, and
    # so AUC, is the same either way)
    probe_prior = float(y[sig_train].mean()) if len(sig_train) else 0.5
    if len(lp_train) >= 10 and len(set(y[lp_train])) == 2:
        models_["cascade"] = router_eval.fit_logistic(cx[lp_train], y[lp_train], l2=1.0)
    else:  # no confidence data: a fixed rule, flagged in the evaluation
        models_["cascade"] = router_eval.LogisticModel(np.array([-4.0, 0.0]), -1.5, np.zeros(2), np.ones(2))
    # After answering, the cascade also knows what the probe knew before: learned's estimate (from out-of-fold
    # inputs for a training row) and the question's signals, stacked with the answer's confidence.
    both_train = lp_train[has_sig[lp_train]]
    x_cascade = cascade_inputs(p_learned, sx, cx[:, 0], cx[:, 1])
    cascade_probe = None
    if "probe" in models_ and len(both_train) >= 20 and len(set(y[both_train])) == 2:
        cascade_probe = router_eval.fit_logistic(x_cascade[both_train], y[both_train], l2=1.0)

    def scores_of(name: str, idx: np.ndarray) -> np.ndarray:
        if name == "probe":
            p = combine_probe(p_learned[idx], models_["probe"].predict(sx[idx]), probe_prior)
            # a question without signals (too long to probe) is routed by learned: so it is scored
            return np.where(has_sig[idx], p, p_learned[idx])
        if name == "cascade" and cascade_probe is not None:
            # as it runs: the stacked model where the probe read the question, the answer's confidence elsewhere
            return np.where(has_sig[idx], cascade_probe.predict(x_cascade[idx]), models_["cascade"].predict(cx[idx]))
        return models_[name].predict({"features": fx, "learned": learned_x, "cascade": cx}[name][idx])

    subsets = {"cascade": (lp_train, lp_test)}
    evaluation: dict[str, Any] = {"n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
                                  "small_accuracy": float(1 - y.mean()), "auc": {}, "large_share": {}, "apgr": {},
                                  "hyperparameters": {"features_l2": f_l2, "learned_l2": STACK_L2,
                                                      "neighbours": k_best, "sharpness": sharp_best}}
    thresholds: dict[str, dict[str, float]] = {}
    for name in models_:
        tr, te = subsets.get(name, (train_idx, test_idx))
        train_scores = scores_of(name, tr)
        thresholds[name] = {t: float(router_eval.choose_threshold(train_scores, y[tr], target=t))
                            for t in router_eval.TARGETS}
        if len(te) and len(set(y[te])) == 2:
            scores = scores_of(name, te)
            evaluation["auc"][name] = router_eval.auc(scores, y[te])
            evaluation["large_share"][name] = float(np.mean(scores >= thresholds[name]["balanced"]))
            large = np.array([rows[i]["large_correct"] for i in te])
            evaluation["apgr"][name] = router_eval.apgr(scores, 1 - y[te], large)
            evaluation.setdefault("curve", {})[name] = curve(scores, 1 - y[te], large)
    best = _default(evaluation["auc"])
    return {
        "version": ROUTER_VERSION, "feature_names": FEATURE_NAMES, "default_strategy": best,
        "embedder": {"kind": "token-embedding-mean", "dim": int(emb.shape[1])},
        # the learned strategy ranks a question by its labelled neighbours (RouteLLM's similarity-weighted idea)
        "neighbours": {"k": k_best, "sharpness": sharp_best, "labels": y[train_idx].astype(int).tolist(),
                       "centre": centre.tolist(), "embeddings": encode_matrix(emb[train_idx])},
        **{name: m.to_dict() for name, m in models_.items()},
        **({"cascade_probe": cascade_probe.to_dict(), "cascade_inputs": list(CASCADE_INPUTS)}
           if cascade_probe is not None else {}),
        **({"probe_signals": list(SIGNALS), "probe_prior": probe_prior} if "probe" in models_ else {}),
        "thresholds": thresholds, "evaluation": evaluation,
        "sources": sorted({r["source"] for r in rows}), "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def curve(scores: np.ndarray, small_correct: np.ndarray, large_correct: np.ndarray) -> list[tuple[float, float]]:
    """Accuracy of the routed system at fixed shares of large-tier calls."""
    points = router_eval.operating_points(scores, small_correct, large_correct)
    return [(s, router_eval.accuracy_at_share(points, s)) for s in SHARES]
