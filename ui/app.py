"""The Textual application: the chat screen over a Session, and the screens it opens."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from importlib.resources import as_file, files

from textual.actions import parse as parse_action
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from localmoe.engine import GenerationConfig
from localmoe.ui.chat import ChatScreen

_STYLES = files("localmoe.assets").joinpath("styles/app.tcss")


class LocalmoeApp(App):
    TITLE = "localmoe"
    # Textual's own Ctrl+Q is hidden from the footer; a new user should see how to leave
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=True, priority=True)]

    def __init__(self, model: str | None = None, config: GenerationConfig | None = None) -> None:
        with as_file(_STYLES) as css:
            self.CSS_PATH = str(css)
            super().__init__()
        self.model_name = model
        self.config = config

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette (Ctrl+P) offers every action of the screen in front, as its footer keys do."""
        yield from super().get_system_commands(screen)
        # The screen's own bindings rather than the active ones: a focused input's Enter would hide the screen's.
        for b in screen.BINDINGS:
            if not isinstance(b, Binding) or not b.show or not b.description:
                continue
            _, name, params = parse_action(b.action)
            if screen.check_action(name, params):  # of two labels on one key, the one that applies now
                title = b.tooltip or b.description  # a footer label kept short has its full name as tooltip
                yield SystemCommand(title, f"{b.key}: {title.lower()}", partial(screen.run_action, b.action))

    def on_mount(self) -> None:
        self.push_screen(ChatScreen(self.model_name, self.config))


def run_app(model: str | None = None) -> int:
    LocalmoeApp(model=model).run()
    return 0
