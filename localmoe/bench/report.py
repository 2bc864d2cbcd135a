"""Benchmark reports a user would read: a terminal table, and a self-contained HTML page with an
accuracy-vs-energy plot (inline SVG, so it opens offline with nothing installed)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from localmoe.errors import LocalmoeError, UsageError

COLUMNS = [("model", "model"), ("policy", "policy"), ("n", "n"), ("accuracy", "accuracy"),
           ("joules_per_query", "J/query"), ("avg_watts", "avg W"), ("ipw", "IPW (acc/W)"),
           ("accuracy_per_joule", "acc/J"), ("tokens_per_s", "tok/s"), ("latency_s", "s/query")]


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "accuracy":
        return f"{value:.1%}"
    if key in ("ipw", "accuracy_per_joule", "net_accuracy_per_joule"):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


NET_COLUMNS = [("net_joules_per_query", "net J/query"), ("net_accuracy_per_joule", "net acc/J")]


def columns(res: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's columns: with the idle-subtracted figures when the run measured idle power (`bench --idle`)."""
    net = any("net_joules_per_query" in r for r in res["results"])
    return COLUMNS + NET_COLUMNS if net else COLUMNS


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    return [[fmt(k, r.get(k)) for k, _ in columns(res)] for r in res["results"]]


def energy_note(res: dict[str, Any]) -> str:
    if res["measured"]:
        kind = "measured"
    elif ")+" in res["meter"]:  # a composite: the CPU-time estimate beside a GPU meter (no RAPL)
        kind = "PARTLY ESTIMATED (the CPU's share from CPU time, no RAPL readable; the GPU's measured)"
    else:
        kind = "ESTIMATED (no power sensor readable; figures from CPU time)"
    return f"energy: {res['meter']}, {kind}"


def _svg_plot(points: list[tuple[str, float, float]], width: int = 560, height: int = 340) -> str:
    """Accuracy (y) against joules per query (x): up and to the left is better."""
    pad = 50
    xs = [p[1] for p in points] or [1.0]
    xmax = max(xs) * 1.15 or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">joules per query</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             'accuracy</text>']
    for frac in (0, 0.5, 1):
        y = height - pad - frac * (height - pad - 10)
        parts.append(f'<text x="{pad - 6}" y="{y + 4}" text-anchor="end">{frac:.0%}</text>')
        x = pad + frac * (width - 10 - pad)
        parts.append(f'<text x="{x}" y="{height - pad + 16}" text-anchor="middle">{frac * xmax:.1f}</text>')
    for label, joules, acc in points:
        x = pad + joules / xmax * (width - 10 - pad)
        y = height - pad - acc * (height - pad - 10)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#3465a4"/>')
        # a point in the right half is labelled on its left: a label running past the plot's edge is cut off
        left = x > width / 2
        anchor = ' text-anchor="end"' if left else ""
        parts.append(f'<text x="{x - 8 if left else x + 8:.1f}" y="{max(y - 6, 12):.1f}"{anchor}>'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def check_report_path(path: str | Path) -> Path:
    """The report's path if it can be written there: checked before a run, so a typo does not wait for its end."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"reports are written as HTML; use a .html name instead of {p.name}")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write report {p}: no folder {folder}")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write report {p}: permission denied")
    return p


def write_html(res: dict[str, Any], path: str | Path) -> None:
    p = check_report_path(path)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns(res))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(res))
    points = [(f"{r['model']}/{r['policy']}", r["joules_per_query"] or 0.0, r["accuracy"] or 0.0)
              for r in res["results"]]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>localmoe bench run {res['run_id']}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>Benchmark run {res['run_id']}: suite {html.escape(res['suite'])}</h1>
<p>{html.escape(res['started_at'] or '')} · {html.escape(res['machine'])} · {html.escape(energy_note(res))}</p>
<table><tr>{head}</tr>{body}</table>
<h2>Accuracy vs energy</h2>{_svg_plot(points)}
<p>IPW = accuracy ÷ average watts; acc/J = accuracy ÷ mean joules per query.</p>
</body></html>"""
    try:
        p.write_text(doc, encoding="utf-8")
    except OSError as exc:
        raise LocalmoeError(f"cannot write report {p}: {exc.strerror or exc}") from None
