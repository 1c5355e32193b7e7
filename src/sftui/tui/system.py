"""System memory, swap, CPU and the run's resident memory.

The supervisor samples them; once the run is not live (ended, or its supervisor gone) nobody
does, so the last sample is shown for what it is: memory dimmed under "last seen HH:MM:SS", the
CPU load as "—", the run's RSS left out (its worker is gone); never as if current.
"""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.units import fmt_gib
from sftui.tui.render import bar, crop, lines_text
from sftui.tui.view import Panel
from sftui.viewmodel import View, fraction, seen_at


class SystemPanel(Panel):
    def key(self, view: View) -> Hashable:
        return (view.telemetry or {}).get("t"), view.state.live

    def wanted_lines(self, view: View | None) -> int:
        return 4

    def build(self, view: View, width: int, height: int) -> Text:
        tele = view.telemetry
        if tele is None:
            return crop(Text("no telemetry yet", "dim"), width)
        sysm = tele.get("system") or {}
        live = view.state.live

        mu, mt = sysm.get("mem_used"), sysm.get("mem_total")
        su, stt = sysm.get("swap_used"), sysm.get("swap_total")
        cpu = sysm.get("cpu_percent") if live else None  # a load of that moment: meaningless later
        cpu_text = "—" if not live else "n/a" if cpu is None else f"{cpu:.0f}%"
        values = [f"{fmt_gib(mu)}/{fmt_gib(mt)} GiB", f"{fmt_gib(su)}/{fmt_gib(stt)} GiB", cpu_text]
        vw = max(len(v) for v in values)
        bw = max(3, min(24, width - 5 - vw - 1))

        def row(label: str, frac: float | None, value: str) -> Text:
            line = Text.assemble((f"{label:<5}", "bold"), bar(frac, bw, None if live else "grey50"), " ",
                                 value.rjust(vw))
            if not live:
                line.stylize("dim")
            return crop(line, width)

        if live:
            last = Text.assemble(("run  ", "bold"), f"RSS {fmt_gib(tele.get('run_rss'), 2)} GiB")
        else:
            last = Text(f"last seen {seen_at(tele.get('t'), self.app.clock())}", "dim italic")
        lines = [
            row("RAM", fraction(mu, mt), values[0]),
            row("swap", fraction(su, stt) if stt else 0.0, values[1]),
            row("CPU", None if cpu is None else cpu / 100, values[2]),
            crop(last, width),
        ]
        return lines_text(lines)
