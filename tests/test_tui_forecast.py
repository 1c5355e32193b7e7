"""The forecast in the TUI: the ladder shows "~X GiB" for rungs not measured yet and flags those
predicted not to fit; the + / - confirmation shows the new rung's forecast; the sources are the
run's measured rung peaks and RUN_DIR/forecast.json (the probe's points)."""

from __future__ import annotations

import json
from pathlib import Path

from sftui.forecast import for_run, points_to_json, Point
from sftui.rundir import RunDir, read_json, write_json_atomic
from sftui.runstate import RunState
from sftui.tui.app import SftuiApp
from sftui.tui.confirm import ConfirmScreen
from sftui.tui.ladder import rung_line
from sftui.tui.view import forecast_text
from sftui.viewmodel import View
from test_tui_keys import Recorder
from test_tui_support import GIB, HeldLock, fixed_clock, make_run, polled, screen_text


def view_of(ladder, rung_peaks, oom_rungs=(), probe=None, budget=80 * GIB, batch=None) -> View:
    state = RunState(Path("/nowhere"), ladder=list(ladder), rung_peaks=dict(rung_peaks), oom_rungs=list(oom_rungs),
                     batch_size=batch, world_size=1, grad_accum=1)
    view = View(state=state, status="running", version=1)
    view.forecast = for_run(probe, state.rung_peaks, state.oom_rungs, budget)
    return view


def test_two_measured_rungs_give_every_other_rung_a_forecast():
    # 4 + 2 GiB × batch, measured at 8 and 12 while training; an 80 GiB card, target 0.85 (68 GiB)
    view = view_of([48, 32, 24, 12, 8, 4], {8: 20 * GIB, 12: 28 * GIB}, batch=12)
    lines = {r: rung_line(i, r, view, 40).plain for i, r in enumerate(view.state.ladder, 1)}
    assert lines[12].endswith("28.0 GiB") and "~" not in lines[12]  # measured wins
    assert lines[4].endswith("~12.0 GiB") and lines[24].endswith("~52.0 GiB")
    assert lines[32].endswith("~68.0 GiB won't fit")  # 68 GiB + its band is over 0.85 × 80
    assert lines[48].endswith("won't fit")
    # narrow cells keep the mark, never half a number
    assert rung_line(1, 48, view, 16).plain.endswith("✗")
    text = forecast_text(view, 24).plain
    assert "~52.0 GiB" in text and "forecast" in text and "fits under 0.85 × 80.0 GiB" in text
    assert "NOT to fit" in forecast_text(view, 32).plain


def test_one_measured_rung_is_not_enough_without_the_probe():
    view = view_of([16, 12, 8], {12: 28 * GIB}, batch=12)
    assert rung_line(3, 8, view).plain.endswith("?")
    assert forecast_text(view, 8).plain.startswith("peak memory at batch 8: ?")


def test_the_probes_points_and_budget_come_from_forecast_json():
    probe = {"points": points_to_json([Point(4, 12 * GIB), Point(16, 36 * GIB)]), "budget_bytes": 40 * GIB,
             "target": 0.9, "model_state_bytes": 3 * GIB}
    view = view_of([32, 16, 12, 8, 4], {}, probe=probe, budget=80 * GIB)
    assert view.forecast.budget == 40 * GIB and view.forecast.target == 0.9
    assert rung_line(1, 32, view).plain.endswith("won't fit")  # 68 GiB > 0.9 × 40
    assert rung_line(3, 12, view).plain.endswith("~28.0 GiB")


def _live_with_probe(tmp_path: Path) -> Path:
    """The live 2-GPU run (OOM at 16, now at 12) started by --batch auto on a longer ladder."""
    path = make_run(tmp_path, "live")
    run = RunDir(path)
    spec = read_json(run.run_json)
    spec["ladder"] = [24, 16, 12, 8, 4]
    write_json_atomic(run.run_json, spec)
    (path / "forecast.json").write_text(json.dumps({
        "v": 1, "points": points_to_json([Point(4, 22 * GIB, 150.0), Point(8, 41 * GIB, 260.0)]),
        "budget_bytes": 79 * GIB, "target": 0.85, "model_state_bytes": 6 * GIB, "recommended": 12}))
    return path


async def test_ladder_panel_and_rung_down_confirmation_show_the_forecast(tmp_path):
    path = _live_with_probe(tmp_path)
    lock = HeldLock(path)
    rec = Recorder(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=(120, 40)) as pilot:
            await polled(pilot)
            text = screen_text(app)
            assert " 5     4  ~21.8 GiB" in text and " 4     8  ~41.4 GiB" in text  # the probe's points + the run's
            assert " 2    16  ✗ OOM" in text and " 3 ▶  12  61.2 GiB" in text  # rungs 2-5 of 5: around ▶12
            await pilot.press("minus")
            assert isinstance(app.screen, ConfirmScreen)
            text = screen_text(app)
            assert "peak memory at batch 8: ~41." in text and "forecast" in text and "fits under 0.85" in text
            await pilot.press("escape")
        assert rec.commands() == []
    finally:
        rec.close()
        lock.release()


def test_a_long_ladder_shows_the_rungs_around_the_current_one():
    from sftui.tui.ladder import MAX_LINES, window_start

    ladder = [128, 96, 64, 48, 32, 24, 16, 12, 8]
    assert window_start(ladder, 64) == 1  # 96 ▶64 48 32
    assert window_start(ladder, 128) == 0 and window_start(ladder, None) == 0
    assert window_start(ladder, 8) == len(ladder) - MAX_LINES
    assert window_start([16, 12, 8], 8) == 0
