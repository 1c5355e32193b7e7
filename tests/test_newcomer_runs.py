"""What a new user hit (issue 14), on real runs of the supervisor and worker (CPU, tiny model):
a resumed run read as stopped, --max-steps overshooting, OOM step numbers that disagreed, rows
skipped without a word, a closed pipe's traceback, and advice that did not work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import (
    kinds,
    read_events,
    run_sftui,
    sftui_env,
    wait_for_event,
    wait_no_processes,
    write_rows,
)

COMMON = ["--cpu", "--max-len", "32", "--checkpoint-every", "0"]


def status_json(run_dir: Path) -> dict:
    result = run_sftui("status", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_resumed_run_reads_as_running_after_a_stop(tmp_path):
    """Every reader shows the newest run_start … run_end segment: after a stop (exit 4) and a
    resume, the run is running, not "stopped, exit 4"; the live run's --run-dir advice is attach."""
    data = write_rows(tmp_path / "d.jsonl", 400)
    run_dir = tmp_path / "run"
    started = run_sftui("run", "--detach", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--batch", "2",
                        "--log-every", "1", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    assert run_sftui("stop", str(run_dir)).returncode == 0
    end = wait_for_event(run_dir, lambda e: e["kind"] == "run_end")
    assert (end["status"], end["exit_code"]) == ("stopped", 4)
    wait_no_processes(run_dir)

    resumed = run_sftui("run", "--resume", str(run_dir), "--detach", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e.get("attempt") == 2)
    state = status_json(run_dir)
    assert (state["status"], state["exit_code"], state["reason"]) == ("running", None, None), state
    assert state["eta_s"] is not None
    listing = run_sftui("runs", "--root", str(tmp_path)).stdout
    assert " running " in listing, listing
    taken = run_sftui("run", "--run-dir", str(run_dir), *COMMON, "--data", str(data), cwd=tmp_path)
    assert taken.returncode == 2 and f"it is training now: sftui attach {run_dir}" in taken.stderr, taken.stderr

    assert run_sftui("stop", str(run_dir)).returncode == 0
    wait_for_event(run_dir, lambda e: e["kind"] == "run_end" and e.get("exit_code") == 4 and e["t"] > end["t"])
    state = status_json(run_dir)
    assert (state["status"], state["exit_code"], state["eta_s"], state["telemetry"]) == ("stopped", 4, None, None)
    wait_no_processes(run_dir)


def test_max_steps_ends_at_exactly_that_step_and_counts_skipped_rows(tmp_path):
    """--max-steps 3 on 19 rows at batch 16 trains 3 steps (it trained 5: the short last step of
    an epoch counted as a whole one), the epoch never shows above its total, and the rows that
    --skip-bad-rows left out are counted on stderr, in the log, the events and `status`."""
    data = write_rows(tmp_path / "d.jsonl", 19)
    with open(data, "a") as f:
        f.write("{not json\n" + json.dumps({"prompt": "no response"}) + "\n")
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--batch", "16",
                       "--max-steps", "3", "--log-every", "1", "--skip-bad-rows", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "skipping 2 bad rows of 21 (--skip-bad-rows)" in result.stderr
    assert "data: 19 rows, 2 bad rows skipped (--skip-bad-rows)" in result.stdout
    ev = read_events(run_dir)
    steps = kinds(ev, "step")
    assert [s["step"] for s in steps] == [1, 2, 3] and {s["total_steps"] for s in steps} == {3}
    assert all(s["epoch"] <= s["epochs"] for s in steps) and steps[-1]["epoch"] == steps[-1]["epochs"]
    assert "epoch 1.84/1.84" in result.stdout  # 35 samples of 19 rows, shown in one precision
    (data_event,) = kinds(ev, "data")
    assert (data_event["rows"], data_event["skipped"], data_event["target_samples"]) == (19, 2, 35)
    status = run_sftui("status", str(run_dir))
    assert "2 bad rows skipped (--skip-bad-rows), 19 trained on" in status.stdout
    assert "ETA" not in status.stdout and "RAM" not in status.stdout  # nothing live about a finished run

    # `sftui status R | head -c 0`: the reader is gone before the first line; no traceback.
    for args in (["status", str(run_dir)], ["runs", "--root", str(tmp_path)]):
        proc = subprocess.Popen([sys.executable, "-m", "sftui", *args], env=sftui_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=tmp_path)
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err

    again = run_sftui("run", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--skip-bad-rows", cwd=tmp_path)
    assert again.returncode == 2 and "it has finished; give another --run-dir" in again.stderr, again.stderr


def test_an_oom_reports_one_step_number_and_max_steps_becomes_a_sample_budget(tmp_path):
    """--inject-oom-at-step 5 with step events every 3 steps: the checkpoint, the rank's exit, the
    attempt's end and the header agree on step 4 (the attempt said "after step 3"); on the next
    rung --max-steps' samples rule, and the log says so in words."""
    data = write_rows(tmp_path / "d.jsonl", 60)
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), *COMMON, "--data", str(data), "--batch", "4",
                       "--ladder", "4,2", "--max-steps", "6", "--log-every", "3", "--inject-oom-at-step", "5",
                       "--on-oom", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ev = read_events(run_dir)
    (oom,) = kinds(ev, "oom")
    assert (oom["step"], oom["emergency_checkpoint"]) == (5, 4)
    first_end = kinds(ev, "attempt_end")[0]
    assert (first_end["outcome"], first_end["last_step"]) == ("cuda_oom", 4)
    assert "attempt 1 ended: out of memory after step 4" in result.stdout  # not "cuda_oom" on a CPU
    assert "rank 0 exited: oom after step 4" in result.stdout
    # 24 samples: 4 steps of 4, then 8 samples at batch 2 = 4 more steps
    steps = kinds(ev, "step")
    assert steps[-1]["step"] == 8 and steps[-1]["total_steps"] == 8 and steps[-1]["samples_seen"] == 24
    status = run_sftui("status", str(run_dir)).stdout
    assert "--max-steps 6 = 24 samples; after the batch change that is 8 steps" in status, status
    assert "step None" not in result.stdout and "error at step" not in result.stdout


def test_a_headless_run_trains_on_when_its_log_reader_goes_away(tmp_path):
    """`sftui run --headless | head -1`: the log's reader closes the pipe; the supervisor must not die
    of it (its observer raised BrokenPipeError): the run trains to the end, exit 0."""
    data = write_rows(tmp_path / "d.jsonl", 40)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sftui", "run", "--headless", "--run-dir", str(run_dir), *COMMON,
                             "--data", str(data), "--batch", "4", "--log-every", "1"], env=sftui_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err, err[-2000:]
    assert kinds(read_events(run_dir), "run_end")[0]["status"] == "finished"
    assert (run_dir / "final").is_dir()
