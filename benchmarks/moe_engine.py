"""The native torch MoE engine (issue #7) against llama.cpp and transformers + accelerate, on DESIGN.md's benchmark
model (synthetic Qwen3-MoE: hidden 1024, 8 layers, 32 experts, top-4, expert FFN 512, vocab 49152, fp32).

    .venv/bin/python benchmarks/moe_engine.py resident [--reps 5] [--tokens 64] [--write]
    .venv/bin/python benchmarks/moe_engine.py capped   [--tokens 32] [--abs-cap-mb 1500] [--write]
    .venv/bin/python benchmarks/moe_engine.py adaptive [--reps 3] [--tokens 64] [--write]
    .venv/bin/python benchmarks/moe_engine.py cache    [--tokens 256] [--cap-mb N] [--write]

resident  everything in RAM: decode tok/s of our engine (expert dtypes float32, int8, bfloat16) and llama.cpp
          (f32 and q8_0 GGUF), alternating in one process, against the memory-bandwidth roofline.
capped    under ../shared/tools/memcap (model files evicted from the page cache first): each runtime gets its own
          footprint + dense weights + 25% of the experts, then all under one absolute cap. One subprocess per run.
adaptive  expert_top_p: experts per token, tok/s, and KL of next-token distributions against plain top-k.
cache     hit rate ÷ Belady per cache policy on a trace recorded from our engine and on a synthetic trace with
          realistic locality (offline simulation), then one capped engine run replaying the synthetic trace.

Every decode is greedy after the same short chat prompt; only decode tokens are timed (first sampled token to
last), as llama.cpp's eval time. Each subcommand prints a table; --write puts it in RESULTS.md (its own section).
The model files are built once into benchmarks/.cache/ (needs the test extras); accelerate is needed for capped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_hf, bench_moe, bench_moe_q8, write_section

MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
MB = 1 << 20
THREADS = 2
SEED = 0
TOP_K = 40  # sampled runs (--temperature > 0): top-k 40, no top-p, seeded; greedy otherwise
N_CTX = 512
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(\d+)\.")
# ~200 tokens of plain English for the teacher-forced KL of `adaptive`
TEXT = (
    "The sea covers most of the surface of the Earth. Its water is salty because rivers carry dissolved minerals "
    "from the land into the ocean, where they stay while the water evaporates and falls again as rain. Sunlight "
    "warms the surface, winds push it into currents, and the currents carry heat from the tropics towards the "
    "poles, which is why some coasts are mild in winter. Under the surface, the light fades quickly: below a few "
    "hundred metres it is always dark and cold, and the pressure grows by one atmosphere every ten metres. Yet "
    "life is everywhere, from the plankton that drifts near the top and makes much of the oxygen we breathe, to "
    "fish, squid and whales, and to the strange animals that live around hot springs on the deep sea floor. "
    "People have sailed the sea for thousands of years, for fishing, trade and exploration, and today most of the "
    "goods in the world still travel by ship. The sea also shapes the weather, stores carbon and feeds billions."
)


# --- shared pieces ---------------------------------------------------------------------------------------


def prompt_ids(hf: Path) -> list[int]:
    from localmoe.engine.torch_moe import ChatTokenizer

    return ChatTokenizer(hf).encode_chat(MESSAGES)


def command_line() -> str:
    return ".venv/bin/python benchmarks/moe_engine.py " + shlex.join(sys.argv[1:])


def engine_commit() -> str:
    """`git rev-parse --short HEAD`, the last commit that changed the engine (localmoe/engine) when that is an
    earlier one, and the engine-side files (engine, planner, cache simulator, traces) that differ from HEAD; or, when
    localmoe comes from outside this checkout, the commit its folder's COMMIT file names."""
    import localmoe

    src = Path(localmoe.__file__).resolve().parents[1]
    if src != ROOT:  # an export on PYTHONPATH (e.g. `git archive COMMIT localmoe`), with a COMMIT file beside it
        named = (src / "COMMIT").read_text().strip() if (src / "COMMIT").exists() else "unknown commit"
        return f"{named} (localmoe imported from {src})"
    paths = ["localmoe/engine", "localmoe/placement/plan.py", "localmoe/placement/safetensors.py",
             "localmoe/experts/cachesim.py", "localmoe/experts/trace.py"]

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        engine = git("log", "-1", "--format=%h", "--", "localmoe/engine")
        dirty = [ln.split(maxsplit=1)[-1] + (" (untracked)" if ln.startswith("??") else "")
                 for ln in git("status", "--porcelain", "--", *paths).splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    out = head + (f", engine last changed in {engine}" if engine and engine != head else "")
    return out + (f", uncommitted changes to {', '.join(dirty)}" if dirty else "")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "pending" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def model_bytes(hf: Path) -> dict[str, Any]:
    """Sizes from the safetensors headers: dense bytes (f32, all of them resident; `dense_read` excludes the input
    embedding table, of which a decode step reads one row), bytes per expert as each expert dtype holds it."""
    from localmoe.placement.safetensors import checkpoint_tensors

    config = json.loads((hf / "config.json").read_text())
    dense = dense_read = 0
    per_expert: dict[tuple[int, int], dict[str, int]] = {}
    for key, t in checkpoint_tensors(hf).items():
        m = EXPERT_KEY.match(key)
        if m:
            acc = per_expert.setdefault((int(m.group(1)), int(m.group(2))), {"float32": 0, "bfloat16": 0, "int8": 0})
            acc["float32"] += 4 * t.numel
            acc["bfloat16"] += 2 * t.numel
            acc["int8"] += t.numel + 4 * t.shape[0]  # one float32 scale per output row
        else:
            dense += 4 * t.numel
            if key != "model.embed_tokens.weight" or config.get("tie_word_embeddings"):
                dense_read += 4 * t.numel
            else:
                dense_read += 4 * t.shape[1]
    n_layers, top_k = config["num_hidden_layers"], config["num_experts_per_tok"]
    expert = {d: max(v[d] for v in per_expert.values()) for d in ("float32", "bfloat16", "int8")}
    return {"dense": dense, "dense_read": dense_read, "expert": expert, "n_layers": n_layers, "top_k": top_k,
            "n_experts": len(per_expert) // n_layers, "experts_total": sum(v["float32"] for v in per_expert.values()),
            "active": {d: dense_read + top_k * n_layers * b for d, b in expert.items()}}


def gguf_active_bytes(path: Path) -> int:
    """Bytes a decode step reads from a GGUF: every tensor but the input embeddings (one row), experts × top_k/n."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    top_k = int(r.fields["qwen3moe.expert_used_count"].contents())
    n_exp = int(r.fields["qwen3moe.expert_count"].contents())
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            total += t.n_bytes // int(t.shape[-1])  # one row (ggml shape is [cols, rows])
        elif "_exps" in t.name:
            total += t.n_bytes * top_k // n_exp
        else:
            total += t.n_bytes
    return total


def read_bandwidth(gib: float = 1.0, reps: int = 10) -> float:
    """Bytes/s summing a float32 array of `gib` GiB with torch on THREADS threads; best of `reps`."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


# --- one decode per runtime -------------------------------------------------------------------------------


def open_ours(hf: Path, **opts: Any) -> Any:
    """Our engine, or None when this engine version lacks one of the options (pending)."""
    from localmoe.engine import load

    try:
        return load(hf, backend="torch", max_seq_length=N_CTX, **opts)
    except TypeError as e:
        print(f"  our engine lacks an option ({e}): pending", file=sys.stderr)
        return None


def ours_decode(eng: Any, n: int, temperature: float = 0.0) -> dict[str, Any]:
    """An answer of n + 1 tokens (greedy at temperature 0): decode tok/s over its n decode steps (the engine's own
    timing), and the expert-cache counters of those steps alone (`cache`: the counters when the answer ends minus
    those when its first token came out, i.e. without the prefill; hit_rate recomputed from them)."""
    from localmoe.engine import GenerationConfig

    first: dict[str, Any] | None = None
    t_first = None
    config = GenerationConfig(max_tokens=n + 1, temperature=temperature, top_k=TOP_K, top_p=1.0, seed=SEED)
    for _ in eng.stream(MESSAGES, config):
        if t_first is None:  # the prefill is done when the first piece comes out
            t_first, first = time.perf_counter(), eng.cache_stats()
    t_end = time.perf_counter()
    last = eng.cache_stats()
    cache = {k: v - first.get(k, 0) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "slots"
             else v for k, v in last.items() if k != "layers"} if first else last
    uses = sum(cache.get(k) or 0 for k in ("hits", "warm_hits", "misses"))
    cache["hit_rate"] = cache.get("hits", 0) / uses if uses else None
    if cache.get("tokens"):
        cache["experts_per_token"] = cache["experts_used"] / cache["tokens"]
    out = {"tok_s": eng.stats.tokens_per_s, "tokens": eng.stats.completion_tokens - 1, "cache": cache}
    if t_first is not None and cache.get("stall_s") is not None:
        out["decode_stall_s"], out["decode_wall_s"] = cache["stall_s"], t_end - t_first
    return out


def open_llama(path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=N_CTX, n_threads=THREADS, seed=SEED, verbose=False)


def llama_decode(llm: Any, ids: list[int], n: int, temperature: float = 0.0) -> dict[str, Any]:
    """Prompt, then n decode steps timed from the first sampled token to the last."""
    llm.reset()
    t_first = None
    count = 0
    for _ in llm.generate(ids, temp=temperature, top_k=TOP_K, top_p=1.0, min_p=0.0, reset=True):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
        if count > n:
            break
    return {"tok_s": n / (time.perf_counter() - t_first), "tokens": n}


def open_hf(hf: Path, cpu_bytes: int, offload: Path) -> Any:
    """transformers + accelerate: layers in order on the CPU up to `cpu_bytes`, the rest offloaded to disk."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    return AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float32, device_map="auto", max_memory={"cpu": cpu_bytes}, offload_folder=str(offload))


def hf_decode(model: Any, ids: list[int], n: int, temperature: float = 0.0) -> dict[str, Any]:
    import inspect

    import torch

    gen = torch.Generator().manual_seed(SEED)

    def pick(logits: Any) -> Any:
        if temperature <= 0:
            return logits.argmax()
        top, idx = torch.topk(logits, TOP_K)
        return idx[torch.multinomial((top / temperature).softmax(-1), 1, generator=gen)[0]]

    # transformers 5.x renamed past_key_values to cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tok = pick(out.logits[0, -1])
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(tok.view(1, 1), use_cache=True, **{name: getattr(out, name)})
            tok = pick(out.logits[0, -1])
    return {"tok_s": n / (time.perf_counter() - t0), "tokens": n}


def q8_vs_f32(f32: Path, q8: Path, ids: list[int]) -> dict[str, float]:
    """llama.cpp's logits over the prompt positions from the q8_0 GGUF against the f32 one."""
    import numpy as np
    from llama_cpp import Llama

    rows = []
    for path in (f32, q8):
        llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=THREADS, logits_all=True, verbose=False)
        llm.eval(ids)
        rows.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        llm.close()
    a, b = rows
    return {"max_abs": float(np.abs(a - b).max()), "rms_rel": float(np.sqrt(((a - b) ** 2).mean() / (a**2).mean())),
            "kl": kl_mean(a, b), "argmax": float((a.argmax(1) == b.argmax(1)).mean())}


# --- resident -------------------------------------------------------------------------------------------


def resident(args: argparse.Namespace) -> None:
    hf, f32, q8 = bench_hf(), bench_moe(), bench_moe_q8()
    bw_before = read_bandwidth()
    ids = prompt_ids(hf)
    sizes = model_bytes(hf)
    q8_check = q8_vs_f32(f32, q8, ids)
    n_exp = sizes["n_experts"]
    runners: dict[str, Any] = {}
    active: dict[str, int] = {}
    variants = ["float32", "float32 torch kernels", "int8", "bfloat16", "int8 dense"]
    if not args.no_compile:
        variants += ["float32 compiled", "int8 dense compiled"]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    for variant in variants:
        dtype = variant.removesuffix(" compiled").removesuffix(" torch kernels")
        opts = {"expert_slots": n_exp, "prefetch": False} if dtype == "float32" else \
            {"expert_slots": n_exp, "prefetch": False, "expert_dtype": dtype.split()[0]}
        if dtype == "int8 dense":  # attention and output head in int8 too, as q8_0 has them
            opts["dense_dtype"] = "int8"
        if variant.endswith("compiled"):
            opts["compile"] = True
        if variant.endswith("torch kernels"):  # the torch path as without a C compiler: no native step or kernel
            opts["kernels"] = "torch"
        eng = open_ours(hf, **opts)
        if eng is None and dtype == "float32" and "compile" not in opts and "kernels" not in opts:
            eng = open_ours(hf, expert_slots=n_exp)  # an engine without the prefetch option
        name = f"ours {variant}"
        active[name] = sizes["active"][dtype] if dtype in sizes["active"] else \
            sizes["active"]["int8"] - sizes["dense_read"] * 3 // 4
        if eng is not None:
            if hasattr(eng, "preload"):
                eng.preload()  # every expert of every layer into the fast tier
            else:
                eng.logits(list(range(100, 356)))  # an engine without preload(): 256 tokens read every expert
            runners[name] = (lambda e=eng: ours_decode(e, args.tokens))
    for name, path in (("llama.cpp f32", f32), ("llama.cpp q8_0", q8)):
        llm = open_llama(path)
        active[name] = gguf_active_bytes(path)
        runners[name] = (lambda m=llm: llama_decode(m, ids, args.tokens))

    runs: dict[str, list[float]] = {name: [] for name in active}
    misses: dict[str, int] = {}
    steps: dict[str, str] = {}  # what ran our engine's one-token steps: "native" (step.DecodeStep) or "torch"
    for run in runners.values():
        run()  # warm-up
    names = list(runners)
    bw_reps: list[float] = []
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate who goes first
            r = runners[name]()
            runs[name].append(r["tok_s"])
            if "cache" in r:
                misses[name] = misses.get(name, 0) + (r["cache"].get("misses") or 0)
                steps[name] = r["cache"].get("decode_step", "torch")
        bw_reps.append(read_bandwidth(reps=3))  # the VM's bandwidth drifts: measured beside every repetition
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v)
              + f", read bandwidth {bw_reps[-1] / 1e9:.1f} GB/s", flush=True)

    bw_after = read_bandwidth()
    bw = max(bw_before, bw_after, *bw_reps)
    tps = {name: (med(v) if v else None) for name, v in runs.items()}
    roof = {name: bw / b for name, b in active.items()}
    rows = [f"| {name} | {fmt(tps[name])} | {active[name] / MB:.0f} | {roof[name]:.1f} | "
            f"{fmt(ratio(tps[name], roof[name]), '.2f')} | {', '.join(f'{x:.1f}' for x in runs[name]) or '-'} |"
            for name in active]
    def paired(a: str, b: str) -> float | None:
        """Median over repetitions of a's tok/s ÷ b's in the same repetition: the VM's bandwidth drifts by tens of
        percent over minutes, and runs next to each other share the drift."""
        pairs = [x / y for x, y in zip(runs.get(a, []), runs.get(b, []), strict=False) if y]
        return med(pairs) if pairs else None

    def vs(a: str, b: str, label: str, target: float | None) -> tuple[str, float | None, float | None, float | None]:
        return label, ratio(tps.get(a), tps.get(b)), paired(a, b), target

    def vs_roof(a: str, label: str, target: float | None) -> tuple[str, float | None, float | None, float | None]:
        # paired: each repetition's tok/s against the roofline of the bandwidth measured right after it
        pairs = [t * active[a] / b for t, b in zip(runs.get(a, []), bw_reps, strict=False)]
        return label, ratio(tps.get(a), roof.get(a)), med(pairs) if pairs else None, target

    checks = [
        vs_roof("ours float32", "ours f32 / roofline (f32 experts)", 0.8),
        vs("ours float32", "llama.cpp f32", "ours f32 / llama.cpp f32", 0.9),
        vs("ours float32", "ours float32 torch kernels",
           "ours f32 / ours f32 with torch kernels (the native decode step's gain)", None),
        vs_roof("ours float32 compiled", "ours f32 compiled / roofline", 0.8),
        vs("ours float32 compiled", "llama.cpp f32", "ours f32 compiled / llama.cpp f32", 0.9),
        vs("ours int8 dense compiled", "llama.cpp q8_0", "ours int8 (experts and dense) compiled / llama.cpp q8_0",
           0.8),
        vs("ours int8", "llama.cpp q8_0", "ours int8 (experts) / llama.cpp q8_0", None),
        vs("ours int8 dense", "llama.cpp q8_0", "ours int8 (experts and dense) / llama.cpp q8_0", 0.8),
        vs("ours bfloat16", "llama.cpp f32", "ours bf16 / llama.cpp f32", None),
        ("roofline ours int8 / roofline llama.cpp q8_0 (the int8 ratio's ceiling while dense weights stay f32)",
         ratio(roof.get("ours int8"), roof["llama.cpp q8_0"]), None, None),
    ]
    body = f"""
## Native engine, fully resident: decode tok/s vs llama.cpp and the bandwidth roofline

Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}, 2 cores, {THREADS} threads, greedy, {args.tokens} decode
tokens after a {len(ids)}-token chat prompt, median of {args.reps} alternating runs in one process, after a warm-up;
our engine holds all {n_exp} experts per layer, read in by `engine.preload()` before the runs, prefetch off;
"compiled": `compile=True` (`--compile`), compiled during the warm-up; engine commit `{engine_commit()}`).

Read bandwidth: **{bw / 1e9:.1f} GB/s**, the best of all measurements (sums of a 1 GiB float32 tensor, torch,
{THREADS} threads: best of 10 before and after the runs, {bw_before / 1e9:.1f} and {bw_after / 1e9:.1f} GB/s, and best
of 3 after each repetition, {', '.join(f'{b / 1e9:.1f}' for b in bw_reps)} GB/s; the roofline's paired column
divides each repetition by the bandwidth measured right after it). llama.cpp f32 moved
{tps['llama.cpp f32'] * active['llama.cpp f32'] / 1e9:.1f} GB/s of weights (tok/s × active bytes).
Active bytes per token: dense weights read per step ({sizes['dense_read'] / MB:.0f} MiB: attention, routers, norms,
output head; one row of the input embeddings) + top-{sizes['top_k']} × bytes per expert × {sizes['n_layers']}
layers, from the safetensors headers in the engine's expert dtype (int8 with its per-row scales); for llama.cpp
from the GGUF's tensor sizes. Roofline = bandwidth ÷ active bytes.

| runtime | tok/s | active MiB/token | roofline tok/s | ÷ roofline | runs |
|---|---|---|---|---|---|
{chr(10).join(rows)}

| ratio | of the medians | median of per-repetition ratios | target |
|---|---|---|---|
{chr(10).join(f"| {label} | {fmt(v, '.2f')} | {fmt(p, '.2f') if p else '-'} | {'≥ ' + str(t) if t else '-'} |"
              for label, v, p, t in checks)}

The q8_0 GGUF (`tests/synthetic_moe.py --quant q8_0`: matrices Q8_0; norms and routers f32) against the f32 one,
llama.cpp logits over the {len(ids)} prompt positions: max |Δ| {q8_check['max_abs']:.3f}, RMS Δ / RMS logit
{q8_check['rms_rel']:.3f}, mean KL {q8_check['kl']:.1e} nats, same argmax at {q8_check['argmax']:.0%} of positions
(the random model's top logits lie within a few hundredths of each other, so greedy paths part early).

Expert-cache misses in the timed runs of our engine (all experts resident after the warm-up, so expected 0):
{', '.join(f'{k} {v}' for k, v in misses.items()) or 'n/a'}.
Decode steps ran in: {', '.join(f'{k}: {v}' for k, v in steps.items()) or 'n/a'} ("native": the whole step in
one call of `lm_step_f32`, moe_kernels.c; "torch": the torch model, with the native expert kernel where float32).
"""
    print(body)
    if args.write:
        write_section("moe_engine_resident", body)


# --- capped ---------------------------------------------------------------------------------------------


def footprint(runtime: str) -> None:
    """Child: import a runtime's libraries, make a tiny thing, print the peak RSS in bytes."""
    if runtime == "ours":  # like llama.cpp's vocab-only load below: the libraries and the model's tokenizer
        import torch

        from localmoe.engine.torch_moe import ChatTokenizer

        ChatTokenizer(bench_hf())
        torch.ones(8) @ torch.ones(8)
    elif runtime == "llama":
        from llama_cpp import Llama

        Llama(model_path=str(bench_moe_q8()), vocab_only=True, verbose=False)
    elif runtime == "llama-loaded":  # the f32 model mmapped and one token decoded: anonymous memory only
        llm = open_llama(bench_moe())
        llama_decode(llm, prompt_ids(bench_hf()), 1)
        print(json.dumps({"rss": proc_status()["RssAnon"]}))
        return
    elif runtime == "ours-loaded":  # the capped runs' options: after load, after its slots filled and a decode
        hf = bench_hf()
        eng = open_ours(hf, **ours_opts(model_bytes(hf), False))
        eng.load()
        eng.chat_tokenizer()
        loaded = proc_status()
        eng.preload()
        ours_decode(eng, 8)
        print(json.dumps({"rss": loaded["RssAnon"], "loaded": loaded, "decoded": proc_status(),
                          "slots": eng.cache_stats().get("slots")}))
        return
    elif runtime == "hf":
        import accelerate  # noqa: F401
        import torch
        import transformers

        config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             intermediate_size=16)
        with torch.no_grad():
            transformers.Qwen3MoeForCausalLM(config)(torch.tensor([[1, 2]]))
    # VmHWM rather than ru_maxrss, which Linux carries over exec from the parent's larger peak
    print(json.dumps({"rss": proc_status()["VmHWM"]}))


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child_run(runtime: str, opts: dict[str, Any], tokens: int, temp: float) -> None:
    """Child (under memcap): load a runtime, one short warm-up answer, then the timed one; print JSON."""
    hf = bench_hf()
    ids = prompt_ids(hf)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"runtime": runtime, "opts": opts}
    if runtime == "ours":
        trace = opts.pop("replay", None)
        eng = open_ours(hf, **opts)
        if eng is None:
            print(json.dumps({**out, "pending": True}))
            return
        if trace:
            from localmoe.experts.trace import Trace

            eng.replay(Trace.load(trace))
        out["load_s"] = time.perf_counter() - t0
        ours_decode(eng, 8, temp)
        out.update(ours_decode(eng, tokens, temp))
        out["slots"] = eng.cache_stats().get("slots")
    elif runtime == "llama":
        llm = open_llama(Path(opts["path"]))
        out["load_s"] = time.perf_counter() - t0
        llama_decode(llm, ids, 8, temp)
        out.update(llama_decode(llm, ids, tokens, temp))
    elif runtime == "hf":
        with tempfile.TemporaryDirectory(prefix="localmoe-offload-", dir=opts.get("offload_dir")) as off:
            model = open_hf(hf, opts["cpu_bytes"], Path(off))
            out["load_s"] = time.perf_counter() - t0
            placed = getattr(model, "hf_device_map", {})
            out["on_disk"] = [k for k, v in placed.items() if str(v) == "disk"]
            hf_decode(model, ids, 4, temp)
            out.update(hf_decode(model, ids, tokens, temp))
    out["status"] = proc_status()
    print(json.dumps(out))


def run_capped(runtime: str, opts: dict[str, Any], cap_mb: int, tokens: int, evict: list[Path],
               temp: float = 0.0) -> dict[str, Any]:
    cmd = [str(MEMCAP), str(cap_mb)]
    for p in evict:
        cmd += ["--evict", str(p)]
    cmd += ["--", sys.executable, __file__, "_run", runtime, json.dumps(opts), "--tokens", str(tokens),
            "--temperature", str(temp)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    peak = next((ln.removeprefix("memcap: ") for ln in r.stderr.splitlines() if ln.startswith("memcap:")), "")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = " | ".join(ln for ln in r.stderr.strip().splitlines()[-3:] if not ln.startswith("memcap:"))
        print(f"  {runtime} {opts}: exit {r.returncode}: {tail}", file=sys.stderr)
        error = "killed (out of memory)" if r.returncode == 137 else f"exit {r.returncode}"
        return {"runtime": runtime, "error": error, "memcap": peak, "stderr": tail}
    out = json.loads(lines[-1])
    out["memcap"], out["wall_s"] = peak, time.perf_counter() - t0
    return out


def footprints(runtimes: tuple[str, ...], details: dict[str, Any] | None = None) -> dict[str, int]:
    """Each runtime's footprint in bytes (see `footprint`); `details` gets each child's whole JSON."""
    out = {}
    for runtime in runtimes:
        r = subprocess.run([sys.executable, __file__, "_footprint", runtime], capture_output=True, text=True,
                           check=True)
        found = json.loads(r.stdout.splitlines()[-1])
        out[runtime] = found["rss"]
        if details is not None:
            details[runtime] = found
    return out


def ours_opts(sizes: dict[str, Any], prefetch: bool, **extra: Any) -> dict[str, Any]:
    """fast_memory for 25% of the experts: the planner takes its RAM reserve, the dense weights and the KV cache
    off the budget before it counts expert slots, so those are added back here."""
    from localmoe.placement.plan import RAM_RESERVE, plan_checkpoint
    from localmoe.placement.safetensors import checkpoint_tensors

    hf = bench_hf()
    config = json.loads((hf / "config.json").read_text())
    probe = plan_checkpoint(config, checkpoint_tensors(hf), 1 << 40, ctx=N_CTX)
    budget = RAM_RESERVE + probe.dense_bytes + probe.kv_bytes + sizes["experts_total"] // 4
    return {"fast_memory": budget, "prefetch": prefetch, **extra}


def capped_row(label: str, cap_mb: int, r: dict[str, Any]) -> str:
    peak = r.get("memcap", "").removeprefix("cap ").split(", ", 1)[-1]  # "peak N MB, cap hit M times"
    if r.get("pending"):
        return f"| {label} | {cap_mb} | pending | | | |"
    if "error" in r:
        return f"| {label} | {cap_mb} | {r['error']} | | {r.get('stderr', '')[:160]} | {peak} |"
    cache = r.get("cache") or {}
    extra = []
    if cache:
        stall = ratio(r.get("decode_stall_s"), r.get("decode_wall_s"))
        extra.append(f"{r.get('slots')} slots/layer, hit rate {fmt(cache.get('hit_rate'), '.2f')}, "
                     f"stall {fmt(stall, '.2f')} of decode")
        if cache.get("prefetches") or cache.get("prefetches_skipped"):
            extra.append(f"{cache['prefetches']} prefetched, {cache.get('wasted_prefetches')} wasted, "
                         f"{cache.get('prefetches_skipped', 0)} skipped (predictions mostly wrong)")
    if r.get("on_disk"):
        extra.append("on disk: " + ", ".join(_short_modules(r["on_disk"])))
    anon = (r.get("status") or {}).get("RssAnon")
    if anon is not None:
        extra.append(f"anon RSS {anon / MB:.0f} MiB")
    return f"| {label} | {cap_mb} | {r['tok_s']:.1f} | {r.get('load_s', 0):.1f} | {'; '.join(extra)} | {peak} |"


def _short_modules(names: list[str]) -> list[str]:
    """model.layers.2 ... model.layers.7 -> layers 2-7; the other module names as they are."""
    layers = sorted(int(n.rsplit(".", 1)[1]) for n in names if re.fullmatch(r"model\.layers\.\d+", n))
    out = [f"layers {layers[0]}-{layers[-1]}"] if layers else []
    return out + [n.removeprefix("model.") for n in names if not re.fullmatch(r"model\.layers\.\d+", n)]


CAPPED_HEAD = "| runtime | cap MiB | decode tok/s | load s | detail | memcap peak |\n|---|---|---|---|---|---|"


def capped(args: argparse.Namespace) -> None:
    hf, f32 = bench_hf(), bench_moe()
    sizes = model_bytes(hf)
    detail: dict[str, Any] = {}
    feet = footprints(("ours", "llama", "hf", "llama-loaded", "ours-loaded"), detail)
    weights = sizes["dense"] + sizes["experts_total"] // 4
    caps = {rt: int((feet[rt] + weights) / MB) + 1 for rt in feet if rt != "ours-loaded"}
    loaded = detail["ours-loaded"]

    def mib(status: dict[str, int]) -> str:
        return (f"anonymous {status['RssAnon'] / MB:.0f} MiB + file-backed {status['RssFile'] / MB:.0f} MiB "
                f"(RSS {status['VmRSS'] / MB:.0f} MiB)")
    print("footprints (MiB): " + ", ".join(f"{k} {v / MB:.0f}" for k, v in feet.items()))
    print("caps (MiB): " + ", ".join(f"{k} {v}" for k, v in caps.items()), flush=True)
    title = "" if args.temperature <= 0 else ", sampled decoding"
    mode = "greedy" if args.temperature <= 0 else \
        f"sampled (temperature {args.temperature}, top-k {TOP_K}, seed {SEED})"
    ours_on, ours_off = ours_opts(sizes, True), ours_opts(sizes, False)
    llama = {"path": str(f32)}
    accel = {"cpu_bytes": weights}  # accelerate's CPU budget: dense + a quarter of the experts; the rest to disk
    plan = [  # (table, label, runtime, options, cap)
        ("own", "ours, prefetch on", "ours", ours_on, caps["ours"]),
        ("own", "ours, prefetch off", "ours", ours_off, caps["ours"]),
        ("own", "llama.cpp f32, mmap", "llama", llama, caps["llama"]),
        ("own", "llama.cpp f32, mmap (cap with its compute buffers)", "llama", llama, caps["llama-loaded"]),
        ("own", "transformers + accelerate, disk offload", "hf", accel, caps["hf"]),
        ("abs", "ours, prefetch on", "ours", ours_on, args.abs_cap_mb),
        ("abs", "ours, prefetch off", "ours", ours_off, args.abs_cap_mb),
        ("abs", "llama.cpp f32, mmap", "llama", llama, args.abs_cap_mb),
        ("abs", "transformers + accelerate, disk offload", "hf", accel, args.abs_cap_mb),
    ]
    res: dict[tuple[str, str], dict[str, Any]] = {}
    rows: dict[str, list[str]] = {"own": [], "abs": []}
    for table, label, runtime, opts, cap in plan:
        r = run_capped(runtime, dict(opts), cap, args.tokens, [hf, f32], args.temperature)
        res[table, label] = r
        rows[table].append(capped_row(label, cap, r))
        print(rows[table][-1], flush=True)

    def tok(table: str, label: str) -> float | None:
        return res[table, label].get("tok_s")

    def stall(table: str, label: str) -> float | None:
        return ratio(res[table, label].get("decode_stall_s"), res[table, label].get("decode_wall_s"))

    checks = []
    for table, where in (("own", "own caps"), ("abs", f"{args.abs_cap_mb} MB")):
        for pre in ("on", "off"):
            ours = f"ours, prefetch {pre}"
            checks += [
                (f"{ours} / llama.cpp, {where}", ratio(tok(table, ours), tok(table, "llama.cpp f32, mmap")), "≥ 1.0"),
                (f"{ours} / accelerate, {where}",
                 ratio(tok(table, ours), tok(table, "transformers + accelerate, disk offload")), "≥ 4"),
                (f"{ours}: stall fraction, {where}", stall(table, ours), "-"),
            ]
    checks.insert(0, ("ours, prefetch on / llama.cpp (cap with its compute buffers)",
                      ratio(tok("own", "ours, prefetch on"),
                            tok("own", "llama.cpp f32, mmap (cap with its compute buffers)")), "≥ 1.0"))
    body = f"""
## Native engine under a memory cap: vs llama.cpp (mmap) and transformers + accelerate (disk offload){title}

Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}, engine commit `{engine_commit()}`, 2 cores;
each run is its own process under `../shared/tools/memcap` with the HF checkpoint and the f32 GGUF evicted from the
page cache first; {mode}, {args.tokens} timed decode tokens after an 8-token warm-up answer in the same process).

Footprint with no weights (peak RSS after importing the runtime's libraries and making a tiny thing): ours
(torch + localmoe.engine.torch_moe + the checkpoint's tokenizer) {feet['ours'] / MB:.0f} MiB; llama.cpp
(llama_cpp + a vocab-only load) {feet['llama'] / MB:.0f} MiB; transformers + accelerate (a tiny Qwen3-MoE
forward) {feet['hf'] / MB:.0f} MiB.
llama.cpp's anonymous memory with this model loaded and one token decoded is {feet['llama-loaded'] / MB:.0f} MiB
(compute buffers sized by vocab × batch, KV cache): the second llama.cpp row uses that instead of the no-weights
footprint.
Our engine measured the same way (uncapped, with the capped runs' options): no weights
{feet['ours'] / MB:.0f} MiB peak; dense weights loaded (copied off the safetensors mmap) and the tokenizer read:
{mib(loaded['loaded'])}; then its {loaded['slots']} slots per layer filled (`preload`) and 8 tokens decoded:
{mib(loaded['decoded'])}, against an own cap of {caps['ours']} MiB (the file-backed part is clean page cache, which
the cap can reclaim).
Own cap = footprint + dense weights ({sizes['dense'] / MB:.0f} MiB, f32) + 25% of the experts
({sizes['experts_total'] / 4 / MB:.0f} MiB). Our engine gets `fast_memory` = its planner's RAM reserve + dense + KV +
25% of the experts, which the planner turns into {sizes['n_experts'] // 4} slots per layer; accelerate gets
`device_map="auto"`, `max_memory={{"cpu": dense + 25% of the experts}}` and an `offload_folder` (it places whole
decoder layers, in order). Stall fraction = time the compute thread waited for expert weights during decode ÷
decode wall time. Hit rates count decode steps only. With prefetch on, a layer loads its predicted experts only
while most of its recent predictions were used ("skipped": predicted loads not issued); the random-init routers
predict the next layer's experts poorly, so most are skipped after the first few tokens.

{CAPPED_HEAD}
{chr(10).join(rows['own'])}

All under one cap of {args.abs_cap_mb} MB (same options):

{CAPPED_HEAD}
{chr(10).join(rows['abs'])}

| ratio | value | target |
|---|---|---|
{chr(10).join(f"| {label} | {fmt(v, '.2f')} | {t} |" for label, v, t in checks)}
"""
    print(body)
    if args.write:
        write_section("moe_engine_capped" + ("" if args.temperature <= 0 else "_sampled"), body)


# --- adaptive -------------------------------------------------------------------------------------------


def kl_mean(p_logits: Any, q_logits: Any) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in nats."""
    import torch

    lp = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def router_mass(eng: Any, ids: list[int]) -> float | None:
    """Mean router probability (softmax over all experts) of the top-k experts, over layers and the tokens of `ids`:
    top_p keeps fewer than k experts only where it is above p. Reads the engine's MoE modules through hooks."""
    import torch
    import torch.nn.functional as F

    moes = getattr(eng.model, "moes", None)
    if not moes:
        return None
    masses: list[float] = []

    def hook(moe: Any, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        probs = F.linear(x, moe.router).softmax(-1)
        masses.append(float(probs.topk(moe.args.top_k, dim=-1).values.sum(-1).mean()))

    handles = [m.register_forward_pre_hook(hook) for m in moes]
    try:
        with torch.no_grad():
            eng.logits(ids)
    finally:
        for h in handles:
            h.remove()
    return sum(masses) / len(masses)


def adaptive(args: argparse.Namespace) -> None:
    hf = bench_hf()
    eng = open_ours(hf, expert_slots=32, prefetch=False)
    if eng is None or not hasattr(eng, "set_expert_top_p"):
        print("expert_top_p is pending in this engine")
        return
    text_ids = eng.chat_tokenizer().tokenizer.encode(TEXT, add_special_tokens=False).ids
    eng.preload()  # every expert of every layer into the fast tier
    settings: list[float | None] = [None, *args.top_p]
    logits, per_token, runs = {}, {}, {p: [] for p in settings}
    for p in settings:
        eng.set_expert_top_p(p)
        eng.reset_cache_stats()
        logits[p] = eng.logits(text_ids)
        per_token[p] = eng.experts_per_token
    eng.set_expert_top_p(None)
    mass = router_mass(eng, text_ids)
    for rep in range(args.reps):
        for p in settings[rep % len(settings):] + settings[:rep % len(settings)]:
            eng.set_expert_top_p(p)
            runs[p].append(ours_decode(eng, args.tokens)["tok_s"])
    base = med(runs[None])
    rows = "\n".join(
        f"| {'top-k (none)' if p is None else p} | {per_token[p]:.2f} | {med(runs[p]):.1f} | "
        f"{med(runs[p]) / base:.2f} | {kl_mean(logits[None], logits[p]):.2e} | "
        f"{', '.join(f'{x:.1f}' for x in runs[p])} |" for p in settings)
    body = f"""
## Native engine: adaptive expert count (expert_top_p)

Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}, engine commit `{engine_commit()}`, 2 cores,
all experts resident, read in by `engine.preload()`, prefetch off). Experts per token (mean
per layer) and KL are teacher-forced over the same {len(text_ids)}-token English text: KL(p_top-k ‖ p_top-p) of the
next-token distributions, averaged over positions. tok/s: greedy, {args.tokens} decode tokens, median of
{args.reps} alternating runs. top_p keeps a token's best experts until their router probability (softmax over all
{eng.args.n_experts}) reaches p; on this random-init model the top-{eng.args.top_k} experts hold only
{fmt(mass, '.3f')} of it on average, so any p above that keeps all {eng.args.top_k}.

| expert_top_p | experts/token | tok/s | vs top-k | mean KL (nats) | runs |
|---|---|---|---|---|---|
{rows}
"""
    print(body)
    if args.write:
        write_section("moe_engine_adaptive", body)


# --- cache ----------------------------------------------------------------------------------------------


def record_traces(hf: Path, tokens: int) -> dict[str, Any]:
    """Routing of our engine (all experts resident, telemetry on): teacher-forced over TEXT, and over a greedy
    answer's decode tokens. Empty when the engine records no routing."""
    from localmoe.experts.trace import Trace

    eng = open_ours(hf, expert_slots=32, prefetch=False, telemetry=True)
    if eng is None:
        return {}
    a = eng.args
    out = {}
    eng.routing.clear()
    eng.logits(eng.chat_tokenizer().tokenizer.encode(TEXT, add_special_tokens=False).ids)
    out["text"] = Trace(eng.model_id, "torch", a.n_layers, a.n_experts, a.top_k, list(eng.routing))
    eng.routing.clear()
    ours_decode(eng, tokens)
    out["greedy"] = Trace(eng.model_id, "torch", a.n_layers, a.n_experts, a.top_k,
                          [t for t in eng.routing if t.phase == "decode"])
    eng.close()
    return out


def concentration(trace: Any, n_layers: int) -> dict[str, Any]:
    """How concentrated a trace's routing is: the layers whose most chosen expert serves > 80% of the tokens, and
    the share of all requests the 8 most chosen experts of each layer serve."""
    from collections import Counter

    layers, served, total = 0, 0, 0
    for layer in range(n_layers):
        counts = Counter(e for tok in trace.tokens for e in tok.experts[layer])
        steps = sum(1 for tok in trace.tokens if tok.experts[layer])
        if counts and counts.most_common(1)[0][1] > 0.8 * steps:
            layers += 1
        served += sum(c for _, c in counts.most_common(8))
        total += sum(counts.values())
    return {"layers": layers, "top8": served / total if total else 0.0}


def cache(args: argparse.Namespace) -> None:
    from localmoe.experts.cachesim import DEFAULT_LOCALITY, DEFAULT_ZIPF, report, synthetic_trace

    hf, f32 = bench_hf(), bench_moe()
    sizes = model_bytes(hf)
    capacity = 2 * sizes["top_k"]
    traces = record_traces(hf, args.tokens)
    traces["synthetic"] = synthetic_trace(args.synthetic_tokens, sizes["n_layers"], sizes["n_experts"],
                                          sizes["top_k"], seed=0)
    policies = ("lru", "lfu", "lfru", "belady")
    sims = {name: report(t, [capacity], policies=policies) for name, t in traces.items()}
    for name, rows in sims.items():
        print(name, ", ".join(f"{r['policy']}/{r['prefetch'] or '-'} {r['hit_rate']:.3f}" for r in rows), flush=True)

    # (c) capped runs of our engine routing by the synthetic trace
    feet = footprints(("ours",))
    own_cap = int((feet["ours"] + sizes["dense"] + sizes["experts_total"] // 4) / MB) + 1
    cap = args.cap_mb or own_cap
    cap_text = "its footprint + dense + 25% of the experts" if cap == own_cap else \
        f"--cap-mb; its own cap, footprint + dense + 25% of the experts, would be {own_cap} MiB"
    live = []
    with tempfile.TemporaryDirectory(prefix="localmoe-trace-") as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        traces["synthetic"].save(path)
        for policy in ("lru", "lfru"):
            for prefetch in (False, True):
                opts = ours_opts(sizes, prefetch, cache_policy=policy, replay=str(path))
                r = run_capped("ours", opts, cap, args.live_tokens, [hf, f32])
                live.append((policy, prefetch, r))
                print(f"live {policy} prefetch {prefetch}: {r.get('tok_s')} tok/s, "
                      f"hit rate {(r.get('cache') or {}).get('hit_rate')}", flush=True)

    def table() -> str:
        cols = ["| policy | " + " | ".join(f"{n} hit rate | {n} ÷ Belady" for n in sims) + " |",
                "|---|" + "---|---|" * len(sims)]
        for i, r in enumerate(sims[name]):
            label = f"{r['policy']}" + (f" + prefetch {r['prefetch']}" if r["prefetch"] else "")
            cells = []
            for n in sims:
                x = sims[n][i]
                cells.append(f"{x['hit_rate']:.3f} | {fmt(x['vs_belady'], '.2f')}")
            cols.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(cols)

    sim_by_policy = {(r["policy"], r["prefetch"]): r["hit_rate"] for r in sims["synthetic"]}

    def live_row(policy: str, prefetch: bool, r: dict[str, Any]) -> str:
        sim = fmt(sim_by_policy.get((policy, "previous" if prefetch else None)), ".3f")
        head = f"| {policy} | {'on' if prefetch else 'off'}"
        if r.get("pending") or "error" in r:
            peak = r.get("memcap", "").removeprefix("cap ").split(", ", 1)[-1]
            return f"{head} | {r.get('error', 'pending')} | | {sim} | | | {peak} |"
        c = r.get("cache") or {}
        stall = fmt(ratio(r.get("decode_stall_s"), r.get("decode_wall_s")), ".2f")
        peak = r.get("memcap", "").removeprefix("cap ").split(", ", 1)[-1]
        return (f"{head} | {r['tok_s']:.1f} | {fmt(c.get('hit_rate'), '.3f')} | {sim} | {stall} | "
                f"{c.get('prefetches', 0)} / {c.get('wasted_prefetches', 0)} | {peak} |")

    n = {k: len(t.tokens) for k, t in traces.items()}
    conc = concentration(traces["text"], sizes["n_layers"]) if "text" in traces else {"layers": 0, "top8": 0.0}
    body = f"""
## Expert cache: online policies vs Belady at {capacity} slots per layer (2 × top-{sizes['top_k']})

Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}, engine commit `{engine_commit()}`). Offline simulation
(`localmoe.cachesim.report`) of per-layer caches over three traces; "prefetch previous" protects the experts a layer
used for the previous token; sch16 = segment cache hit rate (16-token segments), a reference rather than a bound.

- text: our engine's routing on the benchmark model, teacher-forced over a {n.get('text', 0)}-token English text
  (telemetry on). Though random-init, this model's routers are far from uniform: in each layer a handful of experts
  take most tokens (in {conc['layers']} of {sizes['n_layers']} layers the most chosen expert serves over 80% of the
  tokens; the 8 most chosen serve {conc['top8']:.0%} of all requests), so any cache looks better here than on a
  trained model.
- greedy: our engine's routing over {n.get('greedy', 0)} greedy decode tokens after the chat prompt. Greedy decoding
  of the random model also repeats a few tokens: more local still (this is what the greedy `capped` runs see).
- synthetic: `synthetic_trace` ({args.synthetic_tokens} tokens × {sizes['n_layers']} layers, {sizes['n_experts']}
  experts, top-{sizes['top_k']}, seed 0): per layer a Zipf({DEFAULT_ZIPF}) popularity over experts; every 16 tokens
  a hot set of 2 × top-k experts drawn by popularity, holding {DEFAULT_LOCALITY:.0%} of the routing mass, the rest
  uniform — the defaults fitted to real Mixtral-8x7B routing (DESIGN.md).

{table()}

(c) Live: our engine under memcap ({cap} MiB = {cap_text}; {sizes['n_experts'] // 4} slots per layer)
routing by the synthetic trace instead of its routers (`engine.replay`, cycling from the trace's
start; the logits are meaningless, the cache traffic real). Greedy, {args.live_tokens} timed decode tokens after an
8-token warm-up; the live hit rate counts the timed decode steps, the simulated one the whole trace. Under replay
the engine's prefetcher reads the next layer's experts from the trace (a perfect predictor one layer ahead), so the
prefetch rows show the most that overlap can give: a use that waits for an in-flight prefetch counts as a hit, and
the stall fraction is the part of the disk time that one layer of compute did not hide.

| policy | prefetch | tok/s | live hit rate | simulated | stall fraction | prefetched / wasted | memcap peak |
|---|---|---|---|---|---|---|---|
{chr(10).join(live_row(*x) for x in live)}
"""
    print(body)
    if args.write:
        write_section("moe_engine_cache", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{resident,capped,adaptive,cache}")
    p = sub.add_parser("resident", help="fully resident decode tok/s vs llama.cpp and the roofline")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--only", help="comma-separated variants of our engine to run (e.g. 'float32,float32 compiled')")
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("capped", help="memory-capped decode tok/s vs llama.cpp (mmap) and accelerate offload")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--abs-cap-mb", type=int, default=1500)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample (top-k 40, seeded) instead of greedy decoding")
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("adaptive", help="expert_top_p: experts per token, tok/s, KL against top-k")
    p.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.1, 0.05])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("cache", help="cache policies vs Belady (simulated) and a live capped replay")
    p.add_argument("--tokens", type=int, default=256, help="decode tokens of the recorded greedy trace")
    p.add_argument("--synthetic-tokens", type=int, default=2000)
    p.add_argument("--live-tokens", type=int, default=64)
    p.add_argument("--cap-mb", type=int, help="memcap of the live runs (default: footprint + dense + 25%% of experts)")
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("_footprint")  # internal: a child process
    p.add_argument("runtime")
    p = sub.add_parser("_run")  # internal: a child process under memcap
    p.add_argument("runtime")
    p.add_argument("opts")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    if args.cmd == "_footprint":
        footprint(args.runtime)
    elif args.cmd == "_run":
        child_run(args.runtime, json.loads(args.opts), args.tokens, args.temperature)
    else:
        {"resident": resident, "capped": capped, "adaptive": adaptive, "cache": cache}[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
