"""The `localmoe` command from a user's shell: real subprocesses, the real embedded model, a real SQLite file."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import time

from helpers import advancing_rapl, run_cli
from localmoe import __version__

HW_KEYS = {
    "os", "arch", "cpu_model", "physical_cores", "logical_cores", "ram_total_bytes", "ram_available_bytes",
    "swap_total_bytes", "swap_free_bytes", "memory_limit_bytes", "gpus", "data_dir", "disk_free_bytes",
    "memory_bandwidth_gbps", "bandwidth_cached", "fingerprint",
}


def db_rows(home, sql):
    conn = sqlite3.connect(home / "localmoe.db")
    try:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_ask_json_records_the_exchange(home):
    r = run_cli("ask", "Which city is the capital of Japan?", "--json", "--temperature", "0", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Tokyo" in out["answer"]
    assert out["model"] == "smollm2-135m-instruct"
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
    assert out["timing"]["ttft_s"] > 0 and out["timing"]["tokens_per_s"] > 0
    # a fresh process evaluates the whole prompt; the prefill rate is over those tokens
    assert out["usage"]["prompt_eval_tokens"] == out["usage"]["prompt_tokens"]
    rate = out["usage"]["prompt_tokens"] / out["timing"]["ttft_s"]
    assert abs(out["timing"]["prefill_tokens_per_s"] - rate) < 1e-6 * rate
    [row] = db_rows(home, "select m.content, m.status, g.* from messages m join generations g "
                          "on g.message_id = m.id where m.role = 'assistant'")
    assert row["content"] == out["answer"] and row["status"] == "complete"
    assert row["completion_tokens"] == out["usage"]["completion_tokens"]
    assert row["prompt_eval_tokens"] == out["usage"]["prompt_eval_tokens"]
    assert row["message_id"] == out["message_id"]
    [q] = db_rows(home, "select * from messages where role = 'user'")
    assert q["content"] == "Which city is the capital of Japan?" and q["conversation_id"] == out["conversation_id"]


def test_ask_streams_plain_text_and_logs_show_it(home):
    r = run_cli("ask", "Name a color.", "--temperature", "0", "--max-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    logs = run_cli("logs", "--json", "-n", "5")
    [entry] = json.loads(logs.stdout)
    assert entry["prompt"] == "Name a color." and entry["answer"].strip() == r.stdout.strip()
    text = run_cli("logs")
    assert "> Name a color." in text.stdout


def test_models_json(home):
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    [m] = json.loads(r.stdout)
    assert m["id"] == "smollm2-135m-instruct" and m["source"] == "embedded"
    assert m["layout"]["architecture"] == "llama" and m["layout"]["is_moe"] is False


def test_a_file_under_an_id_already_taken_is_named_not_listed_twice(home, smollm, tmp_path):
    """A copy of the embedded model put in models/ under its name, and two files whose names differ only in case:
    one row per id (the one `-m ID` reaches), and a line naming each file no id reaches."""
    d = home / "models"
    d.mkdir(parents=True)
    (d / "smollm2-135m-instruct.gguf").symlink_to(smollm.path)
    (d / "Tiny.gguf").symlink_to(smollm.path)
    (d / "tiny.gguf").symlink_to(smollm.path)
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    ids = [line.split()[0] for line in r.stdout.splitlines()[1:] if line and not line.startswith("hidden:")]
    assert ids.count("smollm2-135m-instruct") == 1 and ids.count("tiny") == 1, r.stdout
    hidden = [line for line in r.stdout.splitlines() if line.startswith("hidden: ")]
    assert len(hidden) == 2 and any("models/smollm2-135m-instruct.gguf has the id 'smollm2-135m-instruct'" in h
                                    for h in hidden) and any("tiny.gguf has the id 'tiny'" in h for h in hidden), hidden
    assert len(json.loads(run_cli("models", "--json").stdout)) == 2


def test_hw_json_has_documented_keys_and_caches_bandwidth(home):
    first = json.loads(run_cli("hw", "--json").stdout)
    assert HW_KEYS <= set(first)
    assert first["memory_bandwidth_gbps"] > 0 and first["ram_total_bytes"] > 0
    assert first["physical_cores"] >= 1 and isinstance(first["gpus"], list)
    second = json.loads(run_cli("hw", "--json").stdout)
    assert second["bandwidth_cached"] is True
    assert second["memory_bandwidth_gbps"] == first["memory_bandwidth_gbps"]


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"localmoe {__version__}"
    for cmd in ([], ["ask"], ["models"], ["hw"], ["logs"], ["chat"], ["plan"], ["trace"], ["route"], ["bench"],
                ["cache-sim"], ["router", "train"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "usage: localmoe" in r.stdout


def assert_clean_failure(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("localmoe: error:") and pattern in lines[0], lines[0]


def test_bad_inputs_fail_cleanly_and_keep_the_database(home, tmp_path, smollm):
    assert run_cli("ask", "Say hi.", "--max-tokens", "5").returncode == 0
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm.path.read_bytes()[: 1024 * 1024])
    renamed = tmp_path / "notes.gguf"
    renamed.write_text("shopping list: eggs, flour\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    assert_clean_failure(run_cli("ask", "hi", "--model", str(tmp_path / "missing.gguf")), "not found")
    assert_clean_failure(run_cli("ask", "hi", "--model", str(truncated)), "truncated")
    assert_clean_failure(run_cli("ask", "hi", "--model", str(renamed)), "not a GGUF")
    assert_clean_failure(run_cli("ask", "   "), "empty")
    assert_clean_failure(run_cli("ask", "hi", "--model", "no-such-model"), "unknown model")
    assert_clean_failure(run_cli("ask", "hi", home=blocker / "home"), "cannot use data directory")
    assert_clean_failure(run_cli("logs", home=blocker / "home"), "cannot use data directory")
    assert_clean_failure(run_cli("logs", home=blocker), "it is a file, not a directory")

    # the earlier exchange is intact and nothing half-written was added
    rows = db_rows(home, "select role, status from messages order by id")
    assert rows == [{"role": "user", "status": "complete"}, {"role": "assistant", "status": "complete"}]


def test_newer_database_is_refused_cleanly(home):
    assert run_cli("logs").returncode == 0
    conn = sqlite3.connect(home / "localmoe.db")
    conn.execute("insert into _migrations values ('m999_future', 'x')")
    conn.commit()
    conn.close()
    assert_clean_failure(run_cli("logs"), "newer localmoe")


def _start_long_answer(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmoe", "ask", "Write a very long story about a dragon who bakes bread.",
         "--max-tokens", "2000", "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as at a terminal: a suite started in the background by a non-interactive shell inherits SIGINT ignored,
        # and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait until the answer is streaming
    first = proc.stdout.read(20)
    assert first, proc.stderr.read()
    return proc


def test_ctrl_c_keeps_the_question_and_the_partial_answer(home):
    proc = _start_long_answer(home)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted (the question and the partial answer are recorded)" in err
    q, a = db_rows(home, "select role, content, status from messages order by id")
    assert q["content"].startswith("Write a very long story") and q["status"] == "complete"
    assert a["status"] == "interrupted" and len(a["content"]) >= 20
    [g] = db_rows(home, "select * from generations")
    assert 0 < g["completion_tokens"] < 2000 and g["stop_reason"] == "interrupted"


def test_ctrl_c_off_the_record_says_nothing_was_kept_and_json_still_answers(home):
    """`ask --json --no-log` interrupted mid-answer: stdout still carries one JSON object (status interrupted,
    recorded false, the partial answer), stderr does not claim a record, and the database holds no message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmoe", "ask", "Write a very long story about a dragon who bakes bread.",
         "--max-tokens", "2000", "--temperature", "0", "--json", "--no-log"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as at a terminal (see above)
    )
    # nothing streams to stdout under --json: the routing notice comes just before the answer starts
    assert "no large model is available" in proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (nothing is recorded: recording is off)" in err, err
    d = json.loads(out)
    assert d["status"] == "interrupted" and d["recorded"] is False and d["message_id"] is None
    assert not (home / "localmoe.db").exists() or not db_rows(home, "select id from messages")


def test_a_crash_mid_answer_never_corrupts_the_file(home):
    proc = _start_long_answer(home)
    time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=30)
    rows = db_rows(home, "select role, status from messages order by id")  # integrity_check inside
    assert rows[0] == {"role": "user", "status": "complete"}
    assert rows[1]["status"] == "pending"
    # and the file is still usable
    r = run_cli("ask", "Say hi.", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr


def ask_at_a_terminal(sysfs_root, *args: str) -> tuple[str, str]:
    """`localmoe ask` with stderr on a pseudo-terminal, as at a shell, where it prints the stats line; the fake
    /sys at `sysfs_root` decides the energy meter, and NVML is hidden whatever this machine has. Returns (stdout,
    stderr without colour codes)."""
    hide = sysfs_root.parent / "no-nvml"
    hide.mkdir(exist_ok=True)
    (hide / "pynvml.py").write_text("raise ImportError('hidden by the test')\n")
    path = os.pathsep.join(p for p in (str(hide), os.environ.get("PYTHONPATH")) if p)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "localmoe", "ask", *args], stdout=subprocess.PIPE, stderr=slave, text=True,
            env={**os.environ, "LOCALMOE_SYSFS_ROOT": str(sysfs_root), "PYTHONPATH": path}, timeout=120,
        )
    finally:
        os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*m", "", err.decode().replace("\r\n", "\n"))
    assert proc.returncode == 0, text
    return proc.stdout, text


def test_the_stats_line_at_a_terminal_marks_only_estimated_joules(home, tmp_path):
    args = ("Say hi.", "--max-tokens", "8", "--temperature", "0")
    with advancing_rapl(tmp_path / "sys", watts=25) as root:
        out, err = ask_at_a_terminal(root, *args)
    assert out.strip()
    [line] = [x for x in err.splitlines() if x.startswith("smollm2-135m-instruct · ")]
    assert re.search(r" · \d+\.\d J( · |$)", line), line
    assert "~" not in line
    # no sensor: the same line marks the joules as an estimate
    _, err = ask_at_a_terminal(tmp_path / "empty-sys", *args)
    [line] = [x for x in err.splitlines() if x.startswith("smollm2-135m-instruct · ")]
    assert re.search(r" · ~\d+\.\d J( · |$)", line), line
    rows = db_rows(home, "select measured, meter from energy order by message_id")
    assert [(r["measured"], r["meter"].split("(")[0]) for r in rows] == [(1, "rapl"), (0, "estimate")]


def test_human_output(home):
    r = run_cli("models")
    assert r.returncode == 0 and r.stdout.strip()


def test_hw_human_output_names_each_field(home):
    """`hw` as a person reads it: the same machine as `hw --json`, line by line."""
    from localmoe.units import human_bytes

    cold = run_cli("hw")
    assert cold.returncode == 0, cold.stderr
    hw = json.loads(run_cli("hw", "--json").stdout)
    warm = run_cli("hw")
    assert warm.returncode == 0, warm.stderr
    for r, cached in ((cold, ""), (warm, " (cached)")):
        lines = {line[:8].strip(): line[9:] for line in r.stdout.splitlines()}
        assert lines["CPU"] == (f"{hw['cpu_model']} ({hw['physical_cores']} cores, {hw['logical_cores']} threads, "
                                f"{hw['arch']})")
        assert re.fullmatch(rf"\d+\.\d [KMGT]iB available of {re.escape(human_bytes(hw['ram_total_bytes']))}",
                            lines["RAM"]), lines["RAM"]
        assert lines["Swap"].endswith(f" free of {human_bytes(hw['swap_total_bytes'])}")
        assert re.fullmatch(rf"\d+(\.\d)? [KMGT]?i?B free in {re.escape(str(home))}", lines["Disk"]), lines["Disk"]
        assert hw["data_dir"] == str(home)
        # the first run measured the bandwidth that the later ones read back from the cache
        assert lines["Memory"] == f"{hw['memory_bandwidth_gbps']} GB/s copy bandwidth{cached}"
        if not hw["gpus"]:
            assert lines["GPU"] == "none detected (CPU only)"
        else:
            assert all(any(g["name"] in line for line in r.stdout.splitlines()) for g in hw["gpus"])


def one_line_refusal(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("localmoe: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_options_are_validated_up_front_in_one_line(home):
    one_line_refusal(run_cli("ask", "hi", "--temperature", "-0.5"), 2, "--temperature", "outside")
    one_line_refusal(run_cli("ask", "hi", "--max-tokens", "0"), 2, "--max-tokens", "below 1")
    one_line_refusal(run_cli("logs", "-n", "0"), 2, "-n", "below 1")
    one_line_refusal(run_cli("bench", "--limit", "-3"), 2, "--limit")
    one_line_refusal(run_cli("asx", "hi"), 2, "unknown command 'asx'", "did you mean 'ask'")
    # empty prompts: the same exit code wherever they come from
    one_line_refusal(run_cli("ask", "  "), 2, "empty")
    one_line_refusal(run_cli("route", "  "), 2, "empty")
    one_line_refusal(run_cli("ask", "hi", "--preference", "0"), 2, "must be in (0, 1)")
    one_line_refusal(run_cli("route", "hi", "--preference", "foo"), 2, "unknown router preference")
    one_line_refusal(run_cli("plan", "qwen3-30b-a3b"), 2, "in the catalog but not installed", "localmoe pull")
    assert not (home / "localmoe.db").exists() or db_rows(home, "select * from messages") == []


def test_json_errors_are_json_with_the_same_exit_code(home):
    r = run_cli("ask", "  ", "--json")
    assert r.returncode == 2 and json.loads(r.stdout) == {"status": "error", "error": "the prompt is empty"}
    r = run_cli("ask", "hi", "--json", "--max-tokens", "0")
    out = json.loads(r.stdout)
    assert r.returncode == 2 and out["status"] == "error" and "--max-tokens" in out["error"]
    r = run_cli("ask", "hi", "--json", "--model", "/nowhere/x.gguf")
    assert r.returncode == 1 and "not found" in json.loads(r.stdout)["error"]


def test_chat_refuses_without_a_terminal_and_a_model_that_cannot_load(home, tmp_path):
    r = subprocess.run([sys.executable, "-m", "localmoe"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "LOCALMOE_HOME": str(home)})
    one_line_refusal(r, 2, "needs a terminal")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    # with a terminal (script(1) gives one) a model that cannot load is refused before the screen opens
    if subprocess.run(["which", "script"], capture_output=True).returncode == 0:
        cmd = f"{sys.executable} -m localmoe chat -m {bad}; echo EXIT=$?"
        r = subprocess.run(["script", "-qc", cmd, "/dev/null"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LOCALMOE_HOME": str(home)}, stdin=subprocess.DEVNULL)
        assert "EXIT=2" in r.stdout and "cannot load bad" in r.stdout, r.stdout


HARD_Q = "A train leaves at 3:40 pm and travels 217 km at 62 km/h. At what time does it arrive? Show the steps."


def test_no_large_tier_flags_a_probably_wrong_answer_and_refuses_tier_large(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[router]\nstrategy = "learned"\npreference = "quality"\n')
    r = run_cli("ask", HARD_Q, "--json", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    route = json.loads(r.stdout)["route"]
    assert route["wanted"] == "large" and route["tier"] == "small" and route["probably_wrong"] is True
    assert "likely wrong" in route["warning"] and "models" in route["warning"]  # says where a large model goes
    assert route["reason"].startswith("wanted large → no large model is installed → small answered")
    text = run_cli("ask", HARD_Q, "--max-tokens", "8")
    assert "localmoe: warning: the small model answered" in text.stderr
    one_line_refusal(run_cli("ask", "hi", "--tier", "large"), 2, "no large model is installed", ".gguf")
    # the easy question is not flagged
    easy_q = "What is the capital of France? Answer with one word."  # scores 0.28 (the hard one 0.96)
    easy = json.loads(run_cli("ask", easy_q, "--json", "--max-tokens", "4").stdout)["route"]
    assert easy["tier"] == "small" and easy["probably_wrong"] is False and easy["wanted"] is None


def test_a_cut_off_answer_says_so_everywhere_and_logs_agree(home):
    r = run_cli("ask", "Write a long poem about the sea.", "--json", "--max-tokens", "3")
    out = json.loads(r.stdout)
    assert out["stop_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    assert isinstance(out["energy"]["measured"], bool)
    run_cli("ask", "Say hi.", "--max-tokens", "12")
    entries = json.loads(run_cli("logs", "--json").stdout)
    # oldest first, as in the text output; booleans are booleans
    assert [e["prompt"] for e in entries] == ["Write a long poem about the sea.", "Say hi."]
    assert entries[0]["stop_reason"] == "length" and isinstance(entries[0]["measured"], bool)
    text = run_cli("logs").stdout
    assert "length (cut off at 3 tokens)" in text
    assert text.index("> Write a long poem") < text.index("> Say hi.")


def test_ask_continue_carries_the_conversation_and_its_history(home):
    first = json.loads(run_cli("ask", "My name is Ada. Say hello to me.", "--json", "--max-tokens", "16",
                               "--temperature", "0").stdout)
    json.loads(run_cli("ask", "What is 2 + 2?", "--json", "--max-tokens", "8").stdout)  # another conversation
    again = json.loads(run_cli("ask", "What is my name?", "--json", "--max-tokens", "16", "--temperature", "0",
                               "--conversation", str(first["conversation_id"])).stdout)
    assert again["conversation_id"] == first["conversation_id"]
    # the model saw the first exchange: the prompt grew by it (the answer text is the model's business)
    alone = json.loads(run_cli("ask", "What is my name?", "--json", "--max-tokens", "1").stdout)
    assert again["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 10
    # a `serve` client's request since then is that program's conversation: -c continues the user's own
    from localmoe.record.recorder import Recorder

    rec = Recorder()
    api = rec.new_conversation("smollm2-135m-instruct", title="from a client")
    rec.add_message(api, "user", "What is the capital of Peru?")
    rec.record_api_request(rec.add_message(api, "assistant", "Lima."), client="127.0.0.1", user_agent="curl",
                           endpoint="/v1/chat/completions", model="localmoe/auto", stream=False, http_status=200)
    rec.close()
    latest = json.loads(run_cli("ask", "Thanks!", "-c", "--json", "--max-tokens", "4").stdout)
    assert latest["conversation_id"] == alone["conversation_id"] and api > alone["conversation_id"]
    rows = db_rows(home, f"select role from messages where conversation_id = {first['conversation_id']} order by id")
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    one_line_refusal(run_cli("ask", "hi", "--conversation", "999"), 2, "no conversation 999")


def test_continue_with_nothing_to_continue_is_refused(home):
    one_line_refusal(run_cli("ask", "hi", "-c"), 2, "no conversation to continue")


def test_the_france_question_is_answered_in_english_and_ends_quickly_with_its_stop_reason_recorded(home):
    """SmolLM2's chat template puts in its own system prompt, which sends the model off in French ("L'Étoile, la
    Cité, …"); the catalog's system prompt, which the embedded model gets wherever a conversation has none, makes
    its greedy answer name Paris."""
    r = run_cli("ask", "What is the capital of France?", "--json", "--temperature", "0")
    out = json.loads(r.stdout)
    assert out["answer"].startswith("The capital of France is Paris"), out["answer"]
    assert out["usage"]["completion_tokens"] < 80 and out["stop_reason"] in ("stop", "repetition")
    assert out["sampling"]["repeat_penalty"] > 1.0 and out["sampling"]["max_tokens"] <= 96  # a short question
    [row] = db_rows(home, "select stop_reason, completion_tokens, system_prompt from generations")
    assert row["stop_reason"] == out["stop_reason"] and row["completion_tokens"] == out["usage"]["completion_tokens"]
    # the system message the model was given is recorded with the answer (the conversation itself has none)
    from localmoe.home import models

    assert row["system_prompt"] == models.system_prompt(models.default_model().path)
    assert [r["role"] for r in db_rows(home, "select role from messages")] == ["user", "assistant"]


def test_cascade_escalation_is_announced_on_stderr_between_the_answers(home, tiny_moe):
    """The cascade with a threshold of 0.001 (any doubt escalates) and the tiny MoE as the large tier: stderr says
    why and that the large model answers; a threshold of 0.999 keeps the small answer and says nothing."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    q = "Which city is the capital of Japan?"
    r = run_cli("ask", q, "--strategy", "cascade", "--preference", "0.001", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert re.search(r"localmoe: escalated: the small answer looks wrong \(.*; with the probe's reading of the "
                     r"question\); the large model answers:", r.stderr)
    kept = run_cli("ask", q, "--strategy", "cascade", "--preference", "0.999", "--max-tokens", "8",
                   "--temperature", "0")
    assert kept.returncode == 0, kept.stderr
    assert "large model answers" not in kept.stderr and "escalated" not in kept.stderr
    tiers = [t for (t,) in sqlite3.connect(home / "localmoe.db").execute(
        "select tier from routing_decisions order by message_id")]
    assert tiers == ["small", "large", "small"]
    # the large model answered the question afresh: the prompt it read is the question alone, as asked directly
    # (it read the small answer and the question twice), and the record holds one question with both answers
    conn = sqlite3.connect(home / "localmoe.db")
    first = conn.execute("select min(conversation_id) from messages").fetchone()[0]
    rows = conn.execute("select m.role, m.reply_to, m.id, g.prompt_tokens from messages m left join generations g "
                        "on g.message_id = m.id where m.conversation_id = ? order by m.id", (first,)).fetchall()
    assert [r[0] for r in rows] == ["user", "assistant", "assistant"] and rows[1][1] == rows[2][1] == rows[0][2]
    direct = json.loads(run_cli("ask", q, "--tier", "large", "--max-tokens", "1", "--json", "--no-log").stdout)
    assert rows[2][3] == direct["usage"]["prompt_tokens"]


def test_ctrl_c_interrupts_a_bench_run_and_resume_finishes_it(home, tmp_path):
    """A real SIGINT while `bench` answers its second item: exit 130, the finished item kept, and `--resume`
    answers the rest, each item once."""
    suite = tmp_path / "long.jsonl"
    suite.write_text("".join(json.dumps({"question": f"Write a long story about a dragon called {name}.",
                                         "answer": name}) + "\n" for name in ("Ash", "Birch", "Cedar", "Dune")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmoe", "bench", "--suite", str(suite), "--max-tokens", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LOCALMOE_HOME": str(home)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as at a terminal (see above)
    )
    deadline = time.monotonic() + 120
    done = 0
    while done < 1:
        if proc.poll() is not None:
            raise AssertionError(f"bench ended before the signal: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "no bench item finished in 120 s"
        time.sleep(0.1)
        try:
            conn = sqlite3.connect(home / "localmoe.db")
            done = conn.execute("select count(*) from bench_items").fetchone()[0]
            conn.close()
        except sqlite3.OperationalError:  # not created yet
            pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    m = re.search(r"benchmark run (\d+) interrupted; finished items are kept\. Continue with "
                  r"`localmoe bench --resume (\d+)`", err)
    assert m and m[1] == m[2] and "Traceback" not in err, err
    run_id = int(m[1])
    [run] = db_rows(home, f"select status from bench_runs where id = {run_id}")
    kept = db_rows(home, f"select item_id from bench_items where run_id = {run_id}")
    assert run["status"] == "interrupted" and 1 <= len(kept) < 4

    r = run_cli("bench", "--resume", str(run_id), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    [res] = json.loads(r.stdout)["results"]
    assert res["n"] == 4
    items = db_rows(home, f"select item_id, message_id from bench_items where run_id = {run_id}")
    assert len(items) == 4 and len({i["item_id"] for i in items}) == 4 and len({i["message_id"] for i in items}) == 4
    assert {i["item_id"] for i in kept} <= {i["item_id"] for i in items}
    assert db_rows(home, f"select status from bench_runs where id = {run_id}") == [{"status": "complete"}]


def test_route_reads_standard_input_and_says_what_would_happen(home):
    """`route -` routes the question piped in (not the text "-"), and, answering nothing, says what would happen."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[router]\nstrategy = "learned"\npreference = "quality"\n')
    piped = run_cli("route", "--json", "-", input=HARD_Q + "\n")
    given = run_cli("route", "--json", HARD_Q)
    assert piped.returncode == 0 and given.returncode == 0, piped.stderr + given.stderr
    a, b = json.loads(piped.stdout), json.loads(given.stdout)
    assert a["score"] == b["score"] and a["tier"] == "small" and a["wanted"] == "large"
    assert "→ small would answer (" in a["reason"] and a["warning"].startswith("the small model would answer;"), a


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(home):
    for argv in (["ask", "-", "--max-tokens", "4"], ["route", "-"]):
        r = subprocess.run([sys.executable, "-m", "localmoe", *argv], input=b"What is the capital of \xff\xfe Japan?",
                           capture_output=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count(b"\n") == 1, r.stderr
        assert b"standard input is not UTF-8 text (byte 0xff at offset 23)" in r.stderr, r.stderr
