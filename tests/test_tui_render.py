"""The TUI's text building blocks: widths are respected and numbers are never cut in half."""

from __future__ import annotations

import re
from itertools import combinations

import pytest
from textual.geometry import Region
from textual.widgets import Footer

from sftui.tui.app import SftuiApp
from sftui.tui.gpus import GpuPanel
from sftui.tui.ladder import rung_line
from sftui.tui.render import bar, fit_line, flow, loss_chart, sparkline
from sftui.tui.view import Panel
from sftui.viewmodel import Poller
from test_tui_support import HeldLock, fixed_clock, gpu_sample, make_run, polled, screen_lines, shows

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def test_bar_and_sparkline_widths():
    for w in (0, 1, 5, 13, 40):
        for f in (None, 0.0, 0.33, 0.999, 1.0, 1.7, -1):
            assert bar(f, w).cell_len == w
    assert sparkline([0, 0.5, 1, None], 10).cell_len == 10
    assert sparkline([0.1] * 50, 10).plain == "▂" * 10


def test_fit_line_drops_whole_chips_by_priority():
    chips = [("sftui", 0), ("step 120/400", 2), ("batch 12×2×2=48", 1), ("epoch 0.42/1", 5)]
    assert fit_line(chips, 200).plain == "sftui  step 120/400  batch 12×2×2=48  epoch 0.42/1"
    assert fit_line(chips, 40).plain == "sftui  step 120/400  batch 12×2×2=48"
    assert fit_line(chips, 30).plain == "sftui  batch 12×2×2=48"
    assert fit_line(chips, 3).cell_len <= 3


def test_flow_keeps_chips_whole():
    chips = [f"chip{i} {i * 1.5:.1f}" for i in range(10)]
    lines = flow(chips, 25, 2)
    assert len(lines) == 2
    for line in lines:
        assert line.cell_len <= 25
        for part in line.plain.split("  "):
            assert part in chips


@pytest.mark.parametrize("w,h", [(20, 3), (37, 5), (80, 8), (200, 30), (10, 2), (1, 1)])
def test_loss_chart_exact_size(w, h):
    losses = [(s, 2 + 5 / s) for s in range(1, 3000)]
    rows = loss_chart(losses, [(1000, 2.2), (2000, 2.1)], w, h)
    assert len(rows) == h
    assert all(r.cell_len <= w for r in rows)


def test_loss_chart_degenerate_inputs():
    assert "no loss yet" in loss_chart([], [], 60, 5)[0].plain
    rows = loss_chart([(1, 2.0)], [], 60, 6)  # one point, flat range
    assert len(rows) == 6
    rows = loss_chart([(1, float("nan")), (2, float("inf")), (3, 1.0), (4, 1.0)], [], 60, 6)
    assert len(rows) == 6


@pytest.mark.parametrize("width", range(30, 160, 7))
def test_gpu_row_fits_and_keeps_numbers_whole(width):
    g = gpu_sample(0.0, 3, 44.5, 72.0)["gpus"][0]
    row = GpuPanel().row(g, [g] * 5, width)
    assert row.cell_len <= width
    assert "44.5/80.0 GiB" in row.plain  # the memory figure always survives, whole


@pytest.mark.parametrize("width", range(6, 24))
def test_rung_line_never_cuts_a_number(tmp_path_factory, width):
    path = make_run(tmp_path_factory.mktemp("r"), "live")
    view = Poller(path).poll(force=True)
    line = rung_line(2, 12, view, width).plain
    assert len(line) <= width
    if "61" in line:
        assert re.search(r"61(\.2)?G", line) or "61.2 GiB" in line


def layout_faults(app: SftuiApp) -> list[str]:
    """Where the dashboard's widgets do not share the screen cleanly: a panel whose text does not
    fit its own region (the compositor would crop it, maybe mid-number), a widget partly off the
    screen, two widgets on the same cells."""
    shown = [w for w in app.screen.query("*") if isinstance(w, (Panel, Footer)) and w.display]
    screen = Region(0, 0, *app.size)
    faults = []
    for w in shown:
        name = w.id or type(w).__name__
        if not screen.contains_region(w.region):
            faults.append(f"{name} is partly off the screen")
        if isinstance(w, Panel):
            lines = w.render().split("\n")
            size = w.content_size
            if len(lines) > size.height or any(line.cell_len > size.width for line in lines):
                faults.append(f"{name}'s text does not fit its {size.width}x{size.height} cells")
    for a, b in combinations(shown, 2):
        if a.region.overlaps(b.region):
            faults.append(f"{a.id or type(a).__name__} overlaps {b.id or type(b).__name__}")
    return faults


# At 40x12 the fixed-width ladder and system panels (20 + 28 columns) do not fit beside the
# progress, and the docked footer covers the log's last line: a known defect, kept visible here.
KNOWN_FAULTS = {(40, 12): ["system is partly off the screen", "log overlaps Footer"]}


@pytest.mark.parametrize("size", [(80, 24), (60, 20), (100, 30), (200, 60), (40, 12)])
async def test_any_size_renders_without_overlap(tmp_path, size):
    path = make_run(tmp_path, "live")
    lock = HeldLock(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=size) as pilot:
            await polled(pilot)
            assert layout_faults(app) == KNOWN_FAULTS.get(size, [])
            if size[0] >= 80:
                assert "12×2×2=48" in screen_lines(app)[0]  # the rung is in the header whenever there is room
            await pilot.resize_terminal(80, 24)
            await shows(pilot, lambda text: "step 60/400" in text.split("\n")[0], "the header at 80x24")
            assert layout_faults(app) == []
    finally:
        lock.release()


def test_poller_is_quiet_when_nothing_changed(tmp_path):
    """An idle poll hands the UI nothing (no re-render); new telemetry or events do."""
    import json

    path = make_run(tmp_path, "live")
    poller = Poller(path)
    assert poller.poll() is not None
    assert poller.poll() is None
    with open(path / "telemetry.jsonl", "a") as f:
        f.write(json.dumps(gpu_sample(1e9, 1, 50.0, 90.0)) + "\n")
    view = poller.poll()
    assert view is not None and view.telemetry["t"] == 1e9
    assert poller.poll() is None
