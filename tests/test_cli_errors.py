"""Bad input: exit 2, one line on stderr naming the problem, no traceback, nothing written."""

from __future__ import annotations

import json
import os

import pytest

from sftui import rundir


def snapshot_tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def assert_refused(result, needle, root, before):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot_tree(root) == before, "something was written"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    (tmp_path / "bad.toml").write_text("batch = [1\n")
    (tmp_path / "unknown.toml").write_text("batchsize = 8\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    (tmp_path / "notjson.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    return tmp_path


CASES = [
    (["run", "--data", "missing.jsonl"], "--data: missing.jsonl: no such file"),
    (["run", "--config", "bad.toml"], "bad.toml: invalid TOML"),
    (["run", "--config", "unknown.toml"], "batchsize: unknown setting"),
    (["run", "--config", "nope.toml"], "--config: nope.toml: no such file"),
    (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["run", "--batch", "0"], "--batch: expected a positive integer"),
    (["run", "--batch", "many"], "--batch: expected a positive integer"),
    (["run", "--ladder", "8,12,16"], "--ladder: the ladder must be strictly descending"),
    (["run", "--resume", "."], "--resume: .: not a run directory"),
    (["run", "--model", "no/such/dir"], "--model: no/such/dir"),
    (["run", "--cpu", "--data", "bad.jsonl"], "bad.jsonl:2"),
    (["run", "--cpu", "--data", "notjson.jsonl"], "notjson.jsonl:2"),
    (["set-batch", "nowhere", "8"], "nowhere: not a run directory"),
    (["status", "nowhere"], "nowhere: not a run directory"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_refused_cleanly(sftui, workdir, args, needle):
    before = snapshot_tree(workdir)
    result = sftui(*args, cwd=workdir, timeout=60)
    assert_refused(result, needle, workdir, before)
    assert not (workdir / "runs").exists()


def test_run_dir_in_use_is_refused(sftui, workdir):
    run = rundir.create(workdir / "busy")
    rundir.write_json_atomic(run.run_json, {"status": "running", "config": {}})
    fd = rundir.acquire_lock(run)  # a live supervisor holds it
    try:
        before = snapshot_tree(workdir)
        assert_refused(sftui("run", "--resume", "busy", cwd=workdir, timeout=60), "in use by a live supervisor",
                       workdir, before)
        assert_refused(sftui("run", "--cpu", "--run-dir", "busy", cwd=workdir, timeout=60), "already holds a run",
                       workdir, before)
    finally:
        os.close(fd)


def test_help_lists_only_working_commands(sftui):
    out = sftui("--help").stdout
    for cmd in ("run", "attach", "status", "stop", "checkpoint", "set-batch", "decide", "runs", "probe"):
        assert f"    {cmd}" in out
    assert "_supervise" not in out and "SUPPRESS" not in out
