"""runstate.py: every event kind reads as a line; status `lost`; ETA; headless formatting."""

from __future__ import annotations

import io

from sftui import events as ev
from sftui import rundir
from sftui.headless import HeadlessLog, memory_text
from sftui.runstate import RunWatcher, describe_event, fmt_duration, rung_text

SAMPLE_FIELDS = {
    "run_start": {"config": {"model": "tiny", "data": "demo"}},
    "phase": {"phase": "tokenizing", "progress": 0.5},
    "attempt_start": {"batch_size": 16, "grad_accum": 2, "world_size": 2, "effective_batch": 64, "resume_step": 5},
    "rank_start": {"rank": 0, "pid": 1, "host": "h", "gpu_uuid": None},
    "checkpoint": {"step": 5, "path": "p", "seconds": 0.5, "bytes": 1 << 30, "reason": "oom"},
    "eval": {"step": 5, "loss": 1.5, "samples": 10},
    "oom": {"step": 6, "batch_size": 16, "rank": 1, "gpu_uuid": None, "where": "forward", "message": "m",
            "emergency_checkpoint": 5, "injected": True},
    "worker_exit": {"rank": 0, "reason": "oom", "step": 5},
    "decision_needed": {"reason": "oom", "proposed_batch": 12, "deadline": 0},
    "decision": {"by": "timeout", "action": "restart", "batch_size": 12},
    "batch_change": {"from": 16, "to": 12, "by": "oom"},
    "attempt_end": {"exit_codes": [75], "outcome": "crash", "last_step": 5, "log_tail": ["Traceback", "Boom"]},
    "log": {"level": "info", "message": "hello"},
    "run_end": {"status": "finished", "reason": "done", "exit_code": 0},
}


def test_every_kind_but_step_and_rank_stats_reads_as_a_line():
    for kind in ev.KINDS:
        line = describe_event(ev.make(kind, 1, **SAMPLE_FIELDS.get(kind, {})))
        assert (line is None) == (kind in ("step", "rank_stats")), kind
    assert "Boom" in describe_event(ev.make("attempt_end", 1, **SAMPLE_FIELDS["attempt_end"]))


def test_formatting_helpers():
    assert rung_text(16, 2, 3) == "16×2×3=96"
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(None) == "--:--"
    sample = {"gpus": [{"index": 0, "mem_used": 2 << 30, "mem_total": 80 << 30, "in_run": True},
                       {"index": 1, "mem_used": None, "mem_total": None, "in_run": False}],
              "system": {"mem_used": 5 << 30, "mem_total": 24 << 30}}
    assert memory_text(sample) == "GPU0 2.0/80.0 GiB  RAM 5.0/24.0 GiB"


def test_watcher_folds_events_and_says_lost(tmp_path):
    run = rundir.create(tmp_path / "r")
    rundir.write_json_atomic(run.run_json, {"name": "r", "status": "running", "config": {"log_every": 1},
                                            "batch_size": 16, "grad_accum": 1, "world_size": 1, "ladder": [16, 12]})
    with rundir.EventLog(run.events, attempt=1) as log:
        log.emit("attempt_start", **SAMPLE_FIELDS["attempt_start"])
        log.emit("step", step=10, total_steps=20, epoch=0.5, epochs=1, samples_seen=640, loss=2.0, lr=1e-3,
                 grad_norm=1.0, samples_per_s=64.0, tokens_per_s=1000.0, batch_size=16, grad_accum=2, mfu=None)
    w = RunWatcher(run.path)
    w.poll()
    s = w.state
    assert s.step == 10 and s.losses == [(10, 2.0)] and s.effective_batch == 16 * 2 * 2
    assert s.eta_s == 10 * 64 / 64.0
    assert s.display_status == "lost"  # run.json says running but no supervisor holds the lock
    fd = rundir.acquire_lock(run)
    w.poll()
    assert w.state.display_status == "running"
    import os
    os.close(fd)


def test_headless_prints_steps_every_log_every(tmp_path):
    run = rundir.create(tmp_path / "r")
    rundir.write_json_atomic(run.run_json, {"name": "r", "status": "running", "config": {"log_every": 5},
                                            "batch_size": 8, "grad_accum": 1, "world_size": 1})
    out = io.StringIO()
    log = HeadlessLog(run, lambda: None, out)
    for step in range(1, 11):
        log(ev.make("step", 1, step=step, total_steps=10, epoch=step / 10, epochs=1, samples_seen=8 * step,
                    loss=3.0 - step * 0.1, lr=1e-3, grad_norm=1.0, samples_per_s=80.0, tokens_per_s=1.0,
                    batch_size=8, grad_accum=1, mfu=None))
    log(ev.make("rank_stats", 1, rank=0, gpu_uuid=None, mem_peak_bytes=0, mem_reserved_bytes=0))
    log(ev.make("run_end", None, status="finished", reason="done", exit_code=0))
    lines = out.getvalue().splitlines()
    assert [l.split()[2] for l in lines[:3]] == ["1/10", "5/10", "10/10"]
    assert "batch 8×1×1=8" in lines[0] and "ETA" in lines[0]
    assert lines[3].endswith("run finished: done (exit 0)")
    assert len(lines) == 4
