"""Epoch and step bars, ETA, speed, MFU, and the current phase while not training; under the
bars, what changed the run's size: bad rows skipped, and --max-steps recounted after a batch change."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.runfile import ENDED
from sftui.runstate import RunState
from sftui.units import fmt_duration, fmt_num
from sftui.tui.render import bar, crop, flow, fmt_si, lines_text
from sftui.tui.view import Panel
from sftui.viewmodel import View

PHASE_NAMES = {"loading_model": "loading the model", "validating": "validating the data"}


class ProgressPanel(Panel):
    def key(self, view: View) -> Hashable:
        s = view.state
        return (view.status, s.step, s.total_steps, s.epoch, s.epochs, s.samples_per_s, s.tokens_per_s, s.mfu,
                s.loss, s.lr, s.grad_norm, s.phase, s.phase_progress, s.batch_size, s.grad_accum, s.skipped_rows,
                s.budget_note)

    def wanted_lines(self, view: View | None) -> int:
        return 4

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state

        def bar_row(label: str, frac: float | None, value: str) -> Text:
            bw = max(3, min(40, width - 6 - len(value) - 1))
            return crop(Text.assemble((f"{label:<6}", "bold"), bar(frac, bw, "cyan"), " ", value), width)

        # the total from the step events, else (before the first step) the config's; the bar and
        # RunState.epoch_text stop at the total, so the panel never reads `epoch 2.13/1`
        epochs = s.epochs or s.config.get("epochs")
        epoch_frac = (s.epoch / epochs) if epochs else None
        epoch_value = s.epoch_text if s.epochs or not epochs else f"{s.epoch:.2f}/{epochs}"
        if s.total_steps:
            step_frac = s.step / s.total_steps
            step_value = f"{s.step}/{s.total_steps} {step_frac * 100:.0f}%"
        else:
            step_frac, step_value = None, f"{s.step}/?"
        lines = [bar_row("epoch", epoch_frac, epoch_value), bar_row("step", step_frac, step_value)]

        chips: list[Text] = []
        training = s.phase in (None, "training")
        if view.status in ENDED:
            chips.append(Text(f"{view.status}", "bold"))
        elif view.status == "lost":
            chips.append(Text("supervisor gone", "bold red"))
        elif not training:
            p = s.phase_progress
            name = PHASE_NAMES.get(s.phase or "", s.phase or "")
            chip = Text.assemble(("phase ", "dim"), (name, "bold yellow"))
            if isinstance(p, (int, float)):
                chip.append(" ")
                chip.append_text(bar(p, 10, "yellow"))
                chip.append(f" {p * 100:.0f}%")
            chips.append(chip)
        elif view.status == "waiting":
            chips.append(Text("waiting for a decision", "bold yellow"))
        elif s.eta_s is not None:  # None until the speed is known, and whenever the run is not running
            chips.append(Text.assemble(("ETA ", "dim"), (fmt_duration(s.eta_s), "bold")))
        if s.skipped_rows:
            chips.append(Text(f"{s.skipped_rows:,} bad rows skipped", "yellow"))
        note = budget_chip(s, width)
        if note is not None:
            chips.append(note)
        chips += [
            Text.assemble(("loss ", "dim"), (fmt_num(s.loss, ".4f"), "bold")),
            Text.assemble((fmt_si(s.samples_per_s), "bold"), (" samples/s", "dim")),
            Text.assemble((fmt_si(s.tokens_per_s), "bold"), (" tok/s", "dim")),
            Text.assemble(("MFU ", "dim"), "n/a" if s.mfu is None else f"{s.mfu * 100:.1f}%"),
            Text.assemble(("lr ", "dim"), fmt_num(s.lr, ".2e")),
            Text.assemble(("grad ", "dim"), fmt_num(s.grad_norm, ".2f")),
        ]
        lines += flow(chips, width, 2)
        return lines_text(lines, 4)


def budget_chip(s: RunState, width: int) -> Text | None:
    """``RunState.budget_note`` (why the step total is not --max-steps), in the longest form that
    fits ``width``: the panel is 32 columns wide at 80x24."""
    note = s.budget_note
    if note is None:
        return None
    max_steps = s.config.get("max_steps")
    forms = [note, f"--max-steps {max_steps} = {s.sample_budget:,} samples = {s.total_steps} steps",
             f"max-steps {max_steps} → {s.total_steps} steps"]
    return Text(next((f for f in forms if len(f) <= width), forms[-1]), "italic")
