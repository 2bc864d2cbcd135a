"""GGUF MoE files on the native engine (issue #16): experts packed in the file's quantisation, beside llama.cpp on the
same file. 2 cores, greedy, token ids (no chat template), decode tok/s after the prompt (load and prefill excluded).

    .venv/bin/python benchmarks/gguf_native.py resident [--reps 3] [--tokens 64] [--write]
    .venv/bin/python benchmarks/gguf_native.py quarter  [--tokens 64] [--write]
    .venv/bin/python benchmarks/gguf_native.py build-big
    .venv/bin/python benchmarks/gguf_native.py big --cap-mb 8192 [--tokens 16] [--llama-tokens N] [--write]

resident  DESIGN.md's benchmark model (bench_moe(): hidden 1024, 8 layers, 32 experts, top-4, expert FFN 512, vocab
          49152) quantised from its f32 GGUF by llama.cpp's own quantiser to Q8_0 and Q4_K_M; everything in RAM, ours
          (every expert resident, preloaded) and llama.cpp alternating in one process, median of --reps.
quarter   the same files, each runtime in its own process under `../shared/tools/memcap` (files evicted first) at
          its own footprint + its own dense weights + 25% of the file's expert bytes; ours with 8 of 32 slots per
          layer; llama.cpp maps the file. llama.cpp also at ours' cap (ours holds its dense weights as float32,
          llama.cpp packed, so ours' cap is the larger: the stricter comparison).
build-big a model shaped like Qwen3-30B-A3B (48 layers, 128 experts, top-8, hidden 2048, expert FFN 768, 32 q / 4 kv
          heads of 128, vocab 151936) written directly as random but valid Q4_K_M blocks (llama.cpp's Q4_K_M mix:
          experts gate/up Q4_K, down and attn_v Q6_K in llama.cpp's `use_more_bits` layers else Q4_K, attention
          Q4_K, token_embd Q4_K, output Q6_K, norms and routers F32), ~18.5 GB, into benchmarks/.cache/ (gitignored).
big       that model under a memcap (files evicted first): ours (slots from the plan for the cap it detects) with
          its own routers and replaying a synthetic trace of realistic locality, llama.cpp with mmap; bytes read from
          disk per decode token (/proc/self/io read_bytes, and ours' own count), and the physical limit: disk read
          bandwidth (measured here, O_DIRECT) ÷ bytes read per token.
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

import numpy as np
from common import CACHE, ROOT, bench_moe, write_section

MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
THREADS = 2
N_CTX = 512
MB = 1 << 20
# a fixed prompt of token ids (the big model has no real tokenizer: it is driven by ids)
PROMPT = [1, 20, 300, 4000, 50, 6, 700, 8000, 90, 1000, 11, 1200, 130, 14, 1500, 16]
BIG = dict(layers=48, experts=128, top_k=8, hidden=2048, expert_ff=768, heads=32, kv_heads=4, head_dim=128,
           vocab=151936)
BIG_PATH = CACHE / "qwen3-30b-a3b-shape.Q4_K_M.gguf"
QUANTS = ("Q8_0", "Q4_K_M")


def command_line() -> str:
    return ".venv/bin/python benchmarks/gguf_native.py " + shlex.join(sys.argv[1:])


def mid_model(quant: str) -> Path:
    """bench_moe()'s f32 GGUF quantised by llama.cpp's own quantiser, built once into benchmarks/.cache/."""
    out = CACHE / f"moe-1024x8x32.{quant}.gguf"
    if not out.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        import synthetic_moe

        tmp = out.with_name(out.name + ".tmp")
        synthetic_moe.llama_quantize(bench_moe(), tmp, quant)
        tmp.replace(out)
    return out


# --- the two runtimes, driven by token ids ------------------------------------------------------------------


def open_ours(path: Path, **opts: Any) -> Any:
    import torch

    from localmoe.engine.torch_moe import TorchMoEEngine

    torch.set_num_threads(THREADS)
    eng = TorchMoEEngine(path, max_seq_length=N_CTX, **opts)
    eng.load()
    return eng


def forced_ids(n: int) -> list[int]:
    """A fixed pseudo-random token sequence (ids below 49152, in both models' vocabularies): fed instead of the
    greedy choice, it keeps a random model from repeating one token, so its own routers meet varied tokens."""
    return np.random.default_rng(5).integers(100, 49152, n).tolist()


def ours_decode(eng: Any, prompt: list[int], n: int, forced: bool = False) -> dict[str, Any]:
    """Prefill `prompt`, then n one-token steps through the KV cache (greedy, or `forced_ids`); tok/s over the n
    steps, disk bytes (/proc/self/io) and the cache's counters over them."""
    feed = forced_ids(n) if forced else None
    seq = list(prompt)
    row = eng.logits(seq)[-1]
    finite = bool(np.isfinite(row).all())
    eng.reset_cache_stats()
    io0, t0 = read_bytes(), time.perf_counter()
    for i in range(n):
        seq.append(feed[i] if feed else int(row.argmax()))
        row = eng.logits(seq, reuse=True)[-1]
        finite = finite and bool(np.isfinite(row).all())
    dt = time.perf_counter() - t0
    stats = eng.cache_stats()
    uses = stats.get("hits", 0) + stats.get("misses", 0) + stats.get("warm_hits", 0)
    return {"tok_s": n / dt, "tokens": n, "disk_bytes": read_bytes() - io0, "finite": finite,
            "out": seq[len(prompt):], "max_logit": float(np.abs(row).max()),
            "cache": {"slots": stats.get("slots"), "hits": stats.get("hits"), "misses": stats.get("misses"),
                      "bytes_read": stats.get("bytes_read"), "hit_rate": stats.get("hits", 0) / uses if uses else None,
                      "decode_step": stats.get("decode_step"), "expert_kernel": stats.get("expert_kernel"),
                      "expert_dtype": stats.get("expert_dtype")}}


def open_llama(path: Path, repack: bool = False) -> Any:
    """llama-cpp-python on `path`, mapped. repack=False: without llama.cpp's CPU repacking of Q4_K (and Q4_0, IQ4_NL)
    into interleaved layouts (`--no-repack`, `use_extra_bufts` false), which copies those weights into anonymous
    memory and so takes them out of the mmap: with it, a file larger than the memory cap is killed for memory.
    Llama.__init__ takes its params from llama_cpp.llama_cpp.llama_model_default_params (DESIGN.md)."""
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    default = C.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = repack
        return p

    C.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    finally:
        C.llama_model_default_params = default


def llama_row(llm: Any) -> np.ndarray:
    """The last evaluated token's logits (llama-cpp-python's `scores` holds them only with logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def llama_decode(llm: Any, prompt: list[int], n: int, forced: bool = False) -> dict[str, Any]:
    feed = forced_ids(n) if forced else None
    llm.reset()
    llm.eval(prompt)
    row = llama_row(llm)
    finite = bool(np.isfinite(row).all())
    out = []
    io0, t0 = read_bytes(), time.perf_counter()
    for i in range(n):
        out.append(feed[i] if feed else int(row.argmax()))
        llm.eval(out[-1:])
        row = llama_row(llm)
        finite = finite and bool(np.isfinite(row).all())
    dt = time.perf_counter() - t0
    return {"tok_s": n / dt, "tokens": n, "disk_bytes": read_bytes() - io0, "finite": finite, "out": out,
            "max_logit": float(np.abs(row).max())}


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# --- resident -----------------------------------------------------------------------------------------------


def resident(args: argparse.Namespace) -> None:
    rows = []
    for quant in QUANTS:
        path = mid_model(quant)
        ours = open_ours(path)
        ours.preload()  # every expert read in now: no reads inside the timed steps
        llm = open_llama(path)
        ours_decode(ours, PROMPT, 4)  # warm-up
        llama_decode(llm, PROMPT, 4)
        o, ll = [], []
        last = {}
        for _ in range(args.reps):
            last["ours"] = ours_decode(ours, PROMPT, args.tokens)
            o.append(last["ours"]["tok_s"])
            last["llama"] = llama_decode(llm, PROMPT, args.tokens)
            ll.append(last["llama"]["tok_s"])
        c = last["ours"]["cache"]
        pairs = zip(last["ours"]["out"], last["llama"]["out"], strict=True)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), args.tokens)  # the prefix where they agree
        rows.append((quant, path, med(o), med(ll), c, same))
        print(quant, [round(x, 1) for x in o], [round(x, 1) for x in ll], c, flush=True)
        ours.close()
        del llm
    lines = ["| file | size MiB | ours tok/s | llama.cpp tok/s | ours ÷ llama.cpp (target ≥ 0.8) | ours' path | "
             "greedy tokens agree |", "|---|---|---|---|---|---|---|"]
    for quant, path, o, ll, c, same in rows:
        lines.append(f"| {quant} | {path.stat().st_size / MB:.0f} | {o:.1f} | {ll:.1f} | **{o / ll:.2f}** | "
                     f"{c['decode_step']} step, experts {c['expert_dtype']} ({c['expert_kernel']} kernel), "
                     f"{c['slots']} slots | first {same} of {args.tokens} |")
    body = (f"## GGUF MoE on the native engine (issue #16): "
            f"resident, every expert in RAM\n\n`{command_line()}` — 2 cores, {len(PROMPT)}-token prompt of ids, "
            f"greedy, {args.tokens} decode tokens timed (prefill excluded), median of {args.reps} alternating runs "
            f"in one process (the greedy tokens part where the random model's near-ties meet llama.cpp's 8-bit "
            f"activations). Model: bench_moe() (hidden 1024, 8 layers, 32 experts top-4, expert FFN 512, vocab "
            f"49152) quantised by llama.cpp's quantiser from its f32 GGUF. Engine at {engine_state()}.\n\n"
            + "\n".join(lines))
    print(body)
    if args.write:
        write_section("gguf_native_resident", body)


def engine_state() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "localmoe/engine").splitlines()
    return git("rev-parse", "--short", "HEAD") + (
        " + uncommitted " + ", ".join(ln.split()[-1].rsplit("/", 1)[-1] for ln in dirty) if dirty else "")


# --- capped runs: one child process each under memcap --------------------------------------------------------


def child(runtime: str, spec: dict[str, Any]) -> None:
    path = Path(spec["path"])
    t0 = time.perf_counter()
    prompt = spec.get("prompt", PROMPT)
    out: dict[str, Any] = {"runtime": runtime}
    if runtime == "ours":
        opts = spec.get("opts", {})
        trace = opts.pop("replay", None)
        try:
            eng = open_ours(path, **opts)
        except Exception as e:  # noqa: BLE001 - a refusal or a crash is a result here
            print(json.dumps({**out, "error": f"{type(e).__name__}: {e}"[:300]}))
            return
        if trace:
            from localmoe.experts.trace import Trace

            eng.replay(Trace.load(trace))
        out["load_s"] = time.perf_counter() - t0
        out["loaded"] = proc_status()
        if eng.plan is not None:
            out["plan"] = {"slots": eng.plan.slots_per_layer, "dense_bytes": eng.plan.dense_bytes,
                           "bytes_per_expert": eng.plan.bytes_per_expert}
        out.update(ours_decode(eng, prompt, spec["tokens"], spec.get("forced", False)))
    else:
        llm = open_llama(path, repack=spec.get("repack", False))
        out["load_s"] = time.perf_counter() - t0
        out.update(llama_decode(llm, prompt, spec["tokens"], spec.get("forced", False)))
    out["status"] = proc_status()
    out["out"] = out["out"][:8]
    print(json.dumps(out))


def run_capped(runtime: str, spec: dict[str, Any], cap_mb: int, evict: list[Path], timeout: int = 900) -> dict:
    cmd = [str(MEMCAP), str(cap_mb), *(a for p in evict for a in ("--evict", str(p))), "--",
           sys.executable, __file__, "_run", runtime, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"runtime": runtime, "error": f"timed out after {timeout} s"}
    peak = next((ln.removeprefix("memcap: ") for ln in r.stderr.splitlines() if ln.startswith("memcap:")), "")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = " | ".join(ln for ln in r.stderr.strip().splitlines()[-3:] if not ln.startswith("memcap:"))
        err = "killed (out of memory)" if r.returncode == 137 else f"exit {r.returncode}"
        return {"runtime": runtime, "error": f"{err}: {tail}"[:300], "memcap": peak}
    out = json.loads(lines[-1])
    out["memcap"], out["wall_s"] = peak, time.perf_counter() - t0
    print(runtime, cap_mb, {k: v for k, v in out.items() if k not in ("status", "loaded")}, flush=True)
    return out


def footprint(runtime: str, path: Path | None = None) -> int:
    """Peak RSS of a process that imported the runtime and did a tiny thing (ours: torch and the engine, a matmul;
    llama.cpp: a vocabulary-only load of the mid-size Q8_0 file); "llama-loaded": llama.cpp's anonymous memory with
    `path` mapped (no repacking) and one token decoded: its compute buffers and KV cache; "ours-loaded": our peak RSS
    on `path` with 8 slots per layer, the 16-token prompt and 8 decode steps, uncapped (the prompt's experts are
    dequantised to float32 for the batched matmuls: a transient peak)."""
    code = {"ours": "import torch; from localmoe.engine.torch_moe import TorchMoEEngine; torch.ones(8) @ torch.ones(8)",
            "llama": f"from llama_cpp import Llama; Llama({str(mid_model('Q8_0'))!r}, vocab_only=True, verbose=False)",
            "llama-loaded": f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import gguf_native as g; "
                            f"llm = g.open_llama(g.Path({str(path)!r})); g.llama_decode(llm, g.PROMPT, 1)",
            "ours-loaded": f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import gguf_native as g; "
                           f"e = g.open_ours(g.Path({str(path)!r}), expert_slots=8); "
                           f"g.ours_decode(e, g.PROMPT, 8, forced=True)"}
    key = "RssAnon" if runtime == "llama-loaded" else "VmHWM"
    code = code[runtime] + "\nfrom pathlib import Path\nprint([int(ln.split()[1]) * 1024 for ln in " \
        f"Path('/proc/self/status').read_text().splitlines() if ln.startswith({key!r})][0])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def file_sizes(path: Path) -> dict[str, int]:
    """The file's dense bytes (all but the experts), expert bytes, and ours' dense bytes as float32."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    dense = experts = dense_f32 = 0
    for t in r.tensors:
        if "_exps" in t.name:
            experts += int(t.n_bytes)
        else:
            dense += int(t.n_bytes)
            dense_f32 += 4 * int(t.n_elements)
    return {"dense": dense, "experts": experts, "dense_f32": dense_f32}


def cap_row(label: str, cap: int, r: dict[str, Any]) -> str:
    peak = r.get("memcap", "").removeprefix("cap ").split(", ", 1)[-1]
    if "error" in r:
        return f"| {label} | {cap} | {r['error']} | | | | {peak} |"
    c = r.get("cache") or {}
    detail = (f"{c['slots']} slots/layer, hit rate {c['hit_rate']:.2f}, {c['decode_step']} step"
              if c else "mmap")
    per_tok = r["disk_bytes"] / r["tokens"] / MB
    return (f"| {label} | {cap} | {r['tok_s']:.2f} | {per_tok:.1f} | {detail} | {r.get('load_s', 0):.1f} | "
            f"{peak} |")


CAP_HEAD = ("| runtime | cap MiB | decode tok/s | disk MiB read / token | detail | load s | memcap peak |\n"
            "|---|---|---|---|---|---|---|")


def quarter(args: argparse.Namespace) -> None:
    fp = {rt: footprint(rt) for rt in ("ours", "llama")}
    sections = []
    for quant in QUANTS:
        path = mid_model(quant)
        s = file_sizes(path)
        q = s["experts"] // 4
        loaded = footprint("llama-loaded", path)
        ours_peak = footprint("ours-loaded", path)
        ours_over = ours_peak - s["dense"] - q  # its 8 slots of 32 hold 25% of the experts
        caps = {"ours": (ours_over + s["dense"] + q) // MB,
                "ours-bare": (fp["ours"] + s["dense"] + q) // MB, "llama": (fp["llama"] + s["dense"] + q) // MB,
                "llama-loaded": (fp["llama"] + loaded + s["dense"] + q) // MB}
        trace = CACHE / "moe-1024x8x32.trace.jsonl"
        locality = synthetic_trace(trace, n_layers=8, n_experts=32, top_k=4)
        spec = {"path": str(path), "tokens": args.tokens}
        ours = run_capped("ours", {**spec, "opts": {"expert_slots": 8}}, caps["ours"], [path])
        replay = run_capped("ours", {**spec, "opts": {"expert_slots": 8, "replay": str(trace)}}, caps["ours"], [path])
        ours_f = run_capped("ours", {**spec, "opts": {"expert_slots": 8}, "forced": True}, caps["ours"], [path])
        bare = run_capped("ours", {**spec, "opts": {"expert_slots": 8}, "forced": True}, caps["ours-bare"], [path])
        own_f = run_capped("llama", {**spec, "forced": True}, caps["llama-loaded"], [path])
        own = run_capped("llama", spec, caps["llama"], [path])
        own_loaded = run_capped("llama", spec, caps["llama-loaded"], [path])
        same = run_capped("llama", spec, caps["ours"], [path])
        repack = run_capped("llama", {**spec, "repack": True}, caps["ours"], [path])
        ratio = lambda a, b: f"**{a['tok_s'] / b['tok_s']:.2f}**" if "tok_s" in a and "tok_s" in b else "-"  # noqa
        sections.append(
            f"### {quant} ({path.stat().st_size / MB:.0f} MiB: dense {s['dense'] / MB:.0f} MiB as stored, "
            f"experts {s['experts'] / MB:.0f} MiB; llama.cpp's anonymous "
            f"memory loaded {loaded / MB:.0f} MiB; ours' peak RSS with 8 slots, uncapped, {ours_peak / MB:.0f} MiB: "
            f"footprint {ours_over / MB:.0f} MiB beyond its weights)\n\n" + CAP_HEAD + "\n"
            + "\n".join([cap_row("ours, 8 of 32 slots, greedy", caps["ours"], ours),
                         cap_row("ours, 8 of 32 slots, forced tokens", caps["ours"], ours_f),
                         cap_row("ours, 8 of 32 slots, replayed trace (torch step)", caps["ours"], replay),
                         cap_row("ours, forced tokens, cap with the no-weights footprint", caps["ours-bare"], bare),
                         cap_row("llama.cpp (mmap), its own cap (no-weights footprint), greedy", caps["llama"], own),
                         cap_row("llama.cpp (mmap), its own cap (loaded footprint), greedy", caps["llama-loaded"],
                                 own_loaded),
                         cap_row("llama.cpp (mmap), its own cap (loaded footprint), forced tokens",
                                 caps["llama-loaded"], own_f),
                         cap_row("llama.cpp (mmap), ours' cap, greedy", caps["ours"], same),
                         cap_row("llama.cpp default (Q4_K repacked into RAM), ours' cap", caps["ours"], repack)])
            + f"\n\nours ÷ llama.cpp (target ≥ 2.0), forced tokens: {ratio(ours_f, own_f)} at the caps with "
              f"llama.cpp's loaded footprint; greedy: {ratio(ours, own_loaded)} against llama.cpp at its "
              f"own cap with its loaded footprint ({ratio(ours, own)} with the no-weights one), {ratio(ours, same)} "
              f"at ours' cap; ours replaying the trace ÷ llama.cpp at its own loaded cap: {ratio(replay, own_loaded)}."
              f" Replayed trace: keep probability {locality['keep']:.2f}, measured reuse {locality['reuse']:.2f} "
              f"(random: 4/32 = 0.12).\n")
    body = (f"## GGUF MoE on the native engine (issue #16): "
            f"capped at footprint + dense + 25% of the experts\n\n`{command_line()}` — 2 cores, "
            f"{args.tokens} decode tokens after the {len(PROMPT)}-token prompt, one run each, each in its own "
            f"process under `../shared/tools/memcap CAP --evict FILE`. Cap = the runtime's footprint + the file's "
            f"dense weights (both keep them packed) + 25% of the file's expert bytes. Footprint: llama.cpp's = peak "
            f"RSS after importing it and a vocabulary-only load ({fp['llama'] / MB:.0f} MiB), plus, in the 'loaded "
            f"footprint' rows, its anonymous memory with the model mapped and a token decoded (KV cache, compute "
            f"buffers); ours' = its peak RSS uncapped with 8 slots per layer over the same prompt and 8 decode steps, "
            f"less the dense weights and the slots' experts: the torch runtime plus the prompt's transient float32 "
            f"copies of its experts (the batched prompt matmuls run on dequantised experts). With only the "
            f"no-weights footprint (peak RSS after importing torch and the engine: {fp['ours'] / MB:.0f} MiB) ours is "
            f"killed in the prompt (row 'cap with the no-weights footprint'). llama.cpp maps the file without its CPU "
            f"repacking (`use_extra_bufts` off, as `--no-repack`), except in the last row: by default it copies Q4_K "
            f"tensors into anonymous memory, out of the mmap. Routing: greedy decoding of this random model soon "
            f"repeats one token, so its own routers reuse the same experts (an easy case); *forced tokens* feed both "
            f"runtimes the same fixed pseudo-random ids instead (random routers on varied tokens: near-uniform "
            f"routing, the hard case); the *replayed trace* (ours only, on the torch decode path: `engine.replay` "
            f"does not run in the native step) keeps each of the previous token's experts with a probability set so "
            f"that the reuse is 0.375 (DESIGN.md's real Mixtral routing: 0.34-0.40), the rest from a per-layer "
            f"Zipf(0.8) popularity. Engine at {engine_state()}.\n\n"
            + "\n".join(sections))
    print(body)
    if args.write:
        write_section("gguf_native_quarter", body)


# --- the Qwen3-30B-A3B-shaped model -------------------------------------------------------------------------


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def big_tensors() -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, numpy shape [.., rows, cols], type) in the order of a llama.cpp Q4_K_M file."""
    import gguf

    Q4, Q6, F32 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.F32
    b = BIG
    h, e, ff = b["hidden"], b["experts"], b["expert_ff"]
    q, kv = b["heads"] * b["head_dim"], b["kv_heads"] * b["head_dim"]
    out = [("token_embd.weight", (b["vocab"], h), Q4)]
    for i in range(b["layers"]):
        more = more_bits(i, b["layers"])
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (h,), F32), (p + "attn_q.weight", (q, h), Q4),
                (p + "attn_k.weight", (kv, h), Q4), (p + "attn_v.weight", (kv, h), Q6 if more else Q4),
                (p + "attn_output.weight", (h, q), Q4), (p + "attn_q_norm.weight", (b["head_dim"],), F32),
                (p + "attn_k_norm.weight", (b["head_dim"],), F32), (p + "ffn_norm.weight", (h,), F32),
                (p + "ffn_gate_inp.weight", (e, h), F32), (p + "ffn_gate_exps.weight", (e, ff, h), Q4),
                (p + "ffn_up_exps.weight", (e, ff, h), Q4),
                (p + "ffn_down_exps.weight", (e, h, ff), Q6 if more else Q4)]
    return out + [("output_norm.weight", (h,), F32), ("output.weight", (b["vocab"], h), Q6)]


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], qtype: Any) -> np.ndarray:
    """Random valid blocks whose weights have a std of ~0.02 (activations stay finite through 48 layers): Q4_K
    d ≈ 8e-5, dmin = 7.5 d (the 4-bit codes' mean offset), 6-bit scales and mins random; Q6_K int8 scales in
    [-16, 15], d ≈ 1.1e-4. F32: norms 1, routers N(0, 0.02)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return rng.normal(0, 0.02, shape).astype(np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.bit_generator.random_raw(-(-n_blocks * size // 8)).view(np.uint8)[: n_blocks * size]
    raw = raw.reshape(n_blocks, size)
    jitter = rng.uniform(0.7, 1.3, n_blocks)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        raw[:, 0:2] = (8e-5 * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw[:, 2:4] = (6e-4 * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
    else:  # Q6_K: ql[128] qh[64] scales[16] (int8) d (f16)
        raw[:, 192:208] = ((raw[:, 192:208] & 31).astype(np.int16) - 16).astype(np.int8).view(np.uint8)
        raw[:, 208:210] = (1.1e-4 * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def build_big(path: Path = BIG_PATH) -> Path:
    """Write the model tensor by tensor (one expert tensor, ≤ 255 MB, in memory at a time). The tokenizer is the
    embedded SmolLM2's (gpt2 BPE, 49152 tokens, its merges) padded with unused tokens to 151936."""
    import gguf

    if path.exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic_moe

    b = BIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    w.add_name("qwen3-30b-a3b-shaped random Q4_K_M")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_block_count(b["layers"])
    w.add_context_length(40960)
    w.add_embedding_length(b["hidden"])
    w.add_feed_forward_length(6144)
    w.add_head_count(b["heads"])
    w.add_head_count_kv(b["kv_heads"])
    w.add_key_length(b["head_dim"])
    w.add_value_length(b["head_dim"])
    w.add_rope_dimension_count(b["head_dim"])
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(b["experts"])
    w.add_expert_used_count(b["top_k"])
    w.add_expert_feed_forward_length(b["expert_ff"])
    fields = dict(synthetic_moe._tokenizer_fields(synthetic_moe._embedded_gguf()))
    tokens, vt, st = fields["tokenizer.ggml.tokens"]
    pad = b["vocab"] - len(tokens)
    fields["tokenizer.ggml.tokens"] = (list(tokens) + [f"<|unused_{i}|>" for i in range(pad)], vt, st)
    if "tokenizer.ggml.token_type" in fields:
        types, vt, st = fields["tokenizer.ggml.token_type"]
        fields["tokenizer.ggml.token_type"] = (list(types) + [5] * pad, vt, st)  # 5: unused
    for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub)
    plan = big_tensors()
    for name, shape, qtype in plan:
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for i, (name, shape, qtype) in enumerate(plan):
        w.write_tensor_data(random_tensor(rng, name, shape, qtype))
        if i % 60 == 0:
            print(f"  {i}/{len(plan)} {name}", flush=True)
    w.close()
    tmp.replace(path)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB")
    return path


def disk_bandwidth(path: Path, total: int = 1 << 30, chunk: int = 3 << 20, direct: bool = True) -> float:
    """Bytes/s of reads of `chunk` bytes (about one expert of this model) at random aligned offsets of the file,
    `total` bytes in all, O_DIRECT (what the disk gives) or buffered after eviction (what a plain pread gets)."""
    import mmap

    os.sync()  # no writeback competing
    subprocess.run([str(MEMCAP), "64", "--evict", str(path), "--", "true"], capture_output=True)
    size = path.stat().st_size
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    rng = np.random.default_rng(1 if direct else 3)
    done = 0
    t0 = time.perf_counter()
    try:
        while done < total:
            off = int(rng.integers(0, (size - chunk) // 4096)) * 4096
            done += os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
    return done / (time.perf_counter() - t0)


def synthetic_trace(path: Path, target: float = 0.375, **shape: Any) -> dict[str, Any]:
    """`make_trace` with the keep probability set so that the measured reuse is `target` (DESIGN.md: 0.34-0.40)."""
    keep = target
    for _ in range(6):
        got = make_trace(path, keep=keep, **shape)
        if abs(got["reuse"] - target) < 0.01:
            break
        keep = min(max(keep + target - got["reuse"], 0.0), 1.0)
    return got


def make_trace(path: Path, n_tokens: int = 512, keep: float = 0.375, zipf: float = 0.8,
               n_layers: int = BIG["layers"], n_experts: int = BIG["experts"],
               top_k: int = BIG["top_k"]) -> dict[str, Any]:
    """A routing trace for the big model with real-MoE locality (DESIGN.md: an expert the previous token used is
    chosen again 34-40% of the time; a few hot experts per layer): per layer and token, each of the previous token's
    8 experts is kept with probability `reuse`; the rest are drawn without replacement from a per-layer Zipf(s=zipf)
    popularity over a random permutation of the 128 experts. Returns the measured reuse share."""
    from localmoe.experts.trace import Trace, TraceToken

    b = {"layers": n_layers, "experts": n_experts, "top_k": top_k}
    rng = np.random.default_rng(2)
    ranks = np.arange(1, b["experts"] + 1, dtype=float) ** -zipf
    pops = []
    for _ in range(b["layers"]):
        p = np.empty(b["experts"])
        p[rng.permutation(b["experts"])] = ranks / ranks.sum()
        pops.append(p)
    trace = Trace(path.stem, "synthetic", b["layers"], b["experts"], b["top_k"])
    prev: list[list[int]] = [[] for _ in range(b["layers"])]
    kept = total = 0
    for pos in range(n_tokens):
        layers = []
        for layer in range(b["layers"]):
            kept_now = [x for x in prev[layer] if rng.random() < keep]
            p = pops[layer].copy()
            p[kept_now] = 0
            p /= p.sum()
            new = rng.choice(b["experts"], b["top_k"] - len(kept_now), replace=False, p=p).tolist()
            chosen = [int(x) for x in kept_now + new]
            if prev[layer]:
                kept += len(set(chosen) & set(prev[layer]))
                total += len(prev[layer])
            layers.append(chosen)
            prev[layer] = chosen
        trace.tokens.append(TraceToken(pos, 0, "decode", layers))
    trace.save(path)
    return {"reuse": kept / total, "tokens": n_tokens, "zipf": zipf, "keep": keep}


def big(args: argparse.Namespace) -> None:
    path = build_big()
    cap = args.cap_mb
    bw, bw_buffered = disk_bandwidth(path), disk_bandwidth(path, direct=False)
    trace_path = CACHE / "qwen3-30b-a3b-shape.trace.jsonl"
    locality = synthetic_trace(trace_path)
    prompt = PROMPT[:8]
    base = {"path": str(path), "prompt": prompt}
    n_llama = args.llama_tokens or args.tokens
    runs = [("ours, greedy", "ours", {**base, "tokens": args.tokens, "opts": {}}),
            ("ours, forced tokens", "ours", {**base, "tokens": args.tokens, "opts": {}, "forced": True}),
            ("ours, replayed trace", "ours", {**base, "tokens": args.tokens, "opts": {"replay": str(trace_path)}}),
            *([("ours, 1-token prompt, greedy", "ours",
                {**base, "prompt": prompt[:1], "tokens": args.tokens, "opts": {}}),
               ("ours, 1-token prompt, forced tokens", "ours",
                {**base, "prompt": prompt[:1], "tokens": args.tokens, "opts": {}, "forced": True}),
               ("ours, 1-token prompt, replayed trace", "ours",
                {**base, "prompt": prompt[:1], "tokens": args.tokens, "opts": {"replay": str(trace_path)}})]
              if args.prompt1 else []),
            ("llama.cpp (mmap), greedy", "llama", {**base, "tokens": n_llama}),
            ("llama.cpp (mmap), forced tokens", "llama", {**base, "tokens": n_llama, "forced": True})]
    results = {label: run_capped(rt, spec, cap, [path], timeout=args.timeout) for label, rt, spec in runs}

    def ratio(a: str, b: str) -> str:
        ra, rb = results[a], results[b]
        return f"**{ra['tok_s'] / rb['tok_s']:.2f}**" if "tok_s" in ra and "tok_s" in rb else "-"
    lines = ["| runtime | decode tok/s | tokens | disk MiB read / token (ours' count) | physical limit tok/s "
             "| detail | load s | logits finite | memcap peak |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        peak = r.get("memcap", "").removeprefix("cap ").split(", ", 1)[-1]
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | | | | {peak} |")
            continue
        per_tok = r["disk_bytes"] / r["tokens"]
        c = r.get("cache") or {}
        own = f" ({c['bytes_read'] / r['tokens'] / MB:.0f})" if c.get("bytes_read") is not None else ""
        detail = (f"{c['slots']} slots/layer (plan), hit rate {c['hit_rate']:.2f}, {c['decode_step']} step"
                  if c else "mmap")
        limit = f"{bw / per_tok:.2f}" if per_tok else "-"
        lines.append(f"| {label} | {r['tok_s']:.2f} | {r['tokens']} | {per_tok / MB:.0f}{own} | {limit} | {detail} | "
                     f"{r.get('load_s', 0):.0f} | {r['finite']} | {peak} |")
    size = path.stat().st_size
    body = (f"## GGUF MoE on the native engine (issue #16): "
            f"Qwen3-30B-A3B-shaped random Q4_K_M ({size / 1e9:.1f} GB) under a {cap} MiB cap\n\n"
            f"`{command_line()}` — 2 cores, {len(prompt)}-token prompt of ids, one run each in its own "
            f"process under `../shared/tools/memcap {cap} --evict FILE`. Disk read bandwidth measured here: "
            f"{bw / 1e9:.2f} GB/s (O_DIRECT, 3 MiB reads at random offsets of the file, 1 GiB, after `sync`; buffered "
            f"preads the same way after eviction: {bw_buffered / 1e9:.2f} GB/s); physical limit = the O_DIRECT figure "
            f"÷ disk bytes read per decode token (/proc/self/io read_bytes of the process). llama.cpp maps the file "
            f"without its CPU repacking (`use_extra_bufts` off, as `--no-repack`): by default it copies the Q4_K "
            f"tensors into anonymous memory, and under an 8192 MiB cap it was killed for memory (peak 8192 MB). "
            f"Routing: *greedy* (the random model soon repeats one token, so its own routers pick the same experts "
            f"again: an easy case for any cache); *forced tokens* (a fixed pseudo-random id sequence fed to both "
            f"runtimes instead of their choice: varied tokens, though these random routers still favour a few experts "
            f"per layer, see the hit rates); *replayed trace* (`engine.replay`, ours only — llama.cpp cannot replay; "
            f"the decode path it ran on is in the detail column): {locality['tokens']} synthetic tokens, per layer "
            f"each of the "
            f"previous token's 8 experts kept with probability {locality['keep']:.2f}, the rest drawn from a "
            f"per-layer Zipf({locality['zipf']}) popularity over a random order of the 128 experts, so that an "
            f"expert the previous token used is chosen again {locality['reuse']:.2f} of the time (DESIGN.md's real "
            f"Mixtral routing: 0.34-0.40; random: 8/128 = 0.06). Engine at {engine_state()}.\n\n"
            + "\n".join(lines)
            + f"\n\nours ÷ llama.cpp: greedy {ratio('ours, greedy', 'llama.cpp (mmap), greedy')}, forced tokens "
              f"{ratio('ours, forced tokens', 'llama.cpp (mmap), forced tokens')}; ours replaying the trace ÷ "
              f"llama.cpp forced: {ratio('ours, replayed trace', 'llama.cpp (mmap), forced tokens')}."
            + (f" After a 1-token prompt (llama.cpp's rows keep the 8-token one; its decode speed does not depend on "
               f"it): greedy {ratio('ours, 1-token prompt, greedy', 'llama.cpp (mmap), greedy')}, forced "
               f"{ratio('ours, 1-token prompt, forced tokens', 'llama.cpp (mmap), forced tokens')}, replayed ÷ "
               f"llama.cpp forced {ratio('ours, 1-token prompt, replayed trace', 'llama.cpp (mmap), forced tokens')}"
               f"." if args.prompt1 else "") + "\n")
    print(body)
    if args.write:
        write_section(f"gguf_native_big_{cap}", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("resident")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("quarter")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--write", action="store_true")
    sub.add_parser("build-big")
    p = sub.add_parser("big")
    p.add_argument("--cap-mb", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--llama-tokens", type=int, help="llama.cpp's decode tokens (default --tokens)")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--prompt1", action="store_true",
                   help="also ours after a 1-token prompt (the 8-token prompt's float32 expert copies exceed a cap)")
    p.add_argument("--write", action="store_true")
    p = sub.add_parser("_run")
    p.add_argument("runtime")
    p.add_argument("spec")
    args = ap.parse_args()
    if args.cmd == "_run":
        child(args.runtime, json.loads(args.spec))
    elif args.cmd == "build-big":
        build_big()
    else:
        {"resident": resident, "quarter": quarter, "big": big}[args.cmd](args)


if __name__ == "__main__":
    main()
