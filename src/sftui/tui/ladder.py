"""The batch ladder: each rung numbered, its peak memory once measured (else "?"), the current
rung marked, the rungs that ran out of memory crossed."""

from __future__ import annotations

import math
from typing import Hashable

from rich.text import Text

from sftui.runstate import fmt_gib
from sftui.tui.render import crop, lines_text
from sftui.tui.view import Panel, View

MAX_LINES = 4


def rung_line(i: int, rung: int, view: View, width: int = 40) -> Text:
    """` 2 ▶ 12  31.2 GiB` — shared by the ladder panel and the OOM prompt."""
    s = view.state
    current = rung == s.batch_size
    oom = rung in s.oom_rungs
    peak = s.rung_peaks.get(rung)
    mark = Text("▶", "bold green") if current else Text(" ")
    head = Text.assemble((f"{i:>2}", "dim"), " ", mark, (f"{rung:>4}", "bold" if current else ""), "  ")
    if oom:
        options = [Text("✗ OOM", "bold red"), Text("✗", "bold red")]
    elif peak is not None:
        options = [Text(f"{fmt_gib(peak)} GiB"), Text(f"{fmt_gib(peak)}G"), Text(f"{peak / 2**30:.0f}G")]
    else:
        options = [Text("?", "dim")]
    for what in options:  # the first form that fits whole: never a number cut in half
        if head.cell_len + what.cell_len <= width:
            return Text.assemble(head, what)
    return crop(head, width)


class LadderPanel(Panel):
    def key(self, view: View) -> Hashable:
        s = view.state
        return (tuple(s.ladder), tuple(s.oom_rungs), s.batch_size, tuple(sorted(s.rung_peaks.items())))

    def wanted_lines(self, view: View | None) -> int:
        if view is None:
            return 1
        return MAX_LINES

    def build(self, view: View, width: int, height: int) -> Text:
        ladder = view.state.ladder
        if not ladder:
            return Text("no ladder", "dim")
        cols = math.ceil(len(ladder) / MAX_LINES)
        rows = math.ceil(len(ladder) / cols)
        col_w = max(8, width // cols)
        lines = []
        for r in range(rows):
            line = Text()
            for c in range(cols):
                i = c * rows + r
                if i < len(ladder):
                    cell = rung_line(i + 1, ladder[i], view, col_w - 1)
                    cell.pad_right(col_w - cell.cell_len)
                    line.append_text(cell)
            lines.append(crop(line, width))
        return lines_text(lines)
