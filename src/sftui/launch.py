"""Starting the rank processes of one attempt on one node, and tearing them down.

The supervisor plays torchrun's part: it gives each rank torchrun's environment, puts all ranks
of an attempt in one process group of their own (so one ``killpg`` reaches them and nothing
else), and copies each rank's output, prefixed with its rank, into ``attempt-N.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sftui.rundir import RunDir

TERM_GRACE_S = 5.0


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for this attempt's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, attempt: int, gpus: list[int] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        SFTUI_ATTEMPT=str(attempt),
        SFTUI_SUPERVISOR_PID=str(os.getpid()),
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        PYTHONUNBUFFERED="1",
    )
    if gpus is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    # The package must be importable in the ranks exactly as it is here (an editable install,
    # or PYTHONPATH=src on a GPU box without an install).
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Attempt:
    """The live processes of one attempt."""

    number: int
    procs: list[subprocess.Popen]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    _copiers: list[threading.Thread] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def running(self) -> bool:
        return any(code is None for code in self.poll())

    def signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, grace: float = TERM_GRACE_S) -> None:
        """SIGTERM the attempt's process group, SIGKILL what is left after ``grace`` seconds."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The group may hold grandchildren (dataloader workers) even when the ranks are gone.
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def wait_logs(self, timeout: float = 5.0) -> None:
        for t in self._copiers:
            t.join(timeout)


def start_attempt(run: RunDir, attempt: int, world: int, gpus: list[int] | None,
                  module: str = "sftui.trainer") -> Attempt:
    """Start ``world`` ranks of ``python -m MODULE RUN_DIR`` in one new process group (the
    trainer; or the memory probe, which must see the same world)."""
    port = free_loopback_port()
    log_path = run.attempt_log(attempt)
    log = open(log_path, "ab", buffering=0)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    copiers: list[threading.Thread] = []
    try:
        for rank in range(world):
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(run.path)],
                env=rank_env(rank, world, port, attempt, gpus),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                **_group_kwargs(0 if rank == 0 else procs[0].pid),
            )
            procs.append(proc)
            t = threading.Thread(target=_copy_prefixed, args=(proc.stdout, log, lock, f"[rank {rank}] "), daemon=True)
            t.start()
            copiers.append(t)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return Attempt(attempt, procs, log_path, _copiers=copiers)


def _group_kwargs(pgid: int) -> dict:
    """Put the child in process group ``pgid`` (0: a new group led by the child)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}  # pragma: no cover - Python 3.10


def _copy_prefixed(stream: IO[bytes], log: IO[bytes], lock: threading.Lock, prefix: str) -> None:
    pre = prefix.encode()
    for line in iter(stream.readline, b""):
        with lock:
            log.write(pre + line if line.endswith(b"\n") else pre + line + b"\n")
    stream.close()
