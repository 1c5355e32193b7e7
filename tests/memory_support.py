"""Recorded runs for the GPU-memory tests (who holds each GPU, pressure before an OOM, allocated
next to reserved): ``test_tui_support.make_run``'s run directories, with what a supervisor on a
shared machine records on top, written through rundir's own writers.

No tests here: the test modules import from this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftui import events as ev
from sftui.rundir import EventLog, RunDir
from test_tui_support import CLOCK, GIB, GPU_UUIDS, loss_at, make_run

HOST = "node1"  # make_run's ranks say they run there
TRAINER = "python -m sftui.trainer /runs/alpaca-7b"
FOREIGN = {"pid": 51234, "user": "bob", "command": "python train.py --lr 3e-4", "mem": int(12.3 * GIB)}
# rank 1 of attempt 1 (make_run's pid 4001), still holding memory while attempt 2 runs
LEFTOVER = {"pid": 4001, "user": "alice", "command": TRAINER, "mem": int(10.5 * GIB)}
RANK_PIDS = (4100, 4101)  # attempt 2's ranks
RETRIES = {70: 5, 120: 4, 150: 3}  # rank 0's alloc_retries (since its report before) at these steps


def event(kind: str, t: float, attempt: int | None = None, **fields: Any) -> dict[str, Any]:
    e = ev.make(kind, attempt, **fields)
    e["t"] = t
    return e


def procs_sample(t: float, gpu0: list[dict[str, Any]], gpu1: list[dict[str, Any]], host: str | None = HOST,
                 used: tuple[float, float] = (74.6, 79.1)) -> dict[str, Any]:
    """A telemetry sample of make_run's two A100s, with each GPU's processes (telemetry's ``procs``)."""
    gpus = []
    for i, procs in enumerate((gpu0, gpu1)):
        gpus.append({"index": i, "name": "NVIDIA A100-SXM4-80GB", "uuid": GPU_UUIDS[i], "mem_used": int(used[i] * GIB),
                     "mem_total": 80 * GIB, "util": 97.0 - 4 * i, "temp": 66, "power_w": 355.0, "power_limit_w": 400.0,
                     "in_run": True, "procs": procs})
    return {"t": t, "host": host, "gpus": gpus, "gpu_error": None,
            "system": {"mem_used": 41 * GIB, "mem_total": 251 * GIB, "swap_used": 0, "swap_total": 8 * GIB,
                       "cpu_percent": 37.5},
            "run_rss": int(9.25 * GIB)}


def rank_proc(pid: int, gib: float) -> dict[str, Any]:
    return {"pid": pid, "user": "alice", "command": TRAINER, "mem": int(gib * GIB)}


def shared_sample(t: float) -> dict[str, Any]:
    """GPU 0: rank 0 and bob's foreign job; GPU 1: rank 1 and attempt 1's rank 1, left over."""
    return procs_sample(t, [rank_proc(RANK_PIDS[0], 62.1), FOREIGN], [rank_proc(RANK_PIDS[1], 68.3), LEFTOVER])


def shared_run(root: Path, last_step: int = 150) -> Path:
    """make_run's ``live`` run (attempt 2 at batch 12 after an OOM at 16, step 60), trained on
    to ``last_step`` on a machine it shares: attempt 2's ranks said their pids, rank 0's
    allocator retried (RETRIES), rank 1 reserved 67.5 GiB of a card that attempt 1's rank 1
    still holds 10.5 GiB of, and the latest telemetry lists every holder."""
    path = make_run(root, "live")
    run = RunDir(path)
    t = CLOCK - 60
    with EventLog(run.events) as log:
        for rank, pid in enumerate(RANK_PIDS):
            log.write(event("rank_start", t, 2, rank=rank, pid=pid, host=HOST, gpu_uuid=GPU_UUIDS[rank]))
        for step in range(61, last_step + 1):
            log.write(event("step", t + step * 0.1, 2, step=step, total_steps=400, epoch=round(step * 48 / 40000, 4),
                            epochs=1, samples_seen=step * 48, loss=round(loss_at(step), 4), lr=2e-4, grad_norm=0.9,
                            samples_per_s=412.5, tokens_per_s=105600.0, batch_size=12, grad_accum=2, mfu=0.41))
            if step % 10 == 0:
                log.write(event("rank_stats", t + step * 0.1, 2, rank=0, gpu_uuid=GPU_UUIDS[0],
                                mem_peak_bytes=int(58.1 * GIB), mem_reserved_bytes=int(61.2 * GIB),
                                alloc_retries=RETRIES.get(step, 0)))
                log.write(event("rank_stats", t + step * 0.1, 2, rank=1, gpu_uuid=GPU_UUIDS[1],
                                mem_peak_bytes=int(60.3 * GIB), mem_reserved_bytes=int(67.5 * GIB), alloc_retries=0))
    with open(run.telemetry, "a") as f:
        f.write(json.dumps(shared_sample(CLOCK - 1)) + "\n")
    return path


def oom_with_foreign_run(root: Path) -> Path:
    """make_run's ``oom`` run (step 6 ran out of memory on GPU 1, a decision pending), where
    the sample of that moment shows bob's job holding 40.2 GiB of GPU 1 beside rank 1."""
    path = make_run(root, "oom")
    run = RunDir(path)
    lines = run.telemetry.read_text().splitlines()
    at_oom = json.loads(lines[0])
    foreign = dict(FOREIGN, mem=int(40.2 * GIB), command="python train.py")
    lines[0] = json.dumps(procs_sample(at_oom["t"], [rank_proc(4000, 44.1)], [foreign, rank_proc(4001, 38.1)],
                                       used=(44.6, 78.9)))
    run.telemetry.write_text("\n".join(lines) + "\n")
    return path
