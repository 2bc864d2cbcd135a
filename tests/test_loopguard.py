"""The loop guard on real token sequences: loops and normal answers recorded from the embedded SmolLM2 model
(tests/data/loops.json, made by tests/data/make_loops.py), legitimate repetition tokenised with the same tokenizer,
and a short greedy decode of the France prompt that the guard must stop before 80 tokens."""

from __future__ import annotations

import codecs
import json
import random
import time
from pathlib import Path

import pytest

from localmoe.engine.loopguard import LoopGuard

DATA = json.loads((Path(__file__).parent / "data" / "loops.json").read_text(encoding="utf-8"))
LOOPS = {a["prompt"]: a for a in DATA["loops"]}
NORMAL = {a["prompt"]: a for a in DATA["normal"]}

# For each recorded loop, how the kept text must end: one full first cycle, read off the answers by hand. The loop
# starts right after it (the first repeat), which is where "fires early" is measured from.
KEPT_ENDS_WITH = {
    "What is the capital of France?": "la Culture, la Tradition, la Femme",
    "Name the days of the week.": "are: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday",
    "What are the colors of the rainbow?": "\n\nThe rainbow is also a symbol of the universe's beauty and beauty.",
    "List the planets of the solar system.": "8. Ceres\n9. Haumeus\n10. Pluto\n",
    "Give me a list of fruits.": "1. Bananas\n2. Apples\n3. Ananasaki (Kalimojima)\n",
    "Write a markdown table of five countries and their capitals.":
        "| Bahrain | Al-Saudi Arabia |\n| Saudi Arabia | Mecca |\n",
}
# The repeated unit of each loop: once in the kept text's first cycle, over and over in the dropped text.
UNIT = {
    "What is the capital of France?": ", la Femme",
    "Name the days of the week.": " Tuesday, Wednesday,",
    "What are the colors of the rainbow?": " a symbol of the universe's beauty and beauty.",
    "List the planets of the solar system.": ". Pluto\n",
    "Give me a list of fruits.": ". Ananasaki (Kalimojima)\n",
    "Write a markdown table of five countries and their capitals.": "| Saudi Arabia | Mecca |\n",
}

ELEMENTS = """Hydrogen Helium Lithium Beryllium Boron Carbon Nitrogen Oxygen Fluorine Neon Sodium Magnesium Aluminium
Silicon Phosphorus Sulfur Chlorine Argon Potassium Calcium Scandium Titanium Vanadium Chromium Manganese Iron Cobalt
Nickel Copper Zinc Gallium Germanium Arsenic Selenium Bromine Krypton Rubidium Strontium Yttrium Zirconium Niobium
Molybdenum Technetium Ruthenium Rhodium Palladium Silver Cadmium Indium Tin Antimony Tellurium Iodine Xenon Caesium
Barium Lanthanum Cerium Praseodymium Neodymium Promethium Samarium Europium Gadolinium Terbium Dysprosium Holmium
Erbium Thulium Ytterbium Lutetium Hafnium Tantalum Tungsten Rhenium Osmium Iridium Platinum Gold Mercury Thallium
Lead Bismuth Polonium Astatine Radon Francium Radium Actinium Thorium Protactinium Uranium Neptunium Plutonium
Americium Curium Berkelium Californium Einsteinium Fermium""".split()
NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                "seventeen eighteen nineteen twenty").split()

CODE_BLOCK = '''```python
def read_config(path):
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return {k: v for k, v in (line.split("=", 1) for line in lines if "=" in line)}
```
'''
ARGPARSE = "".join(
    f'parser.add_argument("--{name}", type={kind}, default={default}, help="{text}")\n'
    for name, kind, default, text in [
        ("epochs", "int", "10", "number of passes over the data"), ("batch-size", "int", "32", "examples per step"),
        ("lr", "float", "3e-4", "learning rate"), ("weight-decay", "float", "0.01", "L2 penalty"),
        ("warmup", "int", "500", "warm-up steps"), ("seed", "int", "0", "random seed"),
        ("workers", "int", "4", "data loader processes"), ("max-len", "int", "512", "tokens per example"),
        ("dropout", "float", "0.1", "dropout rate"), ("clip", "float", "1.0", "gradient norm clip"),
        ("eval-every", "int", "1000", "steps between evaluations"), ("save-every", "int", "5000", "checkpoint steps"),
    ]
)
SETTERS = "class Point3:\n" + "".join(
    f"    @property\n    def {c}(self):\n        return self._{c}\n\n"
    f"    @{c}.setter\n    def {c}(self, value):\n        self._{c} = float(value)\n\n"
    for c in "xyz"
)
CHORUS = """Oh, the river runs to the sea, and the sea runs back to me,
So I'll wait by the water's edge till the morning sets me free.
Sing it low, sing it slow, let the evening breezes blow,
And the river runs to the sea, and the sea runs back to me.
"""
VERSE = """I walked along the dusty road with nothing but a song,
The summer sun was burning down, the day was hot and long.
"""

LEGIT = {
    "numbered list 1-100": "".join(f"{i}. {name}\n" for i, name in enumerate(ELEMENTS, 1)),
    "counting 1-100, a line each": "".join(f"{i}\n" for i in range(1, 101)),
    "counting 1-100 inline": ", ".join(str(i) for i in range(1, 101)) + ".",
    "counting in words": "Sure! " + ", ".join(NUMBER_WORDS) + ".",
    "counting as recorded ('1. 1')": "".join(f"{i}. {i}\n" for i in range(1, 101)),
    "squares, a sentence each": "".join(f"{i} squared is {i * i}.\n" for i in range(1, 51)),
    "times table in words": "".join(f"7 times {i} is {7 * i}\n" for i in range(1, 21)),
    "times table": "".join(f"7 x {i} = {7 * i}\n" for i in range(1, 21)),
    "table of 30 elements": "| # | Element | Symbol group |\n|---|---|---|\n" + "".join(
        f"| {i} | {name} | {'metal' if i % 3 else 'non-metal'} |\n" for i, name in enumerate(ELEMENTS[:30], 1)),
    "table of 30 numbers": "| n | n² | n³ |\n|---|---|---|\n" + "".join(
        f"| {i} | {i * i} | {i ** 3} |\n" for i in range(1, 31)),
    "code block repeated twice": "Here is the function:\n\n" + CODE_BLOCK + "\n" + CODE_BLOCK,
    "code block twice, in between": CODE_BLOCK + "\nAnd again, with the same code for the other file:\n\n"
                                    + CODE_BLOCK,
    "argparse lines": "```python\nimport argparse\n\nparser = argparse.ArgumentParser()\n" + ARGPARSE + "```\n",
    "property setters": SETTERS,
    "ha ha ha": "Ha ha ha ha ha ha! That's a good one.",
    "ha x6, twice": "ha ha ha ha ha ha\n" * 2,
    "hahaha": "Hahahahahahahahaha, I love it!",
    "song chorus twice": VERSE + "\n" + CHORUS + "\n" + VERSE + "\n" + CHORUS + "\n" + CHORUS,
    "happy birthday": "Happy birthday to you,\nHappy birthday to you,\nHappy birthday, dear Anna,\n"
                      "Happy birthday to you!\n",
    "row row": "Row, row, row your boat,\nGently down the stream.\nMerrily, merrily, merrily, merrily,\n"
               "Life is but a dream.\n" * 2,
    "light and darkness": "a harmony of opposites: light and darkness, light and darkness, light and darkness.",
    "zero matrix 8x8": "[\n" + "".join("  [" + ", ".join(["0"] * 8) + "],\n" for _ in range(8)) + "]\n",
    "chessboard grid": ("+---" * 8 + "+\n" + "|   " * 8 + "|\n") * 8 + "+---" * 8 + "+\n",
    "rule lines": "Title\n=====\n\n" + "-" * 80 + "\n" + "=" * 80 + "\n",
    # Numbers that count up inside the content, not as a list's numbering, are the content.
    "usernames": "Here are 50 test accounts: " + ", ".join(f"user{i}" for i in range(1, 51)) + ".",
    "placeholder items": "<ul>\n" + "".join(f"  <li>Item {i}</li>\n" for i in range(1, 21)) + "</ul>\n",
    "array init": "".join(f"    arr[{i}] = 0;\n" for i in range(20)),
    "dates": "date,status\n" + "".join(f"2024-01-{i:02d},open\n" for i in range(1, 31)),
    "week plan twice": "Week 1:\n" + "".join(f"- {d}: {a}\n" for d, a in [
        ("Monday", "run 5 km"), ("Tuesday", "rest"), ("Wednesday", "swim"), ("Thursday", "rest"),
        ("Friday", "run 8 km"), ("Saturday", "yoga"), ("Sunday", "rest")]) + "\nWeek 2: the same as week 1.\n",
}


@pytest.fixture(scope="module")
def llm(smollm):
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(smollm.path), n_ctx=2048, verbose=False)
    yield model
    model.close()


def pieces(llm, ids: list[int]) -> list[str]:
    """Each token's text as the llama.cpp engine yields it (multi-byte characters across tokens included)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(llm.detokenize([t])) for t in ids]


def tokenise(llm, text: str) -> tuple[list[int], list[str]]:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return ids, pieces(llm, ids)


def run(ids: list[int], texts: list[str], guard: LoopGuard | None = None) -> LoopGuard:
    guard = guard or LoopGuard()
    for token, text in zip(ids, texts, strict=True):
        if guard.push(token, text):
            break
    return guard


@pytest.mark.parametrize("prompt", list(LOOPS))
def test_fires_on_recorded_loops_and_keeps_the_first_cycle(prompt):
    answer = LOOPS[prompt]
    text = answer["text"]
    g = run(answer["ids"], answer["pieces"])
    assert g.fired, f"no loop found in {text[:120]!r}…"
    assert g.reason and g.kind in ("cycle", "counter")

    end = KEPT_ENDS_WITH[prompt]
    loop_at = text.index(end) + len(end)  # the first repeat starts here
    assert g.keep_text == text[:loop_at]
    assert UNIT[prompt].strip() in end and g.dropped_text.count(UNIT[prompt]) >= 2
    assert g.keep_text + g.dropped_text == "".join(answer["pieces"][: g.fired_at])

    # Early: within 100 tokens of where the loop starts (the first repeat, right after the kept text).
    assert g.fired_at - g.keep_tokens <= 100
    # The kept text holds the first cycle and less than two.
    assert g.start < g.keep_tokens < g.start + 2 * g.period


def test_phrase_and_sentence_loops_stop_within_40_tokens():
    for prompt in ("What is the capital of France?", "Name the days of the week.",
                   "What are the colors of the rainbow?",
                   "Write a markdown table of five countries and their capitals."):
        g = run(LOOPS[prompt]["ids"], LOOPS[prompt]["pieces"])
        assert g.kind == "cycle" and g.fired_at - g.keep_tokens <= 40, (prompt, g.fired_at, g.keep_tokens)


def test_numbered_list_loops_are_counter_cycles():
    for prompt, item in [("List the planets of the solar system.", "Pluto"),
                         ("Give me a list of fruits.", "Ananasaki")]:
        g = run(LOOPS[prompt]["ids"], LOOPS[prompt]["pieces"])
        assert g.kind == "counter" and item in g.reason and "number" in g.reason


@pytest.mark.parametrize("prompt", list(NORMAL))
def test_silent_on_recorded_normal_answers(prompt):
    answer = NORMAL[prompt]
    g = run(answer["ids"], answer["pieces"])
    assert not g.fired, g.reason
    assert g.keep_text == answer["text"] and g.dropped_text == ""


@pytest.mark.parametrize("name", list(LEGIT))
def test_silent_on_legitimate_repetition(llm, name):
    ids, texts = tokenise(llm, LEGIT[name])
    g = run(ids, texts)
    assert not g.fired, f"{name}: {g.reason} at token {g.fired_at} of {len(ids)}"
    assert g.keep_tokens == len(ids)


def test_legit_texts_are_long_enough_to_matter(llm):
    # The no-fire tests mean something only if the texts are longer than the guard's shortest trigger.
    long = [name for name, text in LEGIT.items() if len(llm.tokenize(text.encode(), add_bos=False)) >= 64]
    assert len(long) >= 16, long


def test_counter_loops_are_list_items_counting_up(llm):
    # The same list item with only its number counting up: a loop once it has a word in it ...
    for mark in (".", ")"):
        ids, texts = tokenise(llm, "".join(f"{i}{mark} The answer is Paris\n" for i in range(1, 40)))
        g = run(ids, texts)
        assert g.fired and g.kind == "counter" and g.keep_text == f"1{mark} The answer is Paris\n"
    # ... across the 9 -> 10 step too, where the number grows a token: within 10 items ...
    lines = [f"{i}. The answer is Paris\n" for i in range(6, 40)]
    ids, texts = tokenise(llm, "".join(lines))
    assert run(ids, texts).fired_at < len(tokenise(llm, "".join(lines[:10]))[0])
    # ... but not without words, not when the number is not a list's, nor when it does not count up by one.
    for text in ("".join(f"{i}.\n" for i in range(1, 100)),
                 "".join(f"Day {i}. The answer is Paris\n" for i in range(1, 40)),
                 "".join(f"{i}. The answer is Paris\n" for i in range(2, 80, 2))):
        ids, texts = tokenise(llm, text)
        assert not run(ids, texts).fired, text[:40]


def test_cycles_without_words_need_longer_runs(llm):
    ids, texts = tokenise(llm, "The result is 0." + "0" * 200)
    g = run(ids, texts)
    assert g.fired and g.kind == "cycle" and g.period == 1
    assert g.fired_at - g.start == 64  # 64 zeros, where a phrase with a word needs 32 tokens
    ids, texts = tokenise(llm, "yes " * 100)  # "yes", then " yes" 99 times
    g = run(ids, texts)
    assert g.start == 1 and g.fired_at == 33


def test_low_diversity_catches_irregular_loops(llm):
    # Three phrases in a random order: no exact cycle long enough, but nothing new is said either.
    rnd = random.Random(7)
    phrases = ["la femme", "la femme au roi", "la femme au roi et la femme"]
    text = "Paris est la capitale. " + ", ".join(rnd.choice(phrases) for _ in range(60))
    ids, texts = tokenise(llm, text)
    g = run(ids, texts)
    assert g.fired and g.kind == "low-diversity", g.reason
    assert "distinct tokens" in g.reason
    assert g.keep_text.startswith("Paris est la capitale.") and len(g.keep_text) < len(text) // 3
    assert g.fired_at <= len(tokenise(llm, "Paris est la capitale. ")[0]) + 100


def test_stays_fired_and_resets():
    answer = LOOPS["What is the capital of France?"]
    g = run(answer["ids"], answer["pieces"])
    kept, at = g.keep_text, g.fired_at
    assert g.push(answer["ids"][at], answer["pieces"][at]) is True
    assert g.keep_text == kept and g.fired_at == at and g.n_tokens == at
    g.reset()
    assert not g.fired and g.n_tokens == 0 and g.keep_text == ""
    assert run(NORMAL["What is photosynthesis?"]["ids"], NORMAL["What is photosynthesis?"]["pieces"], g).fired is False


def test_cost_per_token(llm):
    # Engines call push once per decoded token: it must stay far below a decode step (milliseconds).
    sequences = [(a["ids"], a["pieces"]) for a in DATA["normal"]]
    sequences += [tokenise(llm, text) for text in LEGIT.values()]
    sequences += [tokenise(llm, text) for text in (LEGIT["counting 1-100 inline"] * 3, ARGPARSE * 2)]
    tokens = 0
    t0 = time.process_time()  # CPU time: other processes on a busy machine do not count
    for ids, texts in sequences:
        g = LoopGuard()
        for token, text in zip(ids, texts, strict=True):
            g.push(token, text)
        tokens += len(ids)
    per_token = (time.process_time() - t0) / tokens
    assert tokens > 2000
    assert per_token < 50e-6, f"{per_token * 1e6:.1f} µs per token"


def test_stops_the_france_answer_before_80_tokens(llm):
    """End to end on the embedded model: greedy decoding without repeat penalty, as the engines did, loops on the
    France prompt to any token limit; with the guard it stops before 80 tokens, keeping the first cycle."""
    import llama_cpp

    from localmoe.engine import chat_template

    prompt = chat_template.render(llm.metadata.get("tokenizer.chat_template"),
                                  [{"role": "user", "content": "What is the capital of France?"}])
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    guard = LoopGuard()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stop_reason = "length"
    for n, token in enumerate(llm.generate(tokens, temp=0.0, repeat_penalty=1.0, min_p=0.0), 1):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            stop_reason = "stop"
            break
        if guard.push(token, decoder.decode(llm.detokenize([token]))):
            stop_reason = "repetition"
            break
        if n >= 200:
            break
    assert LOOPS["What is the capital of France?"]["stop"] == "length"  # as recorded without the guard
    assert stop_reason == "repetition" and guard.n_tokens < 80
    assert guard.keep_text.endswith("la Femme") and guard.keep_text.count("la Femme") == 1
    assert "la Femme" in guard.reason
