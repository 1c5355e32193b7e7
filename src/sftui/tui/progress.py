"""Epoch and step bars, ETA, speed, MFU, and the current phase while not training."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.runstate import fmt_duration, fmt_num
from sftui.tui.render import bar, crop, flow, fmt_si, lines_text
from sftui.tui.view import ENDED, Panel, View

PHASE_NAMES = {"loading_model": "loading the model", "validating": "validating the data"}


class ProgressPanel(Panel):
    def key(self, view: View) -> Hashable:
        s = view.state
        return (view.status, s.step, s.total_steps, s.epoch, s.epochs, s.samples_per_s, s.tokens_per_s, s.mfu,
                s.loss, s.lr, s.grad_norm, s.phase, s.phase_progress, s.batch_size, s.grad_accum)

    def wanted_lines(self, view: View | None) -> int:
        return 4

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state

        def bar_row(label: str, frac: float | None, value: str) -> Text:
            bw = max(3, min(40, width - 6 - len(value) - 1))
            return crop(Text.assemble((f"{label:<6}", "bold"), bar(frac, bw, "cyan"), " ", value), width)

        epochs = s.epochs or s.config.get("epochs")
        epoch_frac = (s.epoch / epochs) if epochs else None
        epoch_value = f"{fmt_num(s.epoch, '.2f')}/{epochs}" if epochs else fmt_num(s.epoch, ".2f")
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
        else:
            chips.append(Text.assemble(("ETA ", "dim"), (fmt_duration(s.eta_s), "bold")))
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
