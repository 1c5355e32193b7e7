"""The plain-text client: the log of `sftui run --headless` (for nohup, tmux scripts, cron and
schedulers) and the text of `sftui status`.

One line per ``--log-every`` steps (time, step/total, epoch, loss, lr, the rung as
batch×GPUs×accum=effective, samples/s, ETA, memory per GPU, system memory), one readable
line per other event, and a warning when a GPU comes under memory pressure
(``RunState.pressure_warnings``). It is an observer of the supervisor running in the same process.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

from sftui.gpumemory import PRESSURE_STEPS
from sftui.runstate import RunState, params_text, rung_text
from sftui.units import fmt_duration, fmt_gib, fmt_num
from sftui.rundir import RunDir


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
        self._pressed: dict[str, int] = {}  # GPU UUID -> the step its memory-pressure warning was last printed at

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
        elif kind == "rank_stats":
            self._warn_pressure(event.get("t"))
        elif line is not None:
            self._print(line, event.get("t"))

    def _warn_pressure(self, t: float | None) -> None:
        """A GPU's memory-pressure warning when it starts, then once per PRESSURE_STEPS steps while it lasts."""
        warnings = self.state.pressure_warnings(self.telemetry(), keys=False)
        for gpu, text in warnings.items():
            said = self._pressed.get(gpu)
            if said is None or self.state.step - said >= PRESSURE_STEPS:
                self._pressed[gpu] = self.state.step
                self._print(f"warning: {text}", t)
        for gpu in set(self._pressed) - set(warnings):
            del self._pressed[gpu]

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


def status_json(s: RunState) -> dict[str, Any]:
    """``sftui status --json``: the run as scripts read it."""
    return {
        "run_dir": str(s.path), "name": s.name, "status": s.display_status, "attempt": s.attempt,
        "batch_size": s.batch_size, "grad_accum": s.grad_accum, "world_size": s.world_size,
        "effective_batch": s.effective_batch, "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch,
        "loss": s.loss, "samples_per_s": s.samples_per_s, "eta_s": s.eta_s, "ladder": s.ladder,
        "oom_rungs": s.oom_rungs, "pending_decision": s.pending_decision, "exit_code": s.exit_code,
        "reason": s.reason, "rows": s.rows, "skipped_rows": s.skipped_rows,
        "telemetry": s.telemetry if s.live else None,  # an ended run's last sample is not the machine now
    }


def status_lines(s: RunState) -> list[str]:
    """``sftui status``: a few lines, like ``nvitop --once``; live numbers only while it runs."""
    lines = [f"{s.name}  {s.display_status}  attempt {s.attempt}  batch {rung_text(s.batch_size, s.world_size, s.grad_accum)}"
             + ("  packed batches" if s.batches == "packed" else "")]
    eta = f"  ETA {fmt_duration(s.eta_s)}" if s.eta_s is not None else ""
    lines.append(f"  step {s.step}/{s.total_steps if s.total_steps is not None else '?'}  epoch {s.epoch_text}  "
                 f"loss {fmt_num(s.loss, '.4f')}  {fmt_num(s.samples_per_s, '.1f')} samples/s{eta}")
    if s.budget_note:
        lines.append(f"  {s.budget_note}")
    if s.lora and s.params:
        lines.append(f"  {params_text(s.params, s.lora)} trained")
    if s.skipped_rows:
        lines.append(f"  {s.skipped_rows:,} bad rows skipped (--skip-bad-rows), {s.rows:,} trained on")
    if s.telemetry and s.live:
        mem = memory_text(s.telemetry)
        if mem:
            lines.append(f"  {mem}")
        peaks = s.gpu_peaks()
        for g in s.telemetry.get("gpus") or []:
            peak = peaks.get(g.get("uuid") or "")
            lines.append(f"  GPU{g['index']} {g.get('name') or 'n/a'}{' *' if g.get('in_run') else ''}  "
                         f"util {fmt_num(g.get('util'), '.0f')}%  temp {fmt_num(g.get('temp'), '.0f')}C  "
                         f"power {fmt_num(g.get('power_w'), '.0f')} W" + (f"  {peak}" if peak else ""))
        if s.telemetry.get("gpu_error"):
            lines.append(f"  GPU: {s.telemetry['gpu_error']}")
    if s.pending_decision:
        lines.append(f"  waiting for a decision: sftui decide {s.path} restart [BATCH] | stop")
    if s.reason:
        lines.append(f"  {s.reason}")
    if s.display_status == "lost":
        lines.append(f"  its supervisor is gone (killed, or the machine restarted); continue with: "
                     f"sftui run --resume {s.path}")
    if s.log:
        lines.append(f"  last event: {s.log[-1].splitlines()[0]}")
    return lines
