"""The llama.cpp engine on the real embedded model."""

from __future__ import annotations

import threading

import pytest

from localmoe.engine import GenerationConfig, chat_template
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


def test_a_catalog_system_prompt_goes_first_where_the_conversation_has_none(engine, smollm, tmp_path):
    """The embedded model's catalog entry carries a system prompt (its template's own derails it). Every engine made
    for it (create_engine) and the router's probe render a question with it; a conversation's own system message
    wins; a model without one keeps its template's."""
    from localmoe.engine import create_engine
    from localmoe.home import models
    from localmoe.routing.probe import Prober

    own = models.system_prompt(smollm.path)
    assert own and models.system_prompt(tmp_path / "other.gguf") is None
    made = create_engine(smollm)
    probe = Prober(smollm.path)
    try:
        assert made.system_prompt == own
        question = [{"role": "user", "content": "hi"}]
        made.load()
        text = made._llm.detokenize(made.prompt_tokens(question), special=True).decode()
        assert text.startswith(f"<|im_start|>system\n{own}<|im_end|>\n<|im_start|>user\nhi")
        assert probe.load().prompt_tokens(question) == made.prompt_tokens(question)  # the probe reads what answers
        mine = [{"role": "system", "content": "Be terse."}, *question]
        assert made.prompt_tokens(mine) == engine.prompt_tokens(mine)  # the conversation's own system message
        # the answer's stats say which system message the engine added, if any
        few = GenerationConfig(max_tokens=2, temperature=0.0)
        list(made.stream(question, few))
        assert made.stats.system_prompt == own
        list(made.stream(mine, few))
        assert made.stats.system_prompt is None
        late = [*question, {"role": "system", "content": "Be terse."}]  # not first: the template would add its own
        rendered = made._llm.detokenize(made.prompt_tokens(late), special=True).decode()
        assert rendered.startswith(f"<|im_start|>system\n{own}<|im_end|>")
        assert engine.system_prompt is None and engine.prompt_tokens(question) != made.prompt_tokens(question)
    finally:
        made.close()
        probe.close()


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


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# With the catalog's system prompt (a Session's engine) the France answer ends at once; this one still loops greedily
# without a penalty ("Il capo di Roma, il territore di Roma, il territore …").
ITALY = "What is the capital of Italy?"


def test_the_loop_guard_stops_a_real_loop_and_keeps_its_first_round(engine):
    # greedy without a penalty: SmolLM2 loops ", la Femme, la Femme, …" to the token limit
    looping = GenerationConfig(max_tokens=300, temperature=0.0, repeat_penalty=1.0)
    unguarded = "".join(engine.stream(FRANCE, looping))
    assert engine.stats.stop_reason == "length" and engine.stats.completion_tokens == 300
    streamed = "".join(engine.stream(FRANCE, GenerationConfig(**{**vars(looping), "loop_guard": True})))
    s = engine.stats
    assert s.stop_reason == "repetition" and s.completion_tokens < 80, s
    assert unguarded.startswith(streamed)  # same tokens until the guard stopped them
    kept = streamed[: s.kept_chars]
    assert 0 < len(kept) < len(streamed) and kept.count("la Femme") == 1 and "repeated" in s.repetition


def test_the_products_defaults_end_the_france_answer_without_a_loop(engine, smollm):
    """On the template's own system prompt (this fixture's), the harder case: without a penalty it loops."""
    from localmoe.home import models

    config = GenerationConfig(**models.generation_defaults(smollm))
    assert config.repeat_penalty > 1.0 and config.loop_guard and config.min_p > 0
    for seed in range(3):
        text = "".join(engine.stream(FRANCE, GenerationConfig(**{**vars(config), "seed": seed})))
        assert engine.stats.stop_reason in ("stop", "repetition") and engine.stats.completion_tokens < 80, text


def test_a_stopped_loop_is_recorded_as_its_first_round(home, smollm):
    import sqlite3

    from localmoe.chat.session import Session

    config = GenerationConfig(max_tokens=300, temperature=0.0, repeat_penalty=1.0, loop_guard=True)
    session = Session(smollm, config=config, meter=False)
    try:
        reply = session.ask(ITALY)
        streamed = "".join(reply)
    finally:
        session.close()
    assert reply.stats.stop_reason == "repetition" and reply.to_dict()["repetition"]
    assert reply.text == streamed[: reply.stats.kept_chars] and len(reply.text) < len(streamed)
    conn = sqlite3.connect(home / "localmoe.db")
    content, stop = conn.execute("select m.content, g.stop_reason from messages m join generations g "
                                 "on g.message_id = m.id where m.role = 'assistant'").fetchone()
    assert content == reply.text and stop == "repetition"


def test_localmoe_threads_sets_both_engines_thread_count_and_a_bad_value_is_one_line(smollm, tiny_moe, monkeypatch,
                                                                                      tmp_path):
    """A machine shared with other work (or two test workers) caps the engines' threads with LOCALMOE_THREADS."""
    import psutil

    from helpers import run_cli
    from localmoe.engine.base import default_threads

    monkeypatch.delenv("LOCALMOE_THREADS", raising=False)
    assert default_threads() == max(1, psutil.cpu_count(logical=False) or 1)
    monkeypatch.setenv("LOCALMOE_THREADS", "3")
    assert default_threads() == 3
    engine = LlamaCppEngine(smollm.path)
    assert engine.n_threads == 3
    torch = pytest.importorskip("torch")
    from localmoe.engine.torch_moe import TorchMoEEngine

    before = torch.get_num_threads()
    monkeypatch.setenv("LOCALMOE_THREADS", str(before + 1))  # torch's pool is process-wide: put back below
    try:
        TorchMoEEngine(tiny_moe[0]).load()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two", "-1", "²", "1.5"):
        monkeypatch.setenv("LOCALMOE_THREADS", bad)
        with pytest.raises(LocalmoeError, match="LOCALMOE_THREADS"):
            default_threads()
    r = run_cli("ask", "hi", "--max-tokens", "2", home=tmp_path, env_extra={"LOCALMOE_THREADS": "many"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "localmoe: error: LOCALMOE_THREADS must be a whole number of threads, 1 or more (got 'many')"]


def test_a_seed_fixes_its_own_answer_and_no_later_unseeded_one(engine):
    """llama-cpp-python keeps the last seed it was given: a server's unseeded requests after one client's seed all
    drew the same "random" answer. A seed repeats its answer; answers without one differ again."""
    messages = [{"role": "user", "content": "Tell me a one-line joke about dogs."}]
    hot = GenerationConfig(max_tokens=20, temperature=1.5, top_p=1.0, min_p=0.0)

    def answer(seed: int | None) -> str:
        return "".join(engine.stream(messages, GenerationConfig(**{**vars(hot), "seed": seed})))

    seeded = answer(7)
    assert answer(7) == seeded
    unseeded = [answer(None) for _ in range(3)]
    assert len({seeded, *unseeded}) >= 3, unseeded
