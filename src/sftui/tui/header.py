"""The header line: run name, status (``lost`` included), attempt, rung, step, and the run's
visible choices (packed batches, LoRA)."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.runfile import ENDED
from sftui.runstate import params_text, rung_text
from sftui.tui.render import fit_line
from sftui.tui.view import Panel
from sftui.viewmodel import View

STATUS_STYLE = {
    "starting": "bold black on cyan",
    "running": "bold black on green",
    "waiting": "bold black on yellow",
    "finished": "bold white on blue",
    "failed": "bold white on red",
    "stopped": "bold black on magenta",
    "lost": "bold white on red",
}

STATUS_HINT = {
    "waiting": "out of memory: answer the prompt",
    "lost": "no supervisor holds the run's lock",
}


class HeaderPanel(Panel):
    def key(self, view: View) -> Hashable:
        s = view.state
        return (view.status, s.name, s.attempt, s.batch_size, s.grad_accum, s.world_size, s.step,
                s.total_steps, round(s.epoch or 0, 2), s.epochs, s.reason, s.exit_code, s.params,
                s.batches)

    def placeholder(self) -> Text:
        return Text.assemble((" sftui ", "bold reverse"), " ", ("reading the run…", "dim"))

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state
        status = view.status
        chips: list[tuple[Text | str, int]] = [
            (Text(" sftui ", "bold reverse"), 0),
            (Text(s.name or s.path.name, "bold"), 0),
            (Text(f" {status.upper()} ", STATUS_STYLE.get(status, "bold reverse")), 0),
        ]
        if s.attempt is not None:
            chips.append((f"attempt {s.attempt}", 3))
        chips.append((Text.assemble("batch ", (rung_text(s.batch_size, s.world_size, s.grad_accum), "bold")), 1))
        total = f"/{s.total_steps}" if s.total_steps else ""
        chips.append((f"step {s.step}{total}", 2))
        if s.epochs:
            chips.append((f"epoch {s.epoch_text}", 5))  # never above its total
        if s.batches == "packed":  # padding-free micro-batches (--packing, or its default on a GPU)
            chips.append(("packed", 6))
        if s.lora and s.params:  # what a LoRA run trains, e.g. "LoRA r16 α32: 40.4M of 7.6B params"
            chips.append((params_text(s.params, s.lora), 6))
        if status in ENDED and (s.reason or s.exit_code is not None):
            why = s.reason or ""
            chips.append((Text(f"{why} (exit {s.exit_code})".strip(), "italic"), 4))
        elif status in STATUS_HINT:
            chips.append((Text(STATUS_HINT[status], "italic"), 4))
        return fit_line(chips, width, sep=" │ ")
