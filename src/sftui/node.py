"""``sftui node RUN_DIR --machine-rank R``: machine R's part of a multi-node run.

Machine 0 runs ``sftui run`` (the supervisor, the TUI); every other machine runs this agent. It
follows run.json on the shared filesystem: for each attempt the supervisor starts, it starts this
machine's ``accelerate launch`` (launch.start_launcher), and tears it down when the attempt number
moves on or the run leaves ``running``; when the run ends it exits with the run's exit code. The
decisions (restarts, the rung, stopping) stay with the supervisor: this machine only follows.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from sftui import events as ev
from sftui.config import ConfigError
from sftui.launch import Attempt, rendezvous_id, start_launcher
from sftui.rundir import EventLog, RunDir
from sftui.runfile import RunFile

POLL_S = 0.25


def check(run: RunDir, node: int) -> RunFile:
    """run.json, once it is clear that machine ``node`` can take part in this run."""
    state = RunFile.read(run)
    machines = state.cfg.num_machines
    if machines == 1:
        raise ConfigError(f"{run.path}: a single-machine run (machine 0 starts a multi-node run with "
                          "sftui run --num-machines N)")
    if not 1 <= node < machines:
        raise ConfigError(f"--machine-rank: expected 1 to {machines - 1} (machine 0 runs sftui run), got {node}")
    if state.ended:
        raise ConfigError(f"{run.path}: the run has already ended ({state.status})")
    return state


def follow(run: RunDir, node: int) -> int:
    """Launch this machine's part of every attempt until the run ends; the run's exit code, or
    130 (SIGINT) / 4 (SIGTERM) when this agent is told to stop."""
    check(run, node)
    stopped_by: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopped_by.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    say(f"machine {node} following {run.path}")
    current: Attempt | None = None
    launched = 0  # the newest attempt this machine has launched
    with EventLog(run.node_events(node)) as log:
        try:
            while not stopped_by:
                try:
                    state = RunFile.read(run)
                except (OSError, ValueError):  # mid-replace on a network filesystem: next time
                    time.sleep(POLL_S)
                    continue
                status, attempt = state.status, state.attempt
                if current is not None and (attempt != current.number or status != "running"):
                    current.terminate()
                    say(f"attempt {current.number}: torn down (run {status}, attempt {attempt})")
                    current = None
                if current is not None and not current.running():
                    current.wait_logs()
                    say(f"attempt {current.number}: launcher exited with code {current.poll()[0]}")
                    current = None
                if state.ended:
                    say(f"run {status}: {state.reason}")
                    return state.exit_code if state.exit_code is not None else ev.EXIT_FAILED
                if current is None and status == "running" and attempt > launched:
                    current = start_launcher(run, attempt, state.cfg, node, rendezvous_id(state.created, attempt))
                    launched = attempt
                    log.emit("log", attempt=attempt, level="info",
                             message=f"machine {node} launched attempt {attempt} (pid {current.pgid})")
                    say(f"attempt {attempt}: launched, output in {current.log_path}")
                time.sleep(POLL_S)
        finally:
            if current is not None:
                current.terminate()
    return ev.EXIT_INTERRUPTED if stopped_by[0] == signal.SIGINT else ev.EXIT_STOPPED


def say(line: str) -> None:
    print(f"sftui node: {line}", flush=True)
