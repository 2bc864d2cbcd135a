"""Label the router's training suite by actually running the small model: which questions does it get wrong,
and how sure was it (token log-probabilities)? Writes assets/router/labels.jsonl, from which
`localmoe router train --shipped` builds the default router.

    .venv/bin/python benchmarks/label_router_suite.py [--suite router-train] [--out assets/router/labels.jsonl]

With --rescore it runs no model: it scores the outputs already stored in --out again with the current scorer
(after a scorer fix), keeps every other field, and says which labels flipped:

    .venv/bin/python benchmarks/label_router_suite.py --rescore
    .venv/bin/python benchmarks/label_router_suite.py --rescore --suite assets/suites/router_eval.jsonl \\
        --out benchmarks/router_eval_labels.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from localmoe.bench import scoring, suites
from localmoe.chat.session import Session
from localmoe.engine import GenerationConfig
from localmoe.record.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="router-train")
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "router" / "labels.jsonl")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rescore", action="store_true", help="score the stored outputs again; run no model")
    args = ap.parse_args()
    suite = suites.load_suite(args.suite)
    if args.rescore:
        rescore(suite, args.out)
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, Recorder(Path(tmp) / "labels.db") as rec:
        session = Session(None, recorder=rec, meter=False,
                          config=GenerationConfig(max_tokens=args.max_tokens, temperature=0.0, logprobs=True))
        rows = []
        for n, item in enumerate(suite.items, 1):
            session.new_conversation()
            reply = session.ask(item.question).run()
            verdict = scoring.score(item, reply.text)
            s = reply.stats
            rows.append({"id": item.id, "category": item.category, "difficulty": item.difficulty,
                         "question": item.question, "answer": item.answer, "small_output": reply.text,
                         "small_correct": int(verdict.correct), "mean_logprob": s.mean_logprob,
                         "min_logprob": s.min_logprob, "completion_tokens": s.completion_tokens})
            print(f"\r{n}/{len(suite.items)} correct so far {sum(r['small_correct'] for r in rows)}", end="",
                  file=sys.stderr)
        session.close()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    acc = sum(r["small_correct"] for r in rows) / len(rows)
    print(f"\n{len(rows)} items labelled in {time.time() - t0:.0f} s; small-tier accuracy {acc:.1%} → {args.out}")


def rescore(suite: suites.Suite, path: Path) -> None:
    items = {item.id: item for item in suite.items}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    flips = []
    for row in rows:
        correct = int(scoring.score(items[row["id"]], row["small_output"]).correct)
        if correct != row["small_correct"]:
            flips.append(f"{row['id']}: {row['small_correct']} -> {correct}")
            row["small_correct"] = correct
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(flips))
    print(f"{len(flips)} of {len(rows)} labels flipped; small-tier accuracy "
          f"{sum(r['small_correct'] for r in rows) / len(rows):.1%} → {path}")


if __name__ == "__main__":
    main()
