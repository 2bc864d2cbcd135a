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
    "ev-conv-02": (1, "'a deep shade of blue', then 'a hint of pink or purple': blue is the answer"),
    "ev-conv-11": (1, "'Tomatoes are botanically considered a fruit', then rambling about vegetables"),
    "ev-conv-17": (1, "'translated as 'Hola' or 'Hola'': the same right word twice"),
    "ev-conv-21": (0, "'No, my friend is wrong. The answer is \"Yes.\"': says both"),
    "ev-instr-14": (1, "'1, 4, 9, 16, 25, ...': 25 comes next; the wrong later terms do not change it"),
    "ev-def-13": (1, "'A thermometer measures the temperature of a substance'"),
    "ev-def-28": (1, "'A carnivore is an animal that eats meat.'"),
    "ev-code-06": (1, "'The keyword \"def\" is used to define a function in Python'"),
    "ev-code-18": (1, "'False in Python.', then a list of other languages"),
    "ev-fact-02": (0, "wrote the letter A with the text 'Pacific'"),
    "ev-fact-10": (0, "'has 12 strings', the scorer took the later '6 strings per octave'"),
    "ev-fact-19": (1, "'299,792,458 metres per second': right, in m/s rather than km/s"),
    "ev-fact-21": (1, "'has 88 keys', then nonsense about '88 rows of 51 keys'"),
    "ev-arith-19": (1, "'1001 is divisible by 7': yes, with a wrong working after it"),
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
