"""Where every tensor of a GGUF model lives on this machine, or why it cannot run.

Hardware budgets × model layout × context length → how many layers go to the GPU, which layers keep their
routed experts in RAM (what users otherwise write by hand as `--n-cpu-moe N` or `-ot ...exps=CPU`), mmap or
mlock, the largest context that fits, and a refusal naming what would fit when nothing does.

Placement follows llama.cpp's semantics so the plan can be applied as is: `n_gpu_layers` offloads the *last*
layers (and the output head once it exceeds the layer count), the KV cache of an offloaded layer lives in VRAM,
token embeddings stay in RAM, and buffer-type overrides move matching expert tensors back to the CPU.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import asdict, dataclass, field
from typing import Any

from localmoe.errors import LocalmoeError
from localmoe.placement.layout import ModelLayout
from localmoe.placement.safetensors import TensorInfo
from localmoe.placement.safetensors import checkpoint_tensors as checkpoint_tensors  # for `localmoe plan`
from localmoe.units import human_bytes

MiB = 1024**2
GiB = 1024**3
VRAM_RESERVE = 512 * MiB  # CUDA context, cuBLAS workspace, fragmentation
RAM_RESERVE = 512 * MiB  # this process, the UI, the OS's slack
N_UBATCH = 512  # llama.cpp's default micro-batch: sizes the compute buffers
DEFAULT_CTX = 4096
MIN_CTX = 256
MLOCK_HEADROOM = 2 * GiB  # lock weights in RAM only when this much (or a quarter of RAM) is left for the rest
EXPERT_PATTERN = r"blk\.({layers})\.ffn_(up|down|gate|gate_up)_(ch|)exps"


@dataclass
class Budget:
    vram_bytes: int  # free VRAM on the GPU we would use; 0 on CPU-only machines
    ram_bytes: int  # RAM available to us (cgroup caps included)
    unified: bool = False  # Apple silicon: the "VRAM" is the same RAM
    gpu_name: str | None = None
    source: str = "detected"  # detected | override | mixed (one of --vram/--ram given, the other detected)
    ram_given: bool = False  # --ram (or --fast-memory) overrides the detected RAM

    @property
    def where(self) -> str:
        """How messages name the memory planned for: a budget the user gave is not "this machine"."""
        return "this machine" if self.source == "detected" else "this budget"

    def describe_source(self) -> str:
        if self.source == "detected":
            return "detected"
        if self.source == "override":
            return "both given"
        return "RAM given, VRAM detected" if self.ram_given else "VRAM given, RAM detected"

    @classmethod
    def detect(cls, vram: int | None = None, ram: int | None = None) -> Budget:
        from localmoe.placement import hardware

        hw = hardware.detect(measure=False)
        gpu = hw.gpus[0] if hw.gpus else None
        detected_vram = gpu.vram_free_bytes if gpu else 0
        source = "detected" if vram is None and ram is None else "override" if vram is not None and ram is not None \
            else "mixed"
        return cls(
            vram_bytes=detected_vram if vram is None else vram,
            ram_bytes=hw.ram_available_bytes if ram is None else ram,
            unified=bool(gpu and gpu.unified_memory) and vram is None,
            gpu_name=gpu.name if gpu and (vram is None or vram > 0) else None,
            source=source,
            ram_given=ram is not None,
        )


@dataclass
class Plan:
    model: str
    architecture: str
    n_layers: int
    ctx: int
    max_ctx: int
    n_gpu_layers: int
    gpu_expert_layers: list[int]
    cpu_expert_layers: list[int]  # offloaded layers whose experts are overridden back to RAM
    use_mmap: bool
    use_mlock: bool
    vram_bytes: int  # weights + KV cache + compute buffer on the GPU
    ram_bytes: int  # weights held in RAM + KV cache + compute buffers, if every page were resident
    gpu_weight_bytes: int
    cpu_weight_bytes: int
    paged_bytes: int  # weights left on disk, read through mmap as tokens need them
    kv_bytes: int
    budget: Budget
    fits: bool = True
    refusal: str | None = None
    suggestion: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> list[tuple[str, str]]:
        """(regex, buffer type) pairs for llama.cpp, first match wins."""
        if not self.cpu_expert_layers:
            return []
        return [(EXPERT_PATTERN.format(layers="|".join(map(str, self.cpu_expert_layers))), "CPU")]

    @property
    def repack(self) -> bool:
        """Whether llama.cpp may repack weights for its CPU kernels. Repacking copies tensors such as Q4_K's out of
        the mmap into anonymous memory the OS cannot drop: on a model that pages, that copy is what exceeds the
        memory and gets the process killed, so a paged plan reads the file's own blocks in place."""
        return not self.paged_bytes

    @property
    def llama_cpp_args(self) -> list[str]:
        """The same placement as llama.cpp command-line flags, for users who run llama-server too."""
        args = ["-c", str(self.ctx), "-ngl", str(self.n_gpu_layers)]
        for pattern, buft in self.overrides:
            args += ["-ot", f"{pattern}={buft}"]
        if self.use_mlock:
            args.append("--mlock")
        if not self.use_mmap:
            args.append("--no-mmap")
        if not self.repack:
            args.append("--no-repack")
        return args

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [{"pattern": p, "buffer_type": b} for p, b in self.overrides]
        d["llama_cpp_args"] = self.llama_cpp_args
        return d

    def raise_if_refused(self) -> None:
        if not self.fits:
            raise LocalmoeError(f"{self.refusal}" + (f"; {self.suggestion}" if self.suggestion else ""))


def _layer_ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def describe(plan: Plan, layout: ModelLayout) -> str:
    b = plan.budget
    experts = f"{layout.n_experts} experts (top-{layout.n_experts_used})" if layout.is_moe else "dense"
    gpu = f"{human_bytes(b.vram_bytes)} VRAM free on {b.gpu_name or 'GPU'}" if b.vram_bytes else "no GPU"
    lines = [
        f"model    {layout.architecture}, {layout.n_layers} layers, {experts}, {layout.quantization}, "
        f"{human_bytes(layout.file_bytes)}",
        f"budget   {gpu}; {human_bytes(b.ram_bytes)} RAM available ({b.describe_source()}; "
        f"{human_bytes(RAM_RESERVE)} of it held back for this process, the UI and the OS)",
    ]
    if not plan.fits:
        lines.append(f"REFUSED  {plan.refusal}")
        if plan.suggestion:
            lines.append(f"         {plan.suggestion}")
        return "\n".join(lines)
    if plan.n_gpu_layers == 0:
        where = "all layers in RAM (CPU)"
    else:
        n_off = min(plan.n_gpu_layers, plan.n_layers)
        where = f"{n_off} of {plan.n_layers} layers on the GPU"
        where += " with the output head" if plan.n_gpu_layers > plan.n_layers else ""
        if layout.is_moe:
            where += (f"; experts of layers {_layer_ranges(plan.cpu_expert_layers)} kept in RAM"
                      if plan.cpu_expert_layers else "; every layer's experts on the GPU too")
    lines.append(f"plan     {where}")
    kv = human_bytes(plan.kv_bytes)
    lines.append(f"context  {plan.ctx} tokens (largest that fits: {plan.max_ctx}); KV cache {kv}")
    load = "mmap + mlock" if plan.use_mlock else "mmap" if plan.use_mmap else "read into RAM"
    lines.append(f"memory   VRAM {human_bytes(plan.vram_bytes)}, RAM {human_bytes(plan.ram_bytes)}; {load}")
    if plan.paged_bytes:
        lines.append(f"disk     {human_bytes(plan.paged_bytes)} of weights paged from disk as needed")
    lines.append("llama.cpp flags: " + " ".join(plan.llama_cpp_args))
    lines += [f"warning  {w}" for w in plan.warnings]
    lines += [f"note     {n}" for n in plan.notes]
    return "\n".join(lines)


def _compute_bytes(layout: ModelLayout) -> int:
    # The logits of one micro-batch dominate llama.cpp's compute buffer (96 MiB for SmolLM2's 49k vocabulary,
    # as llama.cpp itself reports); activations add a few times the hidden size per token.
    return 4 * N_UBATCH * (layout.vocab_size + 16 * layout.embedding_length)


@dataclass
class _Placement:
    ngl: int
    gpu_layers: list[int]
    gpu_expert_layers: list[int]
    cpu_expert_layers: list[int]
    vram: int
    vram_weights: int
    ram_weights: int
    ram_resident: int  # KV + compute: must be resident, cannot be paged
    working_set: int  # what every token touches in RAM: dense weights, active experts' share, KV, compute


def _place(layout: ModelLayout, budget: Budget, ctx: int, layer_usage: dict[int, float] | None) -> _Placement:
    n = layout.n_layers
    kv_layer = layout.kv_bytes_per_token // max(n, 1) * ctx
    compute = _compute_bytes(layout)
    embed = layout.other_bytes - layout.output_bytes
    vram_usable = max(0, budget.vram_bytes - VRAM_RESERVE)

    ngl, gpu_layers, vram = 0, [], 0
    if vram_usable > 0:
        for cand in range(n + 1, 0, -1):
            layers = list(range(n - min(cand, n), n))
            need = sum(layout.dense_bytes_per_layer[i] + kv_layer for i in layers) + compute
            need += layout.output_bytes if cand > n else 0
            if need <= vram_usable:
                ngl, gpu_layers, vram = cand, layers, need
                break

    # Experts fill the VRAM left: the most-used layers first when usage is known, else the last layers first,
    # which is llama.cpp's --n-cpu-moe convention (the first N layers keep their experts on the CPU).
    order = sorted(gpu_layers, key=lambda i: -(layer_usage or {}).get(i, 0.0)) if layer_usage else gpu_layers[::-1]
    gpu_experts = []
    for i in order:
        if vram + layout.expert_bytes_per_layer[i] <= vram_usable:
            vram += layout.expert_bytes_per_layer[i]
            gpu_experts.append(i)
    cpu_experts = sorted(i for i in gpu_layers if i not in gpu_experts and layout.expert_bytes_per_layer[i])

    cpu_layers = [i for i in range(n) if i not in gpu_layers]
    ram_dense = embed + sum(layout.dense_bytes_per_layer[i] for i in cpu_layers)
    ram_dense += layout.output_bytes if ngl <= n else 0
    ram_experts = sum(layout.expert_bytes_per_layer[i] for i in cpu_layers + cpu_experts)
    resident = kv_layer * len(cpu_layers) + compute
    active = layout.n_experts_used / layout.n_experts if layout.is_moe else 1.0
    # Token embeddings are looked up a row at a time: they need not stay resident.
    working = ram_dense - embed + int(ram_experts * active) + resident
    vram_weights = vram - (kv_layer * len(gpu_layers) + compute if ngl else 0)
    return _Placement(ngl, gpu_layers, sorted(gpu_experts), cpu_experts, vram, vram_weights,
                      ram_dense + ram_experts, resident, working)


def _fits(p: _Placement, budget: Budget) -> bool:
    return p.working_set <= max(0, budget.ram_bytes - RAM_RESERVE)


def make_plan(
    layout: ModelLayout,
    budget: Budget,
    ctx: int | None = None,
    *,
    layer_usage: dict[int, float] | None = None,
) -> Plan:
    """Plan `layout` on `budget`. `ctx` None means the default (4096, or less when the model is shorter or
    memory is tight); an explicit `ctx` that does not fit is refused with the largest one that does."""
    trained = layout.context_length or DEFAULT_CTX
    lo = min(MIN_CTX, trained)
    ram_usable = max(0, budget.ram_bytes - RAM_RESERVE)
    if budget.unified:
        # One pool: plan as CPU-only against RAM, then offload everything, since Metal reads the same pages.
        budget = Budget(0, budget.ram_bytes, True, budget.gpu_name, budget.source)

    def fits_at(c: int) -> bool:
        return _fits(_place(layout, budget, c, layer_usage), budget)

    max_ctx = 0
    if fits_at(lo):
        good, bad = lo, trained + 1
        while bad - good > 1:  # binary search: more context only ever needs more memory
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits_at(mid) else (good, mid)
        max_ctx = good

    explicit = ctx is not None
    use = ctx if ctx is not None else min(DEFAULT_CTX, trained)
    notes: list[str] = []
    if use > trained:
        notes.append(f"the model was trained on {trained} tokens of context; using {trained}")
        use = trained
    if not explicit and 0 < max_ctx < use:
        notes.append(f"context reduced from {use} to {max_ctx} to fit in memory")
        use = max_ctx

    def in_ram_at(c: int) -> bool:
        q = _place(layout, budget, c, layer_usage)
        return q.ram_weights + q.ram_resident <= ram_usable

    if not explicit and max_ctx and not in_ram_at(use) and in_ram_at(lo):
        # The KV cache alone tips the model into paging: a shorter context keeps everything in RAM, which a
        # default should prefer (an explicit --ctx is honoured and paged instead).
        good, bad = lo, use
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if in_ram_at(mid) else (good, mid)
        notes.append(f"context reduced from {use} to {good} so the whole model stays in RAM")
        use = good

    p = _place(layout, budget, use, layer_usage)
    kv = layout.kv_bytes_per_token * use
    plan = Plan(
        model=layout.path, architecture=layout.architecture, n_layers=layout.n_layers, ctx=use, max_ctx=max_ctx,
        n_gpu_layers=p.ngl, gpu_expert_layers=p.gpu_expert_layers, cpu_expert_layers=p.cpu_expert_layers,
        use_mmap=True, use_mlock=False, vram_bytes=p.vram, ram_bytes=p.ram_weights + p.ram_resident,
        gpu_weight_bytes=p.vram_weights, cpu_weight_bytes=p.ram_weights,
        paged_bytes=max(0, p.ram_weights + p.ram_resident - ram_usable), kv_bytes=kv, budget=budget, notes=notes,
    )
    if budget.unified:
        plan.n_gpu_layers = layout.n_layers + 1
        plan.notes.append("unified memory: every layer runs on the GPU from the same RAM")

    if max_ctx == 0:
        need = p.working_set + RAM_RESERVE
        plan.fits = False
        plan.refusal = (
            f"{layout.architecture} model ({human_bytes(layout.file_bytes)}) does not fit {budget.where}: even at "
            f"{lo} tokens of context it needs {human_bytes(need - RAM_RESERVE)} in RAM for its weights and buffers"
            + (f" besides {human_bytes(budget.vram_bytes)} of VRAM" if budget.vram_bytes else "")
            + f", plus the {human_bytes(RAM_RESERVE)} held back for this process, the UI and the OS "
            f"({human_bytes(need)} in all), and {human_bytes(budget.ram_bytes)} is available"
        )
        ratio = ram_usable / max(1, need - RAM_RESERVE)
        plan.suggestion = (
            f"a quantisation at most {ratio:.0%} of this one's size (e.g. Q4_K_M instead of Q8_0/F16) "
            "or more memory"
            if ratio >= 0.2 else f"a smaller model; this one is several times too large for {budget.where}"
        )
        return plan
    if use > max_ctx:
        plan.fits = False
        plan.refusal = f"a {use}-token context does not fit: the KV cache alone needs {human_bytes(kv)}"
        plan.suggestion = f"use --ctx {max_ctx} or less (the largest that fits)"
        return plan

    if plan.paged_bytes:
        plan.warnings.append(
            f"the model's CPU-side weights and buffers ({human_bytes(p.ram_weights + p.ram_resident)}) exceed the "
            f"{human_bytes(ram_usable)} of RAM {budget.where} leaves after a {human_bytes(RAM_RESERVE)} reserve: "
            f"{human_bytes(plan.paged_bytes)} will be read from disk through mmap as tokens need them (llama.cpp's "
            "CPU repacking is off, so no weight is copied out of the file); expect lower speed"
        )
    else:
        headroom = max(MLOCK_HEADROOM, budget.ram_bytes // 4)
        # Locking keeps the OS from paging the model out under pressure; only worth it with room to spare.
        plan.use_mlock = p.ram_weights + p.ram_resident + headroom <= ram_usable and _mlock_allowed(p.ram_weights)
    return plan


def _mlock_allowed(nbytes: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or soft >= nbytes


def shaped_layout(*, name: str, architecture: str, n_layers: int, n_experts: int, n_experts_used: int,
                  total_params: float, active_params: float, file_bytes: int, embedding_length: int,
                  vocab_size: int, n_heads: int, n_kv_heads: int, head_dim: int, context_length: int,
                  quantization: str) -> ModelLayout:
    """A layout from a model's published facts, for a verdict before any byte of it is downloaded.

    Bytes are spread over parameters at the file's average bits per weight. With E experts of which k are used,
    total = dense + E·e and active = dense + k·e give the routed experts' share (shared experts count as dense).
    Embeddings and the output head are vocab × hidden each (tied or not: a GGUF usually stores both)."""
    bpp = file_bytes / max(total_params, 1.0)  # bytes per parameter
    moe = n_experts > 0 and n_experts > n_experts_used
    expert_params = n_experts * (total_params - active_params) / (n_experts - n_experts_used) if moe else 0.0
    table = vocab_size * embedding_length * bpp
    layer_dense = max(0.0, total_params - expert_params - 2 * vocab_size * embedding_length) * bpp / n_layers
    layer_experts = expert_params * bpp / n_layers
    return ModelLayout(
        path=name, format="gguf", architecture=architecture, name=name, n_layers=n_layers,
        context_length=context_length, embedding_length=embedding_length, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, n_experts=n_experts if moe else 0, n_experts_used=n_experts_used if moe else 0,
        quantization=quantization, has_chat_template=True, file_bytes=file_bytes, n_params=int(total_params),
        expert_bytes_per_layer=[int(layer_experts)] * n_layers, dense_bytes_per_layer=[int(layer_dense)] * n_layers,
        other_bytes=int(2 * table), output_bytes=int(table), vocab_size=vocab_size,
    )


@dataclass
class Verdict:
    """A plan in one word and one line, for a list of candidate models."""

    kind: str  # vram | ram | disk | refused
    label: str
    disk_bytes_per_token: int = 0  # weights read from disk per token (uniform routing, nothing else cached)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(plan: Plan, layout: ModelLayout) -> Verdict:
    """Fits in VRAM (or unified memory) / experts (or layers) in RAM / runs from disk / refused."""
    if not plan.fits:
        reason = f"{plan.refusal}" + (f"; {plan.suggestion}" if plan.suggestion else "")
        return Verdict("refused", "refused", reason=reason)
    if plan.paged_bytes:
        # A token reads the active share of what is not resident: of paged experts k/E, of paged dense weights all.
        share = layout.n_experts_used / layout.n_experts if layout.is_moe else 1.0
        per_token = int(plan.paged_bytes * share)
        return Verdict("disk", f"runs from disk, ~{human_bytes(per_token)} read per token", per_token)
    if plan.budget.unified:
        return Verdict("vram", "fits in unified memory")
    on_gpu = plan.n_gpu_layers > plan.n_layers and not plan.cpu_expert_layers
    if on_gpu:
        return Verdict("vram", "fits in VRAM")
    if plan.n_gpu_layers and layout.is_moe:
        return Verdict("ram", "experts in RAM")
    return Verdict("ram", "fits in RAM" if not plan.n_gpu_layers else "layers in RAM")


# --- Hugging Face checkpoints (the native torch engine) ----------------------------------------------------
#
# The torch engine keeps dense weights resident and an expert cache of `slots` experts per layer in fast memory
# (resident CPU tensors here; VRAM once the engine runs on CUDA); every other expert stays cold on disk and is
# read with pread when the router picks it. The plan turns a memory budget into those slots.

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(\d+)\.")
_PACKED_DENSE = re.compile(r"(embed_tokens|lm_head|self_attn\.[qkvo]_proj)\.weight$")
ENGINE_DTYPE_BYTES = 4  # the torch engine computes in float32 whatever the checkpoint's dtype
EXPERT_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}  # how the expert cache may hold experts
PACKED = "packed"  # experts held as the file stores them (a GGUF's quantisation): memory bytes = bytes on disk
DEFAULT_TORCH_CTX = 2048  # the torch engine's default context (max_seq_length)


@dataclass
class CheckpointPlan:
    model: str
    architecture: str
    n_layers: int
    n_experts: int
    top_k: int
    ctx: int
    bytes_per_expert: int  # in fast memory (float32, as the engine holds it)
    disk_bytes_per_expert: int  # as stored in the checkpoint: what one miss reads
    dense_bytes: int  # embeddings, attention, norms, routers, shared experts (float32, resident)
    kv_bytes: int  # KV cache, rope tables and causal mask for ctx tokens
    reserve_bytes: int
    budget_bytes: int
    budget_source: str  # detected | override
    slots_per_layer: int
    fits: bool = True
    refusal: str | None = None
    device: str = "cpu"  # where the fast tier lives: cpu (resident tensors), cuda or mps
    expert_dtype: str = "float32"
    warm_slots_per_layer: int = 0  # pinned CPU RAM, only when the fast tier is a GPU
    warm_budget_bytes: int = 0

    @property
    def fast_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.slots_per_layer * self.n_layers * self.bytes_per_expert

    @property
    def miss_rate(self) -> float:
        """Under uniform routing, the chance a routed expert is not in its layer's fast cache."""
        return 1 - self.slots_per_layer / self.n_experts if self.n_experts else 0.0

    @property
    def disk_miss_rate(self) -> float:
        """Under uniform routing, the chance a routed expert is in neither the fast nor the warm tier."""
        held = max(self.slots_per_layer, self.warm_slots_per_layer)
        return 1 - held / self.n_experts if self.n_experts else 0.0

    @property
    def bytes_per_token(self) -> int:
        """Expected bytes read from disk per decoded token at the uniform-routing miss rate."""
        return int(self.disk_miss_rate * self.top_k * self.disk_bytes_per_expert * self.n_layers)

    @property
    def copied_per_token(self) -> int:
        """Expected bytes copied warm -> fast per decoded token (GPU engines), uniform routing."""
        if not self.warm_slots_per_layer:
            return 0
        return int(self.miss_rate * self.top_k * self.bytes_per_expert * self.n_layers)

    @property
    def tiers(self) -> list[dict[str, Any]]:
        where = "resident CPU tensors" if self.device == "cpu" else f"{self.device} memory"
        tiers = [{"name": "fast", "where": where, "slots_per_layer": self.slots_per_layer,
                  "bytes": self.slots_per_layer * self.n_layers * self.bytes_per_expert}]
        if self.warm_slots_per_layer:
            tiers.append({"name": "warm", "where": "pinned CPU RAM", "slots_per_layer": self.warm_slots_per_layer,
                          "bytes": self.warm_slots_per_layer * self.n_layers * self.bytes_per_expert})
        held = max(self.slots_per_layer, self.warm_slots_per_layer)
        tiers.append({"name": "cold", "where": "disk", "experts_per_layer": self.n_experts - held,
                      "bytes": (self.n_experts - held) * self.n_layers * self.disk_bytes_per_expert})
        return tiers

    @property
    def resident(self) -> list[str]:
        return ["dense weights (embeddings, attention, norms, routers, shared experts)",
                f"KV cache for {self.ctx} tokens", f"{self.slots_per_layer} experts per layer (expert cache)"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(fast_bytes=self.fast_bytes, miss_rate=self.miss_rate, bytes_per_token=self.bytes_per_token,
                 copied_per_token=self.copied_per_token, tiers=self.tiers, resident=self.resident)
        return d

    def raise_if_refused(self) -> None:
        if not self.fits:
            raise LocalmoeError(str(self.refusal))

    @property
    def warnings(self) -> list[str]:
        """What a user should know: experts that do not fit the fast tier are fetched per token."""
        if not self.fits or self.slots_per_layer >= self.n_experts:
            return []
        source = "pinned RAM or disk" if self.warm_slots_per_layer else "disk"
        return [f"{self.slots_per_layer} of {self.n_experts} experts per layer fit in fast memory; the others are "
                f"read from {source} when the router picks them (expect {human_bytes(self.bytes_per_token)} read "
                f"per token at uniform routing)"]


def plan_checkpoint(
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    budget_bytes: int,
    *,
    ctx: int | None = None,
    model: str = "",
    budget_source: str = "override",
    expert_dtype: str = "float32",
    device: str = "cpu",
    warm_budget_bytes: int = 0,
    fast_slots: int | None = None,
) -> CheckpointPlan:
    """Slots per layer for a checkpoint: (budget − dense − KV − reserve) ÷ (layers × bytes per expert),
    clamped to [top_k, n_experts]; refused when not even top_k slots per layer fit.

    Experts are held in `expert_dtype` (int8 adds a float32 scale per row; "packed": as stored). With a GPU
    `device` the budget is its free memory and `warm_budget_bytes` of RAM (less the reserve) become the pinned warm
    tier. `fast_slots` fixes the fast tier's slots instead of deriving them from the budget."""
    if expert_dtype not in EXPERT_DTYPE_BYTES and expert_dtype != PACKED:
        raise LocalmoeError(f"unknown expert dtype {expert_dtype!r} (known: {', '.join(EXPERT_DTYPE_BYTES)})")
    try:
        n_layers = int(config["num_hidden_layers"])
        n_experts = int(config.get("num_local_experts") or config["num_experts"])
        top_k = int(config["num_experts_per_tok"])
        n_heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
        n_kv = int(config.get("num_key_value_heads") or n_heads)
    except KeyError as e:
        raise LocalmoeError(f"config.json lacks {e.args[0]!r}, needed to plan an MoE checkpoint") from None
    use_ctx = min(int(config.get("max_position_embeddings", 4096)), ctx or DEFAULT_TORCH_CTX)

    dense = 0
    per_expert: dict[tuple[int, int], list[int]] = {}  # (layer, expert) -> [fp32 bytes, disk bytes]
    for key, t in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m:
            acc = per_expert.setdefault((int(m.group(1)), int(m.group(2))), [0, 0])
            acc[0] += t.nbytes if expert_dtype == PACKED else t.numel * EXPERT_DTYPE_BYTES[expert_dtype]
            if expert_dtype == "int8" and t.shape:
                acc[0] += t.shape[0] * 4  # one float32 scale per output row
            acc[1] += t.nbytes
        elif expert_dtype == PACKED and device == "cpu" and _PACKED_DENSE.search(key):
            # a GGUF's attention, embeddings and head stay in the file's types on the CPU (engine/packed.py); on a
            # GPU they are dequantised once to float32 (gguf_checkpoint.GGUFDenseWeights(packed=False))
            dense += t.nbytes
        else:
            dense += t.numel * ENGINE_DTYPE_BYTES
    if not per_expert:
        raise LocalmoeError("the checkpoint has no routed expert tensors (model.layers.N.*.experts.E.*)")
    bpe = max(v[0] for v in per_expert.values())
    disk_bpe = max(v[1] for v in per_expert.values())
    # K and V caches (float32) + cos/sin tables + the boolean causal mask
    kv = 2 * n_layers * n_kv * head_dim * use_ctx * 4 + 2 * use_ctx * head_dim * 4 + use_ctx * use_ctx

    room = budget_bytes - RAM_RESERVE - dense - kv
    slots = room // (n_layers * bpe) if room > 0 else 0
    if fast_slots is not None:  # the caller fixed the fast tier's size; the plan sizes the warm tier around it
        slots = fast_slots
    warm = 0
    if device != "cpu" and warm_budget_bytes > RAM_RESERVE:
        warm = min(n_experts, (warm_budget_bytes - RAM_RESERVE) // (n_layers * bpe))
        warm = warm if warm > min(n_experts, max(slots, top_k)) else 0  # a warm tier no bigger than fast adds nothing
    plan = CheckpointPlan(
        model=model, architecture=str(config.get("model_type")), n_layers=n_layers, n_experts=n_experts,
        top_k=top_k, ctx=use_ctx, bytes_per_expert=bpe, disk_bytes_per_expert=disk_bpe, dense_bytes=dense,
        kv_bytes=kv, reserve_bytes=RAM_RESERVE, budget_bytes=budget_bytes, budget_source=budget_source,
        slots_per_layer=max(top_k, min(n_experts, slots)), device=device, expert_dtype=expert_dtype,
        warm_slots_per_layer=int(warm), warm_budget_bytes=warm_budget_bytes if warm else 0,
    )
    if slots < top_k:
        need = RAM_RESERVE + dense + kv + top_k * n_layers * bpe
        plan.fits = False
        plan.refusal = (
            f"{plan.architecture} checkpoint does not fit: dense weights {human_bytes(dense)} + KV cache "
            f"{human_bytes(kv)} ({use_ctx} tokens) + {top_k} experts × {n_layers} layers × {human_bytes(bpe)} + "
            f"{human_bytes(RAM_RESERVE)} reserve = {human_bytes(need)}, but the budget is {human_bytes(budget_bytes)}"
        )
    return plan


def describe_checkpoint(p: CheckpointPlan) -> str:
    lines = [
        f"model    {p.architecture}, {p.n_layers} layers, {p.n_experts} experts (top-{p.top_k}), "
        f"{human_bytes(p.bytes_per_expert)} per expert in memory ({human_bytes(p.disk_bytes_per_expert)} on disk)",
        f"budget   {human_bytes(p.budget_bytes)} fast memory ({p.budget_source}); reserve "
        f"{human_bytes(p.reserve_bytes)}",
    ]
    if not p.fits:
        lines.append(f"REFUSED  {p.refusal}")
        return "\n".join(lines)
    tiers = {t["name"]: t for t in p.tiers}
    fast, cold = tiers["fast"], tiers["cold"]
    lines += [
        f"dense    {human_bytes(p.dense_bytes)} resident; KV cache {human_bytes(p.kv_bytes)} for {p.ctx} tokens",
        f"fast     {fast['slots_per_layer']} of {p.n_experts} experts per layer, {fast['where']} "
        f"({human_bytes(fast['bytes'])}, {p.expert_dtype})",
    ]
    if "warm" in tiers:
        warm = tiers["warm"]
        lines.append(f"warm     {warm['slots_per_layer']} experts per layer in {warm['where']} "
                     f"({human_bytes(warm['bytes'])})")
    lines += [
        f"cold     {cold['experts_per_layer']} experts per layer on {cold['where']} ({human_bytes(cold['bytes'])})",
        f"resident {'; '.join(p.resident)}: {human_bytes(p.fast_bytes)}",
        f"per tok  miss rate {p.miss_rate:.0%} (uniform routing): {human_bytes(p.bytes_per_token)} read from disk"
        + (f", {human_bytes(p.copied_per_token)} copied to {p.device}" if p.copied_per_token else ""),
    ]
    return "\n".join(lines)


# --- Which engine answers a GGUF MoE (#16) -------------------------------------------------------------------
#
# llama.cpp is the fastest engine while a model's experts fit in memory; once they do not, it pages the file through
# mmap, and the page cache thrashes, where the native engine's per-expert cache reads only the missed experts' bytes
# (20-28x llama.cpp's mmap at a quarter of the experts resident, docs/engine.md). So: llama.cpp when its plan keeps
# the model in VRAM/RAM, the native engine when llama.cpp would page (or cannot run at all) and the native plan fits,
# refused when neither fits. Header reads and plans only: no weights are touched, torch is not imported.

ENGINES = ("llama.cpp", "torch")


@dataclass
class EngineChoice:
    """The engine that answers a model, why, and its plan (llama.cpp's Plan or the native CheckpointPlan)."""

    backend: str | None  # llama.cpp | torch; None when refused
    reason: str  # one line, for people
    plan: Plan | CheckpointPlan  # the chosen engine's plan; when refused, the plan that refused
    llama_plan: Plan
    native_plan: CheckpointPlan | None = None  # computed only when it decides (or was asked for)
    native_refusal: str | None = None  # why the native engine does not run this file, when that was asked
    speed: SpeedEstimate | None = None  # the native engine's expected decode speed, when `localmoe plan` asked

    @property
    def fits(self) -> bool:
        return self.backend is not None

    def to_dict(self) -> dict[str, Any]:
        """The `engine` object of `plan --json`."""
        s = self.speed
        return {"backend": self.backend, "reason": self.reason, "fits": self.fits,
                "expected_tok_s": s.expected_tok_s if s else None, "disk_read_gbps": s.disk_read_gbps if s else None,
                "memory_bandwidth_gbps": s.memory_bandwidth_gbps if s else None,
                "disk_bytes_per_token": s.disk_bytes_per_token if s else None,
                "memory_bytes_per_token": s.memory_bytes_per_token if s else None,
                "speed_basis": s.basis if s else None}

    def raise_if_refused(self) -> None:
        if not self.fits:
            raise LocalmoeError(self.reason)


def native_gguf_view(path: str) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """A GGUF MoE as the native engine sees it (HF config and per-expert tensors) from its header alone; raises
    LocalmoeError (one line) when the native engine does not run the file."""
    from localmoe.placement import gguf_file

    try:
        header = gguf_file.read_header(path)
        shards = int(header.metadata.get("split.count") or 1)
        if shards > 1:
            raise LocalmoeError(f"{os.path.basename(path)} is one of {shards} files of a split GGUF: the native engine "
                                "reads single-file GGUFs; llama.cpp runs it (--backend llama.cpp)")
        return gguf_file.checkpoint_view(header, file=str(path))
    except (gguf_file.GGUFFormatError, OSError) as exc:
        raise LocalmoeError(f"cannot read the GGUF header of {path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # metadata of unexpected types: not a file the engine runs
        raise LocalmoeError(f"the native engine cannot read {path}'s metadata ({exc})") from None


def native_gguf_plan(
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    budget: Budget,
    ctx: int | None = None,
    *,
    fast_memory: int | None = None,
    model: str = "",
) -> CheckpointPlan:
    """The native engine's plan for a GGUF MoE on `budget`, experts packed in the file's quantisation, in RAM: the
    engine runs GGUF files on the CPU (their packed kernels are CPU code); `fast_memory` overrides the fast tier's
    size."""
    device = "cpu"
    fast = budget.ram_bytes
    source = "detected" if budget.source == "detected" else "override"
    if fast_memory is not None:
        fast, source = fast_memory, "override"
    return plan_checkpoint(config, tensors, fast, ctx=ctx, model=model, budget_source=source, expert_dtype="packed",
                           device=device, warm_budget_bytes=budget.ram_bytes if device == "cuda" else 0)


def _memory(budget: Budget) -> str:
    word = "free" if budget.source == "detected" else "in the budget"
    if budget.vram_bytes and not budget.unified:
        return f"{human_bytes(budget.vram_bytes)} VRAM + {human_bytes(budget.ram_bytes)} RAM {word}"
    return f"{human_bytes(budget.ram_bytes)} {'unified memory' if budget.unified else 'RAM'} {word}"


def _llama_where(plan: Plan, v: Verdict) -> str:
    if v.kind == "disk":
        return f"by paging {human_bytes(plan.paged_bytes)} from disk through mmap"
    if v.kind == "vram":
        return "in unified memory" if plan.budget.unified else "entirely on the GPU"
    n_gpu = min(plan.n_gpu_layers, plan.n_layers)
    if n_gpu and plan.cpu_expert_layers:
        return f"with {n_gpu} layers on the GPU and the experts of {len(plan.cpu_expert_layers)} in RAM"
    if n_gpu:
        return f"with {n_gpu} of {plan.n_layers} layers on the GPU, the rest in RAM"
    return "from RAM"


def _native_says(cp: CheckpointPlan) -> str:
    held = f"holds {cp.slots_per_layer} of {cp.n_experts} experts per layer"
    if cp.warm_slots_per_layer:
        held += f" on the GPU and {cp.warm_slots_per_layer} in pinned RAM"
    if cp.bytes_per_token == 0:
        return f"the native expert cache {held} and reads nothing from disk per token"
    return f"the native expert cache {held} and reads ~{human_bytes(cp.bytes_per_token)} per token from disk"


def _native_engine_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None  # found, not imported: importing torch takes seconds


def choose_engine(
    layout: ModelLayout,
    budget: Budget,
    ctx: int | None = None,
    *,
    backend: str | None = None,
    fast_memory: int | None = None,
    native_view: tuple[dict[str, Any], dict[str, TensorInfo]] | None = None,
    native_installed: bool | None = None,
) -> EngineChoice:
    """Which engine answers the GGUF `layout` on `budget`, why, and its plan (see the section comment).

    Dense models, MoE architectures the native engine does not run, and machines without torch always get llama.cpp
    (refused when its plan does not fit). `backend` forces an engine (`--backend`): its plan, refused only when it
    does not fit, and a LocalmoeError when torch is asked for a file the native engine does not run.
    `native_view` is `native_gguf_view(layout.path)`, read here when needed; `fast_memory` overrides the native
    engine's fast tier; `native_installed` None means: is torch importable."""
    if backend is not None and backend not in ENGINES:
        raise LocalmoeError(f"unknown backend {backend!r} ({' or '.join(ENGINES)})")
    lp = make_plan(layout, budget, ctx)
    lv = verdict(lp, layout)
    llama_refusal = f"{lp.refusal}" + (f"; {lp.suggestion}" if lp.suggestion else "")

    def llama(reason: str, native: CheckpointPlan | None = None, refusal: str | None = None) -> EngineChoice:
        return EngineChoice("llama.cpp" if lp.fits else None, reason if lp.fits else llama_refusal, lp, lp, native,
                            refusal)

    def native() -> CheckpointPlan:
        config, tensors = native_view if native_view is not None else native_gguf_view(layout.path)
        return native_gguf_plan(config, tensors, budget, ctx, fast_memory=fast_memory, model=layout.path)

    if backend == "llama.cpp":
        return llama(f"asked for (--backend llama.cpp): llama.cpp runs it {_llama_where(lp, lv)}")
    if backend == "torch":
        cp = native()
        if not cp.fits:
            return EngineChoice(None, str(cp.refusal), cp, lp, cp)
        return EngineChoice("torch", f"asked for (--backend torch): {_native_says(cp)}", cp, lp, cp)

    if not layout.is_moe:
        note = " (the native engine's expert cache is for MoE models)" if lv.kind == "disk" else ""
        return llama(f"a dense model: llama.cpp runs it {_llama_where(lp, lv)}{note}")
    experts = f"{human_bytes(layout.expert_bytes)} of experts, {_memory(budget)}"
    if lv.kind in ("vram", "ram"):  # the common case decides on one plan, without reading the header again
        return llama(f"the experts fit in memory ({experts}): llama.cpp runs it {_llama_where(lp, lv)}")
    try:
        if not (_native_engine_installed() if native_installed is None else native_installed):
            raise LocalmoeError("the native engine needs PyTorch (the localmoe[native] extra)")
        cp = native()
    except LocalmoeError as exc:
        why = str(exc).removesuffix("; use the llama.cpp backend")
        return llama(f"llama.cpp runs it {_llama_where(lp, lv)} ({why})", refusal=why)
    # In a real MoE the experts are what overflows; in a tiny one it can be llama.cpp's buffers (logits of a batch).
    overflow = f"the experts do not fit in memory ({experts})" if layout.expert_bytes >= lp.paged_bytes else \
        f"llama.cpp's weights and buffers do not fit in memory ({human_bytes(lp.ram_bytes)}, {_memory(budget)})"
    if cp.fits:
        if lv.kind == "disk":
            why = (f"{overflow}: {_native_says(cp)}; llama.cpp would page {human_bytes(lp.paged_bytes)} of the file "
                   "through mmap")
        else:
            why = (f"llama.cpp cannot run it here ({experts}; even paging through mmap its working set exceeds "
                   f"RAM): {_native_says(cp)}")
        return EngineChoice("torch", why, cp, lp, cp)
    if lp.fits:  # llama.cpp pages; the native cache cannot hold even the dense weights and top-k experts per layer
        return llama(f"{overflow}, nor does the native expert cache: llama.cpp runs it {_llama_where(lp, lv)}", cp)
    return EngineChoice(None, f"neither engine fits {budget.where}: llama.cpp: {llama_refusal}; the native expert "
                        f"cache: {cp.refusal}", lp, lp, cp)


def choose_engine_for(path: str | Any, ctx: int | None = None, *, backend: str | None = None) -> EngineChoice:
    """`choose_engine` on this machine for a GGUF file: its header and the detected memory (not measured)."""
    from localmoe.placement.layout import read_model_layout

    return choose_engine(read_model_layout(path), Budget.detect(), ctx, backend=backend)


def describe_choice(choice: EngineChoice, layout: ModelLayout) -> str:
    """`localmoe plan` for a GGUF: the engine and why (and, for the native engine, its expected speed when
    `with_speed` was asked), then the chosen engine's plan (or both refusals)."""
    if choice.fits:
        text = describe_checkpoint(choice.plan) if isinstance(choice.plan, CheckpointPlan) else \
            describe(choice.plan, layout)
        speed = f"; {choice.speed.describe()}" if choice.speed else ""
        return f"engine   {choice.backend}: {choice.reason}{speed}\n{text}"
    if isinstance(choice.plan, CheckpointPlan):  # --backend torch, refused
        return f"engine   none: the native expert cache does not fit {choice.llama_plan.budget.where}\n" \
            + describe_checkpoint(choice.plan)
    cp, where = choice.native_plan, choice.llama_plan.budget.where
    if cp is None:
        return f"engine   none: llama.cpp does not fit {where}\n" + describe(choice.plan, layout)
    return (f"engine   none: neither llama.cpp nor the native expert cache fits {where}\n"
            + describe(choice.plan, layout) + f"\nnative   REFUSED  {cp.refusal}")


# --- The native engine's expected decode speed (#16) ----------------------------------------------------------
#
# A decode step of the native engine reads its missed experts from disk, then streams what the token touches through
# the CPU: every dense weight and top-k experts per layer. Both are bandwidth-bound on the CPUs the engine targets, so
#     tok/s ≈ 1 / (bytes read from disk per token ÷ disk read bandwidth + bytes touched per token ÷ memory bandwidth)
# with the disk bytes at the plan's uniform-routing miss rate. An estimate: real routing reuses experts (an expert the
# previous token used is chosen again 34-40% of the time, DESIGN.md), so a real cache misses less and reads less; the
# engine's own reads may get less of the disk than the sample's (the Qwen3-30B-shaped file at an 8 GiB cap, uniform
# routing replayed: 0.64 tok/s measured against ~0.8 estimated, the engine reading at ~3/4 of the sampled rate).

SPEED_ASSUMES = ("uniform routing and the engine reading at the sampled disk bandwidth; real routing reuses "
                 "experts, so its cache misses less and reads less")


@dataclass
class SpeedEstimate:
    expected_tok_s: float | None  # None when a bandwidth it needs is unknown (see `unknown`)
    disk_read_gbps: float | None
    memory_bandwidth_gbps: float | None
    disk_bytes_per_token: int  # expected, at the uniform-routing miss rate
    memory_bytes_per_token: int  # dense weights + top-k experts per layer
    unknown: str | None = None  # why there is no figure

    @property
    def basis(self) -> str:
        """What the figure assumes, or why there is none (one line, for `--json`)."""
        if self.expected_tok_s is None:
            return f"unknown: {self.unknown}"
        parts = [f"{human_bytes(self.memory_bytes_per_token)} from memory at {self.memory_bandwidth_gbps:.1f} GB/s"]
        if self.disk_bytes_per_token:
            parts.insert(0, f"{human_bytes(self.disk_bytes_per_token)} from disk at {self.disk_read_gbps:.2f} GB/s")
        return f"an estimate: per token {' + '.join(parts)}, at {SPEED_ASSUMES}"

    def describe(self) -> str:
        if self.expected_tok_s is None:
            return f"expected speed unknown ({self.unknown})"
        return f"expected ~{self.expected_tok_s:.2g} tok/s ({self.basis})"


def memory_bytes_per_token(cp: CheckpointPlan) -> int:
    """What one decoded token streams through the CPU: every dense weight and top-k experts in each layer."""
    return cp.dense_bytes + cp.top_k * cp.n_layers * cp.bytes_per_expert


def estimate_speed(cp: CheckpointPlan, disk_gbps: float | None, memory_gbps: float | None,
                   disk_unknown: str = "no disk read bandwidth measured",
                   memory_unknown: str = "no memory bandwidth measured on this machine: `localmoe hw` measures it",
                   ) -> SpeedEstimate:
    """The native engine's expected decode tok/s on `cp` with these bandwidths (GB/s, 1e9 bytes): see the section
    comment. The disk figure is not needed when nothing is read from disk; a figure that is needed and unknown gives
    None, with why, rather than a guess."""
    disk, mem = cp.bytes_per_token, memory_bytes_per_token(cp)
    missing = [why for why, need, gbps in ((disk_unknown, disk > 0, disk_gbps), (memory_unknown, True, memory_gbps))
               if need and not (gbps and gbps > 0)]
    if missing:
        return SpeedEstimate(None, disk_gbps, memory_gbps, disk, mem, "; ".join(missing))
    seconds = mem / (memory_gbps * 1e9) + (disk / (disk_gbps * 1e9) if disk else 0.0)  # type: ignore[operator]
    return SpeedEstimate(1 / seconds, disk_gbps, memory_gbps, disk, mem)


def with_speed(choice: EngineChoice, path: str | os.PathLike[str]) -> EngineChoice:
    """`choice` with the native engine's expected speed on this machine, for `localmoe plan`: a display command, so
    it measures what is not cached yet (the disk read bandwidth of `path`'s device, ~0.5 s; the memory bandwidth,
    ~0.25 s). `ask` never comes here. Other choices are returned as they are."""
    cp = choice.plan
    if not (choice.fits and isinstance(cp, CheckpointPlan)) or cp.device != "cpu":
        return choice
    from localmoe.placement import hardware

    hw = hardware.detect(measure=False)
    memory_gbps, _ = hardware.memory_bandwidth(hw)
    disk_gbps, disk_unknown = None, "no disk read bandwidth measured"
    if cp.bytes_per_token:
        # sampled as the engine reads a miss: an expert is three matrices (gate, up, down), one pread each
        chunk = cp.disk_bytes_per_expert // 3 or hardware.DISK_CHUNK_BYTES
        disk_gbps, _ = hardware.disk_bandwidth(path, hw, chunk=chunk)
        if disk_gbps is None:
            try:
                why = hardware.unsampleable(path) or "the sample reads failed"
            except OSError as exc:
                why = f"the file cannot be read ({exc.strerror or exc})"
            disk_unknown = f"no disk read bandwidth: {why}"
    choice.speed = estimate_speed(cp, disk_gbps, memory_gbps, disk_unknown=disk_unknown)
    return choice
