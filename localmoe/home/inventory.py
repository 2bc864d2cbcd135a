"""Every model localmoe could run, described once: what `localmoe models` and `models --available` print and the
models screen lists. Local models (embedded, installed, discovered) with the layout read from their files, catalog
files with the layout the catalog states; with a budget, each with the planner's verdict for it and the engine that
would run it. Computed here so the CLI and the UI cannot disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmoe.errors import LocalmoeError
from localmoe.home import catalog, models, pull
from localmoe.units import human_bytes

if TYPE_CHECKING:
    from localmoe.placement.layout import ModelLayout
    from localmoe.placement.plan import Budget, CheckpointPlan, Verdict


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """What `models` shows for a Hugging Face checkpoint directory, from config.json and the shard sizes."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return {
        "architecture": cfg.get("model_type", "?"), "layers": cfg.get("num_hidden_layers", "?"),
        "experts": cfg.get("num_experts") or cfg.get("num_local_experts") or 0,
        "top_k": cfg.get("num_experts_per_tok", 0), "dtype": str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"),
        "context": cfg.get("max_position_embeddings", "?"),
        "bytes": sum(p.stat().st_size for p in Path(path).glob("*.safetensors")),
    }


@dataclass
class ModelInfo:
    """One row: a local model (`ref`) or a catalog file (`candidate`)."""

    id: str  # what --model and [tiers] accept; a catalog file's is `NAME:QUANT`, what `pull` accepts
    source: str  # embedded | installed | file | lmstudio | ollama | hf-cache | catalog
    engine: str  # llama.cpp | torch
    architecture: str = "?"
    layers: int | None = None
    experts: int = 0  # 0: dense
    top_k: int = 0
    quant: str = "?"
    size_bytes: int | None = None
    size_estimated: bool = False  # a catalog size computed from parameters, not the hub's listing
    context: int | None = None
    verdict: Verdict | None = None  # with a budget
    engine_reason: str | None = None  # with a budget: why this engine (the planner's choice for a GGUF)
    error: str | None = None  # the file could not be read
    ref: models.ModelRef | None = None
    layout: ModelLayout | None = None
    config: dict[str, Any] | None = None  # checkpoint_summary, for checkpoint directories
    candidate: catalog.Candidate | None = None
    installed: bool = True  # a catalog file: pulled already
    recommended: bool = False  # the catalog's recommended large tier for the budget
    remote: pull.Target | None = None  # a hub repository's model, planned from its headers (remote_model)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def pull_command(self) -> str | None:
        if self.remote is not None:
            return f"localmoe pull hf:{self.remote.repo}" + (f"/{self.remote.filename}" if self.remote.filename
                                                             and self.remote.kind == "gguf" else "")
        return f"localmoe pull {self.id}" if self.candidate is not None else None

    def layout_text(self) -> str:
        """layers / experts / top-k in a few characters, e.g. "48L 128E k8" or "30L dense"."""
        if self.layers is None:
            return "?"
        return f"{self.layers}L {self.experts}E k{self.top_k}" if self.experts else f"{self.layers}L dense"


def local_models(budget: Budget | None = None) -> list[ModelInfo]:
    """Embedded, installed and discovered models (models.list_models), each with its layout; with `budget`, the
    verdict of its plan on it."""
    from localmoe.placement.layout import read_layout, read_model_layout

    out = []
    incomplete: set[Path] = set()
    for ref in models.list_models():
        if ref.backend == "torch":
            out.append(_checkpoint_info(ref.id, ref.source, ref.path, budget, ref=ref))
            continue
        shard = pull.split_name(ref.path.name)
        if shard is not None and shard[1] > 1:
            # a split GGUF's later shards are not models: the model is its first shard; without it (a split pull
            # under way or interrupted) one row says so
            first = ref.path.parent / pull.shard_names(ref.path.name)[0]
            if not first.exists() and first not in incomplete:
                incomplete.add(first)
                out.append(ModelInfo(ref.id, ref.source, ref.backend, ref=ref, error=(
                    f"shard {shard[1]} of a {shard[2]}-file split GGUF whose first shard {first.name} is not there "
                    "(an interrupted pull? run it again)")))
            continue
        try:
            lay = read_model_layout(ref.path) if shard is not None else read_layout(ref.path)
        except LocalmoeError as exc:
            out.append(ModelInfo(ref.id, ref.source, ref.backend, error=str(exc), ref=ref))
            continue
        out.append(_gguf_info(ref.id, ref.source, lay, budget, split=lay.file_bytes != ref.path.stat().st_size,
                              ref=ref))
    return out


def _checkpoint_info(model_id: str, source: str, path: Path, budget: Budget | None, **kw: Any) -> ModelInfo:
    c = checkpoint_summary(path)
    info = ModelInfo(model_id, source, "torch", str(c["architecture"]), _int(c["layers"]), int(c["experts"] or 0),
                     int(c["top_k"] or 0), c["dtype"], c["bytes"], context=_int(c["context"]), config=c, **kw)
    if budget is not None:
        info.verdict = checkpoint_verdict(path, budget)
    return info


def _gguf_info(model_id: str, source: str, lay: ModelLayout, budget: Budget | None, *, split: bool,
               **kw: Any) -> ModelInfo:
    from localmoe.placement.plan import make_plan, verdict

    info = ModelInfo(model_id, source, "llama.cpp", lay.architecture, lay.n_layers, lay.n_experts,
                     lay.n_experts_used, lay.quantization, lay.file_bytes, context=lay.context_length, layout=lay,
                     **kw)
    if budget is None:
        return info
    if split:
        # llama.cpp opens the other shards from the first one's path; the native engine reads one file
        info.verdict = verdict(make_plan(lay, budget), lay)
        info.engine = "llama.cpp" if info.verdict.kind != "refused" else "none"
        info.engine_reason = "a split GGUF: llama.cpp loads its shards (the native engine reads single files)"
    else:
        _choose(info, lay, budget)
    return info


def remote_model(t: pull.Target, budget: Budget) -> ModelInfo:
    """A hub model (`t`, resolved) planned on `budget` from its headers alone, exactly as `local_models` plans the
    same files on disk: a GGUF (every shard of a split one) or a checkpoint folder's config and safetensors
    headers, read by range requests (pull.remote_replica)."""
    from localmoe.placement.layout import read_model_layout

    with pull.remote_replica(t) as p:
        if t.kind == "checkpoint":
            info = _checkpoint_info(t.id, "hub", p, budget, remote=t)
        else:
            lay = read_model_layout(p)
            info = _gguf_info(t.id, "hub", lay, budget, split=bool(t.parts), remote=t)
            lay.path = f"hf:{t.repo}/{t.filename}"  # not the temporary replica's
    return info


def plan_target(t: pull.Target, budget: Budget | None = None) -> tuple[bool, Verdict]:
    """(a MoE?, the planner's verdict for `budget`, default this machine) of a pull's target, before it is fetched:
    from the catalog's layout, else from the remote headers exactly as `localmoe models` plans the local files
    (remote_model). `pull.pull` takes it as its `plan`."""
    from localmoe.placement.plan import Budget, make_plan, verdict

    budget = budget or Budget.detect()
    if t.entry is not None and t.cfile is not None:
        f = t.cfile
        if t.total:  # the hub's exact size over the catalog's rounded one
            f = catalog.CatalogFile(f.quant, f.file, t.total, "hub", f.default, f.sha256)
        layout = catalog.layout_of(t.entry, f)
        return t.entry.is_moe, verdict(make_plan(layout, budget), layout)
    info = remote_model(t, budget)
    assert info.verdict is not None
    return info.is_moe, info.verdict


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _choose(info: ModelInfo, lay: ModelLayout, budget: Budget) -> None:
    """The engine the planner chooses for a local GGUF (`choose_engine`: llama.cpp while the experts fit in memory,
    the native expert cache when llama.cpp would page them), what `create_engine` will load, and that plan's
    verdict."""
    from localmoe.placement.plan import CheckpointPlan, Verdict, choose_engine, verdict

    try:
        choice = choose_engine(lay, budget)
    except LocalmoeError as exc:
        info.engine, info.verdict = "none", Verdict("refused", "refused", reason=str(exc))
        return
    info.engine_reason = choice.reason
    if choice.backend is None:
        info.engine, info.verdict = "none", Verdict("refused", "refused", reason=choice.reason)
    elif isinstance(choice.plan, CheckpointPlan):
        info.engine, info.verdict = choice.backend, native_verdict(choice.plan)
    else:
        info.engine, info.verdict = choice.backend, verdict(choice.plan, lay)


def checkpoint_verdict(path: Path, budget: Budget) -> Verdict:
    """The torch engine's plan for a checkpoint directory in one word, as `plan` makes it: the GPU's memory is the
    fast tier where there is one, else RAM; experts that do not fit are read from disk when routed to."""
    from localmoe.placement import plan

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if not (config.get("num_experts") or config.get("num_local_experts")):
            return plan.Verdict("refused", "refused", reason="not a MoE checkpoint (the torch engine runs MoEs)")
        device = "cpu" if budget.vram_bytes <= 0 else "mps" if budget.unified else "cuda"
        fast = budget.ram_bytes if device == "cpu" else budget.vram_bytes
        cp = plan.plan_checkpoint(config, plan.checkpoint_tensors(Path(path)), fast, model=str(path), device=device,
                                  warm_budget_bytes=budget.ram_bytes if device == "cuda" else 0)
    except (LocalmoeError, OSError, ValueError) as exc:
        return plan.Verdict("refused", "refused", reason=str(exc))
    return native_verdict(cp)


def native_verdict(cp: CheckpointPlan) -> Verdict:
    """The native engine's plan in the words `plan.verdict` uses for llama.cpp's: fits in VRAM or RAM (every expert
    held in the fast tier), runs from disk (the cache misses read experts), or refused."""
    from localmoe.placement.plan import Verdict

    if not cp.fits:
        return Verdict("refused", "refused", reason=cp.refusal)
    if cp.slots_per_layer >= cp.n_experts:
        return Verdict("ram", "fits in RAM") if cp.device == "cpu" else Verdict("vram", f"fits in {cp.device} memory")
    return Verdict("disk", f"runs from disk, ~{human_bytes(cp.bytes_per_token)} read per token", cp.bytes_per_token)


def catalog_models(budget: Budget, installed: set[str] | None = None) -> list[ModelInfo]:
    """Every downloadable catalog file with the planner's verdict on `budget` (catalog.available), the recommended
    large tier marked; `installed`: local ids (default: what list_models finds)."""
    found = catalog.available(budget)
    best = catalog.recommend(found)
    if installed is None:
        installed = {ref.id for ref in models.list_models()}
    out = []
    for c in found:
        e, f = c.entry, c.file
        lay = e.layout
        # Without the file's header the planner cannot tell whether the native engine runs it: a catalog file that
        # llama.cpp would page from disk (or refuses) gets its engine chosen once pulled.
        engine = "llama.cpp" if c.verdict.kind in ("vram", "ram") else "auto"
        out.append(ModelInfo(
            f"{e.id}:{f.quant}", "catalog", engine, str(lay.get("architecture", "?")), _int(lay.get("layers")),
            int(lay.get("experts", 0)), int(lay.get("experts_per_token", 0)), f.quant, f.size_bytes,
            size_estimated=f.size_source != "hub listing", context=_int(lay.get("context")), verdict=c.verdict,
            candidate=c, installed=_local_ids(e, f) & installed != set(), recommended=c is best))
    return out


def _local_ids(e: catalog.CatalogEntry, f: catalog.CatalogFile) -> set[str]:
    """The ids a pulled catalog file may be installed under: `<entry>-<quant>`, a split one's first shard's."""
    s = pull.split_name(Path(f.file).name)
    return {e.local_id(f)} | ({f"{e.local_id(f)}-00001-of-{s[2]:05d}"} if s else set())
