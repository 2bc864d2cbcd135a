"""The synthetic MoE checkpoints are only useful if both files hold the same model: check it against the files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import synthetic_moe
import torch
from safetensors import safe_open
from synthetic_moe import gguf_reader

from localmoe.placement.layout import read_layout

HIDDEN, LAYERS, EXPERTS, TOP_K, EXPERT_FF = 64, 2, 8, 2, 32
# Spread over the vocabulary, specials included; 12 positions exercise rope and the causal mask.
TOKENS = [1, 9690, 314, 253, 2362, 30, 49151, 17, 2, 1000, 4242, 12]
# Observed ~6e-4 at init_std 0.05; a conversion that swaps gate/up or skips the rope permutation is off by >0.1.
LOGIT_TOLERANCE = 5e-3


@dataclass(frozen=True)
class Pair:
    hf: Path
    gguf: Path


def _build(root: Path, arch: str) -> Pair:
    # init_std 0.05 instead of transformers' 0.02 so the experts move the logits well above the tolerance.
    hf = synthetic_moe.build_hf_moe(
        root / "hf", arch, hidden=HIDDEN, layers=LAYERS, experts=EXPERTS, top_k=TOP_K, expert_ff=EXPERT_FF,
        kv_heads=4 if arch == "olmoe" else 2,  # llama.cpp's olmoe has no GQA
        init_std=0.05,
    )
    return Pair(hf, synthetic_moe.hf_to_gguf(hf, root / "model.gguf"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _build(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


def _saved_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k).numpy() for k in h.keys()})
    return out


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def _transformers_logits(hf_dir: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_saved_files_hold_one_tensor_per_expert(qwen3: Pair) -> None:
    saved = _saved_tensors(qwen3.hf)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            assert saved[p + "gate_proj.weight"].shape == (EXPERT_FF, HIDDEN)
            assert saved[p + "up_proj.weight"].shape == (EXPERT_FF, HIDDEN)
            assert saved[p + "down_proj.weight"].shape == (HIDDEN, EXPERT_FF)
        assert saved[f"model.layers.{layer}.mlp.gate.weight"].shape == (EXPERTS, HIDDEN)
    # transformers 5 fuses experts in memory; none of that layout may leak into the files.
    assert not [k for k in saved if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    assert "lm_head.weight" in saved  # untied: the GGUF's `output` is its own tensor


def test_gguf_experts_are_the_saved_experts_stacked(qwen3: Pair) -> None:
    saved = _saved_tensors(qwen3.hf)
    tensors = {t.name: t for t in gguf_reader(qwen3.gguf).tensors}
    for layer in range(LAYERS):
        for short, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = tensors[f"blk.{layer}.ffn_{short}_exps.weight"]
            rows, cols = saved[f"model.layers.{layer}.mlp.experts.0.{proj}.weight"].shape
            assert list(t.shape) == [cols, rows, EXPERTS]  # ggml lists dimensions innermost first
            data = np.asarray(t.data).reshape(EXPERTS, rows, cols)
            for e in range(EXPERTS):
                np.testing.assert_array_equal(data[e], saved[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"])
    np.testing.assert_array_equal(
        np.asarray(tensors["output.weight"].data).reshape(saved["lm_head.weight"].shape), saved["lm_head.weight"]
    )


def test_layout_reads_the_gguf(qwen3: Pair) -> None:
    lay = read_layout(qwen3.gguf)
    assert lay.architecture == "qwen3moe"
    assert (lay.n_layers, lay.n_experts, lay.n_experts_used) == (LAYERS, EXPERTS, TOP_K)
    assert (lay.embedding_length, lay.n_heads, lay.n_kv_heads, lay.head_dim) == (HIDDEN, 4, 2, 16)
    assert lay.bytes_per_expert == 3 * EXPERT_FF * HIDDEN * 4  # gate, up, down in f32
    assert lay.expert_bytes_per_layer == [EXPERTS * lay.bytes_per_expert] * LAYERS
    assert lay.has_chat_template and "<|im_start|>" in lay.chat_template  # borrowed from SmolLM2


def test_llama_cpp_logits_match_transformers(qwen3: Pair) -> None:
    ours = _llama_logits(qwen3.gguf, TOKENS)
    ref = _transformers_logits(qwen3.hf, TOKENS)
    assert ours.shape == ref.shape == (len(TOKENS), synthetic_moe.SMOLLM2_VOCAB)
    assert np.abs(ref).max() > 0.5, "logits this small would hide conversion mistakes"
    assert np.abs(ours - ref).max() <= LOGIT_TOLERANCE


# mixtral: llama.cpp runs it as `llama`, whose rope needs the q/k rows permuted (a different path from qwen3moe);
# qwen2_moe: q/k/v biases and a shared expert with its sigmoid gate; olmoe: q/k norms over the whole projections
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_other_archs_logits_match_transformers(tmp_path: Path, arch: str) -> None:
    pair = _build(tmp_path, arch)
    assert read_layout(pair.gguf).n_experts == EXPERTS
    ours = _llama_logits(pair.gguf, TOKENS)
    ref = _transformers_logits(pair.hf, TOKENS)
    assert np.abs(ref).max() > 0.5, "logits this small would hide conversion mistakes"
    assert np.abs(ours - ref).max() <= LOGIT_TOLERANCE


def test_qwen2_moe_gguf_holds_the_shared_expert_and_biases(tmp_path: Path) -> None:
    pair = _build(tmp_path, "qwen2_moe")
    saved = _saved_tensors(pair.hf)
    tensors = {t.name: t for t in gguf_reader(pair.gguf).tensors}
    p = "model.layers.1.mlp."
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_gate_inp_shexp.weight"].data),
                                  saved[p + "shared_expert_gate.weight"].reshape(-1))  # [1, hidden] as a vector
    for short in ("gate", "up", "down"):
        w = saved[f"{p}shared_expert.{short}_proj.weight"]
        assert 2 * EXPERT_FF in w.shape  # the shared expert's own width, not an expert's
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.1.ffn_{short}_shexp.weight"].data).reshape(w.shape), w)
    for x in "qkv":
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.1.attn_{x}.bias"].data),
                                      saved[f"model.layers.1.self_attn.{x}_proj.bias"])


def test_qwen3_without_topk_renormalisation_is_refused(tmp_path: Path) -> None:
    import json

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "norm_topk_prob": False}))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        synthetic_moe.hf_to_gguf(hf, tmp_path / "model.gguf")


@pytest.mark.parametrize("arch, change, message", [
    ("qwen2_moe", {"norm_topk_prob": True}, "never renormalises"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv must be unset"),
    ("olmoe", {"num_key_value_heads": 2}, "num_key_value_heads == num_attention_heads"),
])
def test_what_llama_cpp_would_run_differently_is_refused(tmp_path: Path, arch: str, change: dict, message: str) -> None:
    import json

    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": arch, "num_attention_heads": 4, "num_key_value_heads": 4, **change}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        synthetic_moe.hf_to_gguf(hf, tmp_path / "model.gguf")


def test_script_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic_moe.main([str(tmp_path), "--layers", "1", "--experts", "4", "--top-k", "1"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    lay = read_layout(tmp_path / "model.gguf")
    assert (lay.n_layers, lay.n_experts, lay.n_experts_used) == (1, 4, 1)
    assert "model.gguf" in capsys.readouterr().out
