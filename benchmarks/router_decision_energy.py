"""What a routing decision costs beside what it decides about: on the first N questions of the independent
evaluation set (`assets/suites/router_eval.jsonl`), each strategy's decision as `ask` makes it (the Assistant's
metered decision: the small tier's meter around the router), and the small tier's greedy answer to the same
question (at most 96 tokens, as the labels were made). The meter is the best this machine has; on a machine without
sensors it is the labelled CPU-time estimate, and then only the ratios mean much.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_decision_energy.py [--n 40] [--write]

The large tier is a stand-in so that `probe` runs (it needs a tier larger than the small one): the tiny MoE GGUF
built by the test suite if it is there, else any file given with --large. Its answers are not measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--large", type=Path, help="a GGUF to name as the large tier (never asked here)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    large = args.large or next(iter(sorted((ROOT / ".pytest_cache").glob("d/localmoe-models/tiny_moe/*/*.gguf"))),
                               None)
    if large is None:
        sys.exit("no large tier to name: run the test suite once (it builds tests' tiny MoE) or pass --large FILE")
    home = Path(tempfile.mkdtemp(prefix="localmoe-route-energy-"))
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{large}"\n')
    os.environ["LOCALMOE_HOME"] = str(home)

    from localmoe.bench import suites
    from localmoe.chat.assistant import Assistant
    from localmoe.engine import GenerationConfig

    questions = [item.question for item in suites.load_suite(str(ROOT / "assets/suites/router_eval.jsonl")).items]
    questions = questions[: args.n]
    rows: dict[str, dict[str, list[float]]] = {}
    meter = ""
    for strategy in ("learned", "probe"):
        a = Assistant(strategy=strategy, overrides={"temperature": 0.0, "max_tokens": 96})
        a.warm_router()
        a.route("warm-up question", load=True)
        out = rows.setdefault(strategy, {"joules": [], "ms": []})
        for q in questions:
            d = a.route(q)
            out["joules"].append(d.joules or 0.0)
            out["ms"].append(d.latency_ms)
        a.close()
    a = Assistant(strategy="learned")
    small = a.session_for("small")
    small.config = GenerationConfig(**{**vars(small.config), "temperature": 0.0, "max_tokens": 96})
    answers: dict[str, list[float]] = {"joules": [], "ms": []}
    for q in questions:
        a.new_conversation()
        t0 = time.perf_counter()
        reply = small.ask(q).run()
        answers["ms"].append((time.perf_counter() - t0) * 1000)
        answers["joules"].append(reply.energy.joules if reply.energy else 0.0)
        meter = reply.energy.meter if reply.energy else "none"
    a.close()
    med = {k: {m: statistics.median(v[m]) for m in ("joules", "ms")} for k, v in {**rows, "answer": answers}.items()}
    for name, m in med.items():
        print(f"{name:8} median {m['joules']:.3f} J, {m['ms']:.0f} ms")
    ratio = med["probe"]["joules"] / med["answer"]["joules"] if med["answer"]["joules"] else float("nan")
    print(f"probe decision / small answer: {ratio:.2f}; meter: {meter}")
    if args.write:
        write_section("router_decision_energy", f"""
## Router: what a decision costs beside the answer (embedded SmolLM2 as small tier)

Command: `flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_decision_energy.py --n {args.n} --write`
({time.strftime('%Y-%m-%d')}, 2 shared cores; meter: {meter}, so joules are the labelled CPU-time estimate
here). The first {len(questions)} questions of the independent evaluation set; each decision as `ask` makes it
(metered on the small tier's meter, stored as `routing_decisions.joules`, counted in `bench`'s routed items), and
the small tier's own greedy answer (≤ 96 tokens) to the same question. Medians.

| | joules | ms |
|---|---|---|
| `learned` decision | {med['learned']['joules']:.3f} | {med['learned']['ms']:.1f} |
| `probe` decision (the default with a larger tier) | {med['probe']['joules']:.3f} | {med['probe']['ms']:.0f} |
| the small tier's answer | {med['answer']['joules']:.3f} | {med['answer']['ms']:.0f} |

A `probe` decision costs {ratio:.2f}× the small model's answer here: routing a question the small model would have
answered anyway costs that much more, and it pays off only where it sends a question the small model gets wrong to
the large tier, or keeps an easy one from it.
""")


if __name__ == "__main__":
    main()
