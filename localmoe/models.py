"""Which models exist on this machine and how a name on the command line becomes a file."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import tomllib

from localmoe import paths
from localmoe.errors import LocalmoeError, UsageError


@dataclass(frozen=True)
class ModelRef:
    id: str
    path: Path
    source: str  # "embedded" | "installed" | "file"
    backend: str = "llama.cpp"
    defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # engine arguments

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "source": self.source, "backend": self.backend}


@cache
def catalog() -> list[dict[str, Any]]:
    text = files("localmoe.assets").joinpath("catalog.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["model"]


def _sampling(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("temperature", "top_p", "top_k") if k in entry}


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


def installed_models() -> list[ModelRef]:
    """GGUF files the user put (or `pull`ed) into `<data dir>/models`, then Hugging Face checkpoint directories
    there (a folder with a config.json), which the torch engine runs."""
    d = paths.models_dir()
    if not d.is_dir():
        return []
    found = [ModelRef(p.stem.lower(), p, "installed") for p in sorted(d.glob("*.gguf"))]
    found += [checkpoint_ref(p, "installed") for p in sorted(d.iterdir()) if is_checkpoint_dir(p)]
    return found


def is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def checkpoint_ref(p: Path, source: str = "file") -> ModelRef:
    """A Hugging Face checkpoint directory → a ModelRef for the torch engine, named after the directory."""
    return ModelRef(p.name.lower(), p.resolve(), source, backend="torch")


def list_models() -> list[ModelRef]:
    return embedded_models() + installed_models()


def default_model() -> ModelRef:
    available = list_models()
    if not available:
        raise LocalmoeError(
            "no model installed: run `make setup` (installs the embedded SmolLM2) "
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
    if name in aliases:
        for ref in available:
            if ref.id == aliases[name]:
                return ref
        raise LocalmoeError(f"model {name!r} is in the catalog but not installed (run `make setup`)")
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


def tier_model(tier: str) -> ModelRef:
    """small: the default model; large: the largest installed MoE whose plan fits this machine."""
    if tier == "small":
        return default_model()
    from localmoe.layout import read_layout
    from localmoe.plan import Budget, make_plan

    budget = Budget.detect()
    best: tuple[int, ModelRef] | None = None
    for ref in list_models():
        if ref.backend != "llama.cpp":
            continue
        try:
            layout = read_layout(ref.path)
        except LocalmoeError:
            continue
        if layout.is_moe and make_plan(layout, budget).fits and (best is None or layout.file_bytes > best[0]):
            best = (layout.file_bytes, ref)
    if best is None:
        raise LocalmoeError("the large tier needs an installed MoE model that fits here (none found); "
                            "pass --models instead")
    return best[1]
