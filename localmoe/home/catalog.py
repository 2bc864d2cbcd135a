"""The curated catalog (`assets/catalog.toml`): which models localmoe knows by name, where each file lives on the
hub, and what each would do on this machine before a byte of it is downloaded."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from localmoe.errors import LocalmoeError, UsageError

if TYPE_CHECKING:
    from localmoe.placement.layout import ModelLayout
    from localmoe.placement.plan import Budget, Verdict

GB = 1000**3  # the hub lists sizes in decimal gigabytes


@dataclass(frozen=True)
class CatalogFile:
    quant: str
    file: str
    size_bytes: int
    size_source: str
    default: bool = False
    sha256: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    source: str  # embedded | hub
    tier: str  # small | large
    license: str
    description: str
    aliases: tuple[str, ...] = ()
    repo: str | None = None
    rank: int = 1000
    layout: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    files: tuple[CatalogFile, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return int(self.layout.get("experts", 0)) > 0

    @property
    def default_file(self) -> CatalogFile | None:
        return next((f for f in self.files if f.default), self.files[0] if self.files else None)

    def file_for(self, quant: str | None) -> CatalogFile:
        if quant is None:
            f = self.default_file
            if f is None:
                raise UsageError(f"{self.id} has no downloadable files in the catalog")
            return f
        for f in self.files:
            if f.quant.lower() == quant.lower():
                return f
        known = ", ".join(f.quant for f in self.files) or "none"
        raise UsageError(f"{self.id} has no {quant} file in the catalog (quantisations: {known})")

    def local_id(self, f: CatalogFile) -> str:
        """The id a pulled file is installed under: `<entry>-<quant>`, lower case (its file stem in models/)."""
        return f"{self.id}-{f.quant}".lower()


@cache
def raw_catalog() -> list[dict[str, Any]]:
    text = files("localmoe.assets").joinpath("catalog.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["model"]


def _entry(d: dict[str, Any]) -> CatalogEntry:
    try:
        fs = tuple(CatalogFile(quant=f["quant"], file=f["file"], size_bytes=int(float(f["size_gb"]) * GB),
                               size_source=f["size_source"], default=bool(f.get("default", False)),
                               sha256=f.get("sha256")) for f in d.get("files", []))
        return CatalogEntry(id=d["id"], source=d["source"], tier=d.get("tier", "small"), license=d["license"],
                            description=d["description"], aliases=tuple(d.get("aliases", [])), repo=d.get("repo"),
                            rank=int(d.get("rank", 1000)), layout=dict(d.get("layout", {})), files=fs, raw=d)
    except KeyError as exc:
        raise LocalmoeError(f"catalog entry {d.get('id', '?')!r} lacks {exc.args[0]!r}") from None


@cache
def entries() -> tuple[CatalogEntry, ...]:
    return tuple(_entry(d) for d in raw_catalog())


def names() -> list[str]:
    return [n for e in entries() for n in (e.id, *e.aliases)]


def find(name: str) -> CatalogEntry | None:
    low = name.lower()
    return next((e for e in entries() if low == e.id or low in (a.lower() for a in e.aliases)), None)


def closest(name: str, n: int = 3) -> list[str]:
    """Catalog ids nearest to a misspelt name, for a one-line error."""
    ids = [e.id for e in entries() if e.files]
    low = name.lower()
    close = difflib.get_close_matches(low, ids, n=n, cutoff=0.4)
    return close or [i for i in ids if low.split("-")[0] and i.startswith(low.split("-")[0])][:n]


def lookup(spec: str) -> tuple[CatalogEntry, CatalogFile]:
    """`NAME[:QUANT]` → the catalog entry and file; an unknown name is refused with the closest names."""
    name, _, quant = spec.partition(":")
    entry = find(name)
    if entry is None:
        near = closest(name)
        hint = f" (closest: {', '.join(near)})" if near else ""
        raise UsageError(f"{name!r} is not in the catalog{hint}; see `localmoe models --available`")
    if not entry.files:
        raise UsageError(f"{entry.id} is not downloaded: it ships with localmoe's setup")
    return entry, entry.file_for(quant or None)


def layout_of(entry: CatalogEntry, f: CatalogFile) -> ModelLayout:
    """The planner's view of a catalog file, from the catalog's facts alone."""
    from localmoe.placement.plan import shaped_layout

    lay = entry.layout
    return shaped_layout(
        name=entry.local_id(f), architecture=lay["architecture"], n_layers=int(lay["layers"]),
        n_experts=int(lay.get("experts", 0)), n_experts_used=int(lay.get("experts_per_token", 0)),
        total_params=float(lay["total_params"]), active_params=float(lay["active_params"]),
        file_bytes=f.size_bytes, embedding_length=int(lay["hidden"]), vocab_size=int(lay["vocab"]),
        n_heads=int(lay["heads"]), n_kv_heads=int(lay["kv_heads"]), head_dim=int(lay["head_dim"]),
        context_length=int(lay["context"]), quantization=f.quant,
    )


@dataclass
class Candidate:
    entry: CatalogEntry
    file: CatalogFile
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        e, f = self.entry, self.file
        return {"id": e.id, "quant": f.quant, "name": f"{e.id}:{f.quant}", "tier": e.tier, "repo": e.repo,
                "file": f.file, "bytes": f.size_bytes, "size_source": f.size_source, "default": f.default,
                "moe": e.is_moe, "experts": e.layout.get("experts", 0),
                "experts_per_token": e.layout.get("experts_per_token", 0),
                "total_params": e.layout.get("total_params"), "active_params": e.layout.get("active_params"),
                "license": e.license, "description": e.description, "verdict": self.verdict.to_dict()}


def available(budget: Budget) -> list[Candidate]:
    """Every downloadable catalog file with the planner's verdict on `budget`."""
    from localmoe.placement.plan import make_plan, verdict

    out = []
    for e in entries():
        for f in e.files:
            layout = layout_of(e, f)
            out.append(Candidate(e, f, verdict(make_plan(layout, budget), layout)))
    return out


def recommend(candidates: list[Candidate]) -> Candidate | None:
    """The large tier for this machine: by the catalog's rank, the first MoE whose default quantisation runs without
    reading weights from disk per token; failing that, the one among them that reads the least from disk."""
    large = sorted((c for c in candidates if c.entry.tier == "large" and c.entry.is_moe and c.file.default),
                   key=lambda c: c.entry.rank)
    in_memory = [c for c in large if c.verdict.kind in ("vram", "ram")]
    if in_memory:
        return in_memory[0]
    from_disk = [c for c in large if c.verdict.kind == "disk"]
    return min(from_disk, key=lambda c: c.verdict.disk_bytes_per_token) if from_disk else None
