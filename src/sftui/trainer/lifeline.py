"""A worker process and the process that started it: dying with it, or outliving it briefly.

The memory probe and a multi-node launcher die at once with their parent (``die_with_parent``,
PR_SET_PDEATHSIG). A training rank on one machine instead keeps what it trained: when its
supervisor dies (``kill -9``, the OOM killer) the rank is at a step boundary within seconds, so
``Lifeline`` tells the training loop, which checkpoints and leaves; ``--resume`` then redoes
nothing. A rank that cannot get there (blocked in a collective) is ended after ``ORPHAN_GRACE_S``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
POLL_S = 0.5
ORPHAN_GRACE_S = 60.0  # a step and a checkpoint; then the rank is ended without one


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, even by SIGKILL; and if the parent died before
    the call took effect (it is not ``SFTUI_SUPERVISOR_PID``), leave now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _leave_if_parent_gone()


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: a process group whose peer is gone can hang in it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


def _leave_if_parent_gone() -> None:
    expected = os.environ.get("SFTUI_SUPERVISOR_PID")
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


class Lifeline:
    """Watches the parent from a thread. Once it is gone, ``lost`` is true, the rank's output
    (a pipe nobody reads now) goes to ``log_path`` instead, and the process is ended after
    ``grace`` seconds unless it has left by then."""

    def __init__(self, log_path: Path, grace: float = ORPHAN_GRACE_S):
        _leave_if_parent_gone()
        self.log_path, self.grace = log_path, grace
        self.lost = False
        self.training = False  # set by the loop once steps run: before that there is nothing to keep
        self._parent = os.getppid()
        threading.Thread(target=self._watch, name="lifeline", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self._parent:
            time.sleep(POLL_S)
        self._redirect_output()
        if not self.training:
            print(f"[sftui] the supervisor (pid {self._parent}) is gone before training: leaving", file=sys.stderr,
                  flush=True)
            exit_now(1)
        print(f"[sftui] the supervisor (pid {self._parent}) is gone: checkpointing at the next step boundary, "
              f"then leaving (at most {self.grace:g} s)", file=sys.stderr, flush=True)
        self.lost = True
        time.sleep(self.grace)
        print("[sftui] no step boundary reached in time: leaving without a checkpoint", file=sys.stderr, flush=True)
        exit_now(1)

    def _redirect_output(self) -> None:
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
