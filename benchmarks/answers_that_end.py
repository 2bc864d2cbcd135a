"""Answers that end: the embedded model on a bench suite, before and after the loop fixes, in one run.

    .venv/bin/python benchmarks/answers_that_end.py [--suite mixed] [--limit N] [--write]

- before: what `ask` did until now — the catalog's temperature 0.2 / top-p 0.9, no repeat penalty, no min-p, no
  loop guard, 512 tokens for every question;
- after: what `ask` does now — the model's generation defaults (repeat penalty 1.1, min-p 0.05, the loop guard) and
  the small tier's answer budget.

Both go through the same path as `localmoe ask` (Assistant → router → Session → llama.cpp, metered and recorded in a
throwaway data dir), with the same seed per question, alternating which goes first. Reported per configuration:
accuracy (the suite's own grading), the share of answers cut at the token limit, stopped loops, mean tokens and
joules per question, and IPW (accuracy ÷ average watts). The energy meter is whatever this machine has; where no
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
                     "acc_per_joule": acc / (joules / n) if joules else 0.0, "meter": meter}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mixed")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["LOCALMOE_HOME"] = home  # a throwaway database: nothing of the user's is touched
        t0 = time.perf_counter()
        res = run(args.suite, args.limit)
        took = time.perf_counter() - t0
    b, a = res["before"], res["after"]
    lines = [
        "| config | questions | accuracy | cut at the limit | loops stopped | tokens / q | joules / q | avg W | IPW "
        "(acc/W) | acc / J |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['length_share']:.1%} | {int(r['loops_stopped'])}"
                     f" | {r['tokens']:.1f} | {r['joules']:.2f} | {r['watts']:.1f} | {r['ipw']:.4f} | "
                     f"{r['acc_per_joule']:.3f} |")
    ratio = a["joules"] / b["joules"] if b["joules"] else float("nan")
    body = (
        "## Answers that end: loop guard, repeat penalty and answer budget (embedded SmolLM2)\n\n"
        f"`.venv/bin/python benchmarks/answers_that_end.py --suite {args.suite}"
        f"{f' --limit {args.limit}' if args.limit else ''} --write` ({took:.0f} s, 2 cores; meter: {b['meter']}). "
        "Both configurations in one run through the `ask` path, same seed per question, order alternating.\n\n"
        + "\n".join(lines)
        + f"\n\nJoules per question after ÷ before: **{ratio:.2f}**; accuracy {b['accuracy']:.3f} → "
        f"{a['accuracy']:.3f}; answers cut at the token limit {b['length_share']:.1%} → {a['length_share']:.1%}."
    )
    print(body)
    if args.write:
        write_section("answers-that-end", body)


if __name__ == "__main__":
    main()
