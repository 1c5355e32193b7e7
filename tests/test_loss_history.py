"""Loss history that stays readable (issue 19, item 5): the whole run in a bounded number of
points (neighbours merged, their mean), the steps a restart trains again dropped, each switch
and restart marked on the chart, eval loss drawn as a line beside the training loss."""

from __future__ import annotations

import math

from sftui.rundir import EventLog, RunDir
from sftui.runstate import RunState, RunWatcher
from sftui.series import SERIES_POINTS, Restart, Series
from sftui.tui.app import SftuiApp
from sftui.tui.render import MARK, loss_chart
from memory_support import event
from test_tui_support import CLOCK, HeldLock, fixed_clock, loss_at, make_run, polled


def later_loss(step: int) -> float:
    """Where make_run's 60 steps leave off, a slow descent with its noise."""
    return 1.6 + 0.8 * math.exp(-(step - 60) / 500) + 0.15 * math.sin(step * 1.7)


def test_a_series_keeps_the_whole_run_in_bounded_points():
    """100 reports (value = step) in at most 8 points: each point is the mean of the steps since
    the one before, from step 1 on."""
    series = Series(limit=8)
    for step in range(1, 101):
        series.add(step, float(step))
    points = series.points
    assert len(points) <= 8 and points[-1][0] == 100
    first = 1
    for last, mean in points:
        assert mean == (first + last) / 2, (first, last, mean)
        first = last + 1
    assert series.width == 16


def test_a_long_run_keeps_its_beginning(tmp_path):
    state = RunState(tmp_path)
    for step in range(1, 50_001):
        state.apply(event("step", CLOCK, 1, step=step, loss=10.0 if step <= 100 else 1.0))
    losses = state.losses
    assert len(losses) <= SERIES_POINTS and losses[-1] == (50_000, 1.0)
    assert losses[0][1] == 10.0  # the first steps' high loss is still there, not cut away
    assert state.loss_series.first_step == 1
    assert loss_chart(losses, [], 80, 6, first_step=1)[-1].plain.split()[:2] == ["step", "1"]


def test_restarts_are_marked_and_their_redone_steps_replaced(tmp_path):
    """A switch after step 30, an OOM at step 45 (emergency checkpoint 44), a crash after step 60
    with the latest checkpoint at 50, resumed by a new supervisor."""
    state = RunState(tmp_path)

    def steps(attempt: int, first: int, last: int, loss: float) -> None:
        for step in range(first, last + 1):
            state.apply(event("step", CLOCK, attempt, step=step, loss=loss))

    state.apply(event("attempt_start", CLOCK, 1, batch_size=16, resume_step=None))
    steps(1, 1, 30, 3.0)
    state.apply(event("attempt_end", CLOCK, 1, outcome="switch", last_step=30))
    state.apply(event("attempt_start", CLOCK, 2, batch_size=12, resume_step=30))
    steps(2, 31, 44, 2.5)
    state.apply(event("attempt_end", CLOCK, 2, outcome="cuda_oom", last_step=44))
    state.apply(event("attempt_start", CLOCK, 3, batch_size=8, resume_step=44))
    steps(3, 45, 60, 2.0)
    state.apply(event("attempt_end", CLOCK, 3, outcome="crash", last_step=60))
    state.apply(event("run_start", CLOCK, config={}, resumed=True))
    state.apply(event("attempt_start", CLOCK, 4, batch_size=8, resume_step=50))
    steps(4, 51, 55, 1.5)
    assert state.restarts == [Restart(30, "switch"), Restart(44, "oom"), Restart(50, "restart")]
    assert [s for s, _ in state.losses] == list(range(1, 56))  # steps 51-60 of attempt 3 gave way
    assert state.losses[-1] == (55, 1.5) and state.losses[49] == (50, 2.0)


def test_the_chart_marks_restarts_and_draws_eval_as_a_line():
    losses = [(s, loss_at(s)) for s in range(1, 201)]
    rows = loss_chart(losses, [], 100, 12, [(60, "switch"), (140, "oom")])
    marked = [{i for i, ch in enumerate(row.plain) if ch == MARK} for row in rows[:-1]]
    columns = set().union(*marked)
    assert len(columns) == 2 and sum(len(m) for m in marked) >= 11  # two dotted columns, around the lines
    assert f"{MARK} switch" in rows[-1].plain and f"{MARK} OOM restart" in rows[-1].plain
    evals_only = loss_chart([], [(1, 3.0), (200, 2.0)], 60, 8)
    drawn = "".join(row.plain for row in evals_only[:-1])
    assert drawn.count("●") == 2 and any(0x2800 < ord(ch) <= 0x28FF for ch in drawn)  # the line between them


def test_a_long_run_with_switches_and_restarts_120x40(tmp_path, snap_compare):
    """2000 steps: an OOM restart at 5, a switch down at 800, a crash after 1300 resumed from 1200,
    eval every 200 steps: the whole run, its marks and its eval line."""
    path = make_run(tmp_path, "live")
    t = CLOCK - 50
    with EventLog(RunDir(path).events) as log:

        def steps(attempt: int, first: int, last: int, batch: int) -> None:
            for step in range(first, last + 1):
                log.write(event("step", t, attempt, step=step, total_steps=2000, epoch=step / 2000, epochs=1,
                                samples_seen=step * batch * 4, loss=round(later_loss(step), 4),
                                lr=2e-4, grad_norm=0.9, samples_per_s=412.5, tokens_per_s=1e5, batch_size=batch,
                                grad_accum=2, mfu=0.41))
                if step % 200 == 0:
                    log.write(event("eval", t, attempt, step=step, loss=round(later_loss(step) + 0.25, 4),
                                    samples=200))

        steps(2, 61, 800, 12)
        log.write(event("attempt_end", t, 2, exit_codes=[0, 0], outcome="switch", last_step=800, log_tail=None))
        log.write(event("batch_change", t, 3, **{"from": 12, "to": 8, "by": "user"}))
        log.write(event("attempt_start", t, 3, batch_size=8, grad_accum=2, world_size=2, effective_batch=32,
                        resume_step=800))
        steps(3, 801, 1300, 8)
        log.write(event("attempt_end", t, 3, exit_codes=[1, -9], outcome="crash", last_step=1300, log_tail=[]))
        log.write(event("attempt_start", t, 4, batch_size=8, grad_accum=2, world_size=2, effective_batch=32,
                        resume_step=1200))
        steps(4, 1201, 2000, 8)
    lock = HeldLock(path)
    try:
        w = RunWatcher(path)
        while w.poll():  # a long history is read in chunks
            pass
        steps_shown = [s for s, _ in w.state.losses]
        # the whole run in at most SERIES_POINTS, never going back (attempt 3's 1201-1300 gave way)
        assert len(steps_shown) <= SERIES_POINTS and steps_shown == sorted(set(steps_shown))
        assert steps_shown[-1] == 2000 and [r.kind for r in w.state.restarts] == ["oom", "switch", "restart"]
        assert snap_compare(SftuiApp(path, clock=fixed_clock), terminal_size=(120, 40), run_before=polled)
    finally:
        lock.release()
