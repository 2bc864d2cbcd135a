"""Decode speed on the path users take (issue #23): `localmoe ask --json` in a fresh process, the native engine on a
Hugging Face checkpoint beside llama.cpp on the same weights as GGUF, greedy, 64 tokens:

    .venv/bin/python benchmarks/product_path.py [--reps 2] [--cap-mb 2000] [--write]

Models: bench_deep()'s 32-layer Qwen3-MoE (hidden 512, 8 experts, top-2, f32, ~2.7 GB) and bench_hf()'s 8-layer one
(hidden 1024, 32 experts, top-4, f32, ~2 GB). Conditions:
ram     no memory cap, the files in the page cache (one warm-up run each): ours reads every expert in the background at
        load (they all fit), llama.cpp maps the GGUF.
capped  under `../shared/tools/memcap CAP --evict HF --evict GGUF` (default 2000 MB): ours plans a partial expert cache
        for the cap it detects, with prefetch (the torch decode path) and without (the native step, resolving misses);
        llama.cpp maps the GGUF.
quarter the cap of the engine benchmark's capped runs: the process's own footprint + the dense weights + 25% of the
        experts; ours is given the matching --fast-memory (a quarter of each layer's experts as slots), no prefetch.
        At that cap `ask` refuses the GGUF (it does not fit), so its llama.cpp row runs llama-cpp-python itself
        (mmap, one run).
Each row says which decode path ran (`experts.decode_step` of `ask --json`). The loop guard and repeat penalty are
off for both engines (random weights repeat themselves; every run then decodes all 64 tokens); all else is `ask`.
tok/s is `timing.tokens_per_s` (after the first token); the median of --reps runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, bench_deep, bench_hf, bench_moe, write_section

MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
TOKENS = 64
PROMPT = ("Write a short story about a lighthouse keeper who finds a bottle with a letter inside, and what the "
          "letter says, in about two hundred words.")
# `ask` as is, but with no loop guard or repeat penalty: the same for both engines
ASK = ("import sys, localmoe.home.models as m; m.SANE_DEFAULTS.update(loop_guard=False, repeat_penalty=1.0); "
       "from localmoe.cli import main; sys.exit(main(sys.argv[1:]))")


def ask(model: Path, home: Path, extra: list[str], cap_mb: int | None, evict: list[Path]) -> dict[str, Any]:
    cmd = [sys.executable, "-c", ASK, "ask", PROMPT, "--model", str(model), "--json", "--no-log",
           "--max-tokens", str(TOKENS), "--temperature", "0", *extra]
    if cap_mb is not None:
        cmd = [str(MEMCAP), str(cap_mb), *(a for p in evict for a in ("--evict", str(p))), "--", *cmd]
    env = {**os.environ, "LOCALMOE_HOME": str(home)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:160]}
    out = json.loads(done.stdout)
    experts = out.get("experts") or {}
    return {"tok_s": out["timing"]["tokens_per_s"], "tokens": out["usage"]["completion_tokens"],
            "path": experts.get("decode_step", "llama.cpp"), "slots": experts.get("slots"),
            "hit_rate": experts.get("hit_rate")}


# llama-cpp-python itself, for a cap at which `ask` refuses the GGUF (it does not fit): mmap, greedy, TOKENS tokens
DIRECT = """
import json, sys, time
import numpy as np
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, verbose=False)
ids = llm.tokenize(sys.argv[2].encode())
llm.eval(ids)
t0 = None
for i in range(int(sys.argv[3])):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    if t0 is None:
        t0 = time.perf_counter()
print(json.dumps({"tok_s": (int(sys.argv[3]) - 1) / (time.perf_counter() - t0)}))
"""


def direct(gguf: Path, cap_mb: int, evict: list[Path]) -> dict[str, Any]:
    cmd = [str(MEMCAP), str(cap_mb), *(a for p in evict for a in ("--evict", str(p))), "--",
           sys.executable, "-c", DIRECT, str(gguf), PROMPT, str(TOKENS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:160]}
    return {**json.loads(done.stdout.splitlines()[-1]), "tokens": TOKENS, "path": "llama.cpp", "slots": None}


def footprint_mb() -> int:
    """RSS of a process that has imported what `ask` imports (torch, llama.cpp, the CLI), in MB."""
    code = ("import torch, llama_cpp, localmoe.cli, psutil; "
            "print(psutil.Process().memory_info().rss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) >> 20


def quarter(hf: Path) -> tuple[int, int]:
    """(memcap in MB, ours' --fast-memory in bytes) for the footprint + dense + 25% of the experts rule."""
    from localmoe.placement.plan import RAM_RESERVE, plan_checkpoint
    from localmoe.placement.safetensors import checkpoint_tensors

    config = json.loads((hf / "config.json").read_text())
    probe = plan_checkpoint(config, checkpoint_tensors(hf), 1 << 40, ctx=2048)  # the engine's default context
    experts = probe.bytes_per_expert * probe.n_experts * probe.n_layers
    fast = RAM_RESERVE + probe.dense_bytes + probe.kv_bytes + experts // 4
    return footprint_mb() + ((probe.dense_bytes + probe.kv_bytes + experts // 4) >> 20), fast


def median_run(model: Path, home: Path, extra: list[str], cap_mb: int | None, evict: list[Path],
               reps: int) -> dict[str, Any]:
    runs = [ask(model, home, extra, cap_mb, evict) for _ in range(reps)]
    good = [r for r in runs if "error" in r or r["tok_s"]]
    if any("error" in r for r in good):
        return next(r for r in good if "error" in r)
    best = dict(good[-1])
    best["tok_s"] = statistics.median(r["tok_s"] for r in good)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cap-mb", type=int, default=2000)
    ap.add_argument("--only", choices=["deep", "bench"], help="one model")
    ap.add_argument("--write", action="store_true", help="record the result in RESULTS.md")
    args = ap.parse_args()
    models = {"deep": (bench_deep()[0], bench_deep()[1], "32 layers, 8 experts top-2, hidden 512, ~2.7 GB"),
              "bench": (bench_hf(), bench_moe(), "8 layers, 32 experts top-4, hidden 1024, ~2 GB")}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for name, (hf, gguf, shape) in models.items():
            if args.only and name != args.only:
                continue
            evict = [hf, gguf]
            q_cap, q_fast = quarter(hf)
            plan = [("in RAM", "ours (default)", hf, [], None),
                    ("in RAM", "llama.cpp (mmap)", gguf, [], None),
                    (f"cap {args.cap_mb} MB", "ours, no prefetch", hf, ["--no-prefetch"], args.cap_mb),
                    (f"cap {args.cap_mb} MB", "ours, prefetch", hf, ["--prefetch"], args.cap_mb),
                    (f"cap {args.cap_mb} MB", "llama.cpp (mmap)", gguf, [], args.cap_mb),
                    (f"25% rule, cap {q_cap} MB", "ours, no prefetch", hf, ["--fast-memory", str(q_fast)], q_cap),
                    (f"25% rule, cap {q_cap} MB", "llama.cpp (mmap)", gguf, ["direct"], q_cap)]
            for model in (hf, gguf):  # page cache warm for the in-RAM rows
                ask(model, home, [], None, [])
            results: dict[tuple[str, str], dict[str, Any]] = {}
            for cond, label, model, extra, cap in plan:
                # `ask` refuses a GGUF that does not fit the cap: llama-cpp-python itself, mapping it, in that row
                r = direct(model, cap, evict) if extra == ["direct"] else median_run(model, home, extra, cap, evict,
                                                                                    args.reps)
                results[cond, label] = r
                print(name, cond, label, r, flush=True)
            lines += [f"\n### {name}: {shape}\n",
                      "| condition | engine | decode path | slots/layer | tok/s | ÷ llama.cpp |",
                      "|---|---|---|---|---|---|"]
            for cond, label, *_ in plan:
                r = results[cond, label]
                if "error" in r:
                    lines.append(f"| {cond} | {label} | error: {r['error']} | | | |")
                    continue
                base = results[cond, "llama.cpp (mmap)"].get("tok_s")
                ratio = f"{r['tok_s'] / base:.2f}" if base and r.get("tok_s") else "-"
                lines.append(f"| {cond} | {label} | {r['path']} | {r['slots'] or '-'} | {r['tok_s']:.1f} | {ratio} |")
    cmd = "python benchmarks/product_path.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = (f"## The product path: `localmoe ask` beside llama.cpp (issue #23)\n\n`{cmd.strip()}` — 2 cores, greedy, "
            f"{TOKENS} tokens, median of {args.reps} fresh processes; loop guard and repeat penalty off for both.\n"
            + "\n".join(lines))
    print(body)
    if args.write:
        write_section("product-path", body)


if __name__ == "__main__":
    main()
