"""Which models exist on this machine and how a name on the command line becomes a file."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import install, paths
from localmoe.home.catalog import raw_catalog


@dataclass(frozen=True)
class ModelRef:
    id: str
    path: Path
    source: str  # "embedded" | "installed" | "file" | "lmstudio" | "ollama" | "hf-cache"
    backend: str = "llama.cpp"
    defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # engine arguments
    # the backend was asked for (--backend): the planner does not choose the engine of a GGUF MoE
    pinned: bool = field(default=False, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "source": self.source, "backend": self.backend}


def catalog() -> list[dict[str, Any]]:
    return raw_catalog()


SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
# What a model runs with when neither its catalog entry nor its file says otherwise: llama.cpp's classic repeat
# penalty and min-p, which end the loops small models fall into when decoded near-greedily, and the loop guard; a
# chat that outgrows the context drops its oldest exchanges.
SANE_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                                 "repeat_penalty": 1.1, "loop_guard": True, "fit_context": True}


def _sampling(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in SAMPLING if k in entry}


def system_prompt(path: str | Path) -> str | None:
    """The system message localmoe gives a catalog model's file where a conversation has none (catalog
    `system_prompt`), or None: the file's chat template then decides. Keyed by file name, so the router's probe,
    which reads questions on the small model's file, renders them as the answering session does."""
    name = Path(path).name
    for entry in catalog():
        if entry.get("filename") == name and isinstance(entry.get("system_prompt"), str):
            return entry["system_prompt"]
    return None


def generation_defaults(ref: ModelRef) -> dict[str, Any]:
    """GenerationConfig fields for `ref`: its catalog entry, else its GGUF file's recommended sampling
    (`general.sampling.*`), else SANE_DEFAULTS. Settings and flags go on top of these."""
    from_file: dict[str, Any] = {}
    if ref.backend in ("llama.cpp", "torch") and ref.path.suffix.lower() == ".gguf":
        from localmoe.placement.layout import read_layout

        try:
            from_file = {k: v for k, v in read_layout(ref.path).sampling.items() if k in SAMPLING}
        except LocalmoeError:
            pass  # an unreadable file fails where it is loaded, with its own message
    return {**SANE_DEFAULTS, **from_file, **ref.defaults}


def embedded_models() -> list[ModelRef]:
    """Catalog models whose weights ship in an installed package, found with find_spec (never imported)."""
    found = []
    for entry in catalog():
        if entry.get("source") != "embedded":
            continue
        spec = importlib.util.find_spec(entry["package"])
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(loc) / entry["filename"]
            if candidate.is_file():
                found.append(ModelRef(entry["id"], candidate, "embedded", defaults=_sampling(entry)))
                break
    return found


def is_embedded_id(model_id: str) -> bool:
    """Whether `model_id` names an embedded model: another model under that name could be neither used nor removed
    (the embedded one answers to it), so `import` and `pull` refuse it."""
    return model_id in {m.id for m in embedded_models()}


def installed_models() -> list[ModelRef]:
    """GGUF files the user put (or `pull`ed) into `<data dir>/models`, then Hugging Face checkpoint directories
    there (a folder with a config.json), which the torch engine runs."""
    from localmoe.placement.gguf_file import shard_names, split_name

    d = paths.models_dir()
    if not d.is_dir():
        return []
    files = sorted(d.glob("*.gguf"))
    present = {p.name for p in files}

    def stands_for_its_model(p: Path) -> bool:
        """A split GGUF is one model, named by its first shard (llama.cpp opens the others from it); without that
        shard (an interrupted pull), its lowest present shard stands for it, so the model is still seen."""
        if (s := split_name(p.name)) is None or s[1] == 1:
            return True
        return next(n for n in shard_names(p.name) if n in present) == p.name

    found = [ModelRef(p.stem.lower(), p, "installed") for p in files if stands_for_its_model(p)]
    found += [checkpoint_ref(p, "installed") for p in sorted(d.iterdir()) if is_checkpoint_dir(p)]
    return found


def is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def checkpoint_ref(p: Path, source: str = "file") -> ModelRef:
    """A Hugging Face checkpoint directory → a ModelRef for the torch engine, named after the directory."""
    return ModelRef(p.name.lower(), p.resolve(), source, backend="torch")


def discovered_models() -> list[ModelRef]:
    """GGUF files of LM Studio, Ollama and the Hugging Face hub cache, used where they lie."""
    from localmoe.home import discover

    return [ModelRef(f.id, f.path, f.source) for f in discover.discovered()]


def list_models() -> list[ModelRef]:
    """Embedded, installed (pulled, imported or put in models/), then discovered models; the first of an id wins
    (`shadowed_models` lists the installed ones that lose)."""
    found = _by_id()[0]
    ids = {ref.id for ref in found}
    return found + [ref for ref in discovered_models() if ref.id not in ids]


def shadowed_models() -> list[ModelRef]:
    """Installed models no id reaches, because an earlier model has theirs: a file put in models/ under the embedded
    model's name, or two files whose names differ only in case. `localmoe models` names them, to be renamed."""
    return _by_id()[1]


def _by_id() -> tuple[list[ModelRef], list[ModelRef]]:
    """Embedded and installed models, the first of an id kept, and those whose id was taken (no discovery: other
    tools' stores are scanned only by list_models)."""
    found: list[ModelRef] = []
    hidden: list[ModelRef] = []
    for ref in embedded_models() + installed_models():
        (hidden if any(ref.id == f.id for f in found) else found).append(ref)
    return found, hidden


def default_model() -> ModelRef:
    available = list_models()
    if not available:
        raise LocalmoeError(
            f"no model installed: run `{install.install_command()}` (installs the embedded SmolLM2) "
            f"or put a .gguf file in {paths.models_dir()}"
        )
    return available[0]


def resolve(name: str | None) -> ModelRef:
    """A model id, alias, path to a .gguf file or to a Hugging Face checkpoint directory → ModelRef;
    None means the default model."""
    if not name:
        return default_model()
    available = list_models()
    for ref in available:
        if name == ref.id:
            return ref
    aliases = {a: e["id"] for e in catalog() for a in e.get("aliases", [])}
    aliases.update({e["id"]: e["id"] for e in catalog()})
    if name in aliases:
        wanted = aliases[name]
        for ref in available:
            if ref.id == wanted:
                return ref
        # a pulled catalog model is installed as `<id>-<quant>`: the name alone means any quantisation of it
        pulled = [ref for ref in available if ref.id.startswith(wanted + "-")]
        if pulled:
            return pulled[0]
        package = next((e.get("package") for e in catalog() if e["id"] == wanted), None)
        how = (f"run `{install.install_command(package.replace('_', '-'))}`" if package
               else f"run `localmoe pull {wanted}`")
        raise UsageError(f"model {name!r} is in the catalog but not installed ({how})")
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf" or p.exists() or "/" in name:
        if not p.exists():
            raise LocalmoeError(f"model file not found: {p}")
        if is_checkpoint_dir(p):
            return checkpoint_ref(p)
        if p.is_dir():
            raise LocalmoeError(f"model directory {p} has no config.json: not a Hugging Face checkpoint")
        if not p.is_file():
            raise LocalmoeError(f"model path is not a file: {p}")
        return ModelRef(p.stem.lower(), p.resolve(), "file")
    known = ", ".join(r.id for r in available) or "none"
    raise UsageError(
        f"unknown model {name!r} (installed: {known}; or pass a path to a .gguf file or checkpoint directory)"
    )


def with_backend(ref: ModelRef, backend: str) -> ModelRef:
    """`ref` pinned to `backend` (`--backend`): a GGUF runs on llama.cpp, or on torch when it is an MoE the native
    engine runs; a checkpoint directory on torch only. Anything else is one line (UsageError); reads headers only."""
    gguf = ref.path.suffix.lower() == ".gguf" and ref.backend in ("llama.cpp", "torch")
    if backend == "torch" and gguf:
        from localmoe.placement.plan import native_gguf_view

        try:
            native_gguf_view(str(ref.path))
        except LocalmoeError as exc:
            raise UsageError(f"{ref.id} cannot run on the torch backend: "
                                f"{str(exc).removesuffix('; use the llama.cpp backend')}") from None
    elif not (backend == ref.backend or (gguf and backend == "llama.cpp")):
        raise UsageError(f"{ref.id} runs on the {ref.backend} backend, not {backend}")
    return replace(ref, backend=backend, pinned=True)


def check_loadable(ref: ModelRef) -> None:
    """Refuse (UsageError, one line) a model whose file cannot be read or whose plan does not fit here, before a
    screen opens on it; reads headers only."""
    try:
        if ref.path.suffix.lower() == ".gguf" and ref.backend in ("llama.cpp", "torch"):
            from localmoe.placement.plan import choose_engine_for

            # the planner's engine, or the pinned one: refused only when that does not fit either
            choose_engine_for(ref.path, backend=ref.backend if ref.pinned else None).raise_if_refused()
        elif ref.backend == "torch":
            import json

            json.loads((ref.path / "config.json").read_text(encoding="utf-8"))
    except UsageError:
        raise
    except LocalmoeError as exc:
        raise UsageError(f"cannot load {ref.id}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load {ref.id}: {exc}") from None


def tier_model(tier: str) -> ModelRef:
    """small: the default model; large: the installed MoE with the most parameters whose plan fits this machine."""
    if tier == "small":
        return default_model()
    from localmoe.placement.layout import read_model_layout
    from localmoe.placement.plan import Budget, choose_engine

    budget = Budget.detect()
    best: tuple[tuple[int, int], ModelRef] | None = None
    for ref in list_models():
        if ref.backend != "llama.cpp":
            continue
        try:
            layout = read_model_layout(ref.path)
        except LocalmoeError:
            continue
        # fits on either engine: a MoE whose experts do not fit in RAM runs from the native expert cache
        # largest by parameters, not bytes: a 4-bit file of a bigger model is smaller than an f32 of a lesser one
        size = (layout.n_params, layout.file_bytes)
        if layout.is_moe and choose_engine(layout, budget).fits and (best is None or size > best[0]):
            best = (size, ref)
    if best is None:
        # said by the CLI and the screens alike: no flag of one of them in it
        raise LocalmoeError("the large tier needs an installed MoE model that fits here (none found): add one "
                            "(`localmoe models --available` lists those that fit), or benchmark a model by name "
                            "with the direct policy")
    return best[1]


@cache
def large_tier_hint() -> str:
    """How to get a large tier, naming the catalog model recommended for this machine (planned once a process)."""
    from localmoe.home import catalog
    from localmoe.placement.plan import Budget

    try:
        best = catalog.recommend(catalog.available(Budget.detect()))
    except LocalmoeError:
        best = None
    if best is None:
        return f"put a MoE .gguf in {paths.models_dir()} or set [tiers] large in settings.toml"
    return (f"get {best.entry.id} ({best.file.quant}, {best.verdict.label} here) with `localmoe pull "
            f"{best.entry.id}` (others: `localmoe models --available`), or put a MoE .gguf in {paths.models_dir()}")
