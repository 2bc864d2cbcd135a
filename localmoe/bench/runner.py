"""Energy benchmarking: suites × models × policies → accuracy, joules, watts, intelligence per watt.

Every question is asked through the same Session path as a chat (so its generation stats and energy land in the
same tables), in a conversation of kind `bench`, and graded with `scoring`. Each finished item is committed on
its own, so an interrupted run keeps what it did and `--resume RUN` picks up the rest.

IPW follows the Stanford study: accuracy ÷ average power (W). Accuracy per joule: accuracy ÷ mean joules per query.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmoe import __version__
from localmoe.bench import scoring, suites
from localmoe.engine import GenerationConfig
from localmoe.errors import UsageError
from localmoe.home import models
from localmoe.record.recorder import Recorder

POLICIES = ("direct", "small", "large", "routed", "cascade")
RESULT_KEYS = ("policy", "model", "n", "accuracy", "joules", "joules_per_query", "avg_watts", "ipw",
               "accuracy_per_joule", "latency_s", "tokens_per_s", "large_share", "meter", "measured")


@dataclass
class Target:
    """One column of the comparison: which model answers, under which policy."""

    model: models.ModelRef
    policy: str


def targets(model_names: list[str], policies: list[str]) -> list[Target]:
    """Each (model, policy) column once: a model named twice (by id and by path, say) is one column."""
    out: list[Target] = []
    for policy in policies:
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
        if policy in ("routed", "cascade"):
            # both tiers, chosen per question by the router; the column is named after the pair
            out.append(Target(models.ModelRef("router", models.default_model().path, "router"), policy))
        elif policy == "direct":
            names: list[str | None] = list(model_names) or [None]
            out += [Target(models.resolve(name), "direct") for name in names]
        else:
            out.append(Target(models.tier_model(policy), policy))
    unique: dict[tuple[str, str], Target] = {}
    files: set[tuple[Path, str]] = set()
    for t in out:
        file = (t.model.path.resolve(), t.policy) if t.model.path and t.policy == "direct" else None
        if file is not None:
            if file in files and (t.model.id, t.policy) not in unique:
                continue  # one file named twice (by id and by path): one column
            files.add(file)
        # items are keyed by the model's id: one id for two files would mix their answers in one column
        first = unique.setdefault((t.model.id, t.policy), t)
        if first.model.path and t.model.path and first.model.path.resolve() != t.model.path.resolve():
            raise UsageError(f"{first.model.path} and {t.model.path} would both be {t.model.id!r} in the results: "
                             "rename one, or import it under another name (`localmoe import FILE --name NAME`)")
    return list(unique.values())


DEFAULT_MAX_TOKENS = 128


def run(
    recorder: Recorder,
    *,
    suite: str | None = None,
    model_names: list[str] | None = None,
    policies: list[str] | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    resume: int | None = None,
    meter: Any = None,
    idle_seconds: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    on_start: Callable[[int, suites.Suite], None] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Run (or resume) a benchmark and return its run id. Ctrl-C leaves the run `interrupted` and resumable, and so
    does setting `cancel` (a UI's stop): the answer under way is stopped and not graded, as after Ctrl-C. A resumed
    run asks the rest of its questions as it was started (suite, models, policies, limit, answer length, idle
    measurement), whatever else is passed."""
    from localmoe.chat.assistant import Assistant, RoutedReply
    from localmoe.chat.session import Session
    from localmoe.placement import hardware
    from localmoe.record import meters

    if resume is not None:
        row = recorder.bench_run(resume)
        if row is None:
            raise UsageError(f"no benchmark run {resume} (see `localmoe bench list`)")
        suite, limit = row["suite"], row["item_limit"]
        if row["source"] and Path(row["source"]).is_absolute():
            suite = row["source"]
        model_names, policies = row["models"], row["policies"]
        # a run recorded before these were stored keeps what the caller asks (calibrate's own length)
        max_tokens = row.get("max_tokens") or max_tokens
        idle_seconds = row["idle_seconds"] if row.get("idle_seconds") is not None else idle_seconds
    suite = suite or "quick"
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    idle_seconds = idle_seconds or 0.0
    if idle_seconds < 0:
        raise UsageError(f"--idle must be 0 or more seconds, not {idle_seconds:g}")
    policies = policies or ["direct"]
    loaded = suites.load_suite(suite, limit=limit)
    source = loaded.source
    if suite not in suites.builtin_suites() and not suite.startswith("hf:"):
        source = str(Path(source).resolve())  # what a resume reads, from whatever directory it starts in
    plan = targets(model_names or [], policies)
    if meter is None:
        from localmoe.home import settings

        meter, _notes = meters.select_meter(settings.load().meter)  # settings' [energy] meter, as ask and the chat
    idle = meters.measure_idle(meter, idle_seconds) if idle_seconds > 0 else None

    if resume is None:
        hw = hardware.detect(measure=False)
        run_id = recorder.start_bench_run(
            suite=suite, source=source, models=model_names or [], policies=policies, item_limit=limit,
            hardware=hw.to_dict(), fingerprint=hw.fingerprint, meter=meter.name, measured=meter.measured,
            version=__version__, max_tokens=max_tokens, idle_seconds=idle_seconds,
        )
    else:
        run_id = resume
        recorder.set_bench_run_status(run_id, "running")
    if on_start:
        on_start(run_id, loaded)
    done = recorder.done_bench_items(run_id)

    total = len(loaded.items) * len(plan)
    finished = len(done)
    status = "interrupted"
    stopped = False
    try:
        for target in plan:
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            opts = {"meter": meter, "keep_samples": True, "idle_watts": idle}
            config = GenerationConfig(max_tokens=max_tokens, temperature=0.0, logprobs=True)
            if target.policy in ("routed", "cascade"):
                asker: Any = Assistant(recorder=recorder, overrides=vars(config), session_options=opts,
                                       strategy="cascade" if target.policy == "cascade" else None)
            else:
                asker = Session(target.model, recorder=recorder, config=config, **opts)
            asker.conversation.kind = "bench"
            try:
                for item in loaded.items:
                    key = (target.model.id, target.policy, item.id)
                    if key in done:
                        continue
                    if cancel is not None and cancel.is_set():
                        stopped = True
                        break
                    asker.new_conversation()
                    answer = asker.ask(item.question, cancel).run()
                    replies = [r for r in (getattr(answer, "small_reply", None), getattr(answer, "reply", answer))
                               if r is not None]
                    if any(r.status == "cancelled" for r in replies):
                        stopped = True  # stopped mid-answer: not graded, asked again on resume
                        break
                    final = replies[-1]
                    verdict = scoring.score(item, final.text)
                    tier = answer.decision.tier if isinstance(answer, RoutedReply) else (
                        target.policy if target.policy in ("small", "large") else None)
                    energies = [r.energy for r in replies if r.energy is not None]
                    s = final.stats
                    # a routed answer also costs its decision (the probe reads the question on the small model)
                    decision = answer.decision if isinstance(answer, RoutedReply) else None
                    route_j = (decision.joules or 0.0) if decision is not None else 0.0
                    route_s = (decision.energy_s or 0.0) if decision is not None else 0.0
                    joules = sum(e.joules for e in energies) + route_j if energies else None
                    seconds = sum(e.seconds for e in energies) + route_s if energies else s.wall_s
                    recorder.add_bench_item(run_id, {
                        "model": target.model.id, "policy": target.policy, "item_id": item.id,
                        "question": item.question, "expected": item.answer, "kind": item.kind,
                        "category": item.category, "difficulty": item.difficulty, "output": final.text,
                        "extracted": verdict.extracted, "correct": int(verdict.correct), "method": verdict.method,
                        "tier": tier, "message_id": final.message_id,
                        # an escalated cascade answer costs both answers
                        "joules": joules,
                        "net_joules": max(0.0, joules - idle * seconds) if idle is not None and joules is not None
                        else None,
                        "avg_watts": joules / seconds if joules is not None and seconds > 0 else None,
                        "seconds": seconds,
                        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                        "ttft_s": s.ttft_s, "tokens_per_s": s.tokens_per_s,
                        "prompt_eval_tokens": s.prompt_eval_tokens,
                    })
                    finished += 1
                    if progress:
                        progress(finished, total, f"{target.model.id}/{target.policy}")
            finally:
                asker.close() if isinstance(asker, Assistant) else asker.engine.close()
            if stopped:
                break
        status = "interrupted" if stopped else "complete"
    finally:
        recorder.set_bench_run_status(run_id, status, finished=True)
    return run_id


def results(recorder: Recorder, run_id: int) -> dict[str, Any]:
    row = recorder.bench_run(run_id)
    if row is None:
        raise UsageError(f"no benchmark run {run_id} (see `localmoe bench list`)")
    rows = recorder.bench_results(run_id)
    net = recorder.bench_net_joules(run_id)
    out = []
    for r in rows:
        d = {k: r[k] for k in RESULT_KEYS}
        d["measured"] = bool(d["measured"])
        if (n_net := net.get((r["model"], r["policy"]))) is not None and n_net[0] == r["n"]:
            # every item measured against idle (a run resumed without --idle would mix): what answering added
            d["net_joules_per_query"] = n_net[1] / r["n"]
            d["net_accuracy_per_joule"] = r["accuracy"] / d["net_joules_per_query"] if n_net[1] > 0 else None
        out.append(d)
    hw = row["hardware"]
    return {"run_id": run_id, "suite": row["suite"], "source": row["source"], "status": row["status"],
            "started_at": row["started_at"], "max_tokens": row.get("max_tokens"),
            "idle_seconds": row.get("idle_seconds"),
            "machine": f"{hw.get('cpu_model', '?')}, {hw.get('physical_cores', '?')} cores",
            "meter": row["meter"], "measured": row["measured"], "results": out}


def list_runs(recorder: Recorder, limit: int = 20) -> list[dict[str, Any]]:
    return recorder.bench_runs(limit)


def compare(recorder: Recorder, a: int, b: int) -> dict[str, Any]:
    """Both runs' results side by side, matched on (model, policy), with B − A differences."""
    ra, rb = results(recorder, a), results(recorder, b)
    index_b = {(r["model"], r["policy"]): r for r in rb["results"]}
    rows = []
    for r in ra["results"]:
        other = index_b.pop((r["model"], r["policy"]), None)
        rows.append({"model": r["model"], "policy": r["policy"], "a": r, "b": other,
                     "delta": _delta(r, other)})
    rows += [{"model": r["model"], "policy": r["policy"], "a": None, "b": r, "delta": None}
             for r in index_b.values()]
    return {"a": {k: v for k, v in ra.items() if k != "results"},
            "b": {k: v for k, v in rb.items() if k != "results"}, "rows": rows, "notes": _unlike(ra, rb, rows)}


def _unlike(ra: dict[str, Any], rb: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What makes two runs' figures other than like for like: their differences would measure that too."""
    def asked(r: dict[str, Any]) -> str:  # a file by its absolute path, however it was named
        return r["source"] if r["source"] and Path(r["source"]).is_absolute() else r["suite"]

    notes = []
    if asked(ra) != asked(rb):
        notes.append(f"the runs asked different suites ({ra['suite']}, {rb['suite']})")
    counts = [f"{r['model']}/{r['policy']} {r['a']['n']} → {r['b']['n']}" for r in rows
              if r["a"] and r["b"] and r["a"]["n"] != r["b"]["n"]]
    if counts:
        notes.append(f"different numbers of questions ({', '.join(counts)})")
    for side in ("meter", "machine"):
        if ra[side] != rb[side]:
            notes.append(f"different {side}s ({ra[side]}; {rb[side]})")
    # a run from before they were stored says nothing of them
    if None not in (ra["max_tokens"], rb["max_tokens"]) and ra["max_tokens"] != rb["max_tokens"]:
        notes.append(f"different answer lengths (--max-tokens {ra['max_tokens']}; {rb['max_tokens']})")
    if None not in (ra["idle_seconds"], rb["idle_seconds"]) and bool(ra["idle_seconds"]) != bool(rb["idle_seconds"]):
        notes.append("idle power measured in one run only (--idle)")
    return notes


def _delta(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, float] | None:
    if b is None:
        return None
    keys = ("accuracy", "joules_per_query", "avg_watts", "ipw", "accuracy_per_joule", "tokens_per_s")
    return {k: b[k] - a[k] for k in keys if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))}
