"""What one short answer costs on the `ask` path: the small tier's answer budget, and the shared system-prompt prefix
a new conversation reuses from the engine's KV cache, on the real embedded model."""

from __future__ import annotations

import pytest

from localmoe.engine import GenerationConfig
from localmoe.engine.base import reusable_prefix
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.home import models
from localmoe.routing.budget import answer_budget

LETTERS_Q = 'How many times does the letter "q" appear in the word "queue"? Answer with a number only.'
CHOICE_Q = ("Which planet is largest?\n\nA) Mars\nB) Jupiter\nC) Venus\n\n"
            "Answer with the letter of the correct option only.")


@pytest.mark.parametrize(("prompt", "budget"), [
    ("What is 7 + 4? Answer with a number only.", 32),
    ("What is the capital of France? Answer with one word.", 32),
    ("What is the chemical symbol of helium? Answer with the symbol only.", 32),
    (LETTERS_Q, 32),  # "letter" here is no letter to write: the bare-value request decides
    (CHOICE_Q, 32),
    ("Is Paris in France? Answer yes or no.", 32),
    ("What is the capital of Japan?", 96),  # a short question, but no bare value asked for
    ("Explain why the sky is blue in one sentence.", 512),
    ("Write a Python function that returns only the code.", 512),
    ("Write a letter to my landlord about the heating.", 512),
])
def test_a_request_for_a_bare_value_gets_the_terse_budget_whatever_else_it_says(prompt, budget):
    assert answer_budget(prompt, 512) == budget
    assert answer_budget(prompt, 20) == 20  # never above the configured maximum


def test_the_terse_budget_ends_a_ramble_and_keeps_a_right_answer(home, smollm):
    from localmoe.bench import scoring, suites
    from localmoe.chat.assistant import Assistant

    a = Assistant(overrides={"seed": 1234})
    try:
        # not 9 × 9: with the catalog's system prompt the model works that one out at length at this seed
        right = a.ask("What is 10 × 10? Answer with a number only.").run()
        a.new_conversation()
        # SmolLM2 cannot do this one and talks on for a hundred tokens or more without the budget
        ramble = a.ask("Pipe A pours 6 liters of water per minute into a tank and pipe B pours 7 liters per minute. "
                       "The tank holds 221 liters and starts empty. How many minutes do both pipes together take "
                       "to fill it? Answer with a number only.").run()
    finally:
        a.close()
    assert right.decision.tier == ramble.decision.tier == "small"
    out = right.to_dict()
    assert out["sampling"]["max_tokens"] == 32 and out["stop_reason"] == "stop"
    item = suites.Item("t", "What is 10 × 10?", "100", "numeric", None, 1, "arithmetic")
    assert scoring.score(item, right.text).correct, right.text
    cut = ramble.to_dict()
    assert cut["stop_reason"] == "length" and cut["usage"]["completion_tokens"] == 32, cut


GREEDY = GenerationConfig(max_tokens=24, temperature=0.0, repeat_penalty=1.1, loop_guard=True)


def _ask(engine: LlamaCppEngine, question: str) -> tuple[str, int]:
    """The answer, and how many prompt tokens llama.cpp itself counted as evaluated for it (its perf counters: the
    engine's own statistic is what it expects llama-cpp-python to evaluate, this is what was)."""
    import llama_cpp

    ctx = engine._llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    text = "".join(engine.stream([{"role": "user", "content": question}], GREEDY))
    return text, llama_cpp.llama_perf_context(ctx).n_p_eval


def test_a_new_conversation_reuses_the_system_prompt_and_answers_as_a_fresh_engine(smollm):
    q1, q2 = "What is the capital of Japan?", "Name a colour of the rainbow."
    own = models.system_prompt(smollm.path)  # the system prompt the product renders for this model
    engine = LlamaCppEngine(smollm.path, model_id=smollm.id, n_ctx=512, system_prompt=own)
    fresh = LlamaCppEngine(smollm.path, model_id=smollm.id, n_ctx=512, system_prompt=own)
    engine.load()
    fresh.load()
    try:
        _, evaluated = _ask(engine, q1)
        first = engine.stats
        assert evaluated == first.prompt_eval_tokens == first.prompt_tokens  # nothing cached yet
        # A new conversation: the system prompt and the user turn's header are the same tokens as
        # the last conversation's, so only the new question is evaluated.
        text, evaluated = _ask(engine, q2)
        second = engine.stats
        shared = reusable_prefix(*(engine.prompt_tokens([{"role": "user", "content": q}]) for q in (q1, q2)))
        assert shared >= 20 and evaluated == second.prompt_eval_tokens == second.prompt_tokens - shared, (
            shared, evaluated, second)
        fresh_text, fresh_evaluated = _ask(fresh, q2)
        assert text and text == fresh_text
        assert fresh_evaluated == fresh.stats.prompt_eval_tokens == fresh.stats.prompt_tokens
    finally:
        engine.close()
        fresh.close()
