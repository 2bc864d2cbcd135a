"""The llama.cpp engine on the real embedded model."""

from __future__ import annotations

import threading

import pytest

from localmoe import chat_template
from localmoe.engine import GenerationConfig
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.errors import LocalmoeError

GREEDY = GenerationConfig(max_tokens=48, temperature=0.0)
STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module")
def engine(smollm):
    e = LlamaCppEngine(smollm.path, model_id=smollm.id, n_ctx=2048)
    e.load()
    yield e
    e.close()


def test_streams_an_answer_with_stats(engine):
    pieces = list(engine.stream([{"role": "user", "content": "Which city is the capital of Japan?"}], GREEDY))
    text = "".join(pieces)
    assert "Tokyo" in text
    assert len(pieces) > 1  # streamed, not returned in one block
    s = engine.stats
    assert s.prompt_tokens > 10 and 0 < s.completion_tokens <= 48
    assert s.ttft_s is not None and 0 < s.ttft_s < s.wall_s
    assert s.tokens_per_s and s.tokens_per_s > 1
    assert s.stop_reason in ("stop", "length")


def test_uses_the_models_own_template(engine):
    tokens = engine.prompt_tokens([{"role": "user", "content": "hi"}])
    text = engine._llm.detokenize(tokens, special=True).decode()
    # SmolLM2's template injects its default system prompt when none is given
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


def test_cancel_stops_decoding_at_once(engine):
    cancel = threading.Event()
    pieces = []
    for piece in engine.stream(STORY, GenerationConfig(max_tokens=400, temperature=0.0), cancel):
        pieces.append(piece)
        if len(pieces) == 5:
            cancel.set()
    s = engine.stats
    assert s.stop_reason == "cancelled"
    assert len(pieces) == 5
    assert 5 <= s.completion_tokens <= 6
    # What llama.cpp actually computed: the prompt plus every handed-out token but the last (sampled, never fed
    # back). One more decode step after the stop would show here.
    assert engine._llm.n_tokens == s.prompt_tokens + s.completion_tokens - 1


def test_model_stays_loaded_between_questions(engine):
    llm = engine._llm
    list(engine.stream([{"role": "user", "content": "Say hi."}], GREEDY))
    engine.load()
    list(engine.stream([{"role": "user", "content": "Say bye."}], GREEDY))
    assert engine._llm is llm


def test_length_limit(engine):
    list(engine.stream(STORY, GenerationConfig(max_tokens=7, temperature=0.0)))
    assert engine.stats.completion_tokens == 7 and engine.stats.stop_reason == "length"


def test_prompt_longer_than_context(smollm):
    e = LlamaCppEngine(smollm.path, n_ctx=256)
    with pytest.raises(LocalmoeError, match="start a new conversation"):
        list(e.stream([{"role": "user", "content": "word " * 400}], GREEDY))
    e.close()


def test_template_sandbox_blocks_escapes():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LocalmoeError, match="chat template failed"):
        chat_template.render(evil, [{"role": "user", "content": "x"}])
    with pytest.raises(LocalmoeError, match="chat template failed"):
        chat_template.render("{{ raise_exception('no system role') }}", [])


def test_template_fallback_is_chatml():
    out = chat_template.render(None, [{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
