"""Snapshots of the TUI on replayed run directories, with a fixed clock.

Regenerate after a deliberate change with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import pytest

from sftui.tui.app import SftuiApp
from sftui.tui.oom import OomScreen
from test_tui_support import HeldLock, fixed_clock, make_run, polled


@pytest.fixture
def live_run(tmp_path):
    path = make_run(tmp_path, "live")
    lock = HeldLock(path)
    yield path
    lock.release()


def test_main_80x24(live_run, snap_compare):
    """A live 2-GPU run after an OOM at 16, now at 12: every panel collapsed to fit 80x24."""
    assert snap_compare(SftuiApp(live_run, clock=fixed_clock), terminal_size=(80, 24), run_before=polled)


def test_main_120x40(live_run, snap_compare):
    """The same run at 120x40: boxed panels, GPU names and full power figures."""
    assert snap_compare(SftuiApp(live_run, clock=fixed_clock), terminal_size=(120, 40), run_before=polled)


def test_oom_prompt_120x40(tmp_path, snap_compare):
    """A pending decision: step 6 ran out of memory on GPU 1; restart at 12 from step 5; 23 s left."""
    path = make_run(tmp_path, "oom")
    lock = HeldLock(path)
    try:
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(120, 40),
                            run_before=lambda pilot: polled(pilot, OomScreen))
    finally:
        lock.release()


def test_oom_prompt_80x24(tmp_path, snap_compare):
    """The OOM prompt must fit 80x24 whole (keys included)."""
    path = make_run(tmp_path, "oom")
    lock = HeldLock(path)
    try:
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(80, 24),
                            run_before=lambda pilot: polled(pilot, OomScreen))
    finally:
        lock.release()


def test_no_gpu_80x24(tmp_path, snap_compare):
    """A CPU run: the GPU panel says "no NVIDIA GPU found — training on the CPU"."""
    path = make_run(tmp_path, "nogpu")
    lock = HeldLock(path)
    try:
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(80, 24), run_before=polled)
    finally:
        lock.release()


def test_finished_120x40(tmp_path, snap_compare):
    """A finished run replayed from its files: final state, whole loss history, eval points."""
    path = make_run(tmp_path, "finished")
    assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(120, 40), run_before=polled)
