"""Grading a model's reply to a suite item: numbers, short exact answers, multiple-choice letters.

Small chat models seldom answer with the bare value they were asked for, so each grader looks for the answer the
model committed to, not for the right answer anywhere in the text (a reply that lists candidates must not score):

- numeric: the number after an explicit "the answer is" / "Answer:" (or in \\boxed{}), else a first line that is
  just a number (with at most two unit words), else the number after "####", else the last number in the reply;
  digits may carry $, thousands commas, a minus sign or a fraction (3/4). Number words (zero..ninety-nine, once,
  twice) count only when the reply has no digits. The value must equal the canonical answer within 1e-6
  (absolute or relative); when the question asks for rounding, it is first rounded (half up) to the canonical
  answer's number of decimals, so "21.67" passes for "21.7" there and fails elsewhere.
- exact: after normalisation (case, accents, punctuation, the articles a/an/the, spacing), the whole reply, its
  first line, first sentence or first clause must equal the answer, or the first sentence must state it
  ("The capital is Paris.", "Paris is the capital."). With an explicit "the answer is X" only X is considered.
- choice: a bare letter ("B", "(B)", "**B**"), an explicit "answer is B" / "Answer: (B) Paris", a first line
  "B) Paris", the text of exactly one option, exactly one letter marked as an option ("(B)", "B)") anywhere, or
  exactly one option letter standing alone ("I think B"). A reply reciting several options as "A) ...", "B) ..."
  without an explicit answer gets nothing.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localmoe.bench.suites import Item

LETTERS = "ABCDEFGHIJ"
TOLERANCE = Fraction(1, 10**6)


@dataclass
class Verdict:
    correct: bool
    extracted: str | None  # what was taken as the model's answer; None when nothing usable was found
    method: str  # the rule that found it ("answer_phrase", "last_number", ...), "none" when nothing was found


def score(item: Item, output: str) -> Verdict:
    if item.kind == "numeric":
        return _score_numeric(item, output)
    if item.kind == "exact":
        return _score_exact(item, output)
    if item.kind == "choice":
        return _score_choice(item, output)
    raise ValueError(f"unknown item kind {item.kind!r}")


# --- numbers -------------------------------------------------------------------------------------------------

# A minus sign counts only where it cannot be a hyphen or a subtraction ("5-3" is 5 and 3, "x = -3" is -3);
# a digit glued to a letter is part of a name ("H2O"), not a number.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>[-−](?=\$?\d))?\$?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?)(?!\d)"
)
_STRICT_NUMBER = re.compile(r"\s*(?P<neg>[-−])?\$?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?)%?\s*")
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORD = re.compile(
    rf"\b(?:({'|'.join(_TENS)})(?:[-\s]({'|'.join(_UNITS[1:10])}))?|({'|'.join(_UNITS)}|once|twice))\b", re.IGNORECASE
)


def _word_value(m: re.Match[str]) -> int:
    tens, unit, small = (g.lower() if g else g for g in m.groups())
    if tens:
        return 10 * (_TENS.index(tens) + 2) + (_UNITS.index(unit) if unit else 0)
    return {"once": 1, "twice": 2}.get(small) or _UNITS.index(small)


_ANSWER_PHRASE = re.compile(r"\b(?:final\s+answer|answer|result)\s*(?:is|:|=)\s*[:=]?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# The first line is the answer when it is a number with at most two unit words: "42", "$1,234.50", "3 times".
_BARE_LINE = re.compile(r"[\W_]*" + _NUMBER.pattern + r"(?:\s*[A-Za-z%°'’]+){0,2}[\W_]*")
# ...or a worked equation and nothing else ("7 + 8 = 15"; the line stripped of markdown first): its result,
# unless a later line works on or takes it back ("391 + 4 = 395", "Wait, ...").
_EQUATION_LINE = re.compile(r"(?=[^=]*\d\s*[-−+×xX*/÷^]\s*\(*\d)[\d.,\s()+\-−×xX*/÷^]+=\s*" + _NUMBER.pattern
                            + r"[\s*_`.!]*")
_LATER_WORK = re.compile(r"=|\b(?:wait|actually|sorry|mistake|correction|oops)\b", re.IGNORECASE)


def _to_fraction(neg: str | None, num: str) -> Fraction | None:
    text = num.replace(",", "")
    if "/" in text:
        top, bottom = text.split("/")
        if float(bottom) == 0:
            return None
        value = Fraction(top) / Fraction(bottom)
    else:
        value = Fraction(text)
    return -value if neg else value


def parse_number(text: str) -> Fraction | None:
    """The value of a string that is one number and nothing else ("42", "-3.5", "1,234", "$12", "3/4"), or None."""
    m = _STRICT_NUMBER.fullmatch(text)
    return _to_fraction(m["neg"], m["num"]) if m else None


def _numbers(text: str) -> list[tuple[Fraction, str]]:
    found = []
    for m in _NUMBER.finditer(text):
        value = _to_fraction(m["neg"], m["num"])
        if value is not None:
            found.append((value, m.group(0)))
    return found


def _rest_of_line(text: str) -> str:
    return text.lstrip(" \t\r\n*_`:").split("\n", 1)[0]


def extract_number(output: str) -> tuple[Fraction, str, str] | None:
    """(value, text as written, method) of the number the reply commits to, or None."""
    boxed = _BOXED.findall(output)
    if boxed and (nums := _numbers(boxed[-1])):
        return (*nums[-1], "boxed")
    phrases = list(_ANSWER_PHRASE.finditer(output))
    if phrases:
        rest = _rest_of_line(output[phrases[-1].end():])
        sentence = re.split(r"[.!?](?=\s|$)", rest, maxsplit=1)[0]
        if nums := _numbers(sentence):
            # "The answer is 6 × 7 = 42": the result of a worked equation is the last number, else the first
            return (*(nums[-1] if "=" in sentence else nums[0]), "answer_phrase")
    first_line = next((line for line in output.splitlines() if line.strip()), "")
    if _BARE_LINE.fullmatch(first_line) and (nums := _numbers(first_line)):
        return (*nums[0], "first_line")
    if "####" in output and (nums := _numbers(_rest_of_line(output.rsplit("####", 1)[1]))):
        return (*nums[0], "gsm8k_marker")
    equation = first_line.strip().strip("*_`")
    if (_EQUATION_LINE.fullmatch(equation) and (nums := _numbers(equation))
            and not _LATER_WORK.search(output.split(first_line, 1)[1])):
        return (*nums[-1], "equation_line")
    if nums := _numbers(output):
        return (*nums[-1], "last_number")
    words = list(_NUMBER_WORD.finditer(output))
    if words:
        return Fraction(_word_value(words[-1])), words[-1].group(0), "number_word"
    return None


def _decimals(text: str) -> int:
    m = re.search(r"\.(\d+)", text)
    return len(m.group(1)) if m else 0


def _round_half_up(value: Fraction, decimals: int) -> Fraction:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return Fraction(exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def numbers_match(value: Fraction, answer: str, *, rounding: bool = False) -> bool:
    expected = parse_number(answer)
    if expected is None:
        raise ValueError(f"canonical answer {answer!r} is not a number")
    if rounding:
        value = _round_half_up(value, _decimals(answer))
    return abs(value - expected) <= max(TOLERANCE, abs(expected) * TOLERANCE)


def _score_numeric(item: Item, output: str) -> Verdict:
    found = extract_number(output)
    if found is None:
        return Verdict(False, None, "none")
    value, written, method = found
    rounding = re.search(r"\bround", item.question, re.IGNORECASE) is not None
    return Verdict(numbers_match(value, item.answer, rounding=rounding), written.strip(), method)


# --- short exact answers -------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# "is", and the verbs that name or expand: "is called a century", "stands for Central Processing Unit"
_COPULA = re.compile(r"(?:(?:\b(?:is|are|was|were)\b|['’]s\b)(?:\s+(?:also|sometimes|often|usually|commonly))?"
                     r"(?:\s+(?:called|known\s+as|named|termed))?|\bequals\b|\bstands\s+for\b|=)\s+",
                     re.IGNORECASE)
_PLACE = re.compile(r"^(?:(?:located|situated|found|based)\s+)?(?:in|on|at|native\s+to)\s+", re.IGNORECASE)


def normalize(text: str) -> str:
    """Casefolded, accents and punctuation gone, articles dropped (unless that leaves nothing), single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]|_", " ", text)
    without = _ARTICLES.sub(" ", text)
    return " ".join((without if without.strip() else text).split())


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0]


def _first_clause(text: str) -> str:
    return re.split(r"[,;:(\[]|\s[-–—]\s", text, maxsplit=1)[0]


def _exact_candidates(output: str) -> list[tuple[str, str]]:
    """(method, text) pieces of the reply that may be its whole answer, most explicit first."""
    phrases = list(_ANSWER_PHRASE.finditer(output))
    if phrases:
        rest = _rest_of_line(output[phrases[-1].end():])
        return [("answer_phrase", t) for t in (rest, _first_sentence(rest), _first_clause(_first_sentence(rest)))]
    stripped = output.strip()
    first_line = next((line for line in stripped.splitlines() if line.strip()), "")
    sentence = _first_sentence(stripped)
    candidates = [("whole", stripped), ("first_line", first_line), ("first_sentence", sentence),
                  ("first_clause", _first_clause(sentence))]
    copulas = list(_COPULA.finditer(sentence))
    # The first copula's complement ("The GDP stands for Gross Domestic Product, which is a measure of …") and the
    # last one's ("The term you mean is … and it is a mean"); a place after "is located in" / "is native to" counts.
    for m in dict.fromkeys((copulas[0], copulas[-1])) if copulas else ():
        clause = _first_clause(sentence[m.end():])
        candidates.append(("copula", clause))
        if (place := _PLACE.sub("", clause, count=1)) != clause:
            candidates.append(("copula_place", place))
    return candidates


def _score_exact(item: Item, output: str) -> Verdict:
    expected = normalize(item.answer)
    candidates = _exact_candidates(output)
    for method, text in candidates:
        if normalize(text) == expected:
            return Verdict(True, text.strip(), method)
    # "Paris is the capital of France.": the sentence opens with the answer and goes on to state it
    opening = normalize(_first_sentence(output))
    if candidates[0][0] != "answer_phrase" and re.match(re.escape(expected) + r" (?:is|are|was|were)\b", opening):
        return Verdict(True, item.answer, "subject_copula")
    method, text = candidates[0] if candidates[0][0] == "answer_phrase" else candidates[1]
    text = text.strip()
    return Verdict(False, text[:80] or None, method if text else "none")


# --- multiple choice -----------------------------------------------------------------------------------------


def _score_choice(item: Item, output: str) -> Verdict:
    found = extract_choice(output, item.choices or ())
    if found is None:
        return Verdict(False, None, "none")
    letter, method = found
    return Verdict(letter == item.answer.strip().upper(), letter, method)


def extract_choice(output: str, choices: tuple[str, ...] | list[str] = ()) -> tuple[str, str] | None:
    """(letter, method) the reply chose, or None. Only the options' letters count (A-E when none are given)."""
    valid = LETTERS[: len(choices)] if choices else LETTERS[:5]
    letter = f"[{valid}]"
    text = output.strip()
    if m := re.fullmatch(rf"[\W_]*\(?({letter})\)?[\W_]*", text, re.IGNORECASE):
        return m.group(1).upper(), "letter"
    phrases = list(re.finditer(r"\b(?:final\s+answer|answer|option|choice)\s*(?:is|:|=)?\s*[:=]?", text, re.IGNORECASE))
    if phrases:
        rest = _first_sentence(_rest_of_line(text[phrases[-1].end():]))
        # a capital letter standing alone ("Answer: I think B") or any letter written as an option ("b)")
        if m := re.search(rf"(?<![\w'’])\(?({letter})(?![\w'’])|\(?({letter.lower()})\)", rest):
            return (m.group(1) or m.group(2)).upper(), "answer_phrase"
        if (found := _option_in(rest, choices)) is not None:
            return found, "answer_phrase"
    lines = [line for line in text.splitlines() if line.strip()]
    # "B) Paris" (or a lone "B") opening the reply, unless the reply goes on to list the other options the same way
    option_line = re.compile(rf"[\s*_`]*\(?({letter})(?:[).:]|\s[-–—]|[\s*_`]*$)")
    leading = {m.group(1) for line in lines if (m := option_line.match(line))}
    if len(leading) > 1:
        return None  # it recites the options without saying which one
    if leading and re.match(rf"[\s*_`]*\(?{next(iter(leading))}", lines[0]):
        return next(iter(leading)), "leading_letter"
    if (found := _option_in(text, choices)) is not None:
        return found, "option_text"
    marked = {a or b or c for a, b, c in re.findall(rf"\(({letter})\)|\b({letter})\)|\*\*({letter})\*\*", text)}
    if len(marked) == 1:
        return marked.pop(), "marked_letter"
    # last resort, "I think B": one option letter standing alone ("A" followed by a word is the article)
    alone = set(re.findall(rf"(?<![\w'’])({letter})(?![\w'’])(?<!A(?=\s+[a-z]))", text))
    if len(alone) == 1:
        return alone.pop(), "lone_letter"
    return None


def _option_in(text: str, choices: tuple[str, ...] | list[str]) -> str | None:
    """The letter of the one option the text is, or the one option it mentions; None if none or several."""
    said = normalize(text)
    if not said or not choices:
        return None
    options = [normalize(c) for c in choices]
    if said in options and options.count(said) == 1:
        return LETTERS[options.index(said)]
    first = normalize(_first_sentence(text))
    if first in options and options.count(first) == 1:
        return LETTERS[options.index(first)]
    mentioned = [i for i, o in enumerate(options) if o and re.search(r"\b" + re.escape(o) + r"\b", said)]
    # an option that is part of a longer mentioned option ("oxygen" in "oxygen gas") is not a second candidate
    mentioned = [i for i in mentioned if not any(j != i and options[i] in options[j] for j in mentioned)]
    return LETTERS[mentioned[0]] if len(mentioned) == 1 else None
