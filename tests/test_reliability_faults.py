"""Faults a run must survive, on the real supervisor and worker (CPU, tiny model): a rank killed
with SIGKILL at a random step (10 seeds), a disk that fills up during a checkpoint (a real tmpfs),
and the TUI's terminal hanging up (tmux). docs/RELIABILITY.md lists these with the other fault
tests."""

from __future__ import annotations

import fcntl
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from conftest import (
    assert_each_sample_once,
    kinds,
    processes_of,
    read_events,
    run_sftui,
    wait_for_event,
    wait_no_processes,
    write_rows,
)
from sftui import rundir
from sftui.rundir import RunDir
from sftui.trainer import checkpoint, model

COMMON = ["--cpu", "--max-len", "32", "--log-every", "1", "--record-samples", "--batch", "4"]


def wait_fast(run_dir: Path, pred, timeout: float = 60.0) -> dict:
    """wait_for_event with a short poll, to act within a step or two of an event."""
    tail = rundir.JsonlTail(Path(run_dir) / "events.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in tail.read():
            if pred(e):
                return e
        time.sleep(0.01)
    raise AssertionError(f"no matching event within {timeout} s; last events: {read_events(run_dir)[-5:]}")


def load_with_trainer(run_dir: Path, ck: Path) -> checkpoint.State:
    """Load a checkpoint the way a resumed rank does: the run's tokenizer, a fresh tiny model and
    AdamW, then checkpoint.load (safetensors + weights_only)."""
    tok = model.load_tokenizer(run_dir / "tokenizer", preset=True)
    net = model.build_model("tiny", tok, seed=0, max_len=32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    state, schedule = checkpoint.load(ck, net, opt)
    assert opt.state, "the optimizer state was not restored"
    assert schedule["samples_seen"] == state.samples_seen
    return state


# --- kill -9 of a rank at a random step -----------------------------------------------------------

ROWS = 160  # 40 steps of batch 4: a few seconds of training on one CPU rank


@pytest.mark.parametrize("seed", range(10))
def test_kill_9_of_a_rank_at_a_random_step_fails_cleanly_and_resumes_losing_nothing(tmp_path, seed):
    kill_after = random.Random(seed).randint(3, 24)  # a checkpoint (every 2 steps) exists from step 3 on
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    run_dir = tmp_path / "run"
    started = run_sftui("run", "--detach", "--run-dir", str(run_dir), *COMMON, "--data", str(data),
                        "--checkpoint-every", "2", cwd=tmp_path, timeout=120)
    assert started.returncode == 0, started.stderr
    wait_fast(run_dir, lambda e: e["kind"] == "step" and e["step"] >= kill_after)
    rank0 = kinds(read_events(run_dir), "rank_start")[0]["pid"]
    os.kill(rank0, signal.SIGKILL)

    end = wait_for_event(run_dir, lambda e: e["kind"] == "run_end", 60)
    assert (end["status"], end["exit_code"]) == ("failed", 3), end
    # which rank, its pid and the signal (it used to say only "a rank crashed")
    assert f"rank 0 (pid {rank0}) was killed by SIGKILL in attempt 1" in end["reason"], end["reason"]
    assert "attempt-1.log" in end["reason"]
    ev = read_events(run_dir)
    (attempt_end,) = kinds(ev, "attempt_end")
    assert attempt_end["outcome"] == "crash" and attempt_end["exit_codes"] == [-signal.SIGKILL]
    assert attempt_end["log_tail"][-1] == f"[sftui] rank 0 (pid {rank0}) was killed by SIGKILL"
    assert not any("Warning" in line for line in attempt_end["log_tail"]), attempt_end["log_tail"]
    assert attempt_end["last_step"] >= kill_after
    wait_no_processes(run_dir)
    assert {k: rundir.read_json(run_dir / "run.json")[k] for k in ("status", "exit_code")} == {"status": "failed",
                                                                                             "exit_code": 3}

    # The newest checkpoint the run announced is the one `latest` names, and it loads.
    # (A checkpoint being written when the kill came stays a temporary directory, never `latest`.)
    latest = RunDir(run_dir).latest_checkpoint()
    assert latest is not None
    announced = kinds(ev, "checkpoint")[-1]
    assert latest == run_dir / announced["path"]
    state = load_with_trainer(run_dir, latest)
    assert state.step == announced["step"] and state.step % 2 == 0 and state.samples_seen == 4 * state.step

    resumed = run_sftui("run", "--resume", str(run_dir), "--headless", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    ev = read_events(run_dir)
    assert kinds(ev, "attempt_start")[-1]["resume_step"] == state.step
    assert [e["outcome"] for e in kinds(ev, "attempt_end")] == ["crash", "finished"]
    assert_each_sample_once(run_dir, ROWS)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the killed writer's leftovers are gone
    wait_no_processes(run_dir)


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs of the size asked for; skipped where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_disk_full_at_a_checkpoint_keeps_the_previous_one_and_says_where(tmpfs, tmp_path):
    """The run directory on a 64 MiB filesystem: the step-2 checkpoint (36 MiB) fits, step 4 does
    not. The worker's free-space check refuses it before writing a byte."""
    disk = tmpfs("64m")
    data = write_rows(tmp_path / "d.jsonl", 64)
    run_dir = disk / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data),
                       "--checkpoint-every", "2", cwd=tmp_path, timeout=300)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr
    ev = read_events(run_dir)
    checkpoints = run_dir / "checkpoints"
    (error,) = [e for e in kinds(ev, "log") if e["level"] == "error"]
    assert error["message"].startswith(f"not enough disk space for a checkpoint in {checkpoints}: need about")
    end = kinds(ev, "run_end")[0]
    assert end["status"] == "failed" and error["message"] in end["reason"]
    assert "not enough disk space" in result.stdout  # the headless log says it too
    assert [c["step"] for c in kinds(ev, "checkpoint")] == [2]
    assert RunDir(run_dir).latest_checkpoint() == run_dir / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002"]  # no temporary leftovers
    assert load_with_trainer(run_dir, checkpoints / "step-00000002").step == 2
    wait_no_processes(run_dir)


@pytest.mark.parametrize("size, fails_in", [("44m", "model.safetensors"), ("60m", "optimizer.pt")])
def test_disk_full_in_the_middle_of_a_checkpoint_write(tmpfs, tmp_path, monkeypatch, size, fails_in):
    """The free-space estimate is wrong (another writer fills the disk after the check): the real
    write runs out of space in safetensors or in torch.save, and the message still says disk full,
    names the checkpoint, and the previous one stays whole."""
    disk = tmpfs(size)
    model.build_char_tokenizer(Counter("abc"), tmp_path / "tok")
    net = model.build_model("tiny", model.load_tokenizer(tmp_path / "tok"), seed=0, max_len=32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(input_ids=torch.tensor([[1, 4, 5]])).logits.sum().backward()
    opt.step()
    run = rundir.create(disk / "run")
    state = checkpoint.State(1, 8, 0, 8, 1, 1, "demo", 32, 42)
    first, _, _ = checkpoint.save(run, net, opt, {"samples_seen": 8}, state, keep=2)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    monkeypatch.setattr(checkpoint, "SPACE_MARGIN", 0.0)  # the check lets the write start
    second = checkpoint.State(2, 16, 0, 8, 1, 1, "demo", 32, 42)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save(run, net, opt, {"samples_seen": 16}, second, keep=2)
    message = str(err.value)
    assert message == (f"could not write checkpoint {run.checkpoint_dir(2)}: disk full; "
                       "the previous checkpoint step-00000001 is intact")
    assert run.latest_checkpoint() == first
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest", "step-00000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert shutil.disk_usage(disk).free > 0  # the partial copy was removed
    loaded, schedule = checkpoint.load(first, net, opt)
    assert loaded == state and schedule == {"samples_seen": 8}


# --- SIGHUP of the TUI ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tui_hangup_leaves_training_running(tmp_path):
    """`sftui run` (the TUI) in a tmux pane; the pane's terminal goes away (tmux kill-session: the
    SIGHUP of a dropped SSH connection). The TUI ends; the supervisor and its rank train on."""
    from test_tui_tmux import SFTUI, Pane
    from test_tui_supervisor import end_run

    run_dir = tmp_path / "run"
    pane = Pane(f"sftui-hup-{os.getpid()}", tmp_path)
    try:
        pane.type(f"{SFTUI} run --cpu --max-steps 5000 --log-every 1 --checkpoint-every 0 --run-dir {run_dir}")
        pane.wait(r"│ step [1-9]\d*/\d+", 90)
        procs = {p.pid: p for p in processes_of(run_dir)}
        # not the supervisor, a rank, or the next attempt's ranks started ahead (sftui.trainer.standby)
        tui = [p for p in procs.values() if not any(a in ("_supervise", "sftui.trainer", "sftui.trainer.standby")
                                                    for a in p.cmdline())]
        assert len(tui) == 1, [p.cmdline() for p in procs.values()]
        supervisor = psutil.Process(rundir.read_json(run_dir / "run.json")["supervisor_pid"])
        pane.close()  # the terminal hangs up: SIGHUP to the TUI's session
        psutil.wait_procs(tui, timeout=10)
        assert not tui[0].is_running() or tui[0].status() == psutil.STATUS_ZOMBIE, "the TUI outlived its terminal"
        seen = read_events(run_dir)
        last = kinds(seen, "step")[-1]["step"]
        wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= last + 5, 60)
        assert supervisor.is_running() and rundir.read_json(run_dir / "run.json")["status"] == "running"
        stopped = run_sftui("stop", str(run_dir))
        assert stopped.returncode == 0, stopped.stderr
        end = wait_for_event(run_dir, lambda e: e["kind"] == "run_end", 60)
        assert end["exit_code"] == 4
        wait_no_processes(run_dir)
    finally:
        pane.close()
        end_run(run_dir)


def test_tui_ends_when_its_terminal_hangs_up_without_a_sighup(tmp_path):
    """A terminal can go away without SIGHUP reaching the TUI: the tmux pane ran `make run` (make
    does not pass it on) or the TUI sits in a session of its own, as here. Textual's input thread
    then read end-of-file forever at a whole core; the TUI notices the hang-up and ends."""
    from test_tui_support import make_run
    from test_tui_tmux import SFTUI

    run_dir = make_run(tmp_path, "finished")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    tui = subprocess.Popen([str(SFTUI), "attach", str(run_dir)], stdin=slave, stdout=slave, stderr=slave,
                           env=dict(os.environ, TERM="xterm-256color"), start_new_session=True)
    os.close(slave)
    try:
        drawn, deadline = b"", time.monotonic() + 60
        while b"FINISHED" not in drawn and time.monotonic() < deadline and tui.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                drawn += os.read(master, 65536)
        assert b"FINISHED" in drawn, drawn[-2000:]
        os.close(master)  # the terminal hangs up; nothing sends a signal
        assert tui.wait(timeout=15) == 0
    finally:
        if tui.poll() is None:
            tui.kill()
            tui.wait()
