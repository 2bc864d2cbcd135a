"""The torch engine's expert store: policies against hand-worked counts and against `localmoe cache-sim` on the
same trace, prefetch, tiers' statistics, adaptive expert count, 8-bit and bf16 experts, routing telemetry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_moe import build_hf_moe

import localmoe.engine.torch_moe.kernels as native_kernels
from helpers import run_cli
from localmoe.engine.torch_moe import TorchMoEEngine
from localmoe.engine.torch_moe.expert_store import ExpertStore, ExpertWeights, LayerStats
from localmoe.errors import LocalmoeError
from localmoe.experts import cachesim
from localmoe.experts.trace import Trace, TraceToken

VOCAB = 320
SHAPE = dict(hidden=64, layers=3, experts=8, top_k=2, expert_ff=32, heads=4, kv_heads=2, head_dim=16)
PROMPT = [5, 17, 300, 42, 42, 7, 1, 250, 99, 123, 64, 8, 8, 201, 77, 3, 150, 11]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_hf_moe(tmp_path_factory.mktemp("q3"), "qwen3_moe", vocab=VOCAB, init_std=0.05, **SHAPE)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, ckpt):
    """The same model with routers 40× sharper, as a trained MoE's: a few experts carry most of the mass."""
    out = tmp_path_factory.mktemp("peaked")
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({k: v * 40 if k.endswith("mlp.gate.weight") else v for k, v in tensors.items()},
                      out / f.name, metadata={"format": "pt"})
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


# --- policies -------------------------------------------------------------------------------------------------


def _store(policy: str, slots: int, trace_steps: list[list[int]], prefetch: bool = False) -> ExpertStore:
    """A one-layer store over fake experts, fed `trace_steps` as forward calls."""
    def load(layer, expert):
        return (torch.full((4, 2), float(expert)), torch.full((2, 2), float(expert))), 48

    store = ExpertStore(load, 1, 8, slots, policy=policy, prefetch=prefetch)
    for step in trace_steps:
        store.begin_step(0, sorted(step), 1)
        for e in sorted(step):
            store.get(0, e)
        store.end_step(0)
    return store


# Worked by hand, 2 slots, top-1: (hits, misses)
#   0 1 0 2 0 1 2 2
#   LRU:  m m h m(-1) h m(-2) m(-0) h            -> 3 hits
#   FIFO: m m h m(-0) m(-1) m(-2) m(-0) h        -> 2 hits
#   LFU:  m m h m(-1: 1 use vs 2) h m(-2: 1 vs 3) m(-1: 2 vs 3) h      -> 3 hits
#   LFRU: as LFU here (scores decay by 2^(-t/8))                       -> 3 hits
HAND = [[0], [1], [0], [2], [0], [1], [2], [2]]


@pytest.mark.parametrize("policy,hits", [("lru", 3), ("fifo", 2), ("lfu", 3), ("lfru", 3)])
def test_policies_match_hand_worked_counts(policy, hits):
    t = _store(policy, 2, HAND).totals()
    assert (t.hits, t.misses) == (hits, len(HAND) - hits)
    assert t.bytes_read == 48 * t.misses


def _trace(steps: list[list[list[int]]], top_k: int) -> Trace:
    """steps[token][layer] -> a Trace of decode tokens."""
    return Trace("t", "test", len(steps[0]), 8, top_k,
                 [TraceToken(i, 0, "decode", [list(layer) for layer in tok]) for i, tok in enumerate(steps)])


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru"])
def test_store_counts_equal_the_simulator_on_a_trace(policy):
    trace = cachesim.synthetic_trace(300, 1, 8, 2, seed=3)
    steps = [t.experts[0] for t in trace.tokens]
    for slots in (2, 4):
        t = _store(policy, slots, steps).totals()
        sim = cachesim.simulate(trace, policy, slots)
        assert (t.hits, t.misses) == (sim.hits, sim.misses)
        assert sim.hits <= cachesim.simulate(trace, "belady", slots).hits  # Belady is never beaten


def test_engine_replaying_a_trace_counts_what_the_simulator_counts(ckpt):
    """The live engine (real checkpoint, real layers) routed by a trace meets its cache exactly as cache-sim says."""
    trace = cachesim.synthetic_trace(40, SHAPE["layers"], 8, 2, seed=5)
    for policy in ("lru", "lfu", "lfru"):
        engine = TorchMoEEngine(ckpt, expert_slots=4, cache_policy=policy, prefetch=False, device="cpu")  # no warm tier
        engine.replay(trace)
        engine.decode_logits([1], len(trace.tokens))  # one token per forward call: one step per layer each
        if native_kernels.available():  # the replay runs in the native decode step (its forced experts)
            assert engine.native_steps == len(trace.tokens)  # the one-token prompt too
        sim = cachesim.simulate(trace, policy, 4)
        stats = engine.cache_stats()
        assert [lay["hits"] for lay in stats["layers"]] == sim.layer_hits, policy
        assert [lay["misses"] for lay in stats["layers"]] == sim.layer_misses, policy
        engine.close()


def test_preload_makes_a_resident_engine_read_nothing_later(ckpt):
    engine = TorchMoEEngine(ckpt, prefetch=False)
    engine.preload()
    assert engine.cache_stats()["misses"] == 0
    engine.decode_logits(PROMPT, 4)
    s = engine.cache_stats()
    assert s["misses"] == 0 and s["bytes_read"] == 0 and s["hits"] > 0


def test_loaded_engine_keeps_no_mapping_of_the_checkpoint(ckpt):
    """The dense weights are copied out and the shards unmapped: a mapped page cannot leave RAM, so keeping the
    mmaps would hold the whole file resident under a memory cap. Experts still read (pread) afterwards."""
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc (Linux)")
    engine = TorchMoEEngine(ckpt, expert_slots=2)
    engine.load()
    assert ".safetensors" not in "".join(line for line in maps.read_text().splitlines(True) if str(ckpt) in line)
    engine.decode_logits(PROMPT, 2)
    assert engine.cache_stats()["misses"] > 0
    engine.close()


def test_unknown_policy_and_dtype_are_clear_errors(ckpt):
    with pytest.raises(LocalmoeError, match="unknown expert cache policy 'mru'"):
        TorchMoEEngine(ckpt, cache_policy="mru").load()
    with pytest.raises(LocalmoeError, match="unknown expert dtype 'int4'"):
        TorchMoEEngine(ckpt, expert_dtype="int4")
    with pytest.raises(LocalmoeError, match="expert_top_p"):
        TorchMoEEngine(ckpt, expert_top_p=1.5)


def test_bad_device_names_are_clear_errors(ckpt):
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(LocalmoeError, match="unsupported device"):
            TorchMoEEngine(ckpt, device=bad).load()


def test_engine_options_without_a_checkpoint_are_refused(tmp_path, smollm):
    r = run_cli("ask", "hi", "--prefetch", home=tmp_path)
    assert r.returncode != 0 and "--prefetch needs --model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("trace", "hi", "--model", str(smollm.path), "--cache-policy", "lfu", home=tmp_path)
    assert r.returncode != 0 and "applies to the torch engine" in r.stderr and "Traceback" not in r.stderr


def test_missing_shard_closes_what_it_opened(ckpt, tmp_path):
    """A checkpoint whose index names a missing shard: a one-line error, and no file descriptor left open."""
    import os
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LocalmoeError, match="missing"):
        TorchMoEEngine(d).load()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_a_gpu_is_a_clear_error(ckpt):
    with pytest.raises(LocalmoeError, match="torch sees no CUDA GPU"):
        TorchMoEEngine(ckpt, device="cuda").load()


# --- prefetch -------------------------------------------------------------------------------------------------


def test_exact_prefetch_turns_misses_into_prefetch_hits(ckpt):
    """Replaying a trace makes pre-gating exact: with top-k slots, a later layer's experts are always on their way
    before it needs them, so its demand misses vanish; results never depend on prefetch."""
    trace = cachesim.synthetic_trace(30, SHAPE["layers"], 8, 2, seed=9)
    counts = {}
    for prefetch in (False, True):
        engine = TorchMoEEngine(ckpt, expert_slots=2, prefetch=prefetch, device="cpu")  # no warm tier
        engine.replay(trace)
        engine.decode_logits([1], len(trace.tokens))
        counts[prefetch] = engine.cache_stats()
        engine.close()
    off, on = counts[False], counts[True]
    assert off["prefetches"] == off["prefetch_hits"] == 0
    assert on["prefetches"] > 0 and on["prefetch_hits"] > 0
    later_on, later_off = on["layers"][1:], off["layers"][1:]  # layer 0 has no previous layer to predict it
    # A prediction still queued when its layer starts is read by the compute thread instead (a miss, not a wait
    # behind the queue), so how many misses remain depends on timing; with exact predictions most vanish.
    assert sum(lay["misses"] for lay in later_on) < sum(lay["misses"] for lay in later_off) / 2
    assert sum(lay["wasted_prefetches"] for lay in later_on) == 0
    # exact predictions are never gated off; layer 0 is never predicted, so never scored
    assert on["prefetches_skipped"] == 0 and all(lay["prediction_precision"] == 1.0 for lay in later_on)
    assert on["layers"][0]["prediction_precision"] is None
    assert all(lay["prediction_precision"] is None for lay in off["layers"])
    assert on["misses"] < off["misses"]
    assert on["hits"] + on["misses"] == off["hits"] + off["misses"]  # same uses, served differently


def _drain(store: ExpertStore) -> None:
    import time

    deadline = time.monotonic() + 30
    while store._pending and time.monotonic() < deadline:
        time.sleep(0.001)


def test_prefetch_stops_while_predictions_are_wrong_and_resumes_when_right():
    """A layer whose predictions are mostly wrong stops loading them (each wasted load is a read and an eviction);
    its predictions are still scored, so it prefetches again once they come right."""
    def load(layer, expert):
        return (torch.full((4, 2), float(expert)), torch.full((2, 2), float(expert))), 48

    store = ExpertStore(load, 1, 8, 2, prefetch=True)
    st = store.stats[0]

    def step(predicted: list[int], used: list[int]) -> None:
        store.prefetch(0, predicted)
        _drain(store)
        store.begin_step(0, used, 1)
        for e in used:
            store.get(0, e)
        store.end_step(0)

    for i in range(6):  # predicts 2, 3, ..., 7, uses 0: every prediction wrong
        step([2 + i], [0])
    # precision 1 → 0.8 → 0.64 → 0.51 → 0.41 after four wrong loads: the fifth and sixth are skipped
    assert (st.prefetches, st.prefetches_skipped) == (4, 2)
    assert store.precision[0] == pytest.approx(0.8 ** 6)
    assert st.wasted_prefetches >= 3
    for i in range(4):  # now right: 1 and 2 alternate, each not cached when predicted (2 slots)
        step([1 + i % 2], [0, 1 + i % 2])
    # scored while skipped: 0.26 → 0.41 → 0.53, so the third and fourth are loaded again, and used
    assert (st.prefetches, st.prefetches_skipped, st.prefetch_hits) == (6, 4, 2)
    assert store.precision[0] > 0.6
    store.close()


def test_a_prompt_step_does_not_score_the_prediction():
    """A prompt's experts span all its tokens, the prediction only its last: only one-token steps are scored."""
    def load(layer, expert):
        return (torch.zeros(4, 2), torch.zeros(2, 2)), 48

    store = ExpertStore(load, 1, 8, 2, prefetch=True, prefetch_min_precision=2.0)  # scores, never loads
    store.prefetch(0, [5])
    store.begin_step(0, [0, 1, 2], tokens=7)
    assert store.precision[0] == 1.0
    store.prefetch(0, [6])
    store.begin_step(0, [0], tokens=1)
    assert store.precision[0] == pytest.approx(0.8)
    assert store.stats[0].prefetches == 0 and store.stats[0].prefetches_skipped == 2
    store.close()


def test_prefetch_is_on_by_default_only_when_experts_come_from_disk(ckpt):
    """On the CPU with experts left on disk and torch's kernels (with the native ones the native decode step runs
    instead: faster, and it does not prefetch); not when all are resident, and not on a GPU (measured slower)."""
    import localmoe.engine.torch_moe.kernels as native

    cases = [("cpu", 2, "torch", True), ("cpu", 2, "native", not native.available()),
             ("cpu", 8, "torch", False)]  # 8 = every expert of a layer resident
    if torch.cuda.is_available():
        cases.append(("cuda", 2, "native", False))
    for device, slots, kernels, want in cases:
        engine = TorchMoEEngine(ckpt, expert_slots=slots, device=device, kernels=kernels)
        engine.load()
        assert engine.cache_stats()["prefetch"] is want, (device, slots, kernels)
        engine.close()
    engine = TorchMoEEngine(ckpt, expert_slots=2, prefetch=False, device="cpu")
    engine.load()
    assert engine.cache_stats()["prefetch"] is False
    engine.close()


def test_prefetch_from_the_routers_keeps_logits_and_counts_consistently(ckpt):
    full = TorchMoEEngine(ckpt)
    want = full.decode_logits(PROMPT, 6)
    engine = TorchMoEEngine(ckpt, expert_slots=2, prefetch=True, cache_policy="lfru")
    got = engine.decode_logits(PROMPT, 6)
    assert got[0] == want[0]
    # prefetching decodes on the torch path, the full cache in the native step: the same sums in another order
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    s = engine.cache_stats()
    assert s["prefetches"] > 0
    assert s["prefetch_hits"] + s["wasted_prefetches"] <= s["prefetches"]
    assert s["stall_s"] > 0 and s["bytes_read"] > 0
    per_layer = LayerStats()
    for lay in s["layers"]:
        per_layer.add(LayerStats(**{k: v for k, v in lay.items() if k in LayerStats.__dataclass_fields__}))
    assert per_layer.hits == s["hits"] and per_layer.bytes_read == s["bytes_read"]


# --- expert dtypes --------------------------------------------------------------------------------------------


def test_int8_quantisation_is_per_row_and_close():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    e = ExpertWeights((torch.cat((w, 2 * w)), w.T.contiguous()), "int8")
    assert e.mats[0].dtype == torch.int8 and e.scales is not None and e.scales[0].shape == (32,)  # gate and up
    assert e.nbytes == 3 * 16 * 32 + (16 + 16 + 32) * 4
    x = torch.randn(3, 32)
    want = torch.cat((x @ w.T, 2 * x @ w.T), dim=-1)
    assert torch.allclose(e._linear(x, 0), want, atol=0.01 * float(want.abs().max()))
    exact = ExpertWeights((torch.cat((w, 2 * w)), w.T.contiguous()))
    gate, up = x @ w.T, 2 * x @ w.T
    torch.testing.assert_close(exact.ffn(x), (torch.nn.functional.silu(gate) * up) @ w, rtol=1e-5, atol=1e-5)
    assert torch.allclose(e.ffn(x), exact.ffn(x), atol=0.02 * float(exact.ffn(x).abs().max()))


# Stated tolerance for 8-bit and bf16 experts: logits within 1% of the largest |logit| of the float32 model, and the
# same greedy tokens; measured on this model: ~0.2% (bf16) and ~0.3% (int8).
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_low_precision_experts_stay_within_tolerance(ckpt, dtype):
    ref = TorchMoEEngine(ckpt)
    want_tokens, want = ref.decode_logits(PROMPT, 6)
    engine = TorchMoEEngine(ckpt, expert_dtype=dtype, expert_slots=3)
    got_tokens, got = engine.decode_logits(PROMPT, 6)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 0.01 * scale
    assert np.abs(got - want).max() > 0  # the experts really are held in another precision
    assert got_tokens == want_tokens
    s = engine.cache_stats()
    per_expert = s["bytes_read"] / (s["misses"] + s["prefetches"])
    assert per_expert == 3 * 32 * 64 * 4  # disk bytes are the checkpoint's float32, whatever the cache holds


def test_int8_dense_and_experts_on_the_cpu_kernel(ckpt):
    """expert_dtype=int8 + dense_dtype=int8 (attention and output head, as llama.cpp's q8_0): stated tolerance 5% of
    the largest |logit| (measured ~2% here: activations are quantised too), same greedy tokens."""
    from localmoe.engine.torch_moe.quant import Int8Linear, int8_linear_available

    if not int8_linear_available():
        pytest.skip("this torch has no dynamic int8 linear")
    want_tokens, want = TorchMoEEngine(ckpt, device="cpu").decode_logits(PROMPT, 6)
    engine = TorchMoEEngine(ckpt, expert_dtype="int8", dense_dtype="int8", device="cpu")
    got_tokens, got = engine.decode_logits(PROMPT, 6)
    assert isinstance(engine.model.output, Int8Linear)
    assert isinstance(engine.store.get(0, 0).mats[0], Int8Linear)  # the CPU fast tier holds packed int8
    assert 0 < np.abs(got - want).max() <= 0.05 * float(np.abs(want).max())
    assert got_tokens == want_tokens
    with pytest.raises(LocalmoeError, match="dense dtype"):
        TorchMoEEngine(ckpt, dense_dtype="int4")


# --- adaptive expert count ------------------------------------------------------------------------------------


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(p_logits.astype(np.float64)), logsoftmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_adaptive_expert_count_uses_fewer_experts_as_p_falls(peaked):
    engine = TorchMoEEngine(peaked)
    topk = engine.logits(PROMPT)
    assert engine.experts_per_token == 2.0
    results = {}
    for p in (1.0, 0.9, 0.5, 0.01):
        engine.reset_cache_stats()
        engine.set_expert_top_p(p)
        logits = engine.logits(PROMPT)
        results[p] = (engine.experts_per_token, _kl(topk, logits))
    assert results[1.0] == (2.0, 0.0)  # p = 1 is plain top-k
    assert results[0.01][0] == 1.0  # never fewer than one expert
    used = [results[p][0] for p in (1.0, 0.9, 0.5, 0.01)]
    assert used == sorted(used, reverse=True) and 1.0 < results[0.5][0] < 2.0
    assert results[0.5][1] > 0 and results[0.01][1] >= results[0.9][1]


@pytest.mark.parametrize("slots", [None, 1])
def test_adaptive_expert_count_in_the_native_step_matches_the_torch_path(peaked, slots):
    """The native decode step keeps the same experts as MoE.route under top-p (fewer than k on some tokens), with
    the same logits (1e-5), the same experts per token and the same telemetry, all resident or with one slot."""
    import localmoe.engine.torch_moe.kernels as native

    if not native.available():
        pytest.skip("no native kernels here")
    runs = {}
    for kernels in ("native", "torch"):
        engine = TorchMoEEngine(peaked, expert_top_p=0.5, kernels=kernels, expert_slots=slots, prefetch=False,
                                telemetry=True)
        engine.load()
        engine.store.wait_filled()
        chosen, rows = engine.decode_logits(PROMPT, 8)
        runs[kernels] = (chosen, rows, engine.native_steps, engine.cache_stats(),
                         [[sorted(e) for e in t.experts] for t in engine.routing])
        engine.close()
    (chosen, rows, steps, stats, routing), torch_run = runs["native"], runs["torch"]
    assert steps == 7 and torch_run[2] == 0
    assert chosen == torch_run[0] and routing == torch_run[4]
    np.testing.assert_allclose(rows, torch_run[1], rtol=0, atol=1e-5)
    assert 1.0 < stats["experts_per_token"] < 2.0  # some tokens kept one expert, some two
    for key in ("experts_used", "tokens", "hits", "misses"):
        assert stats[key] == torch_run[3][key], key


def test_top_p_routing_matches_a_direct_computation(peaked):
    """One MoE layer's route() against the rule written out with numpy: keep the top experts until the mass of the
    better ones reaches p, renormalise (qwen3 normalises top-k)."""
    engine = TorchMoEEngine(peaked, expert_top_p=0.6, device="cpu")  # x below is a CPU tensor
    engine.load()
    moe = engine.model.moes[0]
    x = torch.randn(50, SHAPE["hidden"])
    weights, idx = moe.route(x)
    probs = torch.softmax(x @ moe.router.T, -1).numpy()
    for row in range(50):
        order = np.argsort(-probs[row])[:2]
        keep = [order[0]] + ([order[1]] if probs[row, order[0]] < 0.6 else [])
        want = probs[row, keep] / probs[row, keep].sum()
        assert [e for e in idx[row].tolist() if e >= 0] == keep
        np.testing.assert_allclose(weights[row, : len(keep)].numpy(), want, rtol=1e-5)


# --- routing telemetry and the CLI ----------------------------------------------------------------------------


def test_telemetry_records_the_routers_top_k(ckpt):
    from transformers import AutoModelForCausalLM

    engine = TorchMoEEngine(ckpt, telemetry=True)
    engine.logits(PROMPT)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor([PROMPT]), output_router_logits=True)
    assert len(engine.routing) == len(PROMPT)
    for layer, logits in enumerate(out.router_logits):
        want = torch.topk(logits.reshape(len(PROMPT), -1), 2, dim=-1).indices.tolist()
        assert [t.experts[layer] for t in engine.routing] == want


def test_trace_command_on_a_checkpoint_then_cache_sim(tiny_moe, tmp_path):
    ckpt = tiny_moe[0]  # with tokenizer files: the trace command chats
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Count the stars, then the moons.")
    out = tmp_path / "t.jsonl"
    r = run_cli("trace", "--model", str(ckpt), "--prompt-file", str(prompt), "--out", str(out),
                "--max-tokens", "12", "--temperature", "0", home=tmp_path)
    assert r.returncode == 0, r.stderr
    trace = Trace.load(out)
    assert trace.backend == "torch" and (trace.n_layers, trace.n_experts, trace.top_k) == (3, 8, 2)
    phases = [t.phase for t in trace.tokens]
    assert phases.count("decode") >= 1 and phases[0] == "prompt"
    assert all(len(layer) == 2 for t in trace.tokens for layer in t.experts)
    r = run_cli("cache-sim", str(out), "--capacity", "2x", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {row["policy"] for row in rows} >= {"lru", "belady"}


def test_ask_json_reports_the_expert_cache(tiny_moe, tmp_path):
    ckpt = tiny_moe[0]
    r = run_cli("ask", "Hello there", "--model", str(ckpt), "--json", "--max-tokens", "5", "--temperature", "0",
                "--fast-memory", "600MiB", "--cache-policy", "lfu", "--expert-dtype", "int8", "--prefetch",
                home=tmp_path)
    assert r.returncode == 0, r.stderr
    experts = json.loads(r.stdout)["experts"]
    assert experts["policy"] == "lfu" and experts["expert_dtype"] == "int8" and experts["prefetch"] is True
    assert experts["hits"] + experts["misses"] > 0 and len(experts["layers"]) == 3
    assert experts["bytes_read"] > 0


def test_ask_compiled_gives_the_same_answer(tiny_moe, tmp_path):
    ckpt = tiny_moe[0]
    args = ("ask", "Hello there", "--model", str(ckpt), "--json", "--max-tokens", "8", "--temperature", "0")
    plain = run_cli(*args, home=tmp_path)
    compiled = run_cli(*args, "--compile", home=tmp_path, timeout=300)
    assert plain.returncode == 0 and compiled.returncode == 0, plain.stderr + compiled.stderr
    plain, compiled = json.loads(plain.stdout), json.loads(compiled.stdout)
    assert compiled["experts"]["compiled"] is True and plain["experts"]["compiled"] is False
    assert compiled["answer"] == plain["answer"]
    assert compiled["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 8


def test_compile_without_a_cpp_compiler_is_one_line(tiny_moe, tmp_path):
    """Inductor's CPU code needs a C++ compiler; without one, `--compile` fails in one line, no traceback."""
    env = {"CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing cached
    r = run_cli("ask", "Hello there", "--model", str(tiny_moe[0]), "--max-tokens", "4", "--compile",
                "--device", "cpu", home=tmp_path, env_extra=env, timeout=300)  # on a GPU, inductor needs no C++
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("localmoe: error: torch.compile failed") and "compiler" in lines[0], lines[0]


def test_engine_options_on_a_gguf_are_refused(tmp_path, smollm):
    r = run_cli("ask", "hi", "--model", str(smollm.path), "--expert-dtype", "int8", home=tmp_path)
    assert r.returncode != 0
    assert "applies to the torch engine" in r.stderr and "Traceback" not in r.stderr
