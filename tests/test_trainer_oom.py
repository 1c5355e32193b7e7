"""The injected OOM: a real torch.OutOfMemoryError in the forward pass leaves an emergency
checkpoint at the last completed step, and the next attempt resumes there with no optimizer
step lost. With two ranks, the other rank is left in a collective and the attempt is torn
down as the supervisor would, quickly."""

from __future__ import annotations

import time
from pathlib import Path

from sftui import events as ev
from sftui import launch, rundir
from sftui.config import RunConfig
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             step_events, write_jsonl, write_run_json)

ROWS = 160
OOM_STEP = 6


def _config(tmp_path: Path, **kw) -> tuple[rundir.RunDir, RunConfig]:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(data=str(data), batch=8, max_len=32, log_every=1, record_samples=True, cpu=True,
                    checkpoint_every=0, inject_oom_at_step=OOM_STEP, **kw)
    return run, cfg


def _check_oom_event(run: rundir.RunDir, rank: int) -> None:
    (oom,) = events(run, "oom", 1)
    assert oom["step"] == OOM_STEP and oom["rank"] == rank and oom["where"] == "forward"
    assert oom["injected"] is True and oom["emergency_checkpoint"] == OOM_STEP - 1
    assert oom["batch_size"] == 8 and oom["gpu_uuid"] is None and "out of memory" in oom["message"]
    (ckpt,) = events(run, "checkpoint", 1)
    assert ckpt["reason"] == "oom" and ckpt["step"] == OOM_STEP - 1
    assert run.latest_checkpoint() == run.checkpoint_dir(OOM_STEP - 1)
    exits = [e for e in events(run, "worker_exit", 1) if e["rank"] == rank]
    assert [(e["reason"], e["step"]) for e in exits] == [("oom", OOM_STEP - 1)]
    assert events(run)[-1]["kind"] in ("worker_exit", "log")  # worker_exit is the rank's last line


def _check_resumed(run: rundir.RunDir) -> None:
    resumed = [e for e in step_events(run) if e["attempt"] == 2]
    assert resumed[0]["step"] == OOM_STEP  # zero optimizer steps lost
    assert [s["step"] for s in assert_each_sample_once(run, ROWS) if s["attempt"] == 1] == list(range(1, OOM_STEP))
    assert not list(run.checkpoints.glob(".tmp-*"))


def test_injected_oom_leaves_emergency_checkpoint_and_resume_loses_nothing(tmp_path: Path) -> None:
    run, cfg = _config(tmp_path)
    write_run_json(run, cfg)
    assert run_attempt(run, 1, 1) == [ev.WORKER_OOM], log_tail(run, 1)
    _check_oom_event(run, 0)

    next_attempt(run, batch_size=6)
    assert run_attempt(run, 2, 1) == [ev.WORKER_OK], log_tail(run, 2)
    _check_resumed(run)
    assert not events(run, "oom", 2)  # injection is for the first attempt only


def test_injected_oom_on_rank_1_of_2_tears_down_fast_and_resumes(tmp_path: Path) -> None:
    run, cfg = _config(tmp_path, num_processes=2, inject_oom_rank=1)
    write_run_json(run, cfg, batch_size=8, world_size=2)
    att = launch.start_attempt(run, 1, 2, gpus=None)
    try:
        deadline = time.monotonic() + 120
        while att.procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert att.procs[1].poll() == ev.WORKER_OOM, log_tail(run, 1)
        t0 = time.monotonic()
        att.terminate()  # what the supervisor does once a rank reported OOM
        assert time.monotonic() - t0 < 3.0
        assert not att.running()
    finally:
        att.terminate()
        att.wait_logs()
    _check_oom_event(run, 1)
    # Rank 0 was left in a collective: it must not claim anything about the attempt.
    assert not [e for e in events(run, "worker_exit", 1) if e["rank"] == 0]
    assert not [e for e in events(run, "checkpoint", 1) if e["reason"] != "oom"]

    next_attempt(run, batch_size=6)
    assert run_attempt(run, 2, 2) == [ev.WORKER_OK] * 2, log_tail(run, 2)
    _check_resumed(run)
