"""Which tier answers a question: a score (estimated probability that the small model would answer wrongly),
a threshold from the user's preference, and one human sentence saying why.

Strategies:
- `features`: cheap signals of the text (length, numbers and operators, multi-step wording, dates, units, code,
  constraints, letter counting, non-Latin script) through a logistic model.
- `learned`: a sentence embedding of the question (the mean of the small GGUF model's own token-embedding rows: no
  second model, no download, ~1 ms) ranked by its labelled neighbours (similarity-weighted share of the k nearest
  training questions the small model got wrong), stacked with the `features` estimate: a two-input logistic model
  over the log-odds of both, trained on labelled outcomes. The neighbours catch what the signals cannot (a single
  multiplication is easy, a single division is not; a capital city is easy, a multiple-choice question is not);
  the features estimate ranks questions with no close neighbour.
- `probe`: `learned`, plus what the small model itself makes of the question: one prompt evaluation (no
  decoding) gives the first answer token's entropy and top probability and the prompt's mean log-probability
  (`probe`); a logistic model over those three, trained on the same labels, adds its log-odds to `learned`'s. It
  costs about one prefill of the question on the small model (p50 0.25 s on 2 cores), so it is for answering paths,
  where that is small beside the answer; questions too long to probe are routed by `learned`.
- `cascade`: the small model answers first; the large tier answers again when the answer looks wrong. It judges
  the answer by its confidence (mean and lowest token log-probability) together with what the probe knew before
  answering (`learned`'s log-odds and the three signals of the question): one logistic model over the six
  (`cascade_probe` in the router file). Where the probe cannot read the question, the answer's confidence alone
  decides (`cascade`). It is never the default: an escalated question is answered twice.

The trained models live in `assets/router/router.json` (shipped, trained on the project's own suites with labels
from real runs of the embedded model) or in `<data dir>/router.json` after `localmoe router train`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import paths
from localmoe.home.settings import STRATEGIES
from localmoe.routing.evaluate import LogisticModel
from localmoe.routing.probe import SIGNALS, Prober

ROUTER_FILE = "router.json"
ROUTER_VERSION = 2  # 2: the learned strategy stacks the features estimate with the neighbours' share
MAX_ROUTE_TOKENS = 512  # the embedder reads the start of very long prompts only

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?")
_OPERATOR = re.compile(r"\d\s*[-+*/×÷^%]\s*\(?\s*\d|[×÷^]")
_STEPS = re.compile(r"\b(then|after|total|each|remaining|left|altogether|per|twice|times|percent|discount|"
                    r"how many|how much|more than|less than|if|after that|finally)\b", re.I)
_DATE = re.compile(r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday|january|february|march|april|"
                   r"may|june|july|august|september|october|november|december|days?|weeks?|date|weekday)\b", re.I)
_UNIT = re.compile(r"\b(km|kg|g|m|cm|mm|miles?|hours?|minutes?|seconds?|°?[cf]|celsius|fahrenheit|km/h|m/s|"
                   r"litres?|liters?|grams?|metres?|meters?)\b", re.I)
_CODE = re.compile(r"```|\bdef |\bfunction\b|\bclass \w+|[{};]\s*$|\b(python|javascript|regex|sql|code|bug|"
                   r"compile|stack trace)\b", re.I | re.M)
_CONSTRAINT = re.compile(r"\b(exactly|at least|at most|must|without|only|no more than|in \d+ words|step by step|"
                         r"explain|prove|why)\b", re.I)
_LETTERS = re.compile(r"\b(letters?|spell|characters?|how many times)\b", re.I)
# "What is the …", "Which city is …", "Who wrote …": one-hop lookups a small model often knows
_FACT = re.compile(r"^\s*(what|who|which|where|when)(\s+\w+)?\s+(is|was|are|were|did|does|wrote|invented)\b"
                   r"(?!\s*[-+\d(])", re.I)

FEATURE_NAMES = ["log_chars", "numbers", "big_numbers", "operators", "multi_step", "dates", "units", "code",
                 "constraints", "letters", "non_latin", "fact_question"]
# How each signal reads in a reason sentence.
_SIGNAL_TEXT = {
    "log_chars": "a long question", "numbers": "{n} numbers", "big_numbers": "large numbers",
    "operators": "arithmetic", "multi_step": "multi-step wording", "dates": "date reasoning",
    "units": "unit conversion", "code": "code", "constraints": "explicit constraints",
    "letters": "letter counting", "non_latin": "non-Latin script", "fact_question": "a simple fact question",
    "similar": "similar questions",
}
# Hand-set weights for when no trained file is readable: every signal of work pushes towards the large tier.
_HAND_WEIGHTS = {"log_chars": 0.3, "numbers": 0.4, "big_numbers": 0.5, "operators": 1.2, "multi_step": 0.6,
                 "dates": 0.8, "units": 0.6, "code": 1.0, "constraints": 0.4, "letters": 1.0, "non_latin": 0.5,
                 "fact_question": -1.0}
_HAND_BIAS = -2.0


def features(prompt: str) -> dict[str, float]:
    numbers = _NUMBER.findall(prompt)
    letters = sum(ch.isalpha() for ch in prompt) or 1
    return {
        "log_chars": math.log1p(len(prompt)),
        "numbers": float(len(numbers)),
        "big_numbers": float(sum(len(re.sub(r"\D", "", n)) >= 3 for n in numbers)),
        "operators": float(len(_OPERATOR.findall(prompt))),
        "multi_step": float(len(_STEPS.findall(prompt))),
        "dates": float(len(_DATE.findall(prompt))),
        "units": float(len(_UNIT.findall(prompt))),
        "code": float(len(_CODE.findall(prompt))),
        "constraints": float(len(_CONSTRAINT.findall(prompt))),
        "letters": float(len(_LETTERS.findall(prompt))),
        "non_latin": sum(ch.isalpha() and ord(ch) > 0x24F for ch in prompt) / letters,
        "fact_question": float(bool(_FACT.match(prompt))),
    }


def feature_vector(prompt: str) -> np.ndarray:
    f = features(prompt)
    return np.array([f[k] for k in FEATURE_NAMES], dtype=np.float64)


@dataclass
class Decision:
    tier: str  # small | large
    model: str | None
    strategy: str
    score: float
    threshold: float
    reason: str
    latency_ms: float
    # what the user should be told with this decision (a missing tier, an unreadable router file), each part
    # apart, so a caller that has already said one (the assistant tells the router's at load) can leave it out
    notices: list[str] = field(default_factory=list)
    escalated: bool = False
    wanted: str | None = None  # the tier the router chose, when another one had to answer
    # set when the router wanted a larger tier that could not answer: the answer is probably wrong, and why
    warning: str | None = None
    signals: dict[str, float] = field(default_factory=dict)
    # the decision's own energy (the probe's prompt evaluation is most of it), by the small tier's meter
    joules: float | None = None
    energy_s: float | None = None  # the interval those joules were measured over

    @property
    def notice(self) -> str | None:
        """The notices as one line, as the JSON outputs and the routing log carry them."""
        return "; ".join(self.notices) or None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notice"] = self.notice
        del d["notices"]
        d["probably_wrong"] = self.warning is not None
        d["signals"] = {k: round(v, 3) for k, v in self.signals.items()}
        return d


class TokenEmbedder:
    """Sentence vectors from the small GGUF model's token-embedding matrix: tokenise (vocabulary only), dequantise
    the rows of the prompt's tokens, average, normalise. The rows are memory-mapped, not loaded. The tables come
    from `vocab`'s cache; llama.cpp is loaded only for text or a vocabulary the cached tokenizer does not cover."""

    def __init__(self, model_path: str | Path, cache_dir: Path | None = None) -> None:
        from localmoe.routing import vocab

        self.model_path = str(model_path)
        if cache_dir is None:
            try:
                cache_dir = paths.data_dir() / "cache"
            except LocalmoeError:
                cache_dir = None  # no writable data dir: the tables are read from the model each time
        try:
            tables = vocab.load(model_path, cache_dir)
        except (OSError, ValueError) as exc:
            raise LocalmoeError(f"{Path(model_path).name} cannot be read for routing ({exc})") from None
        info = tables["embedding"]
        if info is None:
            raise LocalmoeError(f"{Path(model_path).name} has no token embedding matrix to embed questions with")
        self.dim, n_vocab, self.qtype = info["dim"], info["vocab"], info["type"]
        self.rows = np.memmap(model_path, dtype=np.uint8, mode="r", offset=info["offset"],
                              shape=(n_vocab, info["n_bytes"] // n_vocab))
        self.bpe = vocab.BPE(tables["tokens"], tables["merges"]) if tables["fast"] else None

    @cached_property
    def vocab(self) -> Any:
        """llama.cpp's tokenizer (vocabulary only), for what the cached one does not cover."""
        from llama_cpp import Llama

        from localmoe.engine.llama_hooks import patched_defaults

        with patched_defaults():  # keeps llama.cpp's load log off the terminal
            return Llama(self.model_path, vocab_only=True, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        ids = self.bpe.tokenize(text) if self.bpe is not None else None
        if ids is None:
            ids = self.vocab.tokenize(text.encode("utf-8", errors="replace"), add_bos=False)
        return ids

    def embed(self, text: str) -> np.ndarray:
        ids = self.tokenize(text)[:MAX_ROUTE_TOKENS]
        if not ids:
            return np.zeros(self.dim)
        vec = dequantize(self.rows[ids], self.qtype).astype(np.float64).mean(axis=0)
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec


def dequantize(rows: np.ndarray, qtype: int) -> np.ndarray:
    """Rows of a GGUF matrix as float32, for the types small models ship in with gguf's own arithmetic (so the
    values are bit-identical), and through gguf (a ~40 ms import) for the others."""
    n = rows.shape[0]
    if qtype == 0:  # F32
        return rows.view(np.float32)
    if qtype == 1:  # F16
        return rows.view(np.float16).astype(np.float32)
    if qtype in (2, 3, 8):  # Q4_0, Q4_1, Q8_0: blocks of 32 weights
        size = {2: 18, 3: 20, 8: 34}[qtype]
        blocks = np.ascontiguousarray(rows).reshape(-1, size)
        nb = blocks.shape[0]
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        if qtype == 8:
            return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(n, -1)
        qs = blocks[:, 4 if qtype == 3 else 2:]
        qs = qs.reshape((nb, -1, 1, 16)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 1, 2, 1))
        if qtype == 2:
            q = (qs & np.uint8(0x0F)).reshape((nb, -1)).astype(np.int8) - np.int8(8)
            return (d * q.astype(np.float32)).reshape(n, -1)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return ((d * (qs & np.uint8(0x0F)).reshape((nb, -1)).astype(np.float32)) + m).reshape(n, -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(rows, GGMLQuantizationType(qtype))


NEIGHBOUR_SHARPNESS = 10.0  # softmax temperature over cosine similarities of the nearest labelled questions


def neighbour_scores(queries: np.ndarray, refs: np.ndarray, labels: np.ndarray, k: int,
                     exclude: np.ndarray | None = None, ref_idx: np.ndarray | None = None,
                     sharpness: float = NEIGHBOUR_SHARPNESS) -> np.ndarray:
    """For each query vector: the similarity-weighted share of its k nearest labelled questions that the small
    model got wrong (weights exp(sharpness · cosine)). `exclude`/`ref_idx` leave a row out of its own neighbours
    (leave-one-out scores for training rows)."""
    sims = queries @ refs.T
    if exclude is not None and ref_idx is not None:
        sims[exclude[:, None] == ref_idx[None, :]] = -np.inf
    k = min(k, refs.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    w = np.exp(sharpness * (s - s.max(axis=1, keepdims=True)))
    return (w * labels[top]).sum(axis=1) / w.sum(axis=1)


LOGIT_CLIP = 1e-4  # a share of 0 or 1 (all k neighbours agree) becomes log-odds of ±9.2, not ±inf


def log_odds(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(q / (1 - q))


def combine_probe(p_learned: np.ndarray | float, p_probe: np.ndarray | float, prior: float) -> np.ndarray:
    """The probe strategy's estimate: learned's and the signals model's log-odds summed, the training base rate
    they both carry counted once."""
    z = log_odds(p_learned) + log_odds(p_probe) - log_odds(prior)
    return 1 / (1 + np.exp(-z))


CASCADE_INPUTS = ("learned", *SIGNALS, "answer_mean_logprob", "answer_min_logprob")


def cascade_inputs(p_learned: np.ndarray | float, signals: np.ndarray, mean_logprob: np.ndarray | float,
                   min_logprob: np.ndarray | float) -> np.ndarray:
    """The cascade's inputs after a small answer: learned's log-odds, the probe's signals of the question, and the
    answer's mean and lowest token log-probability."""
    return np.column_stack([np.atleast_1d(log_odds(p_learned)), np.atleast_2d(signals),
                            np.atleast_1d(mean_logprob), np.atleast_1d(min_logprob)])


def stack_inputs(p_features: np.ndarray | float, similar: np.ndarray | float) -> np.ndarray:
    """The learned strategy's inputs: the log-odds of the features estimate and of the neighbours' share."""
    return np.stack([log_odds(p_features), log_odds(similar)], axis=-1)


def centred(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    v = vectors - centre
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def encode_matrix(m: np.ndarray) -> dict[str, Any]:
    import base64

    return {"shape": list(m.shape), "float16_base64": base64.b64encode(m.astype("<f2").tobytes()).decode()}


def decode_matrix(d: dict[str, Any]) -> np.ndarray:
    import base64

    m = np.frombuffer(base64.b64decode(d["float16_base64"]), dtype="<f2").astype(np.float64)
    return m.reshape(d["shape"])


def _load_trained(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != ROUTER_VERSION or data.get("feature_names") != FEATURE_NAMES:
            raise ValueError("unknown version or feature set; `localmoe router train` rewrites it")
        for key in ("features", "learned", "cascade"):
            data[key] = LogisticModel.from_dict(data[key])
        if "probe" in data:  # routers trained before the probe strategy, or without its signals, have none
            try:
                data["probe"] = LogisticModel.from_dict(data["probe"])
                if data["probe"].weights.size != len(SIGNALS):
                    raise ValueError("it does not match its signals")
                prior = float(data.get("probe_prior", 0.5))
                if not 0 < prior < 1:  # NaN too
                    raise ValueError(f"its base rate {prior} is out of range")
            except (ValueError, KeyError, TypeError) as exc:
                # the other strategies are still good: only the probe is dropped, and said so when it is wanted
                del data["probe"]
                data["probe_error"] = f"the router file's probe model is unreadable ({exc})"
        if "cascade_probe" in data:
            try:
                if "probe" not in data:  # it is fitted beside the probe and reads the same signals
                    raise ValueError("no probe model beside it")
                data["cascade_probe"] = LogisticModel.from_dict(data["cascade_probe"])
                if data.get("cascade_inputs") != list(CASCADE_INPUTS):
                    raise ValueError("its inputs are not these")
                if data["cascade_probe"].weights.size != len(CASCADE_INPUTS):
                    raise ValueError("it does not match its inputs")
            except (ValueError, KeyError, TypeError):
                del data["cascade_probe"]  # the cascade then judges the answer by its confidence alone
        nb = data["neighbours"]
        nb["matrix"] = decode_matrix(nb["embeddings"])
        nb["y"] = np.array(nb["labels"], dtype=np.float64)
        nb["centre"] = np.array(nb["centre"], dtype=np.float64)
        if nb["matrix"].shape[0] != len(nb["y"]) or not np.isfinite(nb["matrix"]).all():
            raise ValueError("neighbour table does not match its labels")
        if nb["centre"].shape != (nb["matrix"].shape[1],) or int(nb["k"]) < 1 or not float(nb["sharpness"]) > 0:
            raise ValueError("neighbour settings are out of range")
        if data["learned"].weights.size != 2 or data["features"].weights.size != len(FEATURE_NAMES):
            raise ValueError("model sizes do not match the strategies")
        return data
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalmoeError(f"router file {path} is unreadable ({exc})") from None


def trained_path() -> Path:
    """The user's own router (`router calibrate` or `router train` writes it) if there is one, else the shipped
    default."""
    user = paths.data_dir() / ROUTER_FILE
    if user.exists():
        return user
    return Path(str(files("localmoe.assets").joinpath("router", ROUTER_FILE)))


DEFAULT_THRESHOLDS = {"quality": 0.35, "balanced": 0.5, "energy": 0.65}
CALIBRATE = "`localmoe router calibrate` fits it to them"


def _same_tier(configured: str | None, made: dict[str, Any], tier: str) -> bool:
    """Whether settings' value for `tier` (None: the default) names the model the router was calibrated with.
    Compared as text (an id or a path), so no model is resolved: a decision stays cheap."""
    spec, ident, path = made.get(tier), made.get(f"{tier}_id"), made.get(f"{tier}_path")
    if configured is None or spec is None:
        return configured == spec
    if configured in (spec, ident, path):
        return True
    try:
        return path is not None and str(Path(configured).expanduser().resolve()) == path
    except (OSError, RuntimeError):
        return False


def tiers_notice(trained: dict[str, Any] | None, small: str | None, large: str | None) -> str | None:
    """A one-line offer to calibrate when the tiers in settings (`[tiers] small/large`, None: the default) are not
    the ones the router was calibrated with; for a router never calibrated (the shipped one, `router train`), when
    a large tier is configured. None when nothing changed."""
    made = (trained or {}).get("tiers")
    if made is None:
        if large is None:
            return None
        return f"the router has not been calibrated with your large tier ({large}); {CALIBRATE}"
    changed = [f"{tier} {made.get(f'{tier}_id')} → {now or 'the default'}"
               for tier, now in (("small", small), ("large", large)) if not _same_tier(now, made, tier)]
    if not changed:
        return None
    return f"the tiers changed since the router was calibrated ({', '.join(changed)}); {CALIBRATE}"


class Router:
    def __init__(self, strategy: str | None = None, preference: str | float = "balanced",
                 small_model_path: str | Path | None = None, router_file: Path | None = None,
                 tiers: tuple[str | None, str | None] | None = None, prober: Prober | None = None,
                 offer: bool = True) -> None:
        """`tiers`: settings' (small, large), to offer calibration when they are not the router's; default: read
        from settings.toml (an unreadable one is the caller's to report). `offer=False`: no such offer (a tier
        named there does not exist: calibrating with it is no help). `prober`: the small model's probe, when the
        caller already has one (else made on the probe strategy's first decision)."""
        self.notices: list[str] = []
        self._told: set[str] = set()  # notices already carried by a decision: each is said once per router
        self.trained: dict[str, Any] | None = None
        try:
            self.trained = _load_trained(router_file or trained_path())
        except LocalmoeError as exc:
            self.notices.append(f"{exc}; routing with the built-in features strategy")
        if tiers is None:
            from localmoe.home import settings

            try:
                st = settings.load()
                tiers = (st.small, st.large)
            except LocalmoeError:
                tiers = (None, None)
        note = tiers_notice(self.trained, *tiers) if offer else None
        if note:
            self.notices.append(note)
        default = self.trained.get("default_strategy", "features") if self.trained else "features"
        self.chosen = strategy is not None  # named by the user (settings, --strategy), not the router file's default
        self.strategy = strategy or default
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown router strategy {self.strategy!r} ({', '.join(STRATEGIES)})")
        if self.trained is None and self.strategy != "features":
            self.strategy = "features"
        if self.strategy == "probe" and "probe" not in (self.trained or {}):
            why = (self.trained or {}).get("probe_error") or "the router file has no probe model"
            self.notices.append(f"{why} (`localmoe router train` fits one); routing with the learned strategy")
            self.strategy = "learned"
        self.preference = preference
        self.small_model_path = small_model_path
        if prober is not None:
            self.__dict__["prober"] = prober  # the cached_property's slot

    def threshold(self, strategy: str) -> float:
        if isinstance(self.preference, float):
            return self.preference
        return self.preferences(strategy)[self.preference]

    def preferences(self, strategy: str) -> dict[str, float]:
        """Each named preference's threshold for `strategy`: from recorded outcomes of both tiers when the router
        file has them (`preferences.outcome_preferences`), else its fixed table."""
        outcomes = (self.trained or {}).get("outcome_preferences", {}).get(strategy)
        if outcomes:
            return {name: float(outcomes[name]["threshold"]) for name in DEFAULT_THRESHOLDS}
        table = (self.trained or {}).get("thresholds", {}).get(strategy, DEFAULT_THRESHOLDS)
        return {name: float(table.get(name, default)) for name, default in DEFAULT_THRESHOLDS.items()}

    def preference_outcomes(self, strategy: str) -> dict[str, dict[str, float]] | None:
        """What each named preference buys for `strategy` on the recorded outcomes (large share, accuracy, joules per
        question), or None where the thresholds come from the fixed table (no large tier's outcomes recorded)."""
        outcomes = (self.trained or {}).get("outcome_preferences", {}).get(strategy)
        if not outcomes:
            return None
        return {name: {k: float(outcomes[name][k]) for k in ("large_share", "accuracy", "joules")}
                for name in DEFAULT_THRESHOLDS}

    def uses_probe(self, strategy: str | None = None, read: bool = True) -> bool:
        """Whether `strategy`'s decisions read the question on the small model: probe's, and the cascade's when the
        router file can judge an answer with the probe's signals and `read` (a larger tier could take over)."""
        strategy = strategy or self.strategy
        return strategy == "probe" or (strategy == "cascade" and read and "cascade_probe" in (self.trained or {}))

    def _small_path(self) -> str | Path:
        if self.small_model_path is None:
            from localmoe.home import models

            self.small_model_path = models.default_model().path
        return self.small_model_path

    @cached_property
    def embedder(self) -> TokenEmbedder:
        return TokenEmbedder(self._small_path())

    @cached_property
    def prober(self) -> Prober:
        return Prober(self._small_path())

    @property
    def told(self) -> list[str]:
        """Every notice a decision has carried so far."""
        return sorted(self._told)

    def close(self) -> None:
        if "prober" in self.__dict__:
            self.prober.close()

    def score(self, prompt: str, strategy: str | None = None) -> tuple[float, dict[str, float]]:
        """P(small tier answers wrongly) and each signal's pull towards the large tier (log-odds)."""
        strategy = strategy or self.strategy
        fv = feature_vector(prompt)
        if self.trained is None:
            w = np.array([_HAND_WEIGHTS[k] for k in FEATURE_NAMES])
            z = float(w @ fv + _HAND_BIAS)
            return 1 / (1 + math.exp(-z)), dict(zip(FEATURE_NAMES, w * fv, strict=True))
        fmodel: LogisticModel = self.trained["features"]
        p_features = float(fmodel.predict(fv))
        fpulls = dict(zip(FEATURE_NAMES, _contributions(fmodel, fv), strict=True))
        if strategy not in ("learned", "probe"):
            return p_features, fpulls
        model: LogisticModel = self.trained["learned"]
        nb = self.trained["neighbours"]
        query = centred(self.embedder.embed(prompt)[None, :], nb["centre"])
        similar = neighbour_scores(query, nb["matrix"], nb["y"], nb["k"], sharpness=nb["sharpness"])[0]
        x = stack_inputs(p_features, similar)
        # The features estimate enters as one input: each signal keeps its share of it, scaled by that input's weight.
        scale = float(model.weights[0] / model.std[0])
        pulls = {name: scale * pull for name, pull in fpulls.items()}
        pulls["similar"] = float(_contributions(model, x)[1])
        p_learned = float(model.predict(x))
        if strategy != "probe":
            return p_learned, pulls
        if "probe" not in self.trained:
            raise ProbeUnavailable("the router file has no probe model")
        try:
            signals = self.prober.signals(prompt)
        except LocalmoeError as exc:
            raise ProbeUnavailable(str(exc)) from None
        if signals is None:
            raise ProbeUnavailable("the question is too long for the small model to read first")
        probe: LogisticModel = self.trained["probe"]
        pulls["probe"] = float(_contributions(probe, signals).sum())
        p = combine_probe(p_learned, probe.predict(signals), float(self.trained.get("probe_prior", 0.5)))
        return float(p), pulls

    def routed_score(self, prompt: str, strategy: str) -> float:
        """`strategy`'s score as a decision would use it: a question too long for the probe gets learned's."""
        try:
            return self.score(prompt, strategy)[0]
        except ProbeUnavailable:
            return self.score(prompt, "learned")[0]

    def route(self, prompt: str, strategy: str | None = None, read: bool = True) -> Decision:
        """`strategy`: this decision's, instead of the router's. `read=False`: the cascade does not have the probe
        read the question (nothing larger could take over, so its answer would not be judged)."""
        if not prompt.strip():
            raise UsageError("the prompt is empty")
        t0 = time.perf_counter()
        strategy = strategy or self.strategy
        told = list(self.notices)
        # The cascade answers small first; its pre-answer score is recorded, and the probe's reading of the question
        # (memoised) is what it judges the answer with.
        chain = {"probe": ["probe", "learned", "features"], "learned": ["learned", "features"],
                 "cascade": ["features"]}.get(strategy, ["features"])
        if strategy == "cascade" and self.uses_probe(strategy, read):
            try:
                p, pulls = self.score(prompt, "probe")
                chain = []
            except LocalmoeError as exc:
                told = [*told, f"{exc}; the cascade judges the small answer by its confidence alone"]
        for i, candidate in enumerate(chain):  # empty when the cascade's probe already scored it
            try:
                p, pulls = self.score(prompt, candidate)
                break
            except LocalmoeError as exc:
                if i == len(chain) - 1:
                    raise
                if candidate == "probe" and not isinstance(exc, ProbeUnavailable):
                    chain[i + 1] = "features"  # learned's own part failed (its embedder): learned would too
                told = [*told, f"{exc}; routing with the {chain[i + 1]} strategy"]
                strategy = chain[i + 1]
        notices = [n for n in dict.fromkeys(told) if n not in self._told]
        self._told.update(told)
        threshold = self.threshold(strategy)
        if strategy == "cascade":
            tier = "small"
            by = "the probe" if not chain else "features"
            # `read` is False when nothing larger could take over: the small answer then stands
            reason = (f"cascade: the small model answers first and the large one takes over if its answer looks "
                      f"wrong (estimated {p:.0%} before answering, by {by})" if read else
                      f"cascade: the small model answers; no larger model is installed to take over (estimated "
                      f"{p:.0%} likely wrong before answering, by {by})")
        else:
            tier = "large" if p >= threshold else "small"
            reason = _reason(tier, p, threshold, pulls, features(prompt))
        return Decision(tier, None, strategy, p, threshold, reason, (time.perf_counter() - t0) * 1000, notices,
                        signals=pulls)

    def cascade_score(self, mean_logprob: float, min_logprob: float, prompt: str | None = None) -> float:
        """P(the small answer is wrong) from its confidence and, given the question and a router file with the
        stacked model, what the probe knew before answering (its signals are memoised from the decision)."""
        return self._cascade(mean_logprob, min_logprob, prompt)[0]

    def _cascade(self, mean_logprob: float, min_logprob: float, prompt: str | None) -> tuple[float, bool]:
        """(the cascade's score, whether the probe's reading of the question entered it)."""
        if self.trained is None:
            return 1 / (1 + math.exp(-(-4.0 * mean_logprob - 1.5))), False
        if prompt is not None and "cascade_probe" in self.trained:
            try:
                p_learned = self.score(prompt, "learned")[0]
                signals = self.prober.signals(prompt)
            except LocalmoeError:
                signals = None
            if signals is not None:
                x = cascade_inputs(p_learned, signals, mean_logprob, min_logprob)[0]
                return float(self.trained["cascade_probe"].predict(x)), True
        return float(self.trained["cascade"].predict(np.array([mean_logprob, min_logprob]))), False

    def cascade_escalates(self, mean_logprob: float | None, min_logprob: float | None,
                          prompt: str | None = None) -> tuple[bool, float, str]:
        """After a small-tier answer to `prompt`: escalate? Returns (escalate, P(wrong), reason)."""
        if mean_logprob is None or min_logprob is None:
            return False, 0.0, "no token probabilities to judge the small answer by"
        p, read = self._cascade(mean_logprob, min_logprob, prompt)
        threshold = self.threshold("cascade")
        seen = (f"token probabilities: mean {math.exp(mean_logprob):.2f}, lowest {math.exp(min_logprob):.2f}"
                + ("; with the probe's reading of the question" if read else ""))
        if p >= threshold:
            return True, p, (f"escalated: the small answer looks wrong (estimated {p:.0%} chance of a wrong "
                             f"answer ≥ {threshold:.0%}; {seen})")
        return False, p, f"kept the small answer ({p:.0%} risk < {threshold:.0%}; {seen})"


class ProbeUnavailable(LocalmoeError):
    """The probe's own part cannot score this question (no model, a small model it cannot load, too long): the
    decision falls back to learned."""


def _contributions(model: LogisticModel, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.weights) * (x - np.asarray(model.mean)) / np.asarray(model.std)


def _signal_text(name: str, tier: str, raw: dict[str, float]) -> str:
    if name == "log_chars":
        return "a long question" if tier == "large" else "a short question"
    if name == "similar":
        return "similar questions it got wrong" if tier == "large" else "similar questions it got right"
    if name == "probe":
        return "a hesitant start by the small model" if tier == "large" else "a confident start by the small model"
    return _SIGNAL_TEXT[name].format(n=int(raw.get(name, 0)))


def _reason(tier: str, p: float, threshold: float, pulls: dict[str, float], raw: dict[str, float]) -> str:
    toward = sorted(pulls.items(), key=lambda kv: -kv[1] if tier == "large" else kv[1])
    named = []
    for name, pull in toward:
        if (pull <= 0.05 if tier == "large" else pull >= -0.05) or len(named) == 2:
            break
        if name == "fact_question" and tier == "large":
            continue
        if name not in ("log_chars", "similar", "probe") and not raw.get(name):
            continue  # a signal the question lacks (no code, no dates) is no reason a reader would recognise
        named.append(_signal_text(name, tier, raw))
    why = " and ".join(named) if named else ("no sign of multi-step work" if tier == "small"
                                              else "its wording as a whole (no single sign)")
    cmp = "≥" if tier == "large" else "<"
    return f"{tier} model: {why} (estimated {p:.0%} chance the small model is wrong, {cmp} threshold {threshold:.0%})"
