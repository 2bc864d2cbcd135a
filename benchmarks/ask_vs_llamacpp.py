"""Decode speed of `localmoe ask` against llama-cpp-python called directly, same model, prompt and run.

Both sides decode greedily from the same chat-templated prompt with the same thread count, so they produce the
same tokens; runs alternate so that machine noise hits both alike. Decode tokens/s is counted from the first
token to the last on both sides (prompt processing excluded). Usage:

    .venv/bin/python benchmarks/ask_vs_llamacpp.py [--reps 5] [--max-tokens 256] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import write_section
from llama_cpp import Llama

from localmoe.engine.llamacpp import DEFAULT_CTX, LlamaCppEngine, default_threads
from localmoe.home import models

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def direct_rate(llm: Llama, prompt_tokens: list[int], max_tokens: int) -> tuple[float, int]:
    llm.reset()
    times = []
    for chunk in llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["finish_reason"] is None:  # the closing chunk carries no new token
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0]), len(times)


def cli_rate(max_tokens: int, home: str) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-m", "localmoe", "ask", PROMPT, "--json", "--temperature", "0",
         "--max-tokens", str(max_tokens)],
        capture_output=True, text=True, check=True, env={**os.environ, "LOCALMOE_HOME": home},
    )
    data = json.loads(out.stdout)
    return data["timing"]["tokens_per_s"], data["usage"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--write", action="store_true", help="record the result in RESULTS.md")
    args = ap.parse_args()

    ref = models.default_model()
    # only to build the identical prompt tokens (with the system prompt `ask` gives the model)
    engine = LlamaCppEngine(ref.path, system_prompt=models.system_prompt(ref.path))
    tokens = engine.prompt_tokens([{"role": "user", "content": PROMPT}])
    engine.close()
    llm = Llama(str(ref.path), n_ctx=DEFAULT_CTX, n_threads=default_threads(),
                n_threads_batch=default_threads(), verbose=False)

    home = tempfile.mkdtemp(prefix="localmoe-bench-")
    direct, ours = [], []
    for i in range(args.reps):
        d, nd = direct_rate(llm, tokens, args.max_tokens)
        o, no = cli_rate(args.max_tokens, home)
        direct.append(d)
        ours.append(o)
        print(f"rep {i + 1}: direct {d:6.1f} tok/s ({nd} tokens)   localmoe ask {o:6.1f} tok/s ({no} tokens)")
    md, mo = statistics.median(direct), statistics.median(ours)
    ratio = mo / md
    print(f"median: direct {md:.1f} tok/s, localmoe ask {mo:.1f} tok/s, ratio {ratio:.3f} (target >= 0.97)")

    if args.write:
        section = (
            f"## `localmoe ask` vs llama-cpp-python direct ({ref.id})\n\n"
            f"Command: `.venv/bin/python benchmarks/ask_vs_llamacpp.py --reps {args.reps} "
            f"--max-tokens {args.max_tokens} --write`  \n"
            f"Machine: {os.cpu_count()} cores, {default_threads()} threads; {time.strftime('%Y-%m-%d')}\n\n"
            "| side | median decode tok/s | runs |\n|---|---|---|\n"
            f"| llama-cpp-python direct (`create_completion`, stream) | {md:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in direct)} |\n"
            f"| `localmoe ask --json` (CLI subprocess, recorded) | {mo:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in ours)} |\n\n"
            f"Ratio localmoe / direct: **{ratio:.3f}** (target ≥ 0.97).\n"
        )
        write_section("ask_vs_llamacpp", section)


if __name__ == "__main__":
    main()
