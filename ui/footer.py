"""The footer every screen shows: Textual's, kept to one line of the terminal's width.

Textual's footer lays every binding out in a row and cuts the row at the screen's edge (it scrolls sideways, which
nobody finds), so at 80 columns the chat showed "f4 Mod…". This one leaves out the keys that do not fit — first the
screen's `FOOTER_DROP_FIRST` actions, in that order, then from the right — so what is shown is whole. A key left
out still works, and the command palette (^p, always shown) lists every action.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import events
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def key_width(key: FooterKey) -> int:
    """Columns a key takes: its key padded by a space each side, then its description and a space."""
    return len(key.key_display) + 2 + (len(key.description) + 1 if key.description else 0)


def fit(keys: list[FooterKey], width: int, drop_first: Iterable[str] = ()) -> list[FooterKey]:
    """The keys to show in `width` columns, in their order."""
    shown = list(keys)
    order = list(drop_first)
    while shown and sum(map(key_width, shown)) > width:
        victim = next((k for a in order for k in shown if k.action.split("(")[0] == a), shown[-1])
        shown.remove(victim)
    return shown


class FitFooter(Footer):
    def __init__(self) -> None:
        super().__init__()
        self._fitted_to = 0  # the width the keys were last chosen for

    def compose(self):  # type: ignore[no-untyped-def]
        widgets: list[Widget] = list(super().compose())
        width = self._fitted_to = self.size.width
        if not width or not all(isinstance(w, FooterKey) for w in widgets):
            yield from widgets  # not laid out yet (a resize follows), or grouped keys: Textual's own row
            return
        palette = [w for w in widgets if w.has_class("-command-palette")]
        keys = [w for w in widgets if w not in palette]
        # the palette key sits at the right edge: its border and right padding take the columns of its key's padding
        room = width - sum(key_width(w) for w in palette)  # type: ignore[arg-type]
        yield from fit(keys, room, getattr(self.screen, "FOOTER_DROP_FIRST", ()))  # type: ignore[arg-type]
        yield from palette

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._fitted_to:
            self.call_after_refresh(self.recompose)
