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
from pathlib import Path
from typing import Any

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
