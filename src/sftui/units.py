"""How sizes, durations and counts are written: the same in every view (TUI, headless log,
`status`, the probe's table, TensorBoard's memory curves)."""

from __future__ import annotations

GIB = 1024**3


def fmt_gib(n: float | None, digits: int = 1) -> str:
    return "n/a" if n is None else f"{n / GIB:.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def fmt_num(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def fmt_count(n: int) -> str:
    """A parameter count as people say it: 78.1K, 40.4M, 7.6B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
