"""The expert store's per-layer caches: a fixed number of slots per layer and a replacement policy (LRU, LFU, LFRU
or FIFO) with the keys and tie-breaks of `localmoe cache-sim`, so the engine's counts on a trace equal the
simulator's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from localmoe.experts.cachesim import DEFAULT_LFRU_DECAY

if TYPE_CHECKING:
    from localmoe.engine.torch_moe.expert_store import ExpertWeights


class LayerCache:
    """A fixed number of slots for one layer; subclasses choose the victim by a key (smallest goes first).

    The keys and tie-breaks are those of `localmoe cache-sim`, so the engine's counts on a trace equal the
    simulator's: a step's experts are never evicted during the step, ties go to the least recently used, then
    to the lowest id. The base class is FIFO (oldest insertion first)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.entries: dict[int, ExpertWeights] = {}  # insertion order
        self.clock = 0  # steps (forward calls) this layer has seen
        self.last: dict[int, int] = {}  # expert -> step of its last use (or insertion by a prefetch)

    def __contains__(self, expert: int) -> bool:
        return expert in self.entries

    def lookup(self, expert: int) -> ExpertWeights | None:
        """A use of `expert` in the current step: its weights when cached; policies update their keys here."""
        self.last[expert] = self.clock
        return self.entries.get(expert)

    def insert(self, expert: int, weights: ExpertWeights, protect: frozenset[int] = frozenset()) -> int | None:
        """Cache `expert`, evicting the smallest-key expert outside `protect` when full; returns the evicted one."""
        evicted = None
        if expert not in self.entries and len(self.entries) >= self.slots:
            candidates = [e for e in self.entries if e not in protect] or list(self.entries)
            evicted = min(candidates, key=self.key)
            del self.entries[evicted]
        self.last.setdefault(expert, self.clock)
        self.entries[expert] = weights
        return evicted

    def key(self, expert: int) -> tuple[float, ...]:
        return (0,)  # min() keeps the first of equal keys: the oldest insertion


class LRUCache(LayerCache):
    def key(self, expert: int) -> tuple[float, ...]:
        return (self.last[expert], expert)


class LFUCache(LayerCache):
    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.counts: dict[int, int] = {}  # over the whole run, evicted experts included

    def lookup(self, expert: int) -> ExpertWeights | None:
        self.counts[expert] = self.counts.get(expert, 0) + 1
        return super().lookup(expert)

    def key(self, expert: int) -> tuple[float, ...]:
        return (self.counts.get(expert, 0), self.last[expert], expert)


class LFRUCache(LayerCache):
    """Frequency and recency (LRFU, Lee et al. 2001): each use adds 1 to a score that halves every 1/λ steps,
    the decay `localmoe cache-sim` uses for its lfru policy."""

    def __init__(self, slots: int, decay: float = DEFAULT_LFRU_DECAY) -> None:
        super().__init__(slots)
        self.decay = decay
        self.crf: dict[int, float] = {}

    def lookup(self, expert: int) -> ExpertWeights | None:
        if expert in self.crf and self.last.get(expert) == self.clock:
            return super().lookup(expert)  # a second use within one step counts once, as in the simulator
        prev = self.crf.get(expert)
        age = self.clock - self.last.get(expert, self.clock)
        self.crf[expert] = 1.0 + (2.0 ** (-self.decay * age) * prev if prev is not None else 0.0)
        return super().lookup(expert)

    def key(self, expert: int) -> tuple[float, ...]:
        # log2(CRF) + λ·last orders experts as their scores decayed to any common later step would
        crf = self.crf.get(expert)
        return (math.log2(crf) + self.decay * self.last[expert] if crf else -math.inf, self.last[expert], expert)


POLICIES: dict[str, type[LayerCache]] = {"lru": LRUCache, "lfu": LFUCache, "lfru": LFRUCache, "fifo": LayerCache}
