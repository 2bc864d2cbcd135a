from __future__ import annotations

import datetime as dt
import json
import re
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest

from localmoe.bench import suites
from localmoe.bench.scoring import Verdict, extract_number, score
from localmoe.bench.suites import Item, arc_item, builtin_suites, convert_rows, gsm8k_item, load_suite, mmlu_item
from localmoe.errors import LocalmoeError

CATEGORIES = ["arithmetic", "word_problems", "dates", "units", "letters", "facts"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _stem(item: Item) -> str:
    """The question without its answer-form instruction."""
    return re.split(r" (?:Answer with|Round to)", item.question)[0]


# --- the built-in suites -------------------------------------------------------------------------------------


def test_registry_names_sizes_and_well_formed_items():
    assert builtin_suites() == ["quick", *CATEGORIES, "mixed", "router-train"]
    sizes = {name: len(load_suite(name).items) for name in builtin_suites()}
    assert sizes["quick"] == 24 and sizes["mixed"] == 120 and sizes["router-train"] == 500 + 46 + 785
    assert all(sizes[c] >= 30 for c in CATEGORIES), sizes
    for name in builtin_suites():
        suite = load_suite(name)
        assert suite.source == "builtin" and suite.errors == [] and suite.name == name
        assert len({i.id for i in suite.items}) == len(suite.items), f"{name}: duplicate ids"
        for item in suite.items:
            assert item.kind in ("numeric", "exact", "choice")
            assert 1 <= item.difficulty <= 5
            # the hand-written router questions (tv-, tw-) are worded as people type them
            if not item.id.startswith(("tv-", "tw-")):
                assert "answer with" in item.question.lower(), item  # the model is told the form of the answer
            if item.kind == "choice":
                assert item.choices and item.answer in "ABCDEFGHIJ"[: len(item.choices)]
                for letter, option in zip("ABCD", item.choices, strict=False):
                    assert f"\n{letter}) {option}\n" in item.question + "\n"
            else:
                assert item.choices is None


def test_generation_is_deterministic_and_pinned():
    first = [load_suite(name).items for name in builtin_suites()]
    assert first == [load_suite(name).items for name in builtin_suites()]
    # the generators themselves, bypassing their cache, give the same items again
    assert list(suites._arithmetic.__wrapped__()) == load_suite("arithmetic").items
    assert list(suites._dates.__wrapped__()) == load_suite("dates").items
    # pinned values: a change here means every benchmark result so far is no longer comparable
    arith = {i.id: i for i in load_suite("arithmetic").items}
    assert arith["arith-001"].question == "What is 12 × 2? Answer with a number only."
    assert arith["arith-001"].answer == "24"
    assert arith["arith-005"].question.startswith("What is 14 + 52 + 48 ÷ 12 × 3 - 45?")
    assert arith["arith-005"].answer == "33"
    date = {i.id: i for i in load_suite("dates").items}
    assert date["date-005"].question.startswith("What day of the week was 2001-07-05?")
    assert date["date-005"].answer == "Thursday"
    letters = {i.id: i for i in load_suite("letters").items}
    assert letters["letter-023"].question.startswith('How many times does the letter "r" appear in the word "straw')
    assert [i.id for i in load_suite("quick").items[:6]] == ["arith-001", "word-002", "date-003", "unit-004",
                                                             "letter-005", "fact-006"]


def test_difficulty_spread():
    for name in ["arithmetic", "word_problems", "dates", "units", "letters"]:
        counts = Counter(i.difficulty for i in load_suite(name).items)
        assert sorted(counts) == [1, 2, 3, 4, 5] and len(set(counts.values())) == 1, (name, counts)
    assert len({i.difficulty for i in load_suite("facts").items}) >= 3
    quick, mixed = load_suite("quick").items, load_suite("mixed").items
    assert Counter(i.category for i in quick) == dict.fromkeys(
        ["arithmetic", "word_problem", "date", "unit", "letters", "fact"], 4)
    assert Counter(i.category for i in mixed) == dict.fromkeys(
        ["arithmetic", "word_problem", "date", "unit", "letters", "fact"], 20)
    assert sorted({i.difficulty for i in quick}) == [1, 2, 3, 4, 5]
    assert min(Counter(i.difficulty for i in mixed).values()) >= 15
    assert {i.id for i in quick} <= {i.id for i in mixed}
    # categories take turns, so a limited run is still a mix
    assert len({i.category for i in mixed[:6]}) == 6


def test_arithmetic_answers_operation_counts_and_parentheses():
    items = load_suite("arithmetic").items
    for item in items:
        expr = re.fullmatch(r"What is (.+)\? Answer with a number only\.", item.question).group(1)
        assert eval(expr.replace("×", "*").replace("÷", "/")) == pytest.approx(int(item.answer)), item
        assert len(re.findall(r" [-+×÷] ", expr)) == item.difficulty
    multi = [i for i in items if i.difficulty >= 2]
    assert any("(" in i.question for i in multi) and any("(" not in i.question for i in multi)
    assert all(int(i.answer) >= 0 for i in items if i.difficulty <= 3)


def test_date_answers_recomputed_with_datetime():
    seen = Counter()
    for item in load_suite("dates").items:
        q = _stem(item)
        iso = [dt.date.fromisoformat(d) for d in re.findall(r"\d{4}-\d{2}-\d{2}", q)]
        if m := re.fullmatch(r"What date is (?:the day after|(\d+) days (after|before)) \S+\?", q):
            days = int(m.group(1) or 1) * (-1 if m.group(2) == "before" else 1)
            assert item.answer == (iso[0] + dt.timedelta(days=days)).isoformat(), item
            seen["shift"] += 1
        elif q.startswith("How many days after"):
            assert int(item.answer) == (iso[1] - iso[0]).days, item
            seen["between"] += 1
        elif "day of the week" in q:
            assert item.answer == WEEKDAYS[iso[-1].weekday()], item
            if len(iso) == 2:  # the anchor given in the question is itself true
                assert re.search(rf"is a {WEEKDAYS[iso[0].weekday()]}\.", q), item
            seen["weekday"] += 1
        else:
            pytest.fail(f"unrecognised date question: {q}")
    assert min(seen.values()) >= 5, seen


def test_letter_counts_recomputed_with_str_count():
    items = load_suite("letters").items
    for item in items:
        letter, text = re.match(r'How many times does the letter "(.)" appear in the (?:word|phrase) "([^"]+)"',
                                item.question).groups()
        assert int(item.answer) == text.count(letter), item
    assert {"strawberry", "mississippi"} & {re.search(r'"([^"]+)"\?', i.question).group(1) for i in items}
    assert any(" " in re.search(r'"([^"]+)"\?', i.question).group(1) for i in items if i.difficulty == 5)


_N = r"(-?\d+(?:\.\d+)?)"
_UNIT_RULES = [
    (rf"How many (?:meters|grams) are in {_N} (?:kilometers|kilograms)\?", lambda x: x * 1000),
    (rf"How many minutes are in {_N} hours\?", lambda h: h * 60),
    (rf"How many (?:kilometers|kilograms) are {_N} (?:meters|grams)\?", lambda x: x / 1000),
    (rf"How many minutes are in {_N} hours? and {_N} minutes?\?", lambda h, m: h * 60 + m),
    (rf"What is {_N} degrees Celsius in degrees Fahrenheit\?", lambda c: c * 9 / 5 + 32),
    (rf"How many hours are {_N} minutes\?", lambda m: m / 60),
    (rf"A runner runs {_N} kilometers? and then another {_N} meters\. How many meters does the runner run in total\?",
     lambda k, m: k * 1000 + m),
    (rf"What is {_N} degrees Fahrenheit in degrees Celsius\?", lambda f: (f - 32) * 5 / 9),
    (rf"How many meters per second is {_N} km per hour\?", lambda v: v / 3.6),
    (rf"How many seconds are in {_N} hours?, {_N} minutes? and {_N} seconds?\?", lambda h, m, s: h * 3600 + m * 60 + s),
    (rf"One cake needs {_N} grams of flour\. How many kilograms of flour are needed for {_N} cakes\?",
     lambda g, n: g * n / 1000),
    (rf"Walking at {_N} km per hour, how many minutes does it take to walk {_N} kilometers\?", lambda v, d: d / v * 60),
]


def test_unit_answers_recomputed():
    for item in load_suite("units").items:
        q = _stem(item)
        for pattern, solve in _UNIT_RULES:
            if m := re.fullmatch(pattern, q):
                value = solve(*map(float, m.groups()))
                break
        else:
            pytest.fail(f"unrecognised unit question: {q}")
        if "Round to one decimal place" in item.question:
            assert item.answer == f"{round(value, 1):.1f}", item
        else:
            assert float(item.answer) == pytest.approx(value, abs=1e-9), item
    assert any("Round to" in i.question for i in load_suite("units").items)


_WORD_RULES = [
    (r"\w+ buys (\d+) pencils that cost (\d+) cents each\..*", lambda n, p: n * p),
    (r"\w+ is (\d+) years old\. How old will \w+ be in (\d+) years\?", lambda a, k: a + k),
    (r"\w+ has (\d+) marbles and gives (\d+) of them.*", lambda a, b: a - b),
    (r"A notebook costs \$(\d+) and a pen costs \$(\d+)\. .* pays with a \$(\d+) bill\..*", lambda a, b, c: c - a - b),
    (r"A car travels at (\d+) km per hour\. .* in (\d+) hours\?", lambda v, t: v * t),
    (r"A box holds (\d+) eggs\. How many boxes are needed to pack (\d+) eggs\?", lambda k, n: n / k),
    (r"\w+ buys (\d+) apples at \$(\d+) each and (\d+) mangoes at \$(\d+) each, and pays with a \$(\d+) bill\..*",
     lambda n1, p1, n2, p2, bill: bill - n1 * p1 - n2 * p2),
    (r"\w+ is (\d+) years old\. \w+'s mother is (\d+) times as old as \w+\. .* in (\d+) years\?",
     lambda a, m, k: a * m + k),
    (r"A machine makes (\d+) parts every minute\. How many parts does it make in (\d+) hours\?",
     lambda r, h: r * h * 60),
    (r"A book has (\d+) pages\. \w+ reads (\d+) pages a day for (\d+) days, then (\d+) pages a day for (\d+) days\..*",
     lambda total, p, d, q, e: total - p * d - q * e),
    (r"A bus drives for (\d+) hours at (\d+) km per hour, then for (\d+) hours at (\d+) km per hour\..*",
     lambda t1, v1, t2, v2: t1 * v1 + t2 * v2),
    (r"\w+ is (\d+) years older than \w+\. Together their ages add up to (\d+)\..*", lambda k, s: (s + k) / 2),
    (r"A jacket costs \$(\d+)\. During a sale every jacket is (\d+)% off\. \w+ buys (\d+) jackets and pays with a "
     r"\$(\d+) bill\..*", lambda p, pct, n, bill: bill - n * p * (100 - pct) / 100),
    (r"Pipe A pours (\d+) liters .* pipe B pours (\d+) liters per minute\. The tank holds (\d+) liters.*",
     lambda a, b, c: c / (a + b)),
    (r"\w+ is (\d+) years old and \w+'s father is (\d+)\. In how many years will the father be exactly twice.*",
     lambda child, father: father - 2 * child),
]


def test_word_problem_answers_recomputed():
    for item in load_suite("word_problems").items:
        q = _stem(item)
        for pattern, solve in _WORD_RULES:
            if m := re.fullmatch(pattern, q):
                assert float(item.answer) == solve(*map(int, m.groups())), item
                assert float(item.answer) == int(item.answer) and int(item.answer) >= 0, item
                break
        else:
            pytest.fail(f"unrecognised word problem: {q}")


def test_facts_file():
    facts = {_stem(i): i for i in load_suite("facts").items}
    assert len(facts) >= 40
    assert facts["What is the capital of France?"].answer == "Paris"
    assert facts["What is the chemical symbol of gold?"].answer == "Au"
    assert facts["How many planets are in the Solar System?"].kind == "numeric"
    choice = [i for i in facts.values() if i.kind == "choice"]
    assert len(choice) >= 8
    gas = next(i for i in choice if "photosynthesis" in i.question)
    assert gas.choices[ord(gas.answer) - ord("A")] == "Carbon dioxide"
    assert "Answer with the letter of the correct option only." in gas.question


def test_every_builtin_item_scores_its_own_answer():
    for item in load_suite("mixed").items + load_suite("facts").items:
        assert score(item, item.answer).correct, item
        assert score(item, f"The answer is {item.answer}.").correct, item
        if item.kind == "numeric":
            wrong = str(int(float(item.answer)) + 1)
            assert not score(item, wrong).correct, item


# --- JSONL files ---------------------------------------------------------------------------------------------


def test_jsonl_with_malformed_lines(tmp_path: Path):
    lines = [
        json.dumps({"question": "What is 2 + 2?", "answer": "4"}),
        "{not json",
        json.dumps({"question": "Capital of Peru?", "answer": "Lima", "id": "peru", "difficulty": 2,
                    "category": "geo"}),
        "",
        json.dumps({"question": "no answer here"}),
        json.dumps({"question": "Best color?", "answer": "Blue", "choices": ["Red", "Blue"]}),
        json.dumps({"question": "Odd one", "answer": "C", "choices": "A or B"}),
        json.dumps({"question": "Too hard", "answer": 1, "difficulty": 9}),
        json.dumps({"question": "Pi to two decimals?", "answer": 3.14}),
        json.dumps({"question": "Again", "answer": "x", "id": "peru"}),
        json.dumps(["a", "list"]),
        json.dumps({"question": "Pick", "answer": "E", "choices": ["x", "y"]}),
    ]
    path = tmp_path / "my suite.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    suite = load_suite(str(path))
    assert suite.name == "my suite" and suite.source == str(path)
    by_id = {i.id: i for i in suite.items}
    assert list(by_id) == ["line-1", "peru", "line-6", "line-9"]
    assert by_id["line-1"].kind == "numeric" and by_id["line-1"].difficulty == 1
    assert (by_id["peru"].kind, by_id["peru"].difficulty, by_id["peru"].category) == ("exact", 2, "geo")
    color = by_id["line-6"]
    assert (color.kind, color.answer, color.choices) == ("choice", "B", ("Red", "Blue"))
    assert color.question.endswith("A) Red\nB) Blue\n\nAnswer with the letter of the correct option only.")
    assert (by_id["line-9"].kind, by_id["line-9"].answer) == ("numeric", "3.14")
    assert [e.split(":")[0] for e in suite.errors] == ["line 2", "line 5", "line 7", "line 8", "line 10", "line 11",
                                                       "line 12"]
    assert "not valid JSON" in suite.errors[0] and '"answer"' in suite.errors[1]
    assert "choices" in suite.errors[2] and "difficulty" in suite.errors[3] and "duplicate" in suite.errors[4]


def test_jsonl_choice_question_that_lists_its_options_is_kept(tmp_path: Path):
    q = "Which is a fruit?\nA) Apple\nB) Rock\nReply with a letter."
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"question": q, "answer": "Apple", "choices": ["Apple", "Rock"]}) + "\n")
    [item] = load_suite(str(path)).items
    assert item.question == q and item.answer == "A"


def test_empty_or_useless_files_are_refused(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LocalmoeError, match="no usable questions"):
        load_suite(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    with pytest.raises(LocalmoeError, match=r"line 1: not valid JSON.*\(and 1 more\)"):
        load_suite(str(bad))
    with pytest.raises(LocalmoeError, match="not a file"):
        load_suite(str(tmp_path))


def test_unknown_suite_lists_the_builtin_names():
    with pytest.raises(LocalmoeError) as err:
        load_suite("arithmatic")
    message = str(err.value)
    assert "'arithmatic'" in message and "\n" not in message
    assert all(name in message for name in builtin_suites()) and "hf:gsm8k" in message


def test_a_suite_file_that_does_not_exist_is_named_as_such(tmp_path):
    for name in (str(tmp_path / "mine.jsonl"), "mine.jsonl", str(tmp_path / "suites" / "x")):
        with pytest.raises(LocalmoeError, match=r"^suite file .* does not exist$"):
            load_suite(name)


def test_limit():
    full = load_suite("mixed").items
    assert load_suite("mixed", limit=7).items == full[:7]
    assert len(load_suite("quick", limit=1000).items) == 24
    with pytest.raises(LocalmoeError, match="at least 1"):
        load_suite("quick", limit=0)


# --- scoring -------------------------------------------------------------------------------------------------

NUM = Item("n", "What is 6 × 7? Answer with a number only.", "42", "numeric")
MONEY = Item("m", "How much? Answer with a number only.", "1234.5", "numeric")
NEG = Item("neg", "What is 4 - 7? Answer with a number only.", "-3", "numeric")
ROUNDED = Item("r", "What is 16 degrees Fahrenheit in degrees Celsius? Round to one decimal place and answer with a "
               "number only.", "-8.9", "numeric")
EXACT_DECIMAL = Item("p", "How many kilometers are 3140 meters? Answer with a number only.", "3.14", "numeric")


@pytest.mark.parametrize("item, output, correct, method", [
    (NUM, "42", True, "first_line"),
    (NUM, "The answer is 42.", True, "answer_phrase"),
    (NUM, "6 × 7 = 42", True, "equation_line"),
    (NUM, "x = 42", True, "last_number"),  # no worked equation: no digit, operator, digit before "="
    (NUM, "**6 × 7 = 42**", True, "equation_line"),
    (NUM, "**42**", True, "first_line"),
    (NUM, "42\n\nExplanation: 6 times 7 is 42, because 6 + 6 + 6 + 6 + 6 = 30 and 30 + 12 = 42.", True, "first_line"),
    (NUM, "42 apples", True, "first_line"),
    (NUM, "The answer is: 6 × 7 = 42", True, "answer_phrase"),
    (NUM, "Answer: 42.0", True, "answer_phrase"),
    (NUM, "\\boxed{42}", True, "boxed"),
    (NUM, "Forty-two.", True, "number_word"),
    (NUM, "43", False, "first_line"),
    (NUM, "The answer is 41. Let me check: 6 × 7 = 42", False, "answer_phrase"),  # the committed answer counts
    (NUM, "To solve this, multiply 6 by 7.", False, "last_number"),
    (NUM, "42.5", False, "first_line"),
    # a first line that is a worked equation commits to its result, whatever the later lines ramble about
    (NUM, "6 × 7 = 42\n\nIn mathematics, 6 and 7 are both integers, and 7 is odd.", True, "equation_line"),
    (NUM, "6 × 7 = 41\n\nSo the product is 42.", False, "equation_line"),
    (NUM, "6 × 7 = 42 apples, or 43\n", False, "last_number"),  # not an equation alone
    # ...unless a later line works on from it or takes it back
    (Item("s", "What is 17 × 23 + 4?", "395", "numeric"), "17 × 23 = 391\n391 + 4 = 395", True, "last_number"),
    (NUM, "6 × 7 = 42\nWait, 6 × 7 = 48.", False, "last_number"),
    (NUM, "6 × 7 = 42\nActually it is 48.", False, "last_number"),
    (NUM, "2024 = 41\nSo 42.", True, "last_number"),  # no arithmetic before "=": not an equation
    (NUM, "I don't know.", False, "none"),
    (MONEY, "$1,234.50", True, "first_line"),
    (MONEY, "The total cost is $1,234.50 in all.", True, "last_number"),
    (MONEY, "1234.49", False, "first_line"),
    (NEG, "-3", True, "first_line"),
    (NEG, "4 - 7 = -3", True, "equation_line"),
    (NEG, "The result is −3.", True, "answer_phrase"),
    (NEG, "3", False, "first_line"),
    (ROUNDED, "-8.9", True, "first_line"),
    (ROUNDED, "-8.89 °C", True, "first_line"),  # rounding was asked for: -8.89 rounds to -8.9
    (ROUNDED, "-9", False, "first_line"),
    (EXACT_DECIMAL, "3.14", True, "first_line"),
    (EXACT_DECIMAL, "3.14159", False, "first_line"),  # no rounding asked: extra digits are a different value
    (EXACT_DECIMAL, "3.140 km", True, "first_line"),
])
def test_score_numeric(item, output, correct, method):
    verdict = score(item, output)
    assert (verdict.correct, verdict.method) == (correct, method), verdict


def test_extract_number_details():
    assert extract_number("3/4 of a cup")[0] == pytest.approx(0.75)
    assert extract_number("The molecule H2O has 3 atoms.")[1] == "3"
    assert extract_number("5-3")[1] == "3"  # a hyphen between digits is not a minus sign
    assert extract_number("#### 72")[0] == 72
    assert extract_number("no digits at all") is None


CAPITAL = Item("c", "What is the capital of France? Answer with one word.", "Paris", "exact")
DAY = Item("d", "What day of the week was 2001-07-05? Answer with the name of the day only.", "Thursday", "exact")
DATE = Item("t", "What date is the day after 2000-10-10? Answer with the date in YYYY-MM-DD format only.",
            "2000-10-11", "exact")
CENTURY = Item("y", "What is a period of a hundred years called?", "century", "exact")
SQL = Item("s", "What does SQL stand for?", "Structured Query Language", "exact")
TOWER = Item("e", "In which city is the Eiffel Tower?", "Paris", "exact")
KANGAROO = Item("k", "Which country are kangaroos native to?", "Australia", "exact")


@pytest.mark.parametrize("item, output, correct", [
    (CAPITAL, "Paris", True),
    (CAPITAL, "paris.", True),
    (CAPITAL, "**Paris**", True),
    (CAPITAL, "The capital of France is Paris.", True),
    (CAPITAL, "Paris is the capital of France.", True),
    (CAPITAL, "The answer is Paris.", True),
    (CAPITAL, "Paris, of course! It is famous for the Eiffel Tower.", True),
    (CAPITAL, "PARÍS", True),
    (CAPITAL, "Lyon", False),
    (CAPITAL, "It could be Paris or Lyon.", False),
    (CAPITAL, "The capital of France is Lyon, not Paris.", False),
    (CAPITAL, "The answer is not Paris.", False),
    (CAPITAL, "Marseille. Paris is only the largest city.", False),
    (CAPITAL, "", False),
    (DAY, "Thursday", True),
    (DAY, "It was a Thursday.", True),
    (DAY, "Thursday, July 5, 2001", True),
    (DAY, "Friday", False),
    (DAY, "Wednesday or Thursday", False),
    (DATE, "2000-10-11", True),
    (DATE, "The date is 2000-10-11.", True),
    (DATE, "2000-10-12", False),
    (DATE, "October 11, 2000", False),  # the question asked for YYYY-MM-DD
    # naming verbs after the copula: the name that follows is the answer
    (CENTURY, "A period of a hundred years is called a century.", True),
    (CENTURY, "It is known as a century, from the Latin centum.", True),
    (CENTURY, "A period of a hundred years is called a decade.", False),
    (CENTURY, "It is called a century or a decade.", False),
    (CENTURY, "It's called a century.", True),
    (CENTURY, "It is also called a century.", True),
    (CENTURY, "It's sometimes known as a decade.", False),
    (SQL, "SQL stands for Structured Query Language. It is used with databases.", True),
    (SQL, "SQL stands for Standard Query Language.", False),
    # the first copula's complement, when a later clause has its own ("…, which is a measure of …")
    (SQL, "SQL stands for Structured Query Language, which is a language for databases.", True),
    (SQL, "SQL stands for Standard Query Language, which is a language for databases.", False),
    # a place after "is located in" / "is in" / "is native to"
    (TOWER, "The Eiffel Tower is located in Paris, France.", True),
    (TOWER, "The Eiffel Tower is in Paris.", True),
    (TOWER, "The Eiffel Tower is located in Lyon, not Paris.", False),
    (TOWER, "The Eiffel Tower is not in Paris.", False),
    (TOWER, "It is located in Paris or Lyon.", False),
    (KANGAROO, "The kangaroo is native to Australia.", True),
    (KANGAROO, "The kangaroo is native to New Zealand.", False),
])
def test_score_exact(item, output, correct):
    assert score(item, output).correct is correct, score(item, output)


GAS = Item("g", suites.with_options("Which gas do plants take from the air?", ["Oxygen", "Carbon dioxide", "Nitrogen",
                                                                            "Helium"]),
           "B", "choice", ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium"))


@pytest.mark.parametrize("output, letter, method", [
    ("B", "B", "letter"),
    ("(B)", "B", "letter"),
    ("b", "B", "letter"),
    ("**B**", "B", "letter"),
    ("Answer: B", "B", "answer_phrase"),
    ("The answer is B) Carbon dioxide", "B", "answer_phrase"),
    ("The correct answer is (B).", "B", "answer_phrase"),
    ("Option B is correct.", "B", "answer_phrase"),
    ("B) Carbon dioxide", "B", "leading_letter"),
    ("B. Carbon dioxide\nPlants need it for photosynthesis, and they release oxygen.", "B", "leading_letter"),
    ("Carbon dioxide", "B", "option_text"),
    ("Plants absorb carbon dioxide from the air.", "B", "option_text"),
    ("I think B", "B", "lone_letter"),
    ("A", "A", "letter"),
    ("The answer is C) Nitrogen", "C", "answer_phrase"),
    ("Oxygen", "A", "option_text"),
    ("A) Oxygen\nB) Carbon dioxide\nC) Nitrogen\nD) Helium", None, "none"),  # recites the options
    ("Plants take in carbon dioxide and give off oxygen.", None, "none"),  # two options, no choice
    ("E", None, "none"),  # not one of the four letters
    ("I'm not sure.", None, "none"),
])
def test_score_choice(output, letter, method):
    verdict = score(GAS, output)
    assert verdict == Verdict(letter == "B", letter, method)


# --- Hugging Face datasets -----------------------------------------------------------------------------------

GSM8K_ROW = {"question": "Tom has 3 bags of 4 apples. He eats 2. How many are left?",
             "answer": "Tom has 3*4=<<3*4=12>>12 apples.\nAfter eating, 12-2=<<12-2=10>>10 are left.\n#### 10"}
MMLU_ROW = {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
            "answer": 1}
ARC_ROW = {"id": "Mercury_123", "question": "Which is a source of light?",
           "choices": {"text": ["the Moon", "the Sun", "a mirror"], "label": ["1", "2", "3"]}, "answerKey": "2"}


def test_hf_converters():
    g = gsm8k_item(GSM8K_ROW, 0)
    assert (g.id, g.answer, g.kind, g.difficulty, g.category) == ("gsm8k-0001", "10", "numeric", 2, "gsm8k")
    assert g.question.startswith(GSM8K_ROW["question"]) and "The answer is" in g.question
    assert gsm8k_item({"question": "q", "answer": "lots of work\n#### 1,234"}, 4).answer == "1234"
    m = mmlu_item(MMLU_ROW, 6)
    assert (m.id, m.answer, m.kind, m.choices, m.category) == ("mmlu-00007", "B", "choice", ("3", "4", "5", "22"),
                                                               "elementary_mathematics")
    assert "\nB) 4\n" in m.question and score(m, "B) 4").correct and not score(m, "22").correct
    a = arc_item(ARC_ROW, 0)
    assert (a.id, a.answer, a.choices) == ("arc-Mercury_123", "B", ("the Moon", "the Sun", "a mirror"))
    assert "\nC) a mirror\n" in a.question and score(a, "The answer is B.").correct

    items, errors = convert_rows([GSM8K_ROW, {"question": "q", "answer": "no marker"}, {"answer": "#### 1"}],
                                 gsm8k_item)
    assert [i.id for i in items] == ["gsm8k-0001"]
    assert errors[0].startswith("row 2: no number after '####'") and errors[1].startswith("row 3:")
    with pytest.raises(ValueError, match="does not name"):
        mmlu_item(dict(MMLU_ROW, answer=7), 0)
    with pytest.raises(ValueError, match="answerKey"):
        arc_item(dict(ARC_ROW, answerKey="E"), 0)


def test_hf_offline_and_not_cached_says_it_needs_the_network(monkeypatch: pytest.MonkeyPatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LocalmoeError, match="needs the network once"):
        load_suite("hf:gsm8k")


def test_hf_unresolvable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("huggingface_hub")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(LocalmoeError, match="hf:mmlu:anatomy is not downloaded yet.*needs the network once"):
        load_suite("hf:mmlu:anatomy")


def test_hf_bad_names():
    with pytest.raises(LocalmoeError, match="unknown hub suite"):
        load_suite("hf:squad")
    with pytest.raises(LocalmoeError, match="subject"):
        load_suite("hf:mmlu:../etc")


def test_hf_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    from localmoe.home import install

    # the command that fits how localmoe was installed (here: a checkout's venv), not a bare `pip`
    hint = install.install_command("huggingface-hub", no_deps=False)
    with pytest.raises(LocalmoeError, match=re.escape(f"`{hint}`")):
        load_suite("hf:arc")


def _fake_download(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[tuple[str, str]]:
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def download(repo_id, filename, **kwargs):
        assert kwargs["repo_type"] == "dataset"
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    return calls


def test_hf_download_converts_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [ARC_ROW, dict(ARC_ROW, id="x2", answerKey="3"),
                                                      {"id": "broken"}]))
    calls = _fake_download(monkeypatch, rows)
    suite = load_suite("hf:arc", limit=5)
    assert calls[0] == ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet")
    assert (suite.name, suite.source) == ("hf:arc", "hf:arc")
    assert [(i.id, i.answer) for i in suite.items] == [("arc-Mercury_123", "B"), ("arc-x2", "C")]
    assert len(suite.errors) == 1 and suite.errors[0].startswith("row 3:")
    assert (home / "datasets" / "arc.jsonl").is_file()
    # later runs read the converted copy: no hub package, no network
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    again = load_suite("hf:arc")
    assert again.items == suite.items and again.errors == []


def test_hf_parquet_without_pyarrow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    data = tmp_path / "test-00000-of-00001.parquet"
    data.write_bytes(b"PAR1")
    _fake_download(monkeypatch, data)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LocalmoeError, match=re.escape(f"needs pyarrow: `{sys.executable} -m pip install pyarrow`")):
        load_suite("hf:gsm8k")
