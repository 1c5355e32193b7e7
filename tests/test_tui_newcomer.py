"""Defects a new user found, by issue number: (2) a resize kept the previous size's layout;
(6) a run that is not live showed its last CPU, RAM and RSS as if current, and ETA noise;
(3) the step total after a batch change, and an epoch above its total; (4) skipped rows;
(13) the OOM prompt's digits are rung numbers, not batch sizes; the log's last line rewritten in
place; (12) the exit code of `sftui run` / `sftui attach` after the TUI.

The real app on replayed run directories (test_tui_support.make_run), driven with Textual's
pilot; the screen is read from the app's own SVG screenshot (test_tui_support.screen_lines).
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
from pathlib import Path

import pytest
from textual.geometry import Size

from sftui.rundir import EventLog, RunDir, read_json, write_json_atomic
from sftui.tui.app import SftuiApp, exit_code_after
from sftui.tui.gpus import GpuPanel
from sftui.tui.oom import OomScreen
from sftui.tui.progress import ProgressPanel
from sftui.tui.system import SystemPanel
from sftui.tui.view import Panel
from sftui.viewmodel import seen_at
from test_tui_keys import NotedApp, Recorder
from test_tui_supervisor import end_run
from test_tui_support import (CLOCK, WAIT_S, HeldLock, fixed_clock, make_run, polled, screen_lines, screen_text,
                              shows, until)
from test_tui_tmux import SFTUI, Pane

LAST_SAMPLE = "22:13:18"  # the newest telemetry sample of make_run, CLOCK - 2 s, in UTC (conftest pins TZ)
def emit(path: Path, kind: str, attempt: int | None = 2, **fields) -> None:
    with EventLog(RunDir(path).events, attempt=attempt) as log:
        log.emit(kind, **fields)


def update_run_json(path: Path, **fields) -> None:
    run = RunDir(path)
    data = read_json(run.run_json)
    data.update(fields)
    write_json_atomic(run.run_json, data)


def end_as_stopped(path: Path) -> None:
    """What the supervisor leaves after a stop: run_end, and run.json stopped with exit code 4."""
    emit(path, "run_end", None, status="stopped", reason="stopped by request", exit_code=4)
    update_run_json(path, status="stopped", exit_code=4, reason="stopped by request")


@pytest.fixture
def live_run(tmp_path):
    path = make_run(tmp_path, "live")
    lock = HeldLock(path)
    yield path, lock
    lock.release()


# --- (2) one resize, the new size's layout --------------------------------------------------------


@pytest.mark.parametrize("start,end", [((120, 40), (80, 24)), ((80, 24), (120, 40))])
async def test_2_one_resize_gives_the_layout_of_the_new_size(live_run, start, end):
    path, _ = live_run
    fresh = SftuiApp(path, clock=fixed_clock)
    async with fresh.run_test(size=end) as pilot:
        await polled(pilot)
        want = screen_lines(fresh)
    app = SftuiApp(path, clock=fixed_clock)
    async with app.run_test(size=start) as pilot:
        await polled(pilot)
        await pilot.resize_terminal(*end)
        await until(pilot, lambda: app.screen.size == Size(*end), WAIT_S, "the screen to resize")
        try:
            await until(pilot, lambda: screen_lines(app) == want, 5.0, "the layout of a fresh app")
        except AssertionError:
            pass  # the comparison below shows how they differ
        got = screen_lines(app)
    assert got == want
    epoch_line = next(line for line in got if "epoch █" in line)
    assert "0.07/1" in epoch_line and "…" not in epoch_line  # the progress bar line is whole


# --- (6) a run that is not live: no stale numbers as if current ---------------------------------


def not_live_run(tmp_path: Path, scenario: str) -> Path:
    if scenario in ("finished", "crash"):
        return make_run(tmp_path, scenario)
    path = make_run(tmp_path, "live")  # no lock held: "lost"
    if scenario == "stopped":
        end_as_stopped(path)
    return path


@pytest.mark.parametrize("scenario", ["finished", "crash", "stopped", "lost"])
async def test_6_a_run_not_live_shows_no_live_numbers(tmp_path, live_run, scenario):
    live_path, _ = live_run
    ref = SftuiApp(live_path, clock=fixed_clock)
    async with ref.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        live_system = ref.query_one(SystemPanel).render().plain
        live_gpus = ref.query_one(GpuPanel).render().plain
        regions = {p.id: p.region for p in ref.screen.query(Panel) if p.id not in ("chart", "log")}
    assert "38%" in live_system and "RSS 9.25 GiB" in live_system  # the live run, for contrast
    assert "▶" in live_gpus and "72%" in live_gpus

    app = SftuiApp(not_live_run(tmp_path / scenario, scenario), clock=fixed_clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        assert not app.view.state.live
        system = app.query_one(SystemPanel).render().plain
        gpus = app.query_one(GpuPanel)
        gpu_rows = gpus.render().plain
        progress = app.query_one(ProgressPanel).render().plain
        # the 80x24 layout is the live run's (the chart and log trade height on a failed run)
        assert {p.id: p.region for p in app.screen.query(Panel) if p.id not in ("chart", "log")} == regions
        lines = screen_lines(app)
    assert "38%" not in system and "RSS" not in system  # the last CPU load, the dead worker's RSS
    assert f"last seen {LAST_SAMPLE}" in system and "41.0/251.0 GiB" in system  # memory, as last seen
    assert gpus.border_title == f"GPUs · last seen {LAST_SAMPLE}"
    assert "▶" not in gpu_rows and "72%" not in gpu_rows and "349/400 W" not in gpu_rows
    assert "44.5/80.0 GiB" in gpu_rows
    assert "ETA" not in progress and "--:--" not in "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)


def test_6_last_seen_names_the_day_when_it_was_not_today():
    assert seen_at(CLOCK - 2, CLOCK) == LAST_SAMPLE
    assert seen_at(CLOCK - 3 * 86400, CLOCK) == "Nov 11 22:13"
    assert seen_at(None, CLOCK) == "?"


async def test_6_the_system_panel_follows_the_run_ending_with_no_new_sample(live_run):
    path, lock = live_run
    app = SftuiApp(path, clock=fixed_clock, poll_interval=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        assert "RSS 9.25 GiB" in screen_text(app)
        end_as_stopped(path)
        lock.release()
        await shows(pilot, lambda text: "STOPPED" in text, "the stop")
        await shows(pilot, lambda text: f"last seen {LAST_SAMPLE}" in text and "RSS" not in text,
                    "the system panel to drop its live numbers")


async def test_6_no_eta_placeholder_before_the_speed_is_known(tmp_path):
    """A run just started (no step yet): no "ETA --:--" noise."""
    path = make_run(tmp_path, "nogpu", steps=0)
    emit(path, "phase", 1, phase="training", progress=None)
    lock = HeldLock(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=(80, 24)) as pilot:
            await polled(pilot)
            assert app.view.state.live and app.view.state.eta_s is None
            text = screen_text(app)
    finally:
        lock.release()
    assert "RUNNING" in text
    assert "--:--" not in text and "ETA" not in text


# --- (3) the step total after a batch change; the epoch never above its total -------------------


@pytest.mark.parametrize("size,note", [
    ((80, 24), "max-steps 300 → 400 steps"),
    ((120, 40), "--max-steps 300 = 19,200 samples = 400 steps"),
    ((200, 50), "--max-steps 300 = 19,200 samples; after the batch change that is 400 steps"),
])
async def test_3_the_budget_note_is_under_the_step_total(live_run, size, note):
    path, _ = live_run
    data = read_json(RunDir(path).run_json)
    update_run_json(path, config={**data["config"], "max_steps": 300}, sample_budget=300 * 64)
    app = SftuiApp(path, clock=fixed_clock)
    async with app.run_test(size=size) as pilot:
        await polled(pilot)
        assert app.view.state.budget_note is not None
        await shows(pilot, lambda text: note in text, f"the note {note!r}")
        progress = app.query_one(ProgressPanel).render().plain
    assert note in progress  # in the panel with the step bar, whole
    assert "step  " in progress and "60/400" in progress


async def test_3_the_epoch_is_never_shown_above_its_total(live_run):
    path, _ = live_run
    emit(path, "step", step=61, total_steps=400, epoch=2.13, epochs=1, samples_seen=61 * 48, loss=2.5, lr=2e-4,
         grad_norm=0.9, samples_per_s=412.5, tokens_per_s=105600.0, batch_size=12, grad_accum=2, mfu=0.41)
    app = SftuiApp(path, clock=fixed_clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        assert app.view.state.epoch == 2.13
        lines = screen_lines(app)
    assert "2.13" not in "\n".join(lines)
    assert "epoch 1.00/1" in lines[0]  # the header
    assert any("epoch █" in line and "1.00/1" in line for line in lines)  # the progress bar, full


# --- (4) rows skipped by --skip-bad-rows ----------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_4_skipped_rows_are_shown_by_the_progress(live_run, size):
    path, _ = live_run
    emit(path, "data", rows=39997, skipped=3, eval_rows=0, target_samples=40000)
    app = SftuiApp(path, clock=fixed_clock)
    async with app.run_test(size=size) as pilot:
        await polled(pilot)
        assert app.view.state.skipped_rows == 3
        progress = app.query_one(ProgressPanel).render().plain
    assert "3 bad rows skipped" in progress


# --- (13) the OOM prompt: digits are rung numbers ------------------------------------------------


async def test_13_the_oom_prompt_says_digits_pick_rung_numbers(tmp_path):
    path = make_run(tmp_path, "oom")
    lock = HeldLock(path)
    rec = Recorder(path)
    try:
        app = NotedApp(path, clock=fixed_clock)
        async with app.run_test(size=(80, 24)) as pilot:
            await polled(pilot, OomScreen)
            await shows(pilot, lambda text: "Or press a rung's number (not a batch size), e.g. 3 for batch 8:" in text,
                        "the rung numbers explained, whole at 80 columns")
            assert "1–3 restart at that rung" in screen_text(app)
            await pilot.press("9")
            assert app.noted("no rung 9") and app.noted("not a batch size")
            await pilot.press("3")
            await until(pilot, lambda: rec.commands(), WAIT_S, "the decision")
        assert rec.commands() == [{"cmd": "decide", "action": "restart", "batch_size": 8}]
    finally:
        rec.close()
        lock.release()


# --- the log: a line rewritten in place, a full log that repeats its last line -----------------


async def test_log_shows_a_heartbeat_that_rewrites_the_last_line(live_run):
    path, _ = live_run
    app = SftuiApp(path, clock=fixed_clock, poll_interval=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        emit(path, "phase", phase="tokenizing", progress=0.2)
        await shows(pilot, lambda text: "phase tokenizing 20%" in text, "the first heartbeat")
        count = len(app.view.state.log)
        emit(path, "phase", phase="tokenizing", progress=0.4)
        await shows(pilot, lambda text: "phase tokenizing 40%" in text, "the second heartbeat")
        assert len(app.view.state.log) == count  # rewritten in place, not appended
        assert "phase tokenizing 20%" not in screen_text(app)


async def test_log_shows_a_repeated_line_once_the_log_is_full(live_run):
    """At 200 lines, a repeat of the last line keeps the count and the last line: the lines shown
    still move up one."""
    path, _ = live_run
    with EventLog(RunDir(path).events, attempt=2) as log:
        for i in range(200):
            log.emit("log", level="warning", message=f"line {i:03d}")
        log.emit("log", level="warning", message="the same again")
    app = SftuiApp(path, clock=fixed_clock, poll_interval=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        await shows(pilot, lambda text: "warning: the same again" in text, "the last line")
        emit(path, "log", level="warning", message="the same again")
        await until(pilot, lambda: list(app.view.state.log)[-2:] == ["warning: the same again"] * 2,
                    WAIT_S, "the repeat to be read")
        await shows(pilot, lambda text: text.count("warning: the same again") == 2, "the repeat on the screen")


# --- (12) the exit code after the TUI ------------------------------------------------------------


@pytest.mark.parametrize("scenario,code", [("finished", 0), ("crash", 3), ("stopped", 4)])
async def test_12_leaving_an_ended_run_returns_its_exit_code(tmp_path, capsys, scenario, code):
    app = SftuiApp(not_live_run(tmp_path, scenario), clock=fixed_clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        await pilot.press("q")
    assert exit_code_after(app) == code
    out = capsys.readouterr().out
    assert "no training is going on" in out and "sftui attach" in out


async def test_12_leaving_a_live_run_returns_0(live_run, capsys):
    path, _ = live_run
    app = SftuiApp(path, clock=fixed_clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        await pilot.press("q")
    assert exit_code_after(app, wait_s=1.0) == 0
    captured = capsys.readouterr()
    assert "Training goes on in the background" in captured.out and "sftui attach" in captured.out
    assert "waiting" not in captured.err


async def test_12_stop_then_leave_waits_for_the_run_and_returns_4(live_run, capsys):
    path, lock = live_run
    sup = Recorder(path)  # the supervisor's socket; the run ends below, as the supervisor would end it
    try:
        app = NotedApp(path, clock=fixed_clock)
        async with app.run_test(size=(80, 24)) as pilot:
            await polled(pilot)
            await pilot.press("s", "y")
            await until(pilot, lambda: sup.commands(), WAIT_S, "the stop request")
            await pilot.press("q")  # before the run has ended
        assert sup.commands() == [{"cmd": "stop"}]

        def stopped() -> None:  # the worker's checkpoint done: run_end, run.json, the lock let go
            end_as_stopped(path)
            lock.release()

        threading.Timer(1.0, stopped).start()
        assert exit_code_after(app, wait_s=60.0) == 4
    finally:
        sup.close()
    captured = capsys.readouterr()
    assert "sftui: waiting for the run to stop" in captured.err
    assert "The run is stopped" in captured.out


# --- (12) end to end: `sftui run` in tmux, s y q, exit status 4 -----------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_12_sftui_run_stopped_from_the_tui_exits_4_in_tmux(tmp_path):
    run_dir = tmp_path / "run"
    env = ""
    if os.environ.get("PYTHONPATH"):  # keep the interpreter's view of the package in the pane
        env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} "
    pane = Pane(f"sftui-exit-{os.getpid()}", tmp_path)
    try:
        pane.type(f"{env}{SFTUI} run --cpu --max-steps 5000 --log-every 1 --checkpoint-every 0 "
                  f"--run-dir {run_dir}; echo sftui-exit=$?")
        pane.wait(r"│ step [1-9]\d*/\d+", 120)  # training
        pane.key("s")
        pane.wait(r"Stop training\?")
        pane.key("y")
        pane.wait(r"stop requested")
        pane.key("q")  # at once: the run has not stopped yet
        m = pane.wait(r"sftui-exit=(\d+)", 150)
        assert m.group(1) == "4", pane.text()
        assert read_json(RunDir(run_dir).run_json)["exit_code"] == 4
    finally:
        pane.close()
        end_run(run_dir)
