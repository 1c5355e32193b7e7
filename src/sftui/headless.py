"""The plain log of `sftui run --headless`: for nohup, tmux scripts, cron and schedulers.

One line per ``--log-every`` steps (time, step/total, epoch, loss, lr, the rung as
batch×GPUs×accum=effective, samples/s, ETA, memory per GPU, system memory) and one readable
line per other event. It is an observer of the supervisor running in the same process.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

from sftui.runstate import RunState, fmt_duration, fmt_gib, fmt_num, rung_text
from sftui.rundir import RunDir

QUIET_KINDS = ("rank_stats",)


def _clock(t: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t if t is not None else time.time()))


def memory_text(sample: dict[str, Any] | None) -> str:
    """``GPU0 10.2/80.0 GiB  RAM 5.1/23.5 GiB`` from one telemetry sample ("n/a" where unknown)."""
    if not sample:
        return ""
    parts = []
    for g in sample.get("gpus") or []:
        if g.get("in_run") or not any(x.get("in_run") for x in sample["gpus"]):
            parts.append(f"GPU{g.get('index')} {fmt_gib(g.get('mem_used'))}/{fmt_gib(g.get('mem_total'))} GiB")
    sysmem = sample.get("system") or {}
    parts.append(f"RAM {fmt_gib(sysmem.get('mem_used'))}/{fmt_gib(sysmem.get('mem_total'))} GiB")
    return "  ".join(parts)


class HeadlessLog:
    def __init__(self, run: RunDir, telemetry: Callable[[], dict[str, Any] | None], out: TextIO | None = None):
        self.state = RunState(run.path)
        self.state.load_run_json()
        self.state.supervisor_alive = True  # it runs in this very process
        self.telemetry = telemetry
        self.out = out or sys.stdout
        self.log_every = int(self.state.config.get("log_every") or 10)
        self._last_phase: tuple[Any, int] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        line = self.state.apply(event)
        kind = event.get("kind")
        if kind == "step":
            step = self.state.step
            if step == 1 or step % self.log_every == 0 or step == self.state.total_steps:
                self._print(self.step_line(), event.get("t"))
        elif kind == "phase":
            # heartbeats: print a phase once, then its progress in quarters
            p = event.get("progress")
            key = (event.get("phase"), int(p * 4) if isinstance(p, (int, float)) else -1)
            if key != self._last_phase:
                self._last_phase = key
                self._print(line, event.get("t"))
        elif line is not None and kind not in QUIET_KINDS:
            self._print(line, event.get("t"))

    def step_line(self) -> str:
        s = self.state
        total = s.total_steps if s.total_steps is not None else "?"
        return (f"step {s.step}/{total}  epoch {s.epoch_text}  loss {fmt_num(s.loss, '.4f')}  "
                f"lr {fmt_num(s.lr, '.2e')}  batch {rung_text(s.batch_size, s.world_size, s.grad_accum)}  "
                f"{fmt_num(s.samples_per_s, '.1f')} samples/s  ETA {fmt_duration(s.eta_s)}  "
                f"{memory_text(self.telemetry())}").rstrip()

    def _print(self, text: str, t: float | None) -> None:
        stamp = _clock(t)
        try:
            for i, part in enumerate(text.split("\n")):
                self.out.write(f"{stamp} {part}\n" if i == 0 else f"{' ' * len(stamp)} {part}\n")
            self.out.flush()
        except BrokenPipeError:
            # The log's reader went away (`sftui run --headless | head`): training goes on, and
            # the run directory keeps every event. Later lines (and the exit's flush) go nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
