"""One row per GPU from the latest telemetry sample, or the reason there are none.

Once the run is not live nobody samples the GPUs: the title says when the last sample was
taken, the rows are dimmed, the run's marker goes, and utilization, temperature and power (of
that moment only) are left out; memory stays, as last seen."""

from __future__ import annotations

from typing import Any, Hashable

from rich.text import Text

from sftui.runstate import fmt_gib
from sftui.tui.render import bar, crop, level_style, lines_text, sparkline
from sftui.tui.view import Panel
from sftui.viewmodel import View, fraction, gpu_key, seen_at

SPARK_W = 10


def _short_name(name: str | None) -> str:
    if not name:
        return "GPU"
    for prefix in ("NVIDIA ", "Tesla "):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


class GpuPanel(Panel):
    def key(self, view: View) -> Hashable:
        tele = view.telemetry or {}
        return (tele.get("t"), tele.get("gpu_error"), view.state.config.get("cpu"), view.state.live)

    def show(self, view: View) -> None:
        super().show(view)
        t = (view.telemetry or {}).get("t")
        title = "GPUs" if view.state.live or t is None else f"GPUs · last seen {seen_at(t, self.app.clock())}"
        if title != self.border_title:
            self.border_title = title

    def wanted_lines(self, view: View | None) -> int:
        if view is None or not view.telemetry or not view.telemetry.get("gpus"):
            return 1
        return len(view.telemetry["gpus"])

    def no_gpu_text(self, view: View) -> str:
        tele = view.telemetry
        if tele is None:
            return "no telemetry yet (the supervisor samples the GPUs every few seconds)"
        why = tele.get("gpu_error") or "no GPUs visible to this run"
        on_cpu = view.state.config.get("cpu") or tele.get("gpu_error")
        return why + (" — training on the CPU" if on_cpu else "")

    def build(self, view: View, width: int, height: int) -> Text:
        tele = view.telemetry or {}
        gpus = tele.get("gpus") or []
        if not gpus:
            return crop(Text(self.no_gpu_text(view), "yellow"), width)
        history = view.gpu_history()
        live = view.state.live
        return lines_text([self.row(g, history.get(gpu_key(g), []), width, live) for g in gpus])

    def row(self, g: dict[str, Any], hist: list[dict[str, Any]], width: int, live: bool = True) -> Text:
        mem_frac = fraction(g.get("mem_used"), g.get("mem_total"))
        util = g.get("util")
        mark = Text("▶", "bold green") if g.get("in_run") and live else Text(" ")
        fields: list[tuple[str, int, Text]] = [  # (name, drop order: higher goes first, text)
            ("mark", 0, Text.assemble(mark, (f"{g.get('index', '?')}", "bold"))),
            ("name", 5, Text(f"{_short_name(g.get('name'))[:18]:<18}")),
            ("bar", 0, Text("")),
            ("mem", 0, Text(f"{fmt_gib(g.get('mem_used')):>5}/{fmt_gib(g.get('mem_total'))} GiB")),
            *([("util", 1, Text(f"{'n/a' if util is None else f'{util:.0f}%':>4}", level_style(fraction(util, 100)))),
               ("temp", 2, Text("n/a" if g.get("temp") is None else f"{g['temp']:.0f}°C")),
               ("power", 3, Text(self.power(g)))] if live else []),
            ("spark", 4, Text.assemble(("mem ", "dim"),
                                        sparkline([fraction(h.get("mem_used"), h.get("mem_total")) for h in hist], SPARK_W, "cyan"),
                                        (" util ", "dim"),
                                        sparkline([fraction(h.get("util"), 100) for h in hist], SPARK_W, "green"))),
        ]
        bar_min, bar_max = 8, 30
        while True:
            fixed = sum(t.cell_len for n, _, t in fields if n != "bar") + (len(fields) - 1)
            if width - fixed >= bar_min or max(p for _, p, _ in fields) == 0:
                break
            worst = max(range(len(fields)), key=lambda i: fields[i][1])
            fields.pop(worst)
        bar_w = max(1, min(bar_max, width - fixed))
        parts = []
        for n, _, t in fields:
            parts.append(bar(mem_frac, bar_w, None if live else "grey50") if n == "bar" else t)
        line = Text(" ").join(parts)
        if not live:
            line.stylize("dim")
        return crop(line, width)

    @staticmethod
    def power(g: dict[str, Any]) -> str:
        p, lim = g.get("power_w"), g.get("power_limit_w")
        if p is None:
            return "n/a W"
        return f"{p:.0f}/{lim:.0f} W" if lim else f"{p:.0f} W"
