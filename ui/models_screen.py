"""The models screen: every model localmoe can run here and every catalog file, with the planner's verdict for this
machine and the engine that would run it (`localmoe.home.inventory`, what `localmoe models` and `models --available`
print); the highlighted one can become the small or large tier (written by `settings.update`, the same checked
writer the settings screen uses), a catalog file shows the `localmoe pull` command that fetches it."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Header, ProgressBar, Static

from localmoe.errors import LocalmoeError
from localmoe.home import inventory, models, settings
from localmoe.ui.footer import FitFooter
from localmoe.units import human_bytes

COLUMNS = ("Model", "Tier", "Verdict", "Engine", "Layout", "Size", "Quant", "Source")
IN_VIEW = 4  # the columns after the model's id that must fit beside it: tier, verdict, engine, layout
# the table's margin and vertical scrollbar, and each column's padding
CHROME = 3
PADDING = 2


def short_verdict(m: inventory.ModelInfo) -> str:
    """The verdict in a few words for the table; the detail line below it has the whole sentence."""
    v = m.verdict
    if m.error is not None:
        return "unreadable"
    if v is None:
        return "?"
    if v.kind == "disk":
        return f"disk ~{human_bytes(v.disk_bytes_per_token)}/tok"
    return v.label


class ModelsScreen(Screen[bool]):
    """Dismissed with True when a tier was written to settings.toml: the chat then reloads its models."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("s", "set_tier('small')", "Set small"),
        Binding("l", "set_tier('large')", "Set large"),
        Binding("p", "pull", "Pull command"),
        Binding("d", "download", "Download"),
        Binding("r", "reload", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[inventory.ModelInfo] = []
        self.tiers: dict[str, str | None] = {}  # small/large -> the id of the model answering it
        self.changed = False
        self.where = ""  # the budget planned for, in words

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Reading models and planning them on this machine…", id="models-budget")
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Static("", id="model-detail")
        yield ProgressBar(id="pull-bar", show_eta=False)
        yield Static("", id="pull-status")
        yield FitFooter()

    def on_mount(self) -> None:
        self.title, self.sub_title = "localmoe", "models"
        self.query_one("#pull-bar", ProgressBar).display = False  # both shown once a download starts
        self.query_one("#pull-status", Static).display = False
        self.pulling: str | None = None
        self.query_one(DataTable).focus()
        self.load_rows()

    @work(thread=True, exclusive=True, group="models")
    def load_rows(self) -> None:
        """Layouts are read from file headers and every file is planned: milliseconds each, but off the UI thread."""
        from localmoe.placement.plan import Budget

        try:
            budget = Budget.detect()
            local = inventory.local_models(budget)
            rows = local + inventory.catalog_models(budget, {m.id for m in local})
            tiers = self._tiers()
        except LocalmoeError as exc:
            self.app.call_from_thread(self.query_one("#models-budget", Static).update, Text(f"Cannot list: {exc}"))
            return
        gpu = f"{human_bytes(budget.vram_bytes)} VRAM free, " if budget.vram_bytes and not budget.unified else ""
        where = f"Planned for {gpu}{human_bytes(budget.ram_bytes)} RAM available" + (
            " (unified)" if budget.unified else "")
        self.where = where
        self.app.call_from_thread(self.show_rows, rows, tiers)

    @staticmethod
    def _tiers() -> dict[str, str | None]:
        """The models answering each tier now: as settings.toml names them, else the defaults the assistant uses."""
        st = settings.load()
        out: dict[str, str | None] = {}
        for tier, configured in (("small", st.small), ("large", st.large)):
            try:
                out[tier] = models.resolve(configured).id if configured else models.tier_model(tier).id
            except LocalmoeError:
                out[tier] = None
        return out

    def show_rows(self, rows: list[inventory.ModelInfo], tiers: dict[str, str | None]) -> None:
        self.rows, self.tiers = rows, tiers
        table = self.query_one(DataTable)
        current = self.selected()
        keep = current.id if current is not None else None
        table.clear(columns=True)  # columns too: their widths only grow as rows are added
        table.add_columns(*COLUMNS)
        cells = []
        for m in rows:
            size = "" if m.size_bytes is None else ("~" if m.size_estimated else "") + human_bytes(m.size_bytes)
            source = m.source if m.candidate is None else "pulled" if m.installed else "catalog"
            cells.append([m.id, self._tier_of(m), short_verdict(m), m.engine, m.layout_text(), size, m.quant, source])
        # The model's id gets what the tier, verdict, engine and layout leave of the width, so those stay in view on
        # 80 columns (size, quantisation and source scroll in from the right; the detail line below has them all).
        beside = sum(max(len(COLUMNS[i]), *(len(c[i]) for c in cells)) + PADDING for i in range(1, 1 + IN_VIEW))
        width = max(12, self.size.width - beside - PADDING - CHROME)
        for c in cells:
            name = c[0] if len(c[0]) <= width else c[0][:width - 1] + "…"
            table.add_row(Text(name), c[1], Text(c[2]), c[3], c[4], Text(c[5], justify="right"), c[6], c[7])
        if keep is not None:
            index = next((i for i, m in enumerate(rows) if m.id == keep), None)
            if index is not None:
                table.move_cursor(row=index)
        small, large = tiers.get("small") or "none", tiers.get("large") or "none (s/l on a row sets one)"
        self.query_one("#models-budget", Static).update(Text(
            f"{self.where} · small tier: {small} · large tier: {large}"))
        self.show_detail()

    def on_resize(self) -> None:
        if self.rows:  # the id column's width follows the terminal's
            self.show_rows(self.rows, self.tiers)

    def _tier_of(self, m: inventory.ModelInfo) -> str:
        local_id = self._local_id(m)
        marks = [t for t in ("small", "large") if local_id is not None and self.tiers.get(t) == local_id]
        return "both" if len(marks) == 2 else marks[0] if marks else ""

    @staticmethod
    def _local_id(m: inventory.ModelInfo) -> str | None:
        """The id a tier would name: a local model's own, a pulled catalog file's installed id."""
        if m.candidate is None:
            return m.id
        return m.candidate.entry.local_id(m.candidate.file) if m.installed else None

    def selected(self) -> inventory.ModelInfo | None:
        table = self.query_one(DataTable)
        if not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]

    @on(DataTable.RowHighlighted)
    def show_detail(self) -> None:
        m = self.selected()
        line = self.query_one("#model-detail", Static)
        if m is None:
            line.update("")
            return
        if m.error is not None:
            line.update(Text(f"{m.id} ({m.source}): unreadable: {m.error}"))
            return
        experts = f"{m.experts} experts (top-{m.top_k})" if m.is_moe else "dense"
        size = human_bytes(m.size_bytes) + (" est." if m.size_estimated else "")
        v = m.verdict
        verdict = "?" if v is None else v.label + (f" ({v.reason})" if v.reason else "")
        where = f" · {m.ref.path}" if m.ref is not None else ""
        how = ""
        if m.candidate is not None:
            how = f" · installed as {self._local_id(m)}" if m.installed else f" · get it: {m.pull_command} (p)"
        engine = m.engine + (f" ({m.engine_reason})" if m.engine_reason else
                             " (chosen from the file's header once pulled)" if m.engine == "auto" else "")
        line.update(Text(f"{m.id}: {m.architecture}, {m.layers} layers, {experts}, {size} {m.quant} · {verdict} · "
                         f"engine {engine}{how}{where}"))

    # -- actions ----------------------------------------------------------------------------------------------
    def action_back(self) -> None:
        if self.pulling is not None:
            self.app.notify(f"{self.pulling} goes on downloading in the background.", title="Pull", markup=False)
        self.dismiss(self.changed)

    def action_reload(self) -> None:
        self.load_rows()

    def action_set_tier(self, tier: str) -> None:
        m = self.selected()
        if m is None:
            return
        local_id = self._local_id(m)
        if local_id is None:
            self.notify(f"{m.id} is not installed: run `{m.pull_command}` first.", severity="error", markup=False)
            return
        if m.verdict is not None and m.verdict.kind == "refused":
            self.notify(f"{m.id} does not fit this machine: {m.verdict.reason}", severity="error", markup=False)
            return
        try:
            saved = settings.update("tiers", {tier: local_id})
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.changed = True
        self.tiers = {**self.tiers, tier: local_id}
        self.show_rows(self.rows, self.tiers)
        self.notify(f"{local_id} is the {tier} tier ({saved.path}); the next question uses it.", title="Models",
                    markup=False)

    def action_pull(self) -> None:
        m = self.selected()
        if m is None or m.candidate is None:
            self.notify("Pick a catalog row (source: catalog) to see how to get it.")
            return
        command = str(m.pull_command)
        self.app.copy_to_clipboard(command)
        self.notify(f"Run in a shell: {command} (copied to the clipboard)", title="Pull", timeout=15, markup=False)

    def action_download(self) -> None:
        """Pull the highlighted catalog file here, with a progress bar; the `.part` file resumes an interrupted one."""
        m = self.selected()
        if m is None or m.candidate is None or m.installed:
            self.notify("Pick a catalog row that is not installed (source: catalog) to download it.")
            return
        if self.pulling is not None:
            self.notify(f"{self.pulling} is downloading; one at a time.")
            return
        self.pulling = m.id
        spec = m.id  # what `localmoe pull` takes
        bar = self.query_one("#pull-bar", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        status = self.query_one("#pull-status", Static)
        status.update(Text(f"Pulling {spec}…"))
        status.display = True
        self.run_pull(spec)

    def show_progress(self, label: str, done: int, total: int) -> None:
        if not self.is_attached:  # Esc left the screen: the pull goes on in the background
            return
        self.query_one("#pull-bar", ProgressBar).update(total=total, progress=done)
        pct = 100 * done / total if total else 100.0
        self.query_one("#pull-status", Static).update(
            Text(f"Pulling {label}: {human_bytes(done)} / {human_bytes(total)} ({pct:.0f}%)"))

    def pull_done(self, message: str, ok: bool = True) -> None:
        self.pulling = None
        if not self.is_attached:
            self.app.notify(message, title="Pull", markup=False)
            return
        self.query_one("#pull-status", Static).update(Text(message))
        if not ok:  # an indeterminate bar left moving would say a download is still under way
            self.query_one("#pull-bar", ProgressBar).display = False
        self.load_rows()

    @work(thread=True, exclusive=True, group="pull")
    def run_pull(self, spec: str) -> None:
        from localmoe.home import inventory, pull

        try:
            result = pull.pull(spec, inventory.plan_target, progress=False,
                               on_progress=lambda done, total: self.app.call_from_thread(
                                   self.show_progress, spec, done, total))
        except Exception as exc:  # noqa: BLE001 (one line on the screen, never a traceback)
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.app.call_from_thread(self.pull_done, f"Pull failed: {text}", False)
            return
        self.app.call_from_thread(self.pull_done, f"Pulled {result.target.id} into {result.path}")
