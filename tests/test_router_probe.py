"""The probe strategy: the small model's own reading of the question (first-token entropy and top probability,
prompt mean log-probability) added to `learned`, on the embedded SmolLM2 and the shipped router."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from helpers import run_cli
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.errors import LocalmoeError
from localmoe.home import models
from localmoe.routing import train as router_train
from localmoe.routing.probe import SIGNALS, Prober, signals_from_logits
from localmoe.routing.router import Router, TokenEmbedder, log_odds, trained_path

EASY = "Which city is the capital of Japan?"
HARD = ("A shop sells pens at 3 dollars each. Tom buys 14 pens, then returns 5, and pays with a 50 dollar "
        "note. How much change does he get? Answer with a number only.")


def test_signals_from_logits_by_hand():
    # two positions over a three-token vocabulary; row 0 predicts token 1 of the prompt, row 1 the answer's first
    logits = np.array([[0.0, math.log(3.0), 0.0], [math.log(2.0), 0.0, 0.0]])
    entropy, top_p, mean_lp = signals_from_logits(logits, [0, 1])
    p = np.array([0.5, 0.25, 0.25])  # softmax of row 1
    assert entropy == pytest.approx(-(p * np.log(p)).sum())
    assert top_p == pytest.approx(0.5)
    assert mean_lp == pytest.approx(math.log(3 / 5))  # P(token 1 | row 0) = 3 / (1 + 3 + 1)


def test_the_probe_reuses_the_templates_prefix_and_gives_a_fresh_evaluations_signals(smollm):
    """Questions share the chat template's system prompt: the second question evaluates only what differs, and its
    signals are those of a full evaluation from an empty context."""
    prober = Prober(smollm.path)
    first = prober.signals(EASY)
    engine = prober._engine
    evaluated: list[int] = []
    real_eval = engine._llm.eval

    def counting_eval(tokens):
        evaluated.append(len(tokens))
        return real_eval(tokens)

    engine._llm.eval = counting_eval
    second = prober.signals(HARD)
    again = prober.signals(EASY)  # memo: no evaluation
    tokens = engine.prompt_tokens([{"role": "user", "content": HARD}])
    assert len(evaluated) == 1 and 0 < evaluated[0] < len(tokens) - 5
    assert np.array_equal(again, first)
    # a fresh engine rendering the question as the product does (the catalog's system prompt)
    fresh = LlamaCppEngine(smollm.path, n_ctx=512, logits_all=True, system_prompt=models.system_prompt(smollm.path))
    try:
        for q, got in ((HARD, second), (EASY, first)):
            toks = fresh.prompt_tokens([{"role": "user", "content": q}])
            want = signals_from_logits(fresh.logits(toks), toks)
            assert got == pytest.approx(want, abs=1e-3), q
    finally:
        fresh.close()
        prober.close()
    assert second[0] > 0 and 0 < second[1] <= 1 and second[2] < 0


def test_probe_scores_are_learneds_log_odds_plus_the_probe_models(smollm):
    """The shipped router has a probe model over the three signals; a decision's score is the sum of learned's
    log-odds and that model's less the base rate's (counted once), computed here by hand from the file."""
    data = json.loads(trained_path().read_text())
    assert data["probe_signals"] == list(SIGNALS) and len(data["probe"]["weights"]) == 3
    r = Router("probe", small_model_path=smollm.path)
    assert r.strategy == "probe"
    for q in (EASY, HARD):
        d = r.route(q)
        p_learned = r.score(q, "learned")[0]
        sig = Prober(smollm.path).signals(q)
        w = np.array(data["probe"]["weights"])
        z_probe = float(w @ ((sig - np.array(data["probe"]["mean"])) / np.array(data["probe"]["std"]))
                        + data["probe"]["bias"])
        prior = data["probe_prior"]
        assert prior == pytest.approx(np.mean([r["small_wrong"] for r in router_train.shipped_labels()]), abs=0.02)
        want = 1 / (1 + math.exp(-(float(log_odds(p_learned)) + z_probe - math.log(prior / (1 - prior)))))
        assert d.strategy == "probe" and d.score == pytest.approx(want, abs=1e-6)
        assert d.threshold == pytest.approx(data["thresholds"]["probe"]["balanced"])
        assert "probe" in d.signals and d.notice is None
    assert r.route(HARD).score > r.route(EASY).score


def test_route_cli_with_the_probe(home):
    r = run_cli("route", HARD, "--json", "--strategy", "probe")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["strategy"] == "probe" and set(d["preferences"]) == {"quality", "balanced", "energy"}
    assert "probe" in d["signals"] and "Traceback" not in r.stderr


def test_a_question_too_long_to_probe_is_routed_by_learned_and_said_once(smollm):
    r = Router("probe", small_model_path=smollm.path)
    long_q = "Tell me about this: " + "the quick brown fox jumps over the lazy dog " * 80
    first, second = r.route(long_q), r.route(long_q + "?")
    assert first.strategy == second.strategy == "learned"
    assert "too long" in first.notice and second.notice is None
    assert first.threshold == pytest.approx(r.threshold("learned"))
    assert r.route(EASY).strategy == "probe"


def test_a_small_model_the_probe_cannot_read_falls_back_to_learned_once(smollm, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    prober = Prober(bad)
    r = Router("probe", small_model_path=smollm.path, prober=prober)
    d = r.route(HARD)
    assert d.strategy == "learned" and "broken.gguf" in d.notice and "learned" in d.notice
    # the failure is kept: later questions do not try to load the model again
    import localmoe.engine.llamacpp as llamacpp

    tried = []
    real = llamacpp.LlamaCppEngine.__init__

    def counting(self, *a, **kw):
        tried.append(a)
        real(self, *a, **kw)

    llamacpp.LlamaCppEngine.__init__ = counting
    try:
        e = r.route(EASY)
    finally:
        llamacpp.LlamaCppEngine.__init__ = real
    assert e.notice is None and e.strategy == "learned" and tried == []


def test_a_small_tier_that_is_not_a_gguf_routes_by_features_with_one_notice(tiny_moe):
    """A safetensors small tier: learned's embedder cannot read it either, so the probe falls straight back to
    features, said in one sentence."""
    r = Router("probe", small_model_path=tiny_moe[0])
    d = r.route(HARD)
    assert d.strategy == "features" and d.notice.count("routing with") == 1 and "features strategy" in d.notice
    assert r.route(EASY).notice is None


def test_a_router_file_without_a_probe_model_says_so_and_routes_by_learned(tmp_path, smollm):
    data = json.loads(trained_path().read_text())
    del data["probe"]
    (tmp_path / "router.json").write_text(json.dumps(data))
    r = Router("probe", router_file=tmp_path / "router.json", small_model_path=smollm.path)
    assert r.strategy == "learned" and "no probe model" in r.notices[0]
    # a bad probe section costs the probe only: the other strategies of the file still route
    good = json.loads(trained_path().read_text())
    for bad in ({"probe_prior": 1.5}, {"probe_prior": "nan"}, {"probe": {**good["probe"], "weights": [1.0, 2.0]}},
                {"probe": {**good["probe"], "weights": [1.0, 2.0, 3.0, 4.0], "mean": [0] * 4, "std": [1] * 4}}):
        (tmp_path / "router.json").write_text(json.dumps({**good, **bad}))
        r = Router("probe", router_file=tmp_path / "router.json", small_model_path=smollm.path)
        assert r.trained is not None and r.strategy == "learned", bad
        assert "probe model is unreadable" in r.notices[0] and len(r.notices) == 1, r.notices
        assert r.route(EASY).strategy == "learned"
        assert Router(router_file=tmp_path / "router.json", small_model_path=smollm.path).strategy == "learned"


def test_training_fits_the_probe_from_stored_signals_and_reads_the_rest(smollm):
    """Shipped labels carry their signals; rows without them are read by the prober; with no prober and too few
    rows with signals, no probe model is written."""
    rows = router_train.shipped_labels()[:300]
    assert all(r["probe"] is not None and len(r["probe"]) == 3 for r in rows)
    stored = [list(r["probe"]) for r in rows[:3]]
    for r in rows[:3]:
        r["probe"] = None
    prober = Prober(smollm.path)
    router_train.fill_probe(rows, prober)
    for r, want in zip(rows[:3], stored, strict=True):
        assert r["probe"] == pytest.approx(want, abs=1e-3)
    trained = router_train.train(rows, TokenEmbedder(smollm.path), seeds=(0,))
    assert "probe" in trained and "probe" in trained["thresholds"] and "probe" in trained["evaluation"]["auc"]
    for r in rows:
        r["probe"] = None
    trained = router_train.train(rows, TokenEmbedder(smollm.path), seeds=(0,))
    assert "probe" not in trained and "probe" not in trained["evaluation"]["auc"]


def test_a_bad_probe_value_in_a_label_file_is_one_line(tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text(json.dumps({"question": "q", "small_correct": 1, "probe": [1.0, "x", 2.0]}) + "\n")
    with pytest.raises(LocalmoeError, match=r"labels.jsonl:1: bad label line"):
        router_train.read_labels(f)


def test_the_assistant_probes_only_when_a_larger_tier_could_answer(home, tiny_moe):
    """With only the small model installed the decision cannot change who answers: `learned` marks a probably wrong
    answer without loading the probe's model. With a large tier the default strategy, `probe`, decides."""
    from localmoe.chat.assistant import Assistant

    alone = Assistant()
    alone.warm_router()
    d = alone.route(HARD, load=False)
    assert alone.router.strategy == "probe" and d.strategy == "learned" and d.tier == "small" and d.wanted == "large"
    assert "prober" not in alone.router.__dict__  # never made
    named = Assistant(strategy="probe")  # a user who names the probe gets it
    assert named.route(HARD, load=False).strategy == "probe"
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    both = Assistant()
    both.warm_router()  # the chat loads the probe's model before the first question
    assert both.router.prober._engine is not None and both.router.prober._engine.loaded
    d = both.route(HARD, load=False)
    assert d.strategy == "probe" and d.tier == "large" and "probe" in d.signals
    # an answering decision is metered on the small tier's meter (the probe evaluates the question there)
    metered = both.route(HARD)
    assert metered.strategy == "probe" and metered.joules > 0 and metered.to_dict()["joules"] == metered.joules
    both.close()
    assert both.router.prober._engine is None


def test_the_cascade_reads_the_question_only_when_it_could_escalate(home, tiny_moe):
    """With nothing larger installed the cascade's answer is never judged, so its decision does not load or run the
    probe (features records its estimate, in well under a second); with a large tier it reads the question, and
    the chat loads the probe's model ahead."""
    from localmoe.chat.assistant import Assistant

    alone = Assistant(strategy="cascade")
    alone.warm_router()
    d = alone.route(HARD)
    assert d.strategy == "cascade" and d.tier == "small" and "by features" in d.reason
    assert "prober" not in alone.router.__dict__ and d.notice is None
    alone.close()
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n[router]\nstrategy = "cascade"\n')
    both = Assistant()
    both.warm_router()
    assert both.router.prober._engine is not None and both.router.prober._engine.loaded
    d = both.route(HARD)
    assert d.strategy == "cascade" and d.tier == "small" and "by the probe" in d.reason and d.joules > 0
    both.close()


def test_the_cascade_with_a_probe_that_cannot_load_judges_by_confidence_alone_once(smollm, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = Router("cascade", small_model_path=smollm.path, prober=Prober(bad))
    d = r.route(HARD)
    assert d.strategy == "cascade" and "broken.gguf" in d.notice and "confidence alone" in d.notice
    assert "by features" in d.reason and r.route(EASY).notice is None
    c = json.loads(trained_path().read_text())["cascade"]
    z = float(np.array(c["weights"]) @ ((np.array([-0.5, -2.0]) - np.array(c["mean"])) / np.array(c["std"]))
              + c["bias"])
    assert r.cascade_score(-0.5, -2.0, HARD) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-6)


@pytest.mark.parametrize("strategy", ["probe", "cascade"])
def test_loading_the_probes_model_is_not_charged_to_the_first_decision(home, tiny_moe, monkeypatch, strategy):
    """As loading the answering model is not metered, neither is loading the probe's: it is loaded before the
    decision's sampler starts, and the decision's joules are its prompt evaluation's. The cascade reads the
    question with the probe too (it judges the answer with those signals)."""
    from localmoe.chat.assistant import Assistant
    from localmoe.chat.session import Session

    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n[router]\nstrategy = "{strategy}"\n')
    a = Assistant()
    loaded_at_start = []
    real = Session.sampler

    def spy(self):
        prober = a.router.__dict__.get("prober")
        loaded_at_start.append(prober is not None and prober._engine is not None)
        return real(self)

    monkeypatch.setattr(Session, "sampler", spy)
    d = a.route(HARD)
    a.close()
    assert loaded_at_start == [True] and d.strategy == strategy and d.joules > 0


def test_the_cascade_judges_an_answer_with_what_the_probe_knew(smollm, tmp_path):
    """After a small answer the cascade's score is the stacked model of the router file over learned's log-odds,
    the question's three signals and the answer's mean and lowest token log-probability, computed here by hand.
    Where the probe cannot read the question, or the file has no stacked model, the answer's confidence alone
    decides, said once."""
    data = json.loads(trained_path().read_text())
    assert data["cascade_inputs"] == ["learned", *SIGNALS, "answer_mean_logprob", "answer_min_logprob"]
    m = data["cascade_probe"]
    r = Router("cascade", small_model_path=smollm.path)
    d = r.route(HARD)
    assert d.strategy == "cascade" and d.tier == "small" and "by the probe" in d.reason and d.notice is None
    assert d.score == pytest.approx(r.score(HARD, "probe")[0])  # the pre-answer estimate on record
    for mean_lp, min_lp in ((-0.2, -1.0), (-1.5, -6.0)):
        x = np.array([float(log_odds(r.score(HARD, "learned")[0])), *Prober(smollm.path).signals(HARD),
                      mean_lp, min_lp])
        z = float(np.array(m["weights"]) @ ((x - np.array(m["mean"])) / np.array(m["std"])) + m["bias"])
        assert r.cascade_score(mean_lp, min_lp, HARD) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-6)
    # an unsure answer is more likely wrong than a sure one to the same question
    assert r.cascade_score(-1.5, -6.0, HARD) > r.cascade_score(-0.2, -1.0, HARD)
    # and the question counts: the same confidence on a question the probe finds hard scores higher
    assert r.cascade_score(-0.5, -2.0, HARD) > r.cascade_score(-0.5, -2.0, EASY)

    def alone(mean_lp: float, min_lp: float) -> float:
        c = data["cascade"]
        x = (np.array([mean_lp, min_lp]) - np.array(c["mean"])) / np.array(c["std"])
        return 1 / (1 + math.exp(-float(np.array(c["weights"]) @ x + c["bias"])))

    long_q = "Tell me about this: " + "the quick brown fox jumps over the lazy dog " * 80
    first, second = r.route(long_q), r.route(long_q + "!")
    assert first.strategy == "cascade" and "confidence alone" in first.notice and second.notice is None
    assert r.cascade_score(-0.5, -2.0, long_q) == pytest.approx(alone(-0.5, -2.0), abs=1e-6)
    assert r.cascade_score(-0.5, -2.0) == pytest.approx(alone(-0.5, -2.0), abs=1e-6)  # no question given

    del data["cascade_probe"]
    (tmp_path / "router.json").write_text(json.dumps(data))
    old = Router("cascade", router_file=tmp_path / "router.json", small_model_path=smollm.path)
    assert "by features" in old.route(HARD).reason and "prober" not in old.__dict__  # no probe loaded for it
    assert old.cascade_score(-0.5, -2.0, HARD) == pytest.approx(alone(-0.5, -2.0), abs=1e-6)
    good = json.loads(trained_path().read_text())
    for broken in ({"cascade_probe": {**m, "weights": [1.0, 2.0]}},
                   {"cascade_inputs": list(reversed(good["cascade_inputs"]))},  # a future order is not read as this
                   {"probe": {**good["probe"], "weights": [1.0]}}):  # the probe dropped: the cascade cannot read
        (tmp_path / "router.json").write_text(json.dumps({**good, **broken}))
        bad = Router("cascade", router_file=tmp_path / "router.json", small_model_path=smollm.path)
        assert "cascade_probe" not in bad.trained, broken
        assert "by features" in bad.route(HARD).reason and "prober" not in bad.__dict__, broken
        assert bad.cascade_score(-0.5, -2.0, HARD) == pytest.approx(alone(-0.5, -2.0), abs=1e-6)


def test_training_stacks_the_cascade_and_never_makes_it_the_default(smollm):
    """The cascade's model is fitted on rows with both the probe's signals and the answer's log-probabilities; it
    ranks held-out failures better than the probe (it has seen the answer) but answers every question twice when it
    escalates, so the default is the best strategy that decides before answering."""
    rows = router_train.shipped_labels()
    trained = router_train.train(rows, TokenEmbedder(smollm.path), seeds=(0,))
    auc = trained["evaluation"]["auc"]
    assert len(trained["cascade_probe"]["weights"]) == 6 and "cascade" in trained["thresholds"]
    assert auc["cascade"] > auc["probe"] > auc["learned"]
    assert trained["default_strategy"] == "probe"
    assert router_train._default({"cascade": 0.9, "features": 0.6, "learned": 0.7}) == "learned"
    for r in rows:
        r["probe"] = None
    plain = router_train.train(rows, TokenEmbedder(smollm.path), seeds=(0,))
    assert "cascade_probe" not in plain and "cascade" in plain["evaluation"]["auc"]
