"""How many tokens the small tier may spend on one answer. Short-answer questions ("What is the capital of …?",
"How many …?", "Answer with a number") get a short budget, so an answer that goes wrong — a ramble, a loop the
guard misses — costs little; requests for writing, explanations, lists or code keep the full budget."""

from __future__ import annotations

import re

SHORT = 96  # a sentence or two, with room for a small model's preamble
MEDIUM = 256

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
    words = len(prompt.split())
    if _LONG.search(prompt) or words > 60:
        return limit
    if _SHORT_FORM.search(prompt) or (_QUESTION.match(prompt) and words <= 20):
        return min(limit, SHORT)
    return min(limit, MEDIUM)
