"""Shared fixtures: run the real `sftui` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

# Times on screens and in logs are local: pin the zone so snapshots do not depend on the machine's.
os.environ["TZ"] = "UTC"
time.tzset()
# trainer/t5attention.py's kernels run in triton's interpreter (no GPU here). Set before any test module
# imports triton (tests/test_batching.py's imports do): set later, in the full suite, every kernel call
# failed with "Cannot call @triton.jit'd outside of the scope of a kernel" (triton 3.9).
os.environ["TRITON_INTERPRET"] = "1"

SRC = str(Path(__file__).resolve().parent.parent / "src")


def sftui_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_sftui(*args: str, cwd: Path | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m sftui ARGS` as a user would run it (stdout is not a TTY, so `run` is headless)."""
    return subprocess.run(
        [sys.executable, "-m", "sftui", *args], cwd=cwd, env=sftui_env(), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, **kw,
    )


@pytest.fixture
def sftui():
    return run_sftui


# Modules whose tests start real runs (supervisor, ranks, accelerate launch, tmux): seconds to
# minutes each. `make test-fast` (pytest -m "not slow") leaves them out; `make test` runs all.
# A slow test in another module carries @pytest.mark.slow itself.
SLOW_MODULES = {
    "test_supervisor", "test_newcomer_runs", "test_reliability_faults", "test_reliability_shared",
    "test_reliability_input", "test_multinode", "test_probe", "test_tui_tmux", "test_tui_supervisor",
    "test_trainer_resume", "test_trainer_oom", "test_trainer_models", "test_trainer_fast_path",
    "test_trainer_static", "test_trainer_options", "test_chat_runs", "test_lora", "test_packing_runs",
    "test_two_ranks_combined",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


# --- helpers for runs of the real supervisor and worker ---

import json
import time

from sftui import rundir as _rundir


def write_rows(path: Path, n: int) -> Path:
    """A small prompt/response JSONL file with learnable rows (row i is about the number i)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"reverse {i:04d} =", "response": f" {str(i)[::-1]}"}) + "\n")
    return path


def read_events(run_dir: Path) -> list[dict]:
    return _rundir.read_all(Path(run_dir) / "events.jsonl")


def wait_for_event(run_dir: Path, pred, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in read_events(run_dir):
            if pred(e):
                return e
        time.sleep(0.2)
    raise AssertionError(f"no matching event within {timeout} s; last events: {read_events(run_dir)[-5:]}")


def kinds(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("kind") == kind]


def assert_each_sample_once(run_dir: Path, n_rows: int, epochs: int = 1) -> None:
    """Over the steps that survived (for each step, the latest attempt that recorded it), every sample id
    of every epoch was trained exactly once."""
    last: dict[int, dict] = {}
    for rec in _rundir.read_all(Path(run_dir) / "samples.jsonl"):
        if rec["step"] not in last or rec["attempt"] >= last[rec["step"]]["attempt"]:
            last[rec["step"]] = rec
    assert sorted(last) == list(range(1, len(last) + 1)), "steps are not contiguous from 1"
    for epoch in range(epochs):
        ids = [i for rec in last.values() if rec["epoch"] == epoch for i in rec["ids"]]
        assert sorted(ids) == list(range(n_rows)), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"


def processes_of(run_dir: Path) -> list:
    """Live processes whose command line names this run directory (supervisor, ranks)."""
    import psutil

    needle = str(Path(run_dir).resolve())
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if needle in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def wait_no_processes(run_dir: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of(run_dir), [p.info["cmdline"] for p in processes_of(run_dir)]
