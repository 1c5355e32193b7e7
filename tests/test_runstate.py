"""runstate.py: every event kind reads as a line; status `lost`; ETA; headless formatting."""

from __future__ import annotations

import io

from sftui import events as ev
from sftui import rundir
from sftui.headless import HeadlessLog, memory_text
from sftui.runstate import RunWatcher, describe_event, rung_text
from sftui.units import fmt_duration

SAMPLE_FIELDS = {
    "run_start": {"config": {"model": "tiny", "data": "demo"}},
    "phase": {"phase": "tokenizing", "progress": 0.5},
    "attempt_start": {"batch_size": 16, "grad_accum": 2, "world_size": 2, "effective_batch": 64, "resume_step": 5},
    "rank_start": {"rank": 0, "pid": 1, "host": "h", "gpu_uuid": None},
    "data": {"rows": 19, "skipped": 2, "eval_rows": None, "target_samples": 35},
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


def test_the_newest_segment_rules_and_a_pending_decision_reads_as_waiting(tmp_path):
    """A run's events hold a segment per supervisor: the stop of the first must not colour the
    second (issue 14: a resumed run read as "stopped, exit 130"); an OOM question read as waiting."""
    run = rundir.create(tmp_path / "r")
    rundir.write_json_atomic(run.run_json, {"name": "r", "status": "waiting", "config": {"max_steps": 3},
                                            "batch_size": 16, "grad_accum": 1, "world_size": 1, "ladder": [16, 8],
                                            "sample_budget": 35})
    with rundir.EventLog(run.events, attempt=1) as log:
        log.emit("run_start", config={})
        log.emit("run_end", status="stopped", reason="stopped at step 1", exit_code=130)
        log.emit("run_start", config={}, resumed=True)
        log.emit("attempt_start", batch_size=16, grad_accum=1, world_size=1, effective_batch=16, resume_step=1)
        log.emit("data", rows=19, skipped=2, eval_rows=None, target_samples=35)
        log.emit("step", step=2, total_steps=3, epoch=1.0, epochs=1.842105, samples_seen=19, loss=2.0)
        for pct in (0.0, 0.5, 1.0):
            log.emit("phase", phase="tokenizing", progress=pct)
        log.emit("oom", step=3, batch_size=16, rank=0, where="forward", emergency_checkpoint=2, injected=True)
        log.emit("worker_exit", rank=0, reason="oom", step=2)
        log.emit("attempt_end", exit_codes=[75], outcome="cuda_oom", last_step=2, log_tail=None)
        log.emit("decision_needed", reason="oom", proposed_batch=8, deadline=0)
    w = RunWatcher(run.path)
    w.poll()
    s = w.state
    assert (s.status, s.exit_code, s.reason, s.skipped_rows) == ("waiting", None, None, 2)
    assert s.pending_decision and s.step == 2 and s.eta_s is None
    assert [line for line in s.log if "tokenizing" in line] == ["phase tokenizing 100%"]
    assert s.log[-2] == "attempt 1 ended: out of memory after step 2"
    with rundir.EventLog(run.events, attempt=1) as log:
        log.emit("decision", by="policy", action="restart", batch_size=8)
        log.emit("batch_change", **{"from": 16, "to": 8, "by": "oom"})
        log.emit("attempt_start", batch_size=8, grad_accum=1, world_size=1, effective_batch=8, resume_step=2)
    w.poll()
    s = w.state
    # 16 samples of epoch 1 left: two steps of 8, known before any step event of the new rung says so
    assert (s.status, s.step, s.total_steps) == ("running", 2, 4)
    assert s.budget_note == "--max-steps 3 = 35 samples; after the batch change that is 4 steps"
    assert s.epoch_text == "1.00/1.84"


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
    assert s.display_status == "lost"  # run.json says running but no supervisor holds the lock
    assert s.eta_s is None  # nothing is training: no time to the end
    fd = rundir.acquire_lock(run)
    w.poll()
    assert w.state.display_status == "running"
    assert w.state.eta_s == 10 * 64 / 64.0
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
