"""A guard against degenerate repetition while decoding, fed one token at a time.

Small models decoded greedily fall into loops: "la Femme, la Femme, la Femme, …", a sentence said over and over,
or a numbered list whose items stop changing ("10. Pluto\\n11. Pluto\\n12. Pluto\\n…"). Each such answer runs to the
token limit and costs tens of joules for nothing. An engine pushes every decoded token into a `LoopGuard`; when
`push` returns True it stops with stop_reason "repetition" and keeps `keep_text`: the answer up to the end of the
first cycle of the loop.

Three detectors, each tuned to stay silent on legitimate repetition (lists, code, tables, counting, "ha ha ha"):

- an exact cycle: the last tokens are one phrase of p tokens repeated, at least 3 times and over at least 32 tokens,
  so short phrases need many more repeats than long ones (", la Femme" 8 times, a sentence 3 times);
- a counter cycle: the same list item repeated where only its number counts up ("10. Pluto", "11. Pluto", …), at
  least 8 times and over 40 items (a list number is one item, however many digit tokens). Only a list number (at
  the start of a line, followed by "." or ")") may count: numbers inside the content (user1, user2; arr[0], arr[1];
  dates; products) must repeat exactly, as they are the content. A numbered list whose items differ never forms
  a cycle;
- a low-diversity stretch: the last 96 tokens drawn from at most 8 distinct tokens, for loops too irregular to be
  cycles ("la femme, la femme au roi, la femme, …").

A repeated phrase only counts as language when it holds a word (two letters in a row): digit strings, separators,
ASCII art and tables of zeros repeat by design, so cycles without a word need 12 repeats over 64 tokens and never
count as counter cycles or low-diversity stretches.

Pure Python and cheap: a push costs O(earlier occurrences of the same two tokens in a row among the last
`max_period` tokens), 4-5 µs a token on 512-token answers, digit-heavy text included. The guard knows nothing of
engines or tokenizers: it sees token ids and their text.
"""

from __future__ import annotations

import re
from collections import deque

# Two letters in a row, any script: what makes a repeated phrase language rather than numbers or punctuation.
_WORD = re.compile(r"[^\W\d_]{2}")
# Where a kept text may end naturally: after a line, else after a sentence (closing quotes and brackets allowed).
_SENTENCE_END = frozenset(".!?…。！？")
_CLOSERS = "\"')]}»”’*_`"
# A cycle like " Monday, …, Sunday," ends on its separator; a kept text ending with one looks cut mid-list.
_SEPARATORS = frozenset({",", ";", "、", "，"})
# The key every list number shares in the counter detector, so items that differ only in it line up.
_NUMBER = 1 << 31  # above any token id
_LIST_MARK = (".", ")")  # what follows a list number: "1." or "1)"


class _Periods:
    """Which periods the tail of a sequence repeats, and for how long, updated one item at a time.

    `runs[p]` is how many items in a row equal (by key) the item p before them. The periods a new item can extend
    are found from earlier occurrences of the same pair of keys (this item and the one before), among the last
    `max_period`: pairs recur far less than single tokens (a space, a comma), so a push costs a few dictionary
    operations, not `max_period`, and a run of one, which no cycle is, is never tracked.

    `mismatches[p]`, kept only where non-zero, counts the items of that run whose value is one more than the value
    p before: the counter detector gives every number the same key and its value, so that lines whose number
    counts up line up, while any other change of value (a product, a date, a score) breaks the run."""

    __slots__ = ("max_period", "values", "where", "runs", "mismatches", "last")

    def __init__(self, max_period: int) -> None:
        self.max_period = max_period
        self.values: list[int] = []
        self.where: dict[int, deque[int]] = {}  # pair of keys -> where it ended among the last max_period items
        self.runs: dict[int, int] = {}
        self.mismatches: dict[int, int] = {}
        self.last = (1 << 32) - 1  # the previous item's key; at the start, one no item has

    def push(self, key: int, value: int, varies: bool = False) -> dict[int, int]:
        """Add an item (keys below 2**32); `varies` says that items with this key may differ in value. Returns the
        runs; a period the new item does not continue is left out or 0."""
        i = len(self.values)
        values = self.values
        values.append(value)
        pair = self.last << 32 | key
        self.last = key
        seen = self.where.get(pair)
        if seen is None:
            self.where[pair] = deque((i,))
            self.runs = {}
            self.mismatches = {}
            return self.runs
        oldest = i - self.max_period
        while seen and seen[0] < oldest:
            seen.popleft()
        old = self.runs
        # The pair matches p items back: this item and the one before do. A run the last push did not have (or
        # broke, 0) is those two items, or this one alone after a break.
        runs = self.runs = {i - j: old.get(i - j, 1) + 1 for j in seen}
        mismatches = self.mismatches = {p: m for p, m in self.mismatches.items() if runs.get(p)}
        if varies:
            for j in seen:
                before = values[j]
                if before != value:
                    if value == before + 1:
                        mismatches[i - j] = mismatches.get(i - j, 0) + 1
                    else:
                        runs[i - j] = 0
                        mismatches.pop(i - j, None)
        seen.append(i)
        return runs


def _ends_line(text: str) -> bool:
    return "\n" in text


def _ends_sentence(text: str) -> bool:
    t = text.rstrip().rstrip(_CLOSERS)
    return bool(t) and t[-1] in _SENTENCE_END


class LoopGuard:
    """Detects a degenerate loop at the tail of a token stream. Create one per answer and `push` each token.

    After `push` returns True the guard stays fired (later pushes return True and change nothing) and says what it
    found: `kind` ("cycle", "counter" or "low-diversity"), `period` (tokens in the first cycle; 0 for low
    diversity), `repeats`, `start` (first token of the repetitive stretch), `fired_at` (tokens pushed when it
    fired), `keep_tokens` / `keep_text` (what to keep), `dropped_text` (the rest) and `reason` (one line for a log
    or the UI). Until it fires `keep_tokens` is every token pushed and `keep_text` the whole text, so an engine can
    always keep `keep_text`.
    """

    def __init__(
        self,
        *,
        min_repeats: int = 3,
        min_span: int = 32,
        counter_repeats: int = 8,
        counter_span: int = 40,
        bare_repeats: int = 12,
        bare_span: int = 64,
        window: int = 96,
        max_distinct: int = 8,
        max_period: int = 128,
    ) -> None:
        # Three repeats at least: a code block or a chorus shown twice is normal, three times in a row is not.
        self.min_repeats = min_repeats
        # And the repeated stretch this long, so "ha ha ha ha ha ha" (one token 6 times) or "light and darkness"
        # three times stays prose, while a 4-token phrase is stopped after 8 rounds.
        self.min_span = min_span
        # Items whose list number counts up are what a numbered list looks like; only many otherwise identical
        # ones make a loop (counted in items: a list number is one item however many digit tokens it takes).
        self.counter_repeats = counter_repeats
        self.counter_span = counter_span
        # Phrases without a word: digits, separators, grid rows. Legitimate far more often, so far longer.
        self.bare_repeats = bare_repeats
        self.bare_span = bare_span
        self.window = window
        self.max_distinct = max_distinct
        self.max_period = max_period
        self.reset()

    def reset(self) -> None:
        """Forget everything: ready for a new answer."""
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._words: list[int] = [0]  # _words[k]: tokens holding a word among the first k, for O(1) slices
        self._exact = _Periods(self.max_period)  # over token ids
        # The counter detector's sequence: tokens, except that a list number (its digit tokens in a row) is one
        # item keyed _NUMBER, so "9. Pluto" and "10. Pluto" have the same length.
        self._items = _Periods(self.max_period)
        self._item_at: list[int] = []  # token index where each item starts
        self._item_words: list[int] = [0]
        self._digits: list[int] = []  # indices of the digit tokens of a number still being read
        self._counts: dict[int, int] = {}  # token -> count over the last `window` tokens
        self.fired = False
        self.kind = ""
        self.period = 0
        self.repeats = 0
        self.start = 0
        self.fired_at = 0
        self.reason = ""
        self._keep = 0

    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    @property
    def keep_tokens(self) -> int:
        """How many of the pushed tokens to keep: up to the end of the first cycle once fired, else all."""
        return self._keep if self.fired else len(self._ids)

    @property
    def keep_text(self) -> str:
        return "".join(self._texts[: self.keep_tokens])

    @property
    def dropped_text(self) -> str:
        """The text after `keep_text`: the repetitions, which an engine that streamed them may take back."""
        return "".join(self._texts[self.keep_tokens :])

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def push(self, token_id: int, text: str) -> bool:
        """Add the next decoded token and its text; True when the tail is a degenerate loop (and from then on)."""
        if self.fired:
            return True
        token_id = int(token_id)  # a numpy or torch integer would overflow the pair keys
        i = len(self._ids)
        ids = self._ids
        ids.append(token_id)
        self._texts.append(text)
        wordy = _WORD.search(text) is not None
        self._words.append(self._words[-1] + wordy)

        counts = self._counts
        counts[token_id] = counts.get(token_id, 0) + 1
        if i >= self.window:
            gone = ids[i - self.window]
            left = counts[gone] - 1
            if left:
                counts[gone] = left
            else:
                del counts[gone]

        if self._check_exact(self._exact.push(token_id, token_id)):
            return True

        digits = text.strip()
        if digits.isascii() and digits.isdigit():
            # The number may go on in the next token; the token that ends it says whether it numbers a list.
            self._digits.append(i)
        else:
            if self._digits and self._push_number(text):
                return True
            if self._push_item(token_id, token_id, i, wordy):
                return True
        return self._check_diversity()

    def _push_number(self, after: str) -> bool:
        at, self._digits = self._digits, []
        texts = self._texts
        first = at[0]
        if after.startswith(_LIST_MARK) and (first == 0 or texts[first - 1].rstrip(" \t").endswith("\n")):
            return self._push_item(_NUMBER, int("".join(texts[k].strip() for k in at)), first, False)
        # Any other number is content: its digit tokens must repeat exactly.
        return any(self._push_item(self._ids[k], self._ids[k], k, False) for k in at)

    def _check_exact(self, runs: dict[int, int]) -> bool:
        n = len(self._ids)
        shortest, rounds = self.min_span - 1, min(self.min_repeats, self.bare_repeats) - 1
        # Smallest period first: a phrase repeated 8 times is also a two-phrase cycle repeated 4 times, and the
        # first cycle is the phrase.
        for p in sorted(p for p, run in runs.items() if run + p > shortest and run >= rounds * p):
            span = runs[p] + p
            if self._words[n] - self._words[n - p]:  # the last p tokens are one whole cycle
                need = max(self.min_span, self.min_repeats * p)
            else:
                need = max(self.bare_span, self.bare_repeats * p)
            if span >= need:
                start = n - span
                self._fire("cycle", start, p, span // p, self._cut(start + 1, start + p, start + 2 * p - 1))
                return True
        return False

    def _push_item(self, key: int, value: int, at: int, wordy: bool) -> bool:
        self._item_at.append(at)
        self._item_words.append(self._item_words[-1] + wordy)
        runs = self._items.push(key, value, varies=key == _NUMBER)
        n = len(self._item_at)
        shortest, rounds = self.counter_span - 1, self.counter_repeats - 1
        counted = self._items.mismatches
        # Only runs where a number counted up: without one it is an exact cycle, the other detector's business.
        for p in sorted(p for p in counted if runs[p] + p > shortest and runs[p] >= rounds * p):
            run = runs[p]
            span = run + p
            # One number counting up a line, like a list's numbering; two (a sum and its result) are arithmetic.
            if 4 * counted[p] > 5 * (run // p) + 4 or not self._item_words[n] - self._item_words[n - p]:
                continue
            first = n - span
            at = self._item_at
            start = at[first]
            self._fire("counter", start, at[first + p] - start, span // p,
                       self._cut(start + 1, at[first + p], at[min(first + 2 * p, n) - 1]))
            return True
        return False

    def _check_diversity(self) -> bool:
        n = len(self._ids)
        w = self.window
        if n < w or len(self._counts) > self.max_distinct or self._words[n] == self._words[n - w]:
            return False
        vocab = self._counts
        ids = self._ids
        start = n - w
        while start > 0 and ids[start - 1] in vocab:
            start -= 1
        # The "first cycle" of an irregular loop: up to where the stretch has used every token it will use;
        # everything after only recombines them.
        missing = set(vocab)
        end = start
        while missing:
            missing.discard(ids[end])
            end += 1
        self._fire("low-diversity", start, 0, (n - start) // (end - start), self._cut(end, end, end + 16))
        self.reason = f"{n - start} tokens in a row drawn from only {len(vocab)} distinct tokens"
        return True

    def _fire(self, kind: str, start: int, period: int, repeats: int, keep: int) -> None:
        self.fired = True
        self.kind, self.start, self.period, self.repeats, self._keep = kind, start, period, repeats, keep
        self.fired_at = len(self._ids)
        phrase = "".join(self._texts[start : start + period]).strip()
        if len(phrase) > 60:
            phrase = phrase[:57] + "..."
        if kind == "cycle":
            self.reason = f"the same {period}-token phrase {phrase!r} repeated {repeats} times"
        elif kind == "counter":
            self.reason = f"the same line {phrase!r} repeated {repeats} times with only a number changing"

    def _cut(self, lo: int, target: int, hi: int) -> int:
        """Where to cut the kept text: at `target` (the end of the first cycle), or on the natural end nearest to it
        in [lo, hi], so that it ends after a line, else after a sentence, rather than mid-phrase."""
        texts = self._texts
        hi = min(hi, len(texts))
        for natural in (_ends_line, _ends_sentence):
            best = -1
            for cut in range(max(lo, 1), hi + 1):
                if natural(texts[cut - 1]) and (best < 0 or abs(cut - target) < abs(best - target)):
                    best = cut
            if best >= 0:
                return best
        if target > 1 and texts[target - 1].strip() in _SEPARATORS:
            target -= 1
        return target
