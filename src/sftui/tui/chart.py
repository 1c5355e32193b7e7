"""The loss chart: the whole run's training loss (RunState's Series: downsampled, not cut), raw
and smoothed, eval loss beside it where present, and a mark where each switch or restart took
over (braille, no dependency)."""

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
        losses = s.losses
        return (len(losses), losses[-1] if losses else None, s.loss, tuple(s.eval_losses), tuple(s.restarts))

    def show(self, view: View) -> None:
        super().show(view)
        s = view.state
        title = "loss"
        losses = s.losses
        if losses and s.loss is not None:  # the last report itself: the series' newest point may be a mean
            smooth = ema([v for _, v in losses[-200:]])[-1]
            title += f" {s.loss:.4f} (smoothed {smooth:.4f})"
        if s.eval_losses:
            title += f" · eval {s.eval_losses[-1][1]:.4f}"
        if title != self.border_title:
            self.border_title = title

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state
        restarts = [(r.step, r.kind) for r in s.restarts]
        return lines_text(loss_chart(s.losses, s.eval_losses, width, height, restarts, s.loss_series.first_step),
                          height)
