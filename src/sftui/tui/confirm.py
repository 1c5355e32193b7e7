"""Small modal dialogs: yes/no confirmation, and typing a batch size."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class ConfirmScreen(ModalScreen[bool]):
    """A question answered with y / Enter (yes) or n / Escape (no)."""

    BINDINGS = [
        Binding("y,enter", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, title: str, body: Text | str, yes: str = "yes"):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.body = body
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = self.title_text
            yield Static(self.body, classes="dialog-body")
            yield Static(Text.assemble(("y", "bold reverse"), " / ", ("Enter", "bold reverse"), f" {self.yes}    ",
                                       ("n", "bold reverse"), " / ", ("Esc", "bold reverse"), " cancel"),
                         classes="dialog-keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def parse_batch(text: str) -> tuple[int | None, str | None]:
    """A positive integer, or the reason it is not one."""
    text = text.strip()
    if not text:
        return None, "type a batch size"
    try:
        value = int(text)
    except ValueError:
        return None, f"not a whole number: {text!r}"
    if value < 1:
        return None, "the batch size must be at least 1"
    if value > 1_000_000:
        return None, "that batch size is not plausible"
    return value, None


class BatchScreen(ModalScreen["int | None"]):
    """``b``: type a per-GPU batch size; Enter submits, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, current: int | None, describe: Callable[[int], Text]):
        super().__init__(classes="dialog-screen")
        self.current = current
        self.describe = describe

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = "Switch the batch size"
            yield Static(f"Per-GPU batch size (now {self.current}); training restarts from a checkpoint.",
                         classes="dialog-body")
            yield Input(placeholder="e.g. 12", id="batch-input", restrict=r"[0-9]*", max_length=7)
            yield Static("", id="batch-info", classes="dialog-body")
            yield Static(Text.assemble(("Enter", "bold reverse"), " switch    ", ("Esc", "bold reverse"), " cancel"),
                         classes="dialog-keys")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        info = self.query_one("#batch-info", Static)
        value, _ = parse_batch(event.value)
        info.update(self.describe(value) if value is not None else "")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        value, error = parse_batch(event.value)
        if error is not None:
            self.query_one("#batch-info", Static).update(Text(error, "bold red"))
            return
        self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)
