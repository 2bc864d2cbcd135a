"""`localmoe import` and `localmoe rm`: adding a model file that is already on disk, and removing a model, with
one rule: localmoe deletes only files it downloaded or copied itself; anything else is only forgotten."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import discover, models, paths, pull

_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]{0,99}")


def _model_name(name: str) -> str:
    """A model's name as a file name inside models/: letters, digits and `._+-`, not starting with a dot, so that
    no name can reach outside the folder (`../x`, `a/b`) or hide in it (`.x`), nor take the embedded model's."""
    low = name.lower()
    if not _NAME.fullmatch(low) or ".." in low:
        raise UsageError(f"cannot name a model {name!r}: use letters, digits, '.', '_', '+' or '-' (at most 100, "
                         "not starting with '.' or '-'; --name NAME gives it another)")
    if models.is_embedded_id(low):
        raise UsageError(f"{low} is the embedded model's name: choose another with --name")
    return low


def _slug(stem: str) -> str:
    """A file's own name as a model name: what a name may not hold becomes '-' ("my model (1)" → "my-model-1")."""
    slug = re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9._+-]+", "-", stem.lower()))
    return slug.lstrip("-._+").rstrip("-.")[:100] or stem


def import_model(src: str, *, copy: bool = False, name: str | None = None) -> models.ModelRef:
    """A GGUF file or a Hugging Face checkpoint folder into models/: a symbolic link (the file stays where it is),
    or with `copy` a copy of its own. Checked to be readable first."""
    p = Path(src).expanduser().resolve()
    if not p.exists():
        raise UsageError(f"nothing to import at {p}")
    if p.is_dir():
        if not models.is_checkpoint_dir(p):
            raise UsageError(f"{p} is a folder without config.json: not a Hugging Face checkpoint")
        dest_name = _model_name(name or _slug(p.name))
        if dest_name.endswith(".gguf"):  # a folder under a GGUF's name would be listed as one
            raise UsageError(f"cannot name a checkpoint folder {dest_name!r}: a name ending in .gguf is a GGUF file's")
    else:
        from localmoe.placement.layout import read_layout

        read_layout(p)  # refuses a file that is not a readable GGUF, in its own words
        dest_name = f"{_model_name(name or _slug(p.stem))}.gguf"
    d = paths.models_dir()
    d.mkdir(parents=True, exist_ok=True)
    dest = d / dest_name
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"a model named {Path(dest_name).stem} is already installed ({dest}); "
                         "choose another with --name")
    if copy:
        free = shutil.disk_usage(d).free
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        if size + pull.SPARE_BYTES > free:
            from localmoe.units import human_bytes

            raise LocalmoeError(f"not enough disk space to copy {p.name}: it needs {human_bytes(size)}, "
                                f"{d} has {human_bytes(free)} free (import without --copy links it instead)")
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dest)
    else:
        os.symlink(p, dest, target_is_directory=p.is_dir())
    pull.record(dest_name, {"how": "copied" if copy else "linked", "source_path": str(p)})
    return models.checkpoint_ref(dest, "installed") if p.is_dir() else models.ModelRef(dest.stem.lower(), dest,
                                                                                        "installed")


@dataclass
class Removal:
    ref: models.ModelRef
    action: str  # delete | unlink | forget
    frees: int  # bytes the disk gets back
    path: Path
    shards: list[Path] = field(default_factory=list)  # a split GGUF's other files, deleted with it

    def describe(self) -> str:
        from localmoe.units import human_bytes

        if self.action == "delete":
            more = f" and its {len(self.shards)} other shards" if self.shards else ""
            return f"delete {self.ref.id} ({self.path}{more}), freeing {human_bytes(self.frees)}"
        what = "remove the link" if self.action == "unlink" else "forget"
        return f"{what} {self.ref.id}; its file stays at {self._target()} (frees nothing)"

    def _target(self) -> Path:
        return self.path.resolve() if self.action == "unlink" else self.path


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return p.stat().st_size


def plan_removal(name: str) -> Removal:
    ref = models.resolve(name)
    if ref.source == "embedded":
        raise UsageError(f"{ref.id} ships with localmoe's setup and cannot be removed here")
    if ref.source in ("lmstudio", "ollama", "hf-cache"):
        return Removal(ref, "forget", 0, ref.path)
    d = paths.models_dir()
    entry = None
    local = ref.path
    for candidate in (ref.path, d / ref.path.name, d / ref.id):
        if candidate.parent == d and candidate.name in pull.registry():
            entry = pull.registry().get(candidate.name)
            local = candidate
            break
    if entry is None:
        where = "a path given on the command line" if ref.source == "file" else "not downloaded by localmoe"
        raise UsageError(f"{ref.id} is {where}: localmoe deletes only what it pulled or copied; "
                         f"delete {ref.path} yourself if you mean to")
    if local.is_symlink():
        return Removal(ref, "unlink", 0, local)
    shards = [d / name for name in entry.get("shards", []) if name != local.name and (d / name).is_file()]
    return Removal(ref, "delete", _size(local) + sum(map(_size, shards)), local, shards)


def remove(r: Removal) -> None:
    if r.action == "forget":
        discover.forget(r.path)
        return
    if r.action == "delete" and r.path.is_dir() and not r.path.is_symlink():
        shutil.rmtree(r.path)
    else:
        r.path.unlink()
    for p in [r.path, *r.shards]:
        for leftover in (p, p.with_name(p.name + ".part")):
            if leftover != r.path and leftover.exists():
                leftover.unlink()
    pull.record(r.path.name, None)
