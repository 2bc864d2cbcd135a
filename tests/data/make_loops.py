"""Regenerates tests/data/loops.json: real answers of the embedded SmolLM2 model, decoded greedily with no repeat
penalty (how the engines decoded before the loop guard), token by token, for tests/test_loopguard.py.

    .venv/bin/python tests/data/make_loops.py

Each answer is recorded as the token ids and the text piece of each token, decoded the way the llama.cpp engine
does (an incremental UTF-8 decoder: a piece can be empty when a character spans two tokens), so that joining the
pieces gives the answer's text. Loops are cut at MAX_TOKENS; the guard must fire long before.

Greedy decoding of the same file with the same llama.cpp build is deterministic; another llama-cpp-python version
may pick other tokens, in which case the check below says which prompt no longer loops (or no longer ends).
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

import llama_cpp

from localmoe.engine import chat_template
from localmoe.home import models

MAX_TOKENS = 300
OUT = Path(__file__).with_name("loops.json")

# Prompts that loop to the token limit, one of each shape: a short phrase (the France answer), a list that
# starts over, a sentence, a numbered list whose items stop changing (a counter loop, twice: short and long lines),
# and table rows.
LOOPS = [
    "What is the capital of France?",
    "Name the days of the week.",
    "What are the colors of the rainbow?",
    "List the planets of the solar system.",
    "Give me a list of fruits.",
    "Write a markdown table of five countries and their capitals.",
]
# Prompts that end on their own, some with repetition of their own: counting ("1. 1\n2. 2\n…"), a code block
# shown three times with small changes, and ordinary prose.
NORMAL = [
    "What is the capital of Germany?",
    "Count from 1 to 30.",
    "Write a Python function that adds two numbers.",
    "What is photosynthesis?",
    "Explain gravity in simple terms.",
    "Who painted the Mona Lisa?",
]


def prompt_tokens(llm: llama_cpp.Llama, question: str) -> list[int]:
    # As LlamaCppEngine.prompt_tokens: the model's own chat template, its special tokens parsed.
    text = chat_template.render(llm.metadata.get("tokenizer.chat_template"), [{"role": "user", "content": question}])
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def answer(llm: llama_cpp.Llama, question: str) -> dict:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids: list[int] = []
    pieces: list[str] = []
    stop = "length"
    for token in llm.generate(prompt_tokens(llm, question), temp=0.0, repeat_penalty=1.0, min_p=0.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            stop = "stop"
            break
        ids.append(int(token))
        pieces.append(decoder.decode(llm.detokenize([token])))
        if len(ids) >= MAX_TOKENS:
            break
    pieces[-1] += decoder.decode(b"", final=True)
    return {"prompt": question, "stop": stop, "ids": ids, "pieces": pieces, "text": "".join(pieces)}


def main() -> int:
    model = models.embedded_models()[0]
    llm = llama_cpp.Llama(model_path=str(model.path), n_ctx=2048, verbose=False)
    data = {
        "model": model.path.name,
        "llama_cpp_python": llama_cpp.__version__,
        "decoding": {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": MAX_TOKENS},
        "loops": [answer(llm, q) for q in LOOPS],
        "normal": [answer(llm, q) for q in NORMAL],
    }
    bad = [a["prompt"] for a in data["loops"] if a["stop"] != "length"]
    bad += [a["prompt"] for a in data["normal"] if a["stop"] != "stop"]
    if bad:
        print("these prompts no longer behave as recorded, pick others:", *bad, sep="\n  ", file=sys.stderr)
        return 1
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(data['loops'])} loops, {len(data['normal'])} normal answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
