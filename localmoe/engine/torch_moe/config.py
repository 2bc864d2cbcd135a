"""What the torch engine knows about a checkpoint's architecture: `ModelArgs`, read from config.json once.

Every switch that differs between the supported architectures (norms on q and k, how the router's weights are
normalised, a shared expert, the hub names of the MoE block) is resolved here, so the model, the checkpoint reader
and the native decode step read plain fields instead of looking the architecture up again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localmoe.errors import LocalmoeError

HUB_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    moe_block: str  # hub name of the MoE block inside a decoder layer
    expert_proj: tuple[str, str, str]  # hub names of one expert's (gate, up, down) projections
    # RMSNorm on q and k before rope: "head" per head over head_dim (qwen3), "full" over the whole projection
    # (olmoe), None for neither
    qk_norm: str | None
    routing: str  # "softmax_topk": softmax over all experts, top-k, renormalise if norm_topk_prob
    #              "topk_softmax": top-k of the logits, softmax over those k (always sums to 1)
    shared_expert: bool = False  # qwen2_moe: a dense expert every token uses, scaled by sigmoid(its own gate)


ARCHS: dict[str, Arch] = {
    "qwen3_moe": Arch("mlp", HUB_PROJ, qk_norm="head", routing="softmax_topk"),
    "qwen2_moe": Arch("mlp", HUB_PROJ, qk_norm=None, routing="softmax_topk", shared_expert=True),
    "olmoe": Arch("mlp", HUB_PROJ, qk_norm="full", routing="softmax_topk"),
    "mixtral": Arch("block_sparse_moe", ("w1", "w3", "w2"), qk_norm=None, routing="topk_softmax"),
}


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    expert_ff: int
    rope_theta: float
    norm_eps: float
    norm_topk_prob: bool
    tie_embeddings: bool
    max_seq_length: int
    qkv_bias: bool = False  # qwen2_moe
    shared_ff: int = 0  # qwen2_moe's shared expert width
    clip_qkv: float | None = None  # olmoe
    # the architecture's switches (see Arch), copied from ARCHS by from_config
    moe_block: str = "mlp"
    expert_proj: tuple[str, str, str] = HUB_PROJ
    qk_norm: str | None = None
    routing: str = "softmax_topk"
    shared_expert: bool = False

    @property
    def renormalise(self) -> bool:
        """Whether a token's top-k router weights are rescaled to sum to one (mixtral's softmax over the kept
        logits equals the kept probabilities renormalised)."""
        return self.routing == "topk_softmax" or self.norm_topk_prob

    @classmethod
    def from_config(cls, config: dict[str, Any], max_seq_length: int | None = None) -> ModelArgs:
        model_type = config.get("model_type")
        if model_type not in ARCHS:
            raise LocalmoeError(
                f"model_type {model_type!r} is not supported by the torch MoE engine (supported: {', '.join(ARCHS)})"
            )
        arch = ARCHS[model_type]
        try:
            n_heads = config["num_attention_heads"]
            rope = config.get("rope_parameters") or {}
            if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
                raise LocalmoeError(f"rope_type {rope.get('rope_type')!r} is not supported (only plain rope)")
            if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
                raise LocalmoeError("checkpoints with dense (non-MoE) layers are not supported yet")
            if config.get("use_sliding_window") or (model_type == "mixtral" and config.get("sliding_window")):
                raise LocalmoeError("sliding-window attention is not supported yet")
            if config.get("attention_bias"):
                raise LocalmoeError("attention_bias is not supported yet")
            ctx = config.get("max_position_embeddings", 4096)
            return cls(
                arch=model_type,
                vocab_size=config["vocab_size"],
                dim=config["hidden_size"],
                n_layers=config["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=config.get("num_key_value_heads", n_heads),
                head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
                # transformers 5 saves qwen3_moe's count as num_local_experts; older files say num_experts
                n_experts=config.get("num_local_experts") or config["num_experts"],
                top_k=config["num_experts_per_tok"],
                expert_ff=config.get("moe_intermediate_size") or config["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                # mixtral's top-k weights always sum to one
                norm_topk_prob=bool(config.get("norm_topk_prob", model_type == "mixtral")),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_seq_length=min(ctx, max_seq_length or 2048),
                qkv_bias=model_type == "qwen2_moe" and bool(config.get("qkv_bias", True)),
                shared_ff=config["shared_expert_intermediate_size"] if arch.shared_expert else 0,
                clip_qkv=config.get("clip_qkv"),
                moe_block=arch.moe_block,
                expert_proj=arch.expert_proj,
                qk_norm=arch.qk_norm,
                routing=arch.routing,
                shared_expert=arch.shared_expert,
            )
        except KeyError as e:
            raise LocalmoeError(f"config.json lacks {e.args[0]!r}, needed for a {model_type} model") from None
