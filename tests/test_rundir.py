"""rundir.py: atomic writes, the lock, torn event lines, tailing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from sftui import rundir
from sftui.rundir import EventLog, JsonlTail, RunDir


def test_create_is_private(tmp_path):
    run = rundir.create(tmp_path / "r")
    assert stat.S_IMODE(os.stat(run.path).st_mode) == 0o700
    assert run.checkpoints.is_dir()


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x.json"
    rundir.write_json_atomic(p, {"a": 1})
    rundir.write_json_atomic(p, {"a": 2})
    assert rundir.read_json(p) == {"a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_torn_last_line_is_ended_and_skipped(tmp_path):
    p = tmp_path / "events.jsonl"
    with EventLog(p) as log:
        log.emit("log", level="info", message="first")
    with open(p, "ab") as f:
        f.write(b'{"v":1,"t":1.0,"kind":"log","lev')  # a writer died mid-line
    with EventLog(p, attempt=2) as log:
        log.emit("log", level="info", message="second")
    events = rundir.read_all(p)
    assert [e["message"] for e in events] == ["first", "second"]
    assert events[1]["attempt"] == 2
    assert p.read_bytes().count(b"\n") == 3


def test_tail_waits_for_a_complete_line(tmp_path):
    p = tmp_path / "t.jsonl"
    tail = JsonlTail(p)
    assert tail.read() == []
    with open(p, "ab") as f:
        f.write(b'{"kind":"a"}\n{"kind":')
        f.flush()
        assert [e["kind"] for e in tail.read()] == ["a"]
        f.write(b'"b"}\nnot json\n')
    assert [e["kind"] for e in tail.read()] == ["b"]


def test_lock_is_exclusive_and_released_by_death(tmp_path):
    run = rundir.create(tmp_path / "r")
    assert not rundir.lock_is_held(run)
    fd = rundir.acquire_lock(run)
    assert rundir.lock_is_held(run)
    with pytest.raises(rundir.LockHeld):
        rundir.acquire_lock(run)
    os.close(fd)
    assert not rundir.lock_is_held(run)
    # a process that dies holding the lock frees it
    code = ("import sys,os; sys.path.insert(0, %r); from sftui import rundir; "
            "rundir.acquire_lock(rundir.RunDir(__import__('pathlib').Path(%r))); os._exit(0)")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    subprocess.run([sys.executable, "-c", code % (src, str(run.path))], check=True)
    assert not rundir.lock_is_held(run)


def test_socket_path_falls_back_when_too_long(tmp_path):
    short = RunDir(tmp_path / "r")
    assert short.default_socket_path().parent == (tmp_path / "r").resolve()
    deep = RunDir(tmp_path / ("d" * 120))
    path = deep.default_socket_path()
    assert len(str(path)) <= rundir.UNIX_PATH_MAX and path.name.startswith("sftui-")


def test_latest_checkpoint(tmp_path):
    run = rundir.create(tmp_path / "r")
    assert run.latest_checkpoint() is None
    run.checkpoint_dir(5).mkdir()
    rundir.write_atomic(run.latest, b"step-00000005\n")
    assert run.latest_checkpoint() == run.checkpoint_dir(5)


def test_fresh_dir_is_renamed_into_place_whole_or_not_at_all(tmp_path):
    final = tmp_path / "cache" / "key"
    with rundir.fresh_dir(final, tag="w1") as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.name == ".tmp-key-w1" and tmp.parent == final.parent
        (tmp / "a").write_text("one")
        assert not final.exists()  # nothing is seen before the block ends
    assert (final / "a").read_text() == "one" and [p.name for p in final.parent.iterdir()] == ["key"]

    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="write failed"):
        with rundir.fresh_dir(other) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("write failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]  # no leftover, no half directory


def test_fresh_dir_keeps_the_first_writers_copy_or_replaces_it(tmp_path):
    final = tmp_path / "step-00000002"
    final.mkdir()
    (final / "a").write_text("first")
    with rundir.fresh_dir(final, tag="r1-123") as tmp:  # another writer saved this step first
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first" and list(tmp_path.iterdir()) == [final]

    with rundir.fresh_dir(final, replace=True) as tmp:  # final/: the newest replaces the old
        (tmp / "b").write_text("new")
    assert [p.name for p in final.iterdir()] == ["b"] and list(tmp_path.iterdir()) == [final]

    (tmp_path / ".tmp-step-00000002-w2").mkdir()  # a dead writer's leftover with our tag
    (tmp_path / ".tmp-step-00000002-w2" / "junk").write_text("x")
    with rundir.fresh_dir(tmp_path / "step-00000002", tag="w2", replace=True) as tmp:
        assert not any(tmp.iterdir())  # starts empty
