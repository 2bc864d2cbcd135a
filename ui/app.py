"""The Textual application: one chat screen over a Session."""

from __future__ import annotations

from importlib.resources import as_file, files

from textual.app import App
from textual.binding import Binding

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

    def on_mount(self) -> None:
        self.push_screen(ChatScreen(self.model_name, self.config))


def run_app(model: str | None = None) -> int:
    LocalmoeApp(model=model).run()
    return 0
