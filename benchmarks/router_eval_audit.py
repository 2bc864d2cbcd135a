"""A hand audit of the scorer's verdicts on the router evaluation set (benchmarks/router_eval_labels.jsonl, made by
`benchmarks/label_router_suite.py --suite assets/suites/router_eval.jsonl`): every small-model answer was read,
and these are the ones where a reader and `localmoe.bench.scoring` disagree. Writes
benchmarks/router_eval_labels_audited.jsonl (the same rows with `small_correct` set to the reader's verdict), so
`bench router` can be run on both; the audit changes no question, answer or router.

    .venv/bin/python benchmarks/router_eval_audit.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "benchmarks" / "router_eval_labels.jsonl"
OUT = ROOT / "benchmarks" / "router_eval_labels_audited.jsonl"

# id -> (reader's verdict, why the scorer's differs)
AUDIT = {
    "ev-conv-02": (1, "'a deep shade of blue': the answer, then colour notes"),
    "ev-conv-10": (1, "'It's a classic breakfast'"),
    "ev-conv-27": (0, "'you have 13:45 minutes' is not 45; the scorer took the 45 of 13:45"),
    "ev-instr-04": (1, "'full' first, then a stray 'or emptyset'"),
    "ev-def-01": (0, "wrote the letter A with option B's text"),
    "ev-def-11": (1, "'\"mean\" or \"average\"': both right"),
    "ev-def-13": (1, "'measures the temperature of a substance'"),
    "ev-def-15": (1, "'is called lava' (the scorer does not take 'is called X')"),
    "ev-def-19": (1, "'is called the Equator'"),
    "ev-def-25": (1, "'stands for Central Processing Unit'"),
    "ev-def-26": (1, "'is called friction'"),
    "ev-def-27": (1, "'is called biology'"),
    "ev-def-28": (1, "'eats meat', then a wrong list of carnivores"),
    "ev-code-06": (1, "'The Python keyword \"def\" is used to define a function'"),
    "ev-code-07": (1, "'SQL stands for Structured Query Language'"),
    "ev-code-09": (1, "'HTML stands for Hypertext Markup Language'"),
    "ev-follow-02": (0, "'The answer is: 8', then 'in reality, spiders have 10 legs'"),
    "ev-fact-02": (0, "wrote the letter A with the text 'Pacific'"),
    "ev-fact-09": (1, "'native to Australia'"),
    "ev-fact-18": (1, "'has 32 teeth', the scorer took a later 36"),
    "ev-fact-19": (1, "'299792458 meters per second': right, in m/s rather than km/s"),
    "ev-fact-26": (1, "'located in Paris, France'"),
    "ev-arith-18": (0, "no quotient given; the scorer took the last 1,000"),
}


def main() -> None:
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = {r["id"] for r in rows}
    assert set(AUDIT) <= ids, sorted(set(AUDIT) - ids)
    changed = agreed = 0
    for r in rows:
        if r["id"] in AUDIT:
            verdict, why = AUDIT[r["id"]]
            # the scorer has since learned some of these phrasings ("is called lava", "stands for ..."): the
            # reader's verdict stands either way, and the note says why the first scorer missed it
            agreed += verdict == r["small_correct"]
            changed += verdict != r["small_correct"]
            r["small_correct"], r["audit"] = verdict, why
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    acc = sum(r["small_correct"] for r in rows) / len(rows)
    print(f"{changed} of {len(rows)} verdicts changed by the audit ({agreed} audited verdicts the scorer now gives "
          f"itself); small-tier accuracy {acc:.1%} -> {OUT}")


if __name__ == "__main__":
    main()
