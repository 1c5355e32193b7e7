"""``--compile``: torch.compile for the worker, set up so that its cost is paid once per run.

- The compile cache lives on disk under the run directory (``RUN_DIR/compile-cache``, or
  ``$SFTUI_COMPILE_CACHE`` to share one between runs): a restart after an OOM, a switch or a
  stop is a new process, and it loads what attempt 1 compiled instead of compiling again.
- The batch dimension is compiled as dynamic (``loop.token_loss_sum`` marks it): a new rung of
  the ladder, or the short last step of an epoch, reuses the same graph and the same cache
  entry. The sequence dimensions stay static (``--pad-to-max-len``, on by default with
  ``--compile``).
- Every recompile, and torch's silent fall-back to eager past its recompile limit, becomes a
  ``log`` event: a run that quietly stopped being compiled says so in its log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sftui.rundir import EventLog

CACHE_DIR = "compile-cache"
_MESSAGE_CHARS = 400


def cache_dir(run_path: Path) -> Path:
    """Where inductor keeps its compiled graphs for this run. Set outright: importing a
    transformers model has already written inductor's default (/tmp) into the environment."""
    where = os.environ.get("SFTUI_COMPILE_CACHE") or str(run_path / CACHE_DIR)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = where
    return Path(where)


class RecompileEvents(logging.Handler):
    """torch._dynamo's recompile reasons and its recompile-limit warning, as ``log`` events."""

    def __init__(self, log: EventLog, rank: int):
        super().__init__(logging.DEBUG)
        self.log, self.rank = log, rank

    def emit(self, record: logging.LogRecord) -> None:
        recompile = record.name.endswith("__recompiles")
        if not recompile and record.levelno < logging.WARNING:
            return
        text = " ".join(record.getMessage().split())[:_MESSAGE_CHARS]
        prefix = "torch.compile recompiled" if recompile else "torch.compile"
        try:
            self.log.emit("log", level="warning", message=f"rank {self.rank}: {prefix}: {text}")
        except Exception:  # noqa: BLE001 - a log line must never take training down
            self.handleError(record)


def compile_model(model: Any, run_path: Path, log: EventLog, rank: int) -> Any:
    """``torch.compile(model)`` with the cache under the run and recompiles reported; the
    compile itself happens lazily, in the first step."""
    where = cache_dir(run_path)
    handler = RecompileEvents(log, rank)
    torch._logging.set_logs(recompiles=True)  # also printed into attempt-N.log
    logging.getLogger("torch._dynamo").addHandler(handler)
    if rank == 0:
        log.emit("log", level="info", message=f"torch.compile: cache in {where}")
    return torch.compile(model)


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds on a thread while the block runs.

    The first compiled step compiles the model inside it — minutes for a 188 M-parameter T5 —
    and writes nothing meanwhile; these beats (``phase: compiling`` events) keep the supervisor
    from taking it for a hang. They stop after ``max_seconds``, so a compile that never ends is
    still caught by ``--hang-timeout``.
    """

    def __init__(self, beat: Callable[[], None], interval: float, max_seconds: float = 1800.0):
        self.beat, self.interval, self.max_seconds = beat, interval, max_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-heartbeat", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._done.wait(self.interval) and time.monotonic() < deadline:
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a heartbeat must never take training down
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
