"""The batch ladder: each rung numbered, its peak memory once measured, else the forecast's
("~8.6 GiB", flagged when predicted not to fit), else "?"; the current rung marked, the rungs
that ran out of memory crossed. A ladder longer than the panel shows the rungs around the
current one."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.units import fmt_gib
from sftui.tui.render import crop, lines_text
from sftui.tui.view import Panel
from sftui.viewmodel import View

MAX_LINES = 4


def rung_line(i: int, rung: int, view: View, width: int = 40) -> Text:
    """` 2 ▶ 12  31.2 GiB` (measured) or ` 3   8  ~20.5 GiB` (forecast) — shared by the ladder
    panel and the OOM prompt."""
    s = view.state
    current = rung == s.batch_size
    oom = rung in s.oom_rungs
    peak = s.rung_peaks.get(rung)
    rf = view.forecast
    predicted = rf.peak(rung) if rf is not None else None
    mark = Text("▶", "bold green") if current else Text(" ")
    head = Text.assemble((f"{i:>2}", "dim"), " ", mark, (f"{rung:>4}", "bold" if current else ""), "  ")
    if oom:
        options = [Text("✗ OOM", "bold red"), Text("✗", "bold red")]
    elif peak is not None:
        options = [Text(f"{fmt_gib(peak)} GiB"), Text(f"{fmt_gib(peak)}G"), Text(f"{fmt_gib(peak, 0)}G")]
    elif predicted is not None and rf.fits(rung) is False:
        options = [Text(f"~{fmt_gib(predicted)} GiB won't fit", "bold yellow"),
                   Text(f"~{fmt_gib(predicted)} GiB ✗", "bold yellow"), Text(f"~{fmt_gib(predicted, 0)}G✗", "bold yellow"),
                   Text("✗", "bold yellow")]
    elif predicted is not None:
        options = [Text(f"~{fmt_gib(predicted)} GiB"), Text(f"~{fmt_gib(predicted)}G"),
                   Text(f"~{fmt_gib(predicted, 0)}G")]
    else:
        options = [Text("?", "dim")]
    for what in options:  # the first form that fits whole: never a number cut in half
        if head.cell_len + what.cell_len <= width:
            return Text.assemble(head, what)
    return crop(head, width)


class LadderPanel(Panel):
    def key(self, view: View) -> Hashable:
        s = view.state
        return (tuple(s.ladder), tuple(s.oom_rungs), s.batch_size, tuple(sorted(s.rung_peaks.items())), view.forecast)

    def wanted_lines(self, view: View | None) -> int:
        if view is None:
            return 1
        return MAX_LINES

    def build(self, view: View, width: int, height: int) -> Text:
        ladder = view.state.ladder
        if not ladder:
            return Text("no ladder", "dim")
        first = window_start(ladder, view.state.batch_size)
        lines = []
        for i in range(first, min(len(ladder), first + MAX_LINES)):
            line = rung_line(i + 1, ladder[i], view, width - 1)  # a blank column before the border
            line.pad_right(width - line.cell_len)
            lines.append(line)
        return lines_text(lines)


def window_start(ladder: list[int], current: int | None) -> int:
    """The first rung shown when the ladder is longer than the panel: the current rung with the
    one above it and those below (where + and - lead), keeping their ladder numbers."""
    if len(ladder) <= MAX_LINES or current not in ladder:
        return 0
    return max(0, min(ladder.index(current) - 1, len(ladder) - MAX_LINES))
