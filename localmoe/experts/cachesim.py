"""Offline expert-cache simulation over routing traces: how often a per-layer cache of expert slots would already
hold the experts the router picks, under LRU, LFU, LFRU and Belady's offline optimum.

Model: every layer has its own cache of `capacity` expert slots (as MoE offloading systems keep them). The trace is
replayed token by token, layer by layer; a token's k experts in one layer form one *step*. Each expert of a step is
a request: a hit when cached, else a miss that loads it. The k experts of a step run together, so they must all be
resident at once: capacity < k is an error and eviction never picks an expert of the current step. A layer the
engine did not compute for a token (an empty list) is no step at all.

Ties go to the least recently used expert, then the lowest id (Belady: the lowest id among equal next uses), so
results are reproducible and hand-checkable; the k experts of one step count as used at the same time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from localmoe.errors import LocalmoeError
from localmoe.experts.trace import Trace, TraceToken

POLICIES = ("lru", "lfu", "lfru", "belady")
PREFETCH = ("previous",)
# LRFU's λ per step (Lee et al., 2001): a reference `a` steps old weighs 2^(-λ·a), a half-life of 1/λ = 8 steps.
# λ = 0 is LFU, λ = 1 is LRU (for top-1); 1/8 lets an expert used often in the last ~16 tokens (the span the
# local-routing-consistency work measures) outrank one used once just now, yet forgets a burst a few dozen tokens old.
DEFAULT_LFRU_DECAY = 0.125
SCH_SEGMENT = 16
# Calibrated against the Mixtral-8x7B figures for 8 experts top-2 (see synthetic_trace).
DEFAULT_LOCALITY = 0.5
DEFAULT_ZIPF = 0.7


class CacheSimError(LocalmoeError, ValueError):
    """Bad simulation input: a user error for the CLI, a ValueError for library callers."""


@dataclass
class SimResult:
    policy: str
    prefetch: str | None
    capacity: int
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(self.layer_hits)

    @property
    def misses(self) -> int:
        return sum(self.layer_misses)

    @property
    def loads(self) -> int:
        # Demand loading: every miss moves one expert into its layer's cache (the caller knows the bytes per expert).
        return self.misses

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def layer_hit_rates(self) -> list[float | None]:
        """Per layer; None for a layer no token computed."""
        return [h / (h + m) if h + m else None for h, m in zip(self.layer_hits, self.layer_misses, strict=True)]


def _layer_steps(trace: Trace) -> list[list[tuple[int, ...]]]:
    """The trace regrouped per layer: the steps that layer's cache sees, skipped tokens left out."""
    steps: list[list[tuple[int, ...]]] = [[] for _ in range(trace.n_layers)]
    for tok in trace.tokens:
        if len(tok.experts) != trace.n_layers:
            raise CacheSimError(f"trace token at pos {tok.pos} has {len(tok.experts)} layers, "
                                f"the header says {trace.n_layers}")
        for layer, chosen in enumerate(tok.experts):
            if chosen:
                step = tuple(chosen)
                if len(set(step)) != len(step):
                    raise CacheSimError(f"trace token at pos {tok.pos} picks an expert twice in layer {layer}")
                steps[layer].append(step)
    return steps


def _check_capacity(capacity: int, steps: list[list[tuple[int, ...]]]) -> None:
    widest = max((len(s) for layer in steps for s in layer), default=0)
    if capacity < max(widest, 1):
        raise CacheSimError(f"cache capacity {capacity} is below the {widest} experts one layer runs at once "
                            f"(top-k): every expert of a step must be resident together")


def _next_uses(steps: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """For each request, the step at which the layer asks for that expert again (len(steps) = never)."""
    n = len(steps)
    upcoming: dict[int, int] = {}
    out: list[tuple[int, ...]] = [()] * n
    for t in range(n - 1, -1, -1):
        req = steps[t]
        out[t] = tuple(upcoming.get(e, n) for e in req)
        for e in req:
            upcoming[e] = t
    return out


def _victims(candidates: set[int], over: int, key: dict[int, Any], exact: Callable[[int], Any] | None) -> list[int]:
    """The `over` candidates with the smallest keys. Integer keys are unique; float keys (LFRU) can tie, and a tie
    across the cut is settled by `exact` (recency, then id)."""
    if over == 1 and exact is None:
        return [min(candidates, key=key.__getitem__)]
    # A C-level sort of a few dozen keys beats heapq.nsmallest's Python loop.
    order = sorted(candidates, key=key.__getitem__)
    if exact is not None and over < len(order) and key[order[over - 1]] == key[order[over]]:
        order = sorted(candidates, key=exact)
    return order[:over]


def _simulate_layer(steps: list[tuple[int, ...]], policy: str, capacity: int, prefetch: str | None,
                    decay: float) -> tuple[int, int]:
    # Every policy is "evict the cached expert with the smallest key"; keys only change when an expert is requested,
    # so the experts outside the current step keep their keys during it and a step's evictions can be chosen at once.
    if policy == "lfru" and decay == 0.0:
        policy = "lfu"  # no decay leaves plain counts; LFU's integer keys rank them the same, faster
    n = len(steps)
    ids = 1 + max(map(max, steps), default=0)  # folds the lowest-id tie-break into integer keys
    key: dict[int, Any] = {}
    count: dict[int, int] = {}
    crf: dict[int, float] = {}
    last: dict[int, int] = {}
    exact = (lambda e: (key[e], last[e], e)) if policy == "lfru" else None
    nexts = _next_uses(steps) if policy == "belady" else []
    cache: set[int] = set()
    hits = misses = 0
    previous: tuple[int, ...] = ()
    for t, req in enumerate(steps):
        missing = [e for e in req if e not in cache]
        if missing:
            misses += len(missing)
            over = len(cache) + len(missing) - capacity
            if over > 0:
                free = cache.difference(req)
                if prefetch and previous:
                    # The predictor's experts are protected unless nothing else is left to evict.
                    kept = free.intersection(previous)
                    free -= kept
                    if len(free) < over:
                        victims = [*free, *_victims(kept, over - len(free), key, exact)]
                    else:
                        victims = _victims(free, over, key, exact)
                else:
                    victims = _victims(free, over, key, exact)
                cache.difference_update(victims)
            cache.update(missing)
        hits += len(req) - len(missing)
        if policy == "lru":
            base = t * ids
            for e in req:
                key[e] = base + e
        elif policy == "lfu":
            for e in req:
                c = count[e] = count.get(e, 0) + 1
                key[e] = (c * (n + 1) + t) * ids + e
        elif policy == "lfru":
            for e in req:
                # CRF now = 1 + CRF at the last use, decayed over the steps since; stored as log2(CRF) + λ·t, which
                # orders experts as their CRFs decayed to any common later time would.
                c = crf[e] = 1.0 + (2.0 ** (-decay * (t - last[e])) * crf[e] if e in last else 0.0)
                last[e] = t
                key[e] = math.log2(c) + decay * t
        else:  # belady: the farthest next use has the smallest key
            for e, nxt in zip(req, nexts[t], strict=True):
                key[e] = -nxt * ids + e
        previous = req
    return hits, misses


def simulate(trace: Trace, policy: str, capacity: int, *, prefetch: str | None = None,
             lfru_decay: float = DEFAULT_LFRU_DECAY) -> SimResult:
    """Replay `trace` through per-layer caches of `capacity` slots.

    policy: "lru"; "lfu" (uses counted over the whole trace so far, evicted or not; ties to the least recently
    used); "lfru" (LRFU: each past use counts 2^(-lfru_decay · its age in steps), see DEFAULT_LFRU_DECAY); "belady"
    (offline optimum: evict the expert this layer needs again farthest ahead, never-again first).
    prefetch="previous" (online policies only) models the cheapest predictor, "this layer will want what it wanted
    for the previous token": those experts are protected from eviction in the next step. With per-layer caches
    they are still resident, so the prediction costs no transfer; it only overrides the policy's eviction order.
    """
    return _simulate(_layer_steps(trace), policy, capacity, prefetch, lfru_decay)


def _simulate(steps: list[list[tuple[int, ...]]], policy: str, capacity: int, prefetch: str | None,
              lfru_decay: float) -> SimResult:
    if policy not in POLICIES:
        raise CacheSimError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
    if prefetch is not None and prefetch not in PREFETCH:
        raise CacheSimError(f"unknown prefetch {prefetch!r} (choose from {', '.join(PREFETCH)} or none)")
    if prefetch is not None and policy == "belady":
        raise CacheSimError("belady is the offline optimum without prefetch: it takes no predictor")
    if lfru_decay < 0 or not math.isfinite(lfru_decay):
        raise CacheSimError(f"LFRU decay must be a finite number >= 0, not {lfru_decay}")
    _check_capacity(capacity, steps)
    result = SimResult(policy, prefetch, capacity)
    for layer in steps:
        h, m = _simulate_layer(layer, policy, capacity, prefetch, lfru_decay)
        result.layer_hits.append(h)
        result.layer_misses.append(m)
    return result


def sch(trace: Trace, segment: int, capacity: int) -> float:
    """Segment cache hit rate, SCH(segment, capacity), from the local-routing-consistency work: per layer, cut the
    steps into segments of `segment` tokens and keep, for each, the `capacity` experts it chose most; the share of
    requests those would serve, over all segments and layers weighted by requests. An oracle that reloads the best
    static set for free at each segment, so a reference for, not a bound on, what Belady reaches.

    Segments run over the steps a layer computed, so a skipped token neither splits nor pads a segment."""
    return _sch(_layer_steps(trace), segment, capacity)


def _sch(steps: list[list[tuple[int, ...]]], segment: int, capacity: int) -> float:
    if segment < 1 or capacity < 1:
        raise CacheSimError(f"SCH needs segment >= 1 and capacity >= 1, not ({segment}, {capacity})")
    served = total = 0
    for layer in steps:
        for start in range(0, len(layer), segment):
            counts: dict[int, int] = {}
            for step in layer[start:start + segment]:
                total += len(step)
                for e in step:
                    counts[e] = counts.get(e, 0) + 1
            served += sum(heapq.nlargest(capacity, counts.values()))
    return served / total if total else 0.0


def capacity_from_spec(spec: str, top_k: int) -> int:
    """'8' is 8 slots per layer; '2x' is 2 × top_k (fractions round to the nearest slot, at least top_k)."""
    s = str(spec).strip().lower()
    try:
        if s.endswith("x"):
            mult = float(s[:-1])
            if not math.isfinite(mult) or mult <= 0:
                raise ValueError
            return max(top_k, round(mult * top_k))
        slots = int(s)
    except ValueError:
        raise CacheSimError(
            f"bad cache capacity {spec!r}: give slots per layer (8) or a multiple of top-k (2x)") from None
    if slots < 1:
        raise CacheSimError(f"bad cache capacity {spec!r}: it must be at least 1 slot")
    return slots


def report(trace: Trace, capacities: Iterable[int | str], policies: Sequence[str] = POLICIES,
           prefetch_options: Sequence[str | None] = (None, "previous"), *,
           sch_segment: int = SCH_SEGMENT, lfru_decay: float = DEFAULT_LFRU_DECAY) -> list[dict[str, Any]]:
    """Rows for the CLI table, per capacity: each policy × prefetch (Belady only without), then an "sch" row.
    vs_belady is the hit rate over Belady's at that capacity (1.0 = optimal)."""
    steps = _layer_steps(trace)  # regrouped once for every simulation below
    rows: list[dict[str, Any]] = []
    # `2x` and `4` on a top-2 model are one capacity: simulated and listed once
    caps = list(dict.fromkeys(capacity_from_spec(str(c), trace.top_k) for c in capacities))
    for cap in caps:
        best = _simulate(steps, "belady", cap, None, lfru_decay)

        def ratio(rate: float, best: SimResult = best) -> float | None:
            return rate / best.hit_rate if best.hit_rate else None

        for policy in policies:
            for pre in prefetch_options:
                if policy == "belady" and pre is not None:
                    continue
                r = best if policy == "belady" else _simulate(steps, policy, cap, pre, lfru_decay)
                rows.append({"policy": policy, "prefetch": pre, "capacity": cap, "hits": r.hits,
                             "misses": r.misses, "hit_rate": r.hit_rate, "vs_belady": ratio(r.hit_rate)})
        rate = _sch(steps, sch_segment, cap)
        rows.append({"policy": f"sch{sch_segment}", "prefetch": None, "capacity": cap, "hits": None,
                     "misses": None, "hit_rate": rate, "vs_belady": ratio(rate)})
    return rows


def synthetic_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, *,
                    locality: float = DEFAULT_LOCALITY, segment: int = SCH_SEGMENT, seed: int = 0,
                    zipf: float = DEFAULT_ZIPF) -> Trace:
    """A decode trace with the temporal locality real routers show, for benchmarks and tests.

    Per layer, experts get a Zipf-like popularity (weight 1/rank^zipf over a random ranking). Every `segment`
    tokens a hot set of ~2 × top_k experts is drawn by popularity. Each token then samples top_k distinct experts
    from a mix: with weight `locality` the hot set (by popularity), with the rest all experts uniformly.

    `locality` is the share of routing mass on the hot set, the knob for how consistent neighbouring tokens are;
    `zipf` the skew that makes some experts popular throughout. The defaults (0.5, 0.7) are fitted to the design
    notes' real Mixtral-8x7B routing (8 experts top-2). There, with per-layer caches of 4 slots, LRU ≈ 0.60,
    LFU ≈ 0.62, Belady ≈ 0.73, SCH(16, 4) ≈ 0.73, and of 3 slots LRU ≈ 0.49, Belady ≈ 0.59; these traces give
    LRU 0.60, LFU 0.62, Belady 0.73, SCH(16, 4) 0.76, and LRU 0.46, Belady 0.58 (2,000 tokens × 32 layers, seeds
    0-2). A model with less consistent routing wants a lower locality; 0 leaves only the popularity skew.
    """
    if not 0.0 <= locality <= 1.0:
        raise CacheSimError(f"locality must be within [0, 1], not {locality}")
    if min(n_tokens, n_layers, n_experts, top_k, segment) < 1 or top_k > n_experts:
        raise CacheSimError("synthetic trace needs positive sizes and top_k <= n_experts")
    rng = np.random.default_rng(seed)
    hot_size = min(n_experts, 2 * top_k)
    n_seg = -(-n_tokens // segment)
    chosen = np.empty((n_layers, n_tokens, top_k), dtype=np.int64)
    for layer in range(n_layers):
        pop = np.empty(n_experts)
        pop[rng.permutation(n_experts)] = 1.0 / np.arange(1, n_experts + 1) ** zipf
        pop /= pop.sum()
        # Gumbel-top-k draws without replacement proportionally to the weights, in draw order (router order).
        hot_keys = np.log(pop) + rng.gumbel(size=(n_seg, n_experts))
        hot = np.argpartition(-hot_keys, hot_size - 1, axis=1)[:, :hot_size]
        hot_mass = np.zeros((n_seg, n_experts))
        np.put_along_axis(hot_mass, hot, pop[hot], axis=1)
        hot_mass /= hot_mass.sum(axis=1, keepdims=True)
        weights = locality * hot_mass + (1.0 - locality) / n_experts
        token_w = np.repeat(weights, segment, axis=0)[:n_tokens]
        with np.errstate(divide="ignore"):
            keys = np.log(token_w) + rng.gumbel(size=(n_tokens, n_experts))
        top = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        chosen[layer] = np.take_along_axis(top, order, axis=1)
    per_token = chosen.transpose(1, 0, 2).tolist()
    trace = Trace("synthetic", "synthetic", n_layers, n_experts, top_k)
    trace.tokens = [TraceToken(pos, 0, "decode", per_token[pos]) for pos in range(n_tokens)]
    return trace
