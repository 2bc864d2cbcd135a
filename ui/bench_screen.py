"""The benchmarks screen: what `localmoe bench` does, from the chat (F6).

Run: a suite, models and routing policies, a question limit and an answer length; Ctrl+S starts `runner.run` in a
thread worker, a progress bar and a table of results per model × policy (what `bench` prints at the end) follow it
item by item. Esc stops it: the answer under way is dropped and the run is left `interrupted`, as Ctrl-C leaves a
`bench` run; Ctrl+R resumes it (as `bench --resume RUN`). Plot: accuracy against joules per question, one letter per
model × policy. Runs: every past run; Enter picks one (its results show in Run and Plot), and the last two picked
are compared (`bench compare A B`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (
    Button,
    DataTable,
    Header,
    Input,
    ProgressBar,
    Select,
    SelectionList,
    Static,
    TabbedContent,
    TabPane,
)

from localmoe.bench import report, runner
from localmoe.errors import LocalmoeError
from localmoe.record.recorder import Recorder
from localmoe.ui.footer import FitFooter

# -- the plot: accuracy (y, 0-100%) against joules per question (x, 0 to a round number) --------------------------
MARKERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHARED = "*"  # two or more points in one cell
Y_LABEL = 5  # "100% ": the y tick labels' width; the axis follows, then the grid
PLOT_LEFT = Y_LABEL + 1  # the grid's first column in every plot line
COLORS = ("bold cyan", "bold magenta", "bold yellow", "bold green", "bold red", "bold blue")

RESULT_COLUMNS = (("model", "model"), ("policy", "policy"), ("n", "n"), ("accuracy", "accuracy"),
                  ("joules_per_query", "J/question"), ("avg_watts", "avg W"), ("ipw", "IPW"),
                  ("tokens_per_s", "tok/s"))
TAB_FOCUS = {"tab-run": "#bench-suite", "tab-plot": "#bench-plot-view", "tab-runs": "#bench-runs"}
PADDING = 2  # a table column's padding
CHROME = 3  # a table's scrollbar and margin
COMPARED = (("accuracy", "accuracy"), ("joules_per_query", "J/question"), ("avg_watts", "avg W"),
            ("ipw", "IPW (acc/W)"), ("tokens_per_s", "tok/s"))


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5 and 5 × 10^k that is at least `x`: an axis end whose half is a round tick too."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    base = 10.0 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * base >= x * (1 - 1e-9):
            return m * base
    return 10 * base


def cell(joules: float, accuracy: float, xmax: float, cols: int, rows: int) -> tuple[int, int]:
    """(row from the top, column) of a point in a grid of `rows` × `cols`: column 0 is 0 J, the last `xmax`;
    row 0 is 100%, the last 0%. Rounded half up."""
    col = int(min(max(joules / xmax, 0.0), 1.0) * (cols - 1) + 0.5)
    row = int((1.0 - min(max(accuracy, 0.0), 1.0)) * (rows - 1) + 0.5)
    return row, col


def _odd(n: int) -> int:
    """Odd sizes put the middle tick (50%, half the joules) exactly on a row or column."""
    return n if n % 2 else n - 1


def scatter(points: Sequence[tuple[str, float, float]], cols: int, rows: int) -> Text:
    """The plot as text: `points` are (marker, joules per question, accuracy 0-1). A title line, `rows` grid lines
    (y ticks 100%, 50%, 0%), the x axis with ticks at 0, half and the end (a round number of joules), and the x
    title. The grid starts at column PLOT_LEFT of every line; sizes are made odd (at least 5 × 11)."""
    cols, rows = _odd(max(cols, 11)), _odd(max(rows, 5))
    xmax = nice_ceiling(max((p[1] for p in points), default=0.0))
    grid = [[" "] * cols for _ in range(rows)]
    color: dict[tuple[int, int], str] = {}
    for i, (marker, joules, accuracy) in enumerate(points):
        r, c = cell(joules, accuracy, xmax, cols, rows)
        grid[r][c] = SHARED if grid[r][c] != " " else marker
        color[(r, c)] = "bold" if grid[r][c] == SHARED else COLORS[i % len(COLORS)]
    ticks_y = {0: "100%", rows // 2: "50%", rows - 1: "0%"}
    out = Text(no_wrap=True)
    out.append("accuracy".rjust(Y_LABEL + 4) + "\n", style="dim")
    for r in range(rows):
        out.append(ticks_y.get(r, "").rjust(Y_LABEL - 1) + " " + ("┤" if r in ticks_y else "│"), style="dim")
        for c in range(cols):
            ch = grid[r][c]
            out.append(ch, style=color.get((r, c), ""))
        out.append("\n")
    ticks_x = (0, cols // 2, cols - 1)
    out.append(" " * Y_LABEL + "└" + "".join("┬" if c in ticks_x else "─" for c in range(cols)) + "\n", style="dim")
    labels = [_number(0), _number(xmax / 2), _number(xmax)]
    line = [" "] * (PLOT_LEFT + cols + 8)
    for c, label in zip(ticks_x, labels, strict=True):
        start = PLOT_LEFT + c - (len(label) // 2 if c else 0)
        if c == cols - 1:
            start = PLOT_LEFT + c - len(label) + 1
        line[start:start + len(label)] = label
    out.append("".join(line).rstrip() + "\n", style="dim")
    out.append("joules per question →".rjust(PLOT_LEFT + cols), style="dim")
    return out


def _number(x: float) -> str:
    return f"{x:g}" if x >= 1 or x == 0 else f"{x:.2g}"


def plot_points(results: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, float, float]], list[str]]:
    """The points of a run's results (one per model × policy with a joules figure: marker, J/question, accuracy)
    and the legend's lines, marker letters in the order of the results (as the results table gives them)."""
    points, legend = [], []
    for i, r in enumerate(results):
        marker = MARKERS[i % len(MARKERS)]
        jpq, acc = r.get("joules_per_query"), r.get("accuracy")
        name = f"{marker} {r['model']} / {r['policy']}"
        if jpq is None or acc is None:
            legend.append(f"{name}: no energy figure, not plotted")
            continue
        points.append((marker, float(jpq), float(acc)))
        legend.append(f"{name}: {acc:.0%} right at {jpq:.3g} J per question ({r['n']} questions)")
    return points, legend


def _change(key: str, d: float) -> str:
    if key == "accuracy":
        return f"{d * 100:+.1f} pts"
    if key in ("ipw", "accuracy_per_joule"):
        return f"{d:+.4f}"
    return f"{d:+.2f}"


def comparison_rows(cmp: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """`runner.compare`'s answer as table rows: (model / policy, metric, run A, run B, change)."""
    out = []
    for row in cmp["rows"]:
        name = f"{row['model']} / {row['policy']}"
        a, b, d = row["a"] or {}, row["b"] or {}, row["delta"] or {}
        if not row["a"] or not row["b"]:  # a model × policy one run has and the other has not
            side = "a" if row["a"] else "b"
            acc = report.fmt("accuracy", (a or b).get("accuracy"))
            out.append((name, "accuracy", acc if side == "a" else "", acc if side == "b" else "",
                        f"only in run {cmp[side]['run_id']}"))
            continue
        for key, label in COMPARED:
            out.append((name, label, report.fmt(key, a.get(key)), report.fmt(key, b.get(key)),
                        _change(key, d[key]) if key in d else "-"))
            name = ""
    return out


def _when(stamp: str | None) -> str:
    return (stamp or "")[:16].replace("T", " ")


# -- the screen -------------------------------------------------------------------------------------------------
class BenchScreen(Screen[None]):
    BINDINGS = [
        # one key, two labels: while a run goes, Esc stops it (leaving it resumable); else it goes back
        Binding("escape", "stop", "Stop run"),
        Binding("escape", "back", "Back"),
        Binding("ctrl+s", "start", "Start", priority=True),
        Binding("ctrl+r", "resume", "Resume", priority=True),
        Binding("ctrl+t", "next_tab", "Next tab", priority=True),
    ]

    class Progress(Message):
        def __init__(self, run_id: int, done: int, total: int, label: str, res: dict[str, Any] | None) -> None:
            super().__init__()
            self.run_id, self.done, self.total, self.label, self.res = run_id, done, total, label, res

    class Finished(Message):
        def __init__(self, run_id: int | None, res: dict[str, Any] | None, error: str | None) -> None:
            super().__init__()
            self.run_id, self.res, self.error = run_id, res, error

    def __init__(self) -> None:
        super().__init__()
        self.rec: Recorder | None = None
        self.running = False
        self.cancel: threading.Event | None = None
        self.run_id: int | None = None  # the run being made, or the latest one made or picked: shown in Run and Plot
        self.results: dict[str, Any] | None = None
        self.runs: list[dict[str, Any]] = []
        self.picked: list[int] = []  # the last two runs picked with Enter: compared, older first
        self.comparison: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="bench-tabs"):
            with TabPane("Run", id="tab-run"):
                with Horizontal(id="bench-controls"):
                    yield Select([("quick", "quick")], value="quick", allow_blank=False, id="bench-suite")
                    yield Input("", placeholder="all", type="integer", id="bench-limit")
                    yield Input("128", type="integer", id="bench-max-tokens")
                    yield Button("Start", id="bench-start", variant="primary")
                with Horizontal(id="bench-choices"):
                    yield SelectionList[str](id="bench-models")
                    yield SelectionList[str](*((p, p, p == "direct") for p in runner.POLICIES), id="bench-policies")
                with Horizontal(id="bench-progress-row"):
                    yield ProgressBar(total=1, show_eta=False, id="bench-progress")
                    yield Static("", id="bench-status")
                yield DataTable(id="bench-results", cursor_type="row", zebra_stripes=True)
            with TabPane("Plot", id="tab-plot"):
                with VerticalScroll(id="bench-plot-view"):
                    yield Static("", id="bench-plot")
            with TabPane("Runs", id="tab-runs"):
                yield Static("Enter picks a run (its results show in Run and Plot); the last two picked are compared "
                             "below. Ctrl+R resumes the highlighted run if it was interrupted.", id="bench-runs-help")
                yield DataTable(id="bench-runs", cursor_type="row", zebra_stripes=True)
                yield Static("", id="bench-compare-title")
                yield DataTable(id="bench-compare", cursor_type="none", zebra_stripes=True)
        yield FitFooter()

    def on_mount(self) -> None:
        self.title, self.sub_title = "localmoe", "benchmarks"
        self.query_one("#bench-suite", Select).border_title = "suite"
        self.query_one("#bench-limit", Input).border_title = "questions"
        self.query_one("#bench-max-tokens", Input).border_title = "max tokens"
        self.query_one("#bench-models", SelectionList).border_title = "models (direct policy)"
        self.query_one("#bench-policies", SelectionList).border_title = "policies"
        self.query_one("#bench-runs", DataTable).add_columns("pick", "run", "suite", "status", "items", "started",
                                                             "meter")
        self.query_one("#bench-compare", DataTable).add_columns("model / policy", "metric", "run A", "run B",
                                                                "change")
        self.query_one("#bench-status", Static).update("Choose, then Ctrl+S (or Start) runs the benchmark.")
        try:
            self.rec = Recorder()
        except LocalmoeError as exc:
            self.notify(f"Cannot open the database: {exc}", severity="error", markup=False)
        self.load_choices()
        self.refresh_runs()
        self.show_results()
        self.show_comparison()
        self.query_one("#bench-suite", Select).focus()

    def on_unmount(self) -> None:
        # Leaving (or quitting) mid-run: the worker stops at once and leaves the run resumable.
        if self.cancel is not None:
            self.cancel.set()
        if self.rec is not None:
            self.rec.close()

    @work(thread=True, exclusive=True, group="bench-choices")
    def load_choices(self) -> None:
        """The suites with their sizes and every model localmoe can run (discovery reads other apps' folders)."""
        from localmoe.bench import suites
        from localmoe.home import models

        choices = []
        for name in suites.builtin_suites():
            try:
                choices.append((f"{name} ({len(suites.load_suite(name).items)})", name))
            except LocalmoeError:
                choices.append((name, name))
        choices += [(name, name) for name in ("hf:gsm8k", "hf:mmlu", "hf:arc")]
        try:
            refs, default = models.list_models(), models.default_model().id
        except LocalmoeError as exc:
            refs, default = [], None
            self.app.call_from_thread(self.notify, f"Cannot list models: {exc}", severity="error", markup=False)
        self.app.call_from_thread(self.show_choices, choices, [r.id for r in refs], default)

    def show_choices(self, suites: list[tuple[str, str]], model_ids: list[str], default: str | None) -> None:
        select = self.query_one("#bench-suite", Select)
        current = select.value
        select.set_options(suites)
        select.value = current if any(v == current for _, v in suites) else "quick"
        chosen = self.query_one("#bench-models", SelectionList)
        keep = set(chosen.selected) or ({default} if default else set())
        chosen.clear_options()
        chosen.add_options([(m, m, m in keep) for m in dict.fromkeys(model_ids)])

    # -- starting, following and stopping a run ---------------------------------------------------------------
    def options(self) -> dict[str, Any] | None:
        """What the controls ask for, as `runner.run` arguments; None (with a notice) when something is missing."""
        policies = list(self.query_one("#bench-policies", SelectionList).selected)
        names = list(self.query_one("#bench-models", SelectionList).selected)
        if not policies:
            self.notify("Pick at least one policy.", severity="error")
            return None
        if "direct" in policies and not names:  # else the default model would answer a run nobody picked
            self.notify("Pick at least one model for the direct policy.", severity="error")
            return None
        limit_text = self.query_one("#bench-limit", Input).value.strip()
        tokens_text = self.query_one("#bench-max-tokens", Input).value.strip() or "128"
        try:
            limit = int(limit_text) if limit_text else None
            max_tokens = int(tokens_text)
        except ValueError:
            self.notify("Questions and max tokens are whole numbers.", severity="error")
            return None
        if (limit is not None and limit < 1) or max_tokens < 1:
            self.notify("Questions and max tokens must be at least 1.", severity="error")
            return None
        return {"suite": str(self.query_one("#bench-suite", Select).value), "model_names": names,
                "policies": [p for p in runner.POLICIES if p in policies], "limit": limit, "max_tokens": max_tokens}

    def action_start(self) -> None:
        if self.running:
            return
        opts = self.options()
        if opts is not None:
            self._begin(opts)

    @on(Button.Pressed, "#bench-start")
    def start_pressed(self) -> None:
        self.action_start()

    def action_resume(self) -> None:
        if self.running:
            return
        run = self._resume_target()
        if run is None:
            self.notify("No interrupted run to resume.")
            return
        if run["status"] != "interrupted":
            why = "is complete" if run["status"] == "complete" else f"is {run['status']} (in another process?)"
            self.notify(f"Run {run['id']} {why}: only an interrupted run resumes.", severity="warning")
            return
        self._begin({"resume": run["id"]})

    def _resume_target(self) -> dict[str, Any] | None:
        """The highlighted run on the Runs tab; elsewhere the shown run if it was interrupted, else the latest
        interrupted one."""
        if self.query_one("#bench-tabs", TabbedContent).active == "tab-runs":
            return self.highlighted_run()
        shown = next((r for r in self.runs if r["id"] == self.run_id), None)
        if shown is not None and shown["status"] == "interrupted":
            return shown
        return next((r for r in self.runs if r["status"] == "interrupted"), None)

    def _begin(self, opts: dict[str, Any]) -> None:
        self.running, self.cancel = True, threading.Event()
        self.run_id, self.results = opts.get("resume"), None
        bar = self.query_one("#bench-progress", ProgressBar)
        bar.update(total=None, progress=0)
        what = f"Resuming run {opts['resume']}" if "resume" in opts else "Starting"
        self.query_one("#bench-status", Static).update(Text(f"{what}: loading the model…"))
        self.show_tab("tab-run")
        self.show_results()
        self.refresh_bindings()
        self.run_bench(opts, self.cancel)

    @work(thread=True, exclusive=True, group="bench")
    def run_bench(self, opts: dict[str, Any], cancel: threading.Event) -> None:
        started: dict[str, Any] = {}
        try:
            with Recorder() as rec:
                def on_start(run_id: int, suite: Any) -> None:
                    started["run"] = run_id
                    for err in suite.errors:
                        self.app.call_from_thread(self.notify, f"{suite.source}: {err} (skipped)",
                                                  severity="warning", markup=False)
                    self.item_done(rec, run_id, None, None, "")

                def progress(done: int, total: int, label: str) -> None:
                    self.item_done(rec, started["run"], done, total, label)

                run_id = runner.run(rec, progress=progress, on_start=on_start, cancel=cancel, **opts)
                res = runner.results(rec, run_id)
        except LocalmoeError as exc:
            self.post_message(self.Finished(started.get("run"), None, str(exc)))
            return
        self.post_message(self.Finished(run_id, res, None))

    def item_done(self, rec: Recorder, run_id: int, done: int | None, total: int | None, label: str) -> None:
        """In the worker: after each finished item (and once at the start, `done` None), the run's results so far,
        read back from the database, go to the screen."""
        res = runner.results(rec, run_id)
        self.post_message(self.Progress(run_id, done if done is not None else -1, total or 0, label, res))

    def on_bench_screen_progress(self, message: Progress) -> None:
        if not self.running:
            return
        self.run_id, self.results = message.run_id, message.res
        bar = self.query_one("#bench-progress", ProgressBar)
        status = self.query_one("#bench-status", Static)
        if message.done < 0:  # started: the items already done (a resumed run) are in the results
            n = sum(r["n"] for r in (message.res or {}).get("results", []))
            status.update(Text(f"Run {message.run_id}: {n} done, loading the model…" if n else
                               f"Run {message.run_id}: loading the model…"))
        else:
            bar.update(total=message.total, progress=message.done)
            status.update(Text(f"Run {message.run_id}: {message.done}/{message.total} · {message.label}",
                               no_wrap=True, overflow="ellipsis"))
        self.show_results()

    def on_bench_screen_finished(self, message: Finished) -> None:
        self.running = False
        self.refresh_bindings()
        status = self.query_one("#bench-status", Static)
        if message.error is not None:  # before the run began (nothing stored), or during it (left interrupted)
            status.update(Text(f"Not run: {message.error}" if message.run_id is None else
                               f"Run {message.run_id} stopped: {message.error} (Ctrl+R resumes it)"))
            self.notify(message.error, severity="error", markup=False)
        else:
            self.run_id, self.results = message.run_id, message.res
            res = message.res or {}
            n = sum(r["n"] for r in res.get("results", []))
            if res.get("status") == "complete":
                self.query_one("#bench-progress", ProgressBar).update(total=max(n, 1), progress=max(n, 1))
                status.update(Text(f"Run {message.run_id} complete: {n} answers graded."))
            else:
                status.update(Text(f"Run {message.run_id} {res.get('status')} after {n} answer{'s' * (n != 1)}: "
                                   f"Ctrl+R resumes it."))
                self.notify(f"Run {message.run_id} stopped; finished answers are kept. Ctrl+R resumes it.",
                            title="Benchmark", markup=False)
        self.show_results()
        self.refresh_runs()

    def action_stop(self) -> None:
        if self.running and self.cancel is not None:
            self.cancel.set()
            what = f"Run {self.run_id}: stopping…" if self.run_id is not None else "Stopping…"
            self.query_one("#bench-status", Static).update(Text(what))

    def action_back(self) -> None:
        self.dismiss(None)

    def action_next_tab(self) -> None:
        active = self.query_one("#bench-tabs", TabbedContent).active
        order = list(TAB_FOCUS)
        self.show_tab(order[(order.index(active) + 1) % len(order)] if active in order else order[0])

    def show_tab(self, pane: str) -> None:
        """A pane in front, with the keyboard on its main widget (a widget focused in another pane would bring
        that pane back)."""
        self.query_one("#bench-tabs", TabbedContent).active = pane
        self.query_one(TAB_FOCUS[pane]).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # Esc: one label or the other
            return self.running
        if action == "back":
            return not self.running
        if action in ("start", "resume"):  # shown greyed while a run goes (the footer keeps its keys in place)
            return None if self.running else True
        return True

    # -- results, plot, runs, comparison ----------------------------------------------------------------------
    def show_results(self) -> None:
        table = self.query_one("#bench-results", DataTable)
        table.clear(columns=True)
        rows = (self.results or {}).get("results", [])
        others = [label for key, label in RESULT_COLUMNS if key != "model"]
        cells = [[report.fmt(k, r.get(k)) for k, _ in RESULT_COLUMNS] for r in rows]
        # the model's name gets what the other columns leave of the width (the legend below the plot has it whole)
        beside = sum(max(len(label), *(len(c[i + 1]) for c in cells)) + 2 for i, label in enumerate(others)) \
            if cells else 0
        width = max(12, self.size.width - beside - len("A") - 2 * PADDING - CHROME)
        table.add_columns("", *(label for _, label in RESULT_COLUMNS))
        for i, c in enumerate(cells):
            name = c[0] if len(c[0]) <= width else c[0][:width - 1] + "…"
            table.add_row(Text(MARKERS[i % len(MARKERS)], style=COLORS[i % len(COLORS)]), Text(name), *c[1:])
        self.show_plot()

    def show_plot(self) -> None:
        res = self.results
        plot = self.query_one("#bench-plot", Static)
        if not res or not res.get("results"):
            plot.update(Text("No results yet: start a run (Run tab, Ctrl+S) or pick one (Runs tab, Enter).\n\n"
                             "The plot puts each model × policy at its accuracy against the joules it spent per "
                             "question: up and to the left is better."))
            return
        points, legend = plot_points(res["results"])
        width, height = self.size.width or 80, self.size.height or 24
        rows = height - 13 - len(legend)
        cols = min(width - PLOT_LEFT - 6, 101)
        head = Text(f"Run {res['run_id']} · {res['suite']} · {res['status']} · {_when(res['started_at'])} UTC\n",
                    style="bold")
        body = scatter(points, cols, rows)
        foot = Text("\n" + "\n".join(legend) + "\n" + report.energy_note(res))
        plot.update(Text.assemble(head, body, foot, no_wrap=False))

    def on_resize(self) -> None:
        self.show_results()

    def refresh_runs(self) -> None:
        if self.rec is None:
            return
        try:
            self.runs = runner.list_runs(self.rec, limit=100)
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        table = self.query_one("#bench-runs", DataTable)
        keep = self.highlighted_run()
        table.clear()
        for r in self.runs:
            pick = "AB"[self.picked.index(r["id"])] if r["id"] in self.picked else ""
            table.add_row(pick, str(r["id"]), r["suite"], r["status"], str(r["items"]), _when(r["started_at"]),
                          (r["meter"] or "").split("(")[0], key=str(r["id"]))
        if keep is not None:
            index = next((i for i, r in enumerate(self.runs) if r["id"] == keep["id"]), None)
            if index is not None:
                table.move_cursor(row=index)

    def highlighted_run(self) -> dict[str, Any] | None:
        table = self.query_one("#bench-runs", DataTable)
        if not self.runs or not 0 <= table.cursor_row < len(self.runs):
            return None
        return self.runs[table.cursor_row]

    @on(DataTable.RowSelected, "#bench-runs")
    def pick_run(self) -> None:
        run = self.highlighted_run()
        if run is None or self.rec is None:
            return
        run_id = run["id"]
        self.picked = [p for p in self.picked if p != run_id][-1:] + [run_id]
        try:
            if not self.running:  # the run being made keeps the Run tab and the plot
                self.run_id, self.results = run_id, runner.results(self.rec, run_id)
            self.comparison = runner.compare(self.rec, *self.picked) if len(self.picked) == 2 else None
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.show_results()
        self.show_comparison()
        self.refresh_runs()

    def show_comparison(self) -> None:
        title = self.query_one("#bench-compare-title", Static)
        table = self.query_one("#bench-compare", DataTable)
        table.clear()
        cmp = self.comparison
        table.display = cmp is not None
        if cmp is None:
            title.update(Text(f"Run {self.picked[0]} picked: pick another to compare." if self.picked else ""))
            return
        a, b = cmp["a"], cmp["b"]
        machines = "same machine" if a["machine"] == b["machine"] else f"{a['machine']} → {b['machine']}"
        title.update(Text(f"A = run {a['run_id']} ({a['suite']}, {_when(a['started_at'])}) → B = run "
                          f"{b['run_id']} ({b['suite']}, {_when(b['started_at'])}); {machines}"))
        for row in comparison_rows(cmp):
            table.add_row(*row)
