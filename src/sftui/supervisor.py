"""One run's lifecycle: attempts, how each ended, the restart policy, the control socket.

The supervisor owns the run directory while it lives (``flock`` on ``lock``). It starts each
attempt's ranks (launch.py), follows their events, classifies how the attempt ended, and decides
what comes next: finish, restart at a smaller rung after an OOM (asking the user, or by policy),
switch batch size on request, or stop. It samples telemetry on a thread and answers clients on
the control socket. Every reader (headless log, TUI, ``status``) sees all this through files.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from sftui import config as cfgmod
from sftui import events as ev
from sftui.control import ControlServer
from sftui.runfile import RunFile
from sftui.launch import Attempt, Standby, allocator_conf, rendezvous_id, start_attempt, start_launcher, start_standby
from sftui.rundir import (
    EventLog,
    EventTails,
    LockHeld,
    RunDir,
    acquire_lock,
    read_all,
    read_json,
    tail_lines,
    write_json_atomic,
)
from sftui.gpumemory import RankPids
from sftui.tboard import LiveReport
from sftui.telemetry import Sampler

TICK_S = 0.2
TELEMETRY_EVERY_S = 2.0
TEARDOWN_AFTER_ABNORMAL_S = 1.0   # the others are torn down this long after a rank dies abnormally
CLEAN_EXIT_WAIT_S = 60.0          # ranks that left cleanly: how long the others get to follow
HOST_OOM_FRACTION = 0.95          # system memory this full when a rank is SIGKILLed: host OOM
TUI_PING_FRESH_S = 5.0            # a TUI that pinged this recently counts as attached
OTHER_MACHINES_WAIT_S = 5.0       # multi-node: how long the other machines' last events get to arrive

Observer = Callable[[dict[str, Any]], None]


def oom_holder_note(oom: dict[str, Any], sample: dict[str, Any] | None, ranks: RankPids) -> str | None:
    """What the supervisor logs after a rank's ``oom`` event (the rank writes it, and has no
    telemetry): the biggest holder of that GPU, in the latest sample, that is not a rank of the
    attempt, e.g. ``out of memory on GPU 0: 40.2 GiB held by pid 1234, user bob, python train.py``."""
    uuid = oom.get("gpu_uuid")
    gpu = next((g for g in (sample or {}).get("gpus") or [] if uuid and g.get("uuid") == uuid), None)
    line = ranks.outsider_line(gpu, (sample or {}).get("host"), oom.get("attempt"))
    return None if line is None else f"out of memory on {line}"


def checkpoint_step(run: RunDir) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    ck = run.latest_checkpoint()
    if ck is None:
        return None
    try:
        return int(read_json(ck / "state.json")["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class AttemptWatch:
    """What the supervisor learns about one attempt from its events."""

    last_step: int | None = None
    last_progress: float = field(default_factory=time.monotonic)
    trained: bool = False
    ranks_up: bool = False  # a rank_start: the ranks have imported and met at the rendezvous
    worker_exits: dict[int, str] = field(default_factory=dict)
    ooms: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the ranks' error messages (a full disk, a bad checkpoint)

    def see(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind in ("step", "phase", "checkpoint", "eval", "rank_start"):
            self.last_progress = time.monotonic()
        if kind == "step":
            self.last_step = e.get("step", self.last_step)
            self.trained = True
        elif kind == "rank_start":
            self.ranks_up = True
        elif kind == "worker_exit":
            self.worker_exits[int(e.get("rank", 0))] = str(e.get("reason"))
            # Step events come every --log-every steps: a rank's exit says where it really was.
            if isinstance(e.get("step"), int):
                self.last_step = max(self.last_step or 0, e["step"])
        elif kind == "oom":
            self.ooms.append(e)
        elif kind == "log" and e.get("level") == "error":
            self.errors.append(str(e.get("message")))


def classify(codes: list[int | None], watch: AttemptWatch, hung: bool, host_memory_full: bool, world: int) -> str:
    """An attempt's outcome: events first, exit statuses second (DESIGN.md "Events"). ``codes`` are
    the exit statuses of what this machine started: one process per rank when the ``world`` ranks
    are all here, else machine 0's launcher (which exits 0 only when all its ranks did)."""
    if hung:
        return "hang"
    if watch.ooms:
        return "cuda_oom"
    per_rank = len(codes) == world
    reasons = set(watch.worker_exits.values())
    everyone_left = len(watch.worker_exits) == world
    if everyone_left and reasons == {"finished"} and all(c == ev.WORKER_OK for c in codes):
        return "finished"
    settled = all(c == ev.WORKER_OK or (per_rank and r in watch.worker_exits) for r, c in enumerate(codes))
    if "stop" in reasons and settled:
        return "stopped"
    if "switch" in reasons and settled:
        return "switch"
    killed = [r for r, c in enumerate(codes) if per_rank and c == -signal.SIGKILL and r not in watch.worker_exits]
    if killed and host_memory_full:
        return "host_oom"
    return "crash"


class Supervisor:
    def __init__(self, run: RunDir, observers: list[Observer] | None = None, detached: bool = False):
        self.run = run
        self.observers = observers or []
        self.detached = detached
        self.state = RunFile.read(run)
        self.cfg = self.state.cfg
        self._lock = threading.RLock()
        self._decisions: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop_reason: str | None = None   # "user" | "sigterm" | "sigint"
        self._force = False
        self._pending_switch: int | None = None
        self._attempt: Attempt | None = None
        self._standby: Standby | None = None  # the next attempt's ranks, started ahead (launch.Standby)
        self._standby_failed = False  # starting them failed once: not tried again in this run
        self._watch: AttemptWatch | None = None
        self._last_error: str | None = None
        self._last_tui_ping = 0.0
        self._request_seq_written = self.state.request_seq  # the newest request.json written
        self._rank_ends: list[str] = []  # how the failed ranks of the last attempt ended
        self._mem_fractions: deque[tuple[float, float]] = deque(maxlen=100)
        self.sampler = Sampler(interval=1.0)
        self.events: EventLog | None = None
        self._tail = EventTails(run, from_end=True)
        # The pids of every rank of this run, earlier supervisors' included (a rank left from before
        # a --resume is "left over", not foreign), to tell GPU holders apart.
        self._ranks = RankPids()
        for e in read_all(run.events):
            self._ranks.see(e)
        if self.cfg.report_to == "tensorboard":  # an observer, like the headless log
            self.observers.append(LiveReport(run, lambda level, message: self.emit("log", level=level, message=message)))

    # --- run.json ---

    def _save(self, state: RunFile | None = None, **changes: Any) -> None:
        """run.json as ``state`` (or as now) with ``changes``, written atomically."""
        with self._lock:
            self.state = dataclasses.replace(state or self.state, **changes)
            self.state.write(self.run)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        assert self.events is not None
        return self.events.emit(kind, **fields)

    # --- the whole run ---

    def run_forever(self) -> int:
        """Run to the end; return the exit code of ``sftui run`` (events.EXIT_*)."""
        try:
            lock_fd = acquire_lock(self.run)
        except LockHeld:
            print(f"sftui: {self.run.path}: another supervisor is running this run", file=sys.stderr)
            return ev.EXIT_USAGE
        self.events = EventLog(self.run.events)
        server = None
        self._install_signals()
        self.sampler.start()
        try:
            server = ControlServer(self.run.default_socket_path(), self._handle)
            # A request an earlier supervisor wrote was served, or died with it: none is acted on again.
            self._request_seq_written = max(self._request_seq_written, self._request_seq_on_disk())
            self._save(status="running", supervisor_pid=os.getpid(), socket=str(server.path),
                       exit_code=None, reason=None, pending_decision=None, request_seq=self._request_seq_written)
            self.emit("run_start", config=self.state.config, resumed=self.state.attempt > 0)
            if not self.cfg.cpu:
                conf, own = allocator_conf()
                self.emit("log", level="info", message=f"CUDA allocator: PYTORCH_CUDA_ALLOC_CONF={conf} "
                          + ("(yours, from the environment)" if own else "(sftui's default; set it to choose another)"))
            if self.cfg.batch == "auto" and self.state.attempt == 0:
                self.emit("batch_change", **{"from": None, "to": self.state.batch_size, "by": "probe"})
            code, status, reason = self._attempts()
        except BaseException as e:  # the run must end with a run_end whatever happens here
            code, status, reason = ev.EXIT_FAILED, "failed", f"supervisor error: {type(e).__name__}: {e}"
            if self._attempt is not None:
                self._attempt.terminate()
            if not isinstance(e, Exception):
                raise
        finally:
            if server is not None:
                server.close()
            if self._standby is not None:
                self._standby.dismiss()
        self._save(status=status, exit_code=code, reason=reason, pending_decision=None, supervisor_pid=None)
        end = self.emit("run_end", status=status, reason=reason, exit_code=code)
        self._notify(end)
        self._drain()
        self.sampler.stop()
        self.events.close()
        os.close(lock_fd)
        return code

    def _attempts(self) -> tuple[int, str, str]:
        while True:
            if self._stop_reason:
                return self._stopped_result("stopped before the next attempt")
            outcome, attempt_no = self._one_attempt()
            batch = self.state.batch_size
            if outcome == "finished":
                return ev.EXIT_FINISHED, "finished", "trained to the end"
            if outcome == "stopped":
                return self._stopped_result(f"stopped at step {checkpoint_step(self.run)}")
            if outcome == "switch":
                new = self._pending_switch or batch
                self._pending_switch = None
                self.emit("batch_change", attempt=attempt_no, **{"from": batch, "to": new, "by": "user"})
                self._set_rung(new)
                continue
            if outcome == "cuda_oom":
                if self._stop_reason:
                    return self._stopped_result("stopped after an out-of-memory")
                result = self._after_oom(batch)
                if result is not None:
                    return result
                continue
            what = {"crash": "a rank crashed", "hang": f"no progress for {self.cfg.hang_timeout:g} s",
                    "host_oom": "the host ran out of memory (a rank was killed)"}[outcome]
            if self._last_error:
                what += f": {self._last_error}"
            elif outcome == "crash" and self._rank_ends:
                what = "; ".join(self._rank_ends)
            return ev.EXIT_FAILED, "failed", f"{what} in attempt {attempt_no}; see {self.run.attempt_log(attempt_no)}"

    def _stopped_result(self, reason: str) -> tuple[int, str, str]:
        code = ev.EXIT_INTERRUPTED if self._stop_reason == "sigint" else ev.EXIT_STOPPED
        return code, "stopped", reason + f"; resume with: sftui run --resume {self.run.path}"

    def _set_rung(self, batch: int) -> None:
        self._save(self.state.with_rung(batch))

    # --- one attempt ---

    def _one_attempt(self) -> tuple[str, int]:
        n = self.state.attempt + 1
        self._set_rung(self.state.batch_size)
        self._save(attempt=n, status="running")
        resume = checkpoint_step(self.run)
        warm = self._standby is not None and self._standby.serves(n, self.cfg.world_size, self._gpus())
        self.emit("attempt_start", attempt=n, batch_size=self.state.batch_size, grad_accum=self.state.grad_accum,
                  world_size=self.cfg.world_size, effective_batch=self.state.effective_batch, resume_step=resume,
                  warm=warm)
        watch = AttemptWatch()
        with self._lock:
            self._watch = watch
            self._attempt = self._start(n)
        attempt = self._attempt
        hung = False
        abnormal_since: float | None = None
        clean_since: float | None = None
        next_telemetry = 0.0
        while attempt.running():
            codes = attempt.poll()
            self._pump(watch)  # after poll: a rank's last events are in the file before it exits
            if watch.ranks_up and self._standby is None and self._wants_standby():
                self._start_standby(n + 1)
            now = time.monotonic()
            if now >= next_telemetry:
                self._write_telemetry()
                next_telemetry = now + TELEMETRY_EVERY_S
            abnormal = any(c is not None and (c != ev.WORKER_OK or r not in watch.worker_exits)
                           for r, c in enumerate(codes))
            abnormal_since = (abnormal_since or now) if abnormal else None
            if any(c is not None for c in codes) and not abnormal:
                clean_since = clean_since or now
            if self._force or (abnormal_since and now - abnormal_since >= TEARDOWN_AFTER_ABNORMAL_S) \
                    or (clean_since and now - clean_since >= CLEAN_EXIT_WAIT_S):
                attempt.terminate()
                break
            if now - watch.last_progress > self.cfg.hang_timeout:
                hung = True
                attempt.terminate()
                break
            if self._stop_reason and not watch.trained:
                attempt.terminate()  # nothing trained yet in this attempt: nothing to save
                break
            time.sleep(TICK_S)
        attempt.wait_logs()
        codes = attempt.poll()
        self._pump(watch)
        if self.cfg.num_machines > 1:
            self._await_other_machines(watch)
        self._write_telemetry()
        outcome = classify(codes, watch, hung, self._host_memory_was_full(), self.cfg.world_size)
        if self._stop_reason and outcome == "crash" and not watch.trained:
            outcome = "stopped"
        self._last_error = watch.errors[-1] if watch.errors else None
        tail = None
        self._rank_ends = []
        if outcome in ("crash", "hang", "host_oom"):
            self._rank_ends = self._log_rank_ends(n, codes, [p.pid for p in attempt.procs], hung)
            tail = tail_lines(self.run.attempt_log(n), 20)
        self.emit("attempt_end", attempt=n, exit_codes=codes, outcome=outcome, last_step=watch.last_step, log_tail=tail)
        with self._lock:
            self._attempt = None
            self._watch = None
            self._save(request_seq=self._request_seq_written)
        return outcome, n

    def _log_rank_ends(self, n: int, codes: list[int | None], pids: list[int], hung: bool) -> list[str]:
        """How each rank that failed ended (which, its pid, the signal or exit code), as the last
        lines of the attempt's log (and so of its log tail); returned for the run's reason. A rank
        killed with SIGKILL writes nothing of its own."""
        lines = [f"no step or heartbeat for {self.cfg.hang_timeout:g} s: the attempt was torn down"] if hung else []
        for r, (c, pid) in enumerate(zip(codes, pids)):
            who = f"rank {r} (pid {pid})" if self.cfg.num_machines == 1 else f"machine 0's launcher (pid {pid})"
            if c is not None and c < 0:
                try:
                    name = signal.Signals(-c).name
                except ValueError:
                    name = f"signal {-c}"
                lines.append(f"{who} was killed by {name}")
            elif c not in (None, ev.WORKER_OK):
                lines.append(f"{who} exited with code {c}")
        try:
            with open(self.run.attempt_log(n), "a") as f:
                f.writelines(f"[sftui] {line}\n" for line in lines)
        except OSError:
            pass
        return lines

    def _start(self, n: int) -> Attempt:
        """This machine's processes of attempt ``n``: every rank, or (multi-node) machine 0's
        ``accelerate launch``, which waits for the other machines' at the rendezvous."""
        if self.cfg.num_machines == 1:
            standby, self._standby = self._standby, None
            return start_attempt(self.run, n, self.cfg.world_size, self._gpus(), standby=standby)
        self.emit("log", attempt=n, level="info",
                  message=f"waiting for {self.cfg.num_machines} machines at {self.cfg.main_process_ip}:"
                  f"{self.cfg.main_process_port}; on machine R: sftui node {self.run.path} --machine-rank R")
        return start_launcher(self.run, n, self.cfg, 0, rendezvous_id(self.state.created, n))

    def _start_standby(self, n: int) -> None:
        """The ranks of attempt ``n`` started ahead; a failure to start them (no memory to fork, a
        process limit) costs this run its head start, never the attempt that is training."""
        try:
            self._standby = start_standby(self.run, n, self.cfg.world_size, self._gpus())
        except (OSError, subprocess.SubprocessError) as e:
            self._standby_failed = True
            self.emit("log", level="warning", message=f"could not start the next attempt's ranks ahead ({e}); "
                                                      "a restart will start them then")

    def _gpus(self) -> list[int] | None:
        return None if self.cfg.cpu else self.cfg.gpus

    def _wants_standby(self) -> bool:
        """Whether the next attempt's ranks are started ahead, once this one's are up (after their
        own imports, which these would slow on a machine of few cores; in time for an OOM at the
        first step): on one machine (several start through ``accelerate launch``), unless
        ``SFTUI_STANDBY=0``, starting them failed before, or the run is stopping."""
        return (self.cfg.num_machines == 1 and os.environ.get("SFTUI_STANDBY", "1") != "0"
                and not self._standby_failed and not self._stop_reason)

    def _await_other_machines(self, watch: AttemptWatch) -> None:
        """Machine 0's launcher has exited; the other machines' last events (an OOM, their ranks'
        ``worker_exit``) may reach the shared filesystem a little later."""
        deadline = time.monotonic() + OTHER_MACHINES_WAIT_S
        while len(watch.worker_exits) < self.cfg.world_size and not watch.ooms and time.monotonic() < deadline:
            time.sleep(TICK_S)
            self._pump(watch)

    def _pump(self, watch: AttemptWatch) -> None:
        """Read new events: learn from them, hand them to observers."""
        for e in self._tail.read():
            watch.see(e)
            if e.get("kind") == "rank_start" and e.get("gpu_uuid"):
                self.sampler.run_uuids.add(e["gpu_uuid"])
            self._ranks.see(e)
            if e.get("kind") == "oom":
                note = oom_holder_note(e, self.sampler.latest(), self._ranks)
                if note is not None:
                    self.emit("log", attempt=e.get("attempt"), level="warning", message=note)
            for observe in self.observers:
                observe(e)
        try:
            vm = psutil.virtual_memory()
            self._mem_fractions.append((time.monotonic(), 1 - vm.available / vm.total))
        except Exception:
            pass

    def _drain(self) -> None:
        for e in self._tail.read():
            for observe in self.observers:
                observe(e)

    def _host_memory_was_full(self) -> bool:
        recent = [f for t, f in self._mem_fractions if time.monotonic() - t < 15]
        return bool(recent) and max(recent) >= HOST_OOM_FRACTION

    def _write_telemetry(self) -> None:
        sample = self.sampler.latest()
        if sample is not None:
            with open(self.run.telemetry, "ab") as f:
                f.write(ev.encode(sample))

    # --- after an OOM ---

    def _after_oom(self, batch: int) -> tuple[int, str, str] | None:
        """Apply the OOM policy; None to go on with the next attempt, else the run's result."""
        oom_rungs = sorted(set(self.state.oom_rungs) | {batch}, reverse=True)
        restarts = self.state.oom_restarts
        self._save(oom_rungs=oom_rungs)
        proposed = cfgmod.next_rung(self.state.ladder, batch)
        levers = "lower --max-len or use --gradient-checkpointing"
        if restarts >= self.cfg.max_oom_restarts:
            return ev.EXIT_FAILED, "failed", f"out of memory at batch {batch} after {restarts} OOM restarts (--max-oom-restarts); {levers}"
        policy = self.cfg.on_oom or ("ask" if self._tui_attached() else "auto")
        if policy == "ask":
            decision = self._ask(proposed)
        elif policy == "auto" and proposed is not None:
            decision = {"by": "policy", "action": "restart", "batch_size": proposed}
        else:
            decision = {"by": "policy", "action": "stop", "batch_size": None}
        self.emit("decision", attempt=self.state.attempt, **decision)
        self._save(pending_decision=None, status="running")
        if decision["action"] == "stop":
            if decision["by"] == "user":
                return self._stopped_result(f"stopped by the user after an out-of-memory at batch {batch}")
            if proposed is None:
                return ev.EXIT_FAILED, "failed", f"out of memory at batch {batch}, the bottom of the ladder; {levers}"
            return ev.EXIT_FAILED, "failed", f"out of memory at batch {batch}; --on-oom {policy} stopped the run"
        new = int(decision["batch_size"])
        self._save(oom_restarts=restarts + 1)
        self.emit("batch_change", attempt=self.state.attempt, **{"from": batch, "to": new, "by": "oom"})
        self._set_rung(new)
        return None

    def _ask(self, proposed: int | None) -> dict[str, Any]:
        deadline = time.time() + self.cfg.oom_timeout
        while not self._decisions.empty():
            self._decisions.get_nowait()
        need = self.emit("decision_needed", attempt=self.state.attempt, reason="oom",
                         proposed_batch=proposed, deadline=round(deadline, 3))
        self._save(status="waiting", pending_decision=need)
        self._notify(need)
        while time.time() < deadline and not self._stop_reason:
            self._drain()  # observers (the headless log) follow what clients do meanwhile
            try:
                return self._decisions.get(timeout=TICK_S)
            except queue.Empty:
                pass
        if self._stop_reason:
            return {"by": "user", "action": "stop", "batch_size": None}
        action = "restart" if proposed is not None else "stop"
        return {"by": "timeout", "action": action, "batch_size": proposed}

    def _tui_attached(self) -> bool:
        return time.monotonic() - self._last_tui_ping < TUI_PING_FRESH_S

    # --- control socket (runs on the server's threads) ---

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        with self._lock:
            if cmd == "ping":
                if req.get("client") == "tui":
                    self._last_tui_ping = time.monotonic()
                return {"ok": True, "status": self.state.status, "attempt": self.state.attempt,
                        "batch_size": self.state.batch_size, "pid": os.getpid()}
            if cmd == "decide":
                return self._handle_decide(req)
            if cmd == "stop":
                self._stop_reason = self._stop_reason or "user"
                if self.state.status == "waiting":
                    self._decisions.put({"by": "user", "action": "stop", "batch_size": None})
                else:
                    self._request("stop", None)
                return {"ok": True, "message": "stopping at the next step boundary, after a checkpoint"}
            if self._attempt is None:
                return {"ok": False, "error": f"no attempt is running (status {self.state.status})"}
            if cmd == "checkpoint":
                self._request("checkpoint", None)
                return {"ok": True, "message": "checkpoint requested"}
            if cmd == "set_batch":
                batch = req.get("batch_size")
                if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                    return {"ok": False, "error": f"batch_size must be a positive integer, got {batch!r}"}
                if batch == self.state.batch_size and self._pending_switch is None:
                    return {"ok": False, "error": f"already training at batch {batch}"}
                self._pending_switch = batch
                self._request("switch", batch)
                return {"ok": True, "message": f"switching to batch {batch} at the next step boundary"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _handle_decide(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.state.status != "waiting":
            return {"ok": False, "error": "no decision is pending"}
        action = req.get("action")
        if action == "stop":
            self._decisions.put({"by": "user", "action": "stop", "batch_size": None})
            return {"ok": True, "message": "stopping"}
        if action != "restart":
            return {"ok": False, "error": f"action must be restart or stop, got {action!r}"}
        batch = req.get("batch_size") or (self.state.pending_decision or {}).get("proposed_batch")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            return {"ok": False, "error": "give a batch size to restart at (the ladder has no smaller rung)"}
        self._decisions.put({"by": "user", "action": "restart", "batch_size": batch})
        return {"ok": True, "message": f"restarting at batch {batch}"}

    def _request(self, action: str, batch: int | None) -> None:
        seq = self._request_seq_written + 1
        write_json_atomic(self.run.request, {"seq": seq, "action": action, "batch_size": batch})
        self._request_seq_written = seq

    def _request_seq_on_disk(self) -> int:
        try:
            return int(read_json(self.run.request)["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    # --- signals and notifications ---

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: Any) -> None:
            self._stop_reason = self._stop_reason or "sigterm"
            self._safe_request_stop()

        def on_int(signum: int, frame: Any) -> None:
            if self._stop_reason == "sigint":
                self._force = True  # a second Ctrl-C: tear the attempt down now
                return
            self._stop_reason = "sigint"
            self._safe_request_stop()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        if self.detached:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _safe_request_stop(self) -> None:
        # Runs in a signal handler: no locks (the handler may interrupt a holder of the lock).
        if self.state.status == "waiting":
            self._decisions.put({"by": "user", "action": "stop", "batch_size": None})
        elif self._attempt is not None:
            self._request("stop", None)

    def _notify(self, event: dict[str, Any]) -> None:
        argv = self.cfg.notify_argv()
        if not argv:
            return

        def run() -> None:
            try:
                subprocess.run(argv, input=ev.encode(event), timeout=30, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
            except (OSError, subprocess.SubprocessError) as e:
                if self.events is not None:
                    self.emit("log", level="warning", message=f"--notify {argv[0]} failed: {e}")

        t = threading.Thread(target=run, name="notify", daemon=False)
        t.start()
        if event.get("kind") == "run_end":
            t.join(timeout=30)


def main_detached(run_dir: str) -> int:
    """Entry of the background supervisor (``python -m sftui _supervise RUN_DIR``)."""
    return Supervisor(RunDir(Path(run_dir)), detached=True).run_forever()
