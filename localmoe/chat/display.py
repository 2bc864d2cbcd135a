"""How an answer's cost is shown: the one stats line under each answer, in the CLI and the TUI alike."""

from __future__ import annotations

import textwrap
from typing import Any
from urllib.parse import urlsplit

from localmoe.engine.base import GenerationStats, ending_note
from localmoe.units import human_bytes

# A remote model's id names the model, not the machine it runs on; where the answer came from is what the user
# needs to see under it. The assistant notes each remote tier's endpoint here when it resolves the tier, so every
# stats line (CLI and TUI, which only pass the model id) can name it.
_endpoints: dict[str, str] = {}


def note_endpoint(model_id: str, url: str) -> None:
    """Say that answers of `model_id` come from the server at `url`."""
    _endpoints[model_id] = url


def host_of(url: str) -> str:
    """`host:port` of an endpoint URL, without any credentials it holds."""
    parts = urlsplit(url)
    host = parts.hostname or url
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = parts.port
    except ValueError:  # a malformed port: the server will refuse it; the badge still says which host
        port = None
    return f"{host}:{port}" if port else host


def model_label(model: str) -> str:
    """The model id, and for a remote model the host that answered: `remote:my-model @ 127.0.0.1:8080`."""
    url = _endpoints.get(model)
    return f"{model} @ {host_of(url)}" if url else model


def joules_text(joules: float, measured: bool) -> str:
    """`~` marks an estimate: no power sensor was readable, so the figure comes from CPU time."""
    return f"{'' if measured else '~'}{joules:.1f} J"


def experts_text(experts: dict[str, Any]) -> str:
    """The torch engine's expert cache for one answer: fast-tier hit rate and the bytes it had to move."""
    rate = experts.get("hit_rate")
    moved = (experts.get("bytes_read") or 0) + (experts.get("bytes_copied") or 0)
    hit = f"{rate:.0%}" if rate is not None else "-"
    return f"experts {hit} hit, {human_bytes(moved)} moved"


def stats_line(model: str, stats: GenerationStats | None, status: str = "complete", energy: Any = None,
               experts: dict[str, Any] | None = None, route: Any = None) -> str:
    """`model · N tokens · R tok/s · first token T s · experts … · E J`, then how it ended if not complete, then
    the tier and the router's reason when the answer was routed. A remote model is followed by its host."""
    return SEPARATOR.join(stats_parts(model, stats, status, energy, experts, route))


SEPARATOR = " · "


def stats_parts(model: str, stats: GenerationStats | None, status: str = "complete", energy: Any = None,
                experts: dict[str, Any] | None = None, route: Any = None) -> list[str]:
    """The figures of stats_line, one string each."""
    stats = stats or GenerationStats()
    parts = [model_label(model), f"{stats.completion_tokens} tokens"]
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tok/s")
    if stats.ttft_s is not None:
        reused = stats.prompt_tokens - (stats.prompt_eval_tokens or stats.prompt_tokens)
        # a later turn's first token is fast because the conversation so far was not evaluated again: say so
        parts.append(f"first token {stats.ttft_s:.2f} s" + (f" ({reused} prompt tokens reused)" if reused > 0 else ""))
    if experts:
        parts.append(experts_text(experts))
    if energy is not None:
        parts.append(joules_text(energy.joules, energy.measured))
    if status != "complete":
        parts.append({"cancelled": "stopped"}.get(status, status))
    elif note := ending_note(stats.stop_reason, stats.completion_tokens):
        parts.append(note)
    if route is not None:
        parts.append(f"{route.tier} tier: {route.reason}")
    return parts


def wrap_figures(parts: list[str], width: int) -> list[str]:
    """`parts` joined by " · " in lines of at most `width` columns, broken between figures rather than inside one
    ("first token 0.06 s" stays whole); a figure wider than a line is word-wrapped on lines of its own."""
    lines: list[str] = []
    line = ""
    for part in parts:
        joined = f"{line}{SEPARATOR}{part}" if line else part
        if len(joined) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        if len(part) <= width:
            line = part
        else:
            *whole, line = textwrap.wrap(part, max(width, 1), break_on_hyphens=False) or [""]
            lines.extend(whole)
    if line or not lines:
        lines.append(line)
    return lines
