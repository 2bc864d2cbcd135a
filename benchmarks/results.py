"""Each benchmark owns one marked section of RESULTS.md and rewrites only that section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(name: str, body: str) -> None:
    mark = f"<!-- {name} -->"
    section = f"{mark}\n{body.strip()}\n{mark}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if mark in text:
        head, _, rest = text.partition(mark)
        text = head + section + rest.partition(mark)[2]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")
