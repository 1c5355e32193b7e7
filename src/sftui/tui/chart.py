"""The loss chart: raw and smoothed training loss, eval loss where present (braille, no dependency)."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.tui.render import ema, lines_text, loss_chart
from sftui.tui.view import Panel
from sftui.viewmodel import View


class LossChart(Panel):
    DEFAULT_CSS = """
    LossChart { height: 1fr; }
    """

    def key(self, view: View) -> Hashable:
        s = view.state
        return (len(s.losses), s.losses[-1] if s.losses else None, len(s.eval_losses))

    def show(self, view: View) -> None:
        super().show(view)
        s = view.state
        title = "loss"
        if s.losses:
            smooth = ema([v for _, v in s.losses[-200:]])[-1]
            title += f" {s.losses[-1][1]:.4f} (smoothed {smooth:.4f})"
        if s.eval_losses:
            title += f" · eval {s.eval_losses[-1][1]:.4f}"
        if title != self.border_title:
            self.border_title = title

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state
        return lines_text(loss_chart(s.losses, s.eval_losses, width, height), height)
