"""Tiny random-init MoE checkpoints, written both as HF safetensors and as GGUF, for tests and benchmarks.

The two files hold the same weights, so transformers (the reference implementation) and llama.cpp can be
compared logit for logit, and expert-offloading code can be exercised on a model whose every byte is known.

As a dev script:

    python tests/synthetic_moe.py OUT_DIR [--hidden 1024 --layers 8 --experts 32 --top-k 4 --expert-ff 512]

writes OUT_DIR/hf/ (safetensors + config.json) and OUT_DIR/model.gguf.

Architectures: qwen3_moe, mixtral (llama.cpp's `llama`), qwen2_moe (a shared expert and q/k/v biases) and olmoe
(q/k norms over the whole projections). Adding one means one more `_Arch` entry: its transformers classes, the hub
names of its MoE block and expert projections, and what llama.cpp's loader for it expects (q/k norms, biases, rope
layout, a shared expert).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import gguf
import numpy as np
import torch

# The embedded SmolLM2's vocabulary; the GGUF borrows its tokenizer, so the HF model must use the same size.
SMOLLM2_VOCAB = 49152


@dataclass(frozen=True)
class _Arch:
    config_class: str  # transformers class names, resolved lazily: importing transformers costs seconds
    model_class: str
    gguf_arch: str
    moe_block: str  # hub name of the MoE block inside a decoder layer
    expert_proj: tuple[str, str, str]  # hub names of the (gate, up, down) projections of one expert
    # RMSNorm on q and k (self_attn.{q,k}_norm -> attn_{q,k}_norm): per head (qwen3) or over the whole
    # projection (olmoe); the tensors are copied as they are either way
    qk_norm: bool
    # llama.cpp's `llama` arch applies rope to interleaved pairs while HF rotates halves; its converter
    # reorders the q/k rows to compensate. qwen3moe, qwen2moe and olmoe use NEOX rope, the same halves layout as HF.
    permute_qk: bool
    config_kwargs: Callable[[int, int], dict[str, Any]]  # (experts, expert_ff) -> arch-specific config fields
    qkv_bias: bool = False  # biases on q, k and v (qwen2_moe): attn_{q,k,v}.bias
    # a dense expert every token uses, scaled by sigmoid of its own one-row gate (qwen2_moe):
    # ffn_{gate,up,down}_shexp, and ffn_gate_inp_shexp as a vector of hidden_size
    shared_expert: bool = False


_ARCHS: dict[str, _Arch] = {
    "qwen3_moe": _Arch(
        config_class="Qwen3MoeConfig",
        model_class="Qwen3MoeForCausalLM",
        gguf_arch="qwen3moe",
        moe_block="mlp",
        expert_proj=("gate_proj", "up_proj", "down_proj"),
        qk_norm=True,
        permute_qk=False,
        config_kwargs=lambda experts, expert_ff: {
            "num_experts": experts,
            "moe_intermediate_size": expert_ff,
            # Unused (every layer is sparse) but written to GGUF as feed_forward_length.
            "intermediate_size": expert_ff,
            # transformers defaults to False, but llama.cpp's qwen3moe graph always renormalises the top-k
            # weights (as the released Qwen3 MoE checkpoints do), so False could not match the GGUF.
            "norm_topk_prob": True,
        },
    ),
    "mixtral": _Arch(
        config_class="MixtralConfig",
        model_class="MixtralForCausalLM",
        gguf_arch="llama",  # llama.cpp runs Mixtral as `llama` with expert tensors
        moe_block="block_sparse_moe",
        expert_proj=("w1", "w3", "w2"),
        qk_norm=False,
        permute_qk=True,
        config_kwargs=lambda experts, expert_ff: {
            "num_local_experts": experts,
            # llama.cpp's llama arch sizes the expert tensors from feed_forward_length.
            "intermediate_size": expert_ff,
        },
    ),
    "qwen2_moe": _Arch(
        config_class="Qwen2MoeConfig",
        model_class="Qwen2MoeForCausalLM",
        gguf_arch="qwen2moe",
        moe_block="mlp",
        expert_proj=("gate_proj", "up_proj", "down_proj"),
        qk_norm=False,
        permute_qk=False,
        qkv_bias=True,
        shared_expert=True,
        config_kwargs=lambda experts, expert_ff: {
            "num_experts": experts,
            "moe_intermediate_size": expert_ff,
            "intermediate_size": expert_ff,  # unused (every layer is sparse); written as feed_forward_length
            # twice an expert's width (Qwen1.5-MoE's is four times), so a conversion or reader that sizes the shared
            # expert from the routed experts' width fails on the shapes
            "shared_expert_intermediate_size": 2 * expert_ff,
            "qkv_bias": True,
            # llama.cpp's qwen2moe graph never renormalises the top-k weights (nor did the released checkpoints)
            "norm_topk_prob": False,
        },
    ),
    "olmoe": _Arch(
        config_class="OlmoeConfig",
        model_class="OlmoeForCausalLM",
        gguf_arch="olmoe",
        moe_block="mlp",
        expert_proj=("gate_proj", "up_proj", "down_proj"),
        qk_norm=True,
        permute_qk=False,
        config_kwargs=lambda experts, expert_ff: {
            "num_experts": experts,
            "intermediate_size": expert_ff,  # olmoe's experts are intermediate_size wide, as llama.cpp's n_ff
            # llama.cpp's olmoe graph never renormalises the top-k weights and clamps nothing (it reads no
            # clamp_kqv key for olmoe): both as the released OLMoE
            "norm_topk_prob": False,
            "clip_qkv": None,
            # OlmoeConfig's defaults name OLMoE's own tokenizer's ids (eos 50279), outside SmolLM2's vocabulary
            "eos_token_id": None,
            "pad_token_id": None,
        },
    ),
}


def build_hf_moe(
    out_dir: Path,
    arch: str = "qwen3_moe",
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    expert_ff: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int | None = None,
    context_length: int = 4096,
    init_std: float | None = None,
    router_std: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_gguf: Path | None = None,
) -> Path:
    """Random-init a transformers MoE model and `save_pretrained` it (safetensors) into out_dir.

    `vocab` defaults to SmolLM2's 49152 tokens; any other size gives a checkpoint that `hf_to_gguf` refuses,
    because the GGUF has no tokenizer of its own. At the default size the folder also gets SmolLM2's tokenizer
    (`tokenizer.json`, `tokenizer_config.json` with its chat template), built from `tokenizer_gguf`'s fields
    (default: the embedded SmolLM2), so the checkpoint can chat; other sizes get no tokenizer files.
    `init_std` overrides transformers' initializer_range (0.02), `router_std` the routers' alone. At 0.02 the
    experts add little to the logits, so a conversion that swaps or misorders experts moves them only a few times
    the comparison tolerance; tests that must catch such mistakes pass a larger value.
    """
    import transformers

    spec = _arch(arch)
    config = getattr(transformers, spec.config_class)(
        vocab_size=vocab or SMOLLM2_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_experts_per_tok=top_k,
        max_position_embeddings=context_length,
        tie_word_embeddings=False,  # the GGUF gets its own `output` tensor, as real MoE checkpoints have
        **({"initializer_range": init_std} if init_std is not None else {}),
        **spec.config_kwargs(experts, expert_ff),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).to(dtype)
    if router_std is not None:
        # A trained router is decisive; a random one at init_std gives every expert ~1/E, so the top-k choice
        # flips on float rounding (two engines then disagree by whole experts, not by rounding).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(f"{spec.moe_block}.gate.weight"):
                    p.normal_(0.0, router_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if config.vocab_size == SMOLLM2_VOCAB:
        write_hf_tokenizer(out_dir, tokenizer_gguf or _embedded_gguf())
    return out_dir


def write_hf_tokenizer(out_dir: Path, gguf_path: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` equivalent to a GGUF's gpt2 (byte-level BPE) tokenizer."""
    tokenizer_json, tokenizer_config = _hf_tokenizer_files(Path(gguf_path).resolve())
    (Path(out_dir) / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (Path(out_dir) / "tokenizer_config.json").write_text(tokenizer_config, encoding="utf-8")


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → whether digits are split one by one before the gpt2 regex
_BYTE_LEVEL_PRE = {"default": False, "gpt2": False, "smollm": True}


@cache
def _hf_tokenizer_files(gguf_path: Path) -> tuple[str, str]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = {k: v for k, (v, _, _) in _tokenizer_fields(gguf_path).items()}
    if fields.get("tokenizer.ggml.model") != "gpt2":
        kind = fields.get("tokenizer.ggml.model")
        raise ValueError(f"{gguf_path}: only gpt2 (byte-level BPE) tokenizers convert, not {kind!r}")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE:
        raise ValueError(f"{gguf_path}: pre-tokenizer {pre!r} is not converted (known: {', '.join(_BYTE_LEVEL_PRE)})")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _BYTE_LEVEL_PRE[pre] else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole in the text, as llama.cpp does with special=True
    special = [AddedToken(t, special=ty == 3, normalized=False) for t, ty in zip(tokens, types, strict=True)
               if ty in (3, 4)]
    tok.add_special_tokens([t for t in special if t.special])
    tok.add_tokens([t for t in special if not t.special])

    def name(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "additional_special_tokens": [t.content for t in special if t.special],
        "chat_template": fields.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    return tok.to_str(), json.dumps({k: v for k, v in config.items() if v is not None}, indent=2)


def hf_to_gguf(hf_dir: Path, out_path: Path, *, tokenizer_gguf: Path | None = None, quant: str = "f32") -> Path:
    """Write a checkpoint saved by `build_hf_moe` as a GGUF (f32 unless `quant` says otherwise) that llama.cpp loads.

    The tokenizer (and chat template) comes from `tokenizer_gguf`, by default the embedded SmolLM2.
    Tensors are streamed one at a time, so a model of several GB converts without holding it in memory.
    quant="q8_0" stores the matrices (embeddings, attention, experts, output) as Q8_0, as `llama-quantize` does;
    norms and the routers (`ffn_gate_inp`, which llama-quantize also leaves alone) stay f32.
    """
    if quant not in _QUANTS:
        raise ValueError(f"unknown quant {quant!r} (known: {', '.join(_QUANTS)})")
    qtype = _QUANTS[quant]
    from safetensors import safe_open

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config["model_type"]
    spec = _arch(model_type)  # build_hf_moe's arch names are transformers' model_type values
    if model_type == "qwen3_moe" and not config.get("norm_topk_prob"):
        raise ValueError("llama.cpp's qwen3moe always renormalises the top-k weights: set norm_topk_prob in the config")
    if model_type in ("qwen2_moe", "olmoe") and config.get("norm_topk_prob"):
        raise ValueError(f"llama.cpp's {spec.gguf_arch} never renormalises the top-k weights: norm_topk_prob must be "
                         "false")
    if model_type == "olmoe" and config.get("clip_qkv") is not None:
        raise ValueError("llama.cpp's olmoe does not clamp q, k and v (it reads no clamp_kqv for olmoe): clip_qkv "
                         "must be unset")
    if model_type == "olmoe" and config["num_key_value_heads"] != config["num_attention_heads"]:
        # its loader sizes attn_k_norm as the whole hidden size, which only equals k's width without GQA
        raise ValueError("llama.cpp's olmoe needs num_key_value_heads == num_attention_heads")
    if model_type == "qwen2_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1
                                      or config.get("use_sliding_window")):
        raise ValueError("only qwen2_moe checkpoints whose every layer is sparse, without sliding windows, convert")

    n_layers = config["num_hidden_layers"]
    n_experts = config.get("num_experts") or config["num_local_experts"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not converted (only plain rope)")

    tokenizer_fields = _tokenizer_fields(tokenizer_gguf or _embedded_gguf())
    n_tokens = len(tokenizer_fields["tokenizer.ggml.tokens"][0])
    if n_tokens != config["vocab_size"]:
        raise ValueError(f"the model's vocab_size is {config['vocab_size']} but the tokenizer has {n_tokens} tokens")

    with ExitStack() as stack:
        # Read the saved files, not a model's state_dict(): transformers 5 fuses experts in memory, and the
        # per-expert hub layout on disk is what other tools (and our engines) see.
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {hf_dir}")
        ckpt = _Checkpoint([stack.enter_context(safe_open(f, framework="pt")) for f in files], hf_dir)
        plan = list(_tensor_plan(spec, n_layers, n_experts, n_heads, n_kv, ckpt,
                                 qkv_bias=spec.qkv_bias and bool(config.get("qkv_bias", True))))

        w = gguf.GGUFWriter(str(out_path), spec.gguf_arch)
        w.add_name(f"synthetic-{model_type}")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_block_count(n_layers)
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(n_heads)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope_theta))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_expert_count(n_experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if spec.shared_expert:
            w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        for key, (value, vtype, sub_type) in tokenizer_fields.items():
            w.add_key_value(key, value, vtype, sub_type)

        # Shapes come from the safetensors headers, so the header is written before any weight is read.
        for name, shape, _ in plan:
            if qtype is not None and _quantized(name, shape):
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
            else:
                w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, read in plan:
            tensor = np.ascontiguousarray(read(), dtype=np.float32)
            assert tensor.shape == tuple(shape), (name, tensor.shape, shape)
            if qtype is not None and _quantized(name, shape):
                tensor = gguf.quants.quantize(tensor, qtype)
            w.write_tensor_data(tensor)
        w.close()
    return out_path


_QUANTS: dict[str, gguf.GGMLQuantizationType | None] = {"f32": None, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def llama_quantize(src: Path, dst: Path, ftype: str = "Q4_K_M") -> Path:
    """`src` (an f32 GGUF) quantised by llama.cpp's own quantiser (llama-quantize's mixes: Q4_K_M keeps some tensors
    in Q6_K and falls back to other types where a row is not a multiple of 256), as the files users download."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    return Path(dst)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The GGUF `src` with every tensor dequantised to f32 by the `gguf` package (bit-equal to llama.cpp's), the
    metadata unchanged: llama.cpp on it is exact float32 arithmetic on the quantised file's weights, a reference that
    leaves out llama.cpp's 8-bit activations."""
    reader = gguf_reader(src)
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and "ffn_gate_inp" not in name


class _Checkpoint:
    """Tensors of one saved checkpoint, across however many safetensors shards it has."""

    def __init__(self, handles: list[Any], where: Path) -> None:
        self._by_key = {key: h for h in handles for key in h.keys()}
        self._where = where

    def _handle(self, key: str) -> Any:
        if key not in self._by_key:
            raise KeyError(f"{self._where} has no tensor {key!r}; was it saved by build_hf_moe?")
        return self._by_key[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def load(self, key: str) -> np.ndarray:
        # Through torch: numpy has no bfloat16, and a checkpoint saved with dtype=torch.bfloat16 must convert too.
        return self._handle(key).get_tensor(key).to(torch.float32).numpy()


_Reader = Callable[[], np.ndarray]


def _tensor_plan(
    spec: _Arch, n_layers: int, n_experts: int, n_heads: int, n_kv: int, ckpt: _Checkpoint, *, qkv_bias: bool = False
) -> Iterator[tuple[str, tuple[int, ...], _Reader]]:
    """(gguf name, numpy shape, reader) for every tensor, in file order; readers run only when written."""

    def one(name: str, key: str, permute_heads: int = 0) -> tuple[str, tuple[int, ...], _Reader]:
        if permute_heads:
            return name, ckpt.shape(key), lambda: _permute_rope_rows(ckpt.load(key), permute_heads)
        return name, ckpt.shape(key), lambda: ckpt.load(key)

    yield one("token_embd.weight", "model.embed_tokens.weight")
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        moe = f"{p}{spec.moe_block}."
        yield one(b + "attn_norm.weight", p + "input_layernorm.weight")
        yield one(b + "attn_q.weight", p + "self_attn.q_proj.weight", n_heads if spec.permute_qk else 0)
        yield one(b + "attn_k.weight", p + "self_attn.k_proj.weight", n_kv if spec.permute_qk else 0)
        yield one(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        if qkv_bias:
            for x in "qkv":
                yield one(b + f"attn_{x}.bias", p + f"self_attn.{x}_proj.bias")
        yield one(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        if spec.qk_norm:
            yield one(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight")
            yield one(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight")
        yield one(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        yield one(b + "ffn_gate_inp.weight", moe + "gate.weight")
        for short, proj in zip(("gate", "up", "down"), spec.expert_proj, strict=True):
            keys = [f"{moe}experts.{e}.{proj}.weight" for e in range(n_experts)]
            # ggml's expert tensors are [n_expert, rows, cols] in numpy order: each HF Linear weight, stacked.
            shape = (n_experts, *ckpt.shape(keys[0]))
            yield b + f"ffn_{short}_exps.weight", shape, lambda keys=keys: np.stack([ckpt.load(k) for k in keys])
        if spec.shared_expert:
            for short in ("gate", "up", "down"):
                yield one(b + f"ffn_{short}_shexp.weight", f"{moe}shared_expert.{short}_proj.weight")
            # HF's Linear(hidden, 1) weight is [1, hidden]; llama.cpp's loader asks for a vector of hidden_size
            # (its converter used to squeeze it to one), a dot product per token
            key = f"{moe}shared_expert_gate.weight"
            yield (b + "ffn_gate_inp_shexp.weight", (int(np.prod(ckpt.shape(key))),),
                   lambda key=key: ckpt.load(key).reshape(-1))
    yield one("output_norm.weight", "model.norm.weight")
    yield one("output.weight", "lm_head.weight")


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half rope layout to the interleaved pairs llama.cpp's `llama` uses."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(path: str | Path) -> gguf.GGUFReader:
    """gguf's reader over the file read into memory (read-only). Over its default memory map every slice costs a
    Python call: seconds for a 49k-token vocabulary, and the test suite reads such headers dozens of times."""
    data = np.fromfile(path, dtype=np.uint8)
    with mock.patch.object(np, "memmap", lambda *args, **kwargs: data):
        return gguf.GGUFReader(path, "r")


def _tokenizer_fields(path: Path) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    return _tokenizer_fields_cached(Path(path).resolve())


@cache  # decoding ~100k vocab and merge strings takes seconds; a test session converts several models
def _tokenizer_fields_cached(path: Path) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every `tokenizer.*` key of a GGUF (vocab, merges, special ids, chat template) with its stored types."""
    reader = gguf_reader(path)
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out[name] = (field.contents(), vtype, sub_type)
    if "tokenizer.ggml.tokens" not in out:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    return out


def _embedded_gguf() -> Path:
    from localmoe.home.models import embedded_models

    # the device machine has no embedded model (too big to carry there): benchmarks/gpu_check.sh carries a GGUF
    # holding only its tokenizer fields and names it here
    if os.environ.get("LOCALMOE_TEST_TOKENIZER_GGUF"):
        return Path(os.environ["LOCALMOE_TEST_TOKENIZER_GGUF"])
    found = embedded_models()
    if not found:
        raise FileNotFoundError("the embedded SmolLM2 model is missing (run `make setup`); pass tokenizer_gguf=")
    return found[0].path


def _arch(name: str) -> _Arch:
    if name not in _ARCHS:
        raise ValueError(f"unknown arch {name!r}; supported: {', '.join(_ARCHS)}")
    return _ARCHS[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", default="qwen3_moe", choices=sorted(_ARCHS))
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-ff", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", default="f32", choices=sorted(_QUANTS))
    args = ap.parse_args(argv)

    hf = build_hf_moe(
        args.out_dir / "hf", args.arch, hidden=args.hidden, layers=args.layers, experts=args.experts,
        top_k=args.top_k, expert_ff=args.expert_ff, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, context_length=args.context_length, seed=args.seed,
    )
    out = hf_to_gguf(hf, args.out_dir / "model.gguf", quant=args.quant)
    print(f"wrote {hf}/ and {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
