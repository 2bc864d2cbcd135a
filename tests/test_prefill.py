"""Prompt processing (prefill, #25): the native kernels for several tokens at once (kernels.linear,
kernels.expert_prefill) against torch, and a prompt's logits against transformers for every architecture, through
the native kernels, with the engine's torch kernels chosen, and without the native library; at full cache and one
slot per layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_moe import build_hf_moe
from test_torch_moe import OTHER, SHAPES, VOCAB, _build_other, _reference

import localmoe.engine.torch_moe.kernels as kernels
from localmoe.engine.torch_moe import TorchMoEEngine

# 200 tokens: with 5-8 experts and top-2/3 an expert gets 25-100 of them, so the kernels meet full and partial
# panels of 16 tokens and more than one chunk of 64; the Qwen2-MoE and OLMoE checkpoints hold 256 positions
PROMPT = [(i * 37 + 11) % VOCAB for i in range(200)]
SPLIT = 180  # a chat's next turn: the last 20 tokens evaluated after the first 180 are in the KV cache
native_library = pytest.mark.skipif(not kernels.available(), reason="no native library (C compiler or OpenMP)")


@pytest.fixture(scope="module")
def kernel_home(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels-home")


@pytest.fixture(autouse=True)
def shared_kernel_build(kernel_home, monkeypatch):
    """One data dir for the whole module: a test that turns the library off and on again reloads the built library
    instead of compiling it again in its own fresh data dir."""
    monkeypatch.setenv("LOCALMOE_HOME", str(kernel_home))


@pytest.fixture(scope="module", params=sorted([*SHAPES, *OTHER]))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    if arch in SHAPES:
        out = build_hf_moe(tmp_path_factory.mktemp(arch), arch, vocab=VOCAB, init_std=0.05, **SHAPES[arch])
    else:
        out = _build_other(tmp_path_factory.mktemp(arch), arch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return arch, out, _reference(model, PROMPT)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the native prefill kernels' calls, which still compute."""
    counts = {"linear": 0, "expert_prefill": 0}
    for name in counts:
        real = getattr(kernels, name)

        def spy(*args, _name=name, _real=real, **kw):
            counts[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return counts


# --- the kernels against torch ----------------------------------------------------------------------------------


@native_library
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 23, 64, 70, 150])
def test_linear_kernel_matches_torch(m):
    """Row counts around the 6-row tiles, token counts around the 8/16-token panels and the 64-token chunk; a bias."""
    g = torch.Generator().manual_seed(m)
    x, w, b = (torch.randn(*s, generator=g) for s in ((m, 72), (45, 72), (45,)))
    want = F.linear(x, w, b)
    for bias in (b, None):
        got = kernels.linear(x, w, bias)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want if bias is not None else want - b, rtol=1e-5, atol=1e-5)
    x3 = x.view(1, m, 72)  # the model's (batch, tokens, hidden) activations
    torch.testing.assert_close(kernels.linear(x3, w, b), want.view(1, m, 45), rtol=1e-5, atol=1e-5)


@native_library
def test_a_long_prompts_scratch_is_not_held():
    """The packed panels of a call larger than _SCRATCH_KEPT are let go after it (a long prompt would otherwise
    hold tens of MB for the process's lifetime, under a memory cap too); smaller ones are reused."""
    x, w = torch.randn(1100, 4096), torch.randn(8, 4096)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-3)
    kept = getattr(kernels._scratch, "buf", None)
    assert kept is None or kept.numel() <= kernels._SCRATCH_KEPT
    kernels.linear(x[:20], w)
    small = kernels._scratch.buf
    kernels.linear(x[:30], w)
    assert kernels._scratch.buf is small


@native_library
@pytest.mark.parametrize("m", [1, 7, 9, 17, 65, 130])
def test_expert_kernel_matches_torch(m):
    """One expert over m of 160 tokens, added into rows that already hold other experts' sums."""
    g = torch.Generator().manual_seed(100 + m)
    hidden, ff, n = 40, 26, 160
    x = torch.randn(n, hidden, generator=g)
    gate_up, down = torch.randn(2 * ff, hidden, generator=g) / 4, torch.randn(hidden, ff, generator=g) / 4
    tokens = torch.randperm(n, generator=g)[:m].sort().values
    scales = torch.rand(m, generator=g)
    out = torch.randn(n, hidden, generator=g)
    want = out.clone()
    gate, up = F.linear(x[tokens], gate_up).chunk(2, dim=-1)
    want.index_add_(0, tokens, F.linear(F.silu(gate) * up, down) * scales[:, None])
    kernels.expert_prefill(x, (gate_up, down), tokens, scales, out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- a prompt's logits against transformers --------------------------------------------------------------------


def _engine(path, how: str, slots, monkeypatch) -> TorchMoEEngine:
    """how: "native" (the default), "torch" (the engine's kernels option), "no library" (LOCALMOE_KERNELS=torch)."""
    if how == "no library":
        monkeypatch.setenv(kernels.ENV, "torch")
        kernels._library.cache_clear()
    return TorchMoEEngine(path, expert_slots=slots, prefetch=False, load_all=False,
                          kernels="torch" if how == "torch" else "native")


@pytest.fixture
def library_restored():
    yield
    kernels._library.cache_clear()  # loaded again at next use, once monkeypatch has restored LOCALMOE_KERNELS


@pytest.mark.parametrize("how", ["native", "torch", "no library"])
@pytest.mark.parametrize("slots", [None, 1])
def test_prompt_logits_match_transformers(checkpoint, slots, how, calls, monkeypatch, library_restored):
    arch, path, want = checkpoint
    engine = _engine(path, how, slots, monkeypatch)
    got = engine.logits(PROMPT)
    engine.close()
    assert got.shape == want.shape == (len(PROMPT), VOCAB)
    assert np.abs(want).max() > 0.5  # near-zero logits would match anything
    print(f"{arch} slots={slots} {how}: max |diff| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-4
    if how == "native" and kernels.available():
        assert calls["expert_prefill"] > 0 and calls["linear"] > 0
    if how != "native":  # torch's kernels only, as without a C compiler
        assert calls == {"linear": 0, "expert_prefill": 0}


@pytest.mark.parametrize("slots", [None, 1])
def test_next_turn_after_a_cached_prefix_matches_transformers(checkpoint, slots, calls):
    """A chat's next turn: 20 tokens evaluated after 180 already in the KV cache (a handful of tokens per expert)."""
    arch, path, want = checkpoint
    engine = TorchMoEEngine(path, expert_slots=slots, prefetch=False, load_all=False)
    engine.logits(PROMPT[:SPLIT])
    got = engine.logits(PROMPT, reuse=True)
    engine.close()
    assert got.shape == (len(PROMPT) - SPLIT, VOCAB)
    assert np.abs(got - want[SPLIT:]).max() <= 1e-4
    assert calls["expert_prefill"] > 0 or not kernels.available()


def test_prompt_logits_do_not_depend_on_the_cache_size(checkpoint):
    """Each output row sums its experts in ascending order whatever the cache holds: bit for bit the same logits
    with every expert resident and with one or three slots per layer, on a second prompt, when the small caches
    hold the first one's last experts (the native path where it builds; with top-3 routing, Qwen2-MoE's, another
    order would round differently)."""
    _, path, _ = checkpoint
    runs = []
    for slots in (None, 1, 3):
        engine = TorchMoEEngine(path, expert_slots=slots, prefetch=False, load_all=False)
        engine.logits(PROMPT[:60])
        runs.append(engine.logits(PROMPT[::-1]))
        engine.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_last_row_only(checkpoint):
    """Transformer.forward(last=True), all a prompt needs to sample its first token: the full call's last row."""
    _, path, want = checkpoint
    engine = TorchMoEEngine(path, prefetch=False, load_all=False)
    engine.load()
    n = len(PROMPT)
    with torch.inference_mode():
        last = engine.model(torch.tensor([PROMPT]), torch.arange(n), n, last=True)
    engine.close()
    assert last.shape == (1, 1, VOCAB)
    assert np.abs(last[0].numpy() - want[-1:]).max() <= 1e-4


def test_other_dtypes_are_refused_by_the_native_kernels():
    """The prefill kernels take float32 CPU tensors only: other dtypes (bfloat16 experts, int8 weights) and
    non-contiguous activations go to torch's kernels."""
    x = torch.randn(5, 16)
    gu, down = torch.randn(12, 16), torch.randn(16, 6)
    assert kernels.expert_usable(x, (gu, down)) == kernels.available()
    assert kernels.linear_usable(x, gu) == kernels.available()
    assert not kernels.expert_usable(x, (gu.bfloat16(), down.bfloat16()))
    assert not kernels.expert_usable(x.bfloat16(), (gu, down))
    assert not kernels.linear_usable(x, gu.to(torch.int8))
    assert not kernels.linear_usable(x, gu.t().contiguous().t())
    assert not kernels.linear_usable(x.t(), torch.randn(12, 5))


def test_int8_attention_stays_on_torch(tmp_path, monkeypatch, calls):
    """With int8 dense weights (quant.Int8Linear) the projections and the output head keep torch's int8 kernels
    while float32 experts still go native: the logits of torch's kernels throughout, to float rounding (which
    can move an activation's int8 rounding step)."""
    from localmoe.engine.torch_moe.quant import int8_linear_available

    if not int8_linear_available():
        pytest.skip("this torch has no int8 linear")
    path = build_hf_moe(tmp_path / "qwen3_moe", "qwen3_moe", vocab=VOCAB, init_std=0.05, **SHAPES["qwen3_moe"])
    runs = []
    for how in ("torch", "native"):
        engine = TorchMoEEngine(path, dense_dtype="int8", kernels=how, load_all=False)
        if how == "native":
            monkeypatch.setattr(kernels, "linear", _refuse)
        runs.append(engine.logits(PROMPT[:48]))
        engine.close()
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-3)
    assert calls["expert_prefill"] > 0 or not kernels.available()


def _refuse(*args, **kwargs):
    raise AssertionError("kernels.linear called with int8 weights")
