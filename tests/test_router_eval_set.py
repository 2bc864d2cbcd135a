"""The router's independent evaluation set (assets/suites/router_eval.jsonl): hand-written, never trained or tuned
on, labelled by real greedy answers of the embedded SmolLM2 (benchmarks/router_eval_labels.jsonl), and
`bench router` reports it per strategy beside the digit-count and length baselines."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_cli
from localmoe.bench import suites
from localmoe.bench.scoring import LETTERS, normalize
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "assets" / "suites" / "router_eval.jsonl"
EVAL_LABELS = ROOT / "benchmarks" / "router_eval_labels.jsonl"
# The kinds the training suite lacks, and the wordings of the kinds it has, with at least this many questions each.
KINDS = {"conversation": 25, "instruction": 25, "definition": 25, "unit": 20, "code": 25, "follow_up": 20,
         "fact": 20, "arithmetic": 20, "reasoning": 15}
SIZE = 226


@pytest.fixture(scope="module")
def eval_set() -> suites.Suite:
    return suites.load_suite(str(EVAL_SET))


def test_set_loads_with_the_stated_kinds_and_size(eval_set):
    assert eval_set.errors == [] and len(eval_set.items) == SIZE
    counts = Counter(i.category for i in eval_set.items)
    assert set(counts) == set(KINDS)
    assert all(counts[k] >= n for k, n in KINDS.items()), counts
    assert {i.kind for i in eval_set.items} == {"numeric", "exact", "choice"}
    assert {i.difficulty for i in eval_set.items} == {1, 2, 3, 4, 5}
    assert len({normalize(i.question) for i in eval_set.items}) == SIZE  # no duplicates


def test_no_question_is_in_the_training_suite_or_labels(eval_set):
    training = {normalize(i.question) for i in suites.load_suite("router-train").items}
    training |= {normalize(r["question"]) for r in router_train.shipped_labels()}
    assert not [i.id for i in eval_set.items if normalize(i.question) in training]
    # nor does any use the training generator's answer-format tails
    tails = (suites.NUMBER_ONLY, suites.DATE_ONLY, suites.WEEKDAY_ONLY, "Answer with one word.")
    assert not [i.id for i in eval_set.items if any(t in i.question for t in tails)]


def _stem(item: suites.Item) -> set[str]:
    """The question's words without its lettered options (shared option words are not a shared question)."""
    return set(re.findall(r"[a-z0-9]+", item.question.split("\nA)")[0].lower()))


def _answer(item: suites.Item) -> str:
    if item.kind == "choice" and item.choices:
        return normalize(item.choices[LETTERS.index(item.answer.strip().upper())])
    return normalize(item.answer)


def near(a: suites.Item, b: suites.Item) -> bool:
    """The same question in other words: most words shared, or a third of them and the same answer."""
    wa, wb = _stem(a), _stem(b)
    overlap = len(wa & wb) / max(1, len(wa | wb))
    return overlap >= 0.6 or (overlap >= 0.3 and _answer(a) == _answer(b))


def test_no_hand_written_training_question_is_an_evaluation_question_reworded(eval_set):
    """The hand-written part of the training suite was written without reading the evaluation set, in two batches,
    and then every question that `near` matches to an evaluation question was struck out (93 of 484, then 29 of
    451; the second batch also lost 28 near repeats of the first): writers asked for varied everyday questions ask
    many of the same ones ("What does HTML stand for?")."""
    varied = suites.load_suite(str(ROOT / "assets" / "suites" / "router_train_varied.jsonl"))
    assert varied.errors == [] and len(varied.items) == 785
    assert not [(t.question, e.question) for t in varied.items for e in eval_set.items if near(t, e)]
    # the rule does catch rewordings
    q = suites.Item("x", "what does HTML stand for", "HyperText Markup Language", "exact")
    assert near(q, next(e for e in eval_set.items if e.question == "What does HTML stand for?"))


def test_labels_come_from_the_set(eval_set):
    rows = [json.loads(line) for line in EVAL_LABELS.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["question"]) for r in rows] == [(i.id, i.question) for i in eval_set.items]
    assert all(r["small_correct"] in (0, 1) and isinstance(r["small_output"], str) for r in rows)
    assert all("large_correct" not in r for r in rows)  # the training labels' assumption: the large tier is right
    wrong = sum(1 - r["small_correct"] for r in rows)
    assert 0 < wrong < len(rows)  # both outcomes, so AUC is defined


def test_bench_router_on_the_set_reports_auc_for_strategies_and_baselines(home):
    # every strategy but the probe, which reads each question with the small model (test_router_probe has it), and
    # the cascade, which does too (its figures are checked on the stored signals of the held-out split below)
    r = run_cli("bench", "router", "--suite", str(EVAL_LABELS), "--json", "--strategies", "features,learned")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == SIZE
    assert set(out["strategies"]) == {"features", "learned"}
    assert set(out["baselines"]) == set(router_eval.BASELINES) == {"digits", "length"}
    for row in (*out["strategies"].values(), *out["baselines"].values()):
        assert 0 <= row["auc"] <= 1
        assert 0 < row["cpt"]["50%"] <= row["cpt"]["80%"] <= 1
    rows = router_train.read_labels(EVAL_LABELS)
    digits = [router_eval.BASELINES["digits"](x["question"]) for x in rows]
    assert out["baselines"]["digits"]["auc"] == pytest.approx(router_eval.auc(digits, [x["small_wrong"] for x in rows]))
    human = run_cli("bench", "router", "--suite", str(EVAL_LABELS), "--strategies", "features,learned")
    assert human.returncode == 0, human.stderr
    for name in ("features", "learned", "baseline: digits", "baseline: length", "CPT 50%/80%"):
        assert name in human.stdout


def test_held_out_is_the_split_router_train_holds_out(home):
    """The probe and the cascade score the held-out rows with the signals stored beside their labels, as training
    did (no small-model reads: the file has them all)."""
    r = run_cli("bench", "router", "--suite", str(ROOT / "assets" / "router" / "labels.jsonl"), "--held-out", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    shipped = json.loads((ROOT / "assets" / "router" / "router.json").read_text())["evaluation"]
    assert out["held_out"] and out["n"] == shipped["n_test"]
    # the shipped router's own first-split AUC, recomputed from its held-out rows
    for name in ("features", "learned", "probe", "cascade"):
        assert out["strategies"][name]["auc"] == pytest.approx(shipped["split_auc"][name][0], abs=1e-9)


def test_cpt_hand_checked():
    y = [1, 1, 0, 0]  # 1 = small wrong; a perfect router sends the two wrong ones first
    small, large = [0, 0, 1, 1], [1, 1, 1, 1]
    assert router_eval.cpt(y, small, large, 0.5) == pytest.approx(0.25)
    assert router_eval.cpt(y, small, large, 1.0) == pytest.approx(0.5)
    # the inverted router reaches the wrong pair last, between shares 0.5 (PGR 0) and 1.0 (PGR 1)
    inverted = [0, 0, 1, 1]
    assert router_eval.cpt(inverted, small, large, 0.8) == pytest.approx(0.9)
    assert router_eval.cpt([1, 2, 3, 4], [1, 1, 1, 1], [1, 1, 1, 1], 0.8) == 0.0  # no gap
