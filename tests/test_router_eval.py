"""Router evaluation: AUC and APGR against hand-worked cases, the numpy logistic fit, splits and threshold presets."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from localmoe.routing import evaluate as router_eval
from localmoe.routing.evaluate import (
    LogisticModel,
    OperatingPoint,
    accuracy_at_share,
    apgr,
    auc,
    choose_threshold,
    fit_logistic,
    operating_points,
    split,
)


def brute_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def gradient(model: LogisticModel, x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """The objective's gradient at the fitted model, in standardised space: zero at the optimum."""
    z = (x - model.mean) / model.std
    g = model.predict(x) - y
    return np.concatenate([z.T @ g + l2 * model.weights, [g.sum()]])


# --- AUC --------------------------------------------------------------------------------------------------------------


def test_auc_perfect_and_inverted() -> None:
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auc_ties_count_half() -> None:
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # positives 0.4 and 0.8 against negatives 0.1 and 0.4: 1 + 0.5 + 1 + 1 wins of 4 pairs.
    assert auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == 0.875


def test_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float).tolist()  # many ties
    labels = rng.integers(0, 2, 60).tolist()
    assert auc(scores, labels) == pytest.approx(brute_auc(scores, labels))


def test_auc_random_scores_near_half() -> None:
    rng = np.random.default_rng(2)
    assert auc(rng.random(20000), rng.integers(0, 2, 20000)) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(("scores", "labels"), [
    ([0.1, 0.2], [1, 1]),
    ([0.1, 0.2], [0, 1, 1]),
    ([0.1, float("nan")], [0, 1]),
    ([0.1, 0.2], [0, 2]),
])
def test_auc_rejects_bad_input(scores: list[float], labels: list[int]) -> None:
    with pytest.raises(ValueError):
        auc(scores, labels)


# --- operating points and APGR -------------------------------------------------------------------------------------

# Four questions: the small tier gets the two low-scored ones right (0.5), the large tier all but the last (0.75).
SCORES = [0.9, 0.7, 0.4, 0.1]
SMALL = [0, 0, 1, 1]
LARGE = [1, 1, 1, 0]


def test_operating_points_hand_checked() -> None:
    points = operating_points(SCORES, SMALL, LARGE)
    got = [(p.threshold, p.large_share, p.accuracy, p.pgr) for p in points]
    assert got == [
        (np.inf, 0.0, 0.5, 0.0),
        (0.9, 0.25, 0.75, 1.0),
        (0.7, 0.5, 1.0, 2.0),  # routing beats the large tier alone: PGR above 1
        (0.4, 0.75, 1.0, 2.0),
        (0.1, 1.0, 0.75, 1.0),
        (-np.inf, 1.0, 0.75, 1.0),
    ]


def test_apgr_hand_checked() -> None:
    # Trapezoids of width 0.25 over PGR 0, 1, 2, 2, 1: (0.5 + 1.5 + 2 + 1.5) / 4.
    assert apgr(SCORES, SMALL, LARGE) == pytest.approx(1.375)


def test_equal_tiers_give_zero_pgr() -> None:
    small, large = [1, 0, 1, 0], [0, 1, 0, 1]
    points = operating_points(SCORES, small, large)
    assert all(p.pgr == 0.0 for p in points)
    assert [p.accuracy for p in points] == [0.5, 0.25, 0.5, 0.25, 0.5, 0.5]
    assert apgr(SCORES, small, large) == 0.0


def test_tied_scores_route_together() -> None:
    points = operating_points([0.5, 0.5, 0.2], [0, 1, 1], [1, 1, 0])
    assert [p.large_share for p in points] == pytest.approx([0, 2 / 3, 1, 1])


def test_random_router_apgr_near_half() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    small = (rng.random(n) < 0.5).astype(int)
    large = (rng.random(n) < 0.8).astype(int)
    assert apgr(rng.random(n), small, large) == pytest.approx(0.5, abs=0.05)


def test_oracle_router_beats_random() -> None:
    rng = np.random.default_rng(4)
    small = (rng.random(500) < 0.5).astype(int)
    large = np.ones(500, dtype=int)
    assert apgr(1.0 - small + 0.01 * rng.random(500), small, large) > 0.7


def test_custom_thresholds_sorted_by_share() -> None:
    points = operating_points(SCORES, SMALL, LARGE, thresholds=[0.1, 0.8])
    assert [(p.threshold, p.large_share) for p in points] == [(0.8, 0.25), (0.1, 1.0)]


def test_accuracy_at_share_interpolates() -> None:
    points = operating_points(SCORES, SMALL, LARGE)
    assert accuracy_at_share(points, 0.0) == 0.5
    assert accuracy_at_share(points, 0.125) == pytest.approx(0.625)
    assert accuracy_at_share(points, 0.5) == 1.0
    assert accuracy_at_share(points, 1.0) == 0.75
    with pytest.raises(ValueError):
        accuracy_at_share(points, 1.5)
    with pytest.raises(ValueError):
        accuracy_at_share([OperatingPoint(0.5, 0.5, 0.9, 1.0)], 0.2)


def test_operating_points_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        operating_points(SCORES, SMALL, LARGE[:3])


# --- logistic regression -------------------------------------------------------------------------------------------


def noisy_problem(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + rng.uniform(-5, 5, d)  # unstandardised on purpose
    w = rng.normal(size=d)
    logits = 3 * ((x - x.mean(0)) / x.std(0)) @ w / np.sqrt(d)
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(int)
    return x, y


def test_fit_recovers_noisy_problem_on_held_out() -> None:
    x, y = noisy_problem(800, 6, seed=5)
    train, test = split(len(y), seed=0)
    model = fit_logistic(x[train], y[train])
    assert auc(model.predict(x[test]), y[test]) > 0.9
    assert np.abs(gradient(model, x[train], y[train], 1.0)).max() < 1e-6


def test_fit_separable_stays_finite() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] > 0).astype(int)
    model = fit_logistic(x, y, l2=0.01)
    assert np.all(np.isfinite(model.weights)) and np.isfinite(model.bias)
    held_out = rng.normal(size=(200, 3))
    assert auc(model.predict(held_out), (held_out[:, 0] > 0).astype(int)) > 0.99


def test_fit_more_features_than_rows_with_constant_column(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = noisy_problem(300, 600, seed=7)
    x[:, 10] = 3.0

    def primal(*args: object) -> None:
        raise AssertionError("600 features on 300 rows must be fitted in the dual, a 301-square system a step")

    # the dual's speed is its structure, not a wall-clock limit that two busy cores could break
    monkeypatch.setattr(router_eval, "_newton_primal", primal)
    model = fit_logistic(x, y)
    p = model.predict(x)
    assert np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))
    assert model.weights[10] == pytest.approx(0.0, abs=1e-9)
    # The dual solve reaches the same optimum the primal would: the primal gradient vanishes.
    assert np.abs(gradient(model, x, y, 1.0)).max() < 1e-6
    assert auc(p, y) > 0.95


def test_fit_is_deterministic() -> None:
    x, y = noisy_problem(100, 4, seed=8)
    a, b = fit_logistic(x, y), fit_logistic(x, y)
    assert np.array_equal(a.weights, b.weights) and a.bias == b.bias


def test_fit_rejects_bad_input() -> None:
    x, y = noisy_problem(50, 3, seed=9)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(x, np.zeros(50))
    with pytest.raises(ValueError):
        fit_logistic(x, y[:-1])
    with pytest.raises(ValueError):
        fit_logistic(x, y, l2=0.0)


def test_predict_one_row_or_matrix() -> None:
    x, y = noisy_problem(100, 4, seed=10)
    model = fit_logistic(x, y)
    assert model.predict(x[3]).shape == ()
    assert float(model.predict(x[3])) == pytest.approx(model.predict(x)[3])
    with pytest.raises(ValueError):
        model.predict(x[:, :3])


def test_dict_round_trip_through_json() -> None:
    x, y = noisy_problem(100, 4, seed=11)
    model = fit_logistic(x, y)
    again = LogisticModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(again.predict(x), model.predict(x))


@pytest.mark.parametrize("corrupt", [
    lambda d: d.pop("std"),
    lambda d: d.pop("bias"),
    lambda d: d["weights"].pop(),
    lambda d: d["mean"].__setitem__(0, float("nan")),
    lambda d: d.__setitem__("bias", float("inf")),
    lambda d: d.__setitem__("bias", "0.3"),
    lambda d: d["std"].__setitem__(1, 0.0),
    lambda d: d["weights"].__setitem__(0, True),
    lambda d: d.__setitem__("weights", []),
    lambda d: d.__setitem__("mean", {"a": 1}),
])
def test_from_dict_rejects_corrupt(corrupt) -> None:
    d = LogisticModel(np.array([1.0, -2.0]), 0.5, np.zeros(2), np.ones(2)).to_dict()
    corrupt(d)
    with pytest.raises(ValueError):
        LogisticModel.from_dict(d)


def test_from_dict_rejects_non_dict() -> None:
    with pytest.raises(ValueError):
        LogisticModel.from_dict([1, 2, 3])


# --- split and thresholds ------------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_complete() -> None:
    train, test = split(100, seed=3)
    again = split(100, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(test) == 25
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert not np.array_equal(test, split(100, seed=4)[1])


def test_split_stratified_sees_every_kind() -> None:
    strata = ["math"] * 40 + ["code"] * 8 + ["trivia"] * 2 + ["rare"]
    train, test = split(len(strata), test_fraction=0.25, seed=0, strata=strata)
    kinds = np.array(strata)
    for kind in ("math", "code", "trivia"):
        assert kind in kinds[train] and kind in kinds[test]
    assert "rare" in kinds[train]
    assert (kinds[test] == "math").sum() == 10 and (kinds[test] == "code").sum() == 2
    assert np.array_equal(test, split(len(strata), seed=0, strata=strata)[1])


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split(1)
    with pytest.raises(ValueError):
        split(10, test_fraction=1.0)
    with pytest.raises(ValueError):
        split(10, strata=["a"] * 9)


def test_threshold_presets_ordered_on_calibrated_scores() -> None:
    rng = np.random.default_rng(12)
    scores = rng.beta(1.5, 3.0, 2000)  # most questions look easy; calibrated, so labels follow the scores
    labels = (rng.random(2000) < scores).astype(int)
    quality = choose_threshold(scores, labels, target="quality")
    balanced = choose_threshold(scores, labels, target="balanced")
    energy = choose_threshold(scores, labels, target="energy")
    assert quality < balanced == 0.5 < energy
    assert np.mean(scores[labels == 1] >= quality) >= 0.98
    assert np.mean(scores[labels == 0] < energy) >= 0.9


def test_threshold_presets_exact_on_small_data() -> None:
    # Ten wrong items scored 0.05 .. 0.95: 98% of them is all ten, which reach large at 0.05.
    wrong = np.linspace(0.05, 0.95, 10)
    right = np.linspace(0.0, 0.9, 10)
    scores = np.concatenate([wrong, right])
    labels = [1] * 10 + [0] * 10
    assert choose_threshold(scores, labels, target="quality") == pytest.approx(0.05)
    # fifty wrong items 0.01 .. 0.50: 98% is 49 of them, the highest 49 reach large at 0.02
    assert choose_threshold(np.linspace(0.01, 0.5, 50), [1] * 50, target="quality") == pytest.approx(0.02)
    energy = choose_threshold(scores, labels, target="energy")
    assert 0.8 < energy < 0.8 + 1e-12  # 9 of 10 right items (0.0 .. 0.8) must stay below it
    with pytest.raises(ValueError):
        choose_threshold(scores, labels, target="fast")
    with pytest.raises(ValueError):
        choose_threshold([0.2, 0.3], [0, 0], target="quality")
