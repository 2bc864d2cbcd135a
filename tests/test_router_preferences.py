"""Preferences defined by outcomes (#19 item 2), checked against a hand computation on a fixed outcome table."""

from __future__ import annotations

import json

import numpy as np

from helpers import run_cli
from localmoe.routing.preferences import outcome_preferences
from localmoe.routing.router import Router, trained_path

# Ten questions, highest score first; the large tier answers all right, the small one misses the 1st, 2nd and 4th;
# a small answer costs 3 J, a large one 9 J.
SCORES = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])
SMALL_OK = np.array([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])
LARGE_OK = np.ones(10)
SMALL_J, LARGE_J = np.full(10, 3.0), np.full(10, 9.0)


def test_thresholds_match_a_hand_computation() -> None:
    # By hand (large share: accuracy, J/question): 0: .7, 3.0 · .1: .8, 3.6 · .2: .9, 4.2 · .3: .9, 4.8 · .4: 1.0, 5.4
    # quality keeps ≥ .98 of 1.0 → share .4 (threshold .65); energy keeps ≥ .90 → share .2 (threshold .85);
    # accuracy per joule: .233, .222, .214, .188, .185, … → nothing large (a threshold above every score).
    p = outcome_preferences(SCORES, SMALL_OK, LARGE_OK, SMALL_J, LARGE_J)
    assert p["quality"]["threshold"] == 0.65 and p["quality"]["large_share"] == 0.4
    assert p["quality"]["accuracy"] == 1.0 and np.isclose(p["quality"]["joules"], 5.4)
    assert p["energy"]["threshold"] == 0.85 and p["energy"]["large_share"] == 0.2 and p["energy"]["accuracy"] == 0.9
    assert p["balanced"]["large_share"] == 0.0 and p["balanced"]["threshold"] > 0.95
    assert np.isclose(p["balanced"]["accuracy"] / p["balanced"]["joules"], 0.7 / 3)
    assert p["large_only_accuracy"] == 1.0 and p["n"] == 10


def test_the_cascade_pays_for_both_answers_of_an_escalated_question() -> None:
    # By hand, the cascade (3 J for every small answer, 9 J more for each escalation): share .4 costs 3 + .4 * 9
    p = outcome_preferences(SCORES, SMALL_OK, LARGE_OK, SMALL_J, LARGE_J, cascade=True)
    assert p["quality"]["large_share"] == 0.4 and np.isclose(p["quality"]["joules"], 6.6)
    assert np.isclose(p["energy"]["joules"], 3 + 0.2 * 9)
    assert p["balanced"]["large_share"] == 0.0 and np.isclose(p["balanced"]["joules"], 3.0)


def test_stored_preferences_set_the_threshold_and_route_json_shows_them(home) -> None:
    prefs = outcome_preferences(SCORES, SMALL_OK, LARGE_OK, SMALL_J, LARGE_J)
    data = json.loads(trained_path().read_text())
    data["outcome_preferences"] = {"features": prefs}
    home.mkdir(parents=True, exist_ok=True)
    (home / "router.json").write_text(json.dumps(data))
    assert Router("features", preference="energy").threshold("features") == 0.85
    fixed = data["thresholds"]["learned"]["energy"]  # no outcomes for this strategy: the file's fixed table
    assert Router("learned", preference="energy").threshold("learned") == fixed
    r = run_cli("route", "Which city is the capital of Japan?", "--json", "--strategy", "features",
                "--preference", "quality")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["threshold"] == 0.65 and out["preferences"] == {"quality": 0.65, "balanced": prefs["balanced"][
        "threshold"], "energy": 0.85}
    # what each buys, from the same hand computation; a strategy with no outcomes says its table is fixed
    assert out["preferences_from"] == "recorded outcomes of both tiers"
    bought = out["preference_outcomes"]
    assert (bought["quality"]["large_share"], bought["quality"]["accuracy"]) == (0.4, 1.0)
    assert np.isclose(bought["quality"]["joules"], 5.4) and bought["energy"]["large_share"] == 0.2
    assert bought["balanced"] == {"large_share": 0.0, "accuracy": 0.7, "joules": 3.0}
    r = run_cli("route", "Which city is the capital of Japan?", "--json", "--strategy", "learned")
    out = json.loads(r.stdout)
    assert out["preferences_from"].startswith("the fixed table") and "preference_outcomes" not in out
