"""Answers that end: the embedded model on a bench suite, before and after the loop fixes, in one run.

    .venv/bin/python benchmarks/answers_that_end.py [--suite mixed] [--limit N] [--write]

- before: what `ask` did until now — the catalog's temperature 0.2 / top-p 0.9, no repeat penalty, no min-p, no
  loop guard, 512 tokens for every question;
- after: what `ask` does now — the model's generation defaults (repeat penalty 1.1, min-p 0.05, the loop guard) and
  the small tier's answer budget (`localmoe.routing.budget`: 32 tokens where the question asks for a bare value,
  as every question of these suites does).

Both go through the same path as `localmoe ask` (Assistant → router → Session → llama.cpp, metered and recorded in a
throwaway data dir), with the same seed per question, alternating which goes first. Reported per configuration:
accuracy (the suite's own grading), the share of answers cut at the token limit, stopped loops, mean tokens and
joules per question, and IPW (accuracy ÷ average watts); and what a question costs before its first answer token:
prompt tokens evaluated (the rest came from the KV cache: the system prompt the last conversation shared), time to
the first token, and the fixed joules per question of a least-squares fit joules = fixed + per-token × tokens. The
energy meter is whatever this machine has; where no
sensor is readable it is the labelled CPU-time estimate, so the figures are relative, not absolute.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import write_section

from localmoe.bench import scoring, suites

SEED = 1234  # llama.cpp reseeds at every answer: each question is decoded alike in both configurations
CONFIGS = {
    "before": {"repeat_penalty": 1.0, "min_p": 0.0, "loop_guard": False, "max_tokens": 512, "seed": SEED},
    "after": {"seed": SEED},
}


# What the section says besides its numbers: how "after" came to be what it is.
CHANGES = """

The first run of this benchmark gave 0.61 (9.70 → 5.95 J, tokens 59.5 → 31.4 per question): about 1.5 J of every
question did not scale with its tokens. `--profile` (next section) times that fixed part phase by phase: it is the
prompt evaluation of the question's own tokens (here a prompt token costs about a third of a decode step) and the
end-of-answer token's decode step. The system prompt is already kept in the KV cache from one conversation to the next
(27 of the profiled question's 50 prompt tokens, ~80 ms or ~1 J a question; the "prompt tok evaluated" column is the
question alone; `tests/test_answer_cost.py` pins it). Routing, template, tokenising, recording and the energy sampler
take a few milliseconds together, less than half a millisecond of it inside the metered span. Nothing there was worth
cutting. What was left to cut honestly was answer tokens: a question that asks for a bare value ("Answer with a number
only", "with one word", "the symbol only", "the letter of the correct option only") now gets a 32-token budget instead
of 96 — and no longer the full 512 when it mentions a letter ("How many times does the letter …", multiple choice),
which read as a request to write one. 32 was sized on the `router-train` questions that `mixed` does not share (200
generated + 26 facts, decoded as "after", every budget simulated from the same answers): every answer graded right
ended within 22 tokens but one, right by accident at any length ("9 ÷ 3 is a classic example of the "division by zero"
conundrum…", graded on its last number, the question's 3). Graded right with a 96-token budget: 24 of 226; with 32: 26
(two ramblings cut where their last number happened to be right); with 16: 24."""


def run(suite: str, limit: int | None) -> dict[str, dict[str, float]]:
    from localmoe.chat.assistant import Assistant

    loaded = suites.load_suite(suite, limit=limit)
    assistants = {name: Assistant(overrides=over) for name, over in CONFIGS.items()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    meter = ""
    try:
        for i, item in enumerate(loaded.items):
            order = list(CONFIGS) if i % 2 == 0 else list(CONFIGS)[::-1]
            for name in order:
                a = assistants[name]
                a.new_conversation()
                reply = a.ask(item.question).run().reply
                e = reply.energy
                meter = f"{e.meter} ({'measured' if e.measured else 'estimated'})" if e else "none"
                rows[name].append({
                    "correct": float(scoring.score(item, reply.text).correct),
                    "length": float(reply.stats.stop_reason == "length"),
                    "repetition": float(reply.stats.stop_reason == "repetition"),
                    "tokens": float(reply.stats.completion_tokens),
                    "prompt_eval": float(reply.stats.prompt_eval_tokens or 0), "ttft": reply.stats.ttft_s or 0.0,
                    "joules": e.joules if e else 0.0, "seconds": e.seconds if e else reply.stats.wall_s,
                })
            print(f"{i + 1}/{len(loaded.items)}", end="\r", flush=True)
    finally:
        for a in assistants.values():
            a.close()
    out = {}
    for name, rs in rows.items():
        n = len(rs)
        acc = sum(r["correct"] for r in rs) / n
        joules, seconds = sum(r["joules"] for r in rs), sum(r["seconds"] for r in rs)
        watts = joules / seconds if seconds else 0.0
        out[name] = {"n": n, "accuracy": acc, "length_share": sum(r["length"] for r in rs) / n,
                     "loops_stopped": sum(r["repetition"] for r in rs), "tokens": sum(r["tokens"] for r in rs) / n,
                     "joules": joules / n, "watts": watts, "ipw": acc / watts if watts else 0.0,
                     "acc_per_joule": acc / (joules / n) if joules else 0.0, "meter": meter,
                     "prompt_eval": sum(r["prompt_eval"] for r in rs) / n, "ttft": sum(r["ttft"] for r in rs) / n,
                     **dict(zip(("fixed_j", "j_per_token"), fit([r["tokens"] for r in rs], [r["joules"] for r in rs]),
                                strict=True))}
    return out


def profile(reps: int = 15) -> list[tuple[str, float]]:
    """Where a short answer's fixed cost goes on the `ask` path, phase by phase: the fastest of `reps` tries of each
    (the least disturbed by whatever else runs on the machine), in ms. Questions from `router-train`, not the
    evaluated suite; the model loaded once and reused, as in `run`."""
    from dataclasses import replace

    from localmoe.chat.assistant import Assistant
    from localmoe.engine.base import reusable_prefix
    from localmoe.record import meters

    mixed = {i.question for i in suites.load_suite("mixed").items}
    pool = [i.question for i in suites.load_suite("router-train").items if i.question not in mixed]
    q, other = pool[1], pool[2]  # two short arithmetic questions
    a = Assistant(overrides={"seed": SEED})
    session = a.session_for("small")
    t0 = time.perf_counter()
    session.load()
    load_ms = (time.perf_counter() - t0) * 1000
    engine, config = session.engine, session.config
    llm = engine._llm
    msgs, other_msgs = [{"role": "user", "content": q}], [{"role": "user", "content": other}]
    tokens = engine.prompt_tokens(msgs)
    keep = reusable_prefix(engine.prompt_tokens(other_msgs), tokens)

    def best(f: object) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return min(times) * 1000

    def evaluate(start: int, ids: list[int]) -> None:
        llm.n_tokens = start
        llm._ctx.kv_cache_seq_rm(-1, start, -1)
        llm.eval(ids)

    def stream(m: list[dict[str, str]], n: int) -> None:
        for _ in engine.stream(m, replace(config, max_tokens=n)):
            pass

    def first_token() -> float:
        stream(other_msgs, 1)  # the cache holds another conversation: only the shared system prompt is reused
        t = time.perf_counter()
        stream(msgs, 1)
        return time.perf_counter() - t

    meter, _ = meters.select_meter()

    def sampler() -> None:
        meters.Sampler(meter).start().stop()

    evaluate(0, tokens)
    rows = [("load the model (once per process)", load_ms),
            ("route the question", best(lambda: a.route(q))),
            ("render the chat template and tokenise", best(lambda: engine.prompt_tokens(msgs))),
            ("energy sampler start + stop", best(sampler)),
            (f"evaluate the whole prompt, nothing cached ({len(tokens)} tokens)", best(lambda: evaluate(0, tokens))),
            (f"evaluate the question after the cached system prompt ({len(tokens) - keep} tokens)",
             best(lambda: evaluate(keep, tokens[keep:]))),
            ("stream to the first token, system prompt cached", min(first_token() for _ in range(reps)) * 1000),
            ("one decode step (one more answer token, or the end-of-answer token)",
             best(lambda: evaluate(len(tokens), tokens[-1:])))]
    asked = []
    for _ in range(reps // 3 or 1):
        a.new_conversation()
        stream(other_msgs, 1)
        t = time.perf_counter()
        routed = a.ask(q)
        t1 = time.perf_counter()
        routed.run()
        t2 = time.perf_counter()
        asked.append((t2 - t, t1 - t, t2 - t1 - (routed.reply.energy.seconds if routed.reply.energy else 0.0),
                      routed.reply.stats.completion_tokens))
    total, before, after, n = min(asked)
    rows += [(f"the whole `ask` of one {n}-token answer", total * 1000),
             ("  of which before the answer: route, record the question", before * 1000),
             ("  of which outside the metered span after it: record the answer", after * 1000)]
    a.close()
    return rows


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b·x: (a, b); (mean y, 0) when every x is the same."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mixed")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time the phases of one short answer instead")
    args = ap.parse_args()
    if args.profile:
        with tempfile.TemporaryDirectory() as home:
            os.environ["LOCALMOE_HOME"] = home
            rows = profile()
        body = ("## Answers that end: where a short answer's fixed cost goes (embedded SmolLM2, `ask` path)\n\n"
                "`.venv/bin/python benchmarks/answers_that_end.py --profile --write`: each phase the fastest of 15 "
                "tries in one process, the model loaded once (as in the run above), on a `router-train` question.\n\n"
                "| phase | ms |\n|---|---|\n" + "\n".join(f"| {what} | {ms:.1f} |" for what, ms in rows))
        print(body)
        if args.write:
            write_section("answers-that-end-profile", body)
        return
    with tempfile.TemporaryDirectory() as home:
        os.environ["LOCALMOE_HOME"] = home  # a throwaway database: nothing of the user's is touched
        t0 = time.perf_counter()
        res = run(args.suite, args.limit)
        took = time.perf_counter() - t0
    b, a = res["before"], res["after"]
    lines = [
        "| config | questions | accuracy | cut at the limit | loops stopped | tokens / q | joules / q | avg W | IPW "
        "(acc/W) | acc / J | prompt tok evaluated / q | ttft s | fixed J / q | J / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['length_share']:.1%} | {int(r['loops_stopped'])}"
                     f" | {r['tokens']:.1f} | {r['joules']:.2f} | {r['watts']:.1f} | {r['ipw']:.4f} | "
                     f"{r['acc_per_joule']:.3f} | {r['prompt_eval']:.1f} | {r['ttft']:.3f} | {r['fixed_j']:.2f} | "
                     f"{r['j_per_token']:.3f} |")
    ratio = a["joules"] / b["joules"] if b["joules"] else float("nan")
    body = (
        "## Answers that end: loop guard, repeat penalty and answer budget (embedded SmolLM2)\n\n"
        f"`.venv/bin/python benchmarks/answers_that_end.py --suite {args.suite}"
        f"{f' --limit {args.limit}' if args.limit else ''} --write` ({took:.0f} s, 2 cores; meter: {b['meter']}). "
        "Both configurations in one run through the `ask` path, same seed per question, order alternating.\n\n"
        + "\n".join(lines)
        + f"\n\nJoules per question after ÷ before: **{ratio:.2f}**; accuracy {b['accuracy']:.3f} → "
        f"{a['accuracy']:.3f}; answers cut at the token limit {b['length_share']:.1%} → {a['length_share']:.1%}."
        + CHANGES
    )
    print(body)
    if args.write:
        write_section("answers-that-end", body)


if __name__ == "__main__":
    main()
