"""`localmoe router calibrate`: fit the router to the user's own tiers on their own machine.

Every question of a calibration suite is answered, greedily, by the small and by the large tier as settings.toml
names them (through the benchmark runner: same chat path, energy metered, each answer graded by `bench.scoring`
and committed on its own, so an interrupted calibration resumes). From those outcomes — the real correctness of
both tiers, never an assumed-right large tier — every strategy is retrained (with the user's ratings, retries and
benchmark verdicts of the small model, and, when the small tier is the embedded model, the shipped labels of that
same model), the three preferences' thresholds are computed by `preferences.outcome_preferences` on the
calibration questions, and the router is written to `<data dir>/router.json`, which the router loads before the
shipped one. The file records the tiers it was made with, so `route`/`ask` can offer a new calibration when
settings name others (`router.tiers_notice`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from localmoe.bench import runner, suites
from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import models, paths, settings
from localmoe.record.recorder import Recorder
from localmoe.routing import preferences
from localmoe.routing import train as router_train
from localmoe.routing.probe import Prober
from localmoe.routing.router import ROUTER_FILE, Router, TokenEmbedder

DEFAULT_SUITE = "router-train"  # 1331 questions over 29 kinds, interleaved so that --limit N spans them
DEFAULT_LIMIT = 300  # of the default suite: a few hundred, so two tiers answer them in minutes, not hours
RECOMMENDED = 100  # fewer questions than this give rough thresholds: said, not refused
MAX_TOKENS = 128  # as `bench`: enough for every suite answer, greedy
SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Tiers:
    small: models.ModelRef
    large: models.ModelRef
    small_spec: str | None  # what settings.toml says (None: the default)
    large_spec: str | None

    def record(self) -> dict[str, Any]:
        """What the router file keeps of the tiers (compared by `router.tiers_notice`)."""
        return {"small": self.small_spec, "large": self.large_spec, "small_id": self.small.id,
                "large_id": self.large.id, "small_path": str(self.small.path), "large_path": str(self.large.path)}


def resolve_tiers(st: settings.Settings | None = None) -> Tiers:
    """The small and large tiers as `ask` resolves them; no large tier is a UsageError (one line, exit 2)."""
    st = st or settings.load()
    try:
        small = models.resolve(st.small) if st.small else models.default_model()
    except LocalmoeError as exc:
        raise UsageError(f"the small tier cannot be used: {exc}") from None
    try:
        large = models.resolve(st.large) if st.large else models.tier_model("large")
    except LocalmoeError as exc:
        if st.large:
            raise UsageError(f"the large tier ({st.large}) cannot be used: {exc}") from None
        raise UsageError(f"calibration needs a large tier and none is installed: {models.large_tier_hint()}") from None
    if small.path == large.path:
        raise UsageError(f"the small and large tiers are the same model ({small.id}): calibration compares two")
    return Tiers(small, large, st.small, st.large)


def _key(ref: models.ModelRef) -> str:
    """How the runner names the model (it resolves this again on --resume): the id when it resolves to this file."""
    try:
        if models.resolve(ref.id).path == ref.path:
            return ref.id
    except LocalmoeError:
        pass
    return str(ref.path)


def interleaved(items: list[suites.Item]) -> list[suites.Item]:
    """Categories take turns (in order of first appearance), so the first N questions span every kind."""
    columns: dict[str, list[suites.Item]] = {}
    for item in items:
        columns.setdefault(item.category, []).append(item)
    out: list[suites.Item] = []
    for i in range(max((len(c) for c in columns.values()), default=0)):
        out += [c[i] for c in columns.values() if i < len(c)]
    return out


def suite_source(name: str) -> tuple[str, int, list[str]]:
    """What the runner loads: a built-in suite is written, interleaved, to `<data dir>/calibration/NAME.jsonl` (the
    run names that file, so --resume asks the same questions); a file is used as it is. Returns (source, size,
    problems found while loading)."""
    loaded = suites.load_suite(name)
    if loaded.source != "builtin":
        return (name if name.startswith("hf:") else str(Path(name).expanduser().resolve()), len(loaded.items),
                loaded.errors)
    folder = paths.data_dir() / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{loaded.name}.jsonl"
    text = "".join(json.dumps(item.to_dict()) + "\n" for item in interleaved(loaded.items))
    try:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LocalmoeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path), len(loaded.items), []


def run(rec: Recorder, *, suite: str | None = None, limit: int | None = None, resume: bool = False,
        max_tokens: int = MAX_TOKENS, progress: Callable[[int, int, str], None] | None = None,
        on_start: Callable[[int, int, Tiers], None] | None = None, meter: Any = None,
        router_out: Path | None = None) -> dict[str, Any]:
    """Answer the suite on both tiers (or finish the interrupted calibration), retrain, write the router.
    `progress(done, total, tier)` after each answer; `on_start(run_id, questions, tiers)` once the run exists.
    Returns the summary `router calibrate --json` prints."""
    tiers, keys, ids = _current_tiers()
    if resume:
        if suite is not None or limit is not None:
            raise UsageError("--resume continues the interrupted calibration with its own suite and limit")
        row = rec.latest_calibration_run()
        if row is None:
            raise UsageError("there is no calibration to resume: run `localmoe router calibrate`")
        if row["status"] == "complete" and _router_written_since(router_out or paths.data_dir() / ROUTER_FILE, row):
            raise UsageError(f"calibration run {row['id']} is complete: nothing to resume "
                             "(`localmoe router calibrate` starts a new one)")
        if row["models"] != keys:
            raise UsageError(f"the tiers changed since calibration run {row['id']} started ({', '.join(row['models'])}"
                             f" then, {', '.join(keys)} now): start a new one without --resume")
        if row["status"] == "complete":  # every answer is in, but it stopped before its router was written
            return finish(rec, row["id"], tiers, ids, router_out=router_out, progress=progress)
        run_kwargs: dict[str, Any] = {"resume": row["id"]}
    else:
        source, size, errors = suite_source(suite or DEFAULT_SUITE)
        if suite is None and limit is None:
            limit = DEFAULT_LIMIT
        run_kwargs = {"suite": source, "model_names": keys, "policies": ["direct"], "limit": limit}
    started: dict[str, int] = {}

    def begin(run_id: int, loaded: suites.Suite) -> None:
        started["run"] = run_id
        if not resume:
            rec.mark_calibration_run(run_id)
        if on_start:
            on_start(run_id, len(loaded.items), tiers)

    def tick(done: int, total: int, label: str) -> None:
        if progress:
            progress(done, total, "small" if label.split("/")[0] == ids[0] else "large")

    run_id = runner.run(rec, max_tokens=max_tokens, meter=meter, progress=tick, on_start=begin, **run_kwargs)
    return finish(rec, run_id, tiers, ids, router_out=router_out, progress=progress)


def _router_written_since(path: Path, run: dict[str, Any]) -> bool:
    """Whether a router file was written once `run` had finished: its own, or one the user chose after it (`router
    train --shipped`), which a resume must not replace. False when the run stopped before writing its router."""
    if calibration_of(path) == run["id"]:
        return True
    try:
        finished = datetime.fromisoformat(run["finished_at"]).timestamp() if run.get("finished_at") else None
        return finished is not None and path.stat().st_mtime >= finished
    except (OSError, ValueError, TypeError):
        return False


def calibration_of(path: Path) -> int | None:
    """The calibration run a router file was fitted on, or None (shipped, `router train`, or unreadable)."""
    try:
        run_id = json.loads(path.read_text(encoding="utf-8")).get("calibration", {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, int) else None


def retrain(rec: Recorder, run_id: int, router_out: Path | None = None) -> dict[str, Any]:
    """`router train` over a calibrated router: retrain on that calibration's recorded outcomes plus the user's
    latest signals, so new ratings count and the calibration (thresholds, tiers) is kept, not overwritten by a
    router that knows nothing of these tiers. Refused when settings now name other tiers."""
    tiers, keys, ids = _current_tiers()
    row = rec.bench_run(run_id)
    if row is None:
        raise UsageError(f"the router was calibrated on run {run_id}, which is no longer recorded: run "
                         "`localmoe router calibrate` again, or `router train --shipped` to drop the calibration")
    if row["models"] != keys:
        raise UsageError(f"the router was calibrated on other tiers ({', '.join(row['models'])}; now "
                         f"{', '.join(keys)}): run `localmoe router calibrate`, or `router train --shipped` to drop "
                         "the calibration")
    return finish(rec, run_id, tiers, ids, router_out=router_out)


def _current_tiers() -> tuple[Tiers, list[str], list[str]]:
    """The tiers settings name now: as resolved, as a calibration run records them, and their model ids."""
    tiers = resolve_tiers()
    keys = [_key(tiers.small), _key(tiers.large)]
    return tiers, keys, [models.resolve(k).id for k in keys]


def outcomes(rec: Recorder, run_id: int, small_id: str, large_id: str) -> list[dict[str, Any]]:
    """Per question answered by both tiers: question, category, small/large correctness, joules, tokens and the
    small answer's log-probabilities."""
    by_item: dict[str, dict[str, Any]] = {}
    for r in rec.calibration_items(run_id):
        tier = "small" if r["model"] == small_id else "large" if r["model"] == large_id else None
        if tier is None:
            continue
        o = by_item.setdefault(r["item_id"], {"item_id": r["item_id"], "question": r["question"],
                                              "category": r["category"] or ""})
        o[f"{tier}_correct"] = int(r["correct"])
        o[f"{tier}_joules"] = float(r["joules"] or 0.0)
        o[f"{tier}_tokens"] = r["completion_tokens"]
        if tier == "small":
            o["mean_logprob"], o["min_logprob"] = r["mean_logprob"], r["min_logprob"]
    return [o for o in by_item.values() if "small_correct" in o and "large_correct" in o]


def training_rows(rec: Recorder, done: list[dict[str, Any]], small: models.ModelRef) -> tuple[list[dict[str, Any]],
                                                                                          dict[str, int]]:
    """The calibration outcomes, then (each question once, the calibration's verdict first) the user's signals and
    benchmark verdicts of the small tier, and the shipped labels when the small tier is the model they were made
    with (the embedded one). Returns the rows and how many came from each source."""
    rows = [{"question": o["question"], "small_wrong": 1 - o["small_correct"],
             "large_correct": float(o["large_correct"]), "category": o["category"],
             "mean_logprob": o["mean_logprob"], "min_logprob": o["min_logprob"],
             "source": "calibration"} for o in done]
    extra = router_train.collected_labels(rec, small.id)
    if any(ref.id == small.id and ref.path == small.path for ref in models.embedded_models()):
        extra += router_train.shipped_labels()
    seen = {r["question"] for r in rows}
    for r in extra:
        if r["question"] not in seen:
            seen.add(r["question"])
            rows.append(r)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    return rows, counts


def strategy_scores(router: Router, done: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Each strategy's score for each calibration question, as the written router gives it: `features` and
    `learned` before answering, `cascade` from the small answer's log-probabilities and the probe's reading of the
    question (what it escalates on)."""
    out = {name: np.array([router.score(o["question"], name)[0] for o in done]) for name in ("features", "learned")}
    if "probe" in (router.trained or {}):
        # a question too long for the probe is routed by learned: so it is scored here
        out["probe"] = np.array([router.routed_score(o["question"], "probe") for o in done])
    if router.trained is not None and all(o["mean_logprob"] is not None and o["min_logprob"] is not None
                                          for o in done):
        out["cascade"] = np.array([router.cascade_score(o["mean_logprob"], o["min_logprob"], o["question"])
                                   for o in done])
    return out


def at_share(points: list[dict[str, float]], share: float) -> dict[str, float]:
    """The operating point with the largest large share not above `share` (a threshold that exists)."""
    below = [p for p in points if p["large_share"] <= share + 1e-9]
    return max(below, key=lambda p: p["large_share"]) if below else points[0]


def finish(rec: Recorder, run_id: int, tiers: Tiers, ids: list[str], *, router_out: Path | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Retrain on the run's outcomes, set the preferences from them, write the router; the summary. The small
    tier first reads every question that lacks the probe's signals (`progress(done, total, "probe")`)."""
    done = outcomes(rec, run_id, *ids)
    if not done:
        raise LocalmoeError(f"calibration run {run_id} has no question answered by both tiers")
    rows, counts = training_rows(rec, done, tiers.small)
    prober = Prober(tiers.small.path)
    router_train.fill_probe(rows, prober, progress=(lambda n, total: progress(n, total, "probe")) if progress
                            else None)
    try:
        trained = router_train.train(rows, TokenEmbedder(tiers.small.path))
    except LocalmoeError as exc:
        raise LocalmoeError(f"{exc}; calibrate on more questions (a larger --limit, or none)") from None
    out = router_out or paths.data_dir() / ROUTER_FILE
    _write(out, trained)  # written first so that the scores below are the loaded router's own
    router = Router(router_file=out, small_model_path=tiers.small.path, tiers=(tiers.small_spec, tiers.large_spec),
                    prober=prober)
    scores = strategy_scores(router, done)
    small_ok = np.array([o["small_correct"] for o in done], dtype=np.float64)
    large_ok = np.array([o["large_correct"] for o in done], dtype=np.float64)
    small_j = np.array([o["small_joules"] for o in done], dtype=np.float64)
    large_j = np.array([o["large_joules"] for o in done], dtype=np.float64)
    # the cascade answers small first: an escalated question costs both answers
    prefs = {name: preferences.outcome_preferences(s, small_ok, large_ok, small_j, large_j, name == "cascade")
             for name, s in scores.items()}
    curves = {name: preferences.operating_points(s, small_ok, large_ok, small_j, large_j, name == "cascade")
              for name, s in scores.items()}
    bench_row = rec.bench_run(run_id) or {}
    summary = {
        "run_id": run_id, "suite": bench_row.get("suite"), "n": len(done),
        "tiers": tiers.record(), "meter": bench_row.get("meter"), "measured": bool(bench_row.get("measured")),
        "small_accuracy": float(small_ok.mean()), "large_accuracy": float(large_ok.mean()),
        "small_joules": float(small_j.mean()), "large_joules": float(large_j.mean()),
        "item_ids": [o["item_id"] for o in done],
        "scores": {name: s.tolist() for name, s in scores.items()},
        "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    trained["outcome_preferences"] = prefs
    trained["tiers"] = tiers.record()
    trained["calibration"] = summary
    _write(out, trained)
    return {**{k: v for k, v in summary.items() if k not in ("item_ids", "scores")},
            "router": str(out), "default_strategy": trained["default_strategy"], "training_labels": counts,
            "heldout_auc": trained["evaluation"]["auc"], "preferences": prefs, "curves": curves}


def _write(path: Path, trained: dict[str, Any]) -> None:
    try:
        paths.write_private(path, json.dumps(trained, indent=1))
    except OSError as exc:
        raise LocalmoeError(f"cannot write {path}: {exc.strerror or exc}") from None


def curve_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The text table: per large share, each strategy's accuracy and joules per question there."""
    names = list(result["curves"])
    rows = []
    for share in SHARES:
        row = [f"{share:.0%}"]
        for name in names:
            p = at_share(result["curves"][name], share)
            row.append(f"{p['accuracy']:.0%} · {p['joules']:.3g} J ({p['large_share']:.0%})")
        rows.append(row)
    return ["LARGE SHARE ≤", *[n.upper() for n in names]], rows
