"""TensorBoard event files from a run's events, for ``--report-to tensorboard`` (live: an observer
of the supervisor) and ``sftui export --tensorboard DIR`` (afterwards). Both go through one
``Converter``, so they write the same records.

Events become ``Record``s here without TensorBoard; ``EventFile`` writes them with TensorBoard's
own record framing and protobufs (``RecordWriter``, ``event_pb2``), imported when the first file
is opened (half a second, numpy included), never at the import of this module. Not its
``EventFileWriter``: that goes through ``tensorboard.compat.tf``, which imports TensorFlow wherever
TensorFlow is installed: seconds and hundreds of MB in the supervisor.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from sftui.config import RunConfig
from sftui.rundir import EventTails, RunDir, write_atomic
from sftui.runstate import RunState, describe_event
from sftui.units import GIB

LIVE_SUBDIR = "tensorboard"  # RUN_DIR/tensorboard/: where --report-to tensorboard writes
# step event field -> scalar tag (the HF Trainer's names where it has one)
STEP_SCALARS = {
    "loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
    "samples_per_s": "train/samples_per_second", "tokens_per_s": "train/tokens_per_second", "mfu": "train/mfu",
    "batch_size": "train/batch_size", "epoch": "train/epoch",
}
MEMORY_SCALARS = {"mem_peak_bytes": "allocated_gib", "mem_reserved_bytes": "reserved_gib"}  # rank_stats, per rank
TEXT_KINDS = ("oom", "decision", "batch_change")  # events/<kind>: the event's line as the log shows it


@dataclass(frozen=True)
class Record:
    """One value of one tag at one global step (the training step): a scalar or a text."""

    tag: str
    step: int
    wall_time: float
    value: float | str


class Converter:
    """A run's events, in the order they were written, turned into records.

    The step of a record: a ``step`` or ``eval`` event's own (``oom`` too: the step that failed);
    a decision's or a batch change's, the run's step then, as every reader folds it (RunState).
    ``rank_stats`` carry their step; those of runs from before they did are placed by the rule
    they were written by: each rank reports at every multiple of ``--log-every`` it completes,
    so its n-th report of an attempt is the n-th multiple after the attempt's resume step
    (counted per rank: ranks other than 0 may report before rank 0's step event).
    """

    def __init__(self) -> None:
        self.state = RunState(Path("."))
        self._log_every = RunConfig().log_every
        self._first: dict[Any, tuple[int, int]] = {}  # attempt -> (resume step, --log-every)
        self._reported: dict[tuple[Any, Any], int] = {}  # (attempt, rank) -> step of its last report

    def records(self, e: dict[str, Any]) -> list[Record]:
        self.state.apply(e)
        kind, t = e.get("kind"), _time(e)
        if kind == "run_start":
            self._log_every = RunConfig.from_dict(e.get("config") or {}).log_every
        elif kind == "attempt_start":
            self._first[e.get("attempt")] = (e.get("resume_step") or 0, self._log_every)
        elif kind == "step" and isinstance(e.get("step"), int):
            return [Record(tag, e["step"], t, float(e[name])) for name, tag in STEP_SCALARS.items()
                    if _number(e.get(name))]
        elif kind == "eval" and isinstance(e.get("step"), int) and _number(e.get("loss")):
            return [Record("eval/loss", e["step"], t, float(e["loss"]))]
        elif kind == "rank_stats":
            return self._memory(e, t)
        elif kind in TEXT_KINDS:
            step = e.get("step") if kind == "oom" and isinstance(e.get("step"), int) else self.state.step
            return [Record(f"events/{kind}", step, t, describe_event(e) or kind)]
        return []

    def _memory(self, e: dict[str, Any], t: float) -> list[Record]:
        attempt, rank = e.get("attempt"), e.get("rank", 0)
        resume, every = self._first.get(attempt, (0, self._log_every))
        step = e["step"] if isinstance(e.get("step"), int) else \
            (self._reported.get((attempt, rank), resume) // every + 1) * every
        self._reported[(attempt, rank)] = step
        return [Record(f"memory/rank{rank}/{tag}", step, t, e[name] / GIB) for name, tag in MEMORY_SCALARS.items()
                if _number(e.get(name))]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _time(e: dict[str, Any]) -> float:
    return float(e["t"]) if _number(e.get("t")) else 0.0


class EventFile:
    """Records into one TensorBoard event file (TFRecord framing), each written at once."""

    def __init__(self, stream: BinaryIO):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary, self._text = event_pb2.Event, summary_pb2.Summary, text_pb
        self._out = RecordWriter(stream)
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, r: Record) -> None:
        if isinstance(r.value, str):
            summary = self._text(r.tag, r.value)
        else:
            summary = self._summary(value=[self._summary.Value(tag=r.tag, simple_value=r.value)])
        self._write(self._event(wall_time=r.wall_time, step=r.step, summary=summary))

    def _write(self, event: Any) -> None:
        self._out.write(event.SerializeToString())


def file_name(stamp: float, writer: str) -> str:
    """TensorBoard's own pattern; files are read in name order, so the time comes first."""
    return f"events.out.tfevents.{int(stamp):010d}.{socket.gethostname()}.{writer}"


class LiveReport:
    """The supervisor's observer for ``--report-to tensorboard``: the records of each event,
    appended to this supervisor's own file under ``RUN_DIR/tensorboard/`` and on disk at once. A
    resumed run (another supervisor) adds a file; its steps go on from the checkpoint's. Where
    they go is said at the start; a write that fails is said once and ends the reporting, never
    the run."""

    def __init__(self, run: RunDir, log: Callable[[str, str], None]):
        self.logdir = run.path / LIVE_SUBDIR
        self.log = log  # (level, message): a ``log`` event of the run
        self.converter = Converter()
        self._stream: BinaryIO | None = None
        self._file: EventFile | None = None
        self._failed = False

    def __call__(self, e: dict[str, Any]) -> None:
        if self._failed:
            return
        if e.get("kind") == "run_start":
            self.log("info", f"TensorBoard event files go to {self.logdir} (tensorboard --logdir {self.logdir})")
        try:
            for record in self.converter.records(e):
                self._open().add(record)
        except (OSError, ImportError) as err:
            self._failed = True
            self.close()
            self.log("warning", f"--report-to tensorboard: {err}; no more TensorBoard records are written "
                      f"(sftui export {self.logdir.parent} --tensorboard DIR writes them all afterwards)")
            return
        if e.get("kind") == "run_end":
            self.close()

    def _open(self) -> EventFile:
        if self._file is None:
            self.logdir.mkdir(mode=0o700, exist_ok=True)
            self._stream = open(self.logdir / file_name(time.time(), f"{os.getpid()}.sftui"), "ab", buffering=0)
            self._file = EventFile(self._stream)
        return self._file

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream, self._file = None, None


def export(run: RunDir, logdir: Path) -> tuple[Path, int]:
    """Every record of the run so far into one file under ``logdir``: its path and the number of
    records. The file is named after the run's directory and first event, so exporting again
    replaces it. Events from every machine's file are taken in time order."""
    events: list[dict[str, Any]] = []
    tails = EventTails(run)
    while batch := tails.read():
        events.extend(batch)
    events.sort(key=_time)
    converter = Converter()
    records = [r for e in events for r in converter.records(e)]
    buf = io.BytesIO()
    out = EventFile(buf)
    for r in records:
        out.add(r)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file of that name
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(logdir)) from None
    started = _time(events[0]) if events else 0.0  # the same name at every export
    path = logdir / file_name(started, f"sftui-export.{run.path.name}")
    write_atomic(path, buf.getvalue())
    return path, len(records)
