"""The small model reads the question before the router decides (the `probe` strategy's signals).

One prompt evaluation of the question in the small model's chat template, no decoding, gives three numbers:
- the entropy of the first answer token's distribution (a model that does not know how to start is often wrong);
- that distribution's top probability;
- the mean log-probability of the prompt's own tokens (how unfamiliar the question reads to the model).

A model that answers a question confidently is not always right, but one that is unsure where to begin usually
is not: on questions written apart from the training suite these three signals rank the small model's failures
about as well as everything the text-only strategies see, and differently, so the two add up (the figures are in
`benchmarks/RESULTS.md`). The cost is the prompt evaluation itself, about as long as the prefill of the answer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from localmoe.errors import LocalmoeError

SIGNALS = ("first_token_entropy", "first_token_top_p", "prompt_mean_logprob")
PROBE_CTX = 512  # questions whose templated prompt is longer are routed without the probe
_MEMO = 1024  # signals kept per prober: calibration and `bench router` score each question more than once


def signals_from_logits(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """The three signals from the logits at every prompt position (row i predicts token i + 1)."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    first = np.exp(logp[-1])
    entropy = float(-(first * logp[-1]).sum())
    if len(tokens) > 1:
        mean_lp = float(logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])].mean())
    else:
        mean_lp = 0.0
    return np.array([entropy, float(first.max()), mean_lp])


class Prober:
    """The small GGUF model loaded a second time, small context, logits at every position. Loaded on first use;
    a model that is not a GGUF llama.cpp can read fails there with a LocalmoeError the router reports once."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        self._engine: Any = None
        self._memo: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._lock = threading.RLock()
        self._failed: LocalmoeError | None = None  # a model that cannot load is not tried again on every question
        self._known: dict[str, np.ndarray] = {}  # signals read earlier by this model (a label file's), kept whole

    def load(self) -> Any:
        """The probe's engine, loaded on first use (callers that can wait early call it ahead of a question)."""
        with self._lock:
            if self._failed is not None:
                raise LocalmoeError(str(self._failed))
            if self._engine is None:
                from localmoe.engine.llamacpp import LlamaCppEngine
                from localmoe.home.models import system_prompt

                try:
                    # the question as the answering session renders it: the same system message
                    engine = LlamaCppEngine(self.model_path, n_ctx=PROBE_CTX, logits_all=True,
                                            system_prompt=system_prompt(self.model_path))
                    engine.load()
                except LocalmoeError as exc:
                    self._failed = exc
                    raise
                self._engine = engine
            return self._engine

    def signals(self, question: str) -> np.ndarray | None:
        """The question's signals, or None when its prompt does not fit the probe's context."""
        with self._lock:
            if question in self._known:
                return self._known[question]
            if question in self._memo:
                self._memo.move_to_end(question)
                return self._memo[question]
            engine = self.load()
            tokens = engine.prompt_tokens([{"role": "user", "content": question}])
            out = None if len(tokens) > engine.n_ctx else signals_from_logits(engine.prompt_logits(tokens), tokens)
            self._memo[question] = out
            if len(self._memo) > _MEMO:
                self._memo.popitem(last=False)
            return out

    def remember(self, question: str, signals: np.ndarray) -> None:
        """Signals this model gave `question` before (a label file stores them): used instead of reading it again,
        so an evaluation scores exactly what training saw, without a prompt evaluation per question."""
        with self._lock:
            self._known[question] = np.asarray(signals, dtype=np.float64)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
