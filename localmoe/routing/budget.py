"""How many tokens the small tier may spend on one answer. A prompt that asks for a bare value ("Answer with a number
only", "Answer with one word", "the symbol only") gets the tersest budget, whatever else it says; other short-answer
questions ("What is the capital of …?", "How many …?") a short one, so an answer that goes wrong — a ramble, a loop
the guard misses — costs little; requests for writing, explanations, lists or code keep the full budget.

The budgets were sized on the router's training questions (`router-train`, less the items the `mixed` evaluation
suite shares with it), decoded with the embedded model's defaults: every answer graded right there ended within 22
tokens, most within 17 ("The letter "q" appears 2 times in the word "queue"."), while the answers that ran on were
wrong at any length, so TERSE leaves about half again as much room as the longest right answer needed."""

from __future__ import annotations

import re

TERSE = 32  # a bare value, with room for a small model's "The answer is …" or a short working line
SHORT = 96  # a sentence or two, with room for a small model's preamble
MEDIUM = 256

# An explicit request for a bare value: only a value is wanted, however the question reads (the letter "q" in a
# spelling question is no letter to write).
_TERSE_FORM = re.compile(
    r"\b(?:answer|reply|respond)(?: only)? with (?:just |only )?(?:a |an |one |the |a single )?"
    r"(?:number|integer|digit|word|name|letter|symbol|year|date|formula)s?\b"
    r"|\b(?:a|an|one|the|a single) (?:number|integer|digit|word|name|letter|symbol|year|date|formula) only\b"
    r"|\b(?:answer|reply|respond) (?:with )?(?:yes or no|true or false)\b"
    r"|\bin (?:one|a single) word\b|\bone[- ]word answer\b", re.I)
_LONG = re.compile(
    r"\b(write|explain|describe|summari[sz]e|compare|list|steps?|step[- ]by[- ]step|essay|story|poem|letter|email|"
    r"code|function|program|script|implement|translate|outline|plan|discuss|elaborate|why|how (do|does|can|to|would)"
    r"|in detail|paragraphs?|examples?)\b", re.I)
_SHORT_FORM = re.compile(r"\b(answer with|only (the|a|one)|one word|a number only|just the|in one (word|sentence)|"
                         r"yes or no|true or false)\b", re.I)
_QUESTION = re.compile(r"^\s*(what|who|whom|whose|when|where|which|how (many|much|old|far|long|tall|big)|name|is|are|"
                       r"was|were|does|do|did|can|could|has|have|what's|who's)\b", re.I)


def answer_budget(prompt: str, limit: int) -> int:
    """The small tier's max_tokens for `prompt`, at most `limit` (the configured maximum)."""
    if _TERSE_FORM.search(prompt):
        return min(limit, TERSE)
    words = len(prompt.split())
    if _LONG.search(prompt) or words > 60:
        return limit
    if _SHORT_FORM.search(prompt) or (_QUESTION.match(prompt) and words <= 20):
        return min(limit, SHORT)
    return min(limit, MEDIUM)
