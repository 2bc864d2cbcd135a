"""`localmoe router calibrate` end to end (#19 item 1): the embedded SmolLM2 as the small tier and a tiny real MoE
GGUF as the large one answer a small suite; an interrupted calibration resumes without asking a question twice;
both tiers' real outcomes are recorded; the router is retrained and `route` loads it; the three preference
thresholds equal a hand computation on the recorded outcomes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from localmoe.routing.router import Router, cascade_inputs

SMALL, LARGE = "smollm2-135m-instruct", "tiny-moe"
# The tiny MoE has random weights: it answers nothing right. So that the large tier is right where the small one
# is wrong (and the 98%/90% thresholds have something to keep), the "magic" questions' expected answers are the
# tiny MoE's own greedy replies, taken before the calibration; the calibration's verdicts are still real ones.
MAGIC = ["Say the secret word.", "Name the hidden code.", "Tell me the password.", "What is the mystery phrase?"]
QUESTIONS = [
    ("What is the capital of France? Answer with one word.", "Paris"),
    ("What is 48 × 27 − 13? Answer with a number only.", "1283"),
    ("What is 365 × 24 ÷ 8? Answer with a number only.", "1095"),
    ("What is 1234 + 5678 − 910? Answer with a number only.", "6002"),
    ("What is 7 × 8? Answer with a number only.", "56"),
    ("Which planet do we live on? Answer with one word.", "Earth"),
]
LIMIT = 8


def db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "localmoe.db")
    conn.row_factory = sqlite3.Row
    return conn


def start(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localmoe", "router", "calibrate", *args],
                            env={**os.environ, "LOCALMOE_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def hand_thresholds(scores, small_ok, large_ok, small_j, large_j, cascade=False) -> dict[str, tuple[float, float]]:
    """(large share, accuracy) each preference buys, by brute force over every set of top-scored questions
    sent large: quality and energy the smallest share keeping 98% / 90% of large-only accuracy, balanced the
    highest accuracy per joule (the smaller share on a tie)."""
    options = []
    for cut in [np.inf, *sorted(set(scores), reverse=True)]:
        large = scores >= cut
        acc = float(np.where(large, large_ok, small_ok).mean())
        joules = float(np.where(large, large_j + (small_j if cascade else 0), small_j).mean())
        options.append((float(large.mean()), acc, joules))
    best = float(np.mean(large_ok))
    keep = {name: min((o for o in options if o[1] >= share * best - 1e-12), key=lambda o: o[0])
            for name, share in (("quality", 0.98), ("energy", 0.90))}
    balanced = max(options, key=lambda o: (o[1] / o[2], -o[0]))
    return {"quality": keep["quality"][:2], "balanced": balanced[:2], "energy": keep["energy"][:2]}


def tiny_answer(model: Path, question: str) -> str:
    """The tiny MoE's reply as the calibration asks (the bench runner's greedy config), in this process."""
    from localmoe.chat.session import Session
    from localmoe.engine import GenerationConfig
    from localmoe.home import models
    from localmoe.record.recorder import Recorder

    session = Session(models.resolve(str(model)), recorder=Recorder.in_memory(),
                      config=GenerationConfig(max_tokens=128, temperature=0.0, logprobs=True))
    try:
        return session.ask(question).run().text.strip()
    finally:
        session.engine.close()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, tiny_moe: tuple[Path, Path]) -> Path:
    """A calibration killed after a few answers, then resumed to the end (in a data dir of its own)."""
    tmp_path = tmp_path_factory.mktemp("calibrate")
    home = tmp_path / "home"
    home.mkdir()
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    suite = tmp_path / "cal.jsonl"
    magic = [(q, tiny_answer(tiny_moe[1], q), "exact") for q in MAGIC]
    mixed = [x for pair in zip(magic, [(q, a, None) for q, a in QUESTIONS], strict=False) for x in pair]
    mixed += [(q, a, None) for q, a in QUESTIONS[len(magic):]]
    suite.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a, "category": "mixed",
                                         **({"kind": kind} if kind else {})}) + "\n"
                             for i, (q, a, kind) in enumerate(mixed)))
    proc = start(home, "--suite", str(suite), "--limit", str(LIMIT))
    lines = []
    for line in proc.stderr:  # one progress line per answer when stderr is not a terminal
        lines.append(line)
        if f"3/{2 * LIMIT}" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    before = db(home).execute("select count(*) from bench_items").fetchone()[0]
    assert 3 <= before < 2 * LIMIT
    r = run_cli("router", "calibrate", "--resume", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count(f"/{2 * LIMIT}") == 2 * LIMIT - before  # only the rest
    out = json.loads(r.stdout)
    assert out["n"] == LIMIT and out["router"] == str(home / "router.json")
    return home


def test_an_interrupted_calibration_resumes_and_records_both_tiers(calibrated: Path):
    conn = db(calibrated)
    runs = conn.execute("select id, status, purpose from bench_runs").fetchall()
    assert [(r["status"], r["purpose"]) for r in runs] == [("complete", "calibration")]
    items = conn.execute("select model, item_id, correct, joules, completion_tokens from bench_items").fetchall()
    assert len(items) == 2 * LIMIT and len({(r["model"], r["item_id"]) for r in items}) == 2 * LIMIT
    for model in (SMALL, LARGE):
        assert sorted(r["item_id"] for r in items if r["model"] == model) == sorted(f"q{i}" for i in range(LIMIT))
    assert all(r["correct"] in (0, 1) and r["joules"] > 0 and r["completion_tokens"] > 0 for r in items)
    # no question answered twice: one complete answer per question and tier (the kill may have cut one short)
    answered = conn.execute(
        "select a.model as model, q.content as question, count(*) as n from messages q join messages a "
        "on a.reply_to = q.id join conversations c on c.id = q.conversation_id "
        "where c.kind = 'bench' and a.status = 'complete' group by a.model, q.content").fetchall()
    assert len(answered) == 2 * LIMIT and all(r["n"] == 1 for r in answered)
    asked = conn.execute("select count(*) from messages m join conversations c on c.id = m.conversation_id "
                         "where c.kind = 'bench' and m.role = 'user'").fetchone()[0]
    assert asked <= 2 * LIMIT + 1


def test_the_calibrated_router_is_loaded_and_its_thresholds_are_the_outcomes(calibrated: Path, tiny_moe):
    conn = db(calibrated)
    rows = conn.execute(
        "select b.model, b.item_id, b.question, b.correct, b.joules, g.mean_logprob, g.min_logprob "
        "from bench_items b left join generations g on g.message_id = b.message_id").fetchall()
    small = {r["item_id"]: r for r in rows if r["model"] == SMALL}
    large = {r["item_id"]: r for r in rows if r["model"] == LARGE}
    ids = sorted(small)
    small_ok = np.array([small[i]["correct"] for i in ids], dtype=float)
    large_ok = np.array([large[i]["correct"] for i in ids], dtype=float)
    small_j = np.array([small[i]["joules"] for i in ids])
    assert large_ok.sum() >= 3 and large_ok.mean() > small_ok.mean()  # the thresholds below have a gap to keep
    large_j = np.array([large[i]["joules"] for i in ids])

    path = calibrated / "router.json"
    data = json.loads(path.read_text())
    assert data["tiers"]["small_id"] == SMALL and data["tiers"]["large_id"] == LARGE
    assert "calibration" in data["sources"]
    router = Router(router_file=path, tiers=(None, str(tiny_moe[1])))
    scores = {name: np.array([router.score(small[i]["question"], name)[0] for i in ids])
              for name in ("features", "learned")}
    # the cascade as it escalates: the stacked model over learned, the probe's signals and the answer's confidence
    assert "cascade_probe" in router.trained
    scores["cascade"] = np.array([router.trained["cascade_probe"].predict(cascade_inputs(
        router.score(small[i]["question"], "learned")[0], router.prober.signals(small[i]["question"]),
        small[i]["mean_logprob"], small[i]["min_logprob"])[0]) for i in ids])
    # the probe's thresholds come from the outcomes as the others' do (reading the calibration questions' signals
    # is checked by test_router_probe's training test)
    assert "probe" in router.trained
    scores["probe"] = np.array([router.routed_score(small[i]["question"], "probe") for i in ids])
    assert set(data["outcome_preferences"]) == set(scores)
    for name, s in scores.items():
        stored = data["outcome_preferences"][name]
        assert stored["large_only_accuracy"] == pytest.approx(large_ok.mean())
        bought = hand_thresholds(s, small_ok, large_ok, small_j, large_j, cascade=name == "cascade")
        for pref, (share, acc) in bought.items():
            t = stored[pref]["threshold"]
            assert (stored[pref]["large_share"], stored[pref]["accuracy"]) == pytest.approx((share, acc)), (name, pref)
            assert float(np.mean(s >= t)) == pytest.approx(share), (name, pref)  # the threshold buys that share
            # joules as the strategy spends them: an escalated cascade question pays for both answers
            sent = s >= t
            spent = np.where(sent, large_j + (small_j if name == "cascade" else 0), small_j).mean()
            assert stored[pref]["joules"] == pytest.approx(spent), (name, pref)

    # `route` loads the calibrated router: its score and the balanced threshold from the outcomes
    q = "What is 12 * 13?"
    r = run_cli("route", q, "--json", home=calibrated)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    strategy = d["strategy"]
    assert strategy == data["default_strategy"] and d["notice"] is None
    assert d["score"] == pytest.approx(router.score(q, strategy)[0], abs=1e-9)
    assert d["threshold"] == pytest.approx(data["outcome_preferences"][strategy]["balanced"]["threshold"])

    # other tiers in settings: route offers a new calibration, once
    (calibrated / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[0]}"\n')
    r = run_cli("route", q, home=calibrated)
    assert r.returncode == 0 and r.stdout.count("localmoe router calibrate") == 1, r.stdout + r.stderr


def test_the_default_calibration_asks_a_few_hundred_questions_of_every_kind(home: Path, monkeypatch):
    """Without --suite or --limit: the first 300 interleaved questions of router-train, every one of its kinds
    among them; a suite the user names is asked whole."""
    from localmoe.bench import suites
    from localmoe.routing import calibrate

    class Asked(Exception):
        pass

    asked: dict = {}

    def fake_run(rec, **kwargs):
        asked.update(kwargs)
        raise Asked

    monkeypatch.setattr(calibrate, "_current_tiers", lambda: (None, ["small", "large"], ["small", "large"]))
    monkeypatch.setattr(calibrate.runner, "run", fake_run)
    with pytest.raises(Asked):
        calibrate.run(None)
    questions = suites.load_suite(asked["suite"], limit=asked["limit"]).items
    kinds = {item.category for item in suites.load_suite("router-train").items}
    assert len(questions) == 300 and {item.category for item in questions} == kinds and len(kinds) == 29
    with pytest.raises(Asked):
        calibrate.run(None, suite="quick")
    assert asked["limit"] is None


def test_without_a_large_tier_calibration_is_one_line_and_exit_2(home: Path):
    r = run_cli("router", "calibrate", "--limit", "2", home=home)
    assert r.returncode == 2 and "needs a large tier" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("router", "calibrate", "--resume", "--json", home=home)
    assert r.returncode == 2 and json.loads(r.stdout)["status"] == "error"


def test_router_train_keeps_the_calibration_and_adds_new_ratings(calibrated: Path, tmp_path: Path, tiny_moe):
    """`router train` after a calibration retrains on the calibration's outcomes plus the user's new ratings; it
    used to overwrite router.json with a router that knew nothing of the user's tiers. Other tiers: refused."""
    home = tmp_path / "home"
    shutil.copytree(calibrated, home)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')  # the calibration's tiers
    before = json.loads((home / "router.json").read_text())
    from localmoe.record.recorder import Recorder

    with Recorder(home / "localmoe.db") as rec:  # a thumbs-down in the chat, after the calibration
        rec.add_label(None, "Write a sonnet about the tides of Fundy.", True, "thumbs")
    r = run_cli("router", "train", home=home)
    assert r.returncode == 0, r.stderr
    assert f"calibrated on run {before['calibration']['run_id']}" in r.stdout
    after = json.loads((home / "router.json").read_text())
    assert after["calibration"]["run_id"] == before["calibration"]["run_id"]
    assert after["tiers"] == before["tiers"] and after["outcome_preferences"]
    assert "calibration" in after["sources"] and len(after["sources"]) > len(before["sources"]), after["sources"]

    other = tmp_path / "other-moe.gguf"
    shutil.copy(tiny_moe[1], other)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{other}"\n')
    r = run_cli("router", "train", home=home)
    assert r.returncode == 2 and "calibrated on other tiers" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert json.loads((home / "router.json").read_text()) == after  # untouched


def test_stopped_after_its_last_answer_it_resumes_to_the_router(calibrated: Path, tmp_path: Path, tiny_moe):
    """Ctrl-C in the retrain step (every answer in, the run complete, no router written): `--resume` writes the
    router from the recorded answers, asking nothing again; once written there is nothing left to resume."""
    home = tmp_path / "home"
    shutil.copytree(calibrated, home)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')  # the calibration's (another test
    # changes the shared data dir's)
    (home / "router.json").unlink()  # what the interrupt leaves: the answers, not their router
    answers = db(home).execute("select count(*) from bench_items").fetchone()[0]
    r = run_cli("router", "calibrate", "--resume", "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    run_id = db(home).execute("select id from bench_runs").fetchone()[0]
    assert out["n"] == LIMIT and out["run_id"] == run_id and f"/{2 * LIMIT}" not in r.stderr
    assert json.loads((home / "router.json").read_text())["calibration"]["run_id"] == run_id
    assert db(home).execute("select count(*) from bench_items").fetchone()[0] == answers
    again = run_cli("router", "calibrate", "--resume", home=home)
    assert again.returncode == 2 and "is complete: nothing to resume" in again.stderr, again.stderr
    # a router the user chose after the calibration (the shipped one) is not replaced by a resume
    assert run_cli("router", "train", "--shipped", home=home).returncode == 0
    chosen = (home / "router.json").read_text()
    later = run_cli("router", "calibrate", "--resume", home=home)
    assert later.returncode == 2 and "nothing to resume" in later.stderr, later.stderr
    assert (home / "router.json").read_text() == chosen
