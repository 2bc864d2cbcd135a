"""How an answer's cost is shown: the one stats line under each answer, in the CLI and the TUI alike."""

from __future__ import annotations

from typing import Any

from localmoe.engine.base import GenerationStats
from localmoe.units import human_bytes


def joules_text(energy: Any) -> str:
    """`~` marks an estimate: no power sensor was readable, so the figure comes from CPU time."""
    return f"{'' if energy.measured else '~'}{energy.joules:.1f} J"


def experts_text(experts: dict[str, Any]) -> str:
    """The torch engine's expert cache for one answer: fast-tier hit rate and the bytes it had to move."""
    rate = experts.get("hit_rate")
    moved = (experts.get("bytes_read") or 0) + (experts.get("bytes_copied") or 0)
    hit = f"{rate:.0%}" if rate is not None else "-"
    return f"experts {hit} hit, {human_bytes(moved)} moved"


def stats_line(model: str, stats: GenerationStats | None, status: str = "complete", energy: Any = None,
               experts: dict[str, Any] | None = None, route: Any = None) -> str:
    """`model · N tokens · R tok/s · first token T s · experts … · E J`, then how it ended if not complete, then
    the tier and the router's reason when the answer was routed."""
    stats = stats or GenerationStats()
    parts = [model, f"{stats.completion_tokens} tokens"]
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tok/s")
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    if experts:
        parts.append(experts_text(experts))
    if energy is not None:
        parts.append(joules_text(energy))
    if status != "complete":
        parts.append({"cancelled": "stopped"}.get(status, status))
    elif stats.stop_reason == "length":
        parts.append(f"(cut off at {stats.completion_tokens} tokens)")
    elif stats.stop_reason == "repetition":
        parts.append("(stopped: it was repeating itself)")
    if route is not None:
        parts.append(f"{route.tier} tier: {route.reason}")
    return " · ".join(parts)
