"""One lever tried for the router's generalisation (issue 19, item 3) and not shipped: a linear probe of the small
model's hidden state. Probes of a model's activations are known to predict its own mistakes in distribution; the
question is whether they carry over to questions written apart from the training suite.

SmolLM2's residual stream after each of its 30 layers (llama.cpp's `l_out-<i>` nodes, read with an evaluation
callback) is taken at the question's last prompt token ("last") or averaged over the question's rows ("mean"). A
logistic model (the router's own `fit_logistic`, standardised inputs) over one layer's 576 values plus the `probe`
strategy's three signals is fitted on the shipped labels.

The protocol was fixed on 2026-12-04 before any evaluation-set figure of these probes was seen:
- candidates: pooling last or mean; layer 6, 12, 18, 24 or 29; l2 100, 1000 or 10000;
- selection on the training labels only: leave-one-category-out AUC (each of the 29 kinds held out in turn, the
  held-out predictions pooled), ties broken by the five-split mean;
- the chosen probe is combined with `learned` exactly as the shipped `probe` strategy combines its three-signal model
  (`combine_probe`: the log-odds summed, the prior's subtracted), then measured once on the independent set;
- it would ship only if it beat the shipped `probe` on both label sets of the independent set, and its
  leave-one-category-out AUC beat the three-signal model's.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_hidden_probe.py [--write]

The hidden states of the 1557 questions are read once (~6 min here) into benchmarks/.cache/router_hidden.npz.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import CACHE, ROOT, write_section
from router_self_signals import paired_gain

from localmoe.home import models
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import Router, combine_probe

EVAL = ROOT / "benchmarks" / "router_eval_labels.jsonl"
AUDITED = ROOT / "benchmarks" / "router_eval_labels_audited.jsonl"
STATES = CACHE / "router_hidden.npz"
LAYERS, POOLS, L2S = (6, 12, 18, 24, 29), ("last", "mean"), (100.0, 1000.0, 10000.0)
PREFIX = b"l_out-"


def read_hidden(questions: list[str]) -> dict[str, np.ndarray]:
    """Per question, per layer, the residual stream at the last prompt token and its mean over the question's rows
    (from the first token that differs from the chat template with an empty question, less 2)."""
    import llama_cpp
    from llama_cpp import Llama

    from localmoe.engine import llama_hooks
    from localmoe.engine.llamacpp import LlamaCppEngine

    base, _ = llama_hooks._libs()
    seen: dict[int, np.ndarray] = {}

    def on_eval(tensor: int, ask: bool, _user: int) -> bool:
        name = base.ggml_get_name(tensor) or b""
        if ask:
            return name.startswith(PREFIX)
        if name.startswith(PREFIX):
            head = llama_hooks.GGMLTensorHead.from_address(tensor)
            if head.type != 0:  # GGML_TYPE_F32
                raise RuntimeError(f"{name!r} is not f32")
            buf = np.empty(head.ne[0] * head.ne[1], dtype=np.float32)
            base.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, buf.nbytes)
            seen[int(name[len(PREFIX):])] = buf.reshape(head.ne[1], head.ne[0])
        return True

    callback = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(on_eval)
    path = models.default_model().path
    template = LlamaCppEngine(path, n_ctx=512, system_prompt=models.system_prompt(path))  # as the product asks
    template.load()
    with llama_hooks.patched_defaults(None, callback):
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
    empty = template.prompt_tokens([{"role": "user", "content": ""}])
    layers = int(llm.metadata["llama.block_count"])
    last = np.zeros((len(questions), layers, llm.n_embd()), np.float32)
    mean = np.zeros_like(last)
    t0 = time.time()
    for n, q in enumerate(questions):
        tokens = template.prompt_tokens([{"role": "user", "content": q}])
        k = next((i for i, (a, b) in enumerate(zip(tokens, empty, strict=False)) if a != b), len(empty))
        seen.clear()
        llm.reset()
        llm.eval(tokens)
        for i in range(layers):
            h = seen[i]
            last[n, i], mean[n, i] = h[-1], h[max(0, k - 2):].mean(axis=0)
        print(f"\r{n + 1}/{len(questions)} {time.time() - t0:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    llm.close()
    template.close()
    return {"last": last, "mean": mean}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    train_rows = router_train.shipped_labels()
    eval_rows = router_train.read_labels(EVAL)
    questions = list(dict.fromkeys(r["question"] for r in train_rows + eval_rows))
    # the states depend on the rendered prompt: a cache made with another system prompt (or none) is stale
    prompt = "system: " + str(models.system_prompt(models.default_model().path))
    cached = np.load(STATES, allow_pickle=True) if STATES.exists() else None
    if cached is not None and list(cached["questions"]) == questions and str(cached.get("prompt")) == prompt:
        states = {k: cached[k] for k in POOLS}
    else:
        states = read_hidden(questions)
        CACHE.mkdir(exist_ok=True)
        np.savez(STATES, questions=np.array(questions, dtype=object), prompt=np.array(prompt),
                 **{k: v.astype(np.float16) for k, v in states.items()})
    at = {q: i for i, q in enumerate(questions)}
    i_tr = np.array([at[r["question"]] for r in train_rows])
    i_ev = np.array([at[r["question"]] for r in eval_rows])
    s_tr = np.array([r["probe"] for r in train_rows], dtype=float)
    router = Router()
    prober = router.prober
    s_ev = np.array([prober.signals(r["question"]) for r in eval_rows], dtype=float)
    prober.close()
    y_tr = np.array([r["small_wrong"] for r in train_rows], dtype=float)
    cats = [r["category"] for r in train_rows]

    def x(pool: str, layer: int, idx: np.ndarray, sig: np.ndarray) -> np.ndarray:
        return np.concatenate([states[pool][idx, layer].astype(float), sig], axis=1)

    def loco(a: np.ndarray, l2: float) -> float:
        p = np.zeros(len(y_tr))
        for c in sorted(set(cats)):
            out = np.array([k == c for k in cats])
            p[out] = router_eval.fit_logistic(a[~out], y_tr[~out], l2=l2).predict(a[out])
        return router_eval.auc(p, y_tr)

    def five(a: np.ndarray, l2: float) -> float:
        aucs = []
        for seed in router_train.EVAL_SEEDS:
            tr, te = router_eval.split(len(y_tr), seed=seed, strata=cats)
            aucs.append(router_eval.auc(router_eval.fit_logistic(a[tr], y_tr[tr], l2=l2).predict(a[te]), y_tr[te]))
        return float(np.mean(aucs))

    signals_only = (loco(s_tr, 1.0), five(s_tr, 1.0))
    grid = []
    for pool in POOLS:
        for layer in LAYERS:
            for l2 in L2S:
                a = x(pool, layer, i_tr, s_tr)
                grid.append((loco(a, l2), five(a, l2), pool, layer, l2))
                print(f"{pool} layer {layer} l2 {l2:g}: LOCO {grid[-1][0]:.3f}, 5-split {grid[-1][1]:.3f}",
                      file=sys.stderr)
    best = max(grid)
    _, _, pool, layer, l2 = best
    model = router_eval.fit_logistic(x(pool, layer, i_tr, s_tr), y_tr, l2=l2)
    p_hidden = model.predict(x(pool, layer, i_ev, s_ev))
    probe, prior = router.trained["probe"], float(router.trained["probe_prior"])
    learned = np.array([router.score(r["question"], "learned")[0] for r in eval_rows])
    shipped = combine_probe(learned, probe.predict(s_ev), prior)
    hidden = combine_probe(learned, p_hidden, prior)
    labels = {"scorer labels": np.array([r["small_wrong"] for r in eval_rows], dtype=float),
              "audited labels": np.array([r["small_wrong"] for r in router_train.read_labels(AUDITED)], dtype=float)}
    lines = [
        "## Router: a probe of the small model's hidden state (tried, not shipped)",
        "",
        "Command: `flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_hidden_probe.py --write` "
        f"({time.strftime('%Y-%m-%d')}). The protocol, fixed before the run, is in the script's docstring: a "
        "logistic model over one layer's residual stream of SmolLM2 (576 values, at the last prompt token or "
        "averaged over the question) plus the `probe` strategy's three signals, chosen on the training labels "
        "alone by leave-one-category-out AUC, then combined with `learned` as the shipped `probe` is.",
        "",
        "Selection (training labels only; 29 kinds): the three signals alone score leave-one-category-out AUC "
        f"{signals_only[0]:.3f} (5-split {signals_only[1]:.3f}). Best hidden-state probe: {pool} pooling, layer "
        f"{layer}, l2 {l2:g}: {best[0]:.3f} (5-split {best[1]:.3f}). Grid: "
        + "; ".join(f"{p} {lay}/{g:g} {lo:.3f}" for lo, _, p, lay, g in sorted(grid, reverse=True)[:6]) + " (best 6).",
        "",
        "| router | scorer labels AUC, CPT 50% / 80% | audited labels AUC, CPT 50% / 80% |",
        "|---|---|---|",
    ]
    rows = {"learned (shipped)": learned, "probe (shipped default)": shipped,
            "hidden-state probe alone": p_hidden, "learned + hidden-state probe": hidden}
    for name, s in rows.items():
        cells = []
        for y in labels.values():
            small, large = 1 - y, np.ones_like(y)
            cells.append(f"{router_eval.auc(s, y):.3f}, {router_eval.cpt(s, small, large, 0.5):.2f} / "
                         f"{router_eval.cpt(s, small, large, 0.8):.2f}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    gains = {k: paired_gain(hidden, shipped, y) for k, y in labels.items()}
    lines += ["", "Paired bootstrap (1000 resamples) of `learned + hidden-state probe` minus the shipped `probe`: "
              + "; ".join(f"{k} {m:+.3f} (95% {lo:+.3f} to {hi:+.3f})" for k, (m, lo, hi) in gains.items()) + "."]
    ships = all(m > 0 for m, _, _ in gains.values()) and best[0] > signals_only[0]
    lines += ["", "Verdict by the rule fixed before the run: " + (
        "it ships." if ships else "not shipped. The hidden state predicts the small model's failures better than the "
        "three signals on held-out kinds of the training suite, but on the independent questions it loses to the "
        "three signals it was given besides: what it learns about the training questions does not carry over.")]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("router_hidden", body)


if __name__ == "__main__":
    main()
