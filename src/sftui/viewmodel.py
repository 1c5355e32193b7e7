"""What every client of a run (the TUI, a browser view, ``status``) computes from its RunState.

``Poller.poll()`` reads the run directory (on the TUI's worker thread) and hands out a ``View``:
a private copy of the RunState plus the few file reads a screen needs (the attempt log's tail,
the latest checkpoint, the memory forecast refitted from the probe's and the run's points).
The ``View`` is never touched by the polling thread again, so a UI thread reads it without
locks. Everything here is plain data and words: no textual, no rich, no torch; how it looks
is the client's business.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

from sftui.config import RunConfig, grad_accum_for
from sftui.forecast import FORECAST_FILE, RunForecast, for_run, read_probe
from sftui.runstate import LIVE_STATUSES, RunState, RunWatcher, rung_text
from sftui.units import fmt_gib

TROUBLE = ("failed", "lost")  # display statuses where the worker's last lines say what went wrong


def fraction(part: Any, whole: Any) -> float | None:
    """``part / whole`` when both are numbers and ``whole`` is positive (a sample may hold nulls)."""
    if isinstance(part, (int, float)) and isinstance(whole, (int, float)) and whole > 0:
        return part / whole
    return None


@dataclass
class View:
    state: RunState                      # a copy: no other thread mutates it
    status: str                          # display status: run.json's, or "lost"
    version: int                         # bumps whenever anything shown may have changed
    attempt_tail: list[str] = field(default_factory=list)  # last lines of attempt-N.log (failed/lost runs)
    latest_ckpt: int | None = None       # step of checkpoints/latest (read while a decision is pending)
    forecast: RunForecast | None = None  # peak memory per rung: the probe's points + measured rungs
    last_decision: dict[str, Any] | None = None  # the `decision` event that answered the newest question

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def in_trouble(self) -> bool:
        """A failed or lost run: its last log lines matter more than its loss curve."""
        return self.status in TROUBLE

    @property
    def telemetry(self) -> dict[str, Any] | None:
        return self.state.telemetry

    def gpu_by_uuid(self, uuid: str | None, at: float | None = None) -> tuple[dict[str, Any] | None, float | None]:
        """The GPU with this UUID, and the sample's time: the last sample up to ``at`` (+1 s) when
        there is one, else the latest sample."""
        if not uuid:
            return None, None
        samples = list(self.state.telemetry_history) or ([self.state.telemetry] if self.state.telemetry else [])
        chosen: tuple[dict[str, Any] | None, float | None] = (None, None)
        for s in samples:
            t = s.get("t")
            if at is not None and chosen[0] is not None and isinstance(t, (int, float)) and t > at + 1.0:
                break
            for g in s.get("gpus") or []:
                if g.get("uuid") == uuid:
                    chosen = (g, t)
        return chosen

    def gpu_history(self) -> dict[Hashable, list[dict[str, Any]]]:
        """Each GPU's samples in the telemetry history, oldest first, by UUID (index without one)."""
        history: dict[Hashable, list[dict[str, Any]]] = {}
        for sample in self.state.telemetry_history:
            for g in sample.get("gpus") or []:
                history.setdefault(gpu_key(g), []).append(g)
        return history

    def run_gpu_total(self) -> int | None:
        """The smallest memory of the GPUs this run uses (what a forecast is compared with)."""
        tele = self.state.telemetry or {}
        totals = [g.get("mem_total") for g in tele.get("gpus") or [] if g.get("in_run") and g.get("mem_total")]
        return min(totals) if totals else None

    def run_gpu_budget(self) -> int | None:
        """What a rung may reserve per GPU when no probe measured free memory: the smallest
        card of the run, under its --mem-fraction."""
        total = self.run_gpu_total()
        fractions = self.state.config.get("mem_fraction") or []
        if total is None or not fractions:
            return total
        return int(total * min(fractions))

    def oom_holder(self) -> str | None:
        """The biggest holder of the GPU the last OOM happened on that was not a rank of that
        attempt, as the telemetry of that moment shows it (``RankPids.outsider_line``)."""
        oom = self.state.last_oom or {}
        g, _ = self.gpu_by_uuid(oom.get("gpu_uuid"), at=oom.get("t"))
        return self.state.ranks.outsider_line(g, (self.telemetry or {}).get("host"), oom.get("attempt"))

    def pressure_warnings(self) -> dict[str, str]:
        """``RunState.pressure_warnings`` on the latest telemetry, with the TUI's key."""
        return self.state.pressure_warnings(self.telemetry, keys=True)

    def resume_from(self) -> str:
        """Where a restart after the last out-of-memory error starts: its emergency checkpoint,
        else the latest checkpoint, else the beginning."""
        ck = (self.state.last_oom or {}).get("emergency_checkpoint")
        if ck is not None:
            return f"from step {ck} (emergency checkpoint)"
        if self.latest_ckpt is not None:
            return f"from step {self.latest_ckpt} (latest checkpoint)"
        return "from the start (no checkpoint yet)"


def gpu_key(g: dict[str, Any]) -> Hashable:
    """What identifies a GPU across samples: its UUID, its index where NVML gave none."""
    return g.get("uuid") or g.get("index")


def _copy_state(st: RunState) -> RunState:
    """A copy the UI may keep: the containers RunState.apply mutates are copied too."""
    snap = copy.copy(st)
    snap.config = dict(st.config)
    snap.ladder = list(st.ladder)
    snap.oom_rungs = list(st.oom_rungs)
    snap.loss_series = st.loss_series.copy()
    snap.eval_series = st.eval_series.copy()
    snap.restarts = list(st.restarts)
    snap.ranks = st.ranks.copy()
    snap.rank_memory = {r: dataclasses.replace(m, retries=list(m.retries)) for r, m in st.rank_memory.items()}
    snap.rung_peaks = dict(st.rung_peaks)
    snap.crash_tail = list(st.crash_tail)
    snap.log = deque(st.log, maxlen=st.log.maxlen)
    snap.telemetry_history = deque(st.telemetry_history, maxlen=st.telemetry_history.maxlen)
    return snap


class Poller:
    """Owns the RunWatcher; called on a worker thread, one poll at a time."""

    def __init__(self, run_dir: Path, history: bool = True):
        self.watcher = RunWatcher(Path(run_dir), history=history)
        self.version = 0
        self._sig: Hashable = None
        self._tail_key: Hashable = None
        self._tail: list[str] = []
        self._probe_key: Hashable = None
        self._probe: dict[str, Any] | None = None
        self._decision: dict[str, Any] | None = None

    def poll(self, force: bool = False) -> View | None:
        """Read what is new; a View when something visible changed (or ``force``), else None."""
        new = self.watcher.poll()
        if self.version == 0:  # replaying a long history: the tail reads in chunks; read them all now
            for _ in range(100):
                more = self.watcher.poll()
                if not more:
                    break
                new += more
        self._note_decisions(new)
        st = self.watcher.state
        sig = (st.status, st.attempt, st.batch_size, st.grad_accum, st.world_size, tuple(st.ladder),
               tuple(st.oom_rungs), repr(st.pending_decision), st.supervisor_alive, st.exit_code, st.name,
               (st.telemetry or {}).get("t"))
        if not new and sig == self._sig and not force:
            return None
        self._sig = sig
        self.version += 1
        snap = _copy_state(st)
        status = snap.display_status
        view = View(state=snap, status=status, version=self.version, last_decision=self._decision)
        view.forecast = for_run(self._probe_points(), snap.rung_peaks, snap.oom_rungs, view.run_gpu_budget())
        if view.in_trouble or snap.crash_tail:
            view.attempt_tail = self._attempt_tail(snap.attempt)
        if snap.pending_decision is not None:
            latest = self.watcher.run.latest_checkpoint()
            if latest is not None:
                try:
                    view.latest_ckpt = int(latest.name.rsplit("-", 1)[-1])
                except ValueError:
                    pass
        return view

    def _note_decisions(self, events: list[dict[str, Any]]) -> None:
        """Keep the `decision` event that answered the open question: a new question (or a new
        supervisor's run_start) has no answer yet."""
        for e in events:
            kind = e.get("kind")
            if kind == "decision":
                self._decision = e
            elif kind in ("decision_needed", "run_start"):
                self._decision = None

    def _probe_points(self) -> dict[str, Any] | None:
        """RUN_DIR/forecast.json (``--batch auto``'s probe), read again only when it changed."""
        try:
            key = os.stat(self.watcher.run.path / FORECAST_FILE).st_mtime_ns
        except OSError:
            return None
        if key != self._probe_key:
            self._probe_key = key
            self._probe = read_probe(self.watcher.run.path)
        return self._probe

    def _attempt_tail(self, attempt: int | None, n: int = 12) -> list[str]:
        if attempt is None:
            return []
        path = self.watcher.run.attempt_log(attempt)
        try:
            st = os.stat(path)
            key = (attempt, st.st_size, st.st_mtime_ns)
        except OSError:
            return []
        if key != self._tail_key:
            self._tail_key = key
            self._tail = [line.rstrip() for line in self.watcher.attempt_log_tail(n)]
        return self._tail


def wall_clock() -> Callable[[], float]:
    """The clock of a live screen (countdowns, "last seen"); tests hand the app a fixed one."""
    return time.time


def seen_at(t: Any, now: float) -> str:
    """When a telemetry sample was taken, local time: ``22:13:18``, with the date when not today."""
    if not isinstance(t, (int, float)):
        return "?"
    when = time.localtime(t)
    same_day = time.strftime("%Y%m%d", when) == time.strftime("%Y%m%d", time.localtime(now))
    return time.strftime("%H:%M:%S" if same_day else "%b %d %H:%M", when)


# --- a rung of the ladder, as the ladder, the confirmations and the OOM prompt describe it ----------


def rung_effective(view: View, batch: int) -> str:
    """``batch × GPUs × accum = effective`` at ``batch``: the accumulation the supervisor would
    give that rung (config.grad_accum_for: fixed, or recomputed toward --effective-batch)."""
    s = view.state
    accum = grad_accum_for(RunConfig.from_dict(s.config), batch)
    return rung_text(batch, s.world_size or 1, accum)


@dataclass(frozen=True)
class RungMemory:
    """What is known of a rung's peak memory per GPU, in words.

    ``known``: ``oom`` (it ran out of memory before), ``measured``, ``forecast`` or ``unknown``;
    ``text`` the line that says it; for a forecast against a known budget, ``fit`` says whether
    it is predicted to fit and ``fits`` is that answer."""

    known: str
    text: str
    fit: str | None = None
    fits: bool | None = None


def rung_memory(view: View, batch: int) -> RungMemory:
    s = view.state
    total = view.run_gpu_total()
    of = f" of {fmt_gib(total)} GiB" if total else ""
    if batch in s.oom_rungs:
        return RungMemory("oom", f"batch {batch} ran out of memory before")
    peak = s.rung_peaks.get(batch)
    if peak is not None:
        return RungMemory("measured", f"peak memory at batch {batch}: {fmt_gib(peak)} GiB{of} (measured)")
    rf = view.forecast
    if rf is not None and rf.forecast is not None:
        fc = rf.forecast
        text = (f"peak memory at batch {batch}: ~{fmt_gib(fc.predict(batch))} GiB "
                f"(±{fmt_gib(fc.band(batch))}, forecast){of}")
        fits = rf.fits(batch)
        if fits is None or rf.budget is None:
            return RungMemory("forecast", text)
        limit = f"{rf.target:g} × {fmt_gib(rf.budget)} GiB"
        return RungMemory("forecast", text, f"fits under {limit}" if fits else f"predicted NOT to fit under {limit}",
                          fits)
    has = f", GPU has {fmt_gib(total)} GiB" if total else ""
    return RungMemory("unknown", f"peak memory at batch {batch}: ? (not measured yet{has})")
