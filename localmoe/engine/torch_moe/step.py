"""A whole one-token decode step in one native call (`lm_step_f32` of moe_kernels.c), for a float32 model on the CPU:
the torch path's Python between the kernels, not the kernels, was the gap to llama.cpp. The experts' addresses are
an `ExpertTable`; with a partial cache, an expert missing from it is resolved by a callback into Python, so only a
miss leaves native code. Reads the model's resolved `ModelArgs` and its tensors in place; knows nothing of the
engine or the expert store."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

import localmoe.engine.torch_moe.kernels as kernels
from localmoe.engine.torch_moe.packed import PackedLinear

MAX_TOP_K = 64  # lm_step_f32's per-layer arrays
_P = ctypes.c_void_p
Mats = tuple[Tensor, Tensor]  # an expert's (gate and up stacked, down): float32, or packed bytes; contiguous


class ExpertTable:
    """The addresses `lm_step_f32` reads, per (layer, expert): NULL where the expert is not resident. Holds a
    reference to every tensor it points to, so an expert the cache evicts stays valid until the table lets it go
    (`sync`, on the thread that runs the step)."""

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.n_experts = n_experts
        self.gate_up = (_P * (n_layers * n_experts))()
        self.down = (_P * (n_layers * n_experts))()
        self._held: list[dict[int, Mats]] = [{} for _ in range(n_layers)]

    def sync(self, layer: int, resident: Iterable[tuple[int, Mats]]) -> None:
        """Make `layer`'s entries exactly the `resident` experts."""
        held, now = self._held[layer], dict(resident)
        for expert in held.keys() - now.keys():
            i = layer * self.n_experts + expert
            self.gate_up[i] = self.down[i] = None
        for expert, mats in now.items():
            if held.get(expert) is not mats:
                i = layer * self.n_experts + expert
                self.gate_up[i], self.down[i] = mats[0].data_ptr(), mats[1].data_ptr()
        self._held[layer] = now

    def clear(self) -> None:
        """Point nowhere and let every expert go (the next step re-syncs the layers it needs)."""
        for layer in range(len(self._held)):
            self.sync(layer, ())

    def held(self) -> int:
        """How many experts the table keeps alive."""
        return sum(len(h) for h in self._held)



# (layer, its chosen experts ascending) -> makes them resident and syncs the table; raises to abandon the step
Resolver = Callable[[int, list[int]], None]


class DecodeStep:
    """One-token decode of a whole model in one native call, built from the torch model's own tensors (weights, KV
    cache, RoPE tables) and used in place: the torch path and this one can alternate on the same sequence.

    `decode_step` returns None where the step does not apply (see `why_not`). The experts' addresses come from
    `table`; a chosen expert missing there is handed to `resolve`, which must make it resident and sync the table."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, table: ExpertTable, resolve: Resolver,
                 qtypes: list[tuple[int, int]] | None = None) -> None:
        a = model.args
        self._lib, self._model, self.top_k, self.n_layers = lib, model, a.top_k, a.n_layers
        self.table, self._resolve = table, resolve
        self.resolved: list[int] = []  # the layers the last step resolved (their cache counted them already)
        self._error: BaseException | None = None
        self._callback = kernels.RESOLVE(self._on_miss)  # kept: C holds its address during every step

        def ptr(t: Tensor | PackedLinear | None, part: int = 0) -> int | None:
            if isinstance(t, PackedLinear):
                return t.parts[part][1].data_ptr()
            return t.data_ptr() if t is not None and part == 0 else None

        # per layer, in the order of moe_kernels.c's P_* indices
        layer_ptrs: list[int | None] = []
        dense_types: list[int] = []
        for block in model.layers:
            at = block.attention
            layer_ptrs += [ptr(block.attention_norm.weight), ptr(at.wqkv), ptr(at.bqkv),
                           ptr(at.q_norm.weight) if at.q_norm is not None else None,
                           ptr(at.k_norm.weight) if at.k_norm is not None else None, ptr(at.wo),
                           ptr(block.ffn_norm.weight), ptr(block.moe.router),
                           ptr(at.kv_cache.k_cache), ptr(at.kv_cache.v_cache), ptr(at.wqkv, 1), ptr(at.wqkv, 2)]
            shared = block.moe.shared
            layer_ptrs += [ptr(t) for t in shared] + [ptr(block.moe.shared_expert_gate)] if shared else [None] * 4
            if isinstance(at.wqkv, PackedLinear) and isinstance(at.wo, PackedLinear):
                dense_types += [t for t, _, _ in at.wqkv.parts] + [at.wo.parts[0][0]]
        self._cfg = kernels.StepConfig.from_args(a)
        self._packed_dense = isinstance(model.output, PackedLinear)
        if self._packed_dense:  # a GGUF's dense matrices, read in the file's types
            self._dense_types = (ctypes.c_int * len(dense_types))(*dense_types)
            self._cfg.dense_types = ctypes.addressof(self._dense_types)
            self._cfg.head_type = model.output.parts[0][0]
        if qtypes is not None:  # packed experts (a GGUF's): each layer's (gate/up, down) ggml types
            self._types = ((ctypes.c_int * a.n_layers)(*(g for g, _ in qtypes)),
                           (ctypes.c_int * a.n_layers)(*(d for _, d in qtypes)))
            self._cfg.gu_types = ctypes.addressof(self._types[0])
            self._cfg.down_types = ctypes.addressof(self._types[1])
        self._layers = (_P * len(layer_ptrs))(*layer_ptrs)
        q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self._scratch = torch.zeros(3 * a.dim + 2 * q_out + 2 * kv_out + a.n_experts + a.top_k * a.expert_ff
                                    + a.n_heads * a.max_seq_length + 2 * a.shared_ff + a.dim)
        self._chosen = (ctypes.c_int * (a.n_layers * a.top_k))()

    @staticmethod
    def why_not(model: torch.nn.Module) -> str | None:
        """Why the native step cannot run this model (None: it can, once its experts are all resident)."""
        a = model.args
        if a.top_k > MAX_TOP_K or a.head_dim % 2 or a.n_heads % a.n_kv_heads:
            return "shape outside the native step"
        tensors = [model.norm.weight, model.cos, model.sin]
        packed = [model.tok_embeddings, model.output]
        for block in model.layers:
            at = block.attention
            tensors += [block.moe.router, block.attention_norm.weight, block.ffn_norm.weight,
                        at.kv_cache.k_cache, at.kv_cache.v_cache]
            tensors += [t for t in (at.bqkv, *(block.moe.shared or ()), block.moe.shared_expert_gate) if t is not None]
            packed += [at.wqkv, at.wo]
        if all(isinstance(m, PackedLinear) for m in packed):  # a GGUF's: q, k, v, then o and the head, one part each
            if any(len(m.parts) != n for m, n in zip(packed[2:], [3, 1] * a.n_layers, strict=True)) or \
                    len(model.output.parts) != 1:
                return "packed dense matrices outside the native step's layout"
        else:
            tensors += packed
        for t in tensors:
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                return "a dense weight is not a contiguous float32 CPU tensor"
        return None

    def __call__(self, token: int, pos: int, forced: list[list[int]] | None = None) -> Tensor:
        """Logits (1, vocab) of `token` at position `pos`; the KV cache gets its keys and values at `pos`. An error
        while resolving a miss (a corrupt file, say) is raised here. `forced`: per layer, the experts to use instead
        of the router's choice (a benchmark replaying a trace; -1 pads)."""
        m = self._model
        logits = torch.empty(1, m.args.vocab_size)
        self._cfg.threads = torch.get_num_threads()
        self._cfg.top_p = m.moes[0].top_p or 0.0  # the adaptive expert count, set on every layer at once
        self.resolved, self._error = [], None
        if forced is not None:
            ids = [e for row in forced for e in row]
            self._forced = (ctypes.c_int * len(ids))(*ids)  # held by the object: C reads it during the call
            self._cfg.forced = ctypes.addressof(self._forced)
        else:
            self._cfg.forced = None
        if self._packed_dense:
            embed = m.tok_embeddings.rows(torch.tensor([token]))[0]  # held until the call returns
            head = m.output.parts[0][1].data_ptr()
        else:
            embed, head = m.tok_embeddings[token], m.output.data_ptr()
        rc = self._lib.lm_step_f32(ctypes.byref(self._cfg), self._layers, self.table.gate_up, self.table.down,
                                   embed.data_ptr(), m.norm.weight.data_ptr(), head,
                                   m.cos[pos].data_ptr(), m.sin[pos].data_ptr(), pos, logits.data_ptr(),
                                   self._chosen, self._scratch.data_ptr(), self._callback)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if rc != 0:
            raise RuntimeError(f"the native decode step found an expert missing after resolving it (code {rc})")
        return logits

    def _on_miss(self, layer: int, experts: ctypes.Array, n: int) -> int:
        """From C, on the step's thread: no exception may cross back into C, so it is kept and raised after."""
        try:
            self._resolve(layer, [experts[i] for i in range(n)])
            self.resolved.append(layer)
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised by __call__
            self._error = e
            return 1

    def chosen(self) -> list[list[int]]:
        """The experts each layer used in the last step, ascending, then -1 for those top-p dropped."""
        k = self.top_k
        flat = list(self._chosen)
        return [flat[i * k:(i + 1) * k] for i in range(self.n_layers)]


def decode_step(model: torch.nn.Module, table: ExpertTable, resolve: Resolver,
                qtypes: list[tuple[int, int]] | None = None) -> DecodeStep | None:
    """A DecodeStep over `table` (its experts checked with `usable` by whoever syncs it), or None where the native
    library or the model rules it out. `qtypes`: per layer, the ggml types of packed experts (None: float32)."""
    lib = kernels.library()
    if lib is None or DecodeStep.why_not(model) is not None:
        return None
    return DecodeStep(lib, model, table, resolve, qtypes)
