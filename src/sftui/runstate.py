"""One run as its readers see it: run.json, events.jsonl and telemetry.jsonl folded into a RunState.

The headless log, ``status``, ``runs`` and the TUI all read a run through this module, so they
agree on what they show (status, rung, step, ETA, readable event lines). No textual, no torch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftui.config import count_steps, next_rung
from sftui.gpumemory import PRESSURE_STEPS, Holder, Pressure, RankMemory, RankPids, peak_text
from sftui.rundir import EventTails, JsonlTail, RunDir, lock_is_held, tail_lines
from sftui.runfile import RunFile
from sftui.series import RESTART_KINDS, Restart, Series
from sftui.units import fmt_count, fmt_gib, fmt_num

LIVE_STATUSES = ("starting", "running", "waiting")
OUTCOME_WORDS = {"cuda_oom": "out of memory", "host_oom": "the host ran out of memory", "crash": "crash",
                 "hang": "hang", "stopped": "stopped", "switch": "batch switch", "finished": "finished"}


def params_text(params: tuple[int, int] | None, lora: dict[str, Any] | None) -> str | None:
    """What trains: "LoRA r16 α32: 40.4M of 7.6B params", or "3.3M params" for a full fine-tune."""
    if params is None or not all(isinstance(n, int) for n in params):
        return None
    trained, total = params
    if not lora:
        return f"{fmt_count(total)} params"
    return f"LoRA r{lora.get('r')} α{lora.get('alpha', 0):g}: {fmt_count(trained)} of {fmt_count(total)} params"


def rung_text(batch: int | None, world: int | None, accum: int | None) -> str:
    """batch × GPUs × accum = effective batch: the form every screen and log uses."""
    if batch is None:
        return "n/a"
    world = world or 1
    accum = accum or 1
    return f"{batch}×{world}×{accum}={batch * world * accum}"


def describe_event(e: dict[str, Any]) -> str | None:
    """A readable one-line form of an event, or None for the ones shown otherwise (step, rank_stats)."""
    k = e.get("kind")
    g = e.get
    if k == "run_start":
        cfg = g("config") or {}
        return f"run started: model {cfg.get('model')}, data {cfg.get('data')}"
    if k == "phase":
        p = g("progress")
        return f"phase {g('phase')}" + (f" {p * 100:.0f}%" if isinstance(p, (int, float)) else "")
    if k == "attempt_start":
        resume = g("resume_step")
        return (f"attempt {g('attempt')} at batch {rung_text(g('batch_size'), g('world_size'), g('grad_accum'))}, "
                + (f"resuming after step {resume}" if resume is not None else "from scratch")
                + (" (its ranks were started ahead)" if g("warm") else ""))
    if k == "rank_start":
        gpu = g("gpu_uuid")
        return f"rank {g('rank')} started (pid {g('pid')} on {g('host')}" + (f", {gpu})" if gpu else ", CPU)")
    if k == "data":
        skipped, target = g("skipped"), g("target_samples")
        return (f"data: {g('rows') or 0:,} rows" + (f", {skipped:,} bad rows skipped (--skip-bad-rows)" if skipped else "")
                + (f", {g('eval_rows'):,} eval rows" if g("eval_rows") else "")
                + (f"; {target:,} samples to train" if target else "")
                + (f"; {g('chat_format')}" if g("chat_format") else "")
                + (f"; {g('batches')} batches" if g("batches") else ""))
    if k == "model":
        said = params_text((g("trainable_params"), g("total_params")), g("lora"))
        return f"model: {said} trained" if said else "model loaded"
    if k == "checkpoint":
        return f"checkpoint step {g('step')} ({g('reason')}): {fmt_gib(g('bytes'), 2)} GiB in {fmt_num(g('seconds'), '.1f')} s"
    if k == "eval":
        return f"eval at step {g('step')}: loss {fmt_num(g('loss'), '.4f')} over {g('samples')} samples"
    if k == "oom":
        ck = g("emergency_checkpoint")
        return (f"OUT OF MEMORY at step {g('step')}, batch {g('batch_size')}, rank {g('rank')} ({g('where')})"
                + (" [injected]" if g("injected") else "")
                + (f"; emergency checkpoint at step {ck}" if ck is not None else "; no emergency checkpoint"))
    if k == "worker_exit":
        step = g("step")
        return f"rank {g('rank')} exited: {g('reason')}" + (f" after step {step}" if step is not None else "")
    if k == "decision_needed":
        prop = g("proposed_batch")
        deadline = g("deadline")
        when = f" (auto at {time.strftime('%H:%M:%S', time.localtime(deadline))})" if deadline else ""
        return "decision needed after OOM: " + (f"restart at batch {prop}?" if prop else "bottom of the ladder") + when
    if k == "decision":
        return f"decision by {g('by')}: {g('action')}" + (f" at batch {g('batch_size')}" if g("batch_size") else "")
    if k == "batch_change":
        src = g("from")
        return f"batch {src if src is not None else '(auto)'} → {g('to')} (by {g('by')})"
    if k == "attempt_end":
        outcome = OUTCOME_WORDS.get(g("outcome"), g("outcome"))
        last = g("last_step")
        text = f"attempt {g('attempt')} ended: {outcome}" + (f" after step {last}" if last is not None else " before its first step")
        tail = g("log_tail") or []
        return text + ("".join("\n    " + line for line in tail) if tail else "")
    if k == "log":
        return f"{g('level')}: {g('message')}"
    if k == "run_end":
        return f"run {g('status')}: {g('reason')} (exit {g('exit_code')})"
    return None


# --- the state ----------------------------------------------------------------------------------


@dataclass
class RunState:
    path: Path
    name: str = ""
    status: str = "unknown"
    config: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    world_size: int | None = None
    ladder: list[int] = field(default_factory=list)
    oom_rungs: list[int] = field(default_factory=list)
    pending_decision: dict[str, Any] | None = None
    exit_code: int | None = None
    reason: str | None = None
    supervisor_alive: bool = False
    sample_budget: int | None = None  # --max-steps as samples (run.json), None when epochs decide
    # from the data event: the rows the run trains on, those --skip-bad-rows left out, the samples of the run
    rows: int | None = None
    skipped_rows: int | None = None
    target_samples: int | None = None
    chat_format: str | None = None  # how rows became text, in words
    batches: str | None = None  # "packed" or "padded": what the worker chose (--packing's default is its)
    params: tuple[int, int] | None = None  # from the model event: (trained, all) parameters
    lora: dict[str, Any] | None = None  # and its LoRA settings (run.json's lora)
    # from step events
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    epochs: float | None = None  # the run's total in epochs: --epochs, or what --max-steps' samples make
    samples_seen: int = 0
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss_series: Series = field(default_factory=Series)
    eval_series: Series = field(default_factory=Series)
    restarts: list[Restart] = field(default_factory=list)  # where each attempt took over from the one before
    phase: str | None = None
    phase_progress: float | None = None
    last_oom: dict[str, Any] | None = None
    ranks: RankPids = field(default_factory=RankPids)  # pid -> rank and attempt, from rank_start
    rank_memory: dict[int, RankMemory] = field(default_factory=dict)  # rank -> its rank_stats, current attempt
    rung_peaks: dict[int, int] = field(default_factory=dict)  # batch -> max peak reserved bytes seen
    crash_tail: list[str] = field(default_factory=list)
    last_event: dict[str, Any] | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    telemetry: dict[str, Any] | None = None
    telemetry_history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=120))
    _phase_line: bool = False  # the newest log line is a phase heartbeat's
    _attempts_seen: int = 0  # attempt_start events folded in: any after the first is a restart
    _attempt_running: bool = False  # between an attempt_start and its attempt_end
    _last_outcome: str | None = None  # how the attempt before the next attempt_start ended

    @property
    def losses(self) -> list[tuple[int, float]]:
        """The training loss of the whole run, downsampled (Series)."""
        return self.loss_series.points

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return self.eval_series.points

    @property
    def display_status(self) -> str:
        """run.json's status, except ``lost`` when it says live but no supervisor holds the lock."""
        if self.status in LIVE_STATUSES and not self.supervisor_alive:
            return "lost"
        return self.status

    @property
    def live(self) -> bool:
        """A supervisor runs the run now: live numbers (speed, ETA, memory) mean something."""
        return self.display_status in LIVE_STATUSES

    @property
    def epoch_text(self) -> str:
        """``1.25/2``: the epoch so far over the run's total, in one precision, never past it."""
        total = self.epochs
        if not total:
            return f"{self.epoch:.2f}"
        digits = 2 if total >= 1 else 3
        shown = f"{total}" if float(total).is_integer() else f"{total:.{digits}f}"
        return f"{min(self.epoch, total):.{digits}f}/{shown}"

    @property
    def budget_note(self) -> str | None:
        """Why the total is not ``--max-steps``: after a batch change the sample budget rules."""
        max_steps = self.config.get("max_steps")
        if not max_steps or not self.sample_budget or self.total_steps in (None, max_steps):
            return None
        return (f"--max-steps {max_steps} = {self.sample_budget:,} samples; after the batch change "
                f"that is {self.total_steps} steps")

    @property
    def effective_batch(self) -> int | None:
        if self.batch_size is None:
            return None
        return self.batch_size * (self.world_size or 1) * (self.grad_accum or 1)

    @property
    def eta_s(self) -> float | None:
        eff = self.effective_batch
        if not self.samples_per_s or not eff or self.total_steps is None or self.display_status != "running":
            return None
        return max(0, self.total_steps - self.step) * eff / self.samples_per_s

    def load_run_json(self) -> None:
        try:
            rf = RunFile.read(RunDir(self.path))
        except (OSError, ValueError):
            return
        self.name = rf.name or self.path.name
        self.status, self.config, self.attempt = rf.status, rf.config, rf.attempt
        self.batch_size, self.grad_accum, self.world_size = rf.batch_size, rf.grad_accum, rf.world_size
        self.ladder, self.oom_rungs = list(rf.ladder), list(rf.oom_rungs)
        self.pending_decision, self.exit_code, self.reason = rf.pending_decision, rf.exit_code, rf.reason
        self.sample_budget = rf.sample_budget

    def _recount_steps(self) -> None:
        """The run's total at the rung now on, before its first step event says it: a switch
        changes how many steps the remaining samples take."""
        eff = self.effective_batch
        if eff and self.rows and self.target_samples and self.total_steps is not None:
            self.total_steps = self.step + count_steps(self.samples_seen, eff, self.rows, self.target_samples)

    def apply(self, e: dict[str, Any]) -> str | None:
        """Fold one event in; return its readable line (None for step/rank_stats)."""
        k = e.get("kind")
        self.last_event = e
        if k == "step":
            self.step = e.get("step", self.step)
            for name in ("total_steps", "epoch", "epochs", "samples_seen", "loss", "lr", "grad_norm",
                         "samples_per_s", "tokens_per_s", "mfu", "batch_size", "grad_accum"):
                if name in e:
                    setattr(self, name, e[name])
            if isinstance(e.get("loss"), (int, float)):
                self.loss_series.add(self.step, float(e["loss"]))
            self.phase = "training"
            self.phase_progress = None
            return None
        if k == "rank_stats":
            self._rank_stats(e)
            return None
        if k == "run_start":
            # A run's events hold one run_start … run_end segment per supervisor (a resume, a
            # supervisor lost and restarted): what counts is the newest.
            self.status, self.exit_code, self.reason, self.pending_decision = "running", None, None, None
        elif k == "phase":
            repeat = self.phase == e.get("phase") and self._phase_line
            self.phase = e.get("phase")
            self.phase_progress = e.get("progress")
            line = describe_event(e)
            if repeat and self.log:
                self.log[-1] = line  # a heartbeat updates its phase's line rather than adding one
            elif line is not None:
                self.log.append(line)
            self._phase_line = True
            return line
        elif k == "attempt_start":
            self.attempt = e.get("attempt", self.attempt)
            self.batch_size = e.get("batch_size", self.batch_size)
            self.grad_accum = e.get("grad_accum", self.grad_accum)
            self.world_size = e.get("world_size", self.world_size)
            resume = e.get("resume_step")
            if isinstance(resume, int):
                self.step = resume
            start = resume if isinstance(resume, int) else 0  # the attempt trains every step after it again
            self.loss_series.drop_after(start)
            self.eval_series.drop_after(start)
            if self._attempts_seen:
                self.restarts.append(Restart(start, RESTART_KINDS.get(self._last_outcome or "", "restart")))
            self._attempts_seen += 1
            self._attempt_running = True
            self._last_outcome = None
            self.rank_memory = {}
            self.crash_tail = []
            self._recount_steps()
        elif k == "data":
            self.rows, self.skipped_rows = e.get("rows"), e.get("skipped")
            self.target_samples = e.get("target_samples")
            self.chat_format = e.get("chat_format")
            self.batches = e.get("batches")
        elif k == "model" and isinstance(e.get("trainable_params"), int) and isinstance(e.get("total_params"), int):
            self.params, self.lora = (e["trainable_params"], e["total_params"]), e.get("lora")
        elif k == "rank_start":
            self.ranks.see(e)
        elif k == "eval" and isinstance(e.get("loss"), (int, float)):
            self.eval_series.add(e.get("step", self.step), float(e["loss"]))
        elif k == "oom":
            self.last_oom = e
            if e.get("batch_size") and e["batch_size"] not in self.oom_rungs:
                self.oom_rungs.append(e["batch_size"])
        elif k == "decision_needed":
            self.pending_decision, self.status = e, "waiting"
        elif k == "decision":
            self.pending_decision, self.status = None, "running"
        elif k == "batch_change":
            self.batch_size = e.get("to", self.batch_size)
        elif k == "attempt_end":
            self._last_outcome = e.get("outcome")
            self._attempt_running = False
            if isinstance(e.get("last_step"), int):
                self.step = e["last_step"]
            if e.get("outcome") in ("crash", "hang", "host_oom"):
                self.crash_tail = list(e.get("log_tail") or [])
        elif k == "run_end":
            self.status = e.get("status", self.status)
            self.exit_code = e.get("exit_code")
            self.reason = e.get("reason")
        self._phase_line = False
        line = describe_event(e)
        if line is not None:
            self.log.append(line)
        return line

    def apply_telemetry(self, sample: dict[str, Any]) -> None:
        self.telemetry = sample
        self.telemetry_history.append(sample)

    def _rank_stats(self, e: dict[str, Any]) -> None:
        mem = self.rank_memory.setdefault(e.get("rank", 0), RankMemory())
        mem.gpu_uuid = e.get("gpu_uuid") or mem.gpu_uuid
        alloc, reserved = e.get("mem_peak_bytes"), e.get("mem_reserved_bytes")
        mem.alloc_peak = alloc if isinstance(alloc, int) else mem.alloc_peak
        mem.reserved_peak = reserved if isinstance(reserved, int) else mem.reserved_peak
        # alloc_retries counts since the rank's report before (trainer/loop.py MemoryReport)
        if isinstance(e.get("alloc_retries"), int):
            mem.retries.append((e["step"] if isinstance(e.get("step"), int) else self.step, e["alloc_retries"]))
        mem.retries = [(s, n) for s, n in mem.retries if s > self.step - PRESSURE_STEPS]
        peak = mem.reserved_peak or mem.alloc_peak
        if peak is not None and self.batch_size:
            self.rung_peaks[self.batch_size] = max(peak, self.rung_peaks.get(self.batch_size, 0))

    def gpu_peaks(self) -> dict[str, str]:
        """GPU UUID -> its rank's peaks in words (``peak_text``), for the current attempt."""
        out = {}
        for mem in self.rank_memory.values():
            text = peak_text(mem.alloc_peak, mem.reserved_peak)
            if mem.gpu_uuid and text:
                out[mem.gpu_uuid] = text
        return out

    def holders(self, gpu: dict[str, Any], sample: dict[str, Any] | None = None) -> list[Holder]:
        """Who holds memory on ``gpu`` (a GPU of ``sample``, the latest telemetry by default)."""
        return self.ranks.holders(gpu, (sample or self.telemetry or {}).get("host"), self.attempt)

    def memory_pressure(self, sample: dict[str, Any] | None) -> list[Pressure]:
        """The GPUs of the running attempt under memory pressure (``Pressure``), in the sample's
        order; ranks sharing a GPU count together. None between attempts: after an OOM the
        prompt speaks."""
        if sample is None or not self.live or not self._attempt_running:
            return []
        fractions = self.config.get("mem_fraction") or []
        by_gpu: dict[str, list[tuple[int, RankMemory]]] = {}
        for rank, mem in self.rank_memory.items():
            if mem.gpu_uuid:
                by_gpu.setdefault(mem.gpu_uuid, []).append((rank, mem))
        out = []
        for g in sample.get("gpus") or []:
            ranks = by_gpu.get(g.get("uuid") or "")
            if not ranks:
                continue
            retries = sum(n for _, mem in ranks for _, n in mem.retries)
            peaks = [mem.reserved_peak for _, mem in ranks if mem.reserved_peak is not None]
            total = g.get("mem_total")
            outsiders = sum(h.mem or 0 for h in self.holders(g, sample) if h.outsider)
            room = None
            if isinstance(total, int):
                room = total - outsiders
                if fractions:
                    room = min(room, int(total * sum(fractions[r] if len(fractions) > 1 else fractions[0]
                                                     for r, _ in ranks)))
            p = Pressure(f"GPU {g.get('index')}", g["uuid"], retries, sum(peaks) if peaks else None, room, total,
                         outsiders)
            if p.retries or p.tight:
                out.append(p)
        return out

    def pressure_warnings(self, sample: dict[str, Any] | None, keys: bool) -> dict[str, str]:
        """GPU UUID -> the warning of ``memory_pressure`` in words, with what to do: ``keys`` for
        the TUI (``-``), else the command line's ``sftui set-batch``."""
        pressed = self.memory_pressure(sample)
        if not pressed:
            return {}
        lower = next_rung(self.ladder, self.batch_size) if self.batch_size else None
        if lower is None:
            remedy = "the bottom of the ladder: lower --max-len or use --gradient-checkpointing"
        elif keys:
            remedy = f"`-` drops a rung (batch {lower})"
        else:
            remedy = f"`sftui set-batch {self.path} {lower}` drops a rung"
        return {p.uuid: p.text(remedy) for p in pressed}


class RunWatcher:
    """Keeps a RunState up to date by tailing the run directory; ``poll()`` is cheap when idle."""

    def __init__(self, path: Path, history: bool = True):
        self.run = RunDir(Path(path))
        self.state = RunState(self.run.path)
        # every machine's event file: history=False starts at the end, a live view with no replay
        self._events = EventTails(self.run, from_end=not history)
        self._telemetry = JsonlTail(self.run.telemetry)
        self._run_json_mtime: float | None = None
        if not history:
            self._telemetry.offset = _size(self.run.telemetry)

    def poll(self) -> list[dict[str, Any]]:
        """Read what is new; return the new events (already applied)."""
        # The lock before run.json: a supervisor writes its run's end there and then lets go of
        # the lock, so the other order could read a run that just ended as "lost".
        alive = lock_is_held(self.run)
        self._reload_run_json()
        new = self._events.read()
        for e in new:
            self.state.apply(e)
        for sample in self._telemetry.read():
            self.state.apply_telemetry(sample)
        self.state.supervisor_alive = alive
        return new

    def _reload_run_json(self) -> None:
        try:
            mtime = os.stat(self.run.run_json).st_mtime_ns
        except OSError:
            return
        if mtime != self._run_json_mtime:
            self._run_json_mtime = mtime
            self.state.load_run_json()

    def attempt_log_tail(self, n: int = 20) -> list[str]:
        if self.state.attempt is None:
            return []
        return tail_lines(self.run.attempt_log(self.state.attempt), n)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def find_runs(root: Path) -> list[Path]:
    """Run directories directly under ``root``, oldest first."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return sorted(runs, key=lambda p: (p / "run.json").stat().st_ctime)


def newest_run(root: Path) -> Path | None:
    runs = find_runs(root)
    return runs[-1] if runs else None
