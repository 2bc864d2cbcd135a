"""The expert store of the torch engine: expert weights on demand behind per-layer caches, in up to three tiers.

- fast: where the experts are computed — CUDA/MPS memory when the engine runs there, else resident CPU tensors;
- warm: pinned CPU RAM, only when the fast tier is a GPU (a warm hit is a host-to-device copy, not a disk read);
- cold: the checkpoint on disk, read one expert at a time with pread and dropped from the page cache.

Each layer has its own cache of slots per tier, with a replacement policy (layer_cache.py). A background
thread can prefetch the experts the next layer's router predicts from the current hidden state (pre-gating), so
disk reads overlap compute. A wrong prediction costs a read and evicts an expert, so each layer's predictions are
scored against what the layer then used, issued or not, and a layer prefetches only while most of its recent
predictions were right. Only speed depends on slots, policy and prefetch: the weights are always the same.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from localmoe.engine.torch_moe import ggml_quants, torch_dequant
from localmoe.engine.torch_moe.layer_cache import POLICIES, LRUCache
from localmoe.engine.torch_moe.quant import Int8Linear, int8_linear_available, quantize_rows
from localmoe.errors import LocalmoeError
from localmoe.placement.plan import EXPERT_DTYPE_BYTES as EXPERT_DTYPES
from localmoe.placement.plan import PACKED


@dataclass(frozen=True)
class PackedExpert:
    """One expert as a GGUF stores it: gate and up rows stacked (`gu_type`), then down (`down_type`), as bytes;
    `f` the expert's hidden width, `k` the model's."""

    gate_up: Tensor  # uint8
    down: Tensor  # uint8
    gu_type: int  # ggml type ids
    down_type: int
    f: int
    k: int


class ExpertWeights:
    """One expert's matrices in the engine's expert dtype — gate and up stacked into one (one matmul instead of
    two), then down — and the FFN over them.

    int8 is symmetric per output row (absmax / 127): in the CPU fast tier packed for torch's dynamic int8 linear
    (quant.Int8Linear), elsewhere int8 tensors + scales (copied to a GPU and computed there as float). bfloat16 is
    computed in bfloat16. "packed" (a GGUF's experts) keeps the file's quantised bytes: one token is computed on
    them (ggml_quants), several tokens on a float32 copy made for the call. Off the CPU (or with `dequant_on_use`,
    the GPU path forced on the CPU) packed bytes are dequantised by torch where they are (torch_dequant) for every
    call, to float32 or the `dequant_on_use` dtype, and computed in it. Results come back in the activations'
    float32."""

    __slots__ = ("dtype", "mats", "scales", "nbytes", "qtypes", "dequant_on_use")

    def __init__(self, mats: tuple[Tensor, Tensor] | PackedExpert, dtype: str = "float32",
                 packed: bool = False, dequant_on_use: str | None = None) -> None:
        """`mats`: (gate and up stacked on the output rows, down), float32, or a PackedExpert with dtype "packed".
        `packed`: int8 for the CPU kernel. `dequant_on_use` ("float32" or "bfloat16"): a PackedExpert computed the
        GPU path's way (torch dequantisation to that dtype, then its matmuls) even on the CPU."""
        self.dtype = dtype
        self.scales: tuple[Tensor, ...] | None = None
        self.qtypes: tuple[int, int, int, int] | None = None  # packed: (gate/up type, down type, f, k)
        self.dequant_on_use = dequant_on_use if isinstance(mats, PackedExpert) else None
        if isinstance(mats, PackedExpert):
            self.mats = (mats.gate_up, mats.down)
            self.qtypes = (mats.gu_type, mats.down_type, mats.f, mats.k)
            self.nbytes = mats.gate_up.numel() + mats.down.numel()
            return
        if dtype == "int8" and packed and int8_linear_available():
            self.mats: tuple[Any, ...] = tuple(Int8Linear(m) for m in mats)
            self.nbytes = sum(m.nbytes for m in self.mats)
            return
        if dtype == "int8":
            qs = [quantize_rows(m) for m in mats]
            self.mats = tuple(q for q, _ in qs)
            self.scales = tuple(s for _, s in qs)
        else:
            self.mats = tuple(m.to(torch.bfloat16) if dtype == "bfloat16" else m for m in mats)
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.mats, *(self.scales or ())))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExpertWeights:
        if torch.device(device).type == "cpu" and all(isinstance(m, Int8Linear) or m.device.type == "cpu"
                                                      for m in self.mats):
            return self
        out = ExpertWeights.__new__(ExpertWeights)
        out.dtype, out.nbytes, out.qtypes = self.dtype, self.nbytes, self.qtypes
        out.dequant_on_use = self.dequant_on_use
        out.mats = tuple(m.to(device, non_blocking=non_blocking) for m in self.mats)
        out.scales = tuple(s.to(device, non_blocking=non_blocking) for s in self.scales) if self.scales else None
        return out

    def pin(self) -> ExpertWeights:
        out = ExpertWeights.__new__(ExpertWeights)
        out.dtype, out.nbytes, out.qtypes = self.dtype, self.nbytes, self.qtypes
        out.dequant_on_use = self.dequant_on_use
        out.mats = tuple(m.pin_memory() for m in self.mats)
        out.scales = tuple(s.pin_memory() for s in self.scales) if self.scales else None
        return out

    def _linear(self, x: Tensor, i: int) -> Tensor:
        w = self.mats[i]
        if isinstance(w, Int8Linear):
            return w(x)
        if self.scales is not None:
            s = self.scales[i]
            if x.device.type == "cpu":
                return torch._weight_int8pack_mm(x, w, s)
            return F.linear(x, w.to(x.dtype)) * s
        if w.dtype != x.dtype:
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)

    @property
    def on_device(self) -> bool:
        """A packed expert dequantised by torch where its bytes are (the GPU path), not by the native kernels."""
        return self.qtypes is not None and (self.dequant_on_use is not None or self.mats[0].device.type != "cpu")

    def float_mats(self) -> tuple[Tensor, Tensor]:
        """(gate and up, down) as float32 matrices: dequantised for a packed expert (on its device, in the
        `dequant_on_use` dtype there)."""
        if self.qtypes is None:
            return self.mats  # type: ignore[return-value]
        gu_type, down_type, f, k = self.qtypes
        if self.on_device:
            dtype = torch.bfloat16 if self.dequant_on_use == "bfloat16" else torch.float32
            return (torch_dequant.dequantize(gu_type, self.mats[0], (2 * f, k), dtype),
                    torch_dequant.dequantize(down_type, self.mats[1], (k, f), dtype))
        return (ggml_quants.dequantize(gu_type, self.mats[0], (2 * f, k)),
                ggml_quants.dequantize(down_type, self.mats[1], (k, f)))

    def ffn(self, x: Tensor) -> Tensor:
        if self.qtypes is not None:
            gu_type, down_type, f, k = self.qtypes
            if x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu" and not self.on_device:
                # one token: on the packed bytes
                gate, up = ggml_quants.qgemv(gu_type, self.mats[0], x[0].contiguous(), 2 * f, k).chunk(2)
                return ggml_quants.qgemv(down_type, self.mats[1], (F.silu(gate) * up).contiguous(), k, f)[None]
            gate_up, down = self.float_mats()
            gate, up = F.linear(x.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, down).to(x.dtype)
        if self.dtype == "bfloat16":  # stay in bfloat16 between the matmuls
            gate, up = F.linear(x.to(torch.bfloat16), self.mats[0]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.mats[1]).to(x.dtype)
        gate, up = self._linear(x, 0).chunk(2, dim=-1)
        return self._linear(F.silu(gate) * up, 1)

    def ffn_add(self, x: Tensor, weight: float, out: Tensor) -> None:
        """out += weight × ffn(x), fusing the scale and the sum into the down projection's matmul where it can."""
        w = self.mats[1]
        if self.on_device and self.dequant_on_use != "bfloat16" and x.dim() == 2 and x.dtype == torch.float32:
            # dequantised for this call, then dropped
            gate_up, down = self.float_mats()
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            out.addmm_(F.silu(gate).mul_(up), down.t(), alpha=weight)
        elif self.scales is None and self.dtype == "float32" and w.dtype == x.dtype and x.dim() == 2:
            gate, up = F.linear(x, self.mats[0]).chunk(2, dim=-1)
            out.addmm_(F.silu(gate).mul_(up), w.t(), alpha=weight)
        else:
            out.add_(self.ffn(x), alpha=weight)


PREFETCH_SWITCH_INTERVAL_S = 0.0005
# A wasted prefetch costs about what a useful one saves (one expert read, and it may evict an expert still needed):
# below half of the predicted loads used, prefetching loses. The score is an average over the last few decode steps.
PREFETCH_MIN_PRECISION = 0.5
PRECISION_EMA = 0.2
MMAP_THRESHOLD = 1 << 20


def _return_big_blocks_to_the_os() -> None:
    """glibc keeps freed multi-MiB blocks in its heaps (and gives the prefetch thread a heap of its own), so an
    expert cache that evicts and reads experts all day grows its RSS by hundreds of MiB over its budget — fatal
    under a memory cap. A fixed mmap threshold makes every block of 1 MiB or more its own mapping, returned to the
    OS when freed. Linux/glibc only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # musl or another libc: its own policy stands


HIT, MISS, PREFETCH_HIT = range(3)
EXPERT_COUNTERS = ("hits", "misses", "prefetch_hits")  # ExpertStore.per_expert's keys, in that order


@dataclass
class LayerStats:
    hits: int = 0  # uses served from the fast tier (prefetched experts included)
    warm_hits: int = 0  # uses served by a copy from the warm tier (GPU engines only)
    misses: int = 0  # uses that had to read the expert from disk on demand
    prefetch_hits: int = 0  # uses of an expert a prefetch brought or was bringing
    prefetches: int = 0  # experts loaded by the prefetcher
    prefetches_skipped: int = 0  # predicted loads not issued: the layer's recent predictions were mostly wrong
    wasted_prefetches: int = 0  # prefetched experts evicted before any use
    bytes_read: int = 0  # from disk (checkpoint bytes)
    bytes_copied: int = 0  # warm tier -> fast tier
    stall_s: float = 0.0  # time the compute thread waited for expert weights
    tokens: int = 0  # token rows routed through this layer
    experts_used: int = 0  # (token, expert) pairs computed: experts_used / tokens = experts per token

    def add(self, other: LayerStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = dict(asdict(self))
        uses = self.hits + self.warm_hits + self.misses
        d["hit_rate"] = self.hits / uses if uses else None
        d["experts_per_token"] = self.experts_used / self.tokens if self.tokens else None
        return d


# (layer, expert) -> ((gate and up stacked, down) float32, bytes read from disk)
Loader = Callable[[int, int], tuple[tuple[Tensor, Tensor] | PackedExpert, int]]


class ExpertStore:
    """Expert weights on demand for every layer, through the fast (and, on a GPU, warm) tier caches."""

    def __init__(
        self,
        load: Loader,
        n_layers: int,
        n_experts: int,
        slots: int,
        *,
        policy: str = "lru",
        expert_dtype: str = "float32",
        device: torch.device | str = "cpu",
        warm_slots: int = 0,
        prefetch: bool = False,
        prefetch_min_precision: float = PREFETCH_MIN_PRECISION,
        dequant_on_use: str | None = None,
    ) -> None:
        """`dequant_on_use` ("float32" or "bfloat16"): packed experts computed the GPU path's way, in that dtype,
        even on the CPU (ExpertWeights)."""
        if policy not in POLICIES:
            raise LocalmoeError(f"unknown expert cache policy {policy!r} (known: {', '.join(POLICIES)})")
        if expert_dtype not in EXPERT_DTYPES and expert_dtype != PACKED:
            raise LocalmoeError(f"unknown expert dtype {expert_dtype!r} (known: {', '.join(EXPERT_DTYPES)})")
        if slots < 1:
            raise LocalmoeError(f"expert_slots must be at least 1, got {slots}")
        self._load, self.policy, self.expert_dtype = load, policy, expert_dtype
        self.dequant_on_use = dequant_on_use
        self.device = torch.device(device)
        self.slots = min(slots, n_experts)
        self.layers = [POLICIES[policy](self.slots) for _ in range(n_layers)]
        # pinned host memory is a separate tier only for a discrete GPU; MPS shares RAM with the CPU
        self.warm_slots = min(warm_slots, n_experts) if self.device.type == "cuda" else 0
        self.warm = [LRUCache(self.warm_slots) for _ in range(n_layers)] if self.warm_slots else None
        self.stats = [LayerStats() for _ in range(n_layers)]
        self.n_experts = n_experts
        # per layer, per expert: [hits, misses, prefetch hits], for the hardware screen's heat map (misses count the
        # warm tier's copies too: neither was in the fast tier when asked for)
        self.expert_counts = self._zero_counts()
        self.versions = [0] * n_layers  # per layer: bumped whenever an expert enters or leaves its fast tier
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], Future[ExpertWeights]] = {}
        self._unused_prefetch: list[set[int]] = [set() for _ in range(n_layers)]
        self._in_use: list[frozenset[int]] = [frozenset() for _ in range(n_layers)]
        self._predicted: list[frozenset[int]] = [frozenset() for _ in range(n_layers)]
        # per layer: the experts the last prediction would load (not cached, not coming), to score at its next step
        self._candidates: list[frozenset[int]] = [frozenset() for _ in range(n_layers)]
        self.min_precision = prefetch_min_precision
        # per layer: moving average of the fraction of predicted loads the layer then used; starts trusting
        self.precision = [1.0] * n_layers
        self.scored = [0] * n_layers  # predictions scored per layer (layer 0 is never predicted)
        self._copied: dict[tuple[int, int], Any] = {}  # copy-ahead's CUDA event per expert not yet used
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="localmoe-prefetch") if prefetch else None
        if self.slots < n_experts:
            _return_big_blocks_to_the_os()
        if prefetch and sys.getswitchinterval() > PREFETCH_SWITCH_INTERVAL_S:
            # The loader thread holds the GIL between its reads; at CPython's default 5 ms the compute thread
            # could wait that long for it at every layer, more than a prefetch saves.
            sys.setswitchinterval(PREFETCH_SWITCH_INTERVAL_S)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._filler: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def prefetching(self) -> bool:
        return self._pool is not None

    def begin_step(self, layer: int, experts: list[int], tokens: int) -> None:
        """A forward call of `layer` over `tokens` rows is about to use `experts`: they may not be evicted until it
        ends. A one-token step scores the last prediction for this layer (a prompt's experts span many tokens,
        the prediction only its last)."""
        with self._lock:
            candidates, self._candidates[layer] = self._candidates[layer], frozenset()
            if candidates and tokens == 1:
                used = len(candidates.intersection(experts)) / len(candidates)
                self.precision[layer] += PRECISION_EMA * (used - self.precision[layer])
                self.scored[layer] += 1
            self.layers[layer].clock += 1
            if self.warm is not None:
                self.warm[layer].clock += 1
            self._in_use[layer] = frozenset(experts)

    def end_step(self, layer: int) -> None:
        with self._lock:
            self._in_use[layer] = frozenset()

    def resident(self, layer: int) -> tuple[int, list[tuple[int, ExpertWeights]]]:
        """The layer's version and the experts in its fast tier now."""
        with self._lock:
            return self.versions[layer], list(self.layers[layer].entries.items())

    def count_resident_steps(self, chosen: list[list[int]], skip: list[int]) -> None:
        """A one-token step that found `chosen[layer]` resident in every layer but `skip` (counted as it went): the
        hits, and the uses the replacement policy ranks by, as begin_step and get would have counted them."""
        with self._lock:
            for layer, experts in enumerate(chosen):
                if layer in skip:
                    continue
                cache, st = self.layers[layer], self.stats[layer]
                cache.clock += 1
                used = [e for e in experts if e >= 0]  # -1: dropped by the adaptive expert count
                hits = self.expert_counts[layer][HIT]
                for expert in used:  # per decoded token: one pass over the step's experts
                    cache.lookup(expert)
                    hits[expert] += 1
                st.tokens += 1
                st.experts_used += len(used)
                st.hits += len(used)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        st = self.stats[layer]
        with self._lock:
            found = self.layers[layer].lookup(expert)
            counts = self.expert_counts[layer]
            if found is not None:
                st.hits += 1
                counts[HIT][expert] += 1
                if expert in self._unused_prefetch[layer]:
                    self._unused_prefetch[layer].discard(expert)
                    st.prefetch_hits += 1
                    counts[PREFETCH_HIT][expert] += 1
                copied = self._copied.pop((layer, expert), None)
            else:
                future = self._pending.get((layer, expert))
                if future is not None and future.cancel():
                    future = None  # a prefetch still queued behind others: read it now, not after the queue
                if future is None:  # a demand load, registered so a prefetch of the same expert waits for it
                    future = self._pending[(layer, expert)] = Future()
                    demand = True
                else:
                    demand = False
        if found is not None:
            if copied is not None:  # the compute stream's next kernels wait for the copy (the host does not)
                torch.cuda.current_stream(self.device).wait_event(copied)
            return found
        t0 = time.perf_counter()
        if demand:
            try:
                weights, warm_hit = self._fetch(layer, expert)
            except BaseException as e:
                with self._lock:
                    del self._pending[(layer, expert)]
                future.set_exception(e)
                raise
            with self._lock:
                if warm_hit:
                    st.warm_hits += 1
                else:
                    st.misses += 1
                self.expert_counts[layer][MISS][expert] += 1
                self._insert(layer, expert, weights)
                del self._pending[(layer, expert)]
            future.set_result(weights)
        else:
            weights = future.result()  # a prefetch in flight: wait for it rather than read twice
            with self._lock:
                st.hits += 1
                st.prefetch_hits += 1
                self.expert_counts[layer][HIT][expert] += 1
                self.expert_counts[layer][PREFETCH_HIT][expert] += 1
                self._unused_prefetch[layer].discard(expert)  # the use was counted by the lookup above
        st.stall_s += time.perf_counter() - t0
        return weights

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Load `experts` of `layer` in the background unless cached or already coming (no-op without prefetch).
        The prediction is kept to be scored at the layer's next step; its loads are skipped while the layer's
        precision is below `min_precision`."""
        if self._pool is None or not 0 <= layer < len(self.layers):
            return
        experts = experts[: self.slots]
        with self._lock:
            self._predicted[layer] = frozenset(experts)  # a prefetch must not evict its own siblings
            cache, pending = self.layers[layer], self._pending
            fresh = [e for e in experts if e not in cache and (layer, e) not in pending]
            self._candidates[layer] = frozenset(fresh)
            if fresh and self.precision[layer] < self.min_precision:
                self.stats[layer].prefetches_skipped += len(fresh)
                return
        for expert in fresh:
            with self._lock:
                if expert in self.layers[layer] or (layer, expert) in self._pending:
                    continue
                host = self.warm[layer].lookup(expert) if self.warm is not None and self._copy_stream else None
                if host is None:
                    future: Future[ExpertWeights] = Future()
                    self._pending[(layer, expert)] = future
            if host is not None:
                self._copy_ahead(layer, expert, host)
            else:
                self._pool.submit(self._prefetch_one, layer, expert, future)

    def fill_in_background(self) -> None:
        """Read the first `slots` experts of every layer (all of them when they all fit) into the fast tier in a
        background thread, layer by layer, so that answering starts at once and later steps find them resident.
        An expert the compute thread asks for first is read by whichever thread gets to it first, never twice;
        the reads count as prefetches in the layer's statistics."""
        if self._filler is not None:
            return
        self._filler = threading.Thread(target=self._fill, name="localmoe-fill", daemon=True)
        self._filler.start()

    @property
    def filling(self) -> bool:
        """Whether the background fill is still reading."""
        return self._filler is not None and self._filler.is_alive()

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Wait for the background fill (True: done or never started)."""
        if self._filler is not None:
            self._filler.join(timeout)
        return not self.filling

    def _fill(self) -> None:
        for layer in range(len(self.layers)):
            for expert in range(self.slots):
                if self._closing.is_set():
                    return
                with self._lock:
                    if expert in self.layers[layer] or (layer, expert) in self._pending:
                        continue
                    future: Future[ExpertWeights] = Future()
                    future.set_running_or_notify_cancel()  # running: a get() now waits for this read
                    self._pending[(layer, expert)] = future
                if not self._read_ahead(layer, expert, future):
                    return  # a read failed: the compute thread meets the error if it waits for it, else rereads

    def _copy_ahead(self, layer: int, expert: int, host: ExpertWeights) -> None:
        """Prefetch from the warm tier: an asynchronous copy on the side stream, issued by the compute thread
        itself — no loader thread to hand the GIL to, and the compute stream waits for it only where the expert
        is used (get)."""
        weights, done = self._side_copy(host)
        with self._lock:
            st = self.stats[layer]
            st.prefetches += 1
            st.bytes_copied += host.nbytes
            self._insert(layer, expert, weights, self._predicted[layer])
            self._unused_prefetch[layer].add(expert)
            self._copied[(layer, expert)] = done

    def _prefetch_one(self, layer: int, expert: int, future: Future[ExpertWeights]) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the compute thread needed it first and read it itself
        self._read_ahead(layer, expert, future, predicted=True)

    def _read_ahead(self, layer: int, expert: int, future: Future[ExpertWeights], predicted: bool = False) -> bool:
        """Off the compute thread: read the expert of a registered, running `future` and cache it as a prefetch
        (`predicted`: its predicted siblings are not evicted for it). False when the read failed; the compute thread
        re-raises the error if it waits for this expert."""
        try:
            weights, _ = self._fetch(layer, expert, background=True)
        except BaseException as e:
            with self._lock:
                self._pending.pop((layer, expert), None)
            future.set_exception(e)
            return False
        with self._lock:
            self.stats[layer].prefetches += 1
            self._insert(layer, expert, weights, self._predicted[layer] if predicted else frozenset())
            self._unused_prefetch[layer].add(expert)
            self._pending.pop((layer, expert), None)
        future.set_result(weights)
        return True

    def _insert(self, layer: int, expert: int, weights: ExpertWeights, keep: frozenset[int] = frozenset()) -> None:
        """Under the lock."""
        evicted = self.layers[layer].insert(expert, weights, self._in_use[layer] | keep)
        self.versions[layer] += 1
        if evicted is not None:
            self._copied.pop((layer, evicted), None)
        if evicted is not None and evicted in self._unused_prefetch[layer]:
            self._unused_prefetch[layer].discard(evicted)
            self.stats[layer].wasted_prefetches += 1

    def _fetch(self, layer: int, expert: int, background: bool = False) -> tuple[ExpertWeights, bool]:
        """The expert's weights in the fast tier's device: from the warm tier when it holds them, else from disk.
        Returns (weights, whether the warm tier served them)."""
        st = self.stats[layer]
        if self.warm is None:
            mats, nbytes = self._load(layer, expert)
            with self._lock:
                st.bytes_read += nbytes
            on_cpu = self.device.type == "cpu"
            weights = ExpertWeights(mats, self.expert_dtype, packed=on_cpu, dequant_on_use=self.dequant_on_use)
            return weights.to(self.device), False
        with self._lock:
            host = self.warm[layer].lookup(expert)
        warm_hit = host is not None
        if host is None:
            mats, nbytes = self._load(layer, expert)
            host = ExpertWeights(mats, self.expert_dtype, dequant_on_use=self.dequant_on_use).pin()
            with self._lock:
                st.bytes_read += nbytes
                self.warm[layer].insert(expert, host)
        with self._lock:
            st.bytes_copied += host.nbytes
        if background and self._copy_stream is not None:
            # wait for the copy here, so the compute stream never sees a half-copied expert
            weights, done = self._side_copy(host)
            done.synchronize()
            return weights, warm_hit
        return host.to(self.device, non_blocking=True), warm_hit

    def _side_copy(self, host: ExpertWeights) -> tuple[ExpertWeights, Any]:
        """`host` copied to the fast tier on the side stream, and a CUDA event recorded where the copy ends."""
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            weights = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        compute = torch.cuda.default_stream(self.device)
        for t in (*weights.mats, *(weights.scales or ())):
            t.record_stream(compute)  # freed blocks wait for the compute stream before they are reused
        return weights, done

    def _zero_counts(self) -> list[list[list[int]]]:
        return [[[0] * self.n_experts for _ in range(3)] for _ in self.stats]

    def per_expert(self, layer: int) -> dict[str, list[int]]:
        """The layer's counters per expert since the last reset: hits, misses and prefetch hits."""
        with self._lock:
            return {name: list(row) for name, row in zip(EXPERT_COUNTERS, self.expert_counts[layer], strict=True)}

    def totals(self) -> LayerStats:
        total = LayerStats()
        for s in self.stats:
            total.add(s)
        return total

    def reset_stats(self) -> None:
        with self._lock:  # a prefetch finishing now must not count into the counters being replaced
            self.stats = [LayerStats() for _ in self.stats]
            self.expert_counts = self._zero_counts()
            for unused in self._unused_prefetch:  # counted by the old counters: no hit or waste in the new ones
                unused.clear()

    def close(self) -> None:
        self._closing.set()
        if self._filler is not None:
            self._filler.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
