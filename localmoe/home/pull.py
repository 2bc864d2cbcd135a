"""`localmoe pull`: one model file from the Hugging Face hub (or the endpoint HF_ENDPOINT names) into
`<data dir>/models`, planned before it is fetched.

huggingface-hub supplies the endpoint, offline and token settings, the file's URL and its metadata (size, and for
LFS files the SHA-256 as X-Linked-Etag). The bytes are fetched here, with ranged GETs into `<file>.part`: an
interrupted `hf_hub_download` starts again at byte 0, which for a 17 GB file is not an option."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import catalog, install, paths
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


@dataclass
class Target:
    repo: str
    filename: str
    local_name: str  # the file name in models/; its stem is the model's id
    entry: catalog.CatalogEntry | None = None
    cfile: catalog.CatalogFile | None = None
    size: int | None = None
    sha256: str | None = None
    commit: str | None = None
    url: str = ""

    @property
    def id(self) -> str:
        return Path(self.local_name).stem.lower()

    @property
    def dest(self) -> Path:
        return paths.models_dir() / self.local_name

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")


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
        return {"id": t.id, "repo": t.repo, "file": t.filename, "bytes": t.size, "sha256": t.sha256,
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
        filename = parts[2] if len(parts) == 3 else ""
        if filename and not filename.lower().endswith(".gguf"):
            raise UsageError(f"{spec!r}: only .gguf files can be pulled (safetensors checkpoints are not yet)")
        return Target(f"{parts[0]}/{parts[1]}", filename, Path(filename).name if filename else "")
    entry, f = catalog.lookup(spec)
    assert entry.repo is not None
    return Target(entry.repo, f.file, f"{entry.local_id(f)}.gguf", entry, f, sha256=f.sha256)


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
    """`hf:OWNER/REPO` without a file: its one GGUF, else its Q4_K_M, else a list to choose from."""
    hub = _hub()
    api = hub.HfApi(endpoint=endpoint())
    names = _call(t.repo, lambda: api.list_repo_files(t.repo))
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        raise UsageError(f"hf:{t.repo} holds no .gguf file (safetensors checkpoints cannot be pulled yet)")
    pick = ggufs if len(ggufs) == 1 else [n for n in ggufs if "q4_k_m" in n.lower()]
    if len(pick) != 1:
        raise UsageError(f"hf:{t.repo} holds {len(ggufs)} GGUF files; name one: "
                         + ", ".join(f"hf:{t.repo}/{n}" for n in ggufs[:6]) + (" …" if len(ggufs) > 6 else ""))
    t.filename, t.local_name = pick[0], Path(pick[0]).name


def resolve_remote(t: Target) -> None:
    """Ask the hub for the file's size, commit and checksum (one HEAD request)."""
    if _offline():
        raise LocalmoeError(f"cannot fetch {t.repo}/{t.filename or '…'}: HF_HUB_OFFLINE is set "
                            "(unset it to download)")
    hub = _hub()
    if not t.filename:
        _choose_file(t)
    t.url = hub.hf_hub_url(t.repo, t.filename, endpoint=endpoint())
    meta = _call(f"{t.repo}:{t.filename}",
                 lambda: hub.get_hf_file_metadata(t.url, endpoint=endpoint(), retry_on_errors=False))
    t.size, t.commit = meta.size, meta.commit_hash
    etag = (meta.etag or "").lower()
    if t.sha256 and _SHA256.fullmatch(etag) and etag != t.sha256.lower():
        raise LocalmoeError(f"{t.repo}/{t.filename} on {endpoint()} has SHA-256 {etag[:12]}…, not the "
                            f"catalog's {t.sha256[:12]}…: the file changed; not downloading it")
    t.sha256 = t.sha256 or (etag if _SHA256.fullmatch(etag) else None)


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


def remote_layout(t: Target) -> ModelLayout:
    """The layout of a hub GGUF from its header alone, read by range requests (1 MiB, doubled until it parses)."""
    from localmoe.placement.gguf_file import GGUFFormatError, read_header
    from localmoe.placement.layout import read_layout

    httpx2 = _http()
    assert t.size is not None
    n = HEADER_PROBE
    with tempfile.TemporaryDirectory(prefix="localmoe-header-") as tmp:
        head = Path(tmp) / "head.gguf"
        local = t.part if t.local_name and t.part.exists() else None
        while True:
            if local is not None and local.stat().st_size >= min(n, t.size):
                # an interrupted pull already holds the header: no byte of it is fetched twice
                with open(local, "rb") as src:
                    head.write_bytes(src.read(min(n, t.size)))
            else:
                try:
                    with _ranged(t, 0, min(n, t.size)) as r:
                        r.raise_for_status()
                        head.write_bytes(r.read())
                except httpx2.HTTPError as exc:
                    raise _hub_error(exc, f"{t.repo}:{t.filename}") from None
            try:
                read_header(head)
                break
            except GGUFFormatError as exc:
                if "unexpected end" not in str(exc) or n >= min(HEADER_MAX, t.size):
                    raise LocalmoeError(f"{t.filename} on the hub is not a readable GGUF file ({exc})") from None
                n *= 2
        # The header parsed from its prefix; a sparse file of the remote size gives read_layout the real size
        # without holding the tensors.
        with open(head, "r+b") as f:
            f.truncate(t.size)
        full = Path(tmp) / t.local_name
        head.rename(full)
        return read_layout(full)


def plan_target(t: Target) -> tuple[ModelLayout, Verdict]:
    """The planner's verdict on this machine: from the catalog's layout, or the remote header when uncatalogued."""
    from localmoe.placement.plan import Budget, make_plan, verdict

    if t.entry is not None and t.cfile is not None:
        f = t.cfile
        if t.size:  # the hub's exact size over the catalog's rounded one
            f = catalog.CatalogFile(f.quant, f.file, t.size, "hub", f.default, f.sha256)
        layout = catalog.layout_of(t.entry, f)
    else:
        layout = remote_layout(t)
    return layout, verdict(make_plan(layout, Budget.detect()), layout)


def free_bytes(d: Path) -> int:
    return shutil.disk_usage(d).free


def _check_space(t: Target, have: int) -> None:
    assert t.size is not None
    need = t.size - have
    free = free_bytes(t.dest.parent)
    if need + SPARE_BYTES > free:
        raise LocalmoeError(
            f"not enough disk space for {t.filename}: it needs {human_bytes(need)} more"
            + (f" ({human_bytes(have)} already fetched)" if have else "")
            + f" and {human_bytes(SPARE_BYTES)} spare, but {t.dest.parent} has {human_bytes(free)} free"
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
    record(t.local_name, {"how": "pulled", "repo": t.repo, "file": t.filename, "sha256": t.sha256, "bytes": t.size,
                          "commit": t.commit, "catalog": t.entry.id if t.entry else None})


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


def pull(spec: str, *, dry_run: bool = False, progress: bool = True, force: bool = False,
         on_progress: Callable[[int, int], None] | None = None) -> PullResult:
    t = parse(spec)
    if t.local_name and t.dest.exists() and not dry_run:
        return PullResult(t, t.dest, notes=[f"{t.id} is already installed ({t.dest})"])
    resolve_remote(t)
    if t.dest.exists() and not dry_run:
        return PullResult(t, t.dest, notes=[f"{t.id} is already installed ({t.dest})"])
    if t.size is None:
        raise LocalmoeError(f"the hub at {endpoint()} did not say how large {t.filename} is; not downloading it")
    layout, v = plan_target(t)
    if dry_run:
        return PullResult(t, None, verdict=v, dry_run=True)
    if v.kind == "refused" and not force:
        raise LocalmoeError(f"{t.id} would not run on this machine ({v.reason}); not downloading it "
                            "(--force pulls it anyway)")
    t.dest.parent.mkdir(parents=True, exist_ok=True)
    have = t.part.stat().st_size if t.part.exists() else 0
    _check_space(t, have)
    fetched, before = download(t, progress, on_progress)
    _record(t)
    result = PullResult(t, t.dest, fetched, before, v)
    is_moe = t.entry.is_moe if t.entry else layout.is_moe
    if is_moe and v.kind != "refused" and (t.entry is None or t.entry.tier == "large"):
        result.large_tier_set = _set_large_tier(t.id)
    return result
