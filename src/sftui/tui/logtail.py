"""The log tail: readable event lines, and the worker's last lines after a crash or on a lost run."""

from __future__ import annotations

from typing import Hashable

from rich.text import Text

from sftui.tui.render import crop, lines_text
from sftui.tui.view import Panel
from sftui.viewmodel import View


def line_style(line: str) -> str:
    low = line.lower()
    if "out of memory" in low or low.startswith("error") or "run failed" in low or "crash" in low:
        return "bold red"
    if low.startswith("warning") or "decision needed" in low:
        return "yellow"
    if low.startswith("checkpoint") or low.startswith("run finished"):
        return "green"
    if line.startswith("    "):
        return "grey62"
    return ""


class LogPanel(Panel):
    DEFAULT_CSS = """
    LogPanel { height: 1fr; }
    """

    def key(self, view: View) -> Hashable:
        s = view.state
        # every line, not just the count: a phase heartbeat rewrites the last line in place, and a
        # full log (200 lines) that appends a repeat of its last line keeps count and last line
        # the same while every line shown moves up
        return (tuple(s.log), tuple(view.attempt_tail), view.status)

    def build(self, view: View, width: int, height: int) -> Text:
        s = view.state
        log_lines: list[Text] = []
        for entry in s.log:
            for part in entry.split("\n"):
                log_lines.append(crop(Text(part, line_style(part)), width))
        tail: list[Text] = []
        already = set(s.crash_tail)
        extra = [t for t in view.attempt_tail if t not in already] if view.in_trouble else []
        if extra:
            n = s.attempt if s.attempt is not None else "?"
            tail.append(crop(Text(f"── last lines of attempt-{n}.log ──", "bold"), width))
            tail += [crop(Text(t, "grey62"), width) for t in extra]
        if tail:
            keep_tail = min(len(tail), max(2, height // 2))
            tail = tail[:1] + tail[len(tail) - keep_tail + 1:] if keep_tail < len(tail) else tail
        room = max(0, height - len(tail))
        lines = (log_lines[-room:] if room else []) + tail
        if not lines:
            lines = [Text("no events yet", "dim")]
        return lines_text(lines[-height:], height)
