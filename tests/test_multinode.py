"""The multi-node path on one machine: the generated accelerate config and launch line, validation,
every machine's event file read as one, and a real two-machine run on localhost (machine 0's
supervisor and machine 1's `sftui node`, each with its own `accelerate launch`, gloo ranks)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from conftest import (
    assert_each_sample_once,
    kinds,
    read_events,
    run_sftui,
    sftui_env,
    wait_for_event,
    wait_no_processes,
    write_rows,
)
from sftui import rundir
from sftui.config import RunConfig
from sftui.launch import accelerate_args, accelerate_config, free_loopback_port
from sftui.runstate import RunWatcher
from sftui.runfile import RunFile

COMMON = ["--cpu", "--max-len", "32", "--log-every", "1", "--record-samples", "--checkpoint-every", "0"]


def two_machines(**extra) -> RunConfig:
    return RunConfig(cpu=True, num_processes=1, num_machines=2, main_process_ip="10.1.2.3", main_process_port=29555,
                     **extra)


def test_the_generated_config_is_what_accelerate_reads(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    run = rundir.RunDir(tmp_path)
    gpus = RunConfig(gpus=[2, 3], num_machines=3, main_process_ip="10.1.2.3")
    path = tmp_path / "node-1.json"
    rundir.write_json_atomic(path, accelerate_config(gpus, 1))
    loaded = load_config_from_file(str(path))  # accelerate's own loader: unknown keys would raise
    assert (loaded.distributed_type, loaded.num_machines, loaded.machine_rank, loaded.num_processes) == \
        ("MULTI_GPU", 3, 1, 6)
    assert (loaded.gpu_ids, loaded.main_process_ip, loaded.main_process_port) == ("2,3", "10.1.2.3", 29500)
    assert (loaded.rdzv_backend, loaded.same_network, loaded.mixed_precision) == ("c10d", False, "no")
    assert accelerate_config(two_machines(), 0)["gpu_ids"] == "all"
    assert accelerate_args(run, 1) == ["--config_file", str(tmp_path / "accelerate" / "node-1.json"),
                                       "--max_restarts", "0", "--rdzv_conf", "is_host=0",
                                       "-m", "sftui.trainer", str(tmp_path)]
    assert "is_host=1" in accelerate_args(run, 0)


def test_bad_multi_node_usage_is_one_line_and_writes_nothing(tmp_path):
    cases = [
        (["--num-machines", "2"], "--main-process-ip: required with --num-machines 2"),
        (["--num-machines", "2", "--main-process-ip", "127.0.0.1"], "--run-dir: required with --num-machines"),
        (["--main-process-ip", "127.0.0.1"], "--main-process-ip: only with --num-machines > 1"),
        (["--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", "70000"],
         "--main-process-port: expected a port from 1 to 65535"),
        (["--num-machines", "2", "--main-process-ip", "127.0.0.1", "--batch", "auto", "--run-dir", "r"],
         "--batch auto: not with --num-machines"),
    ]
    for args, message in cases:
        result = run_sftui("run", "--cpu", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_node_refuses_what_it_cannot_join(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    for path, cfg in ((single, RunConfig(cpu=True)), (multi, two_machines())):
        RunFile.new(cfg, "t", "demo", 6000).write(rundir.create(path))
    cases = [
        (single, "1", "a single-machine run"),
        (multi, "0", "--machine-rank: expected an integer >= 1, got 0"),
        (multi, "2", "--machine-rank: expected 1 to 1 (machine 0 runs sftui run), got 2"),
        (tmp_path / "nowhere", "1", "not a run directory"),
    ]
    for path, rank, message in cases:
        result = run_sftui("node", str(path), "--machine-rank", rank)
        assert result.returncode == 2 and message in result.stderr, (path, rank, result.stderr)
    dataclasses.replace(RunFile.new(two_machines(), "t", "demo", 6000), status="finished").write(rundir.RunDir(multi))
    result = run_sftui("node", str(multi), "--machine-rank", "1")
    assert result.returncode == 2 and "the run has already ended (finished)" in result.stderr


def test_readers_merge_every_machines_event_file(tmp_path):
    run = rundir.create(tmp_path / "run")
    RunFile.new(two_machines(), "t", "demo", 6000).write(run)
    with rundir.EventLog(run.node_events(0), attempt=1) as log:
        log.emit("rank_start", rank=0, pid=1, host="a", gpu_uuid=None)
    watcher = RunWatcher(run.path)
    watcher.poll()
    live = RunWatcher(run.path, history=False)
    live.poll()
    assert run.node_events(1) == run.path / "events.node-1.jsonl"
    with rundir.EventLog(run.node_events(1), attempt=1) as log:  # machine 1's file appears later
        log.emit("oom", step=3, batch_size=8, rank=1, gpu_uuid=None, where="forward", message="m",
                 emergency_checkpoint=2, injected=False)
    new = watcher.poll()
    assert [e["kind"] for e in new] == ["oom"] and watcher.state.last_oom["rank"] == 1
    assert [e["kind"] for e in live.poll()] == ["oom"]
    assert any("rank 0 started" in line for line in watcher.state.log)


def all_events(run_dir: Path) -> list[dict]:
    return [e for path in rundir.RunDir(run_dir).event_files() for e in rundir.read_all(path)]


def start_two_machines(tmp_path: Path, *args: str) -> tuple[Path, subprocess.Popen, subprocess.Popen]:
    """Machine 0 (`sftui run --headless`) and machine 1 (`sftui node`) on this host."""
    run_dir = tmp_path / "run"
    port = str(free_loopback_port())
    machine0 = subprocess.Popen([sys.executable, "-m", "sftui", "run", "--headless", "--run-dir", str(run_dir), *COMMON,
                                 "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port,
                                 *args], cwd=tmp_path, env=sftui_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    wait_for_event(run_dir, lambda e: e["kind"] == "attempt_start", timeout=60)
    machine1 = subprocess.Popen([sys.executable, "-m", "sftui", "node", str(run_dir), "--machine-rank", "1"],
                                cwd=tmp_path, env=sftui_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return run_dir, machine0, machine1


def test_two_machines_oom_on_machine_1_restarts_both_losing_nothing(tmp_path):
    rows = 96
    data = write_rows(tmp_path / "d.jsonl", rows)
    run_dir, machine0, machine1 = start_two_machines(tmp_path, "--data", str(data), "--batch", "8", "--ladder", "8,4",
                                                     "--inject-oom-at-step", "3", "--inject-oom-rank", "1",
                                                     "--on-oom", "auto")
    out0, _ = machine0.communicate(timeout=300)
    out1, _ = machine1.communicate(timeout=60)
    assert machine0.returncode == 0, out0[-3000:]
    assert machine1.returncode == 0, out1
    assert "attempt 1: launched" in out1 and "attempt 2: launched" in out1 and "run finished" in out1
    ev = all_events(run_dir)
    (oom,) = kinds(ev, "oom")
    assert (oom["rank"], oom["emergency_checkpoint"]) == (1, 2)
    assert [e["outcome"] for e in kinds(ev, "attempt_end")] == ["cuda_oom", "finished"]
    assert [(s["attempt"], s["batch_size"], s["world_size"], s["resume_step"]) for s in kinds(ev, "attempt_start")] \
        == [(1, 8, 2, None), (2, 4, 2, 2)]
    # machine 1's ranks wrote to their own file, machine 0's to events.jsonl: one machine each here
    # each machine's ranks wrote to its own file (c10d's rendezvous decides which rank is where)
    machine1_events = rundir.read_all(run_dir / "events.node-1.jsonl")
    assert len(kinds(machine1_events, "rank_start")) == len(kinds(read_events(run_dir), "rank_start")) == 2
    assert "OUT OF MEMORY at step 3" in out0 and "run finished" in out0
    for n in (1, 2):
        # each machine's launcher wrote its own log (empty when nothing warned)
        assert (run_dir / f"attempt-{n}.log").is_file() and (run_dir / f"attempt-{n}.node-1.log").is_file()
    assert_each_sample_once(run_dir, rows)
    wait_no_processes(run_dir)


def test_killing_machine_1s_agent_ends_its_ranks_and_fails_the_attempt(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir, machine0, machine1 = start_two_machines(tmp_path, "--data", str(data), "--batch", "4")
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2, timeout=120)
    os.kill(machine1.pid, signal.SIGKILL)
    machine1.wait(timeout=10)
    out0, _ = machine0.communicate(timeout=120)
    assert machine0.returncode == 3, out0[-3000:]
    (attempt_end,) = kinds(all_events(run_dir), "attempt_end")
    assert attempt_end["outcome"] == "crash"
    assert any(re.fullmatch(r"\[sftui\] machine 0's launcher \(pid \d+\) exited with code 1", line)
               for line in attempt_end["log_tail"]), attempt_end["log_tail"]
    wait_no_processes(run_dir)  # machine 1's launcher and rank went with its agent (parent-death signal)
    assert not psutil.pid_exists(machine1.pid)
