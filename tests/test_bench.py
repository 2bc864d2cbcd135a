"""Benchmark mode end to end on the embedded model, and energy on every answer."""

from __future__ import annotations

import json
import sqlite3

import pytest

from helpers import advancing_rapl, run_cli
from localmoe.bench import runner as bench
from localmoe.errors import UsageError
from localmoe.record.recorder import Recorder


def db(home):
    conn = sqlite3.connect(home / "localmoe.db")
    conn.row_factory = sqlite3.Row
    return conn


def test_bench_quick_suite_end_to_end(home, tmp_path):
    report = tmp_path / "report.html"
    r = run_cli("bench", "--suite", "quick", "--limit", "4", "--json", "--report", str(report), timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    [res] = out["results"]
    assert out["suite"] == "quick" and res["policy"] == "direct" and res["model"] == "smollm2-135m-instruct"
    assert res["n"] == 4 and res["meter"] and isinstance(res["measured"], bool)

    conn = db(home)
    items = [dict(x) for x in conn.execute("select * from bench_items where run_id = ?", [out["run_id"]])]
    assert len(items) == 4
    assert all(i["output"] is not None and i["message_id"] and i["joules"] > 0 for i in items)
    # the reported figures are exactly what the stored per-item verdicts and energies give
    accuracy = sum(i["correct"] for i in items) / 4
    joules = sum(i["joules"] for i in items)
    avg_watts = joules / sum(i["seconds"] for i in items)
    assert res["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert res["joules"] == pytest.approx(joules, rel=1e-12)
    assert res["avg_watts"] == pytest.approx(avg_watts, rel=1e-12)
    assert res["ipw"] == pytest.approx(accuracy / avg_watts, rel=1e-12)
    assert res["accuracy_per_joule"] == pytest.approx(accuracy / (joules / 4), rel=1e-12)
    # power samples are kept for benchmark runs, and bench questions stay out of the chat logs
    assert conn.execute("select count(*) from power_samples").fetchone()[0] >= 4
    assert json.loads(run_cli("logs", "--json").stdout) == []
    assert "<svg" in report.read_text() and "accuracy" in report.read_text()


def test_interrupted_run_keeps_items_and_resumes(home, tmp_path, monkeypatch):
    """Resumed from another directory, a run started on a relative suite path asks the rest as it was started (the
    same answer length), and refuses flags that would ask them otherwise."""
    suite = tmp_path / "mine.jsonl"
    suite.write_text(
        '{"question": "What is 2 + 2? Answer with a number only.", "answer": "4"}\n'
        "this line is not json\n"
        '{"question": "What is 3 + 5? Answer with a number only.", "answer": "8"}\n'
        '{"question": "What is 10 - 7? Answer with a number only.", "answer": "3"}\n'
    )

    def stop_after_two(done, total, label):
        if done == 2:
            raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    with Recorder() as rec:
        started = {}
        with pytest.raises(KeyboardInterrupt):
            bench.run(rec, suite="mine.jsonl", max_tokens=16, progress=stop_after_two,
                      on_start=lambda run_id, s: started.update(run=run_id, errors=s.errors))
        run_id = started["run"]
        assert started["errors"] and "line 2" in started["errors"][0]
        assert rec.bench_run(run_id)["status"] == "interrupted"
        assert len(rec.done_bench_items(run_id)) == 2

    refused = run_cli("bench", "--resume", str(run_id), "--max-tokens", "200", "--limit", "1", cwd="/")
    assert refused.returncode == 2 and "drop --limit, --max-tokens" in refused.stderr, refused.stderr
    r = run_cli("bench", "--resume", str(run_id), "--json", timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr
    [res] = json.loads(r.stdout)["results"]
    assert res["n"] == 3
    assert "line 2" in r.stderr  # the malformed line is reported, not fatal
    conn = db(home)
    assert conn.execute("select status from bench_runs where id = ?", [run_id]).fetchone()[0] == "complete"
    budgets = [row[0] for row in conn.execute("select completion_tokens from bench_items where run_id = ?", [run_id])]
    assert len(budgets) == 3 and max(budgets) <= 16, budgets

    other = json.loads(run_cli("bench", "--suite", str(suite), "--json", "--max-tokens", "16", timeout=300).stdout)
    cmp = run_cli("bench", "compare", str(run_id), str(other["run_id"]))
    assert cmp.returncode == 0 and "smollm2-135m-instruct" in cmp.stdout and "→" in cmp.stdout
    assert " pts)" in cmp.stdout and "not like for like" not in cmp.stderr, cmp.stdout + cmp.stderr
    quick = json.loads(run_cli("bench", "--suite", "quick", "--limit", "1", "--max-tokens", "8", "--json",
                               timeout=300).stdout)
    unlike = run_cli("bench", "compare", str(run_id), str(quick["run_id"]))
    assert unlike.returncode == 0 and "not like for like: the runs asked different suites" in unlike.stderr
    assert "different answer lengths (--max-tokens 16; 8)" in unlike.stderr, unlike.stderr
    assert "different numbers of questions (smollm2-135m-instruct/direct 3 → 1)" in unlike.stderr, unlike.stderr
    listed = json.loads(run_cli("bench", "list", "--json").stdout)
    assert {x["id"] for x in listed} == {run_id, other["run_id"], quick["run_id"]}


def test_bench_bad_input(home, tmp_path):
    r = run_cli("bench", "--suite", "no-such-suite")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no-such-suite" in r.stderr
    r = run_cli("bench", "--suite", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    r = run_cli("bench", "--idle", "-1")
    assert r.returncode == 2 and "--idle must be 0 or more seconds" in r.stderr, r.stderr
    # refused before any question is asked, not after the whole run
    r = run_cli("bench", "--report", str(tmp_path / "no" / "such" / "r.html"), "--json")
    assert r.returncode == 2 and "no folder" in r.stderr and json.loads(r.stdout)["status"] == "error", r.stderr
    assert not (home / "localmoe.db").exists() or not sqlite3.connect(home / "localmoe.db").execute(
        "select count(*) from bench_runs").fetchone()[0]
    r = run_cli("bench", "--policies", "sometimes")
    assert r.returncode == 2 and "unknown policy" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("bench", "compare", "998", "999")
    assert r.returncode != 0 and "no benchmark run" in r.stderr


def test_ask_json_reports_energy_from_a_fake_rapl_counter(home, tmp_path):
    """A RAPL package counter that a thread advances at 25 W while `ask` runs: the answer's joules follow it."""
    # updated every 5 ms: a short answer's average power must not depend on where the steps fall
    with advancing_rapl(tmp_path / "sys", watts=25, interval=0.005) as root:
        r = run_cli("ask", "Name a color.", "--json", "--max-tokens", "48", "--temperature", "0",
                    env_extra={"LOCALMOE_SYSFS_ROOT": str(root)})
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)["energy"]
    assert e["measured"] is True and e["meter"].startswith("rapl")
    # at most the counter's 25 W (+ one step's rounding), and near it: the writer thread may lag behind the clock
    # while `ask` keeps both cores busy, so the lower bound is loose (the CPU-time estimate is `measured` False)
    assert 8 < e["avg_watts"] <= 25 * 1.2
    [row] = db(home).execute("select joules, meter, measured from energy").fetchall()
    assert row["joules"] == pytest.approx(e["joules"]) and row["measured"] == 1


def test_bench_uses_the_meter_settings_name(home, tmp_path):
    """[energy] meter = "estimate" in settings.toml: the run is metered by the estimate though a RAPL counter is
    there (which `select_meter` would otherwise prefer)."""
    suite = tmp_path / "one.jsonl"
    suite.write_text('{"question": "What is 2 + 2? Answer with a number only.", "answer": "4"}\n')
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[energy]\nmeter = "estimate"\n')
    with advancing_rapl(tmp_path / "sys", watts=25) as root:
        r = run_cli("bench", "--suite", str(suite), "--json", "--max-tokens", "4", timeout=300,
                    env_extra={"LOCALMOE_SYSFS_ROOT": str(root)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "estimate" in res["meter"] and res["measured"] is False
    [row] = db(home).execute("select meter, measured from energy").fetchall()
    assert "estimate" in row["meter"] and row["measured"] == 0


def test_ask_json_labels_the_estimate(home, tmp_path):
    r = run_cli("ask", "Say hi.", "--json", "--max-tokens", "8",
                env_extra={"LOCALMOE_SYSFS_ROOT": str(tmp_path / "empty-sys")})
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)["energy"]
    assert e["measured"] is False and "estimate" in e["meter"] and e["joules"] > 0


def test_routed_policy_records_tiers(home, tmp_path):
    suite = tmp_path / "two.jsonl"
    suite.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n'
                     '{"question": "What is 17 * 23 + 4? Answer with a number only.", "answer": "395"}\n')
    r = run_cli("bench", "--suite", str(suite), "--policies", "direct,routed", "--json", "--max-tokens", "16",
                timeout=300)
    assert r.returncode == 0, r.stderr
    res = {x["policy"]: x for x in json.loads(r.stdout)["results"]}
    assert set(res) == {"direct", "routed"} and res["routed"]["model"] == "router"
    assert res["routed"]["n"] == 2 and 0 <= res["routed"]["large_share"] <= 1
    tiers = [t for (t,) in db(home).execute("select tier from bench_items where policy = 'routed'")]
    assert len(tiers) == 2 and set(tiers) <= {"small", "large"}


def test_bench_idle_records_net_joules_below_the_gross(home):
    """`--idle`: idle watts measured first, then each answer's joules above idle stored beside the gross."""
    r = run_cli("bench", "--suite", "quick", "--limit", "2", "--idle", "0.5", "--max-tokens", "8", "--json",
                timeout=300)
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout)["run_id"]
    rows = [dict(x) for x in db(home).execute(
        "select b.joules as item_joules, e.joules, e.net_joules, e.idle_watts, e.seconds from bench_items b "
        "join energy e on e.message_id = b.message_id where b.run_id = ?", [run_id])]
    assert len(rows) == 2
    [idle] = {row["idle_watts"] for row in rows}  # one baseline for the whole run
    assert idle is not None and idle > 0
    for row in rows:
        assert row["item_joules"] == pytest.approx(row["joules"])
        assert row["net_joules"] is not None and 0 <= row["net_joules"] <= row["joules"]
        assert row["net_joules"] == pytest.approx(max(0.0, row["joules"] - row["idle_watts"] * row["seconds"]))
        assert row["net_joules"] < row["joules"]  # an idle baseline over a real interval always subtracts
    # the results show them: per item as stored, per query in the JSON and the table (they were stored only)
    [res] = json.loads(r.stdout)["results"]
    items = [dict(x) for x in db(home).execute("select net_joules, seconds, joules from bench_items where run_id = ?",
                                               [run_id])]
    assert all(i["net_joules"] == pytest.approx(max(0.0, i["joules"] - idle * i["seconds"])) for i in items)
    assert res["net_joules_per_query"] == pytest.approx(sum(i["net_joules"] for i in items) / 2)
    assert 0 < res["net_joules_per_query"] < res["joules_per_query"]
    table = run_cli("bench", "--resume", str(run_id))
    assert table.returncode == 0 and "NET J/QUERY" in table.stdout, table.stdout + table.stderr


def test_routed_policy_with_a_large_tier_sends_exactly_the_hard_question_to_it(home, tmp_path, tiny_moe):
    """A real large tier and the features router at a threshold of 0.75: the easy question (score ≈ 0.61) stays
    small, the hard one (≈ 0.90) goes large, both well away from the threshold, so the run's large share is exactly
    one half."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n\n[router]\nstrategy = "features"\n'
                                        'preference = 0.75\n')
    easy, hard = "What is the capital of France?", "What is 17 * 23 + 4? Answer with a number only."
    for q, tier in ((easy, "small"), (hard, "large")):
        route = json.loads(run_cli("route", q, "--json").stdout)
        assert route["tier"] == tier and route["threshold"] == 0.75 and abs(route["score"] - 0.75) > 0.12
    suite = tmp_path / "two.jsonl"
    suite.write_text(json.dumps({"question": easy, "answer": "Paris"}) + "\n"
                     + json.dumps({"question": hard, "answer": "395"}) + "\n")
    r = run_cli("bench", "--suite", str(suite), "--policies", "routed", "--json", "--max-tokens", "8", timeout=300)
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout)["run_id"]
    [res] = json.loads(r.stdout)["results"]
    assert res["policy"] == "routed" and res["n"] == 2 and res["large_share"] == 0.5
    conn = db(home)
    items = {row["question"]: dict(row) for row in conn.execute(
        "select b.question, b.tier, m.model from bench_items b join messages m on m.id = b.message_id "
        "where b.run_id = ?", [run_id])}
    assert {q: (i["tier"], i["model"]) for q, i in items.items()} == {
        easy: ("small", "smollm2-135m-instruct"), hard: ("large", "tiny-moe")}
    # each item's joules: its answer's and its decision's (by the small tier's meter)
    for row in conn.execute("select b.joules, e.joules as answer, d.joules as decision from bench_items b "
                            "join energy e on e.message_id = b.message_id "
                            "join routing_decisions d on d.message_id = b.message_id where b.run_id = ?", [run_id]):
        # ≥ 0: a millisecond's decision can read 0 J on a coarse hardware counter (the estimate gives > 0)
        assert row["decision"] >= 0 and row["joules"] == pytest.approx(row["answer"] + row["decision"], rel=1e-12)
    [(share,)] = conn.execute("select large_share from bench_results where run_id = ?", [run_id]).fetchall()
    assert share == 0.5


def test_cascade_policy_charges_an_escalated_item_both_answers_joules(home, tmp_path, tiny_moe):
    """The small model's least confident wrong answer escalates to the large tier: the item's joules are the
    energy rows of both answers, the small one it replaced and the large one it kept."""
    from localmoe.routing import train as router_train

    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    pool = [x for x in router_train.shipped_labels() if x["small_wrong"] and x["mean_logprob"] is not None]
    wrong = min(pool, key=lambda x: x["mean_logprob"])
    suite = tmp_path / "one.jsonl"
    suite.write_text(json.dumps({"question": wrong["question"], "answer": "unused"}) + "\n")
    r = run_cli("bench", "--suite", str(suite), "--policies", "cascade", "--json", "--max-tokens", "96", timeout=300)
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout)["run_id"]
    conn = db(home)
    [item] = conn.execute("select message_id, joules, seconds, tier from bench_items where run_id = ?", [run_id])
    assert item["tier"] == "large"
    [decision] = conn.execute("select tier, escalated_from from routing_decisions where message_id = ?",
                              [item["message_id"]])
    assert decision["tier"] == "large" and decision["escalated_from"] is not None
    small, large = (conn.execute("select joules, seconds from energy where message_id = ?", [m]).fetchone()
                    for m in (decision["escalated_from"], item["message_id"]))
    assert small["joules"] > 0 and large["joules"] > 0
    # and the decision, once: its joules are on the small answer's row, none on the escalation's
    first = conn.execute("select joules from routing_decisions where message_id = ?",
                         [decision["escalated_from"]]).fetchone()
    [(again,)] = conn.execute("select joules from routing_decisions where message_id = ?", [item["message_id"]])
    assert first["joules"] is not None and first["joules"] >= 0 and again is None
    assert item["joules"] == pytest.approx(small["joules"] + large["joules"] + first["joules"], rel=1e-12)
    # the decision's metered interval (not stored on its own): the probe's reading of the question, one prompt
    # evaluation on the small model (loading it is not metered: test_router_probe)
    assert 0 <= item["seconds"] - (small["seconds"] + large["seconds"]) < 3


def test_plot_labels_stay_inside_the_plot():
    """The costliest point sits near the right edge: its label runs leftwards from it, not past the edge."""
    import re

    from localmoe.bench.report import _svg_plot

    svg = _svg_plot([("smollm2-135m-instruct · small", 1.0, 0.2), ("qwen3-30b-a3b · large", 20.0, 0.9)])
    labels = re.findall(r'<text x="([\d.]+)" y="[\d.]+"( text-anchor="end")?>([^<]+)</text>', svg)
    placed = {text: (float(x), bool(end)) for x, end, text in labels}
    x, end = placed["qwen3-30b-a3b · large"]
    assert end and x < 560  # right half: anchored at its end, left of the point
    x, end = placed["smollm2-135m-instruct · small"]
    assert not end and x < 280


def test_a_model_named_twice_is_one_column_and_a_second_writer_is_told(home, smollm):
    """By id and by path, one model: one column (its items were written twice and the run died on SQLite's
    UNIQUE constraint). Two processes resuming one run: the second writer of an item gets one clear line."""
    from localmoe.errors import LocalmoeError

    plan = bench.targets(["smollm2-135m-instruct", str(smollm.path), "smollm2-135m-instruct"], ["direct"])
    assert [(t.model.id, t.policy) for t in plan] == [("smollm2-135m-instruct", "direct")]
    # two files that would share one id (their stem): refused before any question, not mixed in one column
    import shutil

    for folder in ("a", "b"):
        (home / folder).mkdir(parents=True)
        shutil.copy(smollm.path, home / folder / "Same.gguf")
    with pytest.raises(UsageError, match="would both be 'same'"):
        bench.targets([str(home / "a" / "Same.gguf"), str(home / "b" / "Same.gguf")], ["direct"])
    with Recorder() as rec:
        run_id = rec.start_bench_run(suite="quick", source="builtin", models=[], policies=["direct"], item_limit=1,
                                     hardware={}, fingerprint="x", meter="estimate", measured=False, version="t")
        item = {"model": "m", "policy": "direct", "item_id": "q1", "correct": 1}
        rec.add_bench_item(run_id, item)
        with pytest.raises(LocalmoeError, match=f"^benchmark run {run_id} is being run by another process"):
            rec.add_bench_item(run_id, item)
        assert rec.done_bench_items(run_id) == {("m", "direct", "q1")}


def test_ctrl_c_under_json_prints_what_was_finished(home):
    """A script reading `bench --json` gets the finished items, marked interrupted, after Ctrl-C (it got nothing)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # long enough (120 questions of up to 96 tokens, about a minute) that the signal always finds it running
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "bench", "--suite", "mixed", "--max-tokens", "96",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LOCALMOE_HOME": str(home)},
                            # a suite run in the background inherits Ctrl-C ignored; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if not (home / "localmoe.db").exists():
            continue
        try:
            conn = sqlite3.connect(f"file:{home / 'localmoe.db'}?mode=ro", uri=True)
            if conn.execute("select count(*) from bench_items").fetchone()[0] >= 2:
                break
        except sqlite3.OperationalError:
            continue  # not migrated yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    res = json.loads(out)
    assert res["status"] == "interrupted" and 2 <= res["results"][0]["n"] < 120, res
    assert f"bench --resume {res['run_id']}" in err
