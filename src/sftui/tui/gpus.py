"""One row per GPU from the latest telemetry sample, or the reason there are none.

Under each GPU: a warning when it is under memory pressure (``RunState.pressure_warnings``),
then the processes holding its memory (nvitop's list: pid, user, memory, command), this
attempt's ranks marked, foreign processes and ranks left from an earlier attempt flagged. On a
small screen (compact) only the flagged ones get a line: the row's marker says the run is there.

Once the run is not live nobody samples the GPUs: the title says when the last sample was
taken, the rows are dimmed, the run's marker goes, and utilization, temperature and power (of
that moment only) are left out; memory stays, as last seen."""

from __future__ import annotations

import textwrap
from typing import Any, Hashable

from rich.text import Text
from textual.geometry import Size

from sftui.gpumemory import Holder
from sftui.units import fmt_gib
from sftui.tui.render import bar, crop, level_style, lines_text, sparkline
from sftui.tui.view import Panel
from sftui.viewmodel import View, fraction, gpu_key, seen_at

SPARK_W = 10
MAX_HOLDERS = 4  # process lines per GPU; the rest are summed up on one more
TAGS = {"rank": ("▶ ", "bold green"), "leftover": ("✗ left over", "bold red"), "foreign": ("✗ foreign", "bold yellow")}


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
        return (tele.get("t"), tele.get("gpu_error"), view.state.config.get("cpu"), view.state.live,
                view.state.attempt, tuple(sorted(view.state.gpu_peaks().items())),
                tuple(sorted(view.pressure_warnings().items())))

    def show(self, view: View) -> None:
        super().show(view)
        t = (view.telemetry or {}).get("t")
        title = "GPUs" if view.state.live or t is None else f"GPUs · last seen {seen_at(t, self.app.clock())}"
        if title != self.border_title:
            self.border_title = title

    def wanted_lines(self, view: View | None) -> int:
        return self.height_at(view, self.content_size.width or 80)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self.height_at(self.view, width)  # warnings wrap: the height follows the width

    def height_at(self, view: View | None, width: int) -> int:
        if view is None or not view.telemetry or not view.telemetry.get("gpus"):
            return 1
        return len(self.lines(view, max(1, width)))

    def no_gpu_text(self, view: View) -> str:
        tele = view.telemetry
        if tele is None:
            return "no telemetry yet (the supervisor samples the GPUs every few seconds)"
        why = tele.get("gpu_error") or "no GPUs visible to this run"
        on_cpu = view.state.config.get("cpu") or tele.get("gpu_error")
        return why + (" — training on the CPU" if on_cpu else "")

    def build(self, view: View, width: int, height: int) -> Text:
        if not (view.telemetry or {}).get("gpus"):
            return crop(Text(self.no_gpu_text(view), "yellow"), width)
        return lines_text(self.lines(view, width))

    def lines(self, view: View, width: int) -> list[Text]:
        """Each GPU's row, its pressure warning and its holders."""
        history = view.gpu_history()
        live = view.state.live
        peaks = view.state.gpu_peaks() if live else {}
        warnings = view.pressure_warnings()
        compact = self.is_mounted and self.screen.has_class("compact")
        peak_w = max((len(p) for p in peaks.values()), default=0)
        out = []
        for g in (view.telemetry or {}).get("gpus") or []:
            uuid = g.get("uuid") or ""
            # every row gets the peaks' column when one has it: the same fields drop, the columns align
            peak = peaks.get(uuid, "").ljust(peak_w) if peaks else None
            out.append(self.row(g, history.get(gpu_key(g), []), width, live, peak))
            if uuid in warnings:
                out += [Text(line, "bold yellow") for line in textwrap.wrap(f"! {warnings[uuid]}", max(10, width),
                                                                             subsequent_indent="  ")]
            if live:
                holders = [h for h in view.state.holders(g) if h.outsider or not compact]
                out += holder_lines(holders, width)
        return out

    def row(self, g: dict[str, Any], hist: list[dict[str, Any]], width: int, live: bool = True,
            peak: str | None = None) -> Text:
        mem_frac = fraction(g.get("mem_used"), g.get("mem_total"))
        util = g.get("util")
        mark = Text("▶", "bold green") if g.get("in_run") and live else Text(" ")
        fields: list[tuple[str, int, Text]] = [  # (name, drop order: higher goes first, text)
            ("mark", 0, Text.assemble(mark, (f"{g.get('index', '?')}", "bold"))),
            ("name", 6, Text(f"{_short_name(g.get('name'))[:18]:<18}")),
            ("bar", 0, Text("")),
            ("mem", 0, Text(f"{fmt_gib(g.get('mem_used')):>5}/{fmt_gib(g.get('mem_total'))} GiB")),
            *([("peak", 4, Text(peak, "cyan"))] if peak is not None else []),
            *([("util", 1, Text(f"{'n/a' if util is None else f'{util:.0f}%':>4}", level_style(fraction(util, 100)))),
               ("temp", 2, Text("n/a" if g.get("temp") is None else f"{g['temp']:.0f}°C")),
               ("power", 3, Text(self.power(g)))] if live else []),
            ("spark", 5, Text.assemble(("mem ", "dim"),
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


def holder_lines(holders: list[Holder], width: int) -> list[Text]:
    """``   ✗ foreign    pid 51234   40.2 GiB  bob  python train.py``, one a holder, biggest first;
    past MAX_HOLDERS one line sums up the rest."""
    out = []
    for h in holders[:MAX_HOLDERS]:
        tag, style = TAGS[h.role]
        if h.role == "rank":
            tag += f"rank {h.rank}"
        command = h.command or "n/a"
        if h.role == "leftover":
            command = f"attempt {h.attempt} rank {h.rank}: {command}"
        line = Text.assemble("   ", (f"{tag:<12}", style), f"pid {h.pid:<8}",
                             (f"{fmt_gib(h.mem):>5} GiB", "bold" if h.outsider else ""), "  ",
                             (f"{(h.user or 'n/a')[:10]:<10}", "dim"), " ", command)
        out.append(crop(line, width))
    rest = holders[MAX_HOLDERS:]
    if rest:
        held = sum(h.mem or 0 for h in rest)
        out.append(crop(Text(f"   … {len(rest)} more holding {fmt_gib(held)} GiB", "dim"), width))
    return out
