"""What issue 19's CPT(80%) ≤ 0.62 target asks of a router's ranking on the independent evaluation set, beside what
the shipped strategies do there.

With the large tier assumed right, CPT(80%) ≤ 0.62 means: the 62% of questions scored highest hold 80% of the small
model's failures. On a set where a share `w` of the small answers are wrong, that is one point of the ROC curve:
TPR 0.8 at FPR (0.62 - 0.8 w) / (1 - w). The AUC such a point implies under the usual equal-variance binormal model
is Φ(d' / √2) with d' = Φ⁻¹(0.8) + Φ⁻¹(1 - FPR). For each strategy the script also prints what it catches when 62%
of the questions go large, and its AUC.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_cpt_ceiling.py
"""

from __future__ import annotations

import sys
from math import sqrt
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_eval_bootstrap import LABELS, ROOT, scores  # noqa: E402

from localmoe.routing import evaluate as router_eval  # noqa: E402
from localmoe.routing import train as router_train  # noqa: E402

SHARE, RECOVER = 0.62, 0.8
N = NormalDist()


def caught_at(score: np.ndarray, y: np.ndarray, share: float) -> float:
    """The share of failures among the `share` of questions scored highest (ties broken by order, as a threshold
    between operating points would interpolate)."""
    k = int(round(share * len(y)))
    top = np.argsort(-score, kind="stable")[:k]
    return float(y[top].sum() / y.sum())


def main() -> None:
    shipped = ROOT / "assets" / "router" / "router.json"
    for name in LABELS:
        rows = router_train.read_labels(ROOT / name)
        y = np.array([r["small_wrong"] for r in rows], dtype=np.int64)
        w = y.mean()
        fpr = (SHARE - RECOVER * w) / (1 - w)
        d = N.inv_cdf(RECOVER) + N.inv_cdf(1 - fpr)
        print(f"{name}: {len(y)} questions, small wrong {w:.3f}; CPT(80%) ≤ {SHARE} needs TPR {RECOVER} at FPR "
              f"{fpr:.3f}: binormal d' {d:.2f}, AUC {N.cdf(d / sqrt(2)):.3f}; a perfect router needs "
              f"{RECOVER * w:.3f}")
        runs = {s: scores(shipped, rows, s) for s in ("cascade", "probe", "learned")}
        runs["digits"] = np.array([router_eval.BASELINES["digits"](r["question"]) for r in rows], dtype=np.float64)
        for s, score in runs.items():
            auc = router_eval.auc(score, y)
            cpt = router_eval.cpt(score, 1 - y, np.ones_like(y), RECOVER)
            print(f"  {s:8s} AUC {auc:.3f}, CPT(80%) {cpt:.3f}; failures caught with {SHARE:.0%} sent large: "
                  f"{caught_at(score, y, SHARE):.3f}")


if __name__ == "__main__":
    main()
