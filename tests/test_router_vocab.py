"""The learned router's cached tables and Python tokenizer (#19 item 4): the same token ids as llama.cpp, the same
dequantised rows as gguf, and so the same scores as when every decision loaded llama.cpp."""

from __future__ import annotations

import random

import numpy as np
import pytest

from localmoe.home import paths
from localmoe.routing import train as router_train
from localmoe.routing import vocab
from localmoe.routing.router import Router, TokenEmbedder, dequantize


def covered_questions() -> list[str]:
    """The shipped questions in the characters the Python tokenizer covers (a few hold an emoji: llama.cpp's)."""
    questions = [r["question"] for r in router_train.shipped_labels()]
    covered = [q for q in questions if all(vocab.fast_char(ord(c)) for c in q)]
    assert len(covered) > 0.97 * len(questions)
    return covered


@pytest.fixture(scope="module")
def embedder(smollm, tmp_path_factory) -> TokenEmbedder:
    return TokenEmbedder(smollm.path, tmp_path_factory.mktemp("cache"))


def test_tokenizer_matches_llama_cpp(embedder) -> None:
    assert embedder.bpe is not None  # the embedded SmolLM2 is covered
    rng = random.Random(19)
    alphabet = [chr(c) for c in range(0x250)] + list(vocab._EXTRA) + list(" \n\t'sdmtlrev0123456789") * 4
    words = "I'm you're it's we've they'll he'd 1,000 3.5 ½ ² 5×3 ÷ café naïve ... !! \n\n  \t (a+b) don't".split(" ")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(600)]
    texts += ["".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(1, 10)))
              for _ in range(600)]
    texts += covered_questions()
    for text in texts:
        assert embedder.bpe.tokenize(text) == embedder.vocab.tokenize(text.encode(), add_bos=False), repr(text)
    assert embedder.bpe.tokenize("日本の首都は？") is None  # outside the covered characters: llama.cpp tokenises it


@pytest.mark.parametrize("qtype,block", [(1, 2), (2, 18), (3, 20), (8, 34)])
def test_dequantize_matches_gguf(qtype: int, block: int) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(qtype)
    rows = rng.integers(0, 256, size=(5, block * 4), dtype=np.uint8)
    if qtype != 1:  # finite scales: NaN != NaN would hide a real difference
        for b in range(4):
            rows[:, b * block:b * block + 2] = np.frombuffer(np.float16(0.01 * (b + 1)).tobytes(), np.uint8)
            if qtype == 3:
                rows[:, b * block + 2:b * block + 4] = np.frombuffer(np.float16(-0.5).tobytes(), np.uint8)
    else:
        rows = np.frombuffer(rng.standard_normal(5 * block * 4 // 2).astype(np.float16).tobytes(),
                             np.uint8).reshape(5, -1)
    assert np.array_equal(dequantize(rows, qtype), gguf_dequantize(rows, GGMLQuantizationType(qtype)))


def test_scores_identical_to_llama_cpp_path(smollm) -> None:
    """Every shipped question gets the same score bit for bit with the cached tables as through llama.cpp (the
    path every decision took before the cache)."""
    fast, slow = Router("learned", small_model_path=smollm.path), Router("learned", small_model_path=smollm.path)
    slow.embedder.bpe = None
    prompts = covered_questions()
    assert [fast.score(p)[0] for p in prompts] == [slow.score(p)[0] for p in prompts]
    assert "vocab" not in fast.embedder.__dict__  # llama.cpp never loaded on the fast path


def test_cache_written_once_and_reused(smollm) -> None:
    TokenEmbedder(smollm.path)
    cached = list((paths.data_dir() / "cache").glob("router-vocab-*.marshal"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    TokenEmbedder(smollm.path)
    assert cached[0].stat().st_mtime_ns == before
    cached[0].write_bytes(b"not marshal")  # a damaged cache is rebuilt, not trusted
    assert TokenEmbedder(smollm.path).bpe is not None
