"""The model of the torch engine, after gpt-fast's model.py: a `KVCache` with one `update`, plain modules, no
framework layers, built from `ModelArgs` and a mapping of dense weights (no I/O here; checkpoint.py supplies the
weights, and a plain dict does as well in a test).

Weight names: "tok_embeddings", "norm", "output" (absent when tied to the embeddings) and per layer
"layers.{i}.{name}" for each name of LAYER_WEIGHTS the architecture has. Experts are not in the mapping: each MoE
layer asks the expert store for the ones its router picks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import localmoe.engine.torch_moe.kernels as kernels
from localmoe.engine.torch_moe import ggml_quants
from localmoe.engine.torch_moe.config import ModelArgs
from localmoe.engine.torch_moe.handles import Handles
from localmoe.engine.torch_moe.packed import PackedLinear
from localmoe.engine.torch_moe.quant import Int8Linear
from localmoe.errors import LocalmoeError

if TYPE_CHECKING:
    from localmoe.engine.torch_moe.expert_store import ExpertStore

# A layer's dense weights, in the order checkpoint.py reads them; optional ones are absent where the architecture
# has none (q/k norms, qkv biases, the shared expert).
LAYER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "input_layernorm", "post_attention_layernorm", "router",
                 "q_norm", "k_norm", "q_bias", "k_bias", "v_bias",
                 "shared_gate", "shared_up", "shared_down", "shared_expert_gate")


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
        qkv = (w["q_proj"], w["k_proj"], w["v_proj"])
        self.wqkv = PackedLinear.stack(list(qkv)) if isinstance(qkv[0], PackedLinear) else torch.cat(qkv)
        self.bqkv = torch.cat((w["q_bias"], w["k_bias"], w["v_bias"])) if "q_bias" in w else None
        self.wo = w["o_proj"]
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = (q_out, kv_out, kv_out)
        self.per_head_norm = args.qk_norm == "head"
        self.q_norm = RMSNorm(w["q_norm"], args.norm_eps) if "q_norm" in w else None
        self.k_norm = RMSNorm(w["k_norm"], args.norm_eps) if "k_norm" in w else None
        self.kv_cache = KVCache(args.max_seq_length, args.n_kv_heads, args.head_dim, torch.float32)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                native: bool = False) -> Tensor:
        """`native`: the projections through kernels.linear (several float32 tokens on the CPU)."""
        a = self.args
        bsz, seqlen, _ = x.shape
        q, k, v = _linear(x, self.wqkv, self.bqkv, native).split(self.split, dim=-1)
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
        return _linear(y.transpose(1, 2).reshape(bsz, seqlen, a.n_heads * a.head_dim), self.wo, None, native)


class MoE(nn.Module):
    """Route each token to its top experts and sum their outputs, fetching each chosen expert once per call."""

    def __init__(self, args: ModelArgs, layer: int, w: dict[str, Tensor], store: ExpertStore) -> None:
        super().__init__()
        self.args, self.layer, self.router, self.store = args, layer, w["router"], store
        self.shared = (w["shared_gate"], w["shared_up"], w["shared_down"]) if "shared_gate" in w else None
        self.shared_expert_gate = w.get("shared_expert_gate")
        self.top_p: float | None = None  # adaptive expert count (see route)
        self.replay: TraceReplay | None = None  # benchmark switch: route by a recorded trace
        self.last_topk: Tensor | None = None  # (tokens, k) expert ids of the last call, -1 where unused
        # float32 on the CPU with the native library (set by the engine): one-token experts through
        # kernels.moe_decode, a prompt's through kernels.expert_prefill and its dense projections through
        # kernels.linear
        self.native = False
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
        if self.args.renormalise:
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
                    # all of the layer's experts in one call of the native kernel (kernels.py)
                    got = [store.get(self.layer, expert) for expert in experts]
                    # a layer's experts come from one loader in one dtype: the first one's shapes stand for all
                    if kernels.usable(x, got[0].mats) and all(
                            w.dtype == "float32" and w.mats[0].is_contiguous() and w.mats[1].is_contiguous()
                            for w in got):
                        kernels.moe_decode(x, [w.mats for w in got], scales, out)
                    elif (q := got[0].qtypes) is not None and all(w.qtypes == q for w in got):
                        ggml_quants.moe_decode(q[0], q[1], x, [w.mats for w in got], scales, out)
                    else:
                        for w, s in zip(got, scales, strict=True):
                            w.ffn_add(x, s, out)
                else:
                    for expert, s in zip(experts, scales, strict=True):
                        store.get(self.layer, expert).ffn_add(x, s, out)
            else:
                stats.experts_used += int((idx >= 0).sum())
                self._prompt_experts(x, weights, idx, experts, out)
        finally:
            store.end_step(self.layer)
        return out

    def _prompt_experts(self, x: Tensor, weights: Tensor, idx: Tensor, experts: list[int], out: Tensor) -> None:
        """Several tokens: each expert once over all the tokens routed to it, in ascending expert order (each
        output row sums its experts in that order, whatever the cache held)."""
        n_slots = idx.shape[1]
        flat = idx.reshape(-1)
        # the (token, slot) pairs grouped by expert, tokens ascending within each (stable): one sort per layer
        # rather than a search per expert; dropped slots (-1, adaptive top-p) sort first and are skipped
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat + 1, minlength=self.args.n_experts + 1).tolist()
        tokens = torch.div(order, n_slots, rounding_mode="floor")
        scales = weights.reshape(-1)[order]
        starts = list(accumulate(counts))  # expert e's pairs: [starts[e], starts[e + 1])
        tokens32 = tokens.to(torch.int32) if self.native else tokens
        for expert in experts:
            lo, hi = starts[expert], starts[expert + 1]
            w = self.store.get(self.layer, expert)
            if self.native and kernels.expert_usable(x, mats := w.float_mats()):
                kernels.expert_prefill(x, mats, tokens32[lo:hi], scales[lo:hi], out)
            else:
                rows = tokens[lo:hi]
                out.index_add_(0, rows, w.ffn(x[rows]) * scales[lo:hi, None])

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
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, _native_prompt(self.moe, x))
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
    def __init__(self, args: ModelArgs, weights: Mapping[str, Tensor], store: ExpertStore) -> None:
        """`weights` may read each tensor as it is asked for (checkpoint.DenseWeights): a layer's weights are taken
        while its block is built, so only one layer's raw q, k and v are held beside the concatenated ones."""
        super().__init__()
        self.args = args
        self.tok_embeddings = weights["tok_embeddings"]
        device = self.tok_embeddings.device  # where the weights are, the buffers go
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, layer_weights(weights, i), store) for i in range(args.n_layers)
        )
        for block, nxt in zip(self.layers[:-1], self.layers[1:], strict=True):
            block.__dict__["next"] = nxt  # a plain reference: registered, it would nest every later layer in this one
            block.moe.__dict__["next_moe"] = nxt.moe
        self.norm = RMSNorm(weights["norm"], args.norm_eps)
        self.output = self.tok_embeddings if args.tie_embeddings else weights["output"]
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

    def forward(self, idx: Tensor, input_pos: Tensor, end: int | None = None, last: bool = False) -> Tensor:
        """Logits for tokens `idx` (1, n) placed at positions `input_pos`; earlier positions come from the KV cache.
        `end` (one past the last position) bounds the attention; default: the whole cache. `last`: the last
        position's logits only (1, 1, vocab), all a prompt's prefill needs: the output head is the largest matrix."""
        mask = self.causal_mask[None, None, input_pos, : end or self.args.max_seq_length]
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        emb = self.tok_embeddings
        x = emb.rows(idx) if isinstance(emb, PackedLinear) else F.embedding(idx, emb)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        native = _native_prompt(self.layers[0].moe, x)  # a prompt's last row too: the kernel streams the head faster
        if last:
            x = x[:, -1:]
        return _linear(self.norm(x), self.output, None, native)

    def quantize_dense(self) -> None:
        """int8 for the big dense matmuls — attention projections and the output head — as llama.cpp's q8_0 has
        them; embeddings, norms and routers stay float32."""
        if isinstance(self.output, PackedLinear):  # a GGUF's: already in the file's quantisation
            return
        self.output = Int8Linear(self.output)
        for block in self.layers:
            block.attention.wqkv = Int8Linear(block.attention.wqkv)
            block.attention.wo = Int8Linear(block.attention.wo)


def _linear(x: Tensor, w: Tensor | Int8Linear | PackedLinear, bias: Tensor | None = None,
            native: bool = False) -> Tensor:
    if isinstance(w, PackedLinear):
        return w(x, bias, native)
    if isinstance(w, Int8Linear):
        y = w(x)
        return y + bias if bias is not None else y
    if native and kernels.linear_usable(x, w, bias):
        return kernels.linear(x, w, bias)
    return F.linear(x, w, bias)


def _native_prompt(moe: MoE, x: Tensor) -> bool:
    """Whether several tokens' dense projections go through kernels.linear: the engine chose the native kernels,
    and the model is not being traced by torch.compile (a ctypes call would split its graph)."""
    return moe.native and x.shape[1] > 1 and not torch.compiler.is_compiling()


def layer_weights(weights: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Layer i's dense weights by their LAYER_WEIGHTS names."""
    names = ((name, f"layers.{i}.{name}") for name in LAYER_WEIGHTS)
    return {name: weights[key] for name, key in names if key in weights}
