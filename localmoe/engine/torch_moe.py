"""Native PyTorch engine for Hugging Face MoE checkpoints, with its own per-layer expert cache.

Dense weights (embeddings, attention, norms, routers) are read once; each expert's three matrices are read from
the safetensors files only when the router picks it and it is not cached. The model follows gpt-fast's model.py:
a `ModelArgs` dataclass, a `KVCache` with one `update`, plain modules, no framework layers.
transformers is the test oracle only; nothing here imports it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localmoe import chat_template
from localmoe.engine import DecodeClock, GenerationConfig, GenerationStats, Message, native, token_budget
from localmoe.engine.expert_store import EXPERT_DTYPES, ExpertStore, Loader
from localmoe.engine.handles import Handles
from localmoe.engine.quant import Int8Linear, int8_linear_available
from localmoe.errors import LocalmoeError
from localmoe.plan import CheckpointPlan, TensorInfo, plan_checkpoint, read_safetensors_header
from localmoe.trace import Trace, TraceToken


@dataclass(frozen=True)
class _Arch:
    moe_block: str  # hub name of the MoE block inside a decoder layer
    expert_proj: tuple[str, str, str]  # hub names of one expert's (gate, up, down) projections
    # RMSNorm on q and k before rope: "head" per head over head_dim (qwen3), "full" over the whole projection
    # (olmoe), None for neither
    qk_norm: str | None
    routing: str  # "softmax_topk": softmax over all experts, top-k, renormalise if norm_topk_prob
    #              "topk_softmax": top-k of the logits, softmax over those k (always sums to 1)
    shared_expert: bool = False  # qwen2_moe: a dense expert every token uses, scaled by sigmoid(its own gate)


_HUB_PROJ = ("gate_proj", "up_proj", "down_proj")
ARCHS: dict[str, _Arch] = {
    "qwen3_moe": _Arch("mlp", _HUB_PROJ, qk_norm="head", routing="softmax_topk"),
    "qwen2_moe": _Arch("mlp", _HUB_PROJ, qk_norm=None, routing="softmax_topk", shared_expert=True),
    "olmoe": _Arch("mlp", _HUB_PROJ, qk_norm="full", routing="softmax_topk"),
    "mixtral": _Arch("block_sparse_moe", ("w1", "w3", "w2"), qk_norm=None, routing="topk_softmax"),
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

    @classmethod
    def from_config(cls, config: dict[str, Any], max_seq_length: int | None = None) -> ModelArgs:
        model_type = config.get("model_type")
        if model_type not in ARCHS:
            raise LocalmoeError(
                f"model_type {model_type!r} is not supported by the torch MoE engine (supported: {', '.join(ARCHS)})"
            )
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
                shared_ff=config["shared_expert_intermediate_size"] if ARCHS[model_type].shared_expert else 0,
                clip_qkv=config.get("clip_qkv"),
            )
        except KeyError as e:
            raise LocalmoeError(f"config.json lacks {e.args[0]!r}, needed for a {model_type} model") from None


class Checkpoint:
    """Tensors of a checkpoint across its safetensors shards, read one at a time with shape checks."""

    def __init__(self, model_dir: Path, device: torch.device | str = "cpu") -> None:
        self.dir = model_dir
        self.device = torch.device(device)  # where `get` puts the dense weights
        self._stack = ExitStack()
        try:
            self._open(model_dir)
        except BaseException:
            self._stack.close()  # the fds and maps opened so far: the caller never gets an object to close
            raise
        self.bytes_read = 0

    def _open(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise LocalmoeError(f"{model_dir} holds no .safetensors files")
            weight_map = {}
        from safetensors import safe_open

        # safetensors handles (each an mmap of its shard) serve the dense weights at load, then are closed by
        # release_mmaps(): a mapped page cannot be dropped from RAM, and the whole file would stay resident.
        self._mmaps = ExitStack()
        self._stack.callback(self._mmaps.close)
        self._handles: dict[str, Any] = {}
        for name in files:
            path = model_dir / name
            if not path.exists():
                raise LocalmoeError(f"checkpoint shard {name} is missing from {model_dir}")
            try:
                self._handles[name] = self._mmaps.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
                raise LocalmoeError(f"cannot read checkpoint shard {path}: {e}") from None
        # Offsets from the headers, for the cold tier's pread reads; one fd per shard, closed with the stack.
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[str, int] = {}
        for name in files:
            self.tensors.update(read_safetensors_header(model_dir / name))
            try:
                fd = os.open(model_dir / name, os.O_RDONLY)
            except OSError as e:
                raise LocalmoeError(f"cannot open checkpoint shard {model_dir / name}: {e.strerror}") from None
            self._stack.callback(os.close, fd)
            self._fds[name] = fd

    def get(self, key: str, shape: tuple[int, ...]) -> Tensor:
        info = self.tensors.get(key)
        if info is None:
            raise LocalmoeError(f"tensor {key} is missing from the checkpoint in {self.dir}")
        if tuple(info.shape) != shape:  # checked from the header, before the bytes are read
            raise LocalmoeError(f"tensor {key} has shape {list(info.shape)}, expected {list(shape)} from config.json")
        handle = self._handles.get(info.file)
        if handle is None:  # after release_mmaps (only dtypes pread cannot decode come here): open it briefly
            from safetensors import safe_open

            with safe_open(str(self.dir / info.file), framework="pt") as h:
                raw = h.get_tensor(key).clone()
        else:
            raw = handle.get_tensor(key)
        # copy=True: a float32 tensor would otherwise stay a view of the file's mmap, pages the kernel may evict
        # and read again under memory pressure
        t = raw.to(device=self.device, dtype=torch.float32, copy=True)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, key: str, shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
        """The cold tier: one tensor with os.pread at its header offset, then dropped from the page cache
        (POSIX_FADV_DONTNEED) so it does not sit in RAM twice. Same bytes as `get`, so bit-identical.

        `out` (float32, contiguous, `shape`): read into it — straight into its memory when the file holds float32 —
        so a miss allocates nothing beyond the expert's own tensors."""
        info = self.tensors.get(key)
        if info is None:
            raise LocalmoeError(f"tensor {key} is missing from the checkpoint in {self.dir}")
        if info.shape != shape:
            raise LocalmoeError(f"tensor {key} has shape {list(info.shape)}, expected {list(shape)} from config.json")
        dtype = _ST_DTYPES.get(info.dtype)
        if dtype is None or sys.byteorder != "little":
            t = self.get(key, shape)  # a dtype torch.frombuffer cannot take: safetensors decodes it
            return out.copy_(t) if out is not None else t
        direct = out is not None and dtype == torch.float32 and out.is_contiguous() and info.nbytes == out.nbytes
        buf = memoryview(out.numpy()).cast("B") if direct else memoryview(bytearray(info.nbytes))  # type: ignore
        fd, done = self._fds[info.file], 0
        while done < info.nbytes:
            n = os.preadv(fd, [buf[done:]], info.offset + done)
            if n <= 0:
                raise LocalmoeError(f"checkpoint shard {self.dir / info.file} is truncated at tensor {key}")
            done += n
        if _FADVISE:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        if direct:
            return out  # type: ignore[return-value]
        t = torch.frombuffer(buf, dtype=dtype) if info.nbytes else torch.empty(0, dtype=dtype)
        t = t.reshape(shape).to(torch.float32)
        return out.copy_(t) if out is not None else t

    def release_mmaps(self) -> None:
        """Unmap the shards once the dense weights are copied out; experts are read with pread from then on."""
        self._handles.clear()
        self._mmaps.close()

    def drop_page_cache(self) -> None:
        """Forget the shards' pages (the dense weights now live in tensors): the page cache would otherwise keep a
        second copy of everything `get` read, which a memory-capped machine cannot spare."""
        if _FADVISE:
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._stack.close()


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


# --- expert store ---------------------------------------------------------------------------------------


def expert_loader(ckpt: Checkpoint, args: ModelArgs) -> Loader:
    """(layer, expert) -> its (gate and up stacked, down) float32 matrices read from disk, and the bytes read."""
    spec = ARCHS[args.arch]
    prefix = [f"model.layers.{i}.{spec.moe_block}.experts." for i in range(args.n_layers)]
    gate, up, down = spec.expert_proj
    shapes = ((gate, (args.expert_ff, args.dim)), (up, (args.expert_ff, args.dim)), (down, (args.dim, args.expert_ff)))

    def load(layer: int, expert: int) -> tuple[tuple[Tensor, Tensor], int]:
        p = f"{prefix[layer]}{expert}."
        gate_up = torch.empty(2 * args.expert_ff, args.dim)  # gate and up stacked: one matmul for both
        down = torch.empty(args.dim, args.expert_ff)
        ckpt.read(f"{p}{shapes[0][0]}.weight", shapes[0][1], gate_up[: args.expert_ff])
        ckpt.read(f"{p}{shapes[1][0]}.weight", shapes[1][1], gate_up[args.expert_ff :])
        ckpt.read(f"{p}{shapes[2][0]}.weight", shapes[2][1], down)
        nbytes = sum(ckpt.tensors[f"{p}{name}.weight"].nbytes for name, _ in shapes)
        return (gate_up, down), nbytes

    return load


# --- model ----------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    def __init__(self, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (1, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos/sin per position for HF's rotate-half layout (first half of each head pairs with the second)."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
    freqs = torch.outer(torch.arange(args.max_seq_length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, w: dict[str, Tensor]) -> None:
        super().__init__()
        self.args = args
        # q, k and v in one matmul (as gpt-fast does): fewer, larger calls per decode step
        self.wqkv = torch.cat((w["q_proj"], w["k_proj"], w["v_proj"]))
        self.bqkv = torch.cat((w["q_bias"], w["k_bias"], w["v_bias"])) if "q_bias" in w else None
        self.wo = w["o_proj"]
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = (q_out, kv_out, kv_out)
        self.per_head_norm = ARCHS[args.arch].qk_norm == "head"
        self.q_norm = RMSNorm(w["q_norm"], args.norm_eps) if "q_norm" in w else None
        self.k_norm = RMSNorm(w["k_norm"], args.norm_eps) if "k_norm" in w else None
        self.kv_cache = KVCache(args.max_seq_length, args.n_kv_heads, args.head_dim, torch.float32)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape
        q, k, v = _linear(x, self.wqkv, self.bqkv).split(self.split, dim=-1)
        if self.q_norm is not None and self.k_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.view(bsz, seqlen, a.n_heads, a.head_dim)
        k = k.view(bsz, seqlen, a.n_kv_heads, a.head_dim)
        v = v.view(bsz, seqlen, a.n_kv_heads, a.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE on q and k heads at once: half the small ops of a decode step's rotation
        qk = apply_rope(torch.cat((q, k), dim=2).transpose(1, 2), cos, sin)
        q, k = qk.split((a.n_heads, a.n_kv_heads), dim=1)
        v = v.transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        # Only the filled part of the cache (the mask's width): attending over all max_seq_length slots would read
        # the whole cache every decode step. GQA natively: no repeated copies of K and V.
        end = mask.shape[-1]
        k, v = k[:, :, :end], v[:, :, :end]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(a.head_dim),
                                           enable_gqa=a.n_heads != a.n_kv_heads)
        return _linear(y.transpose(1, 2).reshape(bsz, seqlen, a.n_heads * a.head_dim), self.wo)


class MoE(nn.Module):
    """Route each token to its top experts and sum their outputs, fetching each chosen expert once per call."""

    def __init__(self, args: ModelArgs, layer: int, w: dict[str, Tensor], store: ExpertStore) -> None:
        super().__init__()
        self.args, self.layer, self.router, self.store = args, layer, w["router"], store
        self.shared = (w["shared_gate"], w["shared_up"], w["shared_down"]) if "shared_gate" in w else None
        self.shared_expert_gate = w.get("shared_expert_gate")
        self.routing = ARCHS[args.arch].routing
        self.top_p: float | None = None  # adaptive expert count (see route)
        self.replay: TraceReplay | None = None  # benchmark switch: route by a recorded trace
        self.last_topk: Tensor | None = None  # (tokens, k) expert ids of the last call, -1 where unused
        self.native = False  # one-token float32 experts through native.moe_decode (set by the engine on a CPU)
        self.handle = _MOES.add(self)
        # set by Transformer: the next layer's MoE, whose experts this one prefetches (not a submodule)
        self.__dict__["next_moe"] = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, expert ids), each (tokens, k), highest weight first.

        With `top_p`, a token keeps only its smallest prefix of the top-k experts whose router probabilities
        (softmax over all experts) reach top_p — at least one — renormalised the way the architecture renormalises
        its top-k; dropped slots get id -1 and weight 0."""
        logits = F.linear(x, self.router)
        k = self.args.top_k
        probs = logits.softmax(dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        keep = None
        if self.top_p is not None and self.top_p < 1.0:
            before = top.cumsum(dim=-1) - top  # mass of the better experts
            keep = before < self.top_p  # the first slot always passes (0 < p)
            top = top * keep
        if self.routing == "topk_softmax" or self.args.norm_topk_prob:
            # mixtral's softmax over the kept logits equals the kept probabilities renormalised
            top = top / top.sum(dim=-1, keepdim=True)
        if keep is not None:
            idx = idx.masked_fill(~keep, -1)
        return top, idx

    def forward(self, x: Tensor, predicted: Tensor | None = None) -> Tensor:
        """`predicted`: the next layer's likely experts, to prefetch while this layer's experts run."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.route(x)
        if torch.compiler.is_compiling():  # the expert loop as one opaque op: the rest of the model stays one graph
            out = torch.ops.localmoe.moe_experts(x, weights, idx, self.handle, predicted)
        else:
            out = self.experts(x, weights, idx, predicted)
        if self.shared is not None and self.shared_expert_gate is not None:
            w_gate, w_up, w_down = self.shared
            shared = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * shared
        return out.view(shape)

    def experts(self, x: Tensor, weights: Tensor, idx: Tensor, predicted: Tensor | None = None) -> Tensor:
        """Σ over each token's chosen experts of weight × expert(token)."""
        if predicted is not None:
            self.prefetch_next(predicted)
        if self.replay is not None:
            idx = self.replay.take(self.layer, x.shape[0]).to(idx.device)
        self.last_topk = idx
        out = torch.zeros_like(x)
        # Ascending expert order: deterministic, and the cache sees the same request sequence every run.
        rows = idx.tolist()  # one device-to-host read per layer (a sync on a GPU)
        experts = sorted({e for row in rows for e in row if e >= 0})
        store = self.store
        store.begin_step(self.layer, experts, x.shape[0])
        stats = store.stats[self.layer]
        stats.tokens += x.shape[0]
        try:
            if x.shape[0] == 1:  # decode: no gather/scatter for one token (same sums, same order)
                ids, scale = rows[0], weights[0].tolist()
                stats.experts_used += len(experts)
                scales = [scale[ids.index(expert)] for expert in experts]
                if self.native and x.dtype == torch.float32 and x.is_contiguous():
                    # all of the layer's experts in one call of the native kernel (native.py)
                    got = [store.get(self.layer, expert) for expert in experts]
                    # a layer's experts come from one loader in one dtype: the first one's shapes stand for all
                    if native.usable(x, got[0].mats) and all(
                            w.dtype == "float32" and w.mats[0].is_contiguous() and w.mats[1].is_contiguous()
                            for w in got):
                        native.moe_decode(x, [w.mats for w in got], scales, out)
                    else:
                        for w, s in zip(got, scales, strict=True):
                            w.ffn_add(x, s, out)
                else:
                    for expert, s in zip(experts, scales, strict=True):
                        store.get(self.layer, expert).ffn_add(x, s, out)
            else:
                stats.experts_used += int((idx >= 0).sum())
                for expert in experts:
                    tokens, slot = torch.where(idx == expert)
                    ye = store.get(self.layer, expert).ffn(x[tokens])
                    out.index_add_(0, tokens, ye * weights[tokens, slot, None])
        finally:
            store.end_step(self.layer)
        return out

    def prefetch_next(self, predicted: Tensor) -> None:
        nxt = self.next_moe
        if nxt is None:
            return
        if nxt.replay is not None:
            predicted = nxt.replay.peek(nxt.layer)  # a replayed trace knows the next layer's choice exactly
        self.store.prefetch(nxt.layer, [e for e in predicted.tolist() if e >= 0])


_MOES = Handles()  # the expert loop of each MoE layer, for the custom op below


@torch.library.custom_op("localmoe::moe_experts", mutates_args=())
def _moe_experts(x: Tensor, weights: Tensor, idx: Tensor, handle: int, predicted: Tensor | None) -> Tensor:
    return _MOES[handle].experts(x, weights, idx, predicted)


@_moe_experts.register_fake
def _(x: Tensor, weights: Tensor, idx: Tensor, handle: int, predicted: Tensor | None) -> Tensor:
    return torch.empty_like(x)


class TraceReplay:
    """Benchmark-only switch: route every layer by a recorded trace instead of its router, cycling through the
    trace's tokens, so the expert cache meets the locality of real routing on a random-init model."""

    def __init__(self, rows: list[list[list[int]]], n_layers: int, n_experts: int, top_k: int) -> None:
        # rows[layer] = the expert lists of the tokens that layer computed, each padded/cut to top_k
        self.rows = [
            torch.tensor([[e % n_experts for e in r[:top_k]] + [-1] * (top_k - len(r[:top_k])) for r in layer])
            for layer in rows
        ]
        if any(len(r) == 0 for r in self.rows) or len(self.rows) != n_layers:
            raise LocalmoeError("the trace has no routing for some layers of this model")
        self.cursor = [0] * n_layers

    @classmethod
    def from_trace(cls, trace: Any, n_layers: int, n_experts: int, top_k: int) -> TraceReplay:
        rows = [[t.experts[i % trace.n_layers] for t in trace.tokens if t.experts[i % trace.n_layers]]
                for i in range(n_layers)]
        return cls(rows, n_layers, n_experts, top_k)

    def take(self, layer: int, n: int) -> Tensor:
        rows = self.rows[layer]
        picks = [(self.cursor[layer] + i) % len(rows) for i in range(n)]
        self.cursor[layer] = (self.cursor[layer] + n) % len(rows)
        return rows[picks]

    def peek(self, layer: int) -> Tensor:
        return self.rows[layer][self.cursor[layer]]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, w: dict[str, Tensor], store: ExpertStore) -> None:
        super().__init__()
        self.attention = Attention(args, w)
        self.moe = MoE(args, layer, w, store)
        self.attention_norm = RMSNorm(w["input_layernorm"], args.norm_eps)
        self.ffn_norm = RMSNorm(w["post_attention_layernorm"], args.norm_eps)
        self.__dict__["next"] = None  # the following block, whose experts this one predicts (set by Transformer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        predicted = self.predict_next(h) if self.next is not None and self.moe.store.prefetching else None
        return h + self.moe(self.ffn_norm(h), predicted)

    def predict_next(self, h: Tensor) -> Tensor:
        """Pre-gating: the next layer's router applied to this layer's hidden state (of the last token) names the
        experts it will probably want; this layer's MoE has the store start loading them before its own experts
        run."""
        nxt = self.next
        assert nxt is not None
        logits = F.linear(nxt.ffn_norm(h[0, -1:]), nxt.moe.router)
        return torch.topk(logits, self.moe.args.top_k, dim=-1).indices[0]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, ckpt: Checkpoint, store: ExpertStore) -> None:
        super().__init__()
        self.args = args
        device = ckpt.device
        self.tok_embeddings = ckpt.get("model.embed_tokens.weight", (args.vocab_size, args.dim))
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, _layer_weights(args, ckpt, i), store) for i in range(args.n_layers)
        )
        for block, nxt in zip(self.layers[:-1], self.layers[1:], strict=True):
            block.__dict__["next"] = nxt  # a plain reference: registered, it would nest every later layer in this one
            block.moe.__dict__["next_moe"] = nxt.moe
        self.norm = RMSNorm(ckpt.get("model.norm.weight", (args.dim,)), args.norm_eps)
        self.output = (
            self.tok_embeddings if args.tie_embeddings else ckpt.get("lm_head.weight", (args.vocab_size, args.dim))
        )
        cos, sin = rope_tables(args)
        self.register_buffer("cos", cos.to(device))
        self.register_buffer("sin", sin.to(device))
        causal = torch.ones(args.max_seq_length, args.max_seq_length, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", causal)
        for block in self.layers:
            block.attention.kv_cache.to(device)

    @property
    def moes(self) -> list[MoE]:
        return [block.moe for block in self.layers]

    def forward(self, idx: Tensor, input_pos: Tensor, end: int | None = None) -> Tensor:
        """Logits for tokens `idx` (1, n) placed at positions `input_pos`; earlier positions come from the KV cache.
        `end` (one past the last position) bounds the attention; default: the whole cache."""
        mask = self.causal_mask[None, None, input_pos, : end or self.args.max_seq_length]
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        x = F.embedding(idx, self.tok_embeddings)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return _linear(self.norm(x), self.output)

    def quantize_dense(self) -> None:
        """int8 for the big dense matmuls — attention projections and the output head — as llama.cpp's q8_0 has
        them; embeddings, norms and routers stay float32."""
        self.output = Int8Linear(self.output)
        for block in self.layers:
            block.attention.wqkv = Int8Linear(block.attention.wqkv)
            block.attention.wo = Int8Linear(block.attention.wo)


def _root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost of the exceptions torch.compile wraps around each other."""
    seen = {id(e)}
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith("raised:")]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _linear(x: Tensor, w: Tensor | Int8Linear, bias: Tensor | None = None) -> Tensor:
    if isinstance(w, Int8Linear):
        y = w(x)
        return y + bias if bias is not None else y
    return F.linear(x, w, bias)


def _layer_weights(args: ModelArgs, ckpt: Checkpoint, i: int) -> dict[str, Tensor]:
    spec = ARCHS[args.arch]
    p = f"model.layers.{i}."
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    w = {
        "q_proj": ckpt.get(f"{p}self_attn.q_proj.weight", (q_out, args.dim)),
        "k_proj": ckpt.get(f"{p}self_attn.k_proj.weight", (kv_out, args.dim)),
        "v_proj": ckpt.get(f"{p}self_attn.v_proj.weight", (kv_out, args.dim)),
        "o_proj": ckpt.get(f"{p}self_attn.o_proj.weight", (args.dim, q_out)),
        "input_layernorm": ckpt.get(f"{p}input_layernorm.weight", (args.dim,)),
        "post_attention_layernorm": ckpt.get(f"{p}post_attention_layernorm.weight", (args.dim,)),
        "router": ckpt.get(f"{p}{spec.moe_block}.gate.weight", (args.n_experts, args.dim)),
    }
    if spec.qk_norm:
        per_head = spec.qk_norm == "head"
        w["q_norm"] = ckpt.get(f"{p}self_attn.q_norm.weight", (args.head_dim if per_head else q_out,))
        w["k_norm"] = ckpt.get(f"{p}self_attn.k_norm.weight", (args.head_dim if per_head else kv_out,))
    if args.qkv_bias:
        for name, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            w[f"{name}_bias"] = ckpt.get(f"{p}self_attn.{name}_proj.bias", (size,))
    if spec.shared_expert:
        m = f"{p}{spec.moe_block}."
        w["shared_gate"] = ckpt.get(f"{m}shared_expert.gate_proj.weight", (args.shared_ff, args.dim))
        w["shared_up"] = ckpt.get(f"{m}shared_expert.up_proj.weight", (args.shared_ff, args.dim))
        w["shared_down"] = ckpt.get(f"{m}shared_expert.down_proj.weight", (args.dim, args.shared_ff))
        w["shared_expert_gate"] = ckpt.get(f"{m}shared_expert_gate.weight", (1, args.dim))
    return w


# --- engine ---------------------------------------------------------------------------------------------


def plan_for(
    model_dir: Path,
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    fast_memory: int | None = None,
    ctx: int | None = None,
    *,
    device: str = "cpu",
    expert_dtype: str = "float32",
    warm_memory: int | None = None,
    fast_slots: int | None = None,
) -> CheckpointPlan:
    """The checkpoint plan on `fast_memory` bytes, or on what is detected: free VRAM for a GPU fast tier (with the
    free RAM as its pinned warm tier), free RAM (cgroup caps included) for a CPU one."""
    from localmoe import hardware

    ram = None
    if warm_memory is None and device.startswith("cuda"):
        ram = warm_memory = hardware.detect(measure=False).ram_available_bytes
    if fast_memory is not None:
        budget, source = fast_memory, "override"
    elif device.startswith("cuda"):
        budget, source = torch.cuda.mem_get_info(torch.device(device))[0], "detected"
    else:
        budget = ram if ram is not None else hardware.detect(measure=False).ram_available_bytes
        source = "detected"
    return plan_checkpoint(config, tensors, budget, ctx=ctx, model=str(model_dir), budget_source=source,
                           expert_dtype=expert_dtype, device=torch.device(device).type,
                           warm_budget_bytes=warm_memory or 0, fast_slots=fast_slots)


def resolve_device(device: str | None) -> str:
    """`None` picks CUDA when torch sees a GPU, else the CPU; an explicit device must exist."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LocalmoeError(f"unsupported device {device!r} (cpu, cuda, cuda:N or mps)") from None
    kind = dev.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise LocalmoeError(f"device {device!r} asked for, but torch sees no CUDA GPU (a CPU-only torch build?)")
    if kind == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LocalmoeError(f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LocalmoeError("device 'mps' asked for, but Metal is not available to torch here")
    if kind not in ("cpu", "cuda", "mps"):
        raise LocalmoeError(f"unsupported device {device!r} (cpu, cuda, cuda:N or mps)")
    return device


class TorchMoEEngine:
    """Runs a Hugging Face MoE checkpoint directory through a tiered expert cache (see expert_store).

    Options: `expert_slots` (fast-tier experts per layer; default from the plan's memory budget), `fast_memory` /
    `warm_memory` (budget overrides in bytes), `cache_policy` (lru, lfu, lfru, fifo), `prefetch` (pre-gating in
    a background thread, per layer only while its predictions are mostly right; by default on the CPU when not
    all experts fit), `expert_dtype` (float32, bfloat16, int8), `device` (cpu, cuda, mps; default CUDA when
    present), `dense_dtype` (float32; int8 quantises the attention projections and the output head, CPU only),
    `expert_top_p` (adaptive expert count), `telemetry` (record the experts of every token in `routing`),
    `compile` (torch.compile the dense part of each layer: fused kernels after a one-off compile at load, tens of
    seconds on a few CPU cores).

    With float32 weights on the CPU and every expert resident, a one-token decode step runs whole in native code
    (native.DecodeStep; `cache_stats()["decode_step"]`), unless compiled or prefetching, with top-p or a replay."""

    backend = "torch"  # as ModelRef.backend and create_engine name it

    def __init__(
        self,
        model_dir: str | Path,
        *,
        expert_slots: int | None = None,
        cache_policy: str = "lru",
        max_seq_length: int | None = None,
        model_id: str | None = None,
        fast_memory: int | None = None,
        warm_memory: int | None = None,
        prefetch: bool | None = None,
        expert_dtype: str = "float32",
        device: str | None = None,
        expert_top_p: float | None = None,
        telemetry: bool = False,
        dense_dtype: str = "float32",
        compile: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.fast_memory, self.warm_memory = fast_memory, warm_memory
        self.plan: CheckpointPlan | None = None
        self.model_id = model_id or self.model_dir.name
        self.expert_slots, self.cache_policy, self.max_seq_length = expert_slots, cache_policy, max_seq_length
        if expert_dtype not in EXPERT_DTYPES:
            raise LocalmoeError(f"unknown expert dtype {expert_dtype!r} (known: {', '.join(EXPERT_DTYPES)})")
        if expert_top_p is not None and not 0 < expert_top_p <= 1:
            raise LocalmoeError(f"expert_top_p must be in (0, 1], got {expert_top_p}")
        self.prefetch, self.expert_dtype, self.device_name = prefetch, expert_dtype, device
        self.expert_top_p, self.telemetry = expert_top_p, telemetry
        if dense_dtype not in ("float32", "int8"):
            raise LocalmoeError(f"unknown dense dtype {dense_dtype!r} (float32 or int8)")
        self.dense_dtype, self.compile = dense_dtype, compile
        self.device = torch.device("cpu")
        self.args: ModelArgs | None = None
        self.model: Transformer | None = None
        self._run: Any = None  # the model, or its torch.compile wrapper
        self.store: ExpertStore | None = None
        self._ckpt: Checkpoint | None = None
        self._stats = GenerationStats()
        self._chat: ChatTokenizer | None = None
        self._gen_lock = threading.Lock()  # one generation at a time: the KV cache is shared
        self.tokens: list[int] = []  # prompt + generated ids of the last generation
        self.token_logprobs: list[float] = []
        self.routing: list[TraceToken] = []  # with telemetry: experts per layer of each token evaluated
        self.forward_calls = 0  # model calls (prefill or one decode step) since load, for tests and benchmarks
        # the whole decode step in one native call once every expert is resident (None: not yet, False: never)
        self._step: native.DecodeStep | bool | None = None
        self.native_steps = 0  # decode steps that ran there, for tests and benchmarks

    def load(self) -> None:
        if self.model is not None:
            return
        config_path = self.model_dir / "config.json"
        if not config_path.exists():
            raise LocalmoeError(f"{self.model_dir} has no config.json: not a Hugging Face checkpoint directory")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise LocalmoeError(f"{config_path} is not valid JSON: {e}") from None
        args = ModelArgs.from_config(config, self.max_seq_length)
        device = resolve_device(self.device_name)
        ckpt = Checkpoint(self.model_dir, device)
        try:
            slots, warm = self.expert_slots, 0
            if slots is None or device != "cpu":
                self.plan = plan_for(self.model_dir, config, ckpt.tensors, self.fast_memory, args.max_seq_length,
                                     device=device, expert_dtype=self.expert_dtype, warm_memory=self.warm_memory,
                                     fast_slots=slots)
                if slots is None:
                    self.plan.raise_if_refused()
                    slots = self.plan.slots_per_layer
                warm = self.plan.warm_slots_per_layer
            # By default only where loads come from disk into CPU RAM: there an exact prediction saved a quarter
            # of the decode time under a memory cap, and the accuracy gate bounds the cost of wrong ones; on a GPU
            # prefetch has measured slower even when right (benchmarks/RESULTS.md), and resident has nothing to load.
            prefetch = self.prefetch if self.prefetch is not None else device == "cpu" and slots < args.n_experts
            store = ExpertStore(expert_loader(ckpt, args), args.n_layers, args.n_experts, slots,
                                policy=self.cache_policy, expert_dtype=self.expert_dtype, device=device,
                                warm_slots=warm, prefetch=prefetch)
            if self.dense_dtype == "int8" and (device != "cpu" or not int8_linear_available()):
                raise LocalmoeError("dense_dtype int8 runs on the CPU only, with a torch that has int8 kernels")
            with torch.inference_mode():
                model = Transformer(args, ckpt, store).eval()
                if self.dense_dtype == "int8":
                    model.quantize_dense()
            ckpt.release_mmaps()
            ckpt.drop_page_cache()
        except BaseException:
            ckpt.close()
            raise
        # one-token float32 experts on the CPU in one native call per layer (native.py), when it builds here
        use_native = device == "cpu" and self.expert_dtype == "float32" and native.available()
        for moe in model.moes:
            moe.top_p = self.expert_top_p
            moe.native = use_native
        self.args, self._ckpt, self.store, self.model = args, ckpt, store, model
        self.device = torch.device(device)
        # slots for every expert: none is ever evicted, so the native step may hold their addresses; a compiled or
        # prefetching engine keeps its torch path (DecodeStep.why_not rules out the rest once experts are resident)
        native_step = use_native and not self.compile and not prefetch and store.slots == args.n_experts
        self._step = None if native_step else False
        self._run = model
        if self.compile:
            if not os.environ.get("TORCH_LOGS"):  # torch's warnings would precede our one-line error on failure
                torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
                # advice to the compiler's developers (TF32, online softmax), not to someone chatting
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
            # each engine's modules are new objects to dynamo's guards: room for more than a few engines a process
            cfg = torch._dynamo.config
            limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(cfg, limit, max(getattr(cfg, limit), 64))
            # dynamic: one graph for every prompt length and cache position (a decode step, length 1, gets its own)
            # no size/alignment asserts in the generated Python around the kernels: ~100 checks per decode step
            # that test what the graph's own shapes already guarantee
            quiet = {k: False for k in ("size_asserts", "alignment_asserts", "scalar_asserts")
                     if hasattr(torch._inductor.config, k)}
            self._run = torch.compile(model, dynamic=True, options=quiet)
            self._compile_now()

    def _compile_now(self) -> None:
        """Compile at load (a 2-token prompt, then one decode step) rather than inside the first answer's timing;
        the KV cache rows written here are overwritten by every later sequence, and the counters are reset."""
        dev = self.device
        with torch.inference_mode():
            self._call(torch.zeros((1, 2), dtype=torch.long, device=dev), torch.arange(0, 2, device=dev), 2)
            self._call(torch.zeros((1, 1), dtype=torch.long, device=dev), torch.arange(2, 3, device=dev), 3)
        assert self.store is not None
        self.store.reset_stats()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    @property
    def hits(self) -> int:
        return self.store.totals().hits if self.store else 0

    @property
    def misses(self) -> int:
        return self.store.totals().misses if self.store else 0

    @property
    def experts_per_token(self) -> float | None:
        """Mean experts computed per token per layer since load (or the last reset_cache_stats)."""
        return self.store.totals().to_dict()["experts_per_token"] if self.store else None

    def cache_stats(self) -> dict[str, Any]:
        """Expert-cache counters since load, the start of the last streamed answer or reset_cache_stats: totals,
        then `layers` with one dict each."""
        store = self.store
        total = store.totals().to_dict() if store else {}
        return {
            "slots": store.slots if store else None,
            "warm_slots": store.warm_slots if store else None,
            "policy": self.cache_policy,
            "prefetch": store.prefetching if store else None,
            "expert_dtype": self.expert_dtype,
            "device": str(self.device),
            "compiled": self.compile,
            "expert_kernel": self._expert_kernel(),
            # "native": one-token steps run whole in native code (every expert resident), else in torch
            "decode_step": "native" if self._step else "torch",
            **total,
            # prediction_precision: the share of the layer's recent predicted loads it used (prefetch gates on it)
            "layers": [{**s.to_dict(), "prediction_precision": round(p, 3) if store.prefetching and n else None}
                       for s, p, n in zip(store.stats, store.precision, store.scored, strict=True)] if store else [],
        }

    def _expert_kernel(self) -> str:
        """What computes a decode step's experts: "native" (native.py) or torch's kernels (and why)."""
        if self.model is not None and self.model.moes and self.model.moes[0].native:
            return "native"
        if self.device.type != "cpu" or self.expert_dtype != "float32":
            return "torch"
        return native.kernels()

    def preload(self) -> None:
        """Read experts into the fast tier now (the first `slots` of every layer; all of them when everything
        fits), so a fully resident benchmark or a latency-sensitive session pays no reads later. Counters reset."""
        model = self._model()
        assert self.store is not None
        for moe in model.moes:
            for expert in range(min(self.store.slots, model.args.n_experts)):
                self.store.get(moe.layer, expert)
        self.reset_cache_stats()

    def reset_cache_stats(self) -> None:
        if self.store is not None:
            self.store.reset_stats()

    def set_expert_top_p(self, top_p: float | None) -> None:
        """Adaptive expert count from now on (None: the model's top-k)."""
        if top_p is not None and not 0 < top_p <= 1:
            raise LocalmoeError(f"expert_top_p must be in (0, 1], got {top_p}")
        self.expert_top_p = top_p
        for moe in self._model().moes:
            moe.top_p = top_p

    def replay(self, trace: Trace | None) -> None:
        """Benchmark only: route by `trace` (cycling through its tokens) instead of the routers; None undoes it.
        The logits are then meaningless; the expert cache meets the trace's locality."""
        model = self._model()
        replay = TraceReplay.from_trace(trace, model.args.n_layers, model.args.n_experts, model.args.top_k) \
            if trace is not None else None
        for moe in model.moes:
            moe.replay = replay

    def _model(self) -> Transformer:
        self.load()
        assert self.model is not None
        return self.model

    def _forward(self, tokens: list[int], start: int, n_prompt: int | None = None) -> Tensor:
        """Logits (len(tokens), vocab) on the CPU for `tokens` at positions start...; telemetry marks the
        positions below `n_prompt` as prompt."""
        model = self._model()
        end = start + len(tokens)
        if end > model.args.max_seq_length:
            raise LocalmoeError(f"{end} tokens exceed the engine's context of {model.args.max_seq_length}")
        bad = [t for t in tokens if not 0 <= t < model.args.vocab_size]
        if bad:
            raise LocalmoeError(f"token id {bad[0]} is outside the vocabulary (0..{model.args.vocab_size - 1})")
        self.forward_calls += 1
        dev = self.device
        step = self._native_step() if len(tokens) == 1 else None
        if step is not None:
            out = step(tokens[0], start)
            self._count_native_step(step)
        else:
            with torch.inference_mode():
                out = self._call(torch.tensor([tokens], device=dev), torch.arange(start, end, device=dev), end)
        if self.telemetry:
            per_layer = [[[e for e in row if e >= 0] for row in moe.last_topk.tolist()] for moe in model.moes
                         if moe.last_topk is not None]
            n_prompt = end if n_prompt is None else n_prompt
            for i, token in enumerate(tokens):
                pos = start + i
                self.routing.append(TraceToken(pos, token, "prompt" if pos < n_prompt else "decode",
                                               [layer[i] for layer in per_layer]))
        return out.float().cpu() if out.device.type != "cpu" else out

    def _native_step(self) -> native.DecodeStep | None:
        """The native decode step where it applies now (see load): every expert resident, and no adaptive top-p
        or trace replay, which the torch path implements (both are set on every layer at once)."""
        if self._step is False:
            return None
        model, store = self._model(), self.store
        assert store is not None
        if model.moes[0].top_p is not None or model.moes[0].replay is not None:
            return None
        if self._step is None:
            n = model.args.n_experts
            if any(len(c.entries) < n for c in store.layers):
                return None  # not all read in yet (preload() reads them at once)
            experts = [[c.entries[e].mats for e in range(n)] for c in store.layers]
            self._step = native.decode_step(model, experts) or False
        return self._step or None

    def _count_native_step(self, step: native.DecodeStep) -> None:
        """The statistics the torch path keeps per layer: every expert a hit (all are resident)."""
        self.native_steps += 1
        k = step.top_k
        chosen = step.chosen() if self.telemetry else None
        for st in self.store.stats:
            st.tokens += 1
            st.experts_used += k
            st.hits += k
        if chosen is not None:
            for moe, ids in zip(self._model().moes, chosen, strict=True):
                moe.last_topk = torch.tensor([ids])

    def _call(self, idx: Tensor, pos: Tensor, end: int) -> Tensor:
        """The model (compiled or not) on one sequence: logits (n, vocab)."""
        if not self.compile:  # importing torch._dynamo costs ~50 MiB of RAM: only a compiled engine needs it
            return self._run(idx, pos, end)[0]
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self._run(idx, pos, end)[0]
        except TorchDynamoException as e:  # no C++ compiler, an unsupported device, ...
            raise LocalmoeError(f"torch.compile failed ({_root_cause(e)}); run without compile") from None

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits (n_tokens, vocab) for a fresh sequence; the KV cache is overwritten from position 0."""
        return self._forward(list(token_ids), 0).numpy()

    def decode_logits(self, token_ids: list[int], n_steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy decode: prefill, then one token at a time through the KV cache.

        Returns the n_steps chosen tokens and the (n_steps, vocab) logits each was chosen from (row 0 is the
        prefill's last row).
        """
        last = self._forward(list(token_ids), 0)[-1]
        chosen: list[int] = []
        rows = []
        pos = len(token_ids)
        for step in range(n_steps):
            rows.append(last)
            chosen.append(int(last.argmax()))
            if step + 1 < n_steps:
                last = self._forward(chosen[-1:], pos)[-1]
                pos += 1
        return chosen, torch.stack(rows).numpy()

    # --- chat ---------------------------------------------------------------------------------------------

    def chat_tokenizer(self) -> ChatTokenizer:
        """The checkpoint's tokenizer and chat template, read on first use (logits() works without them)."""
        if self._chat is None:
            self._chat = ChatTokenizer(self.model_dir)
        return self._chat

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return self.chat_tokenizer().encode_chat(messages)

    def stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        with self._gen_lock:
            yield from self._stream(messages, config, cancel)

    def _stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[str]:
        clock = DecodeClock()  # from here: template rendering and tokenising count towards the first token
        chat = self.chat_tokenizer()
        tokens = chat.encode_chat(messages)
        stats = self._stats = GenerationStats(prompt_tokens=len(tokens), stop_reason="length")
        model = self._model()
        if not tokens:
            stats.stop_reason = "error"
            raise LocalmoeError("the chat template rendered an empty prompt")
        budget = token_budget(stats, model.args.max_seq_length, self.model_id, config.max_tokens)
        sampler = Sampler(config)
        detok = IncrementalDetokenizer(chat.tokenizer)
        self.tokens = list(tokens)
        self.routing = []
        self.reset_cache_stats()  # cache_stats() then describes this answer
        logprobs: list[float] | None = [] if config.logprobs else None
        self.token_logprobs = logprobs or []
        try:
            if budget <= 0 or (cancel is not None and cancel.is_set()):
                stats.stop_reason = "cancelled" if budget > 0 else "length"
                return
            last = self._forward(tokens, 0)[-1]  # prefill
            while True:
                token = sampler.sample(last)
                clock.token(stats)
                if token in chat.eos_ids:
                    stats.stop_reason = "stop"
                    break
                if logprobs is not None:
                    logprobs.append(float(torch.log_softmax(last.float(), dim=-1)[token]))
                self.tokens.append(token)
                stats.completion_tokens += 1
                piece = detok.add(token)
                if piece:
                    yield piece
                if stats.completion_tokens >= budget:
                    break
                # Checked before the next forward pass, so nothing is computed after a stop.
                if cancel is not None and cancel.is_set():
                    stats.stop_reason = "cancelled"
                    break
                last = self._forward([token], len(self.tokens) - 1, len(tokens))[-1]
            tail = detok.flush()
            if tail:
                yield tail
        except GeneratorExit:
            stats.stop_reason = "cancelled"
            raise
        finally:
            clock.finish(stats, logprobs)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self._ckpt is not None:
            self._ckpt.close()
        self.model = self.store = self._ckpt = None
        self._step = None  # it holds the model's tensors


# --- tokenizer, detokenizer, sampler ----------------------------------------------------------------------


class ChatTokenizer:
    """A checkpoint's `tokenizer.json` (through `tokenizers`) and the chat template of `tokenizer_config.json`."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (model_dir / name).is_file():
                raise LocalmoeError(f"{model_dir} has no {name}: the torch engine needs the tokenizer to chat")
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise LocalmoeError(f"cannot read {model_dir / 'tokenizer.json'}: {str(e).splitlines()[0]}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        jinja = model_dir / "chat_template.jinja"  # where transformers >= 4.43 saves the template
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos: set[int] = set()
        if self.eos_token and (i := self.tokenizer.token_to_id(self.eos_token)) is not None:
            eos.add(i)
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            ids = _read_json(gen).get("eos_token_id")
            eos.update(i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int))
        self.eos_ids = frozenset(eos)

    def render(self, messages: list[Message]) -> str:
        return chat_template.render(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        # As transformers' apply_chat_template: the template writes any BOS itself, so no special tokens are added.
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalmoeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LocalmoeError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class IncrementalDetokenizer:
    """Text pieces for tokens one at a time, never splitting a multi-byte character.

    Decodes the window from the last emitted boundary: the new text is what the window adds to the previous one,
    held back while it ends in an incomplete character (U+FFFD). Decoding a window rather than single tokens
    also keeps decoders that drop a leading space (sentencepiece's Metaspace) right mid-text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] produced the last piece; ids[read:] are not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prev = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end decodes as U+FFFD)."""
        prev = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :] if len(text) > len(prev) else ""


class Sampler:
    """Greedy at temperature 0; otherwise llama.cpp's order: top-k, top-p (on the untempered distribution),
    temperature, then a draw from a generator seeded with `seed` (random when None)."""

    def __init__(self, config: GenerationConfig) -> None:
        self.temperature, self.top_k, self.top_p = config.temperature, config.top_k, config.top_p
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def sample(self, logits: Tensor) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits.float()
        if 0 < self.top_k < logits.numel():
            values, idx = torch.topk(logits, self.top_k)  # sorted, descending
        else:
            values, idx = torch.sort(logits, descending=True)
        if 0 < self.top_p < 1:
            probs = values.softmax(-1)
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            keep = int((probs.cumsum(-1) < self.top_p).sum()) + 1
            values, idx = values[:keep], idx[:keep]
        probs = (values / self.temperature).softmax(-1)
        return int(idx[torch.multinomial(probs, 1, generator=self.generator)])
