"""Text building blocks of the panels: bars, sparklines, lines that fit a width, the braille chart.

Everything here returns rich ``Text`` and knows nothing about Textual widgets, so panels stay
small and these pieces can be tested (and reasoned about) on their own. Every function that
lays text out takes the width it must fit and never cuts a number in half: what does not fit
is dropped whole, lowest priority first.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from rich.text import Text

EIGHTHS = " ▏▎▍▌▋▊▉"
SPARKS = "▁▂▃▄▅▆▇█"
EMPTY = "░"


def level_style(frac: float | None) -> str:
    """Green / yellow / red by how full something is."""
    if frac is None:
        return "dim"
    if frac >= 0.9:
        return "bold red"
    if frac >= 0.7:
        return "yellow"
    return "green"


def bar(frac: float | None, width: int, style: str | None = None) -> Text:
    """A horizontal bar ``width`` cells wide, with eighth-cell resolution; dotted when unknown."""
    width = max(0, width)
    if frac is None or frac != frac:
        return Text("·" * width, "dim")
    frac = min(1.0, max(0.0, float(frac)))
    cells = frac * width
    full = int(cells)
    part = int((cells - full) * 8)
    filled = "█" * full + (EIGHTHS[part] if part and full < width else "")
    return Text.assemble((filled, style or level_style(frac)), (EMPTY * (width - len(filled)), "grey30"))


def sparkline(values: Sequence[float | None], width: int, style: str = "cyan") -> Text:
    """The last ``width`` values (0–1) as block characters; gaps for unknown values."""
    vals = list(values)[-width:]
    out = []
    for v in vals:
        if v is None or v != v:
            out.append(" ")
        else:
            out.append(SPARKS[min(7, max(0, int(round(min(1.0, max(0.0, v)) * 7))))])
    return Text("".join(out).rjust(width), style)


def fmt_si(x: float | None, unit: str = "") -> str:
    """1234 -> 1.2k; None -> n/a."""
    if x is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}{unit}"
    return f"{x:.1f}{unit}" if isinstance(x, float) and abs(x) < 100 else f"{x:.0f}{unit}"


def crop(text: Text | str, width: int) -> Text:
    """One line no wider than ``width``, ending in an ellipsis when cut."""
    t = Text(text) if isinstance(text, str) else text.copy()
    t.no_wrap = True
    if t.cell_len > width:
        t.truncate(max(0, width), overflow="ellipsis")
    return t


def fit_line(chips: Sequence[tuple[Text | str, int]], width: int, sep: str = "  ") -> Text:
    """Join chips (text, priority) in their order, dropping the highest priority numbers first
    until the line fits ``width``. A chip is never cut; priority 0 chips are cropped last of all."""
    items = [(Text(c) if isinstance(c, str) else c, p) for c, p in chips]
    while items:
        total = sum(c.cell_len for c, _ in items) + len(sep) * (len(items) - 1)
        if total <= width:
            break
        worst = max(range(len(items)), key=lambda i: (items[i][1], i))
        if items[worst][1] == 0:
            break
        items.pop(worst)
    line = Text(sep).join(c for c, _ in items)
    return crop(line, width)


def flow(chips: Iterable[Text | str], width: int, max_lines: int, sep: str = "  ") -> list[Text]:
    """Lay chips out left to right on at most ``max_lines`` lines; what does not fit is dropped whole."""
    lines: list[Text] = []
    cur = Text()
    for chip in chips:
        c = Text(chip) if isinstance(chip, str) else chip
        if c.cell_len > width:
            continue
        if cur.cell_len and cur.cell_len + len(sep) + c.cell_len <= width:
            cur.append(sep)
            cur.append_text(c)
        elif not cur.cell_len:
            cur = c.copy()
        else:
            lines.append(cur)
            if len(lines) >= max_lines:
                return lines
            cur = c.copy()
    if cur.cell_len and len(lines) < max_lines:
        lines.append(cur)
    return lines


def lines_text(lines: Sequence[Text], height: int | None = None) -> Text:
    """Lines joined with newlines, padded to ``height`` lines when given."""
    rows = list(lines)
    if height is not None:
        rows = rows[:height] + [Text("")] * max(0, height - len(rows))
    out = Text("\n").join(rows)
    out.no_wrap = True
    out.overflow = "crop"
    return out


# --- the loss chart ----------------------------------------------------------------------------

# dot (column, row) inside a braille cell -> bit
_BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style smoothing, debiased so the first points are not pulled toward zero."""
    out = []
    last = 0.0
    for i, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def _nice(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return fmt_si(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.2f}"
    return f"{x:.0e}"


class Canvas:
    """A braille canvas: ``width`` × ``height`` cells, 2 × 4 dots each; later layers win a cell's colour."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.style: list[list[str | None]] = [[None] * width for _ in range(height)]
        self.glyph: list[list[str | None]] = [[None] * width for _ in range(height)]

    def dot(self, x: int, y: int, style: str) -> None:
        """Set dot (x, y), y counted from the top, in dot units."""
        if 0 <= x < self.w * 2 and 0 <= y < self.h * 4:
            cx, cy = x // 2, y // 4
            self.bits[cy][cx] |= _BRAILLE_BITS[x % 2][y % 4]
            self.style[cy][cx] = style

    def vline(self, x: int, y0: int, y1: int, style: str) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            self.dot(x, y, style)

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        """A connected line: every dot column between the two points gets its share of the rise."""
        if x1 <= x0:
            self.vline(x1, y0, y1, style)
            return
        prev = y0
        for x in range(x0, x1 + 1):
            y = int(round(y0 + (y1 - y0) * (x - x0) / (x1 - x0)))
            self.vline(x, prev, y, style)
            prev = y

    def mark(self, cx: int, cy: int, ch: str, style: str) -> None:
        if 0 <= cx < self.w and 0 <= cy < self.h:
            self.glyph[cy][cx] = ch
            self.style[cy][cx] = style

    def rows(self) -> list[Text]:
        out = []
        for cy in range(self.h):
            t = Text()
            for cx in range(self.w):
                g = self.glyph[cy][cx]
                if g is not None:
                    t.append(g, self.style[cy][cx] or "")
                elif self.bits[cy][cx]:
                    t.append(chr(0x2800 + self.bits[cy][cx]), self.style[cy][cx] or "")
                else:
                    t.append(" ")
            out.append(t)
        return out


# a restart's kind (series.Restart) -> its mark's legend and style
RESTART_MARKS = {"switch": ("switch", "yellow"), "oom": ("OOM restart", "red"), "restart": ("restart", "blue")}
MARK = "┊"


def loss_chart(losses: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]],
               width: int, height: int, restarts: Sequence[tuple[int, str]] = (),
               first_step: int | None = None) -> list[Text]:
    """Raw loss (dim), its smoothed line (bright), eval loss (a line through its markers) and
    where attempts took over (``restarts``: (step, kind), a dotted column each) on ``height``
    lines. ``first_step``: where the x axis starts when the first point stands for several
    steps (a downsampled series puts a point at the last step of its bucket).

    The last line is the x axis (first and last step) and the legend; the y labels take a gutter
    on the left. Returns exactly ``height`` lines, each at most ``width`` cells.
    """
    height = max(1, height)
    pts = [(s, v) for s, v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
    evs = [(s, v) for s, v in evals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not pts and not evs:
        msg = Text("no loss yet: the chart starts with the first optimizer step", "dim")
        return [crop(msg, width)] + [Text("")] * (height - 1)
    if height < 3 or width < 20:
        last = pts[-1][1] if pts else evs[-1][1]
        return [crop(Text(f"loss {last:.4f}"), width)] + [Text("")] * (height - 1)
    ys = [v for _, v in pts] + [v for _, v in evs]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    xs = [s for s, _ in pts] + [s for s, _ in evs] + ([first_step] if first_step is not None else [])
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    labels = [_nice(hi), _nice((hi + lo) / 2), _nice(lo)]
    gutter = max(len(s) for s in labels) + 1
    plot_h = height - 1
    plot_w = width - gutter - 1
    canvas = Canvas(plot_w, plot_h)
    dots_w, dots_h = plot_w * 2, plot_h * 4

    def px(step: float) -> int:
        return int(round((step - x0) / (x1 - x0) * (dots_w - 1)))

    def py(v: float) -> int:
        return int(round((hi - v) / (hi - lo) * (dots_h - 1)))

    def draw(series: Sequence[tuple[int, float]], style: str) -> None:
        prev: tuple[int, int] | None = None
        # bucket by dot column first: thousands of steps cost a few passes, not a dot each
        cols: dict[int, list[int]] = {}
        order: list[int] = []
        for s, v in series:
            x = px(s)
            y = py(v)
            c = cols.get(x)
            if c is None:
                cols[x] = [y, y, y, y]  # first, last, min, max
                order.append(x)
            else:
                c[1] = y
                if y < c[2]:
                    c[2] = y
                if y > c[3]:
                    c[3] = y
        for x in order:
            first, last, ymin, ymax = cols[x]
            if prev is not None:
                canvas.line(prev[0], prev[1], x, first, style)
            canvas.vline(x, ymin, ymax, style)
            prev = (x, last)

    # later layers win a shared cell: eval over the raw noise, the smoothed line over both
    if pts:
        draw(pts, "grey50")
    draw(evs, "magenta")
    if pts:
        smooth = ema([v for _, v in pts])
        draw(list(zip((s for s, _ in pts), smooth)), "bold cyan")
    for s, v in evs:
        canvas.mark(px(s) // 2, py(v) // 4, "●", "bold magenta")
    kinds: list[str] = []  # for the legend, in the order they came
    for step, kind in restarts:
        if kind not in kinds:
            kinds.append(kind)
        cx = px(min(max(step, x0), x1)) // 2
        for cy in range(plot_h):  # the lines stay visible: the mark takes the empty cells
            if not canvas.bits[cy][cx] and canvas.glyph[cy][cx] is None:
                canvas.mark(cx, cy, MARK, RESTART_MARKS[kind][1])

    rows = canvas.rows()
    out = []
    for i, row in enumerate(rows):
        if i == 0:
            label = labels[0]
        elif i == plot_h - 1:
            label = labels[2]
        elif plot_h >= 5 and i == (plot_h - 1) // 2:
            label = labels[1]
        else:
            label = ""
        out.append(Text.assemble((label.rjust(gutter - 1) + " ", "dim"), ("│", "grey42"), row))
    axis_left = f"step {x0}"
    axis_right = f"{x1}"
    span = plot_w + 1
    axis = Text(" " * gutter)
    middle = span - len(axis_left) - len(axis_right)
    # what the legend loses first where it does not fit: raw, then the marks, eval, smoothed
    entries = [(Text("── raw", "grey50"), 3), (Text("── smoothed", "bold cyan"), 1),
               *([(Text("─●─ eval", "bold magenta"), 1)] if evs else []),
               *((Text(f"{MARK} {RESTART_MARKS[k][0]}", RESTART_MARKS[k][1]), 2) for k in kinds)]
    legend = fit_line(entries, max(0, middle - 4))
    if legend.cell_len and middle >= legend.cell_len + 4:
        padl = (middle - legend.cell_len) // 2
        axis.append(axis_left, "dim")
        axis.append(" " * padl)
        axis.append_text(legend)
        axis.append(" " * (middle - padl - legend.cell_len))
        axis.append(axis_right, "dim")
    elif middle >= 1:
        axis.append(axis_left, "dim")
        axis.append(" " * middle)
        axis.append(axis_right, "dim")
    out.append(crop(axis, width))
    return out
