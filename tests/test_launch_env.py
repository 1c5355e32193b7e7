"""What every rank and probe process of an attempt gets in its environment (launch.py)."""

from __future__ import annotations

import signal

from sftui import launch
from sftui.events import WORKER_ERROR
from sftui.rundir import RunDir


def test_ranks_run_with_expandable_segments_unless_the_user_chose(monkeypatch):
    """The caching allocator's fixed segments fragment under varying lengths (115 GiB reserved for
    33 GiB allocated on an H200): ranks and the probe get expandable segments by default, and a
    PYTORCH_CUDA_ALLOC_CONF of the user's own is passed on as it is."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    env = launch.rank_env(0, 2, 29500, 1, [0, 1])
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert launch.allocator_conf() == ("expandable_segments:True", False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert launch.rank_env(1, 2, 29500, 1, [0, 1])["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert launch.allocator_conf() == ("max_split_size_mb:512", True)


def test_ranks_started_ahead_become_the_attempt_they_wait_for_and_no_other(tmp_path):
    """launch.start_standby, then start_attempt: the waiting processes themselves become the
    attempt's ranks, their output prefixed in attempt-N.log (here the rank's failure on a run
    directory without run.json); ranks waiting for another attempt are killed, the ranks start
    cold, and they wrote nothing."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    other = launch.start_standby(run, 3, 1, None)
    attempt = launch.start_attempt(run, 2, 1, None, standby=other)
    assert [p.pid for p in attempt.procs] != [p.pid for p in other.procs]
    assert [p.wait(timeout=60) for p in other.procs] == [-signal.SIGKILL]
    assert [p.wait(timeout=300) for p in attempt.procs] == [WORKER_ERROR]
    assert not run.attempt_log(3).exists()

    ahead = launch.start_standby(run, 4, 1, None)
    attempt = launch.start_attempt(run, 4, 1, None, standby=ahead)
    assert attempt.procs == ahead.procs
    assert [p.wait(timeout=300) for p in attempt.procs] == [WORKER_ERROR]
    attempt.wait_logs()
    lines = run.attempt_log(4).read_text().splitlines()
    assert lines and all(line.startswith("[rank 0] ") for line in lines)
    assert any("run.json" in line for line in lines), lines
