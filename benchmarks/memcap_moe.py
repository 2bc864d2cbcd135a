"""A laptop with less free RAM than the model: `localmoe ask` on a synthetic MoE GGUF under a memory cap.

Runs `localmoe plan` and `localmoe ask --json` under ../shared/tools/memcap (a cgroup cap that includes the page
cache; the model file is evicted from the cache first) with a cap below the file's size, and the same ask
uncapped, and records decode tokens/s side by side.

    .venv/bin/python benchmarks/memcap_moe.py [--moe MODEL.gguf] [--cap-mb 1500] [--max-tokens 64] [--write]

Without --moe it builds the DESIGN.md benchmark model (hidden 1024, 8 layers, 32 experts, top-4, expert FFN 512,
f32, ~2.1 GB) into benchmarks/.cache/ (needs the test extras).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, bench_moe, write_section

MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
PROMPT = "Tell me about the sea."


def run(cmd: list[str], cap_mb: int | None, model: Path, home: str) -> subprocess.CompletedProcess:
    if cap_mb:
        cmd = [str(MEMCAP), str(cap_mb), "--evict", str(model), "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LOCALMOE_HOME": home})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", type=Path)
    ap.add_argument("--cap-mb", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    model = args.moe or bench_moe()
    size_mb = model.stat().st_size / 2**20
    exe = str(Path(sys.executable).with_name("localmoe"))
    ask = [exe, "ask", PROMPT, "--model", str(model), "--json", "--temperature", "0", "--max-tokens",
           str(args.max_tokens)]
    home = tempfile.mkdtemp(prefix="localmoe-memcap-")

    plan = run([exe, "plan", str(model)], args.cap_mb, model, home)
    print(plan.stdout)
    results = {}
    for label, cap in (("uncapped", None), (f"capped at {args.cap_mb} MB", args.cap_mb)):
        r = run(ask, cap, model, home)
        if r.returncode != 0:
            print(r.stderr)
            raise SystemExit(f"{label}: ask failed with exit code {r.returncode}")
        out = json.loads(r.stdout)
        peak = [ln for ln in r.stderr.splitlines() if ln.startswith("memcap:")]
        warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
        results[label] = (out, peak[0] if peak else "", warn)
        print(f"{label}: {out['timing']['tokens_per_s']:.1f} tok/s, {out['usage']['completion_tokens']} tokens, "
              f"ttft {out['timing']['ttft_s']:.2f} s {peak[0] if peak else ''}")

    if args.write:
        rows = "\n".join(
            f"| {label} | {o['timing']['tokens_per_s']:.1f} | {o['timing']['ttft_s']:.2f} | "
            f"{o['usage']['completion_tokens']} | {peak.removeprefix('memcap: ') or '-'} |"
            for label, (o, peak, _) in results.items())
        warning = next((w for _, (_, _, ws) in results.items() for w in ws), "(none)")
        write_section("memcap_moe", f"""
## A MoE larger than free RAM (llama.cpp, mmap) — synthetic Qwen3-MoE f32, {size_mb:.0f} MiB

Command: `.venv/bin/python benchmarks/memcap_moe.py --cap-mb {args.cap_mb} --max-tokens {args.max_tokens} --write`
({time.strftime('%Y-%m-%d')}, 2 cores; the capped run evicts the file from the page cache first).

`localmoe plan` under the cap:

```
{plan.stdout.strip()}
```

| run | decode tok/s | first token s | tokens | memcap |
|---|---|---|---|---|
{rows}

`ask` warned under the cap: `{warning}`
""")


if __name__ == "__main__":
    main()
