"""A warning before the OOM (issue 19, item 4): a rank's allocator retries within the last 100
steps, or a reserved peak that leaves under 5 % of its card (the card less what other processes
hold, under --mem-fraction), said once in runstate and shown by the headless log and the TUI.
From recorded telemetry and events."""

from __future__ import annotations

import io

from sftui.headless import HeadlessLog
from sftui.rundir import EventLog, RunDir
from sftui.runstate import RunWatcher
from sftui.tui.app import SftuiApp
from memory_support import HOST, RANK_PIDS, event, procs_sample, rank_proc, shared_run, shared_sample
from test_tui_support import CLOCK, GIB, GPU_UUIDS, HeldLock, fixed_clock, polled, screen_text

GPU0 = "GPU 0 under memory pressure: 12 allocator retries in the last 100 steps"
GPU1 = "GPU 1 under memory pressure: reserved peak 67.5 of 69.5 GiB that other processes leave (2.5% left)"


def watched(path) -> RunWatcher:
    w = RunWatcher(path)
    w.poll()
    w.state.supervisor_alive = True  # as a live supervisor's lock would say
    return w


def test_retries_and_a_thin_margin_read_as_pressure(tmp_path):
    """Rank 0 retried 5 + 4 + 3 times in steps 51-150; rank 1's 67.5 GiB reserved leave 2 GiB of
    the 69.5 that attempt 1's leftover rank leaves of GPU 1's 80."""
    s = watched(shared_run(tmp_path)).state
    assert s.pressure_warnings(s.telemetry, keys=True) == {
        GPU_UUIDS[0]: GPU0 + "; `-` drops a rung (batch 8)",
        GPU_UUIDS[1]: GPU1 + "; `-` drops a rung (batch 8)",
    }
    assert s.pressure_warnings(s.telemetry, keys=False)[GPU_UUIDS[0]] == (
        GPU0 + f"; `sftui set-batch {s.path} 8` drops a rung")


def test_retries_older_than_100_steps_and_wide_margins_are_no_pressure(tmp_path):
    """At step 220 the retries of steps 70-120 are out of the window (150's 3 are still in it);
    without the leftover rank, GPU 1 keeps 15.6 % of its card."""
    path = shared_run(tmp_path, last_step=220)
    s = watched(path).state
    calm = procs_sample(CLOCK, [rank_proc(4100, 62.1)], [rank_proc(4101, 68.3)])
    assert s.pressure_warnings(calm, keys=True) == {
        GPU_UUIDS[0]: "GPU 0 under memory pressure: 3 allocator retries in the last 100 steps; `-` drops a rung (batch 8)"}
    s = watched(shared_run(tmp_path / "later", last_step=260)).state
    assert s.pressure_warnings(calm, keys=True) == {}


def test_mem_fraction_caps_the_room_and_the_bottom_rung_names_other_levers(tmp_path):
    path = shared_run(tmp_path)
    w = watched(path)
    s = w.state
    s.config["mem_fraction"] = [0.8]  # 64 GiB of each card: rank 0's 61.2 GiB leave 3.5 %
    s.ladder = [12]
    calm = procs_sample(CLOCK, [rank_proc(4100, 62.1)], [rank_proc(4101, 68.3)])
    warnings = s.pressure_warnings(calm, keys=True)
    assert warnings[GPU_UUIDS[0]] == (
        "GPU 0 under memory pressure: 12 allocator retries in the last 100 steps, reserved peak 61.2 of 64.0 GiB "
        "(3.5% left); the bottom of the ladder: lower --max-len or use --gradient-checkpointing")
    assert "reserved peak 67.5 of 64.0 GiB (0.0% left)" in warnings[GPU_UUIDS[1]]


def test_no_warning_between_attempts_or_once_the_run_is_over(tmp_path):
    """After the attempt ended (an OOM prompt may be up) nothing is pressing; an ended run neither."""
    path = shared_run(tmp_path)
    with EventLog(RunDir(path).events) as log:
        log.write(event("attempt_end", CLOCK, 2, exit_codes=[75, 75], outcome="cuda_oom", last_step=150, log_tail=[]))
    s = watched(path).state
    assert s.pressure_warnings(s.telemetry, keys=True) == {}
    s = RunWatcher(shared_run(tmp_path / "lost"))
    s.poll()  # run.json says running, but no supervisor holds the lock: lost
    assert s.state.pressure_warnings(s.state.telemetry, keys=True) == {}


def test_the_headless_log_warns_when_pressure_starts_and_every_100_steps_while_it_lasts(tmp_path):
    """Rank 0 retries at steps 70, 120, 150 (the reports of every 10 steps between say 0); the
    log warns at 70, again at 170 (its retries still in the window), then no more once they age
    out at 250."""
    path = shared_run(tmp_path)
    out = io.StringIO()
    log = HeadlessLog(RunDir(path), lambda: shared_sample(CLOCK), out)
    retries = {70: 5, 120: 4, 150: 3}
    log(event("attempt_start", CLOCK, 2, batch_size=12, grad_accum=2, world_size=2, effective_batch=48,
              resume_step=50))
    for rank, pid in enumerate(RANK_PIDS):  # so that their memory counts as the run's own
        log(event("rank_start", CLOCK, 2, rank=rank, pid=pid, host=HOST, gpu_uuid=GPU_UUIDS[rank]))
    for step in range(51, 301):
        log(event("step", CLOCK, 2, step=step, total_steps=400, epoch=0.1, epochs=1, samples_seen=step * 48,
                  loss=2.0, lr=2e-4, grad_norm=0.9, samples_per_s=412.5, tokens_per_s=1e5, batch_size=12,
                  grad_accum=2, mfu=0.41))
        if step % 10 == 0:
            log(event("rank_stats", CLOCK, 2, rank=0, gpu_uuid=GPU_UUIDS[0], mem_peak_bytes=int(58.1 * GIB),
                      mem_reserved_bytes=int(61.2 * GIB), alloc_retries=retries.get(step, 0)))
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    warned = [(lines[i - 1].split()[1], line) for i, line in enumerate(lines) if "memory pressure" in line]
    tail = f"; `sftui set-batch {path} 8` drops a rung"
    assert warned == [
        ("70/400", "warning: GPU 0 under memory pressure: 5 allocator retries in the last 100 steps" + tail),
        ("170/400", "warning: GPU 0 under memory pressure: 7 allocator retries in the last 100 steps" + tail),
    ]


async def test_the_tui_warns_under_the_gpu(tmp_path):
    path = shared_run(tmp_path)
    lock = HeldLock(path)
    try:
        app = SftuiApp(path, clock=fixed_clock)
        async with app.run_test(size=(160, 40)) as pilot:
            await polled(pilot)
            lines = screen_text(app).splitlines()
            row = next(i for i, line in enumerate(lines) if "▶0 " in line)
            assert "! " + GPU0 + "; `-` drops a rung (batch 8)" in lines[row + 1]
    finally:
        lock.release()
