"""Checkpoint plans for the torch engine: expert slots from a memory budget, the cold tier's pread reads, and
`localmoe plan MODEL_DIR`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from synthetic_moe import build_hf_moe

from helpers import run_cli
from localmoe.engine.torch_moe import Checkpoint, TorchMoEEngine
from localmoe.errors import LocalmoeError
from localmoe.placement.plan import RAM_RESERVE, describe_checkpoint, plan_checkpoint
from localmoe.placement.safetensors import checkpoint_tensors

MiB = 1024**2
SHAPE = dict(hidden=64, layers=2, experts=8, top_k=2, expert_ff=32, heads=4, kv_heads=2, head_dim=16)
VOCAB = 320
CTX = 256
PROMPT = [5, 17, 300, 42, 42, 7, 1, 250, 99, 123, 64, 8, 8, 201, 77, 3, 150, 11]

# Hand-computed for SHAPE in float32 (qwen3_moe, untied embeddings, context 256):
BPE = 3 * 32 * 64 * 4  # gate, up (32×64) and down (64×32): 24 KiB per expert
PER_LAYER_DENSE = (
    64 * 64 + 32 * 64 + 32 * 64 + 64 * 64  # q (4 heads × 16), k, v (2 kv heads × 16), o
    + 64 + 64  # input and post-attention norms
    + 8 * 64  # router
    + 16 + 16  # per-head q/k norms
) * 4
DENSE = 2 * PER_LAYER_DENSE + (VOCAB * 64 * 2 + 64) * 4  # layers + embeddings + lm_head + final norm
KV = 2 * 2 * 2 * 16 * CTX * 4 + 2 * CTX * 16 * 4 + CTX * CTX  # K/V caches + rope cos/sin + causal mask


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return build_hf_moe(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", vocab=VOCAB, init_std=0.05,
                        context_length=CTX, **SHAPE)


def _config(d):
    return json.loads((d / "config.json").read_text())


def test_slots_from_budget_hand_computed(ckpt_dir):
    tensors = checkpoint_tensors(ckpt_dir)
    base = RAM_RESERVE + DENSE + KV
    for slots in (2, 3, 5, 8):
        p = plan_checkpoint(_config(ckpt_dir), tensors, base + slots * 2 * BPE + 100, ctx=CTX)
        assert (p.bytes_per_expert, p.disk_bytes_per_expert, p.dense_bytes, p.kv_bytes) == (BPE, BPE, DENSE, KV)
        assert p.fits and p.slots_per_layer == slots
        assert p.bytes_per_token == int((1 - slots / 8) * 2 * BPE * 2)
    huge = plan_checkpoint(_config(ckpt_dir), tensors, 64 * 1024**3, ctx=CTX)
    assert huge.slots_per_layer == 8 and huge.bytes_per_token == 0  # clamped to n_experts


def test_int8_and_bf16_experts_take_fewer_bytes_hand_computed(ckpt_dir):
    tensors = checkpoint_tensors(ckpt_dir)
    base = RAM_RESERVE + DENSE + KV
    int8 = 3 * 32 * 64 + (32 + 32 + 64) * 4  # one byte per weight + a float32 scale per output row
    p = plan_checkpoint(_config(ckpt_dir), tensors, base + 3 * 2 * int8 + 10, ctx=CTX, expert_dtype="int8")
    assert p.bytes_per_expert == int8 and p.disk_bytes_per_expert == BPE and p.slots_per_layer == 3
    p = plan_checkpoint(_config(ckpt_dir), tensors, base + 5 * 2 * (BPE // 2), ctx=CTX, expert_dtype="bfloat16")
    assert p.bytes_per_expert == BPE // 2 and p.slots_per_layer == 5


def test_gpu_plan_has_a_pinned_warm_tier(ckpt_dir):
    """On a GPU the budget is VRAM (fast tier) and RAM becomes the warm tier: disk is read only past both."""
    tensors = checkpoint_tensors(ckpt_dir)
    vram = RAM_RESERVE + DENSE + KV + 2 * 2 * BPE
    p = plan_checkpoint(_config(ckpt_dir), tensors, vram, ctx=CTX, device="cuda",
                        warm_budget_bytes=RAM_RESERVE + 6 * 2 * BPE)
    assert (p.slots_per_layer, p.warm_slots_per_layer) == (2, 6)
    assert [t["name"] for t in p.tiers] == ["fast", "warm", "cold"]
    assert p.tiers[0]["where"] == "cuda memory" and p.tiers[2]["experts_per_layer"] == 2
    assert p.bytes_per_token == int((1 - 6 / 8) * 2 * BPE * 2)  # disk: past the warm tier only
    assert p.copied_per_token == int((1 - 2 / 8) * 2 * BPE * 2)  # host to device: past the fast tier
    text = describe_checkpoint(p)
    assert "warm     6 experts per layer in pinned CPU RAM" in text and "copied to cuda" in text
    assert "2 of 8 experts per layer fit in fast memory" in p.warnings[0] and "pinned RAM or disk" in p.warnings[0]
    assert plan_checkpoint(_config(ckpt_dir), tensors, 10**12, ctx=CTX).warnings == []  # everything fits
    cpu = plan_checkpoint(_config(ckpt_dir), tensors, vram, ctx=CTX, warm_budget_bytes=10**12)
    assert cpu.warm_slots_per_layer == 0 and len(cpu.tiers) == 2  # no warm tier without a GPU


def test_refuses_when_top_k_slots_do_not_fit(ckpt_dir):
    tensors = checkpoint_tensors(ckpt_dir)
    budget = RAM_RESERVE + DENSE + KV + 2 * 2 * BPE - 1
    p = plan_checkpoint(_config(ckpt_dir), tensors, budget, ctx=CTX)
    assert not p.fits and "does not fit" in p.refusal and "\n" not in p.refusal
    with pytest.raises(LocalmoeError, match="does not fit"):
        TorchMoEEngine(ckpt_dir, fast_memory=budget, max_seq_length=CTX).load()


def test_pread_equals_get_tensor_bit_for_bit(ckpt_dir):
    ckpt = Checkpoint(ckpt_dir)
    try:
        experts = [k for k in ckpt.tensors if ".experts." in k]
        assert len(experts) == 2 * 8 * 3
        with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
            for key in experts + ["model.embed_tokens.weight"]:
                want = f.get_tensor(key).to(torch.float32)
                got = ckpt.read(key, tuple(want.shape))
                assert got.dtype == want.dtype and torch.equal(got.view(torch.int32), want.view(torch.int32))
                # into a slice of a preallocated tensor (how the engine stacks gate and up): same bits, same memory
                big = torch.full((2 * want.shape[0], *want.shape[1:]), float("nan"))
                into = ckpt.read(key, tuple(want.shape), big[want.shape[0]:])
                assert into.data_ptr() == big[want.shape[0]:].data_ptr()
                assert torch.equal(big[want.shape[0]:].view(torch.int32), want.view(torch.int32))
        with pytest.raises(LocalmoeError, match="expected"):
            ckpt.read(experts[0], (1, 2))
    finally:
        ckpt.close()


def test_small_fast_memory_same_logits_as_full_slots(ckpt_dir):
    full = TorchMoEEngine(ckpt_dir, expert_slots=8, max_seq_length=CTX, load_all=False)
    want = full.logits(PROMPT)
    want_decode = full.decode_logits(PROMPT, 6)
    # no prefetch: the same decode path as the full cache (with it, the torch path: equal only to float rounding)
    small = TorchMoEEngine(ckpt_dir, fast_memory=RAM_RESERVE + DENSE + KV + 2 * 3 * BPE, max_seq_length=CTX,
                           prefetch=False)
    got = small.logits(PROMPT)
    assert small.plan is not None and small.plan.slots_per_layer == 3
    assert small.cache_stats()["slots"] == 3
    np.testing.assert_array_equal(got, want)
    got_decode = small.decode_logits(PROMPT, 6)
    assert got_decode[0] == want_decode[0]
    np.testing.assert_array_equal(got_decode[1], want_decode[1])
    assert small.misses > full.misses
    full.close()
    small.close()


def test_cli_plan_checkpoint_json(ckpt_dir, tmp_path):
    budget = RAM_RESERVE + DENSE + KV + 2 * 5 * BPE
    r = run_cli("plan", str(ckpt_dir), "--fast-memory", str(budget), "--ctx", str(CTX), "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["backend"] == "torch"
    p = out["plan"]
    assert p["slots_per_layer"] == 5 and p["bytes_per_expert"] == BPE and p["dense_bytes"] == DENSE
    assert [t["name"] for t in p["tiers"]] == ["fast", "cold"] and p["tiers"][1]["experts_per_layer"] == 3
    assert p["bytes_per_token"] == int(3 / 8 * 2 * BPE * 2) and p["budget_source"] == "override"

    r = run_cli("plan", str(ckpt_dir), "--fast-memory", "1MiB", home=tmp_path)
    assert r.returncode == 3 and "REFUSED" in r.stdout and "does not fit" in r.stdout

    r = run_cli("plan", str(ckpt_dir), home=tmp_path)  # detected budget, human-readable
    assert r.returncode == 0, r.stderr
    assert "fast" in r.stdout and "cold" in r.stdout and "detected" in r.stdout
