"""The benchmarks screen (F6) through Textual's pilot, on the embedded model and a real database: a run started there
stores what `localmoe bench` stores with the same arguments, Esc leaves it interrupted and Ctrl+R resumes it, two
runs compare with their deltas, and the accuracy-versus-joules plot puts each model × policy in its cell."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3

from test_models_ui import screen_lines
from test_tui import wait_for
from textual.widgets import DataTable, Input, SelectionList, Static

from helpers import run_cli
from localmoe.bench import suites
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.bench_screen import (
    PLOT_LEFT,
    SHARED,
    BenchScreen,
    cell,
    comparison_rows,
    nice_ceiling,
    plot_points,
    scatter,
)

MODEL = "smollm2-135m-instruct"


def stored(home, run_id: int) -> tuple[dict, list[tuple]]:
    """A run as started (its arguments) and its items: what both paths must store alike (not joules or timings)."""
    conn = sqlite3.connect(home / "localmoe.db")
    run = conn.execute("select suite, models, policies, item_limit, status from bench_runs where id = ?",
                       [run_id]).fetchone()
    items = conn.execute("select item_id, correct, model, policy from bench_items where run_id = ? order by item_id",
                         [run_id]).fetchall()
    return {"suite": run[0], "models": json.loads(run[1]), "policies": json.loads(run[2]), "limit": run[3],
            "status": run[4]}, items


async def open_bench(pilot, app) -> BenchScreen:
    await pilot.press("f6")
    await wait_for(pilot, lambda: isinstance(app.screen, BenchScreen)
                   and app.screen.query_one("#bench-models", SelectionList).option_count > 0)
    return app.screen


async def type_into(pilot, selector: str, text: str) -> None:
    await pilot.click(selector)
    await pilot.press("end", *["backspace"] * 8, *text)


async def choose(pilot, screen: BenchScreen, questions: int, max_tokens: int) -> None:
    """The quick suite, the embedded model alone, the direct policy (the defaults), and the given sizes."""
    assert screen.query_one("#bench-suite").value == "quick"
    assert list(screen.query_one("#bench-models", SelectionList).selected) == [MODEL]
    assert list(screen.query_one("#bench-policies", SelectionList).selected) == ["direct"]
    await type_into(pilot, "#bench-limit", str(questions))
    await type_into(pilot, "#bench-max-tokens", str(max_tokens))
    assert screen.query_one("#bench-limit", Input).value == str(questions)


def test_a_run_from_the_screen_stores_what_bench_stores_and_two_runs_compare(home):
    cli = run_cli("bench", "--suite", "quick", "--limit", "2", "--max-tokens", "16", "--models", MODEL,
                  "--policies", "direct", "--json")
    assert cli.returncode == 0, cli.stderr
    cli_run = json.loads(cli.stdout)["run_id"]

    async def run() -> int:
        app = LocalmoeApp()
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert "Benchmarks" in {c.title for c in app.get_system_commands(app.screen)}
            screen = await open_bench(pilot, app)
            assert {"Start", "Resume", "Next tab", "Back"} <= {c.title for c in app.get_system_commands(screen)}
            await choose(pilot, screen, 2, 16)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: not screen.running)
            status = str(screen.query_one("#bench-status", Static).render())
            assert "complete: 2 answers graded" in status, status
            run_id = screen.run_id
            table = screen.query_one("#bench-results", DataTable)
            assert table.row_count == 1 and [str(c) for c in table.get_row_at(0)][1:4] == [MODEL, "direct", "2"]

            # the plot: the run's one point, with its legend
            await pilot.press("ctrl+t")
            plot = str(screen.query_one("#bench-plot", Static).render())
            assert f"A {MODEL} / direct: " in plot and "joules per question" in plot
            assert any(line[PLOT_LEFT:].strip() == "A" for line in plot.splitlines()[2:])

            # the runs: both listed; Enter picks this run, then the CLI's, and they are compared
            await pilot.press("ctrl+t")
            runs = screen.query_one("#bench-runs", DataTable)
            assert app.focused is runs and runs.row_count == 2
            await pilot.press("enter", "down", "enter")
            await wait_for(pilot, lambda: screen.comparison is not None)
            rows = comparison_rows(screen.comparison)
            assert screen.picked == [run_id, cli_run]
            assert [r[1] for r in rows] == ["accuracy", "J/question", "avg W", "IPW (acc/W)", "tok/s"]
            assert rows[0][4] == "+0.0 pts"  # the same answers, graded alike
            assert all(re.fullmatch(r"[+-]\d+\.\d+( pts)?", r[4]) for r in rows)
            assert screen.query_one("#bench-compare", DataTable).row_count == 5
        return run_id

    ui_run = asyncio.run(run())
    ui, cli_items = stored(home, ui_run), stored(home, cli_run)
    assert ui == cli_items
    assert ui[0] == {"suite": "quick", "models": [MODEL], "policies": ["direct"], "limit": 2, "status": "complete"}
    assert [i[0] for i in ui[1]] == sorted(i.id for i in suites.load_suite("quick", limit=2).items)


def test_esc_leaves_the_run_interrupted_and_ctrl_r_resumes_it(home, monkeypatch):
    # The worker waits after the first answer until Esc was pressed: the stop lands mid-run on any machine.
    original = BenchScreen.item_done

    def held(self, rec, run_id, done, total, label):
        original(self, rec, run_id, done, total, label)
        if done == 1:
            assert self.cancel.wait(60)

    monkeypatch.setattr(BenchScreen, "item_done", held)

    async def run() -> int:
        app = LocalmoeApp()
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await open_bench(pilot, app)
            await choose(pilot, screen, 2, 16)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: screen.results and screen.results["results"]
                           and screen.results["results"][0]["n"] == 1)
            # held after its first answer: Esc means stop now, and starting another run is not offered
            assert screen.running and "Start" not in {c.title for c in app.get_system_commands(screen)}
            assert "Stop run" in screen_lines(app)[-1]
            await pilot.press("escape")  # stops the run; the screen stays
            await wait_for(pilot, lambda: not screen.running)
            run_id = screen.run_id
            assert app.screen is screen and screen.results["status"] == "interrupted"
            status = str(screen.query_one("#bench-status", Static).render())
            assert f"Run {run_id} interrupted after 1 answer: Ctrl+R resumes it" in status
            lines = screen_lines(app)  # readable on 80 × 24: the row, the status and the keys
            assert any("smollm2-135m" in line and "direct" in line for line in lines)
            assert any("interrupted" in line for line in lines) and "Resume" in lines[-1]
            await pilot.press("escape")  # back to the chat

            # later: the run is in the list, interrupted, and Ctrl+R on it finishes it
            screen = await open_bench(pilot, app)
            await pilot.press("ctrl+t", "ctrl+t")
            runs = screen.query_one("#bench-runs", DataTable)
            assert app.focused is runs and [str(c) for c in runs.get_row_at(0)][1:4] == [str(run_id), "quick",
                                                                                         "interrupted"]
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: not screen.running)
            assert screen.run_id == run_id and screen.results["status"] == "complete"
            assert screen.results["results"][0]["n"] == 2
            assert [str(c) for c in runs.get_row_at(0)][1:5] == [str(run_id), "quick", "complete", "2"]
        return run_id

    run_id = asyncio.run(run())
    started, items = stored(home, run_id)
    assert started["status"] == "complete" and started["limit"] == 2
    assert [i[0] for i in items] == sorted(i.id for i in suites.load_suite("quick", limit=2).items)  # each once


def test_the_plot_puts_each_model_and_policy_in_its_cell():
    assert [nice_ceiling(x) for x in (20, 19.97, 0.37, 3, 7, 101, 0)] == [20, 20, 0.5, 5, 10, 200, 1]
    # 41 columns over 0-20 J: 0.5 J a column; 11 rows over 100-0%: 10% a row
    assert cell(10, 0.5, 20, 41, 11) == (5, 20)
    assert cell(20, 1.0, 20, 41, 11) == (0, 40)
    assert cell(1.25, 0.74, 20, 41, 11) == (3, 3)  # 2.5 columns and 2.6 rows from the corner: rounded half up
    points = [("A", 10.0, 0.5), ("B", 20.0, 1.0), ("C", 0.0, 0.0), ("D", 1.25, 0.74)]
    lines = scatter(points, cols=41, rows=11).plain.splitlines()
    grid = lines[1:12]  # after the title line: 11 rows, 100% first
    assert grid[5][PLOT_LEFT + 20] == "A" and grid[0][PLOT_LEFT + 40] == "B"
    assert grid[10][PLOT_LEFT + 0] == "C" and grid[3][PLOT_LEFT + 3] == "D"
    assert sum(row[PLOT_LEFT:].count(m) for row in grid for m in "ABCD") == 4  # nothing else in the grid
    assert grid[0].startswith("100% ┤") and grid[5].startswith(" 50% ┤") and grid[10].startswith("  0% ┤")
    ticks = lines[13]  # under the axis: 0 at the first column, 10 in the middle, 20 ending at the last
    assert ticks[PLOT_LEFT] == "0" and ticks[PLOT_LEFT + 19:PLOT_LEFT + 21] == "10"
    assert ticks.rstrip().endswith("20") and len(ticks.rstrip()) == PLOT_LEFT + 41
    # two points in one cell share a marker; the legend still names both
    shared = scatter([("A", 10.0, 0.5), ("B", 10.1, 0.52)], cols=41, rows=11).plain.splitlines()
    assert shared[1 + 5][PLOT_LEFT + 20] == SHARED

    results = [{"model": "m", "policy": "direct", "n": 4, "accuracy": 0.75, "joules_per_query": 2.5},
               {"model": "router", "policy": "routed", "n": 4, "accuracy": 0.5, "joules_per_query": None}]
    pts, legend = plot_points(results)
    assert pts == [("A", 2.5, 0.75)]
    assert legend == ["A m / direct: 75% right at 2.5 J per question (4 questions)",
                      "B router / routed: no energy figure, not plotted"]


def test_the_comparison_shows_each_delta():
    a = {"accuracy": 0.5, "joules_per_query": 2.0, "avg_watts": 10.0, "ipw": 0.05, "tokens_per_s": 50.0}
    b = {"accuracy": 0.75, "joules_per_query": 1.5, "avg_watts": 10.0, "ipw": 0.075, "tokens_per_s": 60.0}
    cmp = {"a": {"run_id": 1}, "b": {"run_id": 2}, "rows": [
        {"model": "m", "policy": "direct", "a": a, "b": b,
         "delta": {k: b[k] - a[k] for k in a}},
        {"model": "big", "policy": "large", "a": None, "b": b, "delta": None}]}
    assert comparison_rows(cmp) == [
        ("m / direct", "accuracy", "50.0%", "75.0%", "+25.0 pts"),
        ("", "J/question", "2.00", "1.50", "-0.50"),
        ("", "avg W", "10.00", "10.00", "+0.00"),
        ("", "IPW (acc/W)", "0.0500", "0.0750", "+0.0250"),
        ("", "tok/s", "50.00", "60.00", "+10.00"),
        ("big / large", "accuracy", "", "75.0%", "only in run 2"),
    ]


def test_no_model_ticked_for_the_direct_policy_is_refused(home):
    """With every model unticked, Ctrl+S ran the default model anyway (a run nobody picked)."""

    async def run() -> list[str]:
        app = LocalmoeApp()
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_bench(pilot, app)
            screen.query_one("#bench-models", SelectionList).deselect_all()
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert not screen.running
            return [n.message for n in app._notifications]

    shown = asyncio.run(run())
    assert "Pick at least one model for the direct policy." in shown, shown
    assert not (home / "localmoe.db").exists() or not sqlite3.connect(home / "localmoe.db").execute(
        "select count(*) from bench_runs").fetchone()[0]
