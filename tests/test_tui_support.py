"""What the TUI tests share: replayed run directories (test input data, written through rundir's
own writers), and how a test waits for the app and reads its screen.

No tests here: the TUI test modules import from this file.
"""

from __future__ import annotations

import html
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from textual.app import App
from textual.pilot import Pilot

from sftui import events as ev
from sftui.rundir import EventLog, RunDir, acquire_lock, create, write_json_atomic

CLOCK = 1_700_000_000.0  # the fixed "now" of every snapshot
GIB = 1024**3
WAIT_S = 30.0  # how long a test waits for the app: generous, a loaded 2-core box is slow, not wrong
GPU_UUIDS = ("GPU-11111111-aaaa-bbbb-cccc-000000000000", "GPU-22222222-aaaa-bbbb-cccc-000000000000")


def fixed_clock() -> float:
    return CLOCK


def _event(kind: str, t: float, attempt: int | None = None, **fields: Any) -> dict[str, Any]:
    e = ev.make(kind, attempt, **fields)
    e["t"] = t
    return e


def gpu_sample(t: float, i: int, mem_gib: float, util: float) -> dict[str, Any]:
    return {"t": t, "gpus": [
        {"index": 0, "name": "NVIDIA A100-SXM4-80GB", "uuid": GPU_UUIDS[0], "mem_used": int(mem_gib * GIB),
         "mem_total": 80 * GIB, "util": util, "temp": 64 + i % 5, "power_w": 310.0 + i, "power_limit_w": 400.0,
         "in_run": True},
        {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "uuid": GPU_UUIDS[1], "mem_used": int((mem_gib - 1.5) * GIB),
         "mem_total": 80 * GIB, "util": max(0.0, util - 7), "temp": 61, "power_w": 290.0, "power_limit_w": 400.0,
         "in_run": True},
    ], "gpu_error": None,
        "system": {"mem_used": 41 * GIB, "mem_total": 251 * GIB, "swap_used": 0, "swap_total": 8 * GIB,
                   "cpu_percent": 37.5},
        "run_rss": int(9.25 * GIB)}


def cpu_sample(t: float) -> dict[str, Any]:
    return {"t": t, "gpus": [], "gpu_error": "no NVIDIA GPU found",
            "system": {"mem_used": 3 * GIB, "mem_total": 8 * GIB, "swap_used": GIB // 4, "swap_total": 2 * GIB,
                       "cpu_percent": 96.0},
            "run_rss": int(1.4 * GIB)}


def loss_at(step: int) -> float:
    return 2.2 + 6.0 * math.exp(-step / 18) + 0.25 * math.sin(step * 1.7)


def make_run(root: Path, scenario: str = "live", steps: int = 60) -> Path:
    """A run directory as the supervisor would leave it.

    ``live``: attempt 2 at batch 12 on 2 GPUs after an OOM at 16 (answered), training.
    ``oom``: attempt 1 just ran out of memory at step 6; a decision is pending.
    ``nogpu``: a CPU run, telemetry says no NVIDIA GPU.
    ``finished``: ``live`` run to its end.
    ``crash``: ``live``, then attempt 2 crashed (a traceback in attempt-2.log) and the run failed.
    """
    path = Path(root) / f"run-{scenario}"
    run = create(path)
    cpu = scenario == "nogpu"
    world = 1 if cpu else 2
    t0 = CLOCK - 400
    cfg = {"model": "tiny", "data": "demo", "batch": 16, "ladder": [16, 12, 8], "grad_accum": 2, "epochs": 1,
           "cpu": cpu, "gpus": None if cpu else [0, 1], "on_oom": "ask", "oom_timeout": 30.0}
    status = {"live": "running", "oom": "waiting", "nogpu": "running", "finished": "finished",
              "crash": "failed"}[scenario]
    events: list[dict[str, Any]] = [
        _event("run_start", t0, config=cfg),
        _event("phase", t0 + 1, phase="validating", progress=None),
        _event("phase", t0 + 2, phase="tokenizing", progress=1.0),
        _event("attempt_start", t0 + 3, 1, batch_size=16, grad_accum=2, world_size=world,
               effective_batch=16 * world * 2, resume_step=None),
    ]
    for r in range(world):
        events.append(_event("rank_start", t0 + 4, 1, rank=r, pid=4000 + r, host="node1",
                             gpu_uuid=None if cpu else GPU_UUIDS[r]))
    events.append(_event("phase", t0 + 5, 1, phase="loading_model", progress=0.5))
    total = 400
    t = t0 + 10

    def step_event(step: int, batch: int, attempt: int) -> dict[str, Any]:
        eff = batch * world * 2
        return _event("step", t + step, attempt, step=step, total_steps=total, epoch=round(step * eff / 40000, 4),
                      epochs=1, samples_seen=step * eff, loss=round(loss_at(step), 4), lr=2e-4, grad_norm=0.91,
                      samples_per_s=96.0 if cpu else 412.5, tokens_per_s=24576.0 if cpu else 105600.0,
                      batch_size=batch, grad_accum=2, mfu=None if cpu else 0.412)

    oom_step = 6
    first_end = steps if scenario == "nogpu" else oom_step - 1
    for s in range(1, first_end + 1):
        events.append(step_event(s, 16, 1))
    if scenario == "nogpu":
        events.append(_event("rank_stats", t + steps, 1, rank=0, gpu_uuid=None, mem_peak_bytes=None,
                             mem_reserved_bytes=None))
    else:
        events.append(_event("rank_stats", t + 5, 1, rank=0, gpu_uuid=GPU_UUIDS[0], mem_peak_bytes=int(77.5 * GIB),
                             mem_reserved_bytes=int(78.9 * GIB)))
        events.append(_event("oom", t + oom_step, 1, step=oom_step, batch_size=16, rank=1, gpu_uuid=GPU_UUIDS[1],
                             where="forward", message="CUDA out of memory. Tried to allocate 2.00 GiB",
                             emergency_checkpoint=oom_step - 1, injected=True))
        events.append(_event("checkpoint", t + oom_step + 1, 1, step=oom_step - 1, path="checkpoints/step-00000005",
                             seconds=3.2, bytes=int(1.1 * GIB), reason="oom"))
        for r in range(world):
            events.append(_event("worker_exit", t + oom_step + 2, 1, rank=r, reason="oom", step=oom_step - 1))
        events.append(_event("attempt_end", t + oom_step + 3, 1, exit_codes=[75, 75], outcome="cuda_oom",
                             last_step=oom_step - 1, log_tail=[]))
        pending = _event("decision_needed", t + oom_step + 4, 1, reason="oom", proposed_batch=12, deadline=CLOCK + 23)
        events.append(pending)
    if scenario in ("live", "finished", "crash"):
        events.append(_event("decision", t + 21, 1, by="user", action="restart", batch_size=12))
        events.append(_event("batch_change", t + 21, 2, **{"from": 16, "to": 12, "by": "oom"}))
        events.append(_event("attempt_start", t + 22, 2, batch_size=12, grad_accum=2, world_size=world,
                             effective_batch=48, resume_step=oom_step - 1))
        t += 20
        last = total if scenario == "finished" else steps
        for s in range(oom_step, last + 1):
            events.append(step_event(s, 12, 2))
            if s % 50 == 0:
                events.append(_event("eval", t + s, 2, step=s, loss=round(loss_at(s) + 0.15, 4), samples=200))
            if s % 10 == 0:
                events.append(_event("rank_stats", t + s, 2, rank=0, gpu_uuid=GPU_UUIDS[0],
                                     mem_peak_bytes=int(58.1 * GIB), mem_reserved_bytes=int(61.2 * GIB)))
        events.append(_event("checkpoint", t + 50, 2, step=50, path="checkpoints/step-00000050", seconds=2.9,
                             bytes=int(1.1 * GIB), reason="periodic"))
        if scenario == "finished":
            events.append(_event("run_end", t + last + 5, status="finished", reason="all samples trained",
                                 exit_code=0))
        if scenario == "crash":
            tail = ["[rank0] Traceback (most recent call last):", '[rank0]   File "loop.py", line 88, in train',
                    "[rank0] RuntimeError: NCCL watchdog timeout"]
            events.append(_event("attempt_end", t + last + 3, 2, exit_codes=[1, -9], outcome="crash",
                                 last_step=last, log_tail=tail))
            events.append(_event("run_end", t + last + 5, status="failed", reason="attempt 2 crashed", exit_code=3))
            (path / "attempt-2.log").write_text("\n".join(["[rank0] step 59", "[rank1] step 60", *tail,
                                                             "[rank1] killed by signal 9"]) + "\n")
    with EventLog(run.events) as log:
        for e in events:
            log.write(e)

    with open(run.telemetry, "w") as f:
        import json
        if not cpu:  # the moment of the OOM: GPU 1 nearly full
            f.write(json.dumps(gpu_sample(t0 + 10 + oom_step - 0.5, 0, 79.6, 100)) + "\n")
        for i in range(40):
            ts = CLOCK - 80 + 2 * i
            sample = cpu_sample(ts) if cpu else gpu_sample(ts, i, 40 + 21 * abs(math.sin(i / 6)), 60 + 38 * abs(math.sin(i / 4)))
            f.write(json.dumps(sample) + "\n")

    batch = 12 if scenario in ("live", "finished", "crash") else 16
    write_json_atomic(run.run_json, {
        "v": 1, "name": "alpaca-7b" if not cpu else "demo-cpu", "created": t0, "config": cfg, "status": status,
        "attempt": 2 if scenario in ("live", "finished", "crash") else 1,
        "batch_size": batch, "grad_accum": 2, "world_size": world, "effective_batch": batch * world * 2,
        "ladder": [16, 12, 8], "oom_rungs": [] if cpu else [16], "sample_budget": None, "request_seq": 0,
        "data_fingerprint": "demo", "supervisor_pid": 999999, "socket": str(path / "control.sock"),
        "pending_decision": pending if scenario == "oom" else None,
        "exit_code": {"finished": 0, "crash": 3}.get(scenario),
        "reason": {"finished": "all samples trained", "crash": "attempt 2 crashed"}.get(scenario),
    })
    return path


class HeldLock:
    """Holds a run's supervisor lock, so the run reads as live (not ``lost``) without a supervisor."""

    def __init__(self, path: Path):
        self.fd = acquire_lock(RunDir(Path(path)))

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the app as a test sees it ------------------------------------------------------------------

_SVG_TEXT = re.compile(r'<text class="[^"]*-r\d+" x="([\d.]+)" y="[\d.]+" textLength="[\d.]+" '
                       r'clip-path="url\(#[^)]*-line-(\d+)\)">([^<]*)</text>')


def screen_lines(app: App) -> list[str]:
    """What the terminal shows (dialogs over the dimmed dashboard included), as text lines, from
    the app's public ``export_screenshot``: rich's SVG, where one cell is 12.2 px wide and every
    glyph on these screens is one cell."""
    rows: dict[int, list[tuple[int, str]]] = {}
    for m in _SVG_TEXT.finditer(app.export_screenshot()):
        text = html.unescape(m.group(3)).replace("\xa0", " ")
        rows.setdefault(int(m.group(2)), []).append((round(float(m.group(1)) / 12.2), text))
    out = []
    for n in range(app.size.height):
        line = ""
        for col, text in sorted(rows.get(n, [])):
            line = line.ljust(col) + text
        out.append(line.rstrip())
    return out


def screen_text(app: App) -> str:
    return "\n".join(screen_lines(app))


async def until(pilot: Pilot, predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def polled(pilot: Pilot, screen_type: type | None = None, timeout: float = WAIT_S) -> None:
    """Until the first poll has been shown (and a screen of that type is on top)."""
    app = pilot.app
    await until(pilot, lambda: app.view is not None and (screen_type is None or isinstance(app.screen, screen_type)),
                timeout, f"the first poll and {screen_type.__name__}" if screen_type else "the first poll")
    await pilot.pause()


async def shows(pilot: Pilot, predicate: Callable[[str], bool], what: str, timeout: float = WAIT_S) -> None:
    """Until the screen's text satisfies ``predicate``."""
    await until(pilot, lambda: predicate(screen_text(pilot.app)), timeout, what)
