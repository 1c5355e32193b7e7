"""Helpers of the trainer tests: play the supervisor's part around real rank processes.

They write run.json and request.json as DESIGN.md's "As built" section says, start ranks with
``sftui.launch.start_attempt`` exactly as the supervisor does, and read back events,
samples.jsonl and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sftui import launch, rundir
from sftui.config import RunConfig
from sftui.rows import fingerprint

ATTEMPT_TIMEOUT = 300.0  # generous: a loaded 2-core CI box ran one attempt past 120 s


def write_run_json(run: rundir.RunDir, cfg: RunConfig, *, attempt: int = 1, batch_size: int | None = None,
                   grad_accum: int | None = None, world_size: int | None = None, sample_budget: int | None = None,
                   request_seq: int = 0) -> dict[str, Any]:
    """run.json as the supervisor writes it before starting an attempt."""
    batch = int(batch_size if batch_size is not None else cfg.batch)
    accum = grad_accum if grad_accum is not None else cfg.grad_accum
    world = world_size if world_size is not None else cfg.world_size
    spec = {
        "v": 1, "name": cfg.name or "test", "created": time.time(), "config": cfg.to_dict(), "status": "running",
        "attempt": attempt, "batch_size": batch, "grad_accum": accum, "world_size": world,
        "effective_batch": batch * accum * world, "ladder": cfg.ladder, "oom_rungs": [],
        "sample_budget": sample_budget, "request_seq": request_seq, "data_fingerprint": fingerprint(cfg.data),
        "supervisor_pid": os.getpid(), "socket": None, "pending_decision": None,
    }
    rundir.write_json_atomic(run.run_json, spec)
    return spec


def update_run_json(run: rundir.RunDir, **changes: Any) -> None:
    spec = rundir.read_json(run.run_json)
    spec.update(changes)
    if {"batch_size", "grad_accum", "world_size"} & changes.keys():
        spec["effective_batch"] = spec["batch_size"] * spec["grad_accum"] * spec["world_size"]
    rundir.write_json_atomic(run.run_json, spec)


def write_request(run: rundir.RunDir, seq: int, action: str, batch_size: int | None = None) -> None:
    rundir.write_json_atomic(run.request, {"seq": seq, "action": action, "batch_size": batch_size})


def events(run: rundir.RunDir, kind: str | None = None, attempt: int | None = None) -> list[dict[str, Any]]:
    out = rundir.read_all(run.events)
    return [e for e in out if (kind is None or e["kind"] == kind) and (attempt is None or e.get("attempt") == attempt)]


def run_attempt(run: rundir.RunDir, attempt: int, world: int,
                requests: list[tuple[int, tuple[int, str, int | None]]] = (),
                timeout: float = ATTEMPT_TIMEOUT) -> list[int | None]:
    """Start an attempt and wait for every rank; their exit codes. ``requests`` are
    (after step, (seq, action, batch_size)): request.json is written once a step event of this
    attempt with at least that step appears, one request after the other."""
    att = launch.start_attempt(run, attempt, world, gpus=None)
    deadline = time.monotonic() + timeout
    pending = list(requests)
    tail = rundir.JsonlTail(run.events)
    try:
        while att.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"attempt {attempt} still running after {timeout}s:\n{log_tail(run, attempt)}")
            for e in tail.read():
                if pending and e["kind"] == "step" and e.get("attempt") == attempt and e["step"] >= pending[0][0]:
                    write_request(run, *pending.pop(0)[1])
            time.sleep(0.02)
    finally:
        if att.running():
            att.terminate()
        att.wait_logs()
    return att.poll()


def next_attempt(run: rundir.RunDir, **changes: Any) -> int:
    """What the supervisor does between attempts: bump the attempt, consume handled requests
    (``request_seq``), set the new rung; the new attempt's number."""
    spec = rundir.read_json(run.run_json)
    update_run_json(run, attempt=spec["attempt"] + 1, **changes)
    return spec["attempt"] + 1


def step_events(run: rundir.RunDir) -> list[dict[str, Any]]:
    return events(run, "step")


def assert_each_sample_once(run: rundir.RunDir, n_rows: int, epochs: int = 1) -> list[dict[str, Any]]:
    """samples.jsonl proves that every epoch trained every sample exactly once, steps 1..N in
    order with no gap or repeat; the lines, for further checks."""
    lines = samples(run)
    assert [s["step"] for s in lines] == list(range(1, len(lines) + 1))
    for epoch in range(epochs):
        ids = [i for s in lines if s["epoch"] == epoch for i in s["ids"]]
        assert sorted(ids) == list(range(n_rows)), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"
    return lines


def log_tail(run: rundir.RunDir, attempt: int, n: int = 60) -> str:
    return "\n".join(rundir.tail_lines(run.attempt_log(attempt), n))


def samples(run: rundir.RunDir) -> list[dict[str, Any]]:
    return rundir.read_all(run.samples)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Small learnable prompt/response rows (copy and add), lengths varying."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            a, b = rng.randrange(50), rng.randrange(50)
            rows.append({"prompt": f"add {a}+{b} =", "response": f" {a + b}"})
        else:
            w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
            rows.append({"prompt": f"copy {w} ->", "response": f" {w}"})
    return rows
