"""Models already on this disk from other tools, used where they lie (never copied): LM Studio's model folders,
Ollama's store (a manifest per model:tag names its GGUF blob) and the Hugging Face hub cache.

Each root follows its tool's own setting when one exists (OLLAMA_MODELS, HF_HUB_CACHE / HF_HOME), else the tool's
default folder; LOCALMOE_LMSTUDIO_DIR, LOCALMOE_OLLAMA_DIR and LOCALMOE_HF_CACHE point elsewhere, and
LOCALMOE_DISCOVER=0 turns discovery off. Only headers are read, and only when a model is used."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from localmoe.home import paths

FORGOTTEN = ".forgotten.json"  # in models/: discovered files `rm` was asked to forget
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class Found:
    id: str
    path: Path
    source: str  # lmstudio | ollama | hf-cache


def _env_path(*names: str) -> Path | None:
    for n in names:
        if os.environ.get(n):
            return Path(os.environ[n]).expanduser()
    return None


def lmstudio_roots() -> list[Path]:
    given = _env_path("LOCALMOE_LMSTUDIO_DIR")
    if given:
        return [given]
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def ollama_root() -> Path:
    return _env_path("LOCALMOE_OLLAMA_DIR", "OLLAMA_MODELS") or Path.home() / ".ollama" / "models"


def hf_cache_root() -> Path:
    given = _env_path("LOCALMOE_HF_CACHE", "HF_HUB_CACHE")
    if given:
        return given
    hf_home = _env_path("HF_HOME")
    return (hf_home or Path.home() / ".cache" / "huggingface") / "hub"


def _lmstudio() -> list[Found]:
    # <root>/<publisher>/<repository>/<file>.gguf; mmproj files are vision projectors, not models
    out = []
    for root in lmstudio_roots():
        for p in sorted(root.glob("*/*/*.gguf")) if root.is_dir() else []:
            if not p.name.lower().startswith("mmproj"):
                out.append(Found(p.stem.lower(), p, "lmstudio"))
    return out


def _ollama() -> list[Found]:
    # manifests/<registry>/<namespace>/<model>/<tag>: JSON whose model layer's digest names blobs/sha256-<hex>
    root = ollama_root()
    out = []
    for m in sorted((root / "manifests").glob("*/*/*/*")) if (root / "manifests").is_dir() else []:
        try:
            layers = json.loads(m.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        digest = next((x.get("digest") for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER), None)
        blob = root / "blobs" / str(digest).replace(":", "-")
        if digest and blob.is_file():
            namespace, model, tag = m.parts[-3], m.parts[-2], m.name
            name = model if namespace == "library" else f"{namespace}/{model}"
            out.append(Found(f"{name}:{tag}".lower(), blob, "ollama"))
    return out


def _hf_cache() -> list[Found]:
    # models--OWNER--REPO/snapshots/<revision>/<file>.gguf (links into blobs/); newest snapshot wins a name
    root = hf_cache_root()
    out: dict[str, Found] = {}
    snaps = sorted(root.glob("models--*/snapshots/*"), key=lambda s: s.stat().st_mtime) if root.is_dir() else []
    for snap in snaps:
        for p in sorted(snap.rglob("*.gguf")):
            if p.is_file() and not p.name.lower().startswith("mmproj"):
                out[p.stem.lower()] = Found(p.stem.lower(), p, "hf-cache")
    return list(out.values())


def forgotten() -> set[str]:
    try:
        return set(json.loads((paths.models_dir() / FORGOTTEN).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return set()


def forget(path: Path) -> None:
    """`rm` of a discovered model: it is no longer listed; its file stays where its tool keeps it."""
    d = paths.models_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (FORGOTTEN + ".tmp")
    tmp.write_text(json.dumps(sorted(forgotten() | {str(path)}), indent=1), encoding="utf-8")
    os.replace(tmp, d / FORGOTTEN)


def discovered() -> list[Found]:
    if os.environ.get("LOCALMOE_DISCOVER", "1") == "0":
        return []
    skip = forgotten()
    seen: set[str] = set()
    out = []
    for f in _lmstudio() + _ollama() + _hf_cache():
        if str(f.path) not in skip and f.id not in seen:
            seen.add(f.id)
            out.append(f)
    return out
