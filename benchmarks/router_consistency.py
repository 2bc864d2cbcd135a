"""Tried for the cascade router (goal: AUC >= 0.80 for "the small answer is wrong" on the independent set):
self-consistency. Sample extra answers from the small model and measure whether they agree with its greedy answer.

The protocol was fixed on 2026-12-04 before any figure of it was seen:
1. Samples: for every training row (assets/router/labels.jsonl) and every evaluation question, K=2 extra answers
   from the embedded small model through the same Session path as benchmarks/label_router_suite.py, temperature
   0.7, top_p 0.9, top_k 40, seed 1 and seed 2 (one each), max_tokens 96, logprobs on, a new conversation per
   question. Every answer (text, mean_logprob, completion_tokens, wall seconds) is cached in a resumable JSONL
   (benchmarks/.cache/router_consistency_samples.jsonl) keyed by (question id, seed); seed 1 is sampled for every
   row before seed 2. Had the first 50 projected over 45 minutes, K would have dropped to 1 (seed 1 only).
2. Agreement signals, from the answers alone (never the reference answer), between the greedy answer
   (`small_output`) and each sample, averaged over the samples:
   - num_agree: every number (ints/decimals, commas stripped, no sign) in each answer. Both have one: 1.0 if their
     LAST numbers are equal, else 0.0; neither has one: 0.5; exactly one has: 0.0.
   - lex_agree: Jaccard similarity of the sets of lowercase alphanumeric word tokens (length >= 2, minus the
     stopwords in STOPWORDS) of each answer's first 200 characters; two answers with no such token: 1.0.
   - sample_lp: mean over the samples of each sample's mean token log-probability (an empty sample, which has
     none, is left out; all empty: the greedy answer's stands in).
3. Candidates, logistic models (`router_eval.fit_logistic`, l2 1.0, its standardisation), fitted on training rows:
   - current: the six cascade inputs (`cascade_inputs`: learned's log-odds, the three probe signals, the greedy
     answer's mean and lowest token log-probability), exactly as `routing/train.py` fits them;
   - +agree: the six + num_agree + lex_agree;
   - +agree+lp: the six + num_agree + lex_agree + sample_lp;
   - agree only: num_agree + lex_agree + sample_lp + the greedy answer's mean and min log-probability.
   Each with K=2 and K=1 (the seed-1 sample only).
4. Selection on the training labels only: (a) mean held-out AUC over the five splits `router train` reports
   (EVAL_SEEDS, `router_eval.split` stratified by category), learned's estimate built as train.py builds it (its
   own `_train_split` is run and learned's estimate caught where it calls `cascade_inputs`: out-of-fold for a
   training row, the split's final model for a held-out row); (b) leave-one-category-out AUC: each of the 29
   categories held out in turn (learned rebuilt by `_train_split` on the other 28, the candidate fitted there),
   the held-out predictions pooled. A candidate passes if it beats `current` on both (a) and (b); among those that
   pass, the best (b) is chosen. The rule is applied to the K=2 candidates (the protocol's run); the K=1 rows are
   reported beside them, and what the rule would pick among them is said separately.
5. Only then, once on the evaluation set: each candidate fitted as the shipped cascade is (the first EVAL_SEED's
   training split, learned's estimate out-of-fold there), learned's estimate and the probe's signals of an
   evaluation question from the shipped `Router` / `Prober`; AUC, CPT 50% / 80% (large assumed right) for every
   candidate, the shipped `probe` strategy and the digits baseline, on the scorer and the audited labels; paired
   bootstrap (1000 resamples, `router_self_signals.paired_gain`) of chosen minus current on both.
6. Cost: median wall seconds per sampled answer; mean completion tokens of the samples vs the greedy answers.

    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_consistency.py --sample   # ~25 min, resumable
    flock /tmp/localmoe-cpu.lock .venv/bin/python benchmarks/router_consistency.py            # the analysis

The analysis writes its report to stdout and benchmarks/.cache/router_consistency_report.md; RESULTS.md's section
"Router: self-consistency for the cascade" was written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from router_self_signals import paired_gain, report

from localmoe.home import models
from localmoe.routing import evaluate as router_eval
from localmoe.routing import train as router_train
from localmoe.routing.router import Router, TokenEmbedder, cascade_inputs, feature_vector

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "benchmarks" / "router_eval_labels.jsonl"
AUDITED = ROOT / "benchmarks" / "router_eval_labels_audited.jsonl"
TRAIN = ROOT / "assets" / "router" / "labels.jsonl"
SAMPLES = Path(__file__).with_name(".cache") / "router_consistency_samples.jsonl"
SEEDS = (1, 2)
MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K = 96, 0.7, 0.9, 40
STOPWORDS = frozenset("the a an is are of to in and or it that this for on with as be was by so".split())
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
WORD = re.compile(r"[a-z0-9]+")
CANDIDATES = ("current", "+agree", "+agree+lp", "agree only")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done_keys(path: Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    return {(r["id"], r["seed"]) for r in _read(path)}


def sample(path: Path, seeds: tuple[int, ...]) -> None:
    """Sample the small model (as label_router_suite.py does, with temperature) for every training row and every
    evaluation question; seed 1 for all rows first, then seed 2. Resumable: (id, seed) pairs already in `path`
    are skipped."""
    from localmoe.chat.session import Session
    from localmoe.engine import GenerationConfig
    from localmoe.record.recorder import Recorder

    rows = _read(TRAIN) + _read(EVAL)
    done = done_keys(path)
    todo = [(seed, r) for seed in seeds for r in rows if (r["id"], seed) not in done]
    print(f"{len(done)} answers cached, {len(todo)} to sample", file=sys.stderr, flush=True)
    if not todo:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, Recorder(Path(tmp) / "samples.db") as rec, path.open("a") as out:
        session = Session(None, recorder=rec, meter=False,
                          config=GenerationConfig(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True))
        for n, (seed, row) in enumerate(todo, 1):
            config = GenerationConfig(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K,
                                      seed=seed, logprobs=True)
            session.new_conversation()
            t = time.perf_counter()
            reply = session.ask(row["question"], config=config).run()
            wall = time.perf_counter() - t
            s = reply.stats
            out.write(json.dumps({"id": row["id"], "seed": seed, "text": reply.text, "mean_logprob": s.mean_logprob,
                                  "min_logprob": s.min_logprob, "completion_tokens": s.completion_tokens,
                                  "wall_s": round(wall, 4)}) + "\n")
            out.flush()
            if n % 25 == 0 or n == len(todo):
                rate = (time.time() - t0) / n
                print(f"{n}/{len(todo)} {time.time() - t0:.0f} s, {rate:.2f} s/answer, "
                      f"~{rate * (len(todo) - n) / 60:.1f} min left", file=sys.stderr, flush=True)
        session.close()


def numbers(text: str) -> list[float]:
    """Every int or decimal in `text`, commas stripped (no sign: "-5" reads as 5)."""
    out = []
    for m in NUMBER.findall(text):
        s = m.replace(",", "")
        if s:
            out.append(float(s))
    return out


def num_agree(a: str, b: str) -> float:
    na, nb = numbers(a), numbers(b)
    if na and nb:
        return 1.0 if na[-1] == nb[-1] else 0.0
    if not na and not nb:
        return 0.5
    return 0.0


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text[:200].lower()) if len(w) >= 2 and w not in STOPWORDS}


def lex_agree(a: str, b: str) -> float:
    """Jaccard similarity of the word sets; two answers without a counted word agree (1.0)."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def agreement(greedy: dict, samples: list[dict]) -> list[float]:
    """[num_agree, lex_agree, sample_lp] of one question, averaged over its samples. A sample without a token
    log-probability (an empty answer) is left out of sample_lp; if all are, the greedy answer's stands in."""
    g = greedy["small_output"]
    lps = [s["mean_logprob"] for s in samples if s["mean_logprob"] is not None]
    return [float(np.mean([num_agree(g, s["text"]) for s in samples])),
            float(np.mean([lex_agree(g, s["text"]) for s in samples])),
            float(np.mean(lps)) if lps else float(greedy["mean_logprob"])]


def design(name: str, six: np.ndarray, agree: np.ndarray, mean_lp: np.ndarray, min_lp: np.ndarray) -> np.ndarray:
    """The inputs of candidate `name`: six = cascade_inputs(...), agree = [num_agree, lex_agree, sample_lp]."""
    if name == "current":
        return six
    if name == "+agree":
        return np.column_stack([six, agree[:, :2]])
    if name == "+agree+lp":
        return np.column_stack([six, agree])
    return np.column_stack([agree, mean_lp, min_lp])  # agree only


def _fit(x: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    return router_eval.fit_logistic(x[tr], y[tr], l2=1.0).predict(x[te])


def learned_runs(rows: list[dict], splits: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, dict]]:
    """For each (train, test) split: learned's estimate for every row exactly as `router train` builds it
    (out-of-fold for a training row, the final model for a test row), caught at train.py's own call of
    cascade_inputs, and the split's `_train_split` result (its evaluation, its cascade_probe)."""
    embedder = TokenEmbedder(models.default_model().path)
    fx = np.stack([feature_vector(r["question"]) for r in rows])
    raw = np.stack([embedder.embed(r["question"]) for r in rows])
    sx = np.array([r.get("probe") or [0.0] * 3 for r in rows], dtype=np.float64)
    has_sig = np.array([r.get("probe") is not None for r in rows])
    out = []
    for tr, te in splits:
        seen: list[np.ndarray] = []

        def catch(p_learned, *a, _seen=seen, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            _seen.append(np.array(p_learned, dtype=float))
            return cascade_inputs(p_learned, *a, **k)

        with (mock.patch.object(router_train, "cascade_inputs", catch),
              mock.patch.object(router_train.router_eval, "split", lambda *a, _s=(tr, te), **k: _s)):
            result = router_train._train_split(rows, fx, raw, sx, has_sig, seed=0)
        out.append((seen[0], result))
    return out


def load_samples(path: Path) -> dict[tuple[str, int], dict]:
    return {(r["id"], r["seed"]): r for r in _read(path)}


def signals_matrix(raw_rows: list[dict], samples: dict, seeds: tuple[int, ...]) -> np.ndarray:
    return np.array([agreement(r, [samples[(r["id"], s)] for s in seeds]) for r in raw_rows])


def analyse(out_path: Path) -> str:
    t_start = time.time()
    samples = load_samples(SAMPLES)
    raw_train, raw_eval = _read(TRAIN), _read(EVAL)
    rows = router_train.shipped_labels()
    assert [r["question"] for r in rows] == [r["question"] for r in raw_train]
    seeds_done = tuple(s for s in SEEDS if all((r["id"], s) in samples for r in raw_train + raw_eval))
    ks = {"K=2": (1, 2), "K=1": (1,)} if seeds_done == SEEDS else {"K=1": (1,)}
    y = np.array([r["small_wrong"] for r in rows], dtype=float)
    cats = [r["category"] for r in rows]
    sx = np.array([r["probe"] for r in rows], dtype=float)
    mean_lp = np.array([r["mean_logprob"] for r in rows], dtype=float)
    min_lp = np.array([r["min_logprob"] for r in rows], dtype=float)
    agree_tr = {k: signals_matrix(raw_train, samples, s) for k, s in ks.items()}

    # (a) the five reported splits
    five_splits = [router_eval.split(len(rows), seed=s, strata=cats) for s in router_train.EVAL_SEEDS]
    t0 = time.time()
    five_runs = learned_runs(rows, five_splits)
    print(f"five splits' learned: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    shipped_split = [r["evaluation"]["auc"]["cascade"] for _, r in five_runs]
    five: dict[tuple[str, str], list[float]] = {}
    for (tr, te), (p_learned, _) in zip(five_splits, five_runs, strict=True):
        six = cascade_inputs(p_learned, sx, mean_lp, min_lp)
        for k, agree in agree_tr.items():
            for name in CANDIDATES:
                x = design(name, six, agree, mean_lp, min_lp)
                five.setdefault((k, name), []).append(router_eval.auc(_fit(x, y, tr, te), y[te]))
    # (b) leave one category out
    cat_arr = np.array(cats)
    loco_splits = [(np.where(cat_arr != c)[0], np.where(cat_arr == c)[0]) for c in sorted(set(cats))]
    t0 = time.time()
    loco_runs = learned_runs(rows, loco_splits)
    print(f"leave-one-category-out learned: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    pooled = {(k, name): np.zeros(len(rows)) for k in ks for name in CANDIDATES}
    for (tr, te), (p_learned, _) in zip(loco_splits, loco_runs, strict=True):
        six = cascade_inputs(p_learned, sx, mean_lp, min_lp)
        for k, agree in agree_tr.items():
            for name in CANDIDATES:
                pooled[(k, name)][te] = _fit(design(name, six, agree, mean_lp, min_lp), y, tr, te)
    loco = {key: router_eval.auc(p, y) for key, p in pooled.items()}
    mean5 = {key: float(np.mean(v)) for key, v in five.items()}

    def choose(k: str) -> str | None:
        passing = [n for n in CANDIDATES[1:]
                   if mean5[(k, n)] > mean5[(k, "current")] and loco[(k, n)] > loco[(k, "current")]]
        return max(passing, key=lambda n: loco[(k, n)]) if passing else None

    chosen = {k: choose(k) for k in ks}

    # evaluation set: fitted as the shipped cascade is (the first split's training rows)
    tr0 = five_splits[0][0]
    p_learned0, result0 = five_runs[0]
    six_tr = cascade_inputs(p_learned0, sx, mean_lp, min_lp)
    router = Router(router_file=ROOT / "assets" / "router" / "router.json")
    ev_rows = router_train.read_labels(EVAL)
    assert [r["question"] for r in ev_rows] == [r["question"] for r in raw_eval]
    sig_ev = [router.prober.signals(r["question"]) for r in ev_rows]
    n_nosig = sum(s is None for s in sig_ev)
    sx_ev = np.array([s if s is not None else [0.0] * 3 for s in sig_ev], dtype=float)
    learned_ev = np.array([router.score(r["question"], "learned")[0] for r in ev_rows])
    probe_ev = np.array([router.routed_score(r["question"], "probe") for r in ev_rows])
    shipped_cascade_ev = np.array([router.cascade_score(r["mean_logprob"], r["min_logprob"], r["question"])
                                   for r in ev_rows])
    router.close()
    mean_ev = np.array([r["mean_logprob"] for r in ev_rows], dtype=float)
    min_ev = np.array([r["min_logprob"] for r in ev_rows], dtype=float)
    six_ev = cascade_inputs(learned_ev, sx_ev, mean_ev, min_ev)
    labels = {"scorer": np.array([r["small_wrong"] for r in ev_rows], dtype=float),
              "audited": np.array([r["small_wrong"] for r in router_train.read_labels(AUDITED)], dtype=float)}
    ev_scores: dict[tuple[str, str], np.ndarray] = {}
    models_: dict[tuple[str, str], router_eval.LogisticModel] = {}
    for k, s in ks.items():
        agree_ev = signals_matrix(raw_eval, samples, s)
        for name in CANDIDATES:
            m = router_eval.fit_logistic(design(name, six_tr, agree_tr[k], mean_lp, min_lp)[tr0], y[tr0], l2=1.0)
            models_[(k, name)] = m
            ev_scores[(k, name)] = m.predict(design(name, six_ev, agree_ev, mean_ev, min_ev))
    digits = np.array([router_eval.BASELINES["digits"](r["question"]) for r in ev_rows])

    # the report
    lines = ["## Router: self-consistency for the cascade (tried)", "",
             f"Samples: {SAMPLES} ({len(samples)} answers); rule applied to {', '.join(ks)}.", ""]
    shipped_w = router.trained["cascade_probe"]
    mine = models_[(next(iter(ks)), "current")]
    lines += [
        "Reproduction of `current`: router.json's five-split cascade AUC "
        f"{router.trained['evaluation']['auc']['cascade']:.4f} (splits "
        + ", ".join(f"{a:.4f}" for a in router.trained["evaluation"]["split_auc"]["cascade"]) + "); "
        f"train.py's own `_train_split` here {np.mean(shipped_split):.4f} ("
        + ", ".join(f"{a:.4f}" for a in shipped_split) + "); this script's `current` "
        f"{mean5[(next(iter(ks)), 'current')]:.4f} (" + ", ".join(f"{a:.4f}" for a in five[(next(iter(ks)), 'current')])
        + "). First split's six-input weights, router.json vs refitted here: max |difference| "
        f"{np.max(np.abs(shipped_w.weights - mine.weights)):.2e}; evaluation-set scores, shipped "
        f"`Router.cascade_score` vs this `current`: max |difference| "
        f"{np.max(np.abs(shipped_cascade_ev - ev_scores[(next(iter(ks)), 'current')])):.2e}. Evaluation questions "
        f"the probe could not read: {n_nosig}.", ""]
    head = ("| K | candidate | 5-split mean AUC | leave-one-category-out AUC | eval scorer AUC, CPT50 / CPT80 "
            "| eval audited AUC, CPT50 / CPT80 |")
    lines += [head, "|---|---|---|---|---|---|"]

    def cells(s: np.ndarray) -> list[str]:
        out = []
        for yy in labels.values():
            r = report("", s, yy)
            out.append(f"{r['auc']:.3f}, {r['cpt50']:.2f} / {r['cpt80']:.2f}")
        return out

    for k in ks:
        for name in CANDIDATES:
            mark = " (chosen)" if chosen[k] == name else ""
            c = cells(ev_scores[(k, name)])
            lines.append(f"| {k} | {name}{mark} | {mean5[(k, name)]:.4f} | {loco[(k, name)]:.4f} | {c[0]} | {c[1]} |")
    for name, s in {"probe (shipped strategy)": probe_ev, "cascade (shipped Router.cascade_score)":
                    shipped_cascade_ev, "baseline: digits": digits}.items():
        c = cells(s)
        lines.append(f"| - | {name} | | | {c[0]} | {c[1]} |")
    lines.append("")
    for k in ks:
        lines.append(f"Rule ({k}): " + (f"chosen `{chosen[k]}`." if chosen[k] else "no candidate beats `current` "
                                          "on both the five-split mean and leave-one-category-out."))
    lines.append("")
    lines.append("Paired bootstrap (1000 resamples) of candidate minus `current` on the evaluation set "
                 "(the chosen one is the rule's; the rest are for information):")
    for k in ks:
        for name in CANDIDATES[1:]:
            g = {lab: paired_gain(ev_scores[(k, name)], ev_scores[(k, "current")], yy) for lab, yy in labels.items()}
            mark = " **(chosen)**" if chosen[k] == name else ""
            lines.append(f"- {k} {name}{mark}: " + "; ".join(
                f"{lab} {m:+.3f} (95% {lo:+.3f} to {hi:+.3f})" for lab, (m, lo, hi) in g.items()))
    # weights of the K=2 (or K=1) +agree+lp model, for reading
    k0 = next(iter(ks))
    m = models_[(k0, "+agree+lp")]
    names = ["learned", "entropy", "top_p", "prompt_lp", "ans_mean_lp", "ans_min_lp", "num_agree", "lex_agree",
             "sample_lp"]
    lines += ["", f"Standardised weights of {k0} +agree+lp (first split): "
              + ", ".join(f"{n} {w:+.2f}" for n, w in zip(names, m.weights, strict=True)), ""]
    # cost and oddities
    allrows = raw_train + raw_eval
    ss = [samples[(r["id"], s)] for s in ks[k0] for r in allrows]
    walls = np.array([x["wall_s"] for x in ss])
    ct_s = np.array([x["completion_tokens"] for x in ss], dtype=float)
    ct_g = np.array([r["completion_tokens"] for r in allrows], dtype=float)
    lines += [f"Cost: median {np.median(walls):.3f} s per sampled answer (mean {walls.mean():.3f}, total "
              f"{walls.sum() / 60:.1f} min for {len(ss)}); completion tokens: samples mean {ct_s.mean():.1f} "
              f"(at the 96 budget {np.mean(ct_s >= MAX_TOKENS):.1%}), greedy mean {ct_g.mean():.1f} (at budget "
              f"{np.mean(ct_g >= MAX_TOKENS):.1%}); empty samples {sum(not x['text'].strip() for x in ss)}."]
    a_all = np.vstack([agree_tr[k0], signals_matrix(raw_eval, samples, ks[k0])])
    y_all = np.concatenate([y, labels["scorer"]])
    for i, nm in enumerate(("num_agree", "lex_agree", "sample_lp")):
        lines.append(f"- {nm}: mean {a_all[:, i].mean():.3f}; mean when the greedy answer is right "
                     f"{a_all[y_all == 0, i].mean():.3f}, wrong {a_all[y_all == 1, i].mean():.3f}; AUC alone "
                     f"(low value = wrong; training rows) {router_eval.auc(-agree_tr[k0][:, i], y):.3f}")
    has_num = np.array([bool(numbers(r["small_output"])) for r in allrows])
    pairs = [(bool(numbers(r["small_output"])), bool(numbers(samples[(r["id"], s)]["text"])),
              num_agree(r["small_output"], samples[(r["id"], s)]["text"])) for s in ks[k0] for r in allrows]
    lines.append(f"- greedy answers containing a number: {has_num.mean():.1%}; over (greedy, sample) pairs: neither "
                 f"has a number {np.mean([not g and not s for g, s, _ in pairs]):.1%}, exactly one has "
                 f"{np.mean([g != s for g, s, _ in pairs]):.1%}, both have and the last numbers agree "
                 f"{np.mean([a == 1.0 for _, _, a in pairs]):.1%}, both have and differ "
                 f"{np.mean([g and s and a == 0.0 for g, s, a in pairs]):.1%}")
    ref_num = np.array([bool(re.search(r"\d", str(r["answer"]))) for r in allrows])
    lines.append(f"- questions whose reference answer has no digit: {np.mean(~ref_num):.1%}; of their greedy answers "
                 f"{has_num[~ref_num].mean():.1%} contain a number anyway (num_agree there: 1.0 for "
                 f"{np.mean(a_all[~ref_num, 0] == 1.0):.1%}, 0.0 for {np.mean(a_all[~ref_num, 0] == 0.0):.1%})")
    lines.append(f"\nAnalysis wall time {time.time() - t_start:.0f} s.")
    body = "\n".join(lines)
    out_path.write_text(body + "\n")
    return body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", action="store_true", help="sample the answers (resumable) and stop")
    ap.add_argument("--seeds", default="1,2")
    args = ap.parse_args()
    if args.sample:
        sample(SAMPLES, tuple(int(s) for s in args.seeds.split(",")))
        return
    print(analyse(SAMPLES.with_name("router_consistency_report.md")))


if __name__ == "__main__":
    main()
