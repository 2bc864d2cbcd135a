"""The router: signals, decisions, tiers and fallbacks, training on real labels, the cascade on real answers."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from helpers import run_cli
from localmoe.chat.assistant import Assistant
from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import paths, settings
from localmoe.record.recorder import Recorder
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import Router, TokenEmbedder, cascade_inputs, features


def db_rows(sql):
    """Rows from the real SQLite file (only the recorder's code runs SQL in the package)."""
    conn = sqlite3.connect(paths.db_path())
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()

HARD = ("A shop sells pens at 3 dollars each. Tom buys 14 pens, then returns 5, and pays with a 50 dollar "
        "note. How much change does he get? Answer with a number only.")
EASY = "Which city is the capital of Japan?"


def extremes(strategy: str) -> tuple[str, str]:
    """From real runs of the small model: the right answer the router trusts most, the wrong one it trusts least."""
    r = Router(strategy)
    rows = router_train.shipped_labels()
    right = min((x for x in rows if not x["small_wrong"]), key=lambda x: r.score(x["question"], strategy)[0])
    wrong = max((x for x in rows if x["small_wrong"]), key=lambda x: r.score(x["question"], strategy)[0])
    return right["question"], wrong["question"]
ROUTE_KEYS = {"tier", "model", "strategy", "score", "threshold", "reason", "latency_ms"}


def test_features_see_the_work_in_a_question():
    hard, easy = features(HARD), features(EASY)
    assert hard["numbers"] == 4 and hard["multi_step"] >= 2
    assert easy["fact_question"] == 1 and easy["numbers"] == 0
    assert features("Compute 17 * 23 + 4")["operators"] >= 1
    assert features("Wie spät ist es in 東京?")["non_latin"] > 0


@pytest.mark.parametrize("strategy", ["features", "learned"])
def test_route_scores_hard_above_easy(strategy):
    r = Router(strategy)
    assert r.route(HARD).score > r.route(EASY).score
    # under `energy`: the shipped labels are 86% "small wrong", so `features` scores even its most trusted right
    # answer above the 0.5 of `balanced` (0.61), and every question would go large there
    r = Router(strategy, "energy")
    easy, hard = (r.route(q) for q in extremes(strategy))
    assert hard.tier == "large" and easy.tier == "small"
    assert hard.reason.startswith("large model:") and easy.reason.startswith("small model:")
    assert "chance the small model is wrong" in hard.reason


def test_preferences_order_thresholds():
    t = {p: Router("learned", p).threshold("learned") for p in ("quality", "balanced", "energy")}
    assert t["quality"] <= t["balanced"] <= t["energy"]
    assert Router("features", 0.42).threshold("features") == 0.42
    with pytest.raises(LocalmoeError):
        settings.parse_preference("greedy")


def test_route_cli_json(home):
    r = run_cli("route", HARD, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert ROUTE_KEYS <= set(d) and d["tier"] in ("small", "large")
    assert 0 <= d["score"] <= 1 and d["latency_ms"] > 0 and d["reason"]


def test_bad_prompts(home):
    r = run_cli("route", "  ")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("route", "What is 2 + 2? " * 7000, "--json")  # ~100k characters
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tier"] in ("small", "large")


def test_corrupt_router_file_falls_back_to_features(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "router.json").write_text('{"version": 1, "feature_names": ["nope"]}')
    r = run_cli("route", HARD, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["strategy"] == "features" and "unreadable" in d["notice"]


def test_settings_naming_a_missing_model_fall_back_with_a_notice(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nlarge = "/nowhere/big-moe.gguf"\n')
    r = run_cli("ask", HARD, "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "smollm2-135m-instruct" and out["route"]["tier"] == "small"
    assert "unavailable" in r.stderr and "Traceback" not in r.stderr
    (home / "settings.toml").write_text("[tiers\nlarge = ")
    r = run_cli("route", HARD)
    assert r.returncode == 1 and "not valid TOML" in r.stderr


def test_ask_routes_hard_to_the_moe_and_easy_to_the_small_model(home, tiny_moe):
    home.mkdir(parents=True, exist_ok=True)
    # `energy`: under `balanced` (0.5) `features` sends every question large (see test_route_scores_hard_above_easy)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n\n[router]\nstrategy = "features"\n'
                                        'preference = "energy"\n')
    easy_q, hard_q = extremes("features")
    hard = json.loads(run_cli("ask", hard_q, "--json", "--max-tokens", "8").stdout)
    easy = json.loads(run_cli("ask", easy_q, "--json", "--max-tokens", "8").stdout)
    assert hard["route"]["tier"] == "large" and hard["model"] == "tiny-moe"
    assert easy["route"]["tier"] == "small" and easy["model"] == "smollm2-135m-instruct"
    forced = json.loads(run_cli("ask", easy_q, "--json", "--max-tokens", "4", "--tier", "large").stdout)
    assert forced["model"] == "tiny-moe" and forced["route"]["strategy"] == "override"
    rows = db_rows("select tier, model, strategy, reason from routing_decisions order by message_id")
    assert [r["tier"] for r in rows] == ["large", "small", "large"] and all(r["reason"] for r in rows)


def test_learned_router_beats_features_on_held_out_real_labels(smollm):
    """Labels from real runs of the embedded model (assets/router/labels.jsonl), five stratified 75/25 splits.

    The learned strategy (the question's labelled neighbours in token-embedding space, stacked with the features
    estimate; hyperparameters by cross-validation inside each training split) ranks small-tier failures better than
    the features alone: on the mean over the five splits and on the shipped split (the first). The shipped file is
    exactly what training on the shipped labels produces, with `learned` as the default."""
    rows = router_train.shipped_labels()
    assert len(rows) >= 500 and 0 < np.mean([r["small_wrong"] for r in rows]) < 1
    embedder = TokenEmbedder(smollm.path)
    trained = router_train.train(rows, embedder)
    ev = trained["evaluation"]
    auc, split_auc = ev["auc"], ev["split_auc"]
    assert ev["splits"] == 5 and all(len(v) == 5 for v in split_auc.values())
    # 0.91 on the generated questions alone, 0.80 with 391 hand-written everyday ones, 0.74 with 785: they are
    # harder to rank
    assert auc["features"] > 0.7 and auc["cascade"] > 0.58
    assert auc["learned"] > auc["features"]
    assert split_auc["learned"][0] > split_auc["features"][0]  # the split the shipped router is fitted on
    # the probe adds the small model's own reading of the question (its signals are stored in the labels)
    assert auc["probe"] > auc["learned"] and split_auc["probe"][0] > split_auc["learned"][0]
    # the cascade, which has seen the answer, ranks best, but it is never the default (it answers twice when it
    # escalates): the best strategy that decides before answering is
    assert auc["cascade"] > auc["probe"]
    assert trained["default_strategy"] == "probe" == max((n for n in auc if n != "cascade"), key=auc.get)
    shipped = json.loads(open(router_train_path()).read())
    for name in auc:
        assert shipped["evaluation"]["auc"][name] == pytest.approx(auc[name], abs=1e-9)
    assert shipped["default_strategy"] == "probe"
    assert Router().strategy == "probe"


def test_learned_router_wins_on_fresh_splits(smollm):
    """Five splits move AUC by ±0.03 each, so the learned router's edge is also checked on 30 other splits (seeds
    100-129, never used to design or tune it): it must win on the mean and on most splits; and so must the probe over
    learned (measured: +0.030 and 93% of splits; +0.008 and 73%)."""
    trained = router_train.train(router_train.shipped_labels(), TokenEmbedder(smollm.path),
                                 seeds=tuple(range(100, 130)))
    split_auc = trained["evaluation"]["split_auc"]
    learned, feats = np.array(split_auc["learned"]), np.array(split_auc["features"])
    probe = np.array(split_auc["probe"])
    assert learned.mean() > feats.mean() + 0.004
    assert np.mean(learned > feats) >= 0.65
    assert probe.mean() > learned.mean() + 0.003
    assert np.mean(probe > learned) >= 0.6


def test_router_file_from_an_older_version_falls_back(tmp_path):
    old = json.loads(open(router_train_path()).read())
    old["version"] = 1
    (tmp_path / "router.json").write_text(json.dumps(old))
    r = Router(router_file=tmp_path / "router.json")
    assert r.strategy == "features" and "router train" in r.notices[0]
    assert r.route(HARD).strategy == "features"


def router_train_path():
    from localmoe.routing.router import trained_path

    return trained_path()


def _pick(rows, correct):
    """The labelled answer the shipped cascade model is surest about: the right one it scores lowest, or the wrong
    one it scores highest (greedy decoding gives the same answer again). Scored as the cascade escalates: the
    stacked model over learned, the question's stored probe signals and the answer's log-probabilities."""
    model = router_eval.LogisticModel.from_dict(json.loads(open(router_train_path()).read())["cascade_probe"])
    router = Router("learned")
    pool = [r for r in rows if r["small_wrong"] == (0 if correct else 1) and r["mean_logprob"] is not None]
    scores = model.predict(cascade_inputs(np.array([router.score(r["question"], "learned")[0] for r in pool]),
                                          np.array([r["probe"] for r in pool]),
                                          np.array([r["mean_logprob"] for r in pool]),
                                          np.array([r["min_logprob"] for r in pool])))
    return pool[int(np.argmin(scores) if correct else np.argmax(scores))], float(scores.min() if correct
                                                                                 else scores.max())


def test_cascade_escalates_on_a_wrong_answer_and_not_on_a_right_one(home, tiny_moe):
    rows = router_train.shipped_labels()
    (wrong, p_wrong), (right, p_right) = _pick(rows, correct=False), _pick(rows, correct=True)
    # a threshold of its own, whatever the shipped preferences' thresholds are
    assert p_right < 0.8 <= p_wrong
    s = settings.Settings(large=str(tiny_moe[1]), strategy="cascade", preference=0.8)
    a = Assistant(user_settings=s, overrides={"temperature": 0.0, "max_tokens": 96})
    try:
        r_wrong = a.ask(wrong["question"]).run()
        a.new_conversation()
        r_right = a.ask(right["question"]).run()
    finally:
        a.close()
    assert r_wrong.escalated and r_wrong.reply.model == "tiny-moe" and r_wrong.small_reply is not None
    assert "escalated" in r_wrong.decision.reason
    assert not r_right.escalated and r_right.reply.model == "smollm2-135m-instruct"
    # judged as the stacked model judges them: the answer's confidence with the probe's reading of the question
    assert f"{p_right:.0%} risk" in r_right.decision.reason, (p_right, r_right.decision.reason)
    assert f"estimated {p_wrong:.0%} chance" in r_wrong.decision.reason, (p_wrong, r_wrong.decision.reason)
    decisions = db_rows("select tier, escalated_from from routing_decisions order by message_id")
    assert [d["tier"] for d in decisions] == ["small", "large", "small"]
    assert decisions[1]["escalated_from"] is not None


def test_bench_router_reports_auc_share_and_apgr(home, tmp_path):
    src = router_train.shipped_labels()[:80]
    suite = tmp_path / "labelled.jsonl"
    # with the probe's stored signals, as the shipped labels have them: the cascade reads none live
    suite.write_text("".join(json.dumps({"question": r["question"], "small_correct": 1 - r["small_wrong"],
                                         "large_correct": 1, "mean_logprob": r["mean_logprob"],
                                         "min_logprob": r["min_logprob"], "probe": r["probe"]}) + "\n"
                             for r in src))
    r = run_cli("bench", "router", "--suite", str(suite), "--json", "--strategies", "features,learned,cascade")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["strategies"]) == {"features", "learned", "cascade"}
    bad = run_cli("bench", "router", "--suite", str(suite), "--strategies", "features,magic")
    assert bad.returncode == 2 and "unknown strategy 'magic'" in bad.stderr and "Traceback" not in bad.stderr
    f = out["strategies"]["features"]
    y = [r["small_wrong"] for r in src]
    scores = [Router("features").score(r["question"], "features")[0] for r in src]
    assert f["auc"] == pytest.approx(router_eval.auc(scores, y))
    assert 0 <= f["apgr"] <= 1 and set(f["large_share"]) == {"quality", "balanced", "energy"}
    assert f["accuracy_at_share"]["1.0"] == pytest.approx(1.0)
    human = run_cli("bench", "router", "--suite", str(suite), "--strategies", "features,learned")
    assert "APGR" in human.stdout

    # the probe reads each question with the small model (~0.25 s each): 5 right and 6 wrong answers, all
    # strategies by default
    few = [r for r in src if not r["small_wrong"]][:5] + [r for r in src if r["small_wrong"]][:6]
    suite.write_text("".join(json.dumps({"question": r["question"], "small_correct": 1 - r["small_wrong"],
                                         "mean_logprob": r["mean_logprob"], "min_logprob": r["min_logprob"]}) + "\n"
                             for r in few))
    out = json.loads(run_cli("bench", "router", "--suite", str(suite), "--json").stdout)
    assert set(out["strategies"]) == {"features", "learned", "probe", "cascade"}
    probe_scores = [Router("probe").score(r["question"], "probe")[0] for r in few]
    assert out["strategies"]["probe"]["auc"] == pytest.approx(
        router_eval.auc(probe_scores, [r["small_wrong"] for r in few]))


def test_labels_from_users_and_benchmarks_feed_training(home):
    with Recorder() as rec:
        a = Assistant(recorder=rec)
        a.label(None, "What is 12 * 13?", True, "retry")
        a.label(None, "Capital of Italy?", False, "thumbs")
        rows = router_train.collected_labels(rec, "smollm2-135m-instruct")
    assert {(r["question"], r["small_wrong"], r["source"]) for r in rows} == {
        ("What is 12 * 13?", 1, "retry"), ("Capital of Italy?", 0, "thumbs")}


def test_empty_prompt_is_refused_by_the_assistant(home):
    with pytest.raises(UsageError):
        Assistant().route("   ")


@pytest.mark.parametrize("strategy", ["features", "learned"])
@pytest.mark.parametrize("question", [EASY, "How many days are in a leap year?", "What is 12 * 13?",
                                      "What is 17 * 23 + 4? Answer with a number only."])
def test_tier_flips_at_a_threshold_set_just_around_the_score(strategy, question):
    """Fixed questions, the preference threshold set 0.01 either side of their own score: at or above the threshold
    the large tier answers, below it the small one, and the decision reports the threshold it was given."""
    score = Router(strategy).route(question).score
    assert 0.02 < score < 0.98  # room for the threshold on both sides
    above, below = Router(strategy, score + 0.01).route(question), Router(strategy, score - 0.01).route(question)
    assert (above.tier, below.tier) == ("small", "large")
    assert above.threshold == pytest.approx(score + 0.01) and below.threshold == pytest.approx(score - 0.01)
    assert above.score == pytest.approx(score) == below.score
    assert Router(strategy, score).route(question).tier == "large"  # ≥: a score on the threshold goes large


def test_router_train_end_to_end_from_bench_results_and_user_labels(home, tmp_path, tiny_moe):
    """A bench run of the small model and two user labels in the database; `router train --out` writes a router
    fitted on them beside the shipped labels; copied into the data dir, `route` uses it."""
    suite = tmp_path / "two.jsonl"
    suite.write_text('{"question": "What is 2 + 2? Answer with a number only.", "answer": "4"}\n'
                     '{"question": "What is 19 * 23? Answer with a number only.", "answer": "437"}\n')
    r = run_cli("bench", "--suite", str(suite), "--max-tokens", "8", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    with Recorder() as rec:
        a = Assistant(recorder=rec)
        a.label(None, "What is 12 * 13?", True, "retry")
        a.label(None, "Capital of Italy?", False, "thumbs")
    out = tmp_path / "mine.json"
    r = run_cli("router", "train", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    trained = json.loads(out.read_text())
    assert trained["sources"] == ["bench", "retry", "shipped", "thumbs"]
    ev = trained["evaluation"]
    assert ev["n_train"] + ev["n_test"] == len(router_train.shipped_labels()) + 4
    assert f"written to {out}" in r.stdout and "sources: bench, retry, shipped, thumbs" in r.stdout
    assert not (home / "router.json").exists()  # --out writes only where it is told

    # a probe model is fitted beside the others (the four new rows' signals are read by the small model:
    # test_router_probe's training test checks that reading itself)
    assert "probe" in trained and trained["evaluation"]["auc"]["probe"] > 0.5
    q = "What is 12 * 13?"
    shipped = Router("probe").route(q)
    (home / "router.json").write_text(out.read_text())
    # a large tier: with nothing larger than the small model, `ask` and `route` keep learned (test_router_probe)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    d = json.loads(run_cli("route", q, "--json").stdout)
    mine = Router("probe", router_file=out).route(q)
    assert d["strategy"] == trained["default_strategy"] == "probe"
    assert "unreadable" not in (d.get("notice") or "") and "router train" not in (d.get("notice") or "")
    assert d["score"] == pytest.approx(mine.score, abs=1e-9) and d["threshold"] == mine.threshold
    assert abs(mine.score - shipped.score) > 1e-6  # a different router from the shipped one, and route used it


def test_a_missing_large_tier_and_its_hint_are_told_once_per_session(home):
    """#19 item 5: the fallback notice and the way to add a large model come with the first hard question only;
    later small answers to hard questions are still marked probably wrong."""
    a = Assistant(strategy="features")
    try:
        first, second = a.route(HARD, load=False), a.route(HARD + " ", load=False)
    finally:
        a.close()
    for d in (first, second):
        assert d.wanted == "large" and d.tier == "small" and "likely wrong" in d.warning
    assert "no large model is available" in first.notice and " — " in first.warning
    assert second.notice is None and " — " not in second.warning


def test_an_unreadable_router_file_is_told_once(tmp_path):
    bad = tmp_path / "router.json"
    bad.write_text("{}")
    r = Router(router_file=bad)
    assert "unreadable" in r.route(HARD).notice
    assert r.route(HARD).notice is None
