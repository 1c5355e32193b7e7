"""The compile heartbeat: beats while the first compiled step runs, stops with it, and gives up
after its limit (so a compile that never ends is still a hang)."""

from __future__ import annotations

import time

from sftui.trainer.compiling import Heartbeat


def test_beats_only_while_the_block_runs():
    beats: list[float] = []
    with Heartbeat(lambda: beats.append(time.monotonic()), interval=0.05):
        time.sleep(0.4)
    n = len(beats)
    assert n >= 4
    time.sleep(0.2)
    assert len(beats) == n


def test_gives_up_after_its_limit():
    beats: list[float] = []
    with Heartbeat(lambda: beats.append(time.monotonic()), interval=0.05, max_seconds=0.2):
        time.sleep(0.6)
    assert 1 <= len(beats) <= 5


def test_a_failing_beat_stops_the_beats_and_raises_nowhere(monkeypatch):
    """A beat that fails (a full disk) ends the heartbeat quietly: nothing escapes on its thread,
    and the block it guards is not disturbed."""
    import threading

    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    calls: list[float] = []

    def boom() -> None:
        calls.append(time.monotonic())
        raise OSError("disk full")

    with Heartbeat(boom, interval=0.01):
        while not calls:
            time.sleep(0.01)
        time.sleep(0.1)
    assert len(calls) == 1 and escaped == []
