from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from localmoe.errors import LocalmoeError
from localmoe.placement.layout import read_layout


def write_tiny_moe(path: Path, *, n_layers: int = 2, n_expert: int = 4, n_used: int = 2,
                   declared_experts: int | None = None) -> None:
    """A small but complete qwen3moe-shaped GGUF: the shapes llama.cpp expects, random weights."""
    hidden, ff, vocab, heads, kv_heads, head_dim = 64, 32, 128, 4, 2, 16
    w = GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_count(declared_experts if declared_experts is not None else n_expert)
    w.add_expert_used_count(n_used)
    w.add_expert_feed_forward_length(ff)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    t("token_embd.weight", vocab, hidden)
    for i in range(n_layers):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        t(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        t(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate_inp.weight", n_expert, hidden)
        t(f"blk.{i}.ffn_gate_exps.weight", n_expert, ff, hidden)
        t(f"blk.{i}.ffn_up_exps.weight", n_expert, ff, hidden)
        t(f"blk.{i}.ffn_down_exps.weight", n_expert, hidden, ff)
    t("output_norm.weight", hidden)
    t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_embedded_model_layout(smollm):
    lay = read_layout(smollm.path)
    assert lay.architecture == "llama"
    assert lay.n_layers == 30
    assert lay.context_length == 8192
    assert not lay.is_moe and lay.n_experts == 0 and lay.expert_bytes == 0
    assert lay.quantization == "Q4_1"
    assert lay.has_chat_template and "<|im_start|>" in lay.chat_template
    # every tensor byte is attributed exactly once, and the data fits in the file
    assert 0 < lay.dense_bytes <= lay.file_bytes == smollm.path.stat().st_size
    assert lay.n_kv_heads == 3 and lay.head_dim == 64
    assert lay.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert 100e6 < lay.n_params < 200e6


def test_moe_layout_splits_expert_bytes_per_layer(tmp_path):
    p = tmp_path / "tiny-moe.gguf"
    write_tiny_moe(p, n_layers=3, n_expert=4, n_used=2)
    lay = read_layout(p)
    assert lay.architecture == "qwen3moe" and lay.is_moe
    assert (lay.n_experts, lay.n_experts_used, lay.n_layers) == (4, 2, 3)
    per_layer_experts = 3 * 4 * 32 * 64 * 4  # gate, up, down × experts × ff × hidden × f32
    assert lay.expert_bytes_per_layer == [per_layer_experts] * 3
    assert lay.bytes_per_expert == per_layer_experts // 4
    router_and_attn = (64 + 64 * 64 + 32 * 64 * 2 + 64 * 64 + 64 + 4 * 64) * 4
    assert lay.dense_bytes_per_layer == [router_and_attn] * 3
    assert lay.other_bytes == (128 * 64 * 2 + 64) * 4
    assert lay.quantization == "F32"


def test_metadata_and_shapes_disagree(tmp_path):
    p = tmp_path / "liar.gguf"
    write_tiny_moe(p, n_expert=4, declared_experts=8)
    with pytest.raises(LocalmoeError, match="holds 4 experts but the metadata says 8"):
        read_layout(p)


def test_truncated_gguf(tmp_path, smollm):
    p = tmp_path / "truncated.gguf"
    p.write_bytes(smollm.path.read_bytes()[: 1024 * 1024])
    with pytest.raises(LocalmoeError, match="truncated"):
        read_layout(p)


def test_text_file_renamed_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("these are my notes, not a model\n")
    with pytest.raises(LocalmoeError, match="not a GGUF model file"):
        read_layout(p)


def test_missing_file(tmp_path):
    with pytest.raises(LocalmoeError, match="not found"):
        read_layout(tmp_path / "nope.gguf")
