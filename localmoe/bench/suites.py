"""Benchmark suites: questions whose answers a program can check, built in, from a JSONL file or from the HF hub.

Built-in suites are generated from fixed seeds, so every run on every machine asks the same questions and
accuracy-per-watt figures from different days or machines stay comparable. Every question says what form the
answer must take ("Answer with a number only."), which is what makes grading a small model's reply fair;
multiple-choice questions carry their lettered options in the question text, so `Item.question` is the whole
prompt for every kind.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import os
import random
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from localmoe.bench.scoring import LETTERS, normalize, parse_number
from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import install, paths

KINDS = ("numeric", "exact", "choice")
NUMBER_ONLY = "Answer with a number only."
DATE_ONLY = "Answer with the date in YYYY-MM-DD format only."
WEEKDAY_ONLY = "Answer with the name of the day only."
LETTER_ONLY = "Answer with the letter of the correct option only."
GSM8K_INSTRUCTION = "Solve the problem, then finish with the line: The answer is N (N being a number)."
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Item:
    id: str  # stable within a suite, e.g. "arith-017"
    question: str  # the whole prompt: for "choice" it lists the options and asks for a letter
    answer: str  # canonical answer as text ("42", "Paris", "B", "2024-03-01")
    kind: str  # "numeric" | "exact" | "choice": how scoring.score() grades it
    choices: tuple[str, ...] | None = None  # for "choice": the options, lettered A, B, C... in order
    difficulty: int = 1  # 1 (one step) .. 5 (many steps)
    category: str = ""  # arithmetic, word_problem, date, unit, letters, fact, gsm8k, ...

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "question": self.question, "answer": self.answer, "kind": self.kind}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        d.update(difficulty=self.difficulty, category=self.category)
        return d


@dataclass
class Suite:
    name: str
    items: list[Item]
    source: str  # "builtin" | path of the JSONL | "hf:gsm8k" ...
    errors: list[str]  # problems found while loading ("line 7: not valid JSON"); the other items still load


# --- shared helpers ------------------------------------------------------------------------------------------


def _fmt(value: Fraction, decimals: int | None = None) -> str:
    """A number as canonical answer text: "42", "2.75", or exactly `decimals` places rounded half up ("21.0")."""
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    if decimals is not None:
        return format(exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP), "f")
    if value.denominator == 1:
        return str(value.numerator)
    return format(exact.normalize(), "f")


def with_options(question: str, choices: Iterable[str]) -> str:
    """The question followed by its lettered options and the instruction to answer with a letter."""
    lines = [f"{LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{LETTER_ONLY}"


def _lists_options(question: str) -> bool:
    return bool(re.search(r"(?m)^\s*\(?A\)", question) and re.search(r"(?m)^\s*\(?B\)", question))


# --- generated suites ----------------------------------------------------------------------------------------

Template = Callable[[random.Random], tuple[str, str, str]]  # rng -> (question, answer, kind)


def _generate(prefix: str, category: str, seed: int, count: int, templates: dict[int, list[Template]]) -> list[Item]:
    """`count` items whose difficulty cycles 1..5, so any prefix of the list covers the range."""
    rng = random.Random(seed)
    items: list[Item] = []
    seen: set[str] = set()
    for i in range(count):
        difficulty = i % 5 + 1
        for _ in range(1000):
            question, answer, kind = rng.choice(templates[difficulty])(rng)
            if question not in seen:
                break
        else:
            raise AssertionError(f"{category}: cannot draw a new question of difficulty {difficulty}")
        seen.add(question)
        items.append(Item(f"{prefix}-{i + 1:03d}", question, answer, kind, difficulty=difficulty, category=category))
    return items


class _Reject(Exception):
    """A drawn expression with a fractional or oversized intermediate: draw again."""


_PRECEDENCE = {"+": 1, "-": 1, "×": 2, "÷": 2}
_APPLY = {"+": operator.add, "-": operator.sub, "×": operator.mul, "÷": operator.truediv}


def _expression(rng: random.Random, n_ops: int, factor: bool = False) -> tuple[str, Fraction, int]:
    """(text, value, precedence) of a random expression with `n_ops` operators and integer intermediates."""
    if n_ops == 0:
        v = rng.randint(2, 12) if factor else rng.randint(2, 60)
        return str(v), Fraction(v), 3
    op = rng.choice("+-×÷")
    left_ops = rng.randint(0, n_ops - 1)
    right = _expression(rng, n_ops - 1 - left_ops, factor=op in "×÷")
    if op == "÷" and left_ops == 0:
        # a plain dividend is drawn as a multiple of the divisor, so most divisions come out exact
        if right[1] <= 0:
            raise _Reject
        dividend = right[1] * rng.randint(2, 9)
        left: tuple[str, Fraction, int] = (str(dividend), dividend, 3)
    else:
        left = _expression(rng, left_ops, factor=op in "×÷")
    a, b = left[1], right[1]
    if op == "÷" and (b == 0 or (a / b).denominator != 1):
        raise _Reject
    value = _APPLY[op](a, b)
    if abs(value) > 2000:
        raise _Reject
    prec = _PRECEDENCE[op]
    left_text = f"({left[0]})" if left[2] < prec else left[0]
    right_text = f"({right[0]})" if right[2] < prec or (right[2] == prec and op in "-÷") else right[0]
    return f"{left_text} {op} {right_text}", value, prec


def _arithmetic_template(n_ops: int) -> Template:
    def draw(rng: random.Random) -> tuple[str, str, str]:
        while True:
            try:
                text, value, _ = _expression(rng, n_ops)
            except _Reject:
                continue
            # negative results only where the question is long anyway: they are a trap rather than a step
            if (0 if n_ops < 4 else -99) <= value <= 5000:
                return f"What is {text}? {NUMBER_ONLY}", _fmt(value), "numeric"

    return draw


NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya")


def _num(question: str, value: int | Fraction) -> tuple[str, str, str]:
    return f"{question} {NUMBER_ONLY}", _fmt(Fraction(value)), "numeric"


def _wp_pencils(r: random.Random) -> tuple[str, str, str]:
    name, n, p = r.choice(NAMES), r.randint(3, 9), r.randint(2, 9) * 5
    return _num(f"{name} buys {n} pencils that cost {p} cents each. How many cents does {name} spend in total?",
                n * p)


def _wp_age_later(r: random.Random) -> tuple[str, str, str]:
    name, a, k = r.choice(NAMES), r.randint(6, 40), r.randint(2, 15)
    return _num(f"{name} is {a} years old. How old will {name} be in {k} years?", a + k)


def _wp_marbles(r: random.Random) -> tuple[str, str, str]:
    name, a = r.choice(NAMES), r.randint(20, 90)
    b = r.randint(3, a - 5)
    return _num(f"{name} has {a} marbles and gives {b} of them to a friend. How many marbles does {name} have left?",
                a - b)


def _wp_change(r: random.Random) -> tuple[str, str, str]:
    name, a, b = r.choice(NAMES), r.randint(2, 9), r.randint(1, 9)
    bill = r.choice((20, 50))
    return _num(f"A notebook costs ${a} and a pen costs ${b}. {name} buys one of each and pays with a ${bill} bill. "
                f"How many dollars of change does {name} get?", bill - a - b)


def _wp_distance(r: random.Random) -> tuple[str, str, str]:
    v, t = r.randint(8, 18) * 5, r.randint(2, 6)
    return _num(f"A car travels at {v} km per hour. How many kilometers does it travel in {t} hours?", v * t)


def _wp_boxes(r: random.Random) -> tuple[str, str, str]:
    k = r.choice((6, 10, 12))
    n = k * r.randint(3, 15)
    return _num(f"A box holds {k} eggs. How many boxes are needed to pack {n} eggs?", n // k)


def _wp_two_items(r: random.Random) -> tuple[str, str, str]:
    name, n1, p1, n2, p2 = r.choice(NAMES), r.randint(2, 6), r.randint(1, 4), r.randint(2, 5), r.randint(2, 6)
    total = n1 * p1 + n2 * p2
    bill = next(b for b in (20, 50, 100) if b > total)
    return _num(f"{name} buys {n1} apples at ${p1} each and {n2} mangoes at ${p2} each, and pays with a ${bill} "
                f"bill. How many dollars of change does {name} get?", bill - total)


def _wp_mother(r: random.Random) -> tuple[str, str, str]:
    name, m, k = r.choice(NAMES), r.randint(2, 4), r.randint(2, 12)
    a = r.randint(max(7, -(-24 // m)), min(15, 50 // m))  # a mother aged 24 to 50
    return _num(f"{name} is {a} years old. {name}'s mother is {m} times as old as {name}. "
                f"How old will the mother be in {k} years?", m * a + k)


def _wp_machine(r: random.Random) -> tuple[str, str, str]:
    rate, h = r.randint(3, 12), r.randint(2, 8)
    return _num(f"A machine makes {rate} parts every minute. How many parts does it make in {h} hours?", rate * 60 * h)


def _wp_pages(r: random.Random) -> tuple[str, str, str]:
    name, p, d, q, e = r.choice(NAMES), r.randint(10, 25), r.randint(3, 7), r.randint(20, 40), r.randint(2, 5)
    left = r.randint(20, 150)
    return _num(f"A book has {p * d + q * e + left} pages. {name} reads {p} pages a day for {d} days, then {q} pages "
                f"a day for {e} days. How many pages are left to read?", left)


def _wp_two_legs(r: random.Random) -> tuple[str, str, str]:
    v1, t1, v2, t2 = r.randint(6, 16) * 5, r.randint(2, 5), r.randint(6, 16) * 5, r.randint(2, 5)
    return _num(f"A bus drives for {t1} hours at {v1} km per hour, then for {t2} hours at {v2} km per hour. "
                f"How many kilometers does it drive in total?", v1 * t1 + v2 * t2)


def _wp_sum_ages(r: random.Random) -> tuple[str, str, str]:
    older, younger = r.sample(NAMES, 2)
    y, k = r.randint(4, 30), r.randint(1, 9)
    return _num(f"{older} is {k} years older than {younger}. Together their ages add up to {2 * y + k}. "
                f"How old is {older}?", y + k)


def _wp_discount(r: random.Random) -> tuple[str, str, str]:
    name, p, pct, n = r.choice(NAMES), r.choice((20, 40, 60, 80, 120)), r.choice((10, 20, 25, 50)), r.randint(2, 4)
    total = n * p * (100 - pct) // 100
    bill = next(b for b in (50, 100, 200, 500) if b > total)
    return _num(f"A jacket costs ${p}. During a sale every jacket is {pct}% off. {name} buys {n} jackets and pays "
                f"with a ${bill} bill. How many dollars of change does {name} get?", bill - total)


def _wp_pipes(r: random.Random) -> tuple[str, str, str]:
    a, b, t = r.randint(3, 9), r.randint(2, 8), r.randint(4, 20)
    return _num(f"Pipe A pours {a} liters of water per minute into a tank and pipe B pours {b} liters per minute. "
                f"The tank holds {(a + b) * t} liters and starts empty. How many minutes do both pipes together take "
                f"to fill it?", t)


def _wp_twice_as_old(r: random.Random) -> tuple[str, str, str]:
    name, child, gap = r.choice(NAMES), r.randint(3, 12), r.randint(20, 35)
    return _num(f"{name} is {child} years old and {name}'s father is {child + gap}. In how many years will the "
                f"father be exactly twice as old as {name}?", gap - child)


def _date(r: random.Random, first: int = 1990, last: int = 2030) -> dt.date:
    start = dt.date(first, 1, 1)
    return start + dt.timedelta(days=r.randrange((dt.date(last, 12, 31) - start).days + 1))


def _date_after(r: random.Random, low: int, high: int) -> tuple[str, str, str]:
    d, n = _date(r), r.randint(low, high)
    what = "the day after" if n == 1 else f"{n} days after"
    return f"What date is {what} {d.isoformat()}? {DATE_ONLY}", (d + dt.timedelta(days=n)).isoformat(), "exact"


def _date_before(r: random.Random) -> tuple[str, str, str]:
    d, n = _date(r), r.randint(20, 120)
    return f"What date is {n} days before {d.isoformat()}? {DATE_ONLY}", (d - dt.timedelta(days=n)).isoformat(), "exact"


def _days_between(r: random.Random, low: int, high: int) -> tuple[str, str, str]:
    d, n = _date(r), r.randint(low, high)
    later = (d + dt.timedelta(days=n)).isoformat()
    return f"How many days after {d.isoformat()} is {later}? {NUMBER_ONLY}", str(n), "numeric"


def _weekday_from(r: random.Random, low: int, high: int) -> tuple[str, str, str]:
    d, n = _date(r), r.randint(low, high) * r.choice((1, -1))
    target = d + dt.timedelta(days=n)
    return (f"{d.isoformat()} is a {WEEKDAYS[d.weekday()]}. What day of the week is {target.isoformat()}? "
            f"{WEEKDAY_ONLY}", WEEKDAYS[target.weekday()], "exact")


def _weekday(r: random.Random) -> tuple[str, str, str]:
    d = _date(r)
    tense = "was" if d.year < 2025 else "is"
    return f"What day of the week {tense} {d.isoformat()}? {WEEKDAY_ONLY}", WEEKDAYS[d.weekday()], "exact"


def _decimal(r: random.Random, low: int, high: int, places: int = 1) -> Fraction:
    """A number in [low, high] with `places` decimals, never a whole number."""
    scale = 10**places
    while (n := r.randint(low * scale, high * scale)) % 10 == 0:
        pass
    return Fraction(n, scale)


def _many(n: int, unit: str) -> str:
    return f"{n} {unit if n != 1 else unit.removesuffix('s')}"


def _unit(question: str, value: Fraction, decimals: int | None = None) -> tuple[str, str, str]:
    tail = NUMBER_ONLY if decimals is None else f"Round to {_PLACES[decimals]} and answer with a number only."
    return f"{question} {tail}", _fmt(value, decimals), "numeric"


_PLACES = {0: "the nearest whole number", 1: "one decimal place", 2: "two decimal places"}


def _u_km_m(r: random.Random) -> tuple[str, str, str]:
    km = r.randint(2, 50)
    return _unit(f"How many meters are in {km} kilometers?", Fraction(km * 1000))


def _u_kg_g(r: random.Random) -> tuple[str, str, str]:
    kg = r.randint(2, 40)
    return _unit(f"How many grams are in {kg} kilograms?", Fraction(kg * 1000))


def _u_h_min(r: random.Random) -> tuple[str, str, str]:
    h = r.randint(2, 24)
    return _unit(f"How many minutes are in {h} hours?", Fraction(h * 60))


def _u_km_m_decimal(r: random.Random) -> tuple[str, str, str]:
    km = _decimal(r, 1, 20)
    return _unit(f"How many meters are in {_fmt(km)} kilometers?", km * 1000)


def _u_m_km(r: random.Random) -> tuple[str, str, str]:
    m = r.randint(22, 198) * 50
    return _unit(f"How many kilometers are {m} meters?", Fraction(m, 1000))


def _u_g_kg(r: random.Random) -> tuple[str, str, str]:
    g = r.randint(11, 99) * 100 + r.choice((0, 50))
    return _unit(f"How many kilograms are {g} grams?", Fraction(g, 1000))


def _u_hm_min(r: random.Random) -> tuple[str, str, str]:
    h, m = r.randint(1, 9), r.randint(1, 59)
    return _unit(f"How many minutes are in {_many(h, 'hours')} and {_many(m, 'minutes')}?", Fraction(h * 60 + m))


def _u_c_f(r: random.Random) -> tuple[str, str, str]:
    c = r.randint(-8, 20) * 5
    return _unit(f"What is {c} degrees Celsius in degrees Fahrenheit?", Fraction(c) * 9 / 5 + 32)


def _u_min_h(r: random.Random) -> tuple[str, str, str]:
    m = r.randint(5, 40) * 15
    return _unit(f"How many hours are {m} minutes?", Fraction(m, 60))


def _u_km_plus_m(r: random.Random) -> tuple[str, str, str]:
    km, m = r.randint(1, 12), r.randint(1, 19) * 50
    return _unit(f"A runner runs {_many(km, 'kilometers')} and then another {m} meters. How many meters does the "
                 f"runner run in total?", Fraction(km * 1000 + m))


def _u_f_c(r: random.Random) -> tuple[str, str, str]:
    while (f := r.randint(-20, 220) - 32) % 9 == 0:  # an exact whole result would not exercise the rounding
        pass
    return _unit(f"What is {f + 32} degrees Fahrenheit in degrees Celsius?", Fraction(f) * 5 / 9, decimals=1)


def _u_kmh_ms(r: random.Random) -> tuple[str, str, str]:
    while (kmh := r.randint(10, 130)) % 18 == 0:
        pass
    return _unit(f"How many meters per second is {kmh} km per hour?", Fraction(kmh * 1000, 3600), decimals=1)


def _u_hms_s(r: random.Random) -> tuple[str, str, str]:
    h, m, s = r.randint(1, 5), r.randint(1, 59), r.randint(1, 59)
    duration = f"{_many(h, 'hours')}, {_many(m, 'minutes')} and {_many(s, 'seconds')}"
    return _unit(f"How many seconds are in {duration}?", Fraction(h * 3600 + m * 60 + s))


def _u_c_f_any(r: random.Random) -> tuple[str, str, str]:
    while (c := r.randint(-30, 45)) % 5 == 0:
        pass
    return _unit(f"What is {c} degrees Celsius in degrees Fahrenheit?", Fraction(c) * 9 / 5 + 32)


def _u_recipe(r: random.Random) -> tuple[str, str, str]:
    g, n = r.randint(12, 48) * 25, r.randint(3, 9)
    return _unit(f"One cake needs {g} grams of flour. How many kilograms of flour are needed for {n} cakes?",
                 Fraction(g * n, 1000))


def _u_walk(r: random.Random) -> tuple[str, str, str]:
    v, k = r.randint(3, 6), r.randint(2, 12)
    return _unit(f"Walking at {v} km per hour, how many minutes does it take to walk {_fmt(Fraction(v * k, 5))} "
                 f"kilometers?", Fraction(12 * k))


_WORDS = {
    1: ("apple", "tree", "book", "sheep", "hello", "pizza", "happy", "lemon", "grass", "queue"),
    2: ("banana", "letter", "coffee", "bottle", "cherry", "rabbit", "pepper", "summer", "bubble", "tomato"),
    3: ("strawberry", "mississippi", "committee", "bookkeeper", "assessment", "parallel", "chocolate",
        "excellence", "raspberry", "boomerang"),
    4: ("onomatopoeia", "unbelievable", "independence", "accommodation", "possessiveness", "bureaucracy",
        "entrepreneur", "hippopotamus", "intelligence", "millennium"),
    5: ("she sells sea shells by the sea shore", "peter piper picked a peck of pickled peppers",
        "red lorry yellow lorry", "a big black bug bit a big black bear", "how much wood would a woodchuck chuck",
        "the quick brown fox jumps over the lazy dog"),
}


def _letters_template(difficulty: int) -> Template:
    def draw(r: random.Random) -> tuple[str, str, str]:
        text = r.choice(_WORDS[difficulty])
        present = [c for c in text if c.isalpha()]
        # a letter the word lacks now and then (answer 0), otherwise one drawn in proportion to how often it occurs
        absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in text]  # a pangram lacks none
        if difficulty >= 2 and r.random() < 0.15 and absent:
            letter = r.choice(absent)
        else:
            letter = r.choice(present)
        where = f'the phrase "{text}"' if " " in text else f'the word "{text}"'
        return (f'How many times does the letter "{letter}" appear in {where}? {NUMBER_ONLY}', str(text.count(letter)),
                "numeric")

    return draw


@cache
def _arithmetic(seed: int = 101, count: int = 40, prefix: str = "arith") -> tuple[Item, ...]:
    return tuple(_generate(prefix, "arithmetic", seed, count, {d: [_arithmetic_template(d)] for d in range(1, 6)}))


@cache
def _word_problems(seed: int = 202, count: int = 30, prefix: str = "word") -> tuple[Item, ...]:
    templates: dict[int, list[Template]] = {
        1: [_wp_pencils, _wp_age_later, _wp_marbles],
        2: [_wp_change, _wp_distance, _wp_boxes],
        3: [_wp_two_items, _wp_mother, _wp_machine],
        4: [_wp_pages, _wp_two_legs, _wp_sum_ages],
        5: [_wp_discount, _wp_pipes, _wp_twice_as_old],
    }
    return tuple(_generate(prefix, "word_problem", seed, count, templates))


@cache
def _dates(seed: int = 303, count: int = 30, prefix: str = "date") -> tuple[Item, ...]:
    templates: dict[int, list[Template]] = {
        1: [lambda r: _date_after(r, 1, 1), lambda r: _days_between(r, 2, 9)],
        2: [lambda r: _date_after(r, 2, 9), lambda r: _weekday_from(r, 1, 6)],
        3: [lambda r: _date_after(r, 10, 40), lambda r: _weekday_from(r, 7, 60), lambda r: _days_between(r, 10, 60)],
        4: [lambda r: _days_between(r, 61, 400), _date_before],
        5: [_weekday, lambda r: _date_after(r, 100, 1000)],
    }
    return tuple(_generate(prefix, "date", seed, count, templates))


@cache
def _units(seed: int = 404, count: int = 30, prefix: str = "unit") -> tuple[Item, ...]:
    templates: dict[int, list[Template]] = {
        1: [_u_km_m, _u_kg_g, _u_h_min],
        2: [_u_km_m_decimal, _u_m_km, _u_g_kg, _u_hm_min],
        3: [_u_c_f, _u_min_h, _u_km_plus_m],
        4: [_u_f_c, _u_kmh_ms, _u_hms_s],
        5: [_u_c_f_any, _u_recipe, _u_walk],
    }
    return tuple(_generate(prefix, "unit", seed, count, templates))


@cache
def _letters(seed: int = 505, count: int = 30, prefix: str = "letter") -> tuple[Item, ...]:
    return tuple(_generate(prefix, "letters", seed, count, {d: [_letters_template(d)] for d in range(1, 6)}))


@cache
def _authored(name: str, default_category: str = "") -> tuple[tuple[Item, ...], tuple[str, ...]]:
    text = files("localmoe.assets").joinpath("suites").joinpath(name).read_text(encoding="utf-8")
    items, errors = parse_jsonl(text, default_category=default_category)
    return tuple(items), tuple(errors)


def _facts() -> tuple[tuple[Item, ...], tuple[str, ...]]:
    return _authored("facts.jsonl", "fact")


_CATEGORIES: dict[str, Callable[[], tuple[Item, ...]]] = {
    "arithmetic": _arithmetic,
    "word_problems": _word_problems,
    "dates": _dates,
    "units": _units,
    "letters": _letters,
    "facts": lambda: _facts()[0],
}
_MIXES = {"quick": 4, "mixed": 20}  # items taken from each category
_GENERATED = (_arithmetic, _word_problems, _dates, _units, _letters)


def _router_train() -> list[Item]:
    """Questions for labelling the router: the same generators with other seeds (so no overlap with the
    evaluation suites' numbers), 100 per generated category, the authored facts, and questions written one by one
    in the many ways people type them (conversation, instructions, definitions, code, follow-ups...): a router
    trained on generated questions alone learns the generators' wording, not what makes a question hard."""
    items: list[Item] = []
    for n, build in enumerate(_GENERATED):
        default_prefix = build.__wrapped__.__defaults__[2]
        items += build(seed=7919 + n, count=100, prefix=f"rt-{default_prefix}")
    return items + list(_facts()[0]) + list(_authored("router_train_varied.jsonl")[0])


def builtin_suites() -> list[str]:
    return ["quick", *_CATEGORIES, "mixed", "router-train"]


def _spread(pool: Iterable[Item], n: int, offset: int) -> list[Item]:
    """`n` items taking difficulties in turn (starting at the `offset`-th), so small mixes still cover the range."""
    groups: dict[int, list[Item]] = {}
    for item in pool:
        groups.setdefault(item.difficulty, []).append(item)
    levels = sorted(groups)
    taken = {d: 0 for d in levels}
    picked: list[Item] = []
    turn = offset
    while len(picked) < n and any(taken[d] < len(groups[d]) for d in levels):
        d = levels[turn % len(levels)]
        if taken[d] < len(groups[d]):
            picked.append(groups[d][taken[d]])
            taken[d] += 1
        turn += 1
    return picked


def _mix(per_category: int) -> list[Item]:
    # each category starts its rotation at another difficulty, and the categories take turns in the list,
    # so the first items of a mix (a `limit`) span both categories and difficulties
    columns = [_spread(build(), per_category, offset) for offset, build in enumerate(_CATEGORIES.values())]
    return [column[i] for i in range(per_category) for column in columns if i < len(column)]


def _builtin(name: str) -> Suite:
    if name == "router-train":
        errors = list(_facts()[1]) + list(_authored("router_train_varied.jsonl")[1])
        return Suite(name, _router_train(), "builtin", errors)
    if name in _MIXES:
        items = _mix(_MIXES[name])
    else:
        items = list(_CATEGORIES[name]())
    errors = list(_facts()[1]) if name in ("facts", *_MIXES) else []
    return Suite(name, items, "builtin", errors)


# --- JSONL ---------------------------------------------------------------------------------------------------


def item_from_dict(obj: Any, default_id: str, default_category: str = "") -> Item:
    """One suite item from a decoded JSON object; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    for key in ("question", "answer"):
        if key not in obj:
            raise ValueError(f'missing "{key}"')
    question, answer = obj["question"], obj["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError('"question" must be a non-empty string')
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError('"answer" must be a string or a number')
    answer = str(answer).strip()
    if not answer:
        raise ValueError('"answer" is empty')
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError('"choices" must be a list of strings')
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f'"choices" must have 2 to {len(LETTERS)} options')
        choices = tuple(c.strip() for c in choices)
    kind = obj.get("kind")
    if kind is None:
        kind = "choice" if choices else "numeric" if parse_number(answer) is not None else "exact"
    if kind not in KINDS:
        raise ValueError(f'"kind" must be one of {", ".join(KINDS)}')
    if kind == "choice":
        if not choices:
            raise ValueError('a "choice" item needs "choices"')
        answer = _choice_letter(answer, choices)
        if not _lists_options(question):
            question = with_options(question, choices)
    elif kind == "numeric" and parse_number(answer) is None:
        raise ValueError(f"answer {answer!r} is not a number")
    item_id = obj.get("id", default_id)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int) or not str(item_id).strip():
        raise ValueError('"id" must be a non-empty string or a number')
    difficulty = obj.get("difficulty", 1)
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or not 1 <= difficulty <= 5:
        raise ValueError('"difficulty" must be a whole number from 1 to 5')
    category = obj.get("category", default_category)
    if not isinstance(category, str):
        raise ValueError('"category" must be a string')
    return Item(str(item_id).strip(), question.strip(), answer, kind, choices if kind == "choice" else None,
                difficulty, category)


def _choice_letter(answer: str, choices: tuple[str, ...]) -> str:
    letters = LETTERS[: len(choices)]
    if len(answer) == 1 and answer.upper() in letters:
        return answer.upper()
    options = [normalize(c) for c in choices]
    if normalize(answer) in options:
        return letters[options.index(normalize(answer))]
    raise ValueError(f"answer {answer!r} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices")


def parse_jsonl(text: str, *, default_category: str = "") -> tuple[list[Item], list[str]]:
    """Items from JSON lines, and one message per line that could not be used ("line 7: not valid JSON")."""
    items: list[Item] = []
    errors: list[str] = []
    ids: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {n}: not valid JSON ({exc.msg})")
            continue
        try:
            item = item_from_dict(obj, f"line-{n}", default_category)
        except ValueError as exc:
            errors.append(f"line {n}: {exc}")
            continue
        if item.id in ids:
            errors.append(f"line {n}: duplicate id {item.id!r}")
            continue
        ids.add(item.id)
        items.append(item)
    return items, errors


def _load_file(path: Path) -> Suite:
    if not path.is_file():
        raise LocalmoeError(f"suite path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalmoeError(f"cannot read suite {path}: {getattr(exc, 'strerror', None) or exc}") from None
    items, errors = parse_jsonl(text)
    if not items:
        why = f": {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "") if errors else ""
        raise LocalmoeError(f"suite {path} has no usable questions{why}")
    return Suite(path.stem, items, str(path), errors)


def load_suite(name_or_path: str, *, limit: int | None = None) -> Suite:
    """A built-in suite by name, a JSONL file by path, or a hub dataset ("hf:gsm8k", "hf:mmlu:anatomy", "hf:arc").

    A built-in name wins over a file of the same name in the current directory (write ./quick for the file).
    `limit` keeps the first items; built-in mixes are ordered so that those still span categories and difficulties.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    if name_or_path in builtin_suites():
        suite = _builtin(name_or_path)
    elif name_or_path.startswith("hf:"):
        suite = _load_hf(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists() and (path.suffix.lower() in (".jsonl", ".json") or "/" in name_or_path):
            raise UsageError(f"suite file {path} does not exist")
        if not path.exists():
            raise UsageError(
                f"unknown suite {name_or_path!r}: built-in suites are {', '.join(builtin_suites())}; "
                f"or give a path to a .jsonl file, or one of {', '.join(HF_NAMES)}"
            )
        suite = _load_file(path)
    if limit is not None:
        suite.items = suite.items[:limit]
    return suite


# --- Hugging Face hub datasets -------------------------------------------------------------------------------

HF_NAMES = ("hf:gsm8k", "hf:mmlu[:SUBJECT]", "hf:arc")


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} is not a non-empty string")
    return value.strip()


def gsm8k_item(row: Mapping[str, Any], index: int) -> Item:
    """A GSM8K row ({"question", "answer": "...worked solution...\\n#### 72"}) → numeric item; `index` from 0."""
    question, solution = _text(row, "question"), _text(row, "answer")
    work, marker, final = solution.rpartition("####")
    value = parse_number(final.strip()) if marker else None
    if value is None:
        raise ValueError(f"no number after '####' in {solution[-40:]!r}")
    steps = sum(1 for line in work.splitlines() if line.strip())  # one line per calculation in GSM8K solutions
    return Item(f"gsm8k-{index + 1:04d}", f"{question}\n\n{GSM8K_INSTRUCTION}", _fmt(value), "numeric",
                difficulty=min(5, max(1, steps)), category="gsm8k")


def mmlu_item(row: Mapping[str, Any], index: int) -> Item:
    """An MMLU row ({"question", "subject", "choices": [4 strings], "answer": 0-3}) → choice item."""
    question, choices, answer = _text(row, "question"), row["choices"], row["answer"]
    if not isinstance(choices, list | tuple) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError("'choices' is not a list of strings")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        letter = answer.upper()
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        letter = LETTERS[answer]
    else:
        raise ValueError(f"answer {answer!r} does not name one of {len(choices)} choices")
    subject = row.get("subject") or "mmlu"
    return Item(f"mmlu-{index + 1:05d}", with_options(question, choices), letter, "choice", tuple(choices),
                difficulty=3, category=str(subject))


def arc_item(row: Mapping[str, Any], index: int) -> Item:
    """An ARC row ({"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}) → choice item.

    ARC labels some questions 1-4 instead of A-D; options are relettered A, B, C... in their order.
    """
    question, choices = _text(row, "question"), row["choices"]
    texts, labels = choices["text"], [str(label) for label in choices["label"]]
    if len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS):
        raise ValueError("'choices' text and label lists do not match")
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    item_id = f"arc-{row.get('id') or index + 1}"
    return Item(item_id, with_options(question, texts), LETTERS[labels.index(key)], "choice", tuple(texts),
                difficulty=3, category="science")


@dataclass(frozen=True)
class _HubDataset:
    repo: str
    filename: str  # "{subject}" is replaced for MMLU
    convert: Callable[[Mapping[str, Any], int], Item]
    shuffle: bool = False  # for files sorted by topic, so that a `limit` still samples across topics


_HUB: dict[str, _HubDataset] = {
    "gsm8k": _HubDataset("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm8k_item),
    "mmlu": _HubDataset("cais/mmlu", "{subject}/test-00000-of-00001.parquet", mmlu_item, shuffle=True),
    "arc": _HubDataset("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", arc_item),
}


def convert_rows(rows: Iterable[Mapping[str, Any]], convert: Callable[[Mapping[str, Any], int], Item]
                 ) -> tuple[list[Item], list[str]]:
    items, errors = [], []
    for i, row in enumerate(rows):
        try:
            items.append(convert(row, i))
        except (KeyError, TypeError, ValueError) as exc:
            errors.append(f"row {i + 1}: {exc}")
    return items, errors


def datasets_dir() -> Path:
    return paths.data_dir() / "datasets"


def _load_hf(spec: str) -> Suite:
    name, _, subject = spec[3:].partition(":")
    if name not in _HUB or (subject and name != "mmlu"):
        raise LocalmoeError(f"unknown hub suite {spec!r} (known: {', '.join(HF_NAMES)})")
    if subject and not re.fullmatch(r"[a-z_]+", subject):
        raise LocalmoeError(f"MMLU subject must be a name like high_school_physics, not {subject!r}")
    dataset = _HUB[name]
    key = f"mmlu-{subject or 'all'}" if name == "mmlu" else name
    # the converted items are kept, so later runs need neither the network nor huggingface_hub or pyarrow
    converted = datasets_dir() / f"{key}.jsonl"
    if converted.is_file():
        items, errors = parse_jsonl(converted.read_text(encoding="utf-8"))
        if items:
            return Suite(spec, items, spec, errors)
    local = _hf_download(spec, dataset.repo, dataset.filename.format(subject=subject or "all"))
    items, errors = convert_rows(_read_rows(spec, local), dataset.convert)
    if not items:
        raise LocalmoeError(f"{spec}: no usable questions in {local.name}" + (f" ({errors[0]})" if errors else ""))
    if dataset.shuffle:
        random.Random(0).shuffle(items)
    _write_items(converted, items)
    return Suite(spec, items, spec, errors)


def _hf_download(spec: str, repo: str, filename: str) -> Path:
    try:
        import huggingface_hub
        import huggingface_hub.constants
    except ImportError:
        raise LocalmoeError(f"{spec} needs the huggingface_hub package: "
                            f"`{install.install_command('huggingface-hub', no_deps=False)}`") from None
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # huggingface_hub before 0.23 kept them in utils
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    options: dict[str, Any] = {"repo_type": "dataset", "cache_dir": str(datasets_dir() / "hub")}
    try:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=True, **options))
        except LocalEntryNotFoundError:
            if _unreachable(getattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")):
                raise
        return Path(huggingface_hub.hf_hub_download(repo, filename, **options))
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass in recent releases
        raise LocalmoeError(
            f"{spec} is not downloaded yet and the Hugging Face hub cannot be reached: it needs the network once, "
            f"then it is kept in {datasets_dir()}"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError):
        raise LocalmoeError(f"{spec}: the dataset {repo} has no file {filename}") from None
    except OSError as exc:  # HTTP errors are OSErrors too
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LocalmoeError(f"{spec}: download from the Hugging Face hub failed: {first_line}") from None


def _unreachable(endpoint: str) -> bool:
    """True when the hub's host name does not resolve and no proxy could reach it for us.

    Checked before downloading because huggingface_hub retries a failed lookup for about 20 seconds.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(urlsplit(endpoint).hostname, 443)
    except OSError:  # socket.gaierror
        return True
    return False


def _read_rows(spec: str, path: Path) -> list[dict[str, Any]]:
    """Rows of a downloaded file: JSON lines, a JSON list, or Parquet (which needs pyarrow)."""
    try:
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise LocalmoeError(f"{spec} is stored as Parquet, which needs pyarrow: "
                                    f"`{install.install_command('pyarrow', no_deps=False)}`") from None
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError("expected a JSON list of rows")
        return rows
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise LocalmoeError(f"{spec}: cannot read {path.name}: {exc}") from None


def _write_items(path: Path, items: Iterable[Item]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise LocalmoeError(f"cannot write {path}: {exc.strerror or exc}") from None
