"""A whole one-token decode step in one native call (`lm_step_f32` of moe_kernels.c), for a float32 model on the CPU
whose experts are all resident: the torch path's Python between the kernels, not the kernels, was the gap to
llama.cpp. Reads the model's resolved `ModelArgs` and its tensors in place; knows nothing of the engine."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

import localmoe.engine.torch_moe.kernels as kernels

MAX_TOP_K = 64  # lm_step_f32's per-layer arrays
_P = ctypes.c_void_p


class DecodeStep:
    """One-token decode of a whole model in one native call, built from the torch model's own tensors (weights, KV
    cache, RoPE tables) and used in place: the torch path and this one can alternate on the same sequence.

    `decode_step` returns None where the step does not apply (see `why_not`); the experts' addresses are read
    once, so the engine uses it only while no expert can move (every slot of every layer filled, none evictable)."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, experts: list[list[tuple[Tensor, Tensor]]]) -> None:
        a = model.args
        self._lib, self._model, self.top_k, self.n_layers = lib, model, a.top_k, a.n_layers
        self._keep = experts  # the addresses below point into these

        def ptr(t: Tensor | None) -> int | None:
            return t.data_ptr() if t is not None else None

        # per layer, in the order of moe_kernels.c's P_* indices
        layer_ptrs: list[int | None] = []
        for block in model.layers:
            at = block.attention
            layer_ptrs += [ptr(block.attention_norm.weight), ptr(at.wqkv), ptr(at.bqkv),
                           ptr(at.q_norm.weight) if at.q_norm is not None else None,
                           ptr(at.k_norm.weight) if at.k_norm is not None else None, ptr(at.wo),
                           ptr(block.ffn_norm.weight), ptr(block.moe.router),
                           ptr(at.kv_cache.k_cache), ptr(at.kv_cache.v_cache)]
        gate_up = [gu.data_ptr() for layer in experts for gu, _ in layer]
        down = [d.data_ptr() for layer in experts for _, d in layer]
        self._cfg = kernels.StepConfig.from_args(a)
        self._layers = (_P * len(layer_ptrs))(*layer_ptrs)
        self._gate_up, self._down = (_P * len(gate_up))(*gate_up), (_P * len(down))(*down)
        q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self._scratch = torch.zeros(3 * a.dim + 2 * q_out + 2 * kv_out + a.n_experts + a.top_k * a.expert_ff
                                    + a.n_heads * a.max_seq_length)
        self._chosen = (ctypes.c_int * (a.n_layers * a.top_k))()

    @staticmethod
    def why_not(model: torch.nn.Module) -> str | None:
        """Why the native step cannot run this model (None: it can, once its experts are all resident)."""
        a = model.args
        if a.shared_expert:
            return "shared experts are not in the native step"
        if a.top_k > MAX_TOP_K or a.head_dim % 2 or a.n_heads % a.n_kv_heads:
            return "shape outside the native step"
        tensors = [model.tok_embeddings, model.output, model.norm.weight, model.cos, model.sin]
        for block in model.layers:
            at = block.attention
            tensors += [at.wqkv, at.wo, block.moe.router, block.attention_norm.weight, block.ffn_norm.weight,
                        at.kv_cache.k_cache, at.kv_cache.v_cache]
            tensors += [t for t in (at.bqkv,) if t is not None]
        for t in tensors:
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                return "a dense weight is not a contiguous float32 CPU tensor"
        return None

    def __call__(self, token: int, pos: int) -> Tensor:
        """Logits (1, vocab) of `token` at position `pos`; the KV cache gets its keys and values at `pos`."""
        m = self._model
        logits = torch.empty(1, m.args.vocab_size)
        self._cfg.threads = torch.get_num_threads()
        self._lib.lm_step_f32(ctypes.byref(self._cfg), self._layers, self._gate_up, self._down,
                              m.tok_embeddings[token].data_ptr(), m.norm.weight.data_ptr(), m.output.data_ptr(),
                              m.cos[pos].data_ptr(), m.sin[pos].data_ptr(), pos, logits.data_ptr(), self._chosen,
                              self._scratch.data_ptr())
        return logits

    def chosen(self) -> list[list[int]]:
        """The experts each layer used in the last step, ascending."""
        k = self.top_k
        flat = list(self._chosen)
        return [flat[i * k:(i + 1) * k] for i in range(self.n_layers)]


def decode_step(model: torch.nn.Module, experts: list[list[tuple[Tensor, Tensor]]]) -> DecodeStep | None:
    """A DecodeStep over `experts` (per layer, every expert's (gate_up, down) in id order), or None where the
    native library or the model rules it out."""
    lib = kernels.library()
    if lib is None or DecodeStep.why_not(model) is not None:
        return None
    if any(not kernels.usable(model.tok_embeddings[:1], mats) for layer in experts for mats in layer):
        return None
    return DecodeStep(lib, model, experts)
