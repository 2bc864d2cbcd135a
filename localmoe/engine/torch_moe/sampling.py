"""Choosing the next token from the logits as llama.cpp does, so both engines answer alike for the same settings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from localmoe.engine.base import REPEAT_LAST_N, GenerationConfig


class Sampler:
    """llama.cpp's order: the repeat penalty over the last REPEAT_LAST_N tokens, then greedy at temperature 0;
    otherwise top-k, top-p (on the untempered distribution), min-p, temperature, and a draw from a generator seeded
    with `seed` (random when None)."""

    def __init__(self, config: GenerationConfig) -> None:
        self.temperature, self.top_k, self.top_p = config.temperature, config.top_k, config.top_p
        self.min_p, self.repeat_penalty = config.min_p, config.repeat_penalty
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def sample(self, logits: Tensor, recent: Sequence[int] = ()) -> int:
        """The next token; `recent`: the answer's tokens so far, of which the last REPEAT_LAST_N are penalised."""
        if self.repeat_penalty != 1.0 and recent:
            logits = logits.float().clone()
            seen = torch.tensor(sorted(set(recent[-REPEAT_LAST_N:])), dtype=torch.long)
            chosen = logits[seen]
            # llama.cpp's classic penalty: shrink positive logits, push negative ones further down
            logits[seen] = torch.where(chosen > 0, chosen / self.repeat_penalty, chosen * self.repeat_penalty)
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits.float()
        if 0 < self.top_k < logits.numel():
            values, idx = torch.topk(logits, self.top_k)  # sorted, descending
        else:
            values, idx = torch.sort(logits, descending=True)
        if 0 < self.top_p < 1:
            probs = values.softmax(-1)
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            keep = int((probs.cumsum(-1) < self.top_p).sum()) + 1
            values, idx = values[:keep], idx[:keep]
        if self.min_p > 0:
            # values are sorted: keep those at least min_p times as likely as the first (at least one)
            keep = int((values >= values[0] + math.log(self.min_p)).sum())
            values, idx = values[:keep], idx[:keep]
        probs = (values / self.temperature).softmax(-1)
        return int(idx[torch.multinomial(probs, 1, generator=self.generator)])
