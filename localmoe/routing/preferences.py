"""Preferences defined by outcomes (#19 item 2): from recorded answers of both tiers to the same questions
(correct or not, joules each) and the router's scores for them, the thresholds that mean what their names say:

- `quality`: the smallest large share that keeps ≥ 98% of large-only accuracy;
- `balanced`: the threshold that maximises accuracy per joule;
- `energy`: the smallest large share that keeps ≥ 90% of large-only accuracy.

A question goes large when its score ≥ the threshold, so the candidates are the distinct scores (each sends it
and every higher-scored question large) and one above them all (nothing goes large).
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUALITY_KEEP, ENERGY_KEEP = 0.98, 0.90


def operating_points(scores: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, small_j: np.ndarray,
                     large_j: np.ndarray, cascade: bool = False) -> list[dict[str, float]]:
    """Per candidate threshold (from none large to all large): large share, accuracy, mean joules per question.
    `cascade`: the small model answers every question first, so one sent large costs both answers."""
    scores = np.asarray(scores, dtype=np.float64)
    cands = [float(np.nextafter(scores.max(), np.inf)), *sorted(set(scores.tolist()), reverse=True)]
    points = []
    for t in cands:
        large = scores >= t
        acc = float(np.where(large, large_ok, small_ok).mean())
        joules = float(np.where(large, large_j + small_j if cascade else large_j, small_j).mean())
        points.append({"threshold": t, "large_share": float(large.mean()), "accuracy": acc, "joules": joules})
    return points


def outcome_preferences(scores: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, small_j: np.ndarray,
                        large_j: np.ndarray, cascade: bool = False) -> dict[str, Any]:
    """The three preferences' thresholds with what each buys (large share, accuracy, joules per question)."""
    points = operating_points(scores, small_ok, large_ok, small_j, large_j, cascade)
    large_only = float(np.mean(large_ok))

    def smallest_share(keep: float) -> dict[str, float]:
        # points run from the smallest share up: the first that keeps enough is the one
        return next(p for p in points if p["accuracy"] >= keep * large_only - 1e-12)

    per_joule = max(points, key=lambda p: (p["accuracy"] / p["joules"] if p["joules"] > 0 else np.inf,
                                          -p["large_share"]))
    return {"quality": smallest_share(QUALITY_KEEP), "balanced": per_joule, "energy": smallest_share(ENERGY_KEEP),
            "large_only_accuracy": large_only, "n": int(np.size(scores))}
