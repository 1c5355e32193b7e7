"""What one poll hands the UI: a private copy of the RunState plus the few file reads it needs.

``Poller.poll()`` runs on a worker thread (it reads files); the ``View`` it returns is never
touched by that thread again, so widgets on the UI thread read it without locks. ``Panel`` is
the base of the dashboard's panels: it re-renders only when the part of the view it shows
changed, so an idle screen costs almost nothing and nothing flickers.
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget

from sftui.forecast import FORECAST_FILE, RunForecast, for_run, read_probe
from sftui.runstate import LIVE_STATUSES, RunState, RunWatcher

ENDED = ("finished", "failed", "stopped")


@dataclass
class View:
    state: RunState                      # a copy: no other thread mutates it
    status: str                          # display status: run.json's, or "lost"
    version: int                         # bumps whenever anything shown may have changed
    attempt_tail: list[str] = field(default_factory=list)  # last lines of attempt-N.log (failed/lost runs)
    latest_ckpt: int | None = None       # step of checkpoints/latest (read while a decision is pending)
    forecast: RunForecast | None = None  # peak memory per rung: the probe's points + measured rungs

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

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


def _copy_state(st: RunState) -> RunState:
    snap = copy.copy(st)
    snap.config = dict(st.config)
    snap.ladder = list(st.ladder)
    snap.oom_rungs = list(st.oom_rungs)
    snap.losses = list(st.losses)
    snap.eval_losses = list(st.eval_losses)
    snap.mem_peak = dict(st.mem_peak)
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

    def poll(self, force: bool = False) -> View | None:
        """Read what is new; a View when something visible changed (or ``force``), else None."""
        new = self.watcher.poll()
        if self.version == 0:  # replaying a long history: the tail reads in chunks; read them all now
            for _ in range(100):
                more = self.watcher.poll()
                if not more:
                    break
                new += more
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
        view = View(state=snap, status=status, version=self.version)
        view.forecast = for_run(self._probe_points(), snap.rung_peaks, snap.oom_rungs, view.run_gpu_budget())
        if status in ("failed", "lost") or snap.crash_tail:
            view.attempt_tail = self._attempt_tail(snap.attempt)
        if snap.pending_decision is not None:
            latest = self.watcher.run.latest_checkpoint()
            if latest is not None:
                try:
                    view.latest_ckpt = int(latest.name.rsplit("-", 1)[-1])
                except ValueError:
                    pass
        return view

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


class Panel(Widget):
    """A dashboard panel: ``show(view)`` re-renders only when ``key(view)`` changed."""

    DEFAULT_CSS = """
    Panel { height: auto; }
    """

    def __init__(self, title: str | None = None, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        if title:
            self.border_title = title
        self.view: View | None = None
        self._key: Hashable = object()
        self._lines = 1

    # subclasses implement these
    def key(self, view: View) -> Hashable:
        return view.version

    def wanted_lines(self, view: View | None) -> int:
        return 1

    def build(self, view: View, width: int, height: int) -> Text:
        raise NotImplementedError

    def placeholder(self) -> Text:
        return Text("reading the run…", "dim")

    # machinery
    def show(self, view: View) -> None:
        key = self.key(view)
        self.view = view
        if key == self._key:
            return
        self._key = key
        lines = self.wanted_lines(view)
        relayout = lines != self._lines
        self._lines = lines
        self.refresh(layout=relayout)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self.wanted_lines(self.view)

    def render(self) -> Text:
        if self.view is None:
            return self.placeholder()
        size = self.content_size
        return self.build(self.view, max(1, size.width), max(1, size.height))


def wall_clock() -> Callable[[], float]:
    return time.time


def seen_at(t: Any, now: float) -> str:
    """When a telemetry sample was taken, local time: ``22:13:18``, with the date when not today."""
    if not isinstance(t, (int, float)):
        return "?"
    when = time.localtime(t)
    same_day = time.strftime("%Y%m%d", when) == time.strftime("%Y%m%d", time.localtime(now))
    return time.strftime("%H:%M:%S" if same_day else "%b %d %H:%M", when)


# --- rung helpers shared by the ladder, the confirmations and the OOM prompt ----------------------


def accum_for(view: View, batch: int) -> int:
    """Accumulation at ``batch``: fixed, or recomputed toward --effective-batch (config.grad_accum_for)."""
    s = view.state
    target = s.config.get("effective_batch")
    world = s.world_size or 1
    if target:
        return max(1, round(target / (batch * world)))
    return s.grad_accum or s.config.get("grad_accum") or 1


def rung_effective(view: View, batch: int) -> str:
    from sftui.runstate import rung_text

    return rung_text(batch, view.state.world_size or 1, accum_for(view, batch))


def forecast_text(view: View, batch: int) -> Text:
    """What is known of a rung's peak memory: measured, ran out of memory, forecast, or "?"."""
    from sftui.runstate import fmt_gib

    s = view.state
    total = view.run_gpu_total()
    of = f" of {fmt_gib(total)} GiB" if total else ""
    if batch in s.oom_rungs:
        return Text(f"batch {batch} ran out of memory before", "bold red")
    peak = s.rung_peaks.get(batch)
    if peak is not None:
        return Text(f"peak memory at batch {batch}: {fmt_gib(peak)} GiB{of} (measured)")
    rf = view.forecast
    if rf is not None and rf.forecast is not None:
        fc = rf.forecast
        text = Text(f"peak memory at batch {batch}: ~{fmt_gib(fc.predict(batch))} GiB "
                    f"(±{fmt_gib(fc.band(batch))}, forecast){of}")
        fits = rf.fits(batch)
        if fits is not None and rf.budget is not None:
            limit = f"{rf.target:g} × {fmt_gib(rf.budget)} GiB"
            text.append(f"\nfits under {limit}" if fits else f"\npredicted NOT to fit under {limit}",
                        "green" if fits else "bold yellow")
        return text
    return Text(f"peak memory at batch {batch}: ? (not measured yet{', GPU has ' + fmt_gib(total) + ' GiB' if total else ''})",
                "dim")
