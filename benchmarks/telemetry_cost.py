"""Decode tokens/s with routing telemetry off vs on, same model, prompt and run (alternating reps).

    .venv/bin/python benchmarks/telemetry_cost.py [--moe MODEL.gguf] [--reps 5] [--max-tokens 128] [--write]

Without --moe, the synthetic benchmark MoE of benchmarks/common.py is built (once) and used.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import bench_moe, write_section

from localmoe.engine import GenerationConfig
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.home import models

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def rate(engine: LlamaCppEngine, max_tokens: int) -> float:
    # min_p/eos do not matter: a random model never stops early, SmolLM2 gets a long prompt
    for _ in engine.stream(PROMPT, GenerationConfig(max_tokens=max_tokens, temperature=0.0)):
        pass
    return engine.stats.tokens_per_s or 0.0


def measure(path: Path, reps: int, max_tokens: int) -> tuple[list[float], list[float], int]:
    off = LlamaCppEngine(path, n_ctx=1024)
    on = LlamaCppEngine(path, n_ctx=1024, telemetry=True)
    off.load()
    on.load()
    a, b = [], []
    for _ in range(reps):
        a.append(rate(off, max_tokens))
        b.append(rate(on, max_tokens))
    traced = len(on.routing)
    off.close()
    on.close()
    return a, b, traced


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    moe = args.moe or bench_moe()
    rows = []
    for label, path in (("SmolLM2-135M Q4_1 (dense)", models.default_model().path),
                        ("synthetic Qwen3-MoE f32 (8 layers, 32 experts, top-4)", moe)):
        off, on, traced = measure(Path(path), args.reps, args.max_tokens)
        mo, mn = statistics.median(off), statistics.median(on)
        rows.append((label, mo, mn, traced, off, on))
        print(f"{label}: off {mo:.1f} tok/s, on {mn:.1f} tok/s ({mn / mo:.3f}); "
              f"{traced} tokens traced in the last run")

    if args.write:
        table = "\n".join(
            f"| {label} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | {traced} | "
            f"{', '.join(f'{x:.0f}' for x in off)} / {', '.join(f'{x:.0f}' for x in on)} |"
            for label, mo, mn, traced, off, on in rows)
        section = (
            "## Routing telemetry cost (llama.cpp `cb_eval` on `ffn_moe_topk-*`)\n\n"
            f"Command: `.venv/bin/python benchmarks/telemetry_cost.py --reps {args.reps} "
            f"--max-tokens {args.max_tokens} --write`; {time.strftime('%Y-%m-%d')}, 2 cores, greedy decode.\n\n"
            "| model | off tok/s | on tok/s | on/off | tokens traced | runs off / on |\n|---|---|---|---|---|---|\n"
            f"{table}\n\nDense models have no routing nodes: the cost shown is the callback being asked about "
            f"every graph node.\n"
        )
        write_section("telemetry_cost", section)


if __name__ == "__main__":
    main()
