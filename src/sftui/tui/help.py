"""The help screen: every key, and what leaving does."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("+  -", "one rung up / down the batch ladder (asks to confirm, shows the forecast)"),
    ("b", "type a batch size"),
    ("c", "checkpoint now"),
    ("s", "stop training (asks to confirm; resumable with sftui run --resume)"),
    ("q  Ctrl-C  Ctrl-Q", "leave this screen; training goes on in the background"),
    ("?", "this help"),
)
OOM_KEYS = (
    ("y  Enter", "restart at the proposed rung"),
    ("n", "stop the run"),
    ("1 … 9", "restart at rung 1 … 9 of the ladder (a rung's number, not a batch size)"),
)


def _table(rows: tuple[tuple[str, str], ...]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,enter", "close", "close")]

    def __init__(self, run_dir: str = ""):
        super().__init__(classes="dialog-screen")
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help") as box:
            box.border_title = "sftui keys"
            yield Static(_table(KEYS), classes="dialog-body")
            yield Static(Text("In the out-of-memory prompt:", "bold"), classes="dialog-body")
            yield Static(_table(OOM_KEYS), classes="dialog-body")
            if self.run_dir:
                yield Static(Text.assemble(("Come back with: ", "dim"), f"sftui attach {self.run_dir}"),
                             classes="dialog-body")
            yield Static(Text.assemble(("Esc", "bold reverse"), " / ", ("?", "bold reverse"), " close"),
                         classes="dialog-keys")

    def action_close(self) -> None:
        self.dismiss(None)
