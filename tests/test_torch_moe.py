"""The native torch MoE engine against transformers (the oracle) on tiny random-init checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from synthetic_moe import build_hf_moe

from localmoe.engine.torch_moe import TorchMoEEngine
from localmoe.errors import LocalmoeError

# Different shapes per architecture, so a transposed or mis-sized weight cannot slip through on both.
SHAPES = {
    "qwen3_moe": dict(hidden=64, layers=2, experts=8, top_k=2, expert_ff=32, heads=4, kv_heads=2, head_dim=16),
    "mixtral": dict(hidden=48, layers=3, experts=6, top_k=2, expert_ff=40, heads=6, kv_heads=2, head_dim=8),
}
# synthetic_moe builds these two; the others are built here straight from transformers' config classes.
OTHER = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        intermediate_size=36, norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=5,
        num_experts_per_tok=2, intermediate_size=20, clip_qkv=0.3, norm_topk_prob=False, eos_token_id=2,
    )),
}
VOCAB = 320
PROMPT = [5, 17, 300, 42, 42, 7, 1, 250, 99, 123, 64, 8, 8, 201, 77, 3, 150, 11]  # 18 tokens
DECODE_STEPS = 8


def _build_other(out, arch: str):
    import transformers

    config_class, model_class, kwargs = OTHER[arch]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, initializer_range=0.05, tie_word_embeddings=False, max_position_embeddings=256, **kwargs
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).float()
    with torch.no_grad():  # transformers zeroes biases at init, which would hide a bias we forget to add
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def _shape(arch: str, key: str) -> int:
    if arch in SHAPES:
        return SHAPES[arch][key]
    kwargs = OTHER[arch][2]
    return {"layers": kwargs["num_hidden_layers"], "experts": kwargs["num_experts"]}[key]


@pytest.fixture(scope="module", params=sorted([*SHAPES, *OTHER]))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    if arch in SHAPES:
        out = build_hf_moe(tmp_path_factory.mktemp(arch), arch, vocab=VOCAB, init_std=0.05, **SHAPES[arch])
    else:
        out = _build_other(tmp_path_factory.mktemp(arch), arch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return arch, out, model


def _reference(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("slots", [None, 1])
def test_prompt_and_greedy_decode_match_transformers(checkpoint, slots):
    arch, path, model = checkpoint
    engine = TorchMoEEngine(path, expert_slots=slots, prefetch=False)
    got = engine.logits(PROMPT)
    want = _reference(model, PROMPT)
    assert got.shape == want.shape == (len(PROMPT), VOCAB)
    assert np.abs(want).max() > 0.5  # near-zero logits would match anything
    diff = np.abs(got - want).max()

    chosen, rows = engine.decode_logits(PROMPT, DECODE_STEPS)
    assert rows.shape == (DECODE_STEPS, VOCAB)
    for step in range(DECODE_STEPS):
        want_row = _reference(model, PROMPT + chosen[:step])[-1]
        diff = max(diff, np.abs(rows[step] - want_row).max())
        assert chosen[step] == int(want_row.argmax())
    print(f"{arch} slots={slots}: max |logit diff| {diff:.2e}, {engine.cache_stats()}")
    assert diff <= 1e-4
    # one slot per layer, fewer than the experts a token takes: the native step resolves its misses through the
    # store (Qwen2-MoE's shared expert included)
    import localmoe.engine.torch_moe.kernels as native

    if native.available():
        assert engine.native_steps == DECODE_STEPS - 1 and engine.cache_stats()["decode_step"] == "native"

    stats = engine.cache_stats()
    if slots is None:
        assert stats["misses"] <= _shape(arch, "layers") * _shape(arch, "experts")  # each expert read at most once
    else:
        assert stats["slots"] == 1
        assert stats["misses"] > _shape(arch, "layers") * _shape(arch, "experts")
    assert stats["hits"] + stats["misses"] > 0
    engine.close()


def test_native_decode_step_matches_transformers(checkpoint, monkeypatch):
    """Every expert resident (preload): one-token steps run whole in native code (step.DecodeStep) for every
    architecture, Qwen2-MoE's shared expert included, and still match transformers to 1e-4 for 8 greedy steps; its
    telemetry names the same experts as the torch path's."""
    import localmoe.engine.torch_moe.kernels as native

    arch, path, model = checkpoint
    runs_native = native.available()  # no C compiler: the torch path both times
    runs = {}
    for kernels in ("native", "torch"):
        native._library.cache_clear()
        monkeypatch.setenv(native.ENV, kernels)
        engine = TorchMoEEngine(path, telemetry=True)
        engine.load()
        engine.preload()
        chosen, rows = engine.decode_logits(PROMPT, DECODE_STEPS)
        runs[kernels] = (chosen, engine.native_steps, engine.cache_stats(), [t.experts for t in engine.routing])
        engine.close()
        want = _reference(model, PROMPT + chosen[:-1])[len(PROMPT) - 1:]
        assert np.abs(rows - want).max() <= 1e-4
        assert chosen == [int(r.argmax()) for r in want]
    native._library.cache_clear()
    chosen, steps, stats, routing = runs["native"]
    assert steps == (DECODE_STEPS - 1 if runs_native else 0) and runs["torch"][1] == 0
    assert stats["decode_step"] == ("native" if runs_native else "torch")
    assert stats["misses"] == 0
    for key in ("hits", "experts_used", "tokens"):  # the statistics count as the torch path's
        assert stats[key] == runs["torch"][2][key], key
    assert chosen == runs["torch"][0]
    assert [[sorted(e) for e in t] for t in routing] == [[sorted(e) for e in t] for t in runs["torch"][3]]


def test_cache_size_changes_counts_not_logits(checkpoint):
    _, path, _ = checkpoint
    results = []
    for slots in (None, 1, 3):
        engine = TorchMoEEngine(path, expert_slots=slots, prefetch=False)  # counts without timing
        results.append((engine.logits(PROMPT), engine.decode_logits(PROMPT, 4), engine.hits, engine.misses))
        engine.close()
    full, one, three = results
    for other in (one, three):
        np.testing.assert_array_equal(full[0], other[0])
        assert full[1][0] == other[1][0]
        # decode steps with every expert resident run whole in native code (step.DecodeStep): the same sums in
        # another order, so equal to float rounding rather than bit for bit
        np.testing.assert_allclose(full[1][1], other[1][1], rtol=0, atol=1e-5)
    assert full[3] < three[3] < one[3]  # fewer slots, more reads
    assert full[2] > one[2]


def _assert_matches(engine, model) -> None:
    """The prompt's logits and 8 greedy steps' within 1e-4 of transformers, the same tokens chosen."""
    got = engine.logits(PROMPT)
    assert np.abs(got - _reference(model, PROMPT)).max() <= 1e-4
    chosen, rows = engine.decode_logits(PROMPT, DECODE_STEPS)
    want = _reference(model, PROMPT + chosen[:-1])[len(PROMPT) - 1:]
    assert np.abs(rows - want).max() <= 1e-4
    assert chosen == [int(r.argmax()) for r in want]


def _predictions_scored(stats: dict) -> bool:
    """Whether the routers' predictions reached the store and were scored against the experts then used. Not
    `prefetches > 0`: a predicted read counts as a prefetch only if the loader thread starts it before the compute
    thread needs the expert, which two busy test workers can starve."""
    return any(layer["prediction_precision"] is not None for layer in stats["layers"])


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "fifo"])
def test_one_slot_under_every_policy_with_prefetch_matches_transformers(checkpoint, policy):
    """The smallest cache (1 slot per layer) under each policy, prefetching from the routers: the same logits as
    transformers (≤ 1e-4) for the prompt and 8 greedy steps. Cache size, policy and prefetch change only speed."""
    arch, path, model = checkpoint
    engine = TorchMoEEngine(path, expert_slots=1, cache_policy=policy, prefetch=True)
    _assert_matches(engine, model)
    stats = engine.cache_stats()
    assert stats["policy"] == policy and stats["slots"] == 1
    assert _predictions_scored(stats)
    engine.close()


def test_compiled_engine_matches_transformers(checkpoint):
    """torch.compile of the dense part (the expert loop an opaque op inside one graph), at the smallest cache with
    prefetch from the in-graph prediction: the same logits as transformers (≤ 1e-4) for the prompt and 8 steps."""
    arch, path, model = checkpoint
    engine = TorchMoEEngine(path, expert_slots=1, prefetch=True, compile=True)
    _assert_matches(engine, model)
    stats = engine.cache_stats()
    assert _predictions_scored(stats) and stats["misses"] > 0
    import torch._dynamo.utils

    # every layer in one graph per shape: the expert loop did not split the model into pieces
    assert not torch._dynamo.utils.counters["graph_break"]
    engine.close()


def test_compiled_int8_engine_matches_eager_int8(tmp_path):
    """One architecture (qwen3_moe) is enough for the int8 op under compile: one test, not four with three skipped."""
    from localmoe.engine.torch_moe.quant import int8_linear_available

    if not int8_linear_available():
        pytest.skip("this torch has no int8 linear")
    path = build_hf_moe(tmp_path / "qwen3_moe", "qwen3_moe", vocab=VOCAB, init_std=0.05, **SHAPES["qwen3_moe"])
    opts = dict(expert_dtype="int8", dense_dtype="int8")
    eager, compiled = TorchMoEEngine(path, **opts), TorchMoEEngine(path, compile=True, **opts)
    np.testing.assert_allclose(compiled.logits(PROMPT), eager.logits(PROMPT), atol=1e-5)
    assert compiled.decode_logits(PROMPT, 4)[0] == eager.decode_logits(PROMPT, 4)[0]
    eager.close()
    compiled.close()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(LocalmoeError, match="config.json"):
        TorchMoEEngine(tmp_path).load()


def test_unsupported_architecture(checkpoint, tmp_path):
    _, path, _ = checkpoint
    d = _copy(path, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt_oss"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(LocalmoeError, match="gpt_oss"):
        TorchMoEEngine(d).load()


def test_a_sharded_checkpoint_matches_transformers_and_a_missing_shard_is_named(checkpoint, tmp_path):
    _, path, model = checkpoint
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(path / "config.json", d)
    # Split into two shards with an index, as large hub checkpoints are, then lose the second one.
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(d / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # the sharded copy gives the oracle's logits: every tensor found in its shard, with one slot per layer so that
    # experts too are read from both files
    got = TorchMoEEngine(d, expert_slots=1, prefetch=False).logits(PROMPT)
    assert np.abs(got - _reference(model, PROMPT)).max() <= 1e-4
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LocalmoeError, match="model-00002-of-00002.safetensors"):
        TorchMoEEngine(d).load()


def test_no_safetensors(checkpoint, tmp_path):
    _, path, _ = checkpoint
    d = _copy(path, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(LocalmoeError, match="no .safetensors"):
        TorchMoEEngine(d).load()


@pytest.mark.parametrize("which", ["dense", "expert"])
def test_wrong_tensor_shape_is_named(checkpoint, tmp_path, which):
    arch, path, _ = checkpoint
    d = _copy(path, tmp_path / "m")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if which == "dense":
        bad = "model.layers.1.self_attn.k_proj.weight"
    else:
        bad = next(k for k in sorted(tensors) if ".experts.1." in k and k.startswith("model.layers.0."))
    tensors[bad] = tensors[bad][:, :-1].contiguous()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    engine = TorchMoEEngine(d, expert_slots=1)
    with pytest.raises(LocalmoeError, match=bad.replace(".", r"\.")):
        # an expert is only read once routed to: run until every expert of layer 0 has been asked for
        engine.load()
        for t in range(VOCAB):
            engine.logits([t])


def test_python_api_loads_both_backends(tiny_moe):
    """`localmoe.engine.load(path, backend=...)`: the same weights through llama.cpp (GGUF) and torch (HF)."""
    from localmoe import engine as engines

    tokens = list(range(1, 17))
    native = engines.load(tiny_moe[0], backend="torch", expert_slots=2)
    gguf = engines.load(tiny_moe[1], logits_all=True, n_ctx=256)
    try:
        a, b = native.logits(tokens), gguf.logits(tokens)
    finally:
        native.close()
        gguf.close()
    assert a.shape == b.shape and np.abs(a - b).max() < 5e-3


def test_uncompiled_engine_leaves_dynamo_unimported(tiny_moe):
    """Importing torch._dynamo costs ~50 MiB of RAM (under a memory cap, that is expert slots): an engine that
    does not compile must answer without it. Its own process, since other tests here compile."""
    import subprocess
    import sys

    code = ("import sys; from localmoe.engine.torch_moe import TorchMoEEngine; "
            f"e = TorchMoEEngine({str(tiny_moe[0])!r}, expert_slots=2); e.load(); e.logits([1, 2, 3]); "
            "e.decode_logits([4, 5], 3); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


# --- the KV cache kept between calls (prefix reuse) ---------------------------------------------------------------


def test_a_call_reuses_the_kv_cache_of_its_common_prefix_and_matches_a_fresh_evaluation(checkpoint):
    """A next turn evaluates only what follows the tokens the KV cache holds, with the logits of a fresh full
    evaluation (1e-5) and of transformers (1e-4); an edited earlier turn reuses only what precedes the edit."""
    arch, path, model = checkpoint
    engine = TorchMoEEngine(path, prefetch=False)
    fresh = TorchMoEEngine(path, prefetch=False)
    try:
        first, then = PROMPT[:10], PROMPT + [9, 10, 11]
        engine.logits(first)
        got = engine.logits(then, reuse=True)
        want = fresh.logits(then)
        assert got.shape == (len(then) - len(first), VOCAB)
        np.testing.assert_allclose(got, want[len(first):], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, _reference(model, then)[len(first):], rtol=0, atol=1e-4)

        edited = then[:4] + [(then[4] + 1) % VOCAB] + then[5:]  # a changed earlier turn: no stale keys after it
        got = engine.logits(edited, reuse=True)
        assert got.shape == (len(edited) - 4, VOCAB)
        np.testing.assert_allclose(got, fresh.logits(edited)[4:], rtol=0, atol=1e-5)

        shorter = edited[:7]  # a retry of a shorter history: its last token is evaluated again for its logits
        got = engine.logits(shorter, reuse=True)
        assert got.shape == (1, VOCAB)
        np.testing.assert_allclose(got, fresh.logits(shorter)[-1:], rtol=0, atol=1e-5)
    finally:
        engine.close()
        fresh.close()


def _chat_turns(engine, config, turns: list[str]) -> list[tuple[str, object]]:
    """Each question with the conversation so far; the answers and their statistics."""
    history, out = [], []
    for question in turns:
        history.append({"role": "user", "content": question})
        answer = "".join(engine.stream(list(history), config))
        history.append({"role": "assistant", "content": answer})
        out.append((answer, engine.stats))
    return out


def test_chat_turns_evaluate_only_the_new_tokens_in_both_engines(tiny_moe):
    """Through `stream`, as the chat calls it: the second and third turns evaluate only their new tokens (the
    statistics say how many), and answer exactly as an engine that evaluates the whole conversation afresh."""
    from localmoe.chat.display import stats_line
    from localmoe.engine import GenerationConfig
    from localmoe.engine.llamacpp import LlamaCppEngine

    config = GenerationConfig(max_tokens=6, temperature=0.0)
    turns = ["Tell me about the sea.", "And the mountains?", "Which is older?"]
    engine = TorchMoEEngine(tiny_moe[0])
    gguf = LlamaCppEngine(tiny_moe[1], n_ctx=512)
    try:
        kept = _chat_turns(engine, config, turns)
        by_llama = _chat_turns(gguf, config, turns)
        for answers in (kept, by_llama):
            first, *later = [stats for _, stats in answers]
            assert first.prompt_eval_tokens == first.prompt_tokens
            for stats in later:
                assert 0 < stats.prompt_eval_tokens < stats.prompt_tokens / 2
                reused = stats.prompt_tokens - stats.prompt_eval_tokens
                assert f"({reused} prompt tokens reused)" in stats_line("m", stats)
                assert stats.prefill_tokens_per_s == pytest.approx(stats.prompt_eval_tokens / stats.ttft_s)
        afresh = []
        for i in range(len(turns)):
            engine._kv = []  # nothing to reuse: the whole conversation evaluated again
            history = [m for answer, q in zip(kept[:i], turns, strict=False)
                       for m in ({"role": "user", "content": q}, {"role": "assistant", "content": answer[0]})]
            afresh.append("".join(engine.stream([*history, {"role": "user", "content": turns[i]}], config)))
            assert engine.stats.prompt_eval_tokens == engine.stats.prompt_tokens
        assert afresh == [answer for answer, _ in kept]
    finally:
        engine.close()
        gguf.close()


def test_every_expert_is_read_in_the_background_and_the_native_step_takes_over(tiny_moe):
    """No preload: when every expert fits, load() starts reading them all, answering starts at once, and by the
    second answer every expert is resident for the native step; with load_all=False they are read only on
    demand, the native step resolving each miss."""
    import localmoe.engine.torch_moe.kernels as native
    from localmoe.engine import GenerationConfig

    config = GenerationConfig(max_tokens=8, temperature=0.0)
    question = [{"role": "user", "content": "Count the waves."}]
    engine = TorchMoEEngine(tiny_moe[0])
    lazy = TorchMoEEngine(tiny_moe[0], load_all=False)
    try:
        engine.load()
        lazy.load()
        first = "".join(engine.stream(question, config))
        assert engine.store.wait_filled(timeout=60)
        assert all(len(layer.entries) == 8 for layer in engine.store.layers)
        second = "".join(engine.stream(question, config))
        assert first == second == "".join(lazy.stream(question, config))
        if native.available():
            assert engine.native_steps > 0 and engine.cache_stats()["decode_step"] == "native"
        assert not lazy.store.filling and lazy.cache_stats()["misses"] > 0
        assert sum(len(layer.entries) for layer in lazy.store.layers) < 3 * 8  # only what the answer used
    finally:
        engine.close()
        lazy.close()


def test_the_page_cache_is_kept_only_when_every_expert_fits(tiny_moe, monkeypatch):
    """With every expert resident the checkpoint's pages stay cached for the next process (no DONTNEED); with a
    partial cache each read expert and the dense weights are dropped from it, so they are not in RAM twice."""
    import os

    dropped = []
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        dropped.append(advice)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    for slots, want in ((None, False), (1, True)):
        dropped.clear()
        engine = TorchMoEEngine(tiny_moe[0], expert_slots=slots, prefetch=False)
        engine.logits([1, 2, 3, 4])
        engine.close()
        assert (os.POSIX_FADV_DONTNEED in dropped) is want, slots


def test_a_prompt_on_the_torch_path_lets_the_native_steps_evicted_experts_go(tiny_moe):
    """With a partial cache, a prompt (the torch path) evicts experts the native step's table pointed to: the
    table lets them go, so they are freed rather than held beside the cache (under a memory cap a chat's second
    turn was killed for that)."""
    import gc
    import weakref

    import localmoe.engine.torch_moe.kernels as native

    if not native.available():
        pytest.skip("no native kernels here")
    engine = TorchMoEEngine(tiny_moe[0], expert_slots=1, prefetch=False)
    try:
        engine.decode_logits([1, 2, 3, 4, 5], 4)
        assert engine.native_steps > 0 and engine._step.table.held() > 0
        refs = [weakref.ref(m) for layer in engine._step.table._held for mats in layer.values() for m in mats]
        engine.logits(list(range(10, 60)))  # a prompt through the torch path, one slot per layer: evictions
        gc.collect()
        cached = {id(m) for c in engine.store.layers for w in c.entries.values() for m in w.mats}
        assert engine._step.table.held() == 0
        assert all(r() is None or id(r()) in cached for r in refs)
        assert any(r() is None for r in refs)
        engine.decode_logits([1, 2, 3, 4, 5], 3)  # and the native step syncs again
        assert engine._step.table.held() > 0
    finally:
        engine.close()
