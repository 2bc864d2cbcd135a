"""The torch engine's sampler: llama.cpp's repeat penalty and min-p, worked by hand on small logit vectors."""

from __future__ import annotations

import torch

from localmoe.engine import GenerationConfig
from localmoe.engine.torch_moe.sampling import Sampler


def test_repeat_penalty_shrinks_positive_and_deepens_negative_logits_of_recent_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0, -1.05, 0.5])
    greedy = Sampler(GenerationConfig(temperature=0.0, repeat_penalty=1.1))
    assert greedy.sample(logits) == 0  # nothing recent: unchanged
    assert greedy.sample(logits, [0]) == 1  # 2.0 / 1.1 = 1.82 < 1.9
    assert Sampler(GenerationConfig(temperature=0.0, repeat_penalty=5.0)).sample(logits, [0, 1]) == 4  # 0.4, 0.38
    # negative logits move down: -1.0 * 1.1 = -1.1 falls below -1.05
    only_neg = torch.tensor([-1.0, -1.05])
    assert greedy.sample(only_neg, [0]) == 1
    assert Sampler(GenerationConfig(temperature=0.0, repeat_penalty=1.0)).sample(logits, [0]) == 0
    assert torch.equal(logits, torch.tensor([2.0, 1.9, -1.0, -1.05, 0.5]))  # the caller's logits are not changed


def test_only_the_last_64_tokens_are_penalised():
    logits = torch.tensor([2.0, 1.9, -5.0])
    greedy = Sampler(GenerationConfig(temperature=0.0, repeat_penalty=1.5))
    assert greedy.sample(logits, [0] + [2] * 64) == 0  # token 0 is 65 tokens back
    assert greedy.sample(logits, [0] + [2] * 63) == 1  # 2.0 / 1.5 < 1.9


def test_min_p_keeps_only_tokens_close_to_the_best():
    # probabilities 0.5, 0.3, 0.2 (as logits): min_p 0.5 keeps tokens with p >= 0.25
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    s = Sampler(GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=0))
    draws = {s.sample(logits) for _ in range(300)}
    assert draws == {0, 1}
    s = Sampler(GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    assert {s.sample(logits) for _ in range(300)} == {0, 1, 2}
