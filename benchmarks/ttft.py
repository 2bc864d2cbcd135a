"""Time to first token and prefill speed, native engine beside llama.cpp (issue #25), on bench_deep()'s 32-layer
Qwen3-MoE (hidden 512, 8 experts, top-2, f32; the same weights as a checkpoint and as GGUF), through both engines'
`stream()`, greedy:

    .venv/bin/python benchmarks/ttft.py [--reps 3] [--cold-reps 1] [--cap-mb 2000] [--write]

chat    a conversation of 3 turns: a ~250-token first question, then ~23 tokens more per turn (the last answer, a few
        greedy tokens, as the assistant's message, and a short question); per turn: time to first token, prompt
        tokens evaluated, prefill tokens/s (evaluated ÷ time to first token).
single  a ~400-token question that opens a conversation: first-turn prefill tokens/s.

Conditions, each engine:
resident  every expert in RAM: ours read in by `engine.preload()`, llama.cpp's GGUF in the page cache (after a
          warm-up answer); both engines in this process, alternating, median of --reps.
cold      a fresh process right after load, the model files evicted from the page cache first: the first question
          pays for reading the experts it needs (single, then chat).
capped    as cold, under `../shared/tools/memcap CAP --evict HF --evict GGUF` (default 2000 MB).

Every question opens with its own system message, so no engine reuses an earlier question's KV cache beyond the
template's first tokens. Tokens evaluated come from the engine's statistics where it reports them; else ours
evaluates the whole prompt, and llama.cpp's is estimated from the longest common prefix with its previous prompt
(llama-cpp-python keeps the KV cache of that prefix), marked ≈. `--write` records a section in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_deep, write_section

MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
N_CTX = 2048
ENGINES = ("ours", "llama.cpp")
# GenerationStats' count of prompt tokens actually evaluated (reused ones excluded), where the engine has it
EVAL_FIELD = "prompt_eval_tokens"
ANSWER_TOKENS = 4
FIRST_TURN, SINGLE, PER_TURN = 250, 400, 23  # prompt tokens: the chat's first turn, the single question, growth
TURNS = 3
CORPUS = (
    "The lighthouse stood on a rock at the end of the bay, and for forty years the same family had kept its lamp. "
    "Every evening the keeper climbed the spiral stairs, trimmed the wick, wound the clockwork that turned the lens, "
    "and wrote the weather in a book with a green cover. Ships passed far out at sea, their lights moving slowly "
    "from east to west, and sometimes a fishing boat came close enough for the keeper to wave. In winter the storms "
    "came from the north: waves broke over the lower gallery, salt crusted the windows, and the whole tower hummed "
    "in the wind like a bottle when you blow across its neck. The keeper's daughter learned to read from the "
    "weather book, to count from the turns of the clockwork, and to tell the ships apart by the colour and rhythm "
    "of their lights. She knew the mail steamer, which came on Tuesdays, the coal barges, which never hurried, and "
    "the tall grain ships that sailed only in autumn. When she was twelve a bottle washed up in the cove below the "
    "rock, green glass with a cork sealed in wax, and inside it a letter in a language she did not know. She kept it "
    "in a tin box under her bed for years. The schoolteacher in the village thought it was Norwegian; the priest "
    "said Dutch; a sailor who stopped for water said it was a love letter, and laughed, and would not say more. "
    "Later, when the lamp was electrified and the family moved to the mainland, she took the letter to a museum in "
    "the city, where a librarian read it aloud to her: it was a list of provisions for a voyage, flour and salt "
    "pork and lamp oil, written by a ship's cook who had never thought anyone would read it. She laughed so hard "
    "that the librarian had to sit down. Then she asked what the ship had been called, and where it had gone, and "
    "the librarian took down an old register from a high shelf, and they searched together until the museum "
    "closed. The ship had sailed for the southern ocean and come home two years later with a full hold and the "
    "same cook, who had married in a port on the far side of the world and brought his wife back with him. "
)
QUESTIONS = [  # the chat's later turns: ~23 tokens each with the template and the previous answer
    "What did the keeper write on stormy nights?",
    "Why did the daughter keep the letter?",
    "How did they find the ship's name?",
    "What became of the lighthouse?",
]


def command_line() -> str:
    return ".venv/bin/python benchmarks/ttft.py " + shlex.join(sys.argv[1:])


def open_engine(name: str, hf: Path, gguf: Path) -> Any:
    from localmoe.engine import load

    if name == "ours":
        return load(hf, backend="torch", max_seq_length=N_CTX, model_id="deep")
    return load(gguf, backend="llama.cpp", n_ctx=N_CTX, model_id="deep")


class Prompts:
    """Questions of a given prompt length in tokens, counted with the checkpoint's own chat template (the GGUF
    carries the same tokenizer)."""

    def __init__(self, hf: Path) -> None:
        from localmoe.engine.torch_moe import ChatTokenizer

        self.tok = ChatTokenizer(hf)
        self.words = CORPUS.split()

    def count(self, messages: list[dict[str, str]]) -> int:
        return len(self.tok.encode_chat(messages))

    def opening(self, n_tokens: int, tag: int) -> list[dict[str, str]]:
        """A new conversation whose first prompt is ~n_tokens: its own system message (so no engine finds an
        earlier conversation's prefix in its cache) and a question cut from the corpus."""
        system = {"role": "system", "content": f"Conversation {tag}. Answer briefly."}
        lo, hi = 1, len(self.words) * 4
        while lo < hi:  # the fewest words that reach n_tokens
            mid = (lo + hi) // 2
            if self.count([system, self.user(mid, tag)]) >= n_tokens:
                hi = mid
            else:
                lo = mid + 1
        return [system, self.user(lo, tag)]

    def user(self, n_words: int, tag: int) -> dict[str, str]:
        start = (tag * 37) % len(self.words)
        words = [self.words[(start + i) % len(self.words)] for i in range(n_words)]
        return {"role": "user", "content": " ".join(words) + "\n\nWhat is this story about?"}


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Asker:
    """One engine's questions, timed by the engine's own statistics."""

    def __init__(self, name: str, engine: Any, prompts: Prompts) -> None:
        self.name, self.engine, self.prompts = name, engine, prompts
        self.previous: list[int] = []

    def ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        from localmoe.engine import GenerationConfig

        config = GenerationConfig(max_tokens=ANSWER_TOKENS, temperature=0.0, top_k=1, top_p=1.0)
        text = "".join(self.engine.stream(messages, config))
        s = self.engine.stats
        prompt = self.prompts.tok.encode_chat(messages)
        evaluated, exact = getattr(s, EVAL_FIELD, None), True
        if evaluated is None:
            exact = self.name == "ours"  # before prefix reuse, ours evaluated every prompt token
            # llama-cpp-python reuses the common prefix, always evaluating at least the last prompt token
            evaluated = s.prompt_tokens if exact else len(prompt) - min(lcp(self.previous, prompt), len(prompt) - 1)
        self.previous = prompt
        return {"ttft_s": s.ttft_s, "prompt_tokens": s.prompt_tokens, "evaluated": evaluated, "exact": exact,
                "prefill_tok_s": evaluated / s.ttft_s if s.ttft_s else None, "answer": text}

    def chat(self, tag: int) -> list[dict[str, Any]]:
        messages = self.prompts.opening(FIRST_TURN, tag)
        turns = []
        for turn in range(TURNS):
            if turn:
                messages = [*messages, {"role": "assistant", "content": turns[-1]["answer"]},
                            {"role": "user", "content": QUESTIONS[(turn - 1) % len(QUESTIONS)]}]
            turns.append(self.ask(messages))
        return turns

    def single(self, tag: int) -> dict[str, Any]:
        return self.ask(self.prompts.opening(SINGLE, tag))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (as memcap --evict does)."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- one fresh process: cold, or capped under memcap ------------------------------------------------------


def child(name: str) -> None:
    hf, gguf = bench_deep()
    prompts = Prompts(hf)
    t0 = time.perf_counter()
    engine = open_engine(name, hf, gguf)
    load_s = time.perf_counter() - t0
    asker = Asker(name, engine, prompts)
    stats = engine.cache_stats()
    out = {"engine": name, "load_s": load_s, "slots": stats.get("slots") if stats else None,
           "single": asker.single(1000)}  # the first question after load
    print(json.dumps(out), flush=True)  # kept if the chat that follows is killed
    out["chat"] = asker.chat(1001)
    engine.close()
    print(json.dumps(out))


def run_child(name: str, cap_mb: int | None) -> dict[str, Any]:
    hf, gguf = bench_deep()
    cmd = [sys.executable, __file__, "_child", name]
    if cap_mb is not None:
        cmd = [str(MEMCAP), str(cap_mb), "--evict", str(hf), "--evict", str(gguf), "--", *cmd]
    else:
        evict([hf, gguf])
    r = subprocess.run(cmd, capture_output=True, text=True)
    peak = next((ln.removeprefix("memcap: ") for ln in r.stderr.splitlines() if ln.startswith("memcap:")), "")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"engine": name}
    out["memcap"] = peak
    if r.returncode != 0:
        tail = " | ".join(ln for ln in r.stderr.strip().splitlines()[-3:] if not ln.startswith("memcap:"))
        print(f"  {name} (cap {cap_mb}): exit {r.returncode}: {tail}", file=sys.stderr)
        out["error"] = "killed (out of memory)" if r.returncode == 137 else f"exit {r.returncode}"
    return out


# --- the report ---------------------------------------------------------------------------------------------


def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluated(r: dict[str, Any]) -> str:
    return f"{r['evaluated']}" if r["exact"] else f"≈{r['evaluated']}"


def chat_table(runs: dict[str, list[list[dict[str, Any]]]]) -> tuple[str, list[float | None]]:
    """Per turn: medians over the runs of time to first token and prefill tok/s, both engines; and the TTFT ratios."""
    rows, ratios = [], []
    for turn in range(TURNS):
        cells, ttft = [], {}
        for name in ENGINES:
            rs = [run[turn] for run in runs[name]]
            ttft[name] = med([r["ttft_s"] for r in rs])
            cells += [fmt(ttft[name]), f"{rs[0]['prompt_tokens']} / {evaluated(rs[0])}",
                      fmt(med([r["prefill_tok_s"] for r in rs]), ".0f")]
        ratios.append(ratio(ttft["ours"], ttft["llama.cpp"]))
        rows.append(f"| {turn + 1} | " + " | ".join(cells) + f" | {fmt(ratios[-1])} |")
    head = ("| turn | ours TTFT s | ours prompt / evaluated | ours prefill tok/s | llama.cpp TTFT s | "
            "llama.cpp prompt / evaluated | llama.cpp prefill tok/s | TTFT ours ÷ llama.cpp |\n" + "|---" * 8 + "|")
    return head + "\n" + "\n".join(rows), ratios


def resident(args: argparse.Namespace, hf: Path, gguf: Path) -> dict[str, Any]:
    prompts = Prompts(hf)
    askers = {}
    for name in ENGINES:
        engine = open_engine(name, hf, gguf)
        if name == "ours":
            engine.preload()  # every expert of every layer read in before the first question
        askers[name] = Asker(name, engine, prompts)
        askers[name].single(0)  # warm-up: llama.cpp's GGUF pages come into the page cache; first-call costs
    chats: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in ENGINES}
    singles: dict[str, list[dict[str, Any]]] = {n: [] for n in ENGINES}
    for rep in range(args.reps):
        order = ENGINES if rep % 2 == 0 else ENGINES[::-1]  # who goes first alternates
        for name in order:
            singles[name].append(askers[name].single(10 + rep))
        for name in order:
            chats[name].append(askers[name].chat(100 + rep))
        print(f"rep {rep + 1}: single prefill tok/s " + ", ".join(
            f"{n} {singles[n][-1]['prefill_tok_s']:.0f}" for n in ENGINES) + "; chat TTFT s " + ", ".join(
            f"{n} " + "/".join(f"{t['ttft_s']:.2f}" for t in chats[n][-1]) for n in ENGINES), flush=True)
    misses = askers["ours"].engine.cache_stats().get("misses")
    for a in askers.values():
        a.engine.close()
    return {"chats": chats, "singles": singles, "misses_last": misses}


def fresh_processes(label: str, cap: int | None, reps: int) -> tuple[str, dict[str, float | None]]:
    """`reps` fresh processes per engine (alternating), cold or under a cap: the first question after load, then a
    chat. The section of the report, and the ratios."""
    key = "cold" if cap is None else f"capped {cap} MB"
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in ENGINES}
    for rep in range(reps):
        for name in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
            runs[name].append(run_child(name, cap))
    errors = "; ".join(f"{n} run {i + 1}: {r['error']}" + (" in the chat, after its first answer" * ("single" in r))
                       for n in ENGINES for i, r in enumerate(runs[n]) if "error" in r)
    singles = {n: [r["single"] for r in runs[n] if "single" in r] for n in ENGINES}
    if not all(singles.values()):
        return f"\n### {label}\n\nNo first answer: {errors}.\n", {}
    tps = {n: med([r["prefill_tok_s"] for r in singles[n]]) for n in ENGINES}
    ttft = {n: med([r["ttft_s"] for r in singles[n]]) for n in ENGINES}
    found = {f"{key} single prefill ours/llama.cpp": ratio(tps["ours"], tps["llama.cpp"])}
    chats = {n: [r["chat"] for r in runs[n] if "chat" in r] for n in ENGINES}
    if all(chats.values()):
        chat, chat_ratios = chat_table(chats)
        found.update({f"{key} TTFT turn {i + 1} ours/llama.cpp": r for i, r in enumerate(chat_ratios)})
    else:
        chat = "No chat to compare: every run of one engine failed in it."
    detail = "; ".join(f"{n}: load {med([r['load_s'] for r in runs[n] if 'load_s' in r]) or 0:.1f} s" + (
        f", {runs[n][0]['slots']} expert slots per layer" if runs[n][0].get("slots") else "") + (
        f", memcap {runs[n][0]['memcap']}" if runs[n][0].get("memcap") else "") for n in ENGINES)
    return f"""
### {label}, median of {reps} run(s) each

The first question right after load ({singles['ours'][0]['prompt_tokens']} tokens): prefill ours
**{fmt(tps['ours'], '.0f')}** tok/s (TTFT {fmt(ttft['ours'])} s; runs {', '.join(fmt(r['prefill_tok_s'], '.0f')
for r in singles['ours'])}), llama.cpp **{fmt(tps['llama.cpp'], '.0f')}** tok/s (TTFT {fmt(ttft['llama.cpp'])} s;
runs {', '.join(fmt(r['prefill_tok_s'], '.0f') for r in singles['llama.cpp'])}): ratio
**{fmt(found[f'{key} single prefill ours/llama.cpp'])}**. Then a chat in the same process:

{chat}

{detail}.{f' Failures: {errors}.' if errors else ''}
""", found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="resident repetitions (each engine, alternating)")
    ap.add_argument("--cap-mb", type=int, default=2000)
    ap.add_argument("--cold-reps", type=int, default=1, help="fresh processes per engine, cold and capped")
    ap.add_argument("--no-cold", action="store_true", help="leave out the cold and capped runs")
    ap.add_argument("--write", action="store_true", help="record the result in RESULTS.md")
    if sys.argv[1:2] == ["_child"]:  # internal: one engine in a fresh process (run_child)
        child(sys.argv[2])
        return
    args = ap.parse_args()
    hf, gguf = bench_deep()
    res = resident(args, hf, gguf)
    single_tps = {n: med([r["prefill_tok_s"] for r in res["singles"][n]]) for n in ENGINES}
    paired = med([ratio(a["prefill_tok_s"], b["prefill_tok_s"])
                  for a, b in zip(res["singles"]["ours"], res["singles"]["llama.cpp"], strict=True)])
    chat, chat_ratios = chat_table(res["chats"])
    s0 = res["singles"]["ours"][0]
    sections = [f"""
### Resident (every expert in RAM), median of {args.reps} alternating runs in one process

First-turn prefill, a {s0['prompt_tokens']}-token question: ours **{fmt(single_tps['ours'], '.0f')}** tok/s,
llama.cpp **{fmt(single_tps['llama.cpp'], '.0f')}** tok/s: ratio **{fmt(ratio(single_tps['ours'],
single_tps['llama.cpp']))}** (median of per-run ratios {fmt(paired)}; target ≥ 0.8).
Runs: ours {', '.join(fmt(r['prefill_tok_s'], '.0f') for r in res['singles']['ours'])};
llama.cpp {', '.join(fmt(r['prefill_tok_s'], '.0f') for r in res['singles']['llama.cpp'])}.
Expert misses in ours's last chat (expected 0): {res['misses_last']}.

Chat of {TURNS} turns (time to first token; target for turns after the first: ≤ 1.5× llama.cpp's):

{chat}
"""]
    ratios = {"resident single prefill ours/llama.cpp": ratio(single_tps["ours"], single_tps["llama.cpp"]),
              **{f"resident TTFT turn {i + 1} ours/llama.cpp": r for i, r in enumerate(chat_ratios)}}
    if not args.no_cold:
        for label, cap in (("Cold (a fresh process, the model files evicted from the page cache)", None),
                           (f"Capped at {args.cap_mb} MB (memcap, the model files evicted)", args.cap_mb)):
            section, found = fresh_processes(label, cap, args.cold_reps)
            sections.append(section)
            ratios.update(found)
            print(section, flush=True)
    body = f"""## Time to first token and prefill: native engine vs llama.cpp (issue #25)

Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, engine commit `{engine_commit()}`).
Model: `bench_deep()`, the 32-layer Qwen3-MoE (hidden 512, 8 experts, top-2, expert FFN 1536, f32, ~2.7 GB) as
checkpoint (ours) and GGUF (llama.cpp); both engines through `stream()`, greedy, {ANSWER_TOKENS}-token answers, the
same chat-templated prompts. Prefill tok/s = prompt tokens evaluated ÷ time to first token (the engine's
`ttft_s`: template and tokenising included); ≈: llama.cpp's evaluated count estimated from the common prefix with
its previous prompt.
{''.join(sections)}
Ratios of this run: {'; '.join(f'{k} {fmt(v)}' for k, v in ratios.items())}.
"""
    print(body)
    if args.write:
        write_section("ttft", body)


def engine_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "localmoe/engine"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted engine changes" if dirty else "")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
