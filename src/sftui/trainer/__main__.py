"""One rank of one attempt: ``python -m sftui.trainer RUN_DIR``, started by the supervisor with
torchrun's environment (DESIGN.md "One rank of one attempt").

On one machine a rank outlives its supervisor just long enough to checkpoint at the next step
boundary (lifeline.Lifeline); under a multi-node launcher it dies with it (PR_SET_PDEATHSIG). It
leaves on SIGTERM at once (graceful stops go through request.json), and maps every way out to a
worker exit code from events.py with a ``worker_exit`` event as the last line it writes.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from sftui.trainer.lifeline import Lifeline, die_with_parent, exit_now

# A rank blocked in a collective whose peer died: not this rank's failure to report.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "NCCL communicator was aborted", "Socket Timeout", "ProcessGroupNCCL")


def main() -> None:
    via_launcher = os.environ.get("SFTUI_VIA_LAUNCHER") == "1"
    if via_launcher:
        die_with_parent()
    os.umask(0o077)  # the run's files are its owner's alone (also when torchrun started this rank)
    # The default action: the kernel ends the process at once, even while it waits inside a
    # collective, where a Python-level handler would only run after the call returned.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if len(sys.argv) != 2:
        print("usage: python -m sftui.trainer RUN_DIR", file=sys.stderr)
        exit_now(2)

    from sftui import events as ev
    from sftui.config import ConfigError
    from sftui.rundir import EventLog, RunDir
    from sftui.trainer import loop
    from sftui.trainer.checkpoint import CheckpointError

    run = RunDir(Path(sys.argv[1]))
    me = loop.Rank.from_env()
    log = EventLog(run.node_events(int(os.environ.get("SFTUI_NODE", "0"))), me.attempt)  # one file per machine
    lifeline = None if via_launcher else Lifeline(run.attempt_log(me.attempt))
    try:
        code = loop.train(run, log, me, lifeline)
    except (ConfigError, CheckpointError) as e:  # one line says it all: no traceback
        print(f"sftui: {e}", file=sys.stderr)
        log.emit("log", level="error", message=str(e))
        log.emit("worker_exit", rank=me.rank, reason="error", step=None)
        # Bad data, a changed fingerprint or max length: exit 2 territory. An unreadable
        # checkpoint: the attempt failed.
        code = ev.WORKER_BAD_INPUT if isinstance(e, ConfigError) else ev.WORKER_ERROR
    except Exception as e:  # noqa: BLE001 - every failure must end in an exit code
        traceback.print_exc()
        if me.world > 1 and any(m in str(e) for m in PEER_LOST_MARKERS):
            # Another rank left (an OOM it reported, a crash): the supervisor tears the attempt
            # down; writing an error of our own would only blur what happened.
            print(f"sftui: rank {me.rank}: lost another rank of the attempt", file=sys.stderr)
            exit_now(ev.WORKER_ERROR)
        log.emit("worker_exit", rank=me.rank, reason="error", step=None)
        code = ev.WORKER_ERROR
    exit_now(code)


if __name__ == "__main__":
    main()
