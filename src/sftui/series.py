"""A whole run's loss in bounded memory, and where attempts took over from one another: what
the loss chart draws (RunState keeps one series for the loss, one for eval loss)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

SERIES_POINTS = 1000  # a loss series keeps the whole run in at most this many points
RESTART_KINDS = {"switch": "switch", "cuda_oom": "oom"}  # how an attempt ended -> the chart's mark; else "restart"


class Series:
    """A whole run's ``(step, value)`` points in at most ``limit`` of them.

    Each point is the mean of a bucket of consecutive reports, every bucket (but the newest,
    still filling) of ``width`` reports; when the points pass the limit, neighbours merge two by
    two and the width doubles. A long run so keeps its beginning, at a coarser grain, in bounded
    memory and drawing time. A point's step is the last step in its bucket."""

    def __init__(self, limit: int = SERIES_POINTS):
        self.limit = limit
        self.width = 1
        self._points: list[tuple[int, float]] = []
        self._first: list[int] = []  # each bucket's first step
        self._counts: list[int] = []

    @property
    def points(self) -> list[tuple[int, float]]:
        return list(self._points)

    @property
    def first_step(self) -> int | None:
        """The first step the series holds (its first point stands at the last step of its bucket)."""
        return self._first[0] if self._first else None

    def add(self, step: int, value: float) -> None:
        if self._counts and self._counts[-1] < self.width:
            n = self._counts[-1]
            self._points[-1] = (step, (self._points[-1][1] * n + value) / (n + 1))
            self._counts[-1] = n + 1
        else:
            self._points.append((step, value))
            self._first.append(step)
            self._counts.append(1)
        if len(self._points) > self.limit:
            self._merge()

    def _merge(self) -> None:
        points, first, counts = [], [], []
        for i in range(0, len(self._points), 2):
            group = range(i, min(i + 2, len(self._points)))
            n = sum(self._counts[j] for j in group)
            mean = sum(self._points[j][1] * self._counts[j] for j in group) / n
            points.append((self._points[group[-1]][0], mean))
            first.append(self._first[i])
            counts.append(n)
        self._points, self._first, self._counts = points, first, counts
        self.width *= 2

    def drop_after(self, step: int) -> None:
        """Forget the buckets that start after ``step``: a restart from that step's checkpoint
        trains the later steps again (a bucket that straddles it stays, as it was)."""
        keep = sum(1 for f in self._first if f <= step)
        del self._points[keep:], self._first[keep:], self._counts[keep:]

    def copy(self) -> "Series":
        other = copy.copy(self)
        other._points, other._first, other._counts = list(self._points), list(self._first), list(self._counts)
        return other


@dataclass(frozen=True)
class Restart:
    """Where an attempt took over from the one before: ``kind`` ``switch`` (a batch switch),
    ``oom`` (a restart after running out of memory) or ``restart`` (a resume after a stop, a
    crash or a lost supervisor); ``step`` the step it resumed after (0 from the start)."""

    step: int
    kind: str
