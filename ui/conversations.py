"""The conversations screen: every recorded chat, searched as you type (the recorder's full-text index), resumed,
renamed, deleted with undo, exported.

Delete with undo keeps the deleted rows in memory, not in the database: the delete is real at once (the CLI,
`ask -c` and other processes never see a half-deleted conversation, and no reader has to learn to skip a
"deleted" mark), and Ctrl+Z puts the rows back under their ids while this screen is open. Leaving the screen
forgets the copies and compacts the file, as `logs --delete` does.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Static

from localmoe.errors import LocalmoeError
from localmoe.home import paths
from localmoe.record.recorder import Recorder
from localmoe.ui.footer import FitFooter

# the other columns' widths and the table's padding: the title gets what is left of the terminal's width
FIXED_COLUMNS = 62


def export_dir() -> Any:
    return paths.data_dir() / "exports"


UNDO_NOTE = "Ctrl+Z brings it back (until you leave this screen)."


class ConversationsScreen(Screen[dict[str, Any]]):
    """Dismissed with {"resume": id or None, "deleted": ids still deleted}: the chat acts on both."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("enter", "resume", "Resume", show=True),
        Binding("ctrl+r", "rename", "Rename"),
        # priority: the search box would take these keys for its own editing
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("ctrl+z", "undo", "Undo delete"),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rec: Recorder | None = None
        self.rows: list[dict[str, Any]] = []
        self.undo: list[tuple[str, dict[str, list[dict[str, Any]]]]] = []  # (title, snapshot), latest last
        self.deleted: set[int] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="Search every message (Enter resumes the highlighted conversation)", id="search")
        yield Input(id="rename", classes="hidden")
        yield DataTable(id="conversations", cursor_type="row", zebra_stripes=True)
        yield Static("", id="match")
        yield FitFooter()

    def on_mount(self) -> None:
        self.title, self.sub_title = "localmoe", "conversations"
        try:
            self.rec = Recorder()
        except LocalmoeError as exc:
            self.query_one("#match", Static).update(Text(f"Cannot open the database: {exc}"))
            return
        self.refresh_list()
        self.query_one("#search", Input).focus()

    def on_unmount(self) -> None:
        # "Ctrl+Z brings it back" ends with this screen: that toast must not outlive it (an export's may)
        for note in [n for n in self.app._notifications if n.message.endswith(UNDO_NOTE)]:
            self.app._unnotify(note)
        if self.rec is not None:
            if self.deleted:
                try:
                    self.rec.vacuum()  # what was deleted leaves the file, as with `logs --delete`
                except LocalmoeError:
                    pass  # the rows are gone; the next delete or `logs --delete` compacts the file
            self.rec.close()

    # -- the list ---------------------------------------------------------------------------------------------
    def refresh_list(self, keep: int | None = None) -> None:
        if self.rec is None:
            return
        query = self.query_one("#search", Input).value.strip()
        try:
            self.rows = self.rec.conversation_list(query or None)
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        table = self.query_one(DataTable)
        # the columns afresh: a column keeps the widest cell it ever held, so titles cut for a wider terminal
        # would push the other columns off a narrower one
        table.clear(columns=True)
        table.add_columns("Title", "Model", "Last message", "Msgs", "Joules")
        self._fitted = self.size.width
        width = max(12, self.size.width - FIXED_COLUMNS)
        for r in self.rows:
            title = r["title"] or f"conversation {r['id']}"
            joules = "" if r["joules"] is None else f"{'' if r['measured'] else '~'}{r['joules']:.1f} J"
            table.add_row(Text(title if len(title) <= width else title[:width - 1] + "…"),
                          Text(r["model"] or ""), (r["last_at"] or "")[:16].replace("T", " "),
                          Text(str(r["messages"]), justify="right"), Text(joules, justify="right"), key=str(r["id"]))
        if keep is not None and str(keep) in table.rows:
            table.move_cursor(row=table.get_row_index(str(keep)))
        self.show_match()
        if not self.rows:
            self.query_one("#match", Static).update(
                f"No conversation has a message matching {query!r}." if query else "No conversations recorded yet.")

    def on_resize(self) -> None:
        if self.size.width != getattr(self, "_fitted", None):  # titles are cut to the width: cut them anew
            row = self.selected()
            self.refresh_list(keep=row["id"] if row else None)

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def show_match(self) -> None:
        row = self.selected()
        line = self.query_one("#match", Static)
        if row is None:
            line.update("")
        elif row.get("snippet"):
            line.update(Text(f"#{row['id']}: " + " ".join(row["snippet"].split())))
        else:
            line.update(Text(f"#{row['id']} · started {row['created_at'][:16].replace('T', ' ')} UTC"))

    @on(Input.Changed, "#search")
    def search(self) -> None:
        self.refresh_list()

    @on(DataTable.RowHighlighted)
    def highlighted(self) -> None:
        self.show_match()

    def action_move(self, step: int) -> None:
        table = self.query_one(DataTable)
        if self.rows:
            table.move_cursor(row=min(max(table.cursor_row + step, 0), len(self.rows) - 1))

    # -- actions ----------------------------------------------------------------------------------------------
    @on(DataTable.RowSelected)
    @on(Input.Submitted, "#search")
    def action_resume(self) -> None:
        row = self.selected()
        if row is None:
            self.notify("No conversation to resume.")
            return
        self.dismiss({"resume": row["id"], "deleted": self.deleted})

    def action_back(self) -> None:
        rename = self.query_one("#rename", Input)
        if rename.has_class("editing"):
            self.end_rename()
            return
        self.dismiss({"resume": None, "deleted": self.deleted})

    def action_rename(self) -> None:
        row = self.selected()
        if row is None:
            return
        rename = self.query_one("#rename", Input)
        rename.value = row["title"] or ""
        rename.placeholder = f"New title of conversation {row['id']} (Enter saves, Esc cancels)"
        rename.remove_class("hidden")
        rename.add_class("editing")
        rename.focus()

    def end_rename(self) -> None:
        rename = self.query_one("#rename", Input)
        rename.remove_class("editing")
        rename.add_class("hidden")
        self.query_one("#search", Input).focus()

    @on(Input.Submitted, "#rename")
    def renamed(self, event: Input.Submitted) -> None:
        event.stop()
        row = self.selected()
        if row is None or self.rec is None:
            return self.end_rename()
        try:
            self.rec.rename_conversation(row["id"], event.value)
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.end_rename()
        self.refresh_list(keep=row["id"])

    def action_delete(self) -> None:
        row = self.selected()
        if row is None or self.rec is None:
            return
        try:
            snapshot = self.rec.snapshot_conversations([row["id"]])
            self.rec.delete_conversations([row["id"]])
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        title = row["title"] or f"conversation {row['id']}"
        self.undo.append((title, snapshot))
        self.deleted.add(row["id"])
        self.refresh_list()
        self.notify(f"Deleted {title!r}. {UNDO_NOTE}", markup=False)

    def action_undo(self) -> None:
        if not self.undo or self.rec is None:
            self.notify("Nothing to undo.")
            return
        title, snapshot = self.undo[-1]
        try:
            self.rec.restore_conversations(snapshot)
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.undo.pop()
        cid = snapshot["conversations"][0]["id"]
        self.deleted.discard(cid)
        self.refresh_list(keep=cid)
        self.notify(f"Restored {title!r}.", markup=False)

    def action_export(self) -> None:
        row = self.selected()
        if row is None or self.rec is None:
            return
        try:
            written = [self.rec.export_conversation(row["id"], export_dir(), fmt) for fmt in ("md", "json")]
        except LocalmoeError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.last_export = written
        self.query_one("#match", Static).update(Text(f"Exported to {written[0].parent}: "
                                                     + ", ".join(p.name for p in written)))
        self.notify("Exported to " + " and ".join(str(p) for p in written), title="Export", timeout=15,
                    markup=False)
