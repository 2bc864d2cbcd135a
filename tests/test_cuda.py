"""The torch engine with its fast tier in GPU memory and the pinned warm tier: the same logits as transformers on
the CPU, whatever the slots. Runs only where torch sees a CUDA GPU (the device machine); CI has none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_moe import build_hf_moe

from localmoe.engine.torch_moe import TorchMoEEngine
from localmoe.errors import LocalmoeError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 320
SHAPES = {
    "qwen3_moe": dict(hidden=64, layers=2, experts=8, top_k=2, expert_ff=32, heads=4, kv_heads=2, head_dim=16),
    "mixtral": dict(hidden=48, layers=3, experts=6, top_k=2, expert_ff=40, heads=6, kv_heads=2, head_dim=8),
}
PROMPT = [5, 17, 300, 42, 42, 7, 1, 250, 99, 123, 64, 8, 8, 201, 77, 3, 150, 11]
STEPS = 8
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    arch = request.param
    out = build_hf_moe(tmp_path_factory.mktemp(arch), arch, vocab=VOCAB, init_std=0.05, **SHAPES[arch])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return arch, out, model


def _reference(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _assert_matches(engine, model) -> None:
    """The prompt's logits and STEPS greedy steps' within TOL of transformers on the CPU, the same tokens."""
    got = engine.logits(PROMPT)
    assert np.abs(got - _reference(model, PROMPT)).max() <= TOL
    chosen, rows = engine.decode_logits(PROMPT, STEPS)
    want = _reference(model, PROMPT + chosen[:-1])[len(PROMPT) - 1:]
    assert np.abs(rows - want).max() <= TOL
    assert chosen == [int(r.argmax()) for r in want]


@pytest.mark.parametrize("slots,warm", [(None, None), (1, None), (1, 0), (2, None)])
def test_gpu_fast_tier_matches_transformers(checkpoint, slots, warm):
    """warm=None: the warm tier takes the detected RAM (every expert fits); warm=0: no warm tier, misses go to
    disk. Prefetch runs on a side CUDA stream whenever the fast tier cannot hold every expert."""
    arch, path, model = checkpoint
    engine = TorchMoEEngine(path, device="cuda", expert_slots=slots, warm_memory=warm)
    _assert_matches(engine, model)
    s = engine.cache_stats()
    assert s["device"].startswith("cuda")
    n_experts = SHAPES[arch]["experts"]
    if slots is not None and warm is None:
        assert s["warm_slots"] == n_experts and s["warm_hits"] > 0 and s["bytes_copied"] > 0
        # every expert is read from disk at most once: later misses of the fast tier are host-to-device copies
        assert s["bytes_read"] <= SHAPES[arch]["layers"] * n_experts * 3 * SHAPES[arch]["expert_ff"] \
            * SHAPES[arch]["hidden"] * 4
    if warm == 0:
        assert s["warm_slots"] == 0 and s["warm_hits"] == 0
    engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_gpu_low_precision_experts(checkpoint, dtype):
    _, path, model = checkpoint
    ref = TorchMoEEngine(path, device="cpu")
    want_tokens, want = ref.decode_logits(PROMPT, 6)
    engine = TorchMoEEngine(path, device="cuda", expert_dtype=dtype, expert_slots=2)
    got_tokens, got = engine.decode_logits(PROMPT, 6)
    assert np.abs(got - want).max() <= 0.01 * float(np.abs(want).max())
    assert got_tokens == want_tokens


def test_gpu_plan_names_vram_and_warm_tiers(checkpoint):
    _, path, _ = checkpoint
    engine = TorchMoEEngine(path, device="cuda", fast_memory=600 * 1024**2)
    engine.load()
    assert engine.plan is not None and engine.plan.device == "cuda"
    assert engine.plan.budget_source == "override"
    engine.close()
    auto = TorchMoEEngine(path, device="cuda")
    auto.load()
    assert auto.plan.budget_source == "detected" and auto.plan.budget_bytes <= torch.cuda.mem_get_info()[1]
    auto.close()


def test_gpu_compiled_engine_matches_transformers(checkpoint):
    """torch.compile on CUDA (triton kernels for the dense part, the expert loop an opaque op), 1 fast slot per layer,
    the warm tier and prefetch: the same logits as transformers."""
    _, path, model = checkpoint
    engine = TorchMoEEngine(path, device="cuda", expert_slots=1, prefetch=True, compile=True)
    _assert_matches(engine, model)
    s = engine.cache_stats()
    assert s["compiled"] and s["prefetches"] > 0 and s["warm_hits"] > 0
    engine.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_gpu_copy_ahead_prefetch_from_the_warm_tier(checkpoint, slots):
    """With the warm tier, a prefetch is an asynchronous copy on the side stream issued by the compute thread (the
    compute stream waits on its event where the expert is used): same logits, and predictions that hit count."""
    _, path, model = checkpoint
    engine = TorchMoEEngine(path, device="cuda", expert_slots=slots, prefetch=True)
    _assert_matches(engine, model)
    s = engine.cache_stats()
    assert s["prefetches"] > 0 and s["prefetch_hits"] > 0 and s["warm_hits"] > 0
    assert s["prefetch_hits"] + s["wasted_prefetches"] <= s["prefetches"]
    engine.close()


def test_gpu_detection_agrees_with_torch():
    """`hw` sees the GPUs torch sees: the same count, names and total memory (NVML or torch.cuda, whichever
    answered), and free memory no larger than the total."""
    from localmoe.placement import hardware

    gpus = [g for g in hardware.detect(measure=False).gpus if g.vendor == "nvidia"]
    assert len(gpus) == torch.cuda.device_count()
    for g in gpus:
        props = torch.cuda.get_device_properties(g.index)
        assert g.name == props.name or props.name in g.name or g.name in props.name
        # NVML counts the whole board, torch what the context can address: within 2%
        assert abs(g.vram_total_bytes - props.total_memory) <= 0.02 * props.total_memory
        assert 0 < g.vram_free_bytes <= g.vram_total_bytes


def test_int8_dense_weights_on_a_gpu_are_refused_with_the_fix(checkpoint):
    _, path, _ = checkpoint
    with pytest.raises(LocalmoeError, match=r"CPU only, and this engine is on cuda \(add --device cpu\)"):
        TorchMoEEngine(path, device="cuda", dense_dtype="int8").load()
