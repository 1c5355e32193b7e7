"""The supervisor with the real worker on the CPU (tiny model): the OOM ladder, decisions, control,
stop/resume, detach, and that nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (
    assert_each_sample_once,
    kinds,
    processes_of,
    read_events,
    run_sftui,
    sftui_env,
    wait_for_event,
    wait_no_processes,
    write_rows,
)

COMMON = ["--cpu", "--max-len", "32", "--log-every", "1", "--record-samples", "--checkpoint-every", "0"]


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def detach(tmp_path: Path, *args: str) -> Path:
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--detach", "--run-dir", str(run_dir), *COMMON, *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_dir)
    return run_dir


def wait_end(run_dir: Path, timeout: float = 240) -> dict:
    return wait_for_event(run_dir, lambda e: e["kind"] == "run_end", timeout)


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)], ids=["one-rank", "two-ranks-oom-on-rank-1"])
def test_oom_auto_restarts_one_rung_down_losing_nothing(tmp_path, world, rank):
    rows = 80 * world * 2
    data = write_rows(tmp_path / "d.jsonl", rows)
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data),
                       "--num-processes", str(world), "--batch", "16", "--inject-oom-at-step", "6",
                       "--inject-oom-rank", str(rank), "--on-oom", "auto", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ev = read_events(run_dir)
    (oom,) = kinds(ev, "oom")
    assert (oom["step"], oom["batch_size"], oom["rank"], oom["injected"]) == (6, 16, rank, True)
    assert oom["emergency_checkpoint"] == 5
    (decision,) = kinds(ev, "decision")
    assert (decision["by"], decision["action"], decision["batch_size"]) == ("policy", "restart", 12)
    (change,) = kinds(ev, "batch_change")
    assert (change["from"], change["to"], change["by"]) == (16, 12, "oom")
    starts = kinds(ev, "attempt_start")
    assert [(s["attempt"], s["batch_size"], s["resume_step"]) for s in starts] == [(1, 16, None), (2, 12, 5)]
    assert [e["outcome"] for e in kinds(ev, "attempt_end")] == ["cuda_oom", "finished"]
    assert kinds(ev, "run_end")[0]["exit_code"] == 0
    assert_each_sample_once(run_dir, rows)
    # the plain log said what happened
    assert "OUT OF MEMORY at step 6" in result.stdout and "batch 16 → 12 (by oom)" in result.stdout
    assert "run finished" in result.stdout
    assert (run_dir / "final" / "config.json").is_file()
    wait_no_processes(run_dir)


def test_ask_times_out_to_auto_and_notifies(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 64)
    notes = tmp_path / "notes.jsonl"
    script = tmp_path / "notify.py"
    script.write_text(f"import sys\nopen({str(notes)!r}, 'a').write(sys.stdin.read())\n")
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--batch", "8",
                       "--ladder", "8,4", "--inject-oom-at-step", "2", "--on-oom", "ask", "--oom-timeout", "1",
                       "--notify", f"{sys.executable} {script}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ev = read_events(run_dir)
    (need,) = kinds(ev, "decision_needed")
    assert need["proposed_batch"] == 4
    (decision,) = kinds(ev, "decision")
    assert (decision["by"], decision["action"], decision["batch_size"]) == ("timeout", "restart", 4)
    noted = [json.loads(line)["kind"] for line in notes.read_text().splitlines()]
    assert noted == ["decision_needed", "run_end"]
    assert_each_sample_once(run_dir, 64)


def test_user_decides_and_switches_batch_from_the_command_line(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 160)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "8", "--ladder", "8,6,4", "--inject-oom-at-step", "2",
                     "--on-oom", "ask", "--oom-timeout", "120")
    wait_for_event(run_dir, lambda e: e["kind"] == "decision_needed")
    status = run_sftui("status", str(run_dir), "--json")
    assert json.loads(status.stdout)["status"] == "waiting"
    bad = run_sftui("decide", str(run_dir), "restart", "zero")
    assert bad.returncode == 2 and "BATCH: expected an integer" in bad.stderr
    ok = run_sftui("decide", str(run_dir), "restart", "6")
    assert ok.returncode == 0, ok.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e.get("attempt") == 2 and e["step"] >= 4)
    switched = run_sftui("set-batch", str(run_dir), "4")
    assert switched.returncode == 0, switched.stderr
    end = wait_end(run_dir)
    assert end["exit_code"] == 0, read_events(run_dir)[-5:]
    ev = read_events(run_dir)
    (decision,) = kinds(ev, "decision")
    assert (decision["by"], decision["batch_size"]) == ("user", 6)
    changes = [(c["from"], c["to"], c["by"]) for c in kinds(ev, "batch_change")]
    assert changes == [(8, 6, "oom"), (6, 4, "user")]
    ends = kinds(ev, "attempt_end")
    assert [e["outcome"] for e in ends] == ["cuda_oom", "switch", "finished"]
    third = kinds(ev, "attempt_start")[2]
    assert third["resume_step"] == ends[1]["last_step"]  # the switch lost no step
    assert_each_sample_once(run_dir, 160)
    wait_no_processes(run_dir)


def test_stop_then_resume_at_another_batch(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 128)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "8")
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 3)
    assert run_sftui("stop", str(run_dir)).returncode == 0
    end = wait_end(run_dir)
    assert (end["status"], end["exit_code"]) == ("stopped", 4)
    wait_no_processes(run_dir)
    assert run_sftui("status", str(run_dir)).stdout.split()[1] == "stopped"
    result = run_sftui("run", "--resume", str(run_dir), "--batch", "4", "--headless", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    starts = kinds(read_events(run_dir), "attempt_start")
    assert starts[-1]["batch_size"] == 4 and starts[-1]["resume_step"] >= 3
    assert_each_sample_once(run_dir, 128)
    again = run_sftui("run", "--resume", str(run_dir), cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr


def test_resume_refuses_changed_data(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 64)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "8")
    wait_for_event(run_dir, lambda e: e["kind"] == "step")
    run_sftui("stop", str(run_dir))
    wait_end(run_dir)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "new", "response": "row"}) + "\n")
    before = (run_dir / "run.json").read_bytes()
    result = run_sftui("run", "--resume", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2 and "the data changed" in result.stderr
    assert (run_dir / "run.json").read_bytes() == before
    result = run_sftui("run", "--resume", str(run_dir), "--max-len", "64", cwd=tmp_path)
    assert result.returncode == 2 and "--max-len: cannot change on --resume" in result.stderr


def test_kill_9_supervisor_ranks_checkpoint_then_leave_and_resume_redoes_nothing(tmp_path):
    """Issue 14, items 14 and 9: a rank that loses its supervisor checkpoints at the next step
    boundary and leaves (both ranks agree on the step); --resume trains from exactly there, and a
    checkpoint request the dead supervisor had served is not served again."""
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "4", "--num-processes", "2")
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    assert run_sftui("checkpoint", str(run_dir)).returncode == 0
    served = wait_for_event(run_dir, lambda e: e["kind"] == "checkpoint" and e["reason"] == "request")
    pid = run_json(run_dir)["supervisor_pid"]
    ranks = [e["pid"] for e in kinds(read_events(run_dir), "rank_start")]
    ranks += [p.pid for p in standby_processes(run_dir, 2)]  # attempt 2's, waiting: they leave too
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_no_processes(run_dir, timeout=30)

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(map(alive, ranks)) and time.monotonic() - t0 < 30:  # a rank may still be inside its exit
        time.sleep(0.1)
    assert not any(map(alive, ranks)) and time.monotonic() - t0 < 30
    ev = read_events(run_dir)
    last = kinds(ev, "checkpoint")[-1]
    trained = max(s["step"] for s in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines()))
    assert last["reason"] == "supervisor_lost" and last["step"] == trained > served["step"], last
    assert sorted((e["rank"], e["reason"], e["step"]) for e in kinds(ev, "worker_exit")) == \
        [(0, "stop", trained), (1, "stop", trained)]
    assert not (run_dir / "attempt-2.log").exists()  # the waiting ranks wrote nothing
    status = run_sftui("status", str(run_dir))
    assert " lost " in status.stdout and f"sftui run --resume {run_dir}" in status.stdout, status.stdout
    assert json.loads(run_sftui("status", str(run_dir), "--json").stdout)["status"] == "lost"

    result = run_sftui("run", "--resume", str(run_dir), "--headless", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ev = read_events(run_dir)
    assert kinds(ev, "attempt_start")[-1]["resume_step"] == trained
    assert [e["reason"] for e in kinds(ev, "checkpoint") if e["attempt"] == 2] == ["final"]
    assert_each_sample_once(run_dir, 400)


def standby_processes(run_dir: Path, world: int, timeout: float = 60) -> list[psutil.Process]:
    """The next attempt's ranks the supervisor started ahead (``sftui.trainer.standby``), once all
    ``world`` of them are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in processes_of(run_dir) if "sftui.trainer.standby" in p.info["cmdline"]]
        if len(found) == world:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {world} ranks started ahead: {[p.info['cmdline'] for p in processes_of(run_dir)]}")


def test_a_switch_starts_the_next_attempt_from_the_ranks_started_ahead(tmp_path):
    """Once an attempt's ranks are up, the next attempt's ranks are started and import ahead;
    a switch (like an OOM restart) hands them the rendezvous port and they are its ranks: the same
    processes, and every sample still trained once (their output: test_launch_env)."""
    data = write_rows(tmp_path / "d.jsonl", 480)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "8", "--num-processes", "2")
    ahead = sorted(p.pid for p in standby_processes(run_dir, 2))
    assert not (run_dir / "attempt-2.log").exists()
    assert run_sftui("set-batch", str(run_dir), "4").returncode == 0
    assert wait_end(run_dir)["exit_code"] == 0, read_events(run_dir)[-5:]
    ev = read_events(run_dir)
    assert [e["outcome"] for e in kinds(ev, "attempt_end")] == ["switch", "finished"]
    assert [e["warm"] for e in kinds(ev, "attempt_start")] == [False, True]
    assert sorted(e["pid"] for e in kinds(ev, "rank_start") if e["attempt"] == 2) == ahead
    assert_each_sample_once(run_dir, 480)
    wait_no_processes(run_dir)


def test_a_killed_rank_fails_the_run_with_its_log_tail(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "4", "--num-processes", "2")
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    rank1 = [e for e in kinds(read_events(run_dir), "rank_start") if e["rank"] == 1][0]["pid"]
    os.kill(rank1, signal.SIGKILL)
    t0 = time.monotonic()
    end = wait_end(run_dir, timeout=60)
    assert time.monotonic() - t0 < 15  # rank 0, left in a collective, was torn down within seconds
    assert (end["status"], end["exit_code"]) == ("failed", 3)
    (attempt_end,) = kinds(read_events(run_dir), "attempt_end")
    assert attempt_end["outcome"] == "crash" and attempt_end["log_tail"]
    wait_no_processes(run_dir)


def test_a_hung_worker_is_torn_down(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "4", "--hang-timeout", "10")
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    rank0 = kinds(read_events(run_dir), "rank_start")[0]["pid"]
    os.kill(rank0, signal.SIGSTOP)  # alive, silent: a hang (10 s: loading a model on a busy CI box is no hang)
    end = wait_end(run_dir, timeout=60)
    assert end["exit_code"] == 3
    (attempt_end,) = kinds(read_events(run_dir), "attempt_end")
    assert attempt_end["outcome"] == "hang" and attempt_end["log_tail"] is not None
    wait_no_processes(run_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 4), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_headless_signals_stop_gracefully(tmp_path, sig, code):
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sftui", "run", "--headless", "--run-dir", str(run_dir), *COMMON,
                             "--data", str(data), "--batch", "4"], cwd=tmp_path, env=sftui_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out[-2000:]
    ev = read_events(run_dir)
    assert kinds(ev, "checkpoint")[-1]["reason"] == "stop"
    assert f"sftui run --resume {run_dir}" in kinds(ev, "run_end")[0]["reason"]
    wait_no_processes(run_dir)


def test_second_supervisor_is_refused_and_detached_run_survives_hangup(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = detach(tmp_path, "--data", str(data), "--batch", "4")
    wait_for_event(run_dir, lambda e: e["kind"] == "step")
    second = subprocess.run([sys.executable, "-m", "sftui", "_supervise", str(run_dir)], env=sftui_env(),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and "another supervisor is running this run" in second.stderr
    sup = psutil.Process(run_json(run_dir)["supervisor_pid"])
    assert sup.pid != os.getpid() and os.getsid(sup.pid) != os.getsid(0)  # its own session: no terminal's SIGHUP
    sup.send_signal(signal.SIGHUP)  # what a dropped SSH connection sends
    # a reply to a ping sent after the signal: the supervisor lived through it (no fixed sleep)
    assert run_sftui("set-batch", str(run_dir), "4").stderr.strip() == "sftui: already training at batch 4"
    assert sup.is_running() and run_json(run_dir)["status"] == "running"
    run_sftui("stop", str(run_dir))
    assert wait_end(run_dir)["exit_code"] == 4
    wait_no_processes(run_dir)
    assert processes_of(run_dir) == []
