"""The TUI driven against a real supervisor: `sftui run --detach` on the CPU with the tiny model
and an injected OOM at step 6, answered through the OOM prompt and the keys.

Each test starts its own run (the injected OOM happens in the first attempt only) and stops it
at the end if it is still alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftui import control
from sftui.rundir import RunDir, lock_is_held, read_json
from sftui.tui.app import SftuiApp
from sftui.tui.confirm import ConfirmScreen
from sftui.tui.oom import OomScreen
from test_tui_keys import NotedApp
from test_tui_support import screen_text, until

START_S = 90  # start-up, tokenizing and six steps on a loaded 2-core machine


def start_run(tmp_path: Path, *flags: str) -> Path:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sftui", "run", "--detach", "--cpu", "--inject-oom-at-step", "6", "--on-oom", "ask",
         "--log-every", "1", "--checkpoint-every", "0", "--run-dir", str(run_dir), *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == run_dir
    return run_dir


def end_run(run_dir: Path) -> None:
    """Stop a run this test started, if it is still alive; kill its supervisor as a last resort."""
    run = RunDir(run_dir)
    if not lock_is_held(run):
        return
    try:
        control.request(run, {"cmd": "stop"}, timeout=2)
    except control.ControlError:
        pass
    deadline = time.monotonic() + 30
    while lock_is_held(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    if lock_is_held(run):
        pid = read_json(run.run_json).get("supervisor_pid")
        if pid:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run_factory(tmp_path):
    started: list[Path] = []

    def make(*flags: str) -> Path:
        path = start_run(tmp_path, *flags)
        started.append(path)
        return path

    yield make
    for path in started:
        end_run(path)


def log_has(app: SftuiApp, part: str) -> bool:
    return app.view is not None and any(part in line for line in app.view.state.log)


async def test_oom_accept_then_checkpoint_switch_up_and_stop(run_factory):
    path = run_factory("--max-steps", "2000", "--oom-timeout", "120")
    app = NotedApp(path, poll_interval=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, OomScreen), START_S, "the OOM prompt")
        await pilot.pause()
        text = screen_text(app)
        assert "Step 6 ran out of memory at batch 16" in text and "[injected]" in text
        assert "on the CPU" in text
        assert "restart at batch 12×1×1=12" in text and "from step 5 (emergency" in text
        assert "Automatic choice in" in text
        await pilot.press("y")
        assert app.noted("restart at batch 12 requested")
        await until(pilot, lambda: not isinstance(app.screen, OomScreen), 20, "the prompt to go")
        await until(pilot, lambda: app.view.state.attempt == 2 and app.view.state.step > 5, 60, "attempt 2 training")
        assert app.view.state.batch_size == 12
        assert log_has(app, "decision by user: restart at batch 12")

        await pilot.press("c")
        assert app.noted("checkpoint requested")
        await until(pilot, lambda: log_has(app, "(request)"), 60, "the requested checkpoint")

        await pilot.press("plus")
        assert isinstance(app.screen, ConfirmScreen)
        assert "batch 16 ran out of memory before" in screen_text(app)
        await pilot.press("y")
        await until(pilot, lambda: app.view.state.attempt == 3 and app.view.state.batch_size == 16, 60,
                    "the switch to 16")
        assert log_has(app, "batch 12 → 16 (by user)")

        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        assert app.noted("stop requested")
        await until(pilot, lambda: app.view.status == "stopped", 60, "the run to stop")
        assert "STOPPED" in screen_text(app)
        await pilot.press("c")  # a key that makes no sense now says so
        assert app.noted("the run has stopped")
    assert read_json(RunDir(path).run_json)["exit_code"] == 4


async def test_oom_refuse_stops_the_run(run_factory):
    path = run_factory("--max-steps", "40", "--oom-timeout", "120")
    app = NotedApp(path, poll_interval=0.25)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, OomScreen), START_S, "the OOM prompt")
        await pilot.press("n")
        assert app.noted("stop requested")
        await until(pilot, lambda: app.view.status in ("stopped", "failed"), 60, "the run to end")
        assert not isinstance(app.screen, OomScreen)
        assert log_has(app, "decision by user: stop")


async def test_oom_pick_another_rung(run_factory):
    path = run_factory("--max-steps", "2000", "--oom-timeout", "120")
    app = NotedApp(path, poll_interval=0.25)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, OomScreen), START_S, "the OOM prompt")
        await pilot.press("3")  # the third rung of 16, 12, 8
        assert app.noted("restart at batch 8 requested")
        await until(pilot, lambda: app.view.state.attempt == 2 and app.view.state.batch_size == 8, 60,
                    "attempt 2 at batch 8")
        assert not isinstance(app.screen, OomScreen)
        assert log_has(app, "decision by user: restart at batch 8")


async def test_oom_timeout_decides_by_itself(run_factory):
    path = run_factory("--max-steps", "2000", "--oom-timeout", "4")
    app = NotedApp(path, poll_interval=0.25)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, OomScreen), START_S, "the OOM prompt")
        await until(pilot, lambda: not isinstance(app.screen, OomScreen), 30, "the timeout")
        await until(pilot, lambda: app.view.state.attempt == 2, 30, "attempt 2")
        assert app.view.state.batch_size == 12
        assert log_has(app, "decision by timeout: restart at batch 12")
        assert app.noted("decision by timeout")
