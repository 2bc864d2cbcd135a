"""Expert-cache simulation: hand-worked LRU / LFU / LFRU / Belady runs, Belady against an exhaustive optimum and every
online policy, a definition-by-definition reference simulator, SCH, capacity specs, reports and synthetic traces."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from localmoe.errors import LocalmoeError
from localmoe.experts.cachesim import (
    POLICIES,
    CacheSimError,
    capacity_from_spec,
    report,
    sch,
    simulate,
    synthetic_trace,
)
from localmoe.experts.trace import Trace, TraceToken


def make_trace(layers: list[list[list[int]]], n_experts: int = 8) -> Trace:
    """A trace from per-layer step lists: layers[layer][token] = the experts chosen ([] = skipped)."""
    n_tokens = len(layers[0])
    top_k = max((len(s) for layer in layers for s in layer), default=1)
    trace = Trace("hand", "test", len(layers), n_experts, top_k)
    trace.tokens = [TraceToken(t, 0, "decode", [layer[t] for layer in layers]) for t in range(n_tokens)]
    return trace


def one_layer(*steps: list[int] | int, n_experts: int = 8) -> Trace:
    return make_trace([[s if isinstance(s, list) else [s] for s in steps]], n_experts)


def random_trace(seed: int, n_tokens: int = 60, n_experts: int = 6, top_k: int = 2, n_layers: int = 2) -> Trace:
    rng = random.Random(seed)
    layers = [[rng.sample(range(n_experts), top_k) for _ in range(n_tokens)] for _ in range(n_layers)]
    return make_trace(layers, n_experts)


def counts(r) -> tuple[int, int]:
    return r.hits, r.misses


# --- hand-worked runs ---------------------------------------------------------------------------------------------

# One layer, top-1, 2 slots. Time t: 0 1 2 3 4 5 6 7 8 9
#                          expert: 0 0 0 1 2 1 2 1 2 0
SEQ = (0, 0, 0, 1, 2, 1, 2, 1, 2, 0)


def test_lru_by_hand() -> None:
    # t0 miss {0}; t1, t2 hit; t3 miss {0,1}; t4 miss, evicts 0 (last t2) for 2: {1,2};
    # t5-t8 hit; t9 miss, evicts 1 (t7) rather than 2 (t8).  Hits 6, misses 4.
    assert counts(simulate(one_layer(*SEQ), "lru", 2)) == (6, 4)


def test_lfu_by_hand() -> None:
    # Counts persist across evictions. t3 {0,1}, counts 0:3 1:1.
    # t4 2 misses, evicts 1 (1 < 3): {0,2}.   t5 1 misses (1:2), evicts 2 (1 < 3): {0,1}.
    # t6 2 misses (2:2), evicts 1 (2 < 3).    t7 1 misses (1:3), evicts 2 (2 < 3).
    # t8 2 misses (2:3), 0 and 1 both count 3: the less recent, 0 (t2), goes.   t9 0 misses.
    # Hits t1, t2 only: 2, misses 8.
    assert counts(simulate(one_layer(*SEQ), "lfu", 2)) == (2, 8)


def test_lfru_by_hand() -> None:
    # λ = 0.5, w = 2^-0.5 ≈ 0.707; CRF = Σ w^age over past uses, compared at the current step.
    # t2: CRF0 = 1 + w + w² = 2.207.  t3: 1 loads, {0,1}.
    # t4 (2 misses): 0 = 2.207·w² = 1.10, 1 = w = 0.71 -> evict 1.          {0,2}
    # t5 (1 misses): 0 = 2.207·w³ = 0.78, 2 = w = 0.71 -> evict 2.          {0,1}, CRF1 = 1 + w² = 1.5
    # t6 (2 misses): 0 = 2.207·w⁴ = 0.55, 1 = 1.5·w = 1.06 -> evict 0.      {1,2}, CRF2 = 1.5
    # t7, t8 hit (CRF1 = CRF2 = 1.75 at their use).  t9 (0 misses): 1 = 1.75·w² = 0.875 < 2 = 1.24 -> evict 1.
    # Hits t1, t2, t7, t8: 4, misses 6: between LFU's 2 and LRU's 6.
    assert counts(simulate(one_layer(*SEQ), "lfru", 2, lfru_decay=0.5)) == (4, 6)
    # At the default half-life of 8 steps, 0's early burst outweighs the alternation as it does for LFU: at t8,
    # 0 = (1 + w + w²)·w⁶ = 1.64 and 1 = (1 + (1 + w²)·w²)·w = 2.34 with w = 2^-1/8, and the run matches LFU's.
    assert counts(simulate(one_layer(*SEQ), "lfru", 2)) == (2, 8)


def test_belady_by_hand() -> None:
    # t4 (2 misses): 0 is next used at t9, 1 at t5 -> evict 0 (farthest): {1,2}; t5-t8 hit; t9 misses.
    # Hits 6, misses 4: here LRU happens to be optimal, LFU is not.
    assert counts(simulate(one_layer(*SEQ), "belady", 2)) == (6, 4)
    # Never-used-again goes first: 0 1 2 0 with 2 slots, at t2 1 is never needed again -> evict 1, and t3 hits.
    assert counts(simulate(one_layer(0, 1, 2, 0), "belady", 2)) == (1, 3)
    assert counts(simulate(one_layer(0, 1, 2, 0), "lru", 2)) == (0, 4)


def test_experts_of_one_step_are_never_evicted_for_each_other() -> None:
    # top-2, 3 slots: steps [0,1] [2,0] [3,1] [0,2].
    # t0 misses 0, 1. t1: 0 hits, 2 loads into the free slot: {0,1,2}.
    # t2 [3,1]: 1 hits. 3 needs a slot; 1 (last used t0) is the LRU expert, but the step needs it, so the choice
    #   is between 0 and 2 (both t1): the lower id, 0, goes -> {1,2,3}. Loading 3 first and evicting 1 would have
    #   turned 1's hit into a second miss.
    # t3 [0,2]: 2 hits; 0 misses, evicting 1 (t2, tied with 3, lower id): hits 3, misses 5.
    trace = one_layer([0, 1], [2, 0], [3, 1], [0, 2])
    assert counts(simulate(trace, "lru", 3)) == (3, 5)
    # Belady at t2: 0 and 2 are both next used at t3; whichever goes, t3 misses once.
    assert counts(simulate(trace, "belady", 3)) == (3, 5)


def test_ties_go_to_the_lowest_id() -> None:
    # 1 and 8 arrive together and are never used again before 3 needs a slot: equal in every policy's eyes, so 1
    # goes and 8 then hits (a set iterates {1, 8} as 8, 1, which a tie left to iteration order would evict).
    trace = one_layer([1, 8], [3], [8], n_experts=9)
    for policy in POLICIES:
        assert counts(simulate(trace, policy, 2)) == (1, 3), policy


def test_prefetch_previous_protects_the_last_steps_experts() -> None:
    # LFU with the "same as last token" predictor: at t4, 1 (used at t3) is protected, so 0 goes instead of 1;
    # from then on the alternation hits. t9: 0 misses and 1 goes (2 was used at t8). Hits 6, misses 4.
    assert counts(simulate(one_layer(*SEQ), "lfu", 2, prefetch="previous")) == (6, 4)
    # With top-1 and 2 slots, protecting the last expert leaves one choice: every policy becomes LRU.
    for seed in range(5):
        rng = random.Random(seed)
        trace = one_layer(*(rng.randrange(4) for _ in range(80)))
        lru = counts(simulate(trace, "lru", 2))
        for policy in ("lru", "lfu", "lfru"):
            assert counts(simulate(trace, policy, 2, prefetch="previous")) == lru


def test_prefetch_yields_when_the_step_needs_the_slots() -> None:
    # top-2, 3 slots. t0 misses 0, 1. t1 [2,3] needs two slots, one more than is free, and the only candidates,
    # 0 and 1, are both protected (used at t0): one goes anyway, by LRU order (tie at t0: the lower id, 0).
    # {1,2,3}; t2 [1,2] hits twice. Hits 2, misses 4.
    trace = one_layer([0, 1], [2, 3], [1, 2])
    assert counts(simulate(trace, "lru", 3, prefetch="previous")) == (2, 4)


# --- Belady is optimal -------------------------------------------------------------------------------------------


def optimum_hits(steps: list[tuple[int, ...]], capacity: int) -> int:
    """The best hit count any eviction schedule reaches (exhaustive over cache states, tiny traces only)."""
    states: dict[frozenset[int], int] = {frozenset(): 0}
    for req in steps:
        want = set(req)
        nxt: dict[frozenset[int], int] = {}
        for cache, hits in states.items():
            over = len(cache | want) - capacity
            for victims in itertools.combinations(sorted(cache - want), max(over, 0)):
                state = frozenset((cache - set(victims)) | want)
                nxt[state] = max(nxt.get(state, -1), hits + len(cache & want))
        states = nxt
    return max(states.values())


@pytest.mark.parametrize("seed", range(6))
def test_belady_matches_the_exhaustive_optimum(seed: int) -> None:
    rng = random.Random(seed)
    top_k = rng.choice((1, 2))
    steps = [tuple(rng.sample(range(5), top_k)) for _ in range(14)]
    for capacity in range(top_k, 5):
        r = simulate(one_layer(*(list(s) for s in steps)), "belady", capacity)
        assert r.hits == optimum_hits(steps, capacity)


@pytest.mark.parametrize("seed", range(4))
def test_no_online_policy_beats_belady(seed: int) -> None:
    traces = [random_trace(seed, n_tokens=120, n_experts=8, top_k=2),
              synthetic_trace(300, 3, 8, 2, seed=seed),
              synthetic_trace(200, 2, 32, 4, locality=0.7, seed=seed)]
    for trace in traces:
        for capacity in (trace.top_k, trace.top_k + 1, 2 * trace.top_k, trace.n_experts - 1):
            best = simulate(trace, "belady", capacity)
            for policy in ("lru", "lfu", "lfru"):
                for decay in (0.0, 0.125, 1.0):
                    r = simulate(trace, policy, capacity, lfru_decay=decay)
                    assert r.hits <= best.hits
                    # Belady is optimal per layer too, not only in total.
                    assert all(h <= b for h, b in zip(r.layer_hits, best.layer_hits, strict=True))


# --- against a definition-by-definition reference ----------------------------------------------------------------


def rank(policy: str, past: list[int], expert: int, now: int, decay: float) -> tuple:
    """Smallest is evicted; ties go to the least recently used, then the lowest id."""
    if policy == "lru":
        return (past[-1], expert)
    if policy == "lfu":
        return (len(past), past[-1], expert)
    return (sum(2.0 ** (-decay * (now - u)) for u in past), past[-1], expert)


def reference(trace: Trace, policy: str, capacity: int, decay: float = 0.125) -> tuple[int, int]:
    """Slow and literal: keep every use time, and evict one expert at a time by the policy's definition."""
    hits = misses = 0
    for layer in range(trace.n_layers):
        steps = [tok.experts[layer] for tok in trace.tokens if tok.experts[layer]]
        uses: dict[int, list[int]] = {}
        cache: set[int] = set()
        for t, req in enumerate(steps):
            for e in req:
                if e in cache:
                    hits += 1
                    continue
                misses += 1
                if len(cache) == capacity:
                    # Experts of this step are never candidates: they must be resident together.
                    ranks = {x: rank(policy, uses[x], x, t, decay) for x in cache - set(req)}
                    cache.remove(min(ranks, key=ranks.__getitem__))
                cache.add(e)
            for e in req:
                uses.setdefault(e, []).append(t)
    return hits, misses


@pytest.mark.parametrize("seed", range(5))
def test_online_policies_match_the_reference(seed: int) -> None:
    trace = random_trace(seed, n_tokens=80, n_experts=7, top_k=2 + seed % 2)
    for policy, capacity in itertools.product(("lru", "lfu", "lfru"), (3, 4, 6)):
        assert counts(simulate(trace, policy, capacity)) == reference(trace, policy, capacity), (policy, capacity)
    for decay in (0.0, 0.4):
        assert counts(simulate(trace, "lfru", 4, lfru_decay=decay)) == reference(trace, "lfru", 4, decay=decay)


def test_lfru_limits() -> None:
    # λ = 0 counts every use forever: LFU. λ = 1 makes the last use outweigh all older ones: LRU (with top-1, where
    # no two experts share a use time).
    for seed in range(4):
        trace = random_trace(seed, n_tokens=100, n_experts=6, top_k=2)
        assert counts(simulate(trace, "lfru", 3, lfru_decay=0.0)) == counts(simulate(trace, "lfu", 3))
        top1 = random_trace(seed, n_tokens=100, n_experts=5, top_k=1)
        assert counts(simulate(top1, "lfru", 3, lfru_decay=1.0)) == counts(simulate(top1, "lru", 3))


# --- edges -------------------------------------------------------------------------------------------------------


def test_capacity_below_top_k_is_rejected() -> None:
    trace = random_trace(0, top_k=3)
    with pytest.raises(CacheSimError, match="capacity 2 is below the 3 experts"):
        simulate(trace, "lru", 2)
    # One exception for both kinds of caller: a one-line CLI error and a ValueError.
    assert issubclass(CacheSimError, LocalmoeError) and issubclass(CacheSimError, ValueError)


def test_bad_arguments() -> None:
    trace = random_trace(0)
    with pytest.raises(CacheSimError, match="unknown cache policy"):
        simulate(trace, "fifo", 4)
    with pytest.raises(CacheSimError, match="unknown prefetch"):
        simulate(trace, "lru", 4, prefetch="next-token-oracle")
    with pytest.raises(CacheSimError, match="belady"):
        simulate(trace, "belady", 4, prefetch="previous")
    with pytest.raises(CacheSimError, match="decay"):
        simulate(trace, "lfru", 4, lfru_decay=-1)
    bad = make_trace([[[1, 1]]])
    with pytest.raises(CacheSimError, match="twice"):
        simulate(bad, "lru", 4)
    short = random_trace(0)
    short.tokens[3].experts = short.tokens[3].experts[:1]
    with pytest.raises(CacheSimError, match="pos 3 has 1 layers"):
        simulate(short, "lru", 4)
    with pytest.raises(CacheSimError, match="locality"):
        synthetic_trace(10, 1, 8, 2, locality=1.5)


def test_a_cache_holding_every_expert_only_misses_compulsorily() -> None:
    trace = random_trace(1, n_tokens=50, n_experts=6, top_k=2, n_layers=3)
    for layer in range(3):
        trace.tokens[0].experts[layer] = []  # a skipped token must not count either
    for policy in POLICIES:
        for capacity in (6, 9):
            r = simulate(trace, policy, capacity)
            distinct = [len({e for tok in trace.tokens for e in tok.experts[layer]}) for layer in range(3)]
            assert r.layer_misses == distinct
            assert r.loads == r.misses == sum(distinct)
            assert r.requests == 2 * 49 * 3


def test_skipped_layers_are_ignored() -> None:
    # Layer 1 is computed only for some tokens (like llama.cpp's last layer in a prompt batch); its cache sees
    # just those steps, in order, and layer 2 is never computed.
    rng = random.Random(3)
    dense = [rng.sample(range(8), 2) for _ in range(40)]
    sparse = [s if t % 3 == 0 else [] for t, s in enumerate(dense)]
    trace = make_trace([dense, sparse, [[] for _ in dense]])
    only = one_layer(*[s for s in sparse if s])
    for policy in POLICIES:
        r = simulate(trace, policy, 3)
        alone = simulate(only, policy, 3)
        assert (r.layer_hits[1], r.layer_misses[1]) == counts(alone)
        assert (r.layer_hits[2], r.layer_misses[2]) == (0, 0)
        assert r.layer_hit_rates[2] is None
        assert r.requests == 2 * 40 + 2 * 14
    empty = make_trace([[[], []]])
    assert simulate(empty, "lru", 2).hit_rate == 0.0
    assert sch(empty, 16, 2) == 0.0


def test_saved_and_loaded_trace_simulates_identically(tmp_path: Path) -> None:
    trace = synthetic_trace(120, 3, 16, 4, seed=5)
    trace.tokens[0].experts[2] = []
    trace.save(tmp_path / "t.jsonl")
    loaded = Trace.load(tmp_path / "t.jsonl")
    for policy in POLICIES:
        for pre in (None, "previous"):
            if policy == "belady" and pre:
                continue
            a = simulate(trace, policy, 6, prefetch=pre)
            b = simulate(loaded, policy, 6, prefetch=pre)
            assert (a.layer_hits, a.layer_misses) == (b.layer_hits, b.layer_misses)
    assert sch(trace, 16, 6) == sch(loaded, 16, 6)


@pytest.mark.parametrize("experts", [[[0, 16], [1], [2]], [[0], [1]], [[0], [1], ["x"]], "0,1"])
def test_a_trace_with_impossible_routing_is_refused(tmp_path: Path, experts) -> None:
    """An expert id past the header's count, or the wrong number of layers, would replay routing no model has."""
    trace = synthetic_trace(4, 3, 16, 2, seed=1)
    trace.save(tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "experts": experts})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LocalmoeError, match=r"bad.jsonl:3: bad trace line \(experts must be 3 lists of expert ids "
                                            r"below 16"):
        Trace.load(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("head", ['["not", "a", "header"]', '{"format": "localmoe-trace", "version": "1"}',
                                  '{"format": "localmoe-trace", "version": 1, "model": "m"}'])
def test_a_bad_trace_header_is_one_line(tmp_path: Path, head: str) -> None:
    (tmp_path / "t.jsonl").write_text(head + "\n")
    with pytest.raises(LocalmoeError, match=r"t.jsonl(: bad trace header| is not a localmoe routing trace)"):
        Trace.load(tmp_path / "t.jsonl")


# --- SCH, capacity specs, report ---------------------------------------------------------------------------------


def test_sch_by_hand() -> None:
    # Segments of 2 steps: [0,1] [0,2] | [3,1] [3,1] | [2,0]
    # capacity 1: best single expert serves 2 of 4 (0), 2 of 4 (3 or 1), 1 of 2 -> 5 / 10.
    # capacity 2: 3 of 4 (0 + 1), 4 of 4, 2 of 2 -> 9 / 10 (segments weighted by their requests).
    steps = [[0, 1], [0, 2], [3, 1], [3, 1], [2, 0]]
    assert sch(one_layer(*steps), 2, 1) == pytest.approx(0.5)
    assert sch(one_layer(*steps), 2, 2) == pytest.approx(0.9)
    # A skipped token neither splits a segment nor counts; a never-computed layer adds nothing.
    gappy = make_trace([[[0, 1], [], [0, 2], [3, 1], [], [3, 1], [2, 0]], [[]] * 7])
    assert sch(gappy, 2, 2) == pytest.approx(0.9)
    with pytest.raises(CacheSimError):
        sch(gappy, 0, 2)


def test_capacity_from_spec() -> None:
    assert capacity_from_spec("8", 2) == 8
    assert capacity_from_spec("2x", 4) == 8
    assert capacity_from_spec(" 1.5X ", 4) == 6
    assert capacity_from_spec("1x", 8) == 8
    assert capacity_from_spec("0.1x", 8) == 8  # never below what one step needs
    for bad in ("", "x", "two", "-1", "0", "0x", "-2x", "nanx", "3.5"):
        with pytest.raises(CacheSimError, match="bad cache capacity"):
            capacity_from_spec(bad, 2)


def test_report_rows() -> None:
    trace = synthetic_trace(200, 2, 8, 2, seed=1)
    rows = report(trace, [3, "2x"])
    per_cap = 3 * 2 + 1 + 1  # lru/lfu/lfru × 2 prefetch options, belady once, the SCH reference
    assert len(rows) == 2 * per_cap
    assert [r["capacity"] for r in rows] == [3] * per_cap + [4] * per_cap
    assert [(r["policy"], r["prefetch"]) for r in rows[:per_cap]] == [
        ("lru", None), ("lru", "previous"), ("lfu", None), ("lfu", "previous"), ("lfru", None),
        ("lfru", "previous"), ("belady", None), ("sch16", None)]
    for row in rows:
        assert set(row) == {"policy", "prefetch", "capacity", "hits", "misses", "hit_rate", "vs_belady"}
        if row["policy"] == "belady":
            assert row["vs_belady"] == 1.0
        elif row["policy"] != "sch16":
            assert 0.0 < row["vs_belady"] <= 1.0
            assert row["hit_rate"] == simulate(trace, row["policy"], row["capacity"], prefetch=row["prefetch"]).hit_rate
    assert rows[-1]["hit_rate"] == sch(trace, 16, 4)
    assert report(trace, [3, "2x", 4, 3]) == rows  # one capacity asked twice (4 is 2x here) is listed once


# --- synthetic traces --------------------------------------------------------------------------------------------


def test_synthetic_trace_shape_and_determinism() -> None:
    a = synthetic_trace(50, 4, 16, 4, seed=7)
    assert (a.n_layers, a.n_experts, a.top_k, len(a.tokens)) == (4, 16, 4, 50)
    for tok in a.tokens:
        assert len(tok.experts) == 4
        for chosen in tok.experts:
            assert len(chosen) == len(set(chosen)) == 4
            assert all(0 <= e < 16 for e in chosen)
    assert a == synthetic_trace(50, 4, 16, 4, seed=7)
    assert a != synthetic_trace(50, 4, 16, 4, seed=8)
    # More locality, more hits.
    lo = simulate(synthetic_trace(400, 4, 16, 4, locality=0.1, seed=1), "lru", 8).hit_rate
    hi = simulate(synthetic_trace(400, 4, 16, 4, locality=0.9, seed=1), "lru", 8).hit_rate
    assert hi > lo + 0.1


def test_default_locality_lands_near_the_mixtral_figures() -> None:
    # Design notes, real Mixtral-8x7B routing (8 experts, top-2), per-layer cache of 4: LRU ≈ 0.60, LFU ≈ 0.62,
    # Belady ≈ 0.73, SCH(16, 4) ≈ 0.73; of 3: LRU ≈ 0.49, Belady ≈ 0.59.
    trace = synthetic_trace(1000, 8, 8, 2, seed=0)
    lru4, lfu4, bel4 = (simulate(trace, p, 4).hit_rate for p in ("lru", "lfu", "belady"))
    lru3, bel3 = (simulate(trace, p, 3).hit_rate for p in ("lru", "belady"))
    assert 0.5 < lru4 < 0.7 and 0.5 < lfu4 < 0.72
    assert 0.65 < bel4 < 0.8 and bel4 > max(lru4, lfu4) + 0.05
    assert 0.38 < lru3 < 0.56 and 0.5 < bel3 < 0.66 and bel3 > lru3
    assert abs(sch(trace, 16, 4) - bel4) < 0.08
