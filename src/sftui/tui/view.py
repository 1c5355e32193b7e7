"""The base of the dashboard's panels, and the words of the view model in the TUI's styles.

``Panel`` re-renders only when the part of the view it shows changed, so an idle screen costs
almost nothing and nothing flickers. What a panel shows comes from ``sftui.viewmodel``.
"""

from __future__ import annotations

from typing import Hashable

from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget

from sftui.viewmodel import View, rung_memory

MEMORY_STYLE = {"oom": "bold red", "measured": "", "forecast": "", "unknown": "dim"}


class Panel(Widget):
    """A dashboard panel: ``show(view)`` re-renders only when ``key(view)`` changed."""

    DEFAULT_CSS = """
    Panel { height: auto; }
    """

    def __init__(self, title: str | None = None, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        if title:
            self.border_title = title
        self.view: View | None = None
        self._key: Hashable = object()
        self._lines = 1

    # subclasses implement these
    def key(self, view: View) -> Hashable:
        return view.version

    def wanted_lines(self, view: View | None) -> int:
        return 1

    def build(self, view: View, width: int, height: int) -> Text:
        raise NotImplementedError

    def placeholder(self) -> Text:
        return Text("reading the run…", "dim")

    # machinery
    def show(self, view: View) -> None:
        key = self.key(view)
        self.view = view
        if key == self._key:
            return
        self._key = key
        lines = self.wanted_lines(view)
        relayout = lines != self._lines
        self._lines = lines
        self.refresh(layout=relayout)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self.wanted_lines(self.view)

    def render(self) -> Text:
        if self.view is None:
            return self.placeholder()
        size = self.content_size
        return self.build(self.view, max(1, size.width), max(1, size.height))


def forecast_text(view: View, batch: int) -> Text:
    """``viewmodel.rung_memory``: measured, ran out of memory, forecast (and whether it fits), or "?"."""
    memory = rung_memory(view, batch)
    text = Text(memory.text, MEMORY_STYLE[memory.known])
    if memory.fit is not None:
        text.append(f"\n{memory.fit}", "green" if memory.fits else "bold yellow")
    return text
