"""`localmoe pull`: a model from the Hugging Face hub (or the endpoint HF_ENDPOINT names) into `<data dir>/models`,
planned before it is fetched: one GGUF file, every shard of a split GGUF (llama.cpp's `NAME-00001-of-00003.gguf`),
or the files of a safetensors checkpoint folder for the native engine.

huggingface-hub supplies the endpoint, offline and token settings, the file's URL and its metadata (size, and for
LFS files the SHA-256 as X-Linked-Etag). The bytes are fetched here, with ranged GETs into `<file>.part`: an
interrupted `hf_hub_download` starts again at byte 0, which for a 17 GB file is not an option."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import catalog, install, paths
from localmoe.placement.gguf_file import shard_names, split_name
from localmoe.units import human_bytes

if TYPE_CHECKING:
    from localmoe.placement.layout import ModelLayout
    from localmoe.placement.plan import Verdict

REGISTRY = ".pulled.json"  # in models/: what pull downloaded, so that `rm` deletes only those files
CHUNK = 1 << 20
HEADER_PROBE = 1 << 20  # the first range read for a GGUF header; doubled until the header parses
HEADER_MAX = 64 << 20
SPARE_BYTES = 256 << 20  # left free on the disk after a download, for the database and the OS
_SHA256 = re.compile(r"[0-9a-f]{64}")
PARTIAL_DIR = ".partial"  # in models/: checkpoint folders being pulled (not a model until every file is there)
# The files of a checkpoint folder the native engine (and its tokenizer) reads; the weights are the *.safetensors
# its index names, or every top-level one without an index. Anything else (README, *.bin, original/) is left.
CHECKPOINT_FILES = re.compile(r"^(config\.json|generation_config\.json|tokenizer[^/]*|special_tokens_map\.json|"
                              r"added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json)|"
                              r"model\.safetensors\.index\.json)$")
SAFETENSORS_PROBE = 64 << 10  # the first range read of a safetensors file; its header length says what follows


@dataclass
class Target:
    """What a pull fetches: one file, or (kind "checkpoint", or a split GGUF) a model of several files, `parts`.
    A split GGUF is named by its first shard (`filename`, `local_name`), as llama.cpp opens it."""

    repo: str
    filename: str
    local_name: str  # the file (a checkpoint: folder) name in models/; its stem (folder: name) is the model's id
    entry: catalog.CatalogEntry | None = None
    cfile: catalog.CatalogFile | None = None
    size: int | None = None
    sha256: str | None = None
    commit: str | None = None
    url: str = ""
    kind: str = "gguf"  # gguf | checkpoint
    parts: list[Target] = field(default_factory=list)  # every file of a split GGUF or a checkpoint, in order
    dest_dir: Path | None = None  # where this file goes when not models/ (a checkpoint's files: its staging folder)
    header_bytes: int = 0  # bytes fetched to plan it (headers, config): what `models --available` reports

    @property
    def id(self) -> str:
        return self.local_name.lower() if self.kind == "checkpoint" else Path(self.local_name).stem.lower()

    @property
    def dest(self) -> Path:
        return (self.dest_dir or paths.models_dir()) / self.local_name

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def staging(self) -> Path:
        """A checkpoint's files are fetched here and the folder moved into models/ once whole."""
        return paths.models_dir() / PARTIAL_DIR / self.local_name

    @property
    def files(self) -> list[Target]:
        return self.parts or [self]

    @property
    def total(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(n is None for n in sizes) else sum(n for n in sizes if n is not None)

    @property
    def label(self) -> str:
        """The model's files in a few words, for messages."""
        if self.kind == "checkpoint":
            return f"hf:{self.repo} ({len(self.parts)} files)" if self.parts else f"hf:{self.repo}"
        return self.filename + (f" ({len(self.parts)} shards)" if self.parts else "")

    def installed(self) -> bool:
        if self.kind == "checkpoint":
            return (self.dest / "config.json").is_file()
        return bool(self.local_name) and all(f.dest.exists() for f in self.files)


@dataclass
class PullResult:
    target: Target
    path: Path | None
    fetched_bytes: int = 0
    resumed_from: int = 0
    verdict: Verdict | None = None
    large_tier_set: bool = False
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {"id": t.id, "kind": t.kind, "repo": t.repo, "file": t.filename, "bytes": t.total, "sha256": t.sha256,
                "files": [{"file": f.filename, "bytes": f.size, "sha256": f.sha256} for f in t.files],
                "path": str(self.path) if self.path else None, "fetched_bytes": self.fetched_bytes,
                "resumed_from": self.resumed_from, "dry_run": self.dry_run, "large_tier_set": self.large_tier_set,
                "verdict": self.verdict.to_dict() if self.verdict else None, "notes": self.notes}


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils  # noqa: F401 (the submodules are not attributes until imported)
    except ImportError:
        raise LocalmoeError("pulling models needs huggingface-hub: "
                            f"`{install.install_command('huggingface-hub', no_deps=False)}`") from None
    return huggingface_hub


def endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface-hub reads it once, at import), else its default."""
    hub = _hub()
    return (os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    hub = _hub()
    return hub.constants.HF_HUB_OFFLINE or hub.constants._is_true(os.environ.get("HF_HUB_OFFLINE"))


def parse(spec: str) -> Target:
    """`NAME[:QUANT]` (the catalog) or `hf:OWNER/REPO[/FILE]` → what to fetch (the file may still be unknown)."""
    if spec.startswith("hf:"):
        parts = spec[3:].strip("/").split("/", 2)
        if len(parts) < 2 or not all(parts[:2]):
            raise UsageError(f"{spec!r}: write hf:OWNER/REPO or hf:OWNER/REPO/FILE.gguf")
        # the hub's own rule for names; it also keeps a checkpoint's folder (models/<REPO>) inside models/
        if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) and ".." not in p for p in parts[:2]):
            raise UsageError(f"{spec!r}: OWNER and REPO are letters, digits, '.', '_' and '-'")
        filename = parts[2] if len(parts) == 3 else ""
        if filename and not filename.lower().endswith(".gguf"):
            raise UsageError(f"{spec!r}: name a .gguf file, or write hf:{parts[0]}/{parts[1]} for the repository's "
                             "GGUF or safetensors checkpoint")
        t = Target(f"{parts[0]}/{parts[1]}", filename, Path(filename).name if filename else "")
    else:
        entry, f = catalog.lookup(spec)
        assert entry.repo is not None
        t = Target(entry.repo, f.file, f"{entry.local_id(f)}.gguf", entry, f, sha256=f.sha256)
    _split_parts(t)
    return t


def _split_parts(t: Target) -> None:
    """A shard's name → the model's first shard, and every shard as a part (a catalog file's under its local id)."""
    s = split_name(Path(t.filename).name) if t.filename else None
    if s is None:
        return
    names = shard_names(t.filename)
    if t.entry is not None and t.cfile is not None:
        local = [f"{t.entry.local_id(t.cfile)}-{k:05d}-of-{s[2]:05d}.gguf" for k in range(1, s[2] + 1)]
    else:
        local = [Path(n).name for n in names]
    t.filename, t.local_name, t.sha256 = names[0], local[0], None  # a catalog checksum is the single file's
    t.parts = [Target(t.repo, n, ln) for n, ln in zip(names, local, strict=True)]


def _hub_error(exc: Exception, what: str) -> LocalmoeError:
    """huggingface-hub's and httpx's exceptions → one line that names the endpoint."""
    hub = _hub()
    errors = hub.errors
    ep = endpoint()
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return LocalmoeError(f"cannot fetch {what}: HF_HUB_OFFLINE is set (unset it to download)")
    if isinstance(exc, errors.GatedRepoError):
        return LocalmoeError(f"{what} is gated on {ep}: accept its licence on the hub and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return LocalmoeError(f"repository {what.split(':')[0]} not found on {ep} (private? set HF_TOKEN)")
    if isinstance(exc, errors.EntryNotFoundError):
        return LocalmoeError(f"{what} not found on {ep}")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return LocalmoeError(f"the hub at {ep} answered HTTP {status} for {what}")
    return LocalmoeError(f"cannot reach the hub at {ep} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")


def _http() -> Any:
    """huggingface-hub's HTTP client library: httpx2 from its 2.x releases, httpx before."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _call(what: str, fn: Callable[[], Any]) -> Any:
    httpx2 = _http()
    hub = _hub()
    try:
        return fn()
    except (hub.errors.HfHubHTTPError, hub.errors.OfflineModeIsEnabled, hub.errors.EntryNotFoundError,
            httpx2.HTTPError, OSError) as exc:
        raise _hub_error(exc, what) from None


def _choose_file(t: Target) -> None:
    """`hf:OWNER/REPO` without a file: its one GGUF model (a single file or a split's first shard), else its Q4_K_M,
    else a list to choose from; a repository without GGUF files but with config.json and *.safetensors is a
    checkpoint folder."""
    hub = _hub()
    api = hub.HfApi(endpoint=endpoint())
    # model_info, not list_repo_files: its one GET fails at once, where the paginated listing retries an
    # unreachable endpoint for half a minute with a warning per try
    info = _call(t.repo, lambda: api.model_info(t.repo))
    names = [s.rfilename for s in info.siblings or []]
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower())
    # a split model is one choice, named by its first shard
    ggufs = [n for n in ggufs if (s := split_name(Path(n).name)) is None or s[1] == 1]
    if not ggufs:
        _checkpoint_files(t, names)
        return
    pick = ggufs if len(ggufs) == 1 else [n for n in ggufs if "q4_k_m" in n.lower()]
    if len(pick) != 1:
        raise UsageError(f"hf:{t.repo} holds {len(ggufs)} GGUF models; name one: "
                         + ", ".join(f"hf:{t.repo}/{n}" for n in ggufs[:6]) + (" …" if len(ggufs) > 6 else ""))
    t.filename, t.local_name = pick[0], Path(pick[0]).name
    _split_parts(t)


def _checkpoint_files(t: Target, names: list[str]) -> None:
    """The repository as a checkpoint folder: config, tokenizer and index files, and the weights the index names
    (every top-level *.safetensors without one); nothing else it holds is fetched."""
    top = [n for n in names if "/" not in n]
    weights = sorted(n for n in top if n.endswith(".safetensors"))
    if "config.json" not in top or not weights:
        raise UsageError(f"hf:{t.repo} holds no .gguf file and no safetensors checkpoint (config.json and "
                         "*.safetensors): nothing localmoe can run")
    t.kind, t.local_name = "checkpoint", t.repo.split("/")[1]
    small = sorted(n for n in top if CHECKPOINT_FILES.match(n))
    t.parts = [Target(t.repo, n, n, dest_dir=t.staging) for n in small]
    if "model.safetensors.index.json" in small:
        index = next(f for f in t.parts if f.filename == "model.safetensors.index.json")
        _resolve_file(index, None)
        try:
            weights = sorted(set(json.loads(_prefix(index, index.size or 0, t))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LocalmoeError(f"hf:{t.repo}: model.safetensors.index.json is not a safetensors index") from None
        missing = [n for n in weights if n not in top]
        if missing:
            raise LocalmoeError(f"hf:{t.repo}: its index names {missing[0]}, which the repository does not hold")
    t.parts += [Target(t.repo, n, n, dest_dir=t.staging) for n in weights]


def _resolve_file(f: Target, revision: str | None) -> None:
    """One HEAD request: the file's size, commit and (for LFS files) SHA-256."""
    if f.url and f.size is not None:
        return
    hub = _hub()
    f.url = hub.hf_hub_url(f.repo, f.filename, revision=revision, endpoint=endpoint())
    meta = _call(f"{f.repo}:{f.filename}",
                 lambda: hub.get_hf_file_metadata(f.url, endpoint=endpoint(), retry_on_errors=False))
    f.size, f.commit = meta.size, meta.commit_hash
    etag = (meta.etag or "").lower()
    if f.sha256 and _SHA256.fullmatch(etag) and etag != f.sha256.lower():
        raise LocalmoeError(f"{f.repo}/{f.filename} on {endpoint()} has SHA-256 {etag[:12]}…, not the "
                            f"catalog's {f.sha256[:12]}…: the file changed; not downloading it")
    f.sha256 = f.sha256 or (etag if _SHA256.fullmatch(etag) else None)


def resolve_remote(t: Target) -> None:
    """Ask the hub which files make the model (a listing when no file is named) and each one's size, commit and
    checksum (one HEAD request per file; all but the first pinned to the first one's commit)."""
    if _offline():
        raise LocalmoeError(f"cannot fetch {t.repo}/{t.filename or '…'}: HF_HUB_OFFLINE is set "
                            "(unset it to download)")
    if not t.filename and not t.parts:
        _choose_file(t)
    first = t.files[0]
    _resolve_file(first, None)
    for f in t.files[1:]:
        _resolve_file(f, first.commit)
    if t.parts:
        t.size, t.commit = t.total, first.commit
        if t.kind == "gguf":
            t.url, t.sha256 = first.url, first.sha256


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    hub = _hub()
    headers = hub.utils.build_hf_headers()  # the token from HF_TOKEN or `hf auth login`, the user agent
    headers["Accept-Encoding"] = "identity"
    return {**headers, **(extra or {})}


def _ranged(t: Target, start: int, stop: int | None = None) -> Any:
    hub = _hub()
    rng = f"bytes={start}-" + ("" if stop is None else str(stop - 1))
    return hub.utils.get_session().stream("GET", t.url, headers=_headers({"Range": rng}), follow_redirects=True,
                                          timeout=hub.constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _prefix(f: Target, n: int, into: Target | None = None) -> bytes:
    """The first `n` bytes of a remote file: from what an earlier pull left on disk when it holds them (no byte is
    fetched twice), else one range request; the bytes fetched are counted on `into` (default `f`)."""
    httpx2 = _http()
    assert f.size is not None
    n = min(n, f.size)
    for local in (f.dest, f.part) if f.local_name else ():
        if local.is_file() and local.stat().st_size >= n:
            with open(local, "rb") as src:
                return src.read(n)
    if n == 0:
        return b""
    try:
        with _ranged(f, 0, n) as r:
            r.raise_for_status()
            data = r.read()
    except httpx2.HTTPError as exc:
        raise _hub_error(exc, f"{f.repo}:{f.filename}") from None
    (into or f).header_bytes += len(data)
    return data[:n]


def _gguf_replica(f: Target, out: Path, into: Target, probe: int) -> None:
    """`out`: the GGUF's header (read `probe` bytes first, doubled until it parses) in a sparse file of the remote
    size, which the local readers take for the whole file without its tensors being fetched."""
    from localmoe.placement.gguf_file import GGUFFormatError, read_header

    assert f.size is not None
    n = probe
    while True:
        out.write_bytes(_prefix(f, n, into))
        try:
            read_header(out)
            break
        except GGUFFormatError as exc:
            if "unexpected end" not in str(exc) or n >= min(HEADER_MAX, f.size):
                raise LocalmoeError(f"{f.filename} on the hub is not a readable GGUF file ({exc})") from None
            n *= 2
    with open(out, "r+b") as fh:
        fh.truncate(f.size)


def _safetensors_replica(f: Target, out: Path, into: Target) -> None:
    """`out`: a safetensors file's header (8-byte length, then JSON) in a sparse file of the remote size."""
    from localmoe.placement.safetensors import MAX_HEADER_BYTES

    assert f.size is not None
    head = _prefix(f, SAFETENSORS_PROBE, into)
    (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (-1,)
    if not 0 <= n <= MAX_HEADER_BYTES or 8 + n > f.size:
        raise LocalmoeError(f"{f.filename} on the hub is not a readable safetensors file")
    if 8 + n > len(head):
        head = _prefix(f, 8 + n, into)
    out.write_bytes(head)
    with open(out, "r+b") as fh:
        fh.truncate(f.size)


@contextmanager
def remote_replica(t: Target) -> Iterator[Path]:
    """The resolved model `t` as a local stand-in that the local readers plan exactly as the whole model: its GGUF
    header(s), or a checkpoint's config, index and safetensors headers, in sparse files of the remote sizes (in a
    temporary folder; yields the first shard's path or the folder). Only headers are fetched."""
    with tempfile.TemporaryDirectory(prefix="localmoe-header-") as tmp:
        root = Path(tmp) / (t.local_name if t.kind == "checkpoint" else "")
        root.mkdir(exist_ok=True)
        for i, f in enumerate(t.files):
            out = root / Path(f.local_name or f.filename).name
            if t.kind == "gguf":
                # shards after the first hold no metadata but split.*: their headers are tensor names, a few KiB
                _gguf_replica(f, out, t, HEADER_PROBE if i == 0 else HEADER_PROBE >> 4)
            elif f.filename.endswith(".safetensors"):
                _safetensors_replica(f, out, t)
            elif f.filename in ("config.json", "model.safetensors.index.json"):
                out.write_bytes(_prefix(f, f.size or 0, t))
        yield root if t.kind == "checkpoint" else root / Path(t.files[0].local_name or t.filename).name


def remote_layout(t: Target) -> ModelLayout:
    """The layout of a hub GGUF (all its shards) from its header(s) alone, read by range requests."""
    from localmoe.placement.layout import read_model_layout

    with remote_replica(t) as p:
        return read_model_layout(p)


def free_bytes(d: Path) -> int:
    return shutil.disk_usage(d).free


def _have(f: Target) -> int:
    """Bytes of `f` on disk already: all of it once in place, else its partial download."""
    if f.dest.exists():
        return f.size or 0
    return f.part.stat().st_size if f.part.exists() else 0


def _check_space(t: Target, have: int) -> None:
    """Refuse before the first byte when the model's missing bytes (every file's) and SPARE_BYTES do not fit."""
    total = t.total
    assert total is not None
    need = total - have
    free = free_bytes(paths.models_dir())
    if need + SPARE_BYTES > free:
        raise LocalmoeError(
            f"not enough disk space for {t.label}: it needs {human_bytes(need)} more"
            + (f" ({human_bytes(have)} already fetched)" if have else "")
            + f" and {human_bytes(SPARE_BYTES)} spare, but {paths.models_dir()} has {human_bytes(free)} free"
        )


class Progress:
    """A progress line on stderr: bytes, percentage, rate and time left; redrawn in place on a terminal."""

    def __init__(self, label: str, total: int, start: int, stream: Any = None) -> None:
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()

    def line(self, done: int) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = (done - self.start) / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else f"{int(left // 60)}m{int(left % 60):02d}s"
        pct = 100 * done / self.total if self.total else 100.0
        return (f"{self.label}: {human_bytes(done)} / {human_bytes(self.total)} {pct:5.1f}% "
                f"{human_bytes(rate)}/s, {eta} left")

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.25 if self.tty else 5.0):
            return
        self.last = now
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r\x1b[K" if self.tty else "") + self.line(done) + end)
        self.stream.flush()


def _sha256_of(path: Path) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK):
            h.update(chunk)
    return h


def download(t: Target, progress: bool = True,
             on_progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Fetch `t` into its `.part` file from where an earlier attempt stopped, verify, move into place;
    `on_progress(bytes done, total)` is called as bytes arrive. Returns (bytes fetched now, bytes there before)."""
    httpx2 = _http()

    assert t.size is not None
    have = t.part.stat().st_size if t.part.exists() else 0
    if have > t.size:
        t.part.unlink()
        have = 0
    # The bytes already there are hashed again rather than trusted: a checksum covers the whole file.
    h = _sha256_of(t.part) if have and t.sha256 else hashlib.sha256()
    bar = Progress(t.id, t.size, have) if progress else None
    fetched = 0
    try:
        if have < t.size:
            with _ranged(t, have) as r:
                if r.status_code == 200 and have:  # the server ignored the range: start over
                    have, h = 0, hashlib.sha256()
                    t.part.unlink()
                elif r.status_code not in (200, 206):
                    r.read()
                    r.raise_for_status()
                with open(t.part, "ab") as out:
                    os.chmod(t.part, 0o644)
                    for chunk in r.iter_bytes():  # as they arrive: a chunk buffer would lose its tail on a cut
                        out.write(chunk)
                        if t.sha256:
                            h.update(chunk)
                        fetched += len(chunk)
                        if bar:
                            bar.update(have + fetched)
                        if on_progress:
                            on_progress(have + fetched, t.size)
    except httpx2.HTTPError as exc:
        done = have + fetched
        if isinstance(exc, httpx2.HTTPStatusError):
            raise _hub_error(_hub().errors.HfHubHTTPError(str(exc), response=exc.response),
                             f"{t.repo}:{t.filename}") from None
        raise LocalmoeError(f"download of {t.filename} from {endpoint()} interrupted at {human_bytes(done)} of "
                            f"{human_bytes(t.size)} ({type(exc).__name__}); run the same command again to resume"
                            ) from None
    except KeyboardInterrupt:
        raise LocalmoeError(f"download of {t.filename} stopped at {human_bytes(have + fetched)} of "
                            f"{human_bytes(t.size)}; run the same command again to resume") from None
    done = t.part.stat().st_size
    if bar:
        bar.update(done, final=True)
    if done != t.size:
        raise LocalmoeError(f"download of {t.filename} ended at {human_bytes(done)} of {human_bytes(t.size)}; "
                            "run the same command again to resume")
    if t.sha256 and h.hexdigest() != t.sha256.lower():
        t.part.unlink()
        raise LocalmoeError(f"checksum mismatch for {t.filename}: expected SHA-256 {t.sha256[:16]}…, got "
                            f"{h.hexdigest()[:16]}…; the partial download was removed, run the command again")
    os.replace(t.part, t.dest)
    return fetched, have


def registry() -> dict[str, dict[str, Any]]:
    p = paths.models_dir() / REGISTRY
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record(name: str, info: dict[str, Any] | None) -> None:
    """Note (or, with None, forget) what localmoe placed in models/ under `name`: `rm` deletes only these."""
    reg = registry()
    if info is None:
        reg.pop(name, None)
    else:
        reg[name] = {**info, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    paths.models_dir().mkdir(parents=True, exist_ok=True)
    tmp = paths.models_dir() / (REGISTRY + ".tmp")
    tmp.write_text(json.dumps(reg, indent=1), encoding="utf-8")
    os.replace(tmp, paths.models_dir() / REGISTRY)


def _record(t: Target) -> None:
    info: dict[str, Any] = {"how": "pulled", "repo": t.repo, "file": t.filename, "sha256": t.sha256,
                            "bytes": t.total, "commit": t.commit, "catalog": t.entry.id if t.entry else None}
    if t.kind == "checkpoint":
        info.update(kind="checkpoint", files=[f.filename for f in t.parts])
    elif t.parts:  # `rm` deletes every shard, not just the first
        info.update(shards=[f.local_name for f in t.parts])
    record(t.local_name, info)


def _download_all(t: Target, progress: bool,
                  on_progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    """Every file of a model of several with one progress line over the total; `on_progress(done, total)` counts
    the whole model. A split's first shard comes last: until the model is whole, no file llama.cpp or `localmoe
    models` would open is in place. Returns (bytes fetched now, bytes there before)."""
    total = t.total
    assert total is not None
    before = sum(_have(f) for f in t.files)
    bar = Progress(t.id, total, before) if progress else None
    order = [*t.files[1:], t.files[0]] if t.kind == "gguf" else t.files
    done, fetched = sum(f.size or 0 for f in order if f.dest.exists()), 0
    for f in order:
        if f.dest.exists():
            continue
        f.dest.parent.mkdir(parents=True, exist_ok=True)

        def each(d: int, _n: int, base: int = done) -> None:
            if bar:
                bar.update(base + d)
            if on_progress:
                on_progress(base + d, total)

        now, _ = download(f, False, each)
        fetched += now
        done += f.size or 0
    if bar:
        bar.update(total, final=True)
    if t.kind == "checkpoint":
        # the folder becomes a model (a folder with config.json in models/) only once every file is verified
        os.replace(t.staging, t.dest)
        try:
            t.staging.parent.rmdir()
        except OSError:
            pass  # another checkpoint's pull is under way
    return fetched, before


def _set_large_tier(model_id: str) -> bool:
    """Name the model as the large tier in settings.toml when none is set; keeps the rest of the file as it is."""
    from localmoe.home import settings

    current = settings.load()
    if current.large:
        return False
    p = current.path or paths.data_dir() / settings.FILENAME
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    line = f'large = "{model_id}"  # set by `localmoe pull`, the first large MoE pulled\n'
    if re.search(r"(?m)^\[tiers\]\s*$", old):
        new = re.sub(r"(?m)^\[tiers\]\s*$\n?", lambda m: "[tiers]\n" + line, old, count=1)
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + "[tiers]\n" + line
    paths.write_private(p, new)
    try:
        if settings.load(p).large != model_id:
            raise LocalmoeError("unexpected")
    except LocalmoeError:
        paths.write_private(p, old)  # never leave a settings file that no longer parses
        return False
    return True


def pull(spec: str, plan: Callable[[Target], tuple[bool, Verdict]], *, dry_run: bool = False,
         progress: bool = True, force: bool = False,
         on_progress: Callable[[int, int], None] | None = None) -> PullResult:
    """Download `spec` after `plan` (inventory.plan_target: whether it is a MoE, and the planner's verdict on this
    machine) has said it would run."""
    t = parse(spec)
    if t.installed() and not dry_run:
        return PullResult(t, t.dest, notes=[f"{t.id} is already installed ({t.dest})"])
    resolve_remote(t)
    if t.installed() and not dry_run:
        return PullResult(t, t.dest, notes=[f"{t.id} is already installed ({t.dest})"])
    if t.total is None:
        raise LocalmoeError(f"the hub at {endpoint()} did not say how large {t.label} is; not downloading it")
    is_moe, v = plan(t)
    if dry_run:
        return PullResult(t, None, verdict=v, dry_run=True)
    if v.kind == "refused" and not force:
        raise LocalmoeError(f"{t.id} would not run on this machine ({v.reason}); not downloading it "
                            "(--force pulls it anyway)")
    if t.kind == "checkpoint" and t.dest.exists():
        raise LocalmoeError(f"{t.dest} is in the way (not a checkpoint folder); move it away to pull hf:{t.repo}")
    from localmoe.home import models

    if t.entry is None and models.is_embedded_id(t.id):
        raise UsageError(f"hf:{t.repo} would be installed as {t.id}, the embedded model's name; `localmoe import` "
                         "a downloaded copy with --name instead")
    paths.models_dir().mkdir(parents=True, exist_ok=True)
    have = sum(_have(f) for f in t.files)
    _check_space(t, have)
    if t.parts:
        fetched, before = _download_all(t, progress, on_progress)
    else:
        fetched, before = download(t, progress, on_progress)
    _record(t)
    result = PullResult(t, t.dest, fetched, before, v)
    if is_moe and v.kind != "refused" and (t.entry is None or t.entry.tier == "large"):
        result.large_tier_set = _set_large_tier(t.id)
    return result
