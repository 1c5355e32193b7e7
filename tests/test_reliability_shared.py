"""A shared server: another user can neither command nor read a run (a real second uid, `nobody`,
where the tests run as root), everything sftui writes is its owner's alone, nothing of a run
listens beyond loopback, and two runs at once rendezvous on different ports and both finish."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import (
    assert_each_sample_once,
    kinds,
    processes_of,
    read_events,
    run_sftui,
    wait_for_event,
    wait_no_processes,
    write_rows,
)
from sftui import rundir

COMMON = ["--cpu", "--max-len", "32", "--log-every", "1", "--batch", "4"]
LOOPBACK = {"127.0.0.1", "::1"}


def private_modes(run_dir: Path) -> list[str]:
    """Every path under the run directory that its group or others may read, write or enter."""
    wide = []
    for p in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o077:
            wide.append(f"{p.relative_to(run_dir.parent)} {mode:04o}")
    return wide


def detach(run_dir: Path, data: Path, *args: str) -> None:
    r = run_sftui("run", "--detach", "--run-dir", str(run_dir), *COMMON, "--data", str(data), *args,
                  cwd=run_dir.parent, timeout=120)
    assert r.returncode == 0, r.stderr


# --- another user -----------------------------------------------------------------------------------

CLIENT = r"""
import json, os, socket, sys
run_dir, sock_path, what = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"uid": os.getuid()}
def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except OSError as e:
        out[name] = [type(e).__name__, e.errno]
def talk(cmd):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return json.loads(data) if data else None
if what == "files":
    attempt("listdir", lambda: os.listdir(run_dir))
    for name in ("run.json", "events.jsonl", "attempt-1.log"):
        attempt(name, lambda: open(os.path.join(run_dir, name), "rb").read(10).decode("latin-1"))
attempt("ping", lambda: talk("ping"))
attempt("stop", lambda: talk("stop"))
print(json.dumps(out))
"""


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    nobody = pwd.getpwnam("nobody")

    def demote() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    return subprocess.run([python, "-c", CLIENT, *args], preexec_fn=demote, capture_output=True, text=True,
                          timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})


def can_switch_uid() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return os.geteuid() == 0


@pytest.fixture
def shared_dir():
    """A directory other users may pass through (0711) but not list, as /home/alice often is;
    pytest's own temporary root is 0700, which would hide the run from `nobody` by itself."""
    base = Path(tempfile.mkdtemp(prefix="sftui-shared-", dir="/tmp"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not can_switch_uid(), reason="needs root and a 'nobody' user to act as a second uid")
def test_another_user_can_neither_read_the_run_nor_command_it(shared_dir):
    data = write_rows(shared_dir / "d.jsonl", 800)
    os.chmod(data, 0o644)
    run_dir = shared_dir / "run"
    detach(run_dir, data, "--checkpoint-every", "2")
    try:
        wait_for_event(run_dir, lambda e: e["kind"] == "checkpoint")
        sock = rundir.read_json(run_dir / "run.json")["socket"]
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(sock).st_mode)

        # As built: the run directory (0700) stops `nobody` at the door, socket included.
        r = as_nobody(str(run_dir), sock, "files")
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        assert seen["uid"] == pwd.getpwnam("nobody").pw_uid
        for name in ("listdir", "run.json", "events.jsonl", "attempt-1.log", "ping", "stop"):
            assert seen[name] == ["PermissionError", 13], (name, seen)

        # Even with the directory and the socket opened up, the supervisor checks the peer's uid.
        os.chmod(run_dir, 0o711)
        os.chmod(sock, 0o666)
        try:
            r = as_nobody(str(run_dir), sock, "socket")
        finally:
            os.chmod(sock, 0o600)
            os.chmod(run_dir, 0o700)
        seen = json.loads(r.stdout)
        refused = {"ok": False, "error": "permission denied: not the owner of this run"}
        assert seen["ping"] == ["ok", refused] and seen["stop"] == ["ok", refused], seen
        before = max(e["step"] for e in kinds(read_events(run_dir), "step"))
        wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] > before + 2)
        assert rundir.read_json(run_dir / "run.json")["status"] == "running"
        assert not (run_dir / "request.json").exists(), "a refused stop reached the worker"
    finally:
        run_sftui("stop", str(run_dir))
    end = wait_for_event(run_dir, lambda e: e["kind"] == "run_end", 60)
    assert end["exit_code"] == 4
    wait_no_processes(run_dir)
    # Whatever sftui wrote, it wrote for its owner alone: logs, checkpoints, cache, tokenizer, requests.
    assert (run_dir / "supervisor.log").exists() and list(run_dir.glob("checkpoints/step-*/optimizer.pt"))
    assert private_modes(run_dir) == []


# --- the network ------------------------------------------------------------------------------------


def listening(run_dir: Path) -> set[tuple[str, int]]:
    out = set()
    for p in processes_of(run_dir):
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return out


def rendezvous_port(run_dir: Path) -> int | None:
    for p in processes_of(run_dir):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == "0" and env.get("MASTER_PORT") not in (None, "0"):  # "0": ranks started ahead, waiting
            assert env["MASTER_ADDR"] == "127.0.0.1"
            return int(env["MASTER_PORT"])
    return None


def test_two_runs_at_once_listen_on_loopback_only_on_their_own_ports(tmp_path):
    """Two 2-rank runs at the same time on one machine: every listening socket of their processes
    (supervisor, ranks, dataloader workers) is on loopback; each rendezvous has its own port, and
    both finish training every sample once. Their files are private, final/ included."""
    rows = 320
    data = write_rows(tmp_path / "d.jsonl", rows)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        detach(run_dir, data, "--num-processes", "2", "--record-samples", "--checkpoint-every", "10")
    seen: dict[Path, set[tuple[str, int]]] = {r: set() for r in runs}
    ports: dict[Path, int | None] = {r: None for r in runs}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(kinds(read_events(r), "run_end") for r in runs):
        for r in runs:
            seen[r] |= listening(r)
            ports[r] = ports[r] or rendezvous_port(r)
        time.sleep(0.05)
    for r in runs:
        end = kinds(read_events(r), "run_end")
        assert end and end[0]["exit_code"] == 0, read_events(r)[-5:]
        wide = {addr for addr in seen[r] if addr[0] not in LOOPBACK}
        assert not wide, f"{r.name} listened beyond loopback: {wide}"
        assert ports[r] is not None and ("127.0.0.1", ports[r]) in seen[r], (ports[r], seen[r])
        assert_each_sample_once(r, rows)
        wait_no_processes(r)
        assert (r / "final").is_dir() and private_modes(r) == []
    assert ports[runs[0]] != ports[runs[1]]
