"""The torch engine: loads a checkpoint into the model and its expert store, then runs the loop that turns a chat
into tokens (prefill, then one token at a time through the KV cache) and reports what the expert cache did.

Dense weights (embeddings, attention, norms, routers) are read once; each expert's three matrices are read from
the safetensors files only when the router picks it and it is not cached. transformers is the test oracle only;
nothing here imports it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import localmoe.engine.torch_moe.compiled as compiled
import localmoe.engine.torch_moe.kernels as kernels
from localmoe.engine.base import (
    DecodeClock,
    Engine,
    GenerationConfig,
    GenerationStats,
    Message,
    default_threads,
    fit_context,
    limits,
    reusable_prefix,
    stop_after,
)
from localmoe.engine.torch_moe.checkpoint import Checkpoint, DenseWeights, expert_loader
from localmoe.engine.torch_moe.config import ModelArgs
from localmoe.engine.torch_moe.device import plan_for, resolve_device
from localmoe.engine.torch_moe.expert_store import ExpertStore, ExpertWeights
from localmoe.engine.torch_moe.gguf_checkpoint import (
    GGUFCheckpoint,
    GGUFDenseWeights,
    expert_types,
    gguf_expert_loader,
    read_view,
)
from localmoe.engine.torch_moe.model import TraceReplay, Transformer
from localmoe.engine.torch_moe.options import TorchOptions
from localmoe.engine.torch_moe.quant import int8_linear_available
from localmoe.engine.torch_moe.sampling import Sampler
from localmoe.engine.torch_moe.step import DecodeStep, ExpertTable, decode_step
from localmoe.engine.torch_moe.tokenizer import ChatTokenizer, GGUFChatTokenizer, IncrementalDetokenizer
from localmoe.errors import LocalmoeError
from localmoe.experts.trace import Trace, TraceToken
from localmoe.placement.plan import PACKED, CheckpointPlan


class TorchMoEEngine(Engine):
    """Runs a Hugging Face MoE checkpoint directory through a tiered expert cache (see expert_store).

    How it runs is a `TorchOptions` (options.py: expert slots, memory budgets, cache policy, prefetch, dtypes,
    device, adaptive expert count, compile, kernels), given as `options` or as keyword arguments of the same names,
    which override it. `telemetry` records the experts of every token in `routing`; `max_seq_length` bounds the
    context (default 2048, or the model's own when shorter).

    On the CPU with float32 or packed (GGUF) experts, a one-token decode step runs whole in native code
    (step.DecodeStep; `cache_stats()["decode_step"]`), misses resolved through the store, adaptive top-p and a
    benchmark's replayed trace included, unless compiled or with kernels="torch" (`set_kernels`). On a GPU a
    GGUF's experts stay packed in VRAM and are dequantised by torch where used (torch_dequant.py; its dense weights
    are float32 there): `device="cuda"`, as the CPU keeps GGUF files by default."""

    backend = "torch"  # as ModelRef.backend and create_engine name it

    def __init__(
        self,
        model_dir: str | Path,
        options: TorchOptions | None = None,
        *,
        max_seq_length: int | None = None,
        model_id: str | None = None,
        telemetry: bool = False,
        **overrides: Any,
    ) -> None:
        self.model_dir = Path(model_dir)
        # a name that is no option is a TypeError, as for any keyword argument; a bad value a LocalmoeError
        self.options = replace(options or TorchOptions(), **overrides)
        self.plan: CheckpointPlan | None = None
        self.model_id = model_id or self.model_dir.name
        self.max_seq_length, self.telemetry = max_seq_length, telemetry
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
        # the tokens whose keys and values the KV cache holds, from position 0: a call evaluates only what follows
        # its longest common prefix with them
        self._kv: list[int] = []
        self.token_logprobs: list[float] = []
        self.routing: list[TraceToken] = []  # with telemetry: experts per layer of each token evaluated
        self.forward_calls = 0  # model calls (prefill or one decode step) since load, for tests and benchmarks
        # the whole decode step in one native call (None: not built yet, False: never)
        self._step: DecodeStep | bool | None = None
        self._synced: list[int] = []  # per layer: the store's version the step's expert table has
        self.native_steps = 0  # decode steps that ran there, for tests and benchmarks

    def load(self) -> None:
        if self.model is not None:
            return
        o = self.options
        if os.environ.get("LOCALMOE_THREADS"):  # the same cap as llama.cpp's (torch's pool is process-wide)
            torch.set_num_threads(default_threads())
        view = None
        if o.device_packed and not self.is_gguf:
            raise LocalmoeError("device_packed applies to GGUF files only")
        if self.is_gguf:
            # on a GPU (device_packed) bfloat16 is what its experts are dequantised to and computed in
            gpu = o.device_packed or (o.device is not None and not o.device.startswith("cpu"))
            if o.expert_dtype not in (("float32", "bfloat16") if gpu else ("float32",)):
                raise LocalmoeError(f"{self.model_dir.name}'s experts stay in the file's quantisation: "
                                    f"expert_dtype {o.expert_dtype} applies to Hugging Face checkpoints only"
                                    f"{'' if gpu else ' (and bfloat16 to a GGUF on a GPU)'}")
            view = read_view(self.model_dir)
            config = view[0]
        else:
            config = _read_config(self.model_dir)
        expert_dtype = PACKED if view else o.expert_dtype
        args = ModelArgs.from_config(config, self.max_seq_length)
        # a GGUF runs on the CPU unless a device is asked for: its native packed kernels are CPU code
        device = "cpu" if view and o.device is None else resolve_device(o.device)
        if view and o.compile:
            raise LocalmoeError("compile is not available for GGUF files in the native engine (their packed "
                                "matrices are opaque to torch.compile)")
        # a GGUF off the CPU (or forced, for tests): experts as the file's bytes in the fast tier, dequantised by
        # torch where used (torch_dequant.py) to float32 or bfloat16 (expert_dtype) and computed in it; dense weights
        # dequantised once to float32 on the device
        device_packed = bool(view) and (o.device_packed or device != "cpu")
        ckpt = GGUFCheckpoint(self.model_dir, device, view) if view else Checkpoint(self.model_dir, device)
        try:
            slots, warm = o.expert_slots, 0
            if slots is None or device != "cpu":
                self.plan = plan_for(self.model_dir, config, ckpt.tensors, o.fast_memory, args.max_seq_length,
                                     device=device, expert_dtype=expert_dtype, warm_memory=o.warm_memory,
                                     fast_slots=slots)
                if slots is None:
                    self.plan.raise_if_refused()
                    slots = self.plan.slots_per_layer
                warm = self.plan.warm_slots_per_layer
            # By default only where loads come from disk into CPU RAM and the native decode step cannot run: on the
            # torch path an exact prediction saved a quarter of the decode time under a memory cap, but the native
            # step without prefetch decodes ~1.5x faster than the torch path with it (benchmarks/RESULTS.md, product
            # path); on a GPU prefetch has measured slower even when right, and resident has nothing to load.
            native = (device == "cpu" and o.kernels == "native" and expert_dtype in ("float32", PACKED)
                      and not o.compile and not device_packed and kernels.available())
            prefetch = o.prefetch if o.prefetch is not None else device == "cpu" and slots < args.n_experts \
                and not native and not device_packed
            # every expert fits: the page cache is reclaimable memory the plan did not need, and keeping the files
            # there lets the next process (the next `ask`) read them at memory speed
            ckpt.keep_page_cache = slots >= args.n_experts and device == "cpu"
            loader = gguf_expert_loader(ckpt, args) if isinstance(ckpt, GGUFCheckpoint) else expert_loader(ckpt, args)
            store = ExpertStore(loader, args.n_layers, args.n_experts, slots,
                                policy=o.cache_policy, expert_dtype=expert_dtype, device=device,
                                warm_slots=warm, prefetch=prefetch,
                                dequant_on_use=(o.expert_dtype if device_packed else None))
            if o.dense_dtype == "int8" and device != "cpu":
                raise LocalmoeError(f"dense dtype int8 runs on the CPU only, and this engine is on {device} "
                                    "(add --device cpu)")
            if o.dense_dtype == "int8" and not int8_linear_available():
                raise LocalmoeError("dense dtype int8 needs a torch with dynamic int8 kernels, which this one lacks")
            with torch.inference_mode():
                dense = GGUFDenseWeights(ckpt, args, packed=not device_packed) if view else DenseWeights(ckpt, args)
                model = Transformer(args, dense, store).eval()
                if o.dense_dtype == "int8":
                    model.quantize_dense()
            ckpt.release_mmaps()
            ckpt.drop_page_cache()
        except BaseException:
            ckpt.close()
            raise
        for moe in model.moes:
            moe.top_p = o.expert_top_p
        self.args, self._ckpt, self.store, self.model = args, ckpt, store, model
        self.device = torch.device(device)
        self._use_kernels()
        self._run = model
        if o.compile:
            self._run = compiled.compile_model(model, self.device)
            self._compile_now()
        if o.load_all if o.load_all is not None else store.slots == args.n_experts:
            store.fill_in_background()

    def set_kernels(self, kernels: str) -> None:
        """"native" (the default: the engine's own C kernels where they build and apply) or "torch" (torch's kernels
        only, as on a machine without a C compiler), from the next forward pass on."""
        self.options = replace(self.options, kernels=kernels)
        if self.model is not None:
            self._use_kernels()

    def _use_kernels(self) -> None:
        """One-token float32 experts on the CPU in one native call per layer (kernels.py) where the library builds,
        and the whole decode step in native code (step.py), misses of a partial cache resolved from it."""
        o, model, store = self.options, self.model, self.store
        assert model is not None and store is not None
        use_native = (o.kernels == "native" and str(self.device) == "cpu" and o.expert_dtype == "float32"
                      and not store.dequant_on_use and kernels.available())
        for moe in model.moes:
            moe.native = use_native
        # a compiled or prefetching engine keeps its torch path (DecodeStep.why_not rules out the rest)
        native_step = use_native and not o.compile and not store.prefetching
        self._step = None if native_step else False

    def _compile_now(self) -> None:
        """Compile at load (a 2-token prompt, then one decode step) rather than inside the first answer's timing;
        the KV cache rows written here are overwritten by every later sequence, and the counters are reset."""
        dev = self.device
        with torch.inference_mode():
            self._call(torch.zeros((1, 2), dtype=torch.long, device=dev), torch.arange(0, 2, device=dev), 2)
            self._call(torch.zeros((1, 1), dtype=torch.long, device=dev), torch.arange(2, 3, device=dev), 3)
        self._kv = []
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

    def moe_shape(self) -> tuple[int, int, int] | None:
        self.load()
        return self.args.n_layers, self.args.n_experts, self.args.top_k

    def cache_stats(self) -> dict[str, Any]:
        """Expert-cache counters since load, the start of the last streamed answer or reset_cache_stats: totals,
        then `layers` with one dict each."""
        store, o = self.store, self.options
        total = store.totals().to_dict() if store else {}
        return {
            "slots": store.slots if store else None,
            "warm_slots": store.warm_slots if store else None,
            "policy": o.cache_policy,
            "prefetch": store.prefetching if store else None,
            "expert_dtype": store.expert_dtype if store else o.expert_dtype,  # "packed": a GGUF's own types
            "device": str(self.device),
            "compiled": o.compile,
            "expert_kernel": self._expert_kernel(),
            # "native": one-token steps run whole in native code, else in torch
            "decode_step": "native" if self._step else "torch",
            # the options in effect: as given, with what load chose where they were left to it
            "options": {**o.to_dict(), **({"expert_slots": store.slots, "prefetch": store.prefetching,
                                           "device": str(self.device)} if store else {})},
            **total,
            # prediction_precision: the share of the layer's recent predicted loads it used (prefetch gates on it)
            "layers": [{**s.to_dict(), "prediction_precision": round(p, 3) if store.prefetching and n else None}
                       for s, p, n in zip(store.stats, store.precision, store.scored, strict=True)] if store else [],
        }

    def expert_cache_counts(self) -> list[dict[str, list[int]]] | None:
        store = self.store
        return [store.per_expert(layer) for layer in range(len(store.stats))] if store else None

    def _expert_kernel(self) -> str:
        """What computes a decode step's experts: "native" (kernels.py) or torch's kernels (and why)."""
        if self.model is not None and self.model.moes and self.model.moes[0].native:
            return "native"
        if self.store is not None and self.store.dequant_on_use:
            return f"torch (packed experts dequantised to {self.store.dequant_on_use} on use)"
        if self.options.kernels == "torch":
            return "torch (kernels=torch)"
        if self.device.type != "cpu" or self.options.expert_dtype != "float32":
            return "torch"
        return kernels.kernels()

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
        self.options = replace(self.options, expert_top_p=top_p)
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

    def _forward(self, tokens: list[int], start: int, n_prompt: int | None = None, last: bool = False) -> Tensor:
        """Logits (len(tokens), vocab) on the CPU for `tokens` at positions start... (`last`: the last row only, all
        a prompt needs); telemetry marks the positions below `n_prompt` as prompt."""
        model = self._model()
        end = start + len(tokens)
        if end > model.args.max_seq_length:
            raise LocalmoeError(f"{end} tokens exceed the engine's context of {model.args.max_seq_length}")
        bad = [t for t in tokens if not 0 <= t < model.args.vocab_size]
        if bad:
            raise LocalmoeError(f"token id {bad[0]} is outside the vocabulary (0..{model.args.vocab_size - 1})")
        self.forward_calls += 1
        dev = self.device
        # rows from `start` on are overwritten now: if this call fails half-way they hold nothing reusable
        held = start <= len(self._kv)
        del self._kv[start:]
        step = self._native_step() if len(tokens) == 1 else None
        if step is not None:
            replay = model.moes[0].replay
            forced = [moe.replay.take(moe.layer, 1)[0].tolist() for moe in model.moes] if replay else None
            out = step(tokens[0], start, forced)
            self._count_native_step(step)
        else:
            if isinstance(self._step, DecodeStep):
                # the torch path loads and evicts experts the table would keep alive: under a memory cap a prompt
                # would hold a second cache's worth of experts (killed by the cap in a chat's second turn)
                self._step.table.clear()
                self._synced = [-1] * model.args.n_layers
            with torch.inference_mode():
                out = self._call(torch.tensor([tokens], device=dev), torch.arange(start, end, device=dev), end, last)
        if held:
            self._kv += tokens
        if self.telemetry:
            per_layer = [[[e for e in row if e >= 0] for row in moe.last_topk.tolist()] for moe in model.moes
                         if moe.last_topk is not None]
            n_prompt = end if n_prompt is None else n_prompt
            for i, token in enumerate(tokens):
                pos = start + i
                self.routing.append(TraceToken(pos, token, "prompt" if pos < n_prompt else "decode",
                                               [layer[i] for layer in per_layer]))
        return out.float().cpu() if out.device.type != "cpu" else out

    def _native_step(self) -> DecodeStep | None:
        """The native decode step where it applies now (see _use_kernels). Its expert table is first brought up to
        date with every layer whose cache changed since (loads, evictions, the background fill)."""
        if self._step is False:
            return None
        model, store = self._model(), self.store
        assert store is not None
        if self._step is None:
            qtypes = expert_types(self._ckpt, model.args) if isinstance(self._ckpt, GGUFCheckpoint) else None
            self._step = decode_step(model, ExpertTable(model.args.n_layers, model.args.n_experts),
                                     self._resolve, qtypes) or False
            # what the table may point to, checked at every sync: packed bytes, or float32 for one-token activations
            self._table_usable = _packed_usable if store.expert_dtype == PACKED else \
                partial(kernels.usable, torch.zeros(1, model.args.dim))
            self._synced = [-1] * model.args.n_layers
        if self._step:
            for layer, version in enumerate(store.versions):
                if version != self._synced[layer]:
                    self._sync(layer)
        return self._step or None

    def _sync(self, layer: int, using: dict[int, ExpertWeights] | None = None) -> None:
        """The native step's table for `layer` as its cache is now, plus the experts `using` (fewer slots than
        experts per token: the step's own experts may have left the cache already, as in the torch path, which
        holds each while it computes); the table then drops them at the next step."""
        assert self.store is not None and isinstance(self._step, DecodeStep)
        version, resident = self.store.resident(layer)
        entries = dict(resident)
        extra = {e: w for e, w in (using or {}).items() if e not in entries}
        entries.update(extra)
        mats = [(expert, w.mats) for expert, w in entries.items()]
        if not all(self._table_usable(m) for _, m in mats):
            raise LocalmoeError(f"layer {layer}'s experts are not matrices the native step can read")
        self._step.table.sync(layer, mats)
        self._synced[layer] = -1 if extra else version

    def _resolve(self, layer: int, experts: list[int]) -> None:
        """A miss in the native step: the layer's chosen experts through the store as the torch path takes them
        (loaded, counted, the rest of the layer's cache kept per the policy), then into the table."""
        store = self.store
        assert store is not None
        store.begin_step(layer, experts, 1)
        try:
            using = {expert: store.get(layer, expert) for expert in experts}
        finally:
            store.end_step(layer)
        st = store.stats[layer]
        st.tokens += 1
        st.experts_used += len(experts)
        self._sync(layer, using)

    def _count_native_step(self, step: DecodeStep) -> None:
        """The statistics the torch path keeps per layer: the layers that resolved a miss counted themselves."""
        self.native_steps += 1
        chosen = step.chosen()
        assert self.store is not None
        self.store.count_resident_steps(chosen, step.resolved)
        if self.telemetry:
            for moe, ids in zip(self._model().moes, chosen, strict=True):
                moe.last_topk = torch.tensor([ids])

    def _call(self, idx: Tensor, pos: Tensor, end: int, last: bool = False) -> Tensor:
        """The model (compiled or not) on one sequence: logits (n, vocab), or (1, vocab) with `last`."""
        if not self.options.compile:  # importing torch._dynamo costs ~50 MiB of RAM: only a compiled engine needs it
            return self._run(idx, pos, end, last)[0]
        # one compiled graph for every prompt: the head on all rows costs less than compiling a second graph
        out = compiled.call(self._run, idx, pos, end)[0]
        return out[-1:] if last else out

    def logits(self, token_ids: list[int], reuse: bool = False) -> np.ndarray:
        """Logits (n_tokens, vocab) for a fresh sequence; the KV cache is overwritten from position 0.

        `reuse`: evaluate only the tokens after the longest common prefix with what the KV cache holds (at least the
        last one) and return only their rows, as a chat's next turn does."""
        tokens = list(token_ids)
        start = reusable_prefix(self._kv, tokens) if reuse else 0
        return self._forward(tokens[start:], start).numpy()

    def decode_logits(self, token_ids: list[int], n_steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy decode: prefill, then one token at a time through the KV cache.

        Returns the n_steps chosen tokens and the (n_steps, vocab) logits each was chosen from (row 0 is the
        prefill's last row).
        """
        last = self._forward(list(token_ids), 0, last=True)[-1]
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
            self._chat = GGUFChatTokenizer(self.model_dir) if self.is_gguf else ChatTokenizer(self.model_dir)
        return self._chat

    @property
    def is_gguf(self) -> bool:
        """A GGUF MoE file (experts kept in its quantisation), not a Hugging Face checkpoint directory."""
        return self.model_dir.suffix.lower() == ".gguf" and not self.model_dir.is_dir()

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return self.chat_tokenizer().encode_chat(messages)

    def _stream(
        self, messages: list[Message], config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[str]:
        clock = DecodeClock()  # from here: template rendering and tokenising count towards the first token
        chat = self.chat_tokenizer()
        stats = self._stats = GenerationStats(stop_reason="length")  # this answer's, also if loading fails
        model = self._model()
        if config.fit_context:
            messages, tokens, stats.dropped_exchanges = fit_context(messages, chat.encode_chat,
                                                                    model.args.max_seq_length, config.max_tokens)
        else:
            tokens = chat.encode_chat(messages)
        stats.prompt_tokens = len(tokens)
        if not tokens:
            stats.stop_reason = "error"
            raise LocalmoeError("the chat template rendered an empty prompt")
        budget, guard = limits(stats, model.args.max_seq_length, self.model_id, config)
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
            start = reusable_prefix(self._kv, tokens)  # an earlier turn's keys and values, kept
            stats.prompt_eval_tokens = len(tokens) - start
            last = self._forward(tokens[start:], start, len(tokens), last=True)[-1]  # prefill
            while True:
                # as llama.cpp's sampler: only the answer's own tokens count towards the repeat penalty
                token = sampler.sample(last, self.tokens[len(tokens):])
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
                if stop_after(token, piece, stats, budget, guard, cancel):
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
        self._kv = []



def _read_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise LocalmoeError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LocalmoeError(f"{config_path} is not valid JSON: {e}") from None


def _packed_usable(mats: tuple[Tensor, ...]) -> bool:
    return all(m.dtype == torch.uint8 and m.device.type == "cpu" and m.is_contiguous() for m in mats)
