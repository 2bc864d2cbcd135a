"""TorchMoEEngine.stream: chat template, tokenizer, greedy/sampled decode, cancellation, stats, Session."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from synthetic_moe import _embedded_gguf, build_hf_moe
from tokenizers import Tokenizer

from localmoe.engine import GenerationConfig, chat_template, create_engine
from localmoe.engine.torch_moe import IncrementalDetokenizer, TorchMoEEngine
from localmoe.errors import LocalmoeError
from localmoe.home import models, paths

MESSAGES = [{"role": "user", "content": "Name three colours, please."}]
GREEDY = GenerationConfig(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    return build_hf_moe(root / "tiny-qwen3", "qwen3_moe", layers=2, experts=8, top_k=2, init_std=0.05)


@pytest.fixture(scope="module")
def engine(hf_dir: Path) -> TorchMoEEngine:
    e = TorchMoEEngine(hf_dir)
    yield e
    e.close()


def _prompt_ids(hf_dir: Path) -> list[int]:
    """The rendered prompt's ids, computed here independently of the engine."""
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    text = chat_template.render(config["chat_template"], MESSAGES, bos_token=config["bos_token"],
                                eos_token=config["eos_token"])
    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_tokenizer_files_tokenise_like_llama_cpp(hf_dir):
    from llama_cpp import Llama

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    llm = Llama(str(_embedded_gguf()), vocab_only=True, verbose=False)
    for text in ["Hello, world!", "  spaces and 12345 digits 3.14", "héllo wörld — café 日本語 😀🤖",
                 "<|im_start|>user\nWhat's 2+2?<|im_end|>\n", "tabs\tand\n\nnewlines", "x<|endoftext|>y"]:
        assert tok.encode(text, add_special_tokens=False).ids == llm.tokenize(text.encode(), add_bos=False,
                                                                              special=True), text
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["chat_template"] == llm.metadata["tokenizer.chat_template"]


def test_greedy_stream_matches_transformers_generate(engine, hf_dir):
    from transformers import AutoModelForCausalLM

    pieces = list(engine.stream(MESSAGES, GREEDY))
    prompt = _prompt_ids(hf_dir)
    assert engine.tokens[: len(prompt)] == prompt
    ours = engine.tokens[len(prompt) :]

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, pad_token_id=0)
    theirs = out[0, len(prompt) :].tolist()
    eos = engine.chat_tokenizer().eos_ids
    cut = next((i for i, t in enumerate(theirs) if t in eos), len(theirs))  # ours stops before an eos
    assert ours == theirs[:cut]
    assert len(ours) >= 4, "the checkpoint should not end its answer at once"

    tok = engine.chat_tokenizer().tokenizer
    assert "".join(pieces) == tok.decode(ours, skip_special_tokens=True)
    s = engine.stats
    assert s.prompt_tokens == len(prompt)
    assert s.completion_tokens == len(ours)
    assert s.stop_reason == ("length" if cut == 8 else "stop")
    assert s.ttft_s is not None and 0 < s.ttft_s <= s.wall_s
    assert s.tokens_per_s is not None and s.tokens_per_s > 0


def test_cancel_after_three_pieces_computes_no_further_token(engine):
    cancel = threading.Event()
    calls0 = engine.forward_calls
    pieces = []
    for piece in engine.stream(MESSAGES, GenerationConfig(max_tokens=40, temperature=0.0), cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    s = engine.stats
    assert s.stop_reason == "cancelled"
    assert len(pieces) <= 4  # three, plus at most a held-back partial character flushed at the end
    # one prefill, then one forward per further token: a forward after the last token would make this +1
    assert engine.forward_calls - calls0 == s.completion_tokens < 40
    greedy = "".join(engine.stream(MESSAGES, GREEDY))
    assert greedy.startswith("".join(pieces[:3]))


def test_abandoned_stream_counts_as_cancelled(engine):
    calls0 = engine.forward_calls
    gen = engine.stream(MESSAGES, GenerationConfig(max_tokens=40, temperature=0.0))
    next(gen), next(gen)
    gen.close()
    assert engine.stats.stop_reason == "cancelled"
    assert engine.forward_calls - calls0 == engine.stats.completion_tokens


def test_cancel_before_start_computes_nothing(engine):
    cancel = threading.Event()
    cancel.set()
    calls0 = engine.forward_calls
    assert list(engine.stream(MESSAGES, GREEDY, cancel)) == []
    assert engine.forward_calls == calls0 and engine.stats.stop_reason == "cancelled"


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine):
    greedy = "".join(engine.stream(MESSAGES, GREEDY))
    greedy_ids = engine.tokens
    sampled = GenerationConfig(max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    a = "".join(engine.stream(MESSAGES, sampled))
    a_ids = engine.tokens
    assert "".join(engine.stream(MESSAGES, sampled)) == a
    assert a_ids != greedy_ids  # a flat-ish random model at temperature 1.5 leaves the greedy path
    cfg = GenerationConfig(max_tokens=8, temperature=0.9, top_k=1, seed=3)
    assert "".join(engine.stream(MESSAGES, cfg)) == greedy
    logprob_cfg = GenerationConfig(max_tokens=4, temperature=0.0, logprobs=True)
    list(engine.stream(MESSAGES, logprob_cfg))
    s = engine.stats
    assert s.mean_logprob is not None and s.min_logprob is not None and s.min_logprob <= s.mean_logprob <= 0


def test_incremental_detokenizer_never_splits_a_character(engine):
    tok = engine.chat_tokenizer().tokenizer
    text = "héllo wörld — naïve café 日本語 😀🤖 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split a character across tokens"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_session_records_a_torch_answer(hf_dir, home):
    from localmoe.chat.session import Session

    ref = models.resolve(str(hf_dir))
    assert (ref.backend, ref.id, ref.path) == ("torch", "tiny-qwen3", hf_dir.resolve())
    session = Session(ref, config=GenerationConfig(max_tokens=5, temperature=0.0), meter=False)
    try:
        reply = session.ask("Hello there").run()
        assert reply.status == "complete" and reply.text
    finally:
        session.close()
    assert str(paths.db_path()).startswith(str(home))
    conn = sqlite3.connect(paths.db_path())  # a fresh connection: the answer is on disk, not just in the session
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute(
        "select m.content, m.status, g.backend, g.completion_tokens, g.stop_reason, g.prompt_tokens "
        "from messages m join generations g on g.message_id = m.id where m.id = ?", [reply.message_id])]
    conn.close()
    assert rows == [{"content": reply.text, "status": "complete", "backend": "torch",
                     "completion_tokens": reply.stats.completion_tokens, "stop_reason": reply.stats.stop_reason,
                     "prompt_tokens": reply.stats.prompt_tokens}]
    assert rows[0]["completion_tokens"] > 0 and rows[0]["prompt_tokens"] > 0


def test_checkpoint_directories_resolve_and_list(hf_dir, home, tmp_path):
    installed = home / "models" / "My-MoE"
    installed.mkdir(parents=True)
    (installed / "config.json").write_text("{}")
    (home / "models" / "not-a-checkpoint").mkdir()
    found = [r for r in models.installed_models() if r.backend == "torch"]
    assert [(r.id, r.source) for r in found] == [("my-moe", "installed")]
    assert models.resolve("my-moe").path == installed.resolve()
    with pytest.raises(LocalmoeError, match="no config.json"):
        models.resolve(str(tmp_path))
    assert isinstance(create_engine(models.resolve(str(hf_dir))), TorchMoEEngine)


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_tokenizer_file_is_named(hf_dir, tmp_path, missing):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf_dir.iterdir():
        if f.name != missing:
            (bare / f.name).symlink_to(f)
    engine = TorchMoEEngine(bare)
    try:
        with pytest.raises(LocalmoeError, match=missing) as exc:
            list(engine.stream(MESSAGES, GREEDY))
        assert "\n" not in str(exc.value)
        assert engine.logits([1, 2, 3]).shape == (3, 49152)  # logits need no tokenizer
    finally:
        engine.close()
