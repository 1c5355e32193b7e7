"""Starting the processes of one attempt, and tearing them down.

On one node the supervisor plays torchrun's part: it gives each rank torchrun's environment,
puts all ranks of an attempt in one process group of their own (so one ``killpg`` reaches them
and nothing else), and copies each rank's output, prefixed with its rank, into ``attempt-N.log``.
On several nodes each machine starts one ``accelerate launch`` of its own (a generated config
file, torchrun's c10d rendezvous) in the same way, its output prefixed with the machine rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sftui.config import RunConfig
from sftui.rundir import RunDir, write_json_atomic

TERM_GRACE_S = 5.0


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for this attempt's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, attempt: int, gpus: list[int] | None) -> dict[str, str]:
    """One rank of a single-node attempt: torchrun's environment, set by the supervisor."""
    env = attempt_env(attempt, gpus, world)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    return env


def attempt_env(attempt: int, gpus: list[int] | None, local_world: int, node: int = 0) -> dict[str, str]:
    """What every process of an attempt on machine ``node`` gets: the attempt, the machine (it
    picks the event file), the pid of the process that started it (the rank or launcher leaves
    at once if that parent is already gone), the devices, and the package on PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        SFTUI_ATTEMPT=str(attempt),
        SFTUI_NODE=str(node),
        SFTUI_SUPERVISOR_PID=str(os.getpid()),
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        PYTHONUNBUFFERED="1",
    )
    env["PYTORCH_CUDA_ALLOC_CONF"] = allocator_conf()[0]
    if gpus is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_world))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    # The package must be importable in the ranks exactly as it is here (an editable install,
    # or PYTHONPATH=src on a GPU box without an install).
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# Without it the caching allocator's fixed segments fragment under varying sequence lengths: a
# Qwen2.5-0.5B shape at batch 16 reserved 115 GiB for a 33 GiB allocated peak on an H200, and
# 35.8 GiB with it, at the same speed (docs/BENCHMARKS.md). The probe and the ranks run alike.
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def allocator_conf() -> tuple[str, bool]:
    """PYTORCH_CUDA_ALLOC_CONF for the ranks and the probe, and whether it is the user's own."""
    own = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return (own, True) if own is not None else (DEFAULT_ALLOC_CONF, False)


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
                  module: str = "sftui.trainer", standby: "Standby | None" = None) -> Attempt:
    """Start ``world`` ranks of ``python -m MODULE RUN_DIR`` in one new process group (the
    trainer; or the memory probe, which must see the same world). ``standby``: the trainer's
    ranks started ahead for this attempt, which then only need the port (else they are let go
    and the ranks start cold)."""
    port = free_loopback_port()
    if standby is not None:
        if standby.serves(attempt, world, gpus):
            return standby.become(run, port)
        standby.dismiss()
    argv = [sys.executable, "-m", module, str(run.path)]
    return _spawn(run, attempt, [(argv, rank_env(rank, world, port, attempt, gpus), rank_prefix(rank))
                                 for rank in range(world)])


def rank_prefix(rank: int) -> str:
    """What precedes each line of a rank's output in attempt-N.log."""
    return f"[rank {rank}] "


@dataclass
class Standby:
    """The trainer's ranks of attempt ``attempt``, started before it (``sftui.trainer.standby``):
    each has imported what a rank imports and waits on stdin for the rendezvous port. An OOM
    restart or a batch switch then skips Python's start and the imports."""

    attempt: int
    world: int
    gpus: list[int] | None
    procs: list[subprocess.Popen]

    def serves(self, attempt: int, world: int, gpus: list[int] | None) -> bool:
        """Whether these processes are ready to be ``attempt`` with this world and these GPUs."""
        return (attempt, world, gpus) == (self.attempt, self.world, self.gpus) and \
            all(p.poll() is None for p in self.procs)

    def become(self, run: RunDir, port: int) -> Attempt:
        """The attempt: each waiting rank gets the port, and its output goes to the attempt's log."""
        order = (json.dumps({"port": port}) + "\n").encode()
        for p in self.procs:
            assert p.stdin is not None
            try:
                p.stdin.write(order)
                p.stdin.close()
            except BrokenPipeError:  # it died just now: the attempt sees a rank that failed at once
                pass
        return _attach(run, self.attempt, self.procs, [rank_prefix(r) for r in range(self.world)])

    def dismiss(self) -> None:
        """Not needed after all: killed (they have written nothing and hold no GPU memory)."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:  # stuck in the kernel (an import over NFS): not waited for
                pass
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass


def start_standby(run: RunDir, attempt: int, world: int, gpus: list[int] | None) -> Standby:
    """Ranks for attempt ``attempt`` of this run, started now and waiting (see ``Standby``); they
    get the attempt's environment, the rendezvous port excepted, and a process group of their own."""
    argv = [sys.executable, "-m", "sftui.trainer.standby", str(run.path)]
    procs = _popen_group([(argv, rank_env(rank, world, 0, attempt, gpus)) for rank in range(world)],
                         stdin=subprocess.PIPE)
    return Standby(attempt, world, gpus, procs)


# --- several machines: one `accelerate launch` per machine and attempt ---


def accelerate_config(cfg: RunConfig, node: int) -> dict[str, Any]:
    """``accelerate launch --config_file`` of machine ``node``. It names every setting the launch
    depends on, so a user's default accelerate config cannot change the run. MULTI_GPU means
    torchrun's launcher, on the CPU too (gloo). Mixed precision is the worker's own choice (bf16
    where the card has it), so the launcher imposes none. ``same_network`` stays false: with it,
    accelerate hands torchrun a master address instead of the c10d rendezvous endpoint."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": cfg.num_machines,
        "machine_rank": node,
        "num_processes": cfg.world_size,
        "gpu_ids": "all" if cfg.cpu or not cfg.gpus else ",".join(str(g) for g in cfg.gpus),
        "main_process_ip": cfg.main_process_ip,
        "main_process_port": cfg.main_process_port,
        "rdzv_backend": "c10d",
        "same_network": False,
        "mixed_precision": "no",
        "downcast_bf16": "no",
        "use_cpu": False,
        "debug": False,
        "enable_cpu_affinity": False,
    }


def accelerate_args(run: RunDir, node: int) -> list[str]:
    """The ``accelerate launch`` arguments of machine ``node``. Restarts are the supervisor's
    (its ladder, resume point and decisions), so torchrun makes none; machine 0 hosts the
    rendezvous store, whatever the other machines' addresses look like."""
    return ["--config_file", str(run.accelerate_config(node)), "--max_restarts", "0",
            "--rdzv_conf", f"is_host={int(node == 0)}", "-m", "sftui.trainer", str(run.path)]


def rendezvous_id(created: float, attempt: int) -> str:
    """The c10d run id of one attempt of the run created at ``created``: a launcher left over
    from an earlier attempt (or run) cannot join this one."""
    return f"sftui-{int(created)}-attempt-{attempt}"


def start_launcher(run: RunDir, attempt: int, cfg: RunConfig, node: int, rdzv_id: str) -> Attempt:
    """Machine ``node``'s part of a multi-node attempt: writes its accelerate config, then starts
    ``accelerate launch`` (through ``sftui.trainer.launcher``, which dies with this process)."""
    path = run.accelerate_config(node)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_json_atomic(path, accelerate_config(cfg, node))
    env = attempt_env(attempt, None if cfg.cpu else cfg.gpus, cfg.local_world_size, node)
    env["PET_RDZV_ID"] = rdzv_id  # torchrun reads its --rdzv_id from here; accelerate has no flag for it
    argv = [sys.executable, "-m", "sftui.trainer.launcher", *accelerate_args(run, node)]
    return _spawn(run, attempt, [(argv, env, f"[node {node}] ")], node)


def _spawn(run: RunDir, attempt: int, specs: list[tuple[list[str], dict[str, str], str]], node: int = 0) -> Attempt:
    """Start each (argv, env, output prefix) in one new process group; their output goes,
    prefixed, to the attempt's log on this machine."""
    procs = _popen_group([(argv, env) for argv, env, _ in specs], stdin=subprocess.DEVNULL)
    return _attach(run, attempt, procs, [prefix for _, _, prefix in specs], node)


def _popen_group(specs: list[tuple[list[str], dict[str, str]]], stdin: int) -> list[subprocess.Popen]:
    """Each (argv, env) started in one new process group, output piped (both streams together)."""
    procs: list[subprocess.Popen] = []
    try:
        for argv, env in specs:
            procs.append(subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          close_fds=True, **_group_kwargs(procs[0].pid if procs else 0)))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return procs


def _attach(run: RunDir, attempt: int, procs: list[subprocess.Popen], prefixes: list[str], node: int = 0) -> Attempt:
    """The attempt of these processes, each one's output copied with its prefix to the attempt's log."""
    log = open(run.attempt_log(attempt, node), "ab", buffering=0)
    lock = threading.Lock()
    copiers = [threading.Thread(target=_copy_prefixed, args=(p.stdout, log, lock, prefix), daemon=True)
               for p, prefix in zip(procs, prefixes)]
    for t in copiers:
        t.start()
    return Attempt(attempt, procs, run.attempt_log(attempt, node), _copiers=copiers)


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
