"""Evaluating and fitting the router: AUC, the PGR / large-call-share curve (RouteLLM's APGR), a numpy logistic
regression, train/test splits and threshold presets.

A router score is the estimated probability that the small tier would answer wrongly; a question goes to the large
tier when its score >= the threshold. Labels follow the same direction: 1 = the small tier was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STD_FLOOR = 1e-6
# The share of wrong (quality) or right (energy) small-tier answers a preset must get to the right tier.
PRESET_COVERAGE = 0.9  # energy: the share of the small model's right answers kept on it
QUALITY_COVERAGE = 0.98  # quality: the share of its failures sent large
TARGETS = ("quality", "balanced", "energy")


def _vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has NaN or infinite values")
    return a


def _labels(values: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    a = _vector(values, "labels")
    if a.size != n:
        raise ValueError(f"{a.size} labels for {n} scores")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("labels must be 0 or 1")
    return a.astype(int)


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC for predicting label 1 (the small tier was wrong) from the scores, as the Mann-Whitney U statistic:
    the chance a random label-1 item scores above a random label-0 one, ties counting half."""
    s = _vector(scores, "scores")
    y = _labels(labels, s.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes among the labels")
    # Average ranks over tied scores are what make a tie count half.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --- routing curve -------------------------------------------------------------------------------------------------


@dataclass
class OperatingPoint:
    threshold: float  # route to large when score >= threshold
    large_share: float  # fraction of questions sent to the large tier
    accuracy: float  # routed system: large_correct where routed large, else small_correct
    pgr: float  # performance gap recovered: (accuracy - acc_small) / (acc_large - acc_small)


def operating_points(
    scores: Sequence[float],
    small_correct: Sequence[float],
    large_correct: Sequence[float],
    thresholds: Sequence[float] | None = None,
) -> list[OperatingPoint]:
    """The routed system at each threshold, ordered so large_share increases (thresholds decrease).

    Default thresholds: every distinct score plus +inf (all small) and -inf (all large). Correctness may be 0/1 or a
    partial credit in [0, 1]. PGR is 0 everywhere when both tiers are equally accurate (there is no gap to recover).
    """
    s = _vector(scores, "scores")
    small = _vector(small_correct, "small_correct")
    large = _vector(large_correct, "large_correct")
    if not (s.size == small.size == large.size):
        raise ValueError(f"lengths differ: {s.size} scores, {small.size} small_correct, {large.size} large_correct")
    acc_small, acc_large = float(small.mean()), float(large.mean())
    gap = acc_large - acc_small
    if thresholds is None:
        ts = np.concatenate(([np.inf], np.unique(s)[::-1], [-np.inf]))
    else:
        ts = np.asarray(thresholds, dtype=float)
        if ts.ndim != 1 or ts.size == 0 or np.any(np.isnan(ts)):
            raise ValueError("thresholds must be a non-empty 1-D sequence without NaN")
        ts = np.sort(ts)[::-1]
    points = []
    for t in ts:
        routed = s >= t
        accuracy = float(np.where(routed, large, small).mean())
        pgr = (accuracy - acc_small) / gap if gap != 0 else 0.0
        points.append(OperatingPoint(float(t), float(routed.mean()), accuracy, pgr))
    return points


def apgr(scores: Sequence[float], small_correct: Sequence[float], large_correct: Sequence[float]) -> float:
    """RouteLLM's average performance gap recovered: the area under PGR against large-call share over [0, 1].

    Trapezoids between the default operating points, which run from share 0 (PGR 0) to share 1 (PGR 1); joining
    them linearly is the expected result of breaking score ties at random. A random router scores about 0.5, and PGR
    can exceed 1 when routing beats the large tier alone. When acc_large == acc_small PGR is defined as 0, so
    APGR is 0.
    """
    points = operating_points(scores, small_correct, large_correct)
    x = np.array([p.large_share for p in points])
    y = np.array([p.pgr for p in points])
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def cpt(scores: Sequence[float], small_correct: Sequence[float], large_correct: Sequence[float],
        level: float) -> float:
    """RouteLLM's call-performance threshold CPT(level): the smallest large-call share whose routed system
    recovers `level` (e.g. 0.8) of the gap between the tiers, linear between operating points as in `apgr`.

    With a large tier that is always right, CPT(0.8) is the share of questions sent large to catch 80% of the small
    tier's failures: a perfect router needs 0.8 × the small error rate, a random one about 0.8. Where both tiers are
    equally accurate there is no gap to recover and CPT is 0.
    """
    if not 0 < level <= 1:
        raise ValueError("level must lie in (0, 1]")
    points = operating_points(scores, small_correct, large_correct)
    if all(p.pgr == 0 for p in points):
        return 0.0
    # the first point (share 0) has PGR 0 < level, so the first crossing has a `before` below the level
    for before, after in zip(points, points[1:], strict=False):
        if after.pgr >= level - 1e-12:
            frac = min((level - before.pgr) / (after.pgr - before.pgr), 1.0)
            return float(before.large_share + frac * (after.large_share - before.large_share))
    return 1.0


# Baselines a router must beat: a score that only counts something in the question's text.
BASELINES: dict[str, Callable[[str], float]] = {
    "digits": lambda q: float(sum(c.isdigit() for c in q)),
    "length": lambda q: float(len(q)),
}


def accuracy_at_share(points: Sequence[OperatingPoint], share: float) -> float:
    """Routed accuracy at a given large-call share, interpolated linearly between the operating points."""
    if not points:
        raise ValueError("no operating points")
    ordered = sorted(points, key=lambda p: p.large_share)
    xs = np.array([p.large_share for p in ordered])
    if not (xs[0] <= share <= xs[-1]):
        raise ValueError(f"share {share} lies outside the points' range [{xs[0]}, {xs[-1]}]")
    return float(np.interp(share, xs, [p.accuracy for p in ordered]))


# --- logistic regression -------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only: no overflow warnings at |z| in the hundreds.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class LogisticModel:
    """p = sigmoid(((x - mean) / std) · weights + bias)."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of label 1: a 0-d array for one row (1-D x), shape (n,) for an (n, d) matrix."""
        a = np.asarray(x, dtype=float)
        if a.ndim not in (1, 2) or a.shape[-1] != self.weights.size:
            raise ValueError(f"expected {self.weights.size} features per row, got shape {a.shape}")
        return _sigmoid(((a - self.mean) / self.std) @ self.weights + self.bias)

    def to_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "bias": float(self.bias),
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Any) -> LogisticModel:
        """The inverse of to_dict; ValueError for anything a corrupt or hand-edited file could hold."""
        if not isinstance(d, dict):
            raise ValueError("a logistic model must be a JSON object")
        missing = [k for k in ("weights", "bias", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"logistic model lacks {', '.join(missing)}")
        arrays = {}
        for key in ("weights", "mean", "std"):
            v = d[key]
            if not isinstance(v, list) or not v or not all(_is_number(e) for e in v):
                raise ValueError(f"logistic model {key} must be a non-empty list of numbers")
            arrays[key] = np.array(v, dtype=float)
            if not np.all(np.isfinite(arrays[key])):
                raise ValueError(f"logistic model {key} has NaN or infinite values")
        if len({a.size for a in arrays.values()}) != 1:
            raise ValueError("logistic model weights, mean and std differ in length")
        if np.any(arrays["std"] <= 0):
            raise ValueError("logistic model std must be positive")
        if not _is_number(d["bias"]) or not math.isfinite(d["bias"]):
            raise ValueError("logistic model bias must be a finite number")
        return cls(arrays["weights"], float(d["bias"]), arrays["mean"], arrays["std"])


def _is_number(v: Any) -> bool:
    # bool is an int to Python, but a true/false in a weights list means the file is wrong.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, max_iter: int = 100) -> LogisticModel:
    """L2-regularised logistic regression by damped Newton (IRLS), deterministic.

    Minimises Σ log-loss + l2/2·|w|² on standardised features (std floored at 1e-6, so a constant column gets
    weight 0); the bias is not penalised. l2 must be positive: it is what keeps the fit finite on separable data and
    with more features than rows. With more features than rows the Newton steps run in the dual (w = Zᵀα, Z the
    standardised rows), so each step solves an (n+1)-square system rather than a (d+1)-square one.
    """
    a = np.asarray(x, dtype=float)
    t = np.asarray(y, dtype=float)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] == 0:
        raise ValueError(f"x must be a matrix with at least 2 rows and 1 feature, got shape {a.shape}")
    if t.shape != (a.shape[0],):
        raise ValueError(f"y must have one label per row of x: shape {t.shape} for {a.shape[0]} rows")
    if not (np.all(np.isfinite(a)) and np.all((t == 0) | (t == 1))):
        raise ValueError("x must be finite and y 0 or 1")
    if t.min() == t.max():
        raise ValueError("fitting needs both classes in y (the bias would run off to infinity)")
    if not l2 > 0:
        raise ValueError("l2 must be positive")
    mean = a.mean(axis=0)
    std = np.maximum(a.std(axis=0), STD_FLOOR)
    z = (a - mean) / std
    n, d = z.shape
    if d <= n:
        weights, bias = _newton_primal(z, t, l2, max_iter)
    else:
        alpha, bias = _newton_dual(z @ z.T, t, l2, max_iter)
        weights = z.T @ alpha
    return LogisticModel(weights, bias, mean, std)


def _objective(f: np.ndarray, t: np.ndarray, penalty: float) -> float:
    # log(1 + e^f) - t·f is the log-loss of logit f; logaddexp keeps it finite for large |f|.
    return float(np.sum(np.logaddexp(0.0, f) - t * f) + penalty)


def _solve(m: np.ndarray, r: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(m, r)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(m, r, rcond=None)[0]


def _damped(
    params: np.ndarray, step: np.ndarray, loss: Callable[[np.ndarray], float], current: float
) -> tuple[np.ndarray, float]:
    """Halve the Newton step until the objective does not rise; a pure Newton step can overshoot far from the
    optimum when the probabilities saturate."""
    scale = 1.0
    for _ in range(40):
        trial = params - scale * step
        value = loss(trial)
        if value <= current:
            return trial, value
        scale /= 2
    return params, current


def _newton_primal(z: np.ndarray, t: np.ndarray, l2: float, max_iter: int) -> tuple[np.ndarray, float]:
    n, d = z.shape
    za = np.hstack([z, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0  # the bias

    def loss(theta: np.ndarray) -> float:
        return _objective(za @ theta, t, 0.5 * l2 * float(theta[:-1] @ theta[:-1]))

    theta = np.zeros(d + 1)
    current = loss(theta)
    for _ in range(max_iter):
        p = _sigmoid(za @ theta)
        grad = za.T @ (p - t) + reg * theta
        # A floor on the IRLS weights keeps the bias row of the Hessian non-singular when every p saturates.
        w = np.maximum(p * (1 - p), 1e-12)
        hess = (za.T * w) @ za + np.diag(reg)
        theta, value = _damped(theta, _solve(hess, grad), loss, current)
        if current - value <= 1e-12 * max(1.0, abs(current)):
            break
        current = value
    return theta[:-1], float(theta[-1])


def _newton_dual(k: np.ndarray, t: np.ndarray, l2: float, max_iter: int) -> tuple[np.ndarray, float]:
    """Newton on (α, b) with logits f = Kα + b and penalty l2/2·αᵀKα, K the Gram matrix of the standardised rows.

    The true Newton system carries a factor K that may be singular (duplicate rows, n > rank); dividing it out
    leaves [[W K + l2 I, W 1], [1ᵀ, 0]] · [Δα; Δb] = [g + l2 α; 1ᵀα], which is non-singular for W > 0 and whose
    solution also solves the true system.
    """
    n = k.shape[0]
    ones = np.ones(n)

    def loss(theta: np.ndarray) -> float:
        alpha = theta[:-1]
        ka = k @ alpha
        return _objective(ka + theta[-1], t, 0.5 * l2 * float(alpha @ ka))

    theta = np.zeros(n + 1)
    current = loss(theta)
    system = np.zeros((n + 1, n + 1))
    system[-1, :-1] = 1.0
    for _ in range(max_iter):
        alpha, b = theta[:-1], theta[-1]
        p = _sigmoid(k @ alpha + b)
        w = np.maximum(p * (1 - p), 1e-12)
        system[:-1, :-1] = w[:, None] * k + l2 * np.eye(n)
        system[:-1, -1] = w
        rhs = np.concatenate([p - t + l2 * alpha, [ones @ alpha]])
        theta, value = _damped(theta, _solve(system, rhs), loss, current)
        if current - value <= 1e-12 * max(1.0, abs(current)):
            break
        current = value
    return theta[:-1], float(theta[-1])


# --- data splits and thresholds ------------------------------------------------------------------------------------


def split(
    n: int, *, test_fraction: float = 0.25, seed: int = 0, strata: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) index arrays over range(n), each sorted.

    With strata (e.g. each question's category) every stratum is split on its own, so both halves see every kind
    that has at least 2 items; a stratum of 1 goes to train. Test sizes round per stratum, so the overall fraction
    is approximate.
    """
    if n < 2:
        raise ValueError("splitting needs at least 2 items")
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must lie strictly between 0 and 1")
    if strata is None:
        groups = [np.arange(n)]
    else:
        if len(strata) != n:
            raise ValueError(f"{len(strata)} strata for {n} items")
        members: dict[Any, list[int]] = {}
        for i, s in enumerate(strata):
            members.setdefault(s, []).append(i)
        groups = [np.array(m) for m in members.values()]  # first-appearance order: deterministic
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for g in groups:
        if g.size < 2:
            continue
        k = min(max(round(g.size * test_fraction), 1), g.size - 1)
        test.append(rng.permutation(g)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=int)
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def choose_threshold(scores: Sequence[float], labels: Sequence[int], *, target: str) -> float:
    """A routing threshold for a calibrated score, by preference preset.

    - balanced: 0.5, i.e. escalate when the small tier is more likely wrong than right.
    - quality: the highest threshold that sends at least 98% of the label-1 (small-wrong) items to large (98%, as
      the outcome-defined quality keeps 98% of large-only accuracy: with a small model that fails most questions,
      90% sat above 0.5 and made quality the same as balanced).
    - energy: the lowest threshold that keeps at least 90% of the label-0 (small-right) items on small (just above
      the 90th-percentile label-0 score, since a score equal to the threshold escalates).

    quality is capped at 0.5 and energy floored at 0.5, so quality <= balanced <= energy always holds; both still
    meet their 90% definition, as a lower (higher) threshold only escalates more (less).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    s = _vector(scores, "scores")
    y = _labels(labels, s.size)
    if target == "balanced":
        return 0.5
    if target == "quality":
        wrong = np.sort(s[y == 1])[::-1]
        if wrong.size == 0:
            raise ValueError("the quality preset needs label-1 (small-wrong) items")
        return min(float(wrong[_covered(wrong.size, QUALITY_COVERAGE) - 1]), 0.5)
    right = np.sort(s[y == 0])
    if right.size == 0:
        raise ValueError("the energy preset needs label-0 (small-right) items")
    kept = float(right[_covered(right.size, PRESET_COVERAGE) - 1])
    return max(float(np.nextafter(kept, np.inf)), 0.5)


def _covered(n: int, share: float) -> int:
    """How many of n items make "at least `share`"; the epsilon stops 0.9 * 70 = 63.000000000000014 asking for
    64."""
    return math.ceil(share * n - 1e-9)
