"""The control socket: newline-delimited JSON requests from clients to the supervisor.

One request per line, one reply per request: ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
The socket is a Unix socket, mode 0600, and the server checks the peer's uid with
``SO_PEERCRED``, so on a shared server another user can neither connect nor send commands.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable

from sftui.rundir import RunDir
from sftui.runfile import RunFile

COMMANDS = ("ping", "set_batch", "decide", "checkpoint", "stop")


class ControlError(Exception):
    """The supervisor could not be reached or refused the request."""


def socket_path(run: RunDir) -> Path | None:
    try:
        path = RunFile.read(run).socket
    except (OSError, ValueError):
        return None
    return Path(path) if path else None


def request(run: RunDir, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the run's supervisor and return its reply (raises ControlError)."""
    path = socket_path(run)
    if path is None:
        raise ControlError(f"{run.path}: no control socket recorded (is this a run directory?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"{run.path}: the supervisor is not running") from None
        except socket.timeout:
            raise ControlError(f"{run.path}: the supervisor did not answer within {timeout:g} s") from None
        except PermissionError:
            raise ControlError(f"{run.path}: permission denied on the control socket (another user's run?)") from None
        except (BrokenPipeError, ConnectionResetError):
            raise ControlError(f"{run.path}: the supervisor closed the connection") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{run.path}: unreadable reply from the supervisor") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")))
    return reply


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Accepts connections on a background thread and answers each line with ``handler(request)``.

    The handler runs on the server thread; the supervisor makes it thread-safe.
    """

    def __init__(self, path: Path, handler: Callable[[dict[str, Any]], dict[str, Any]]):
        self.path = Path(path)
        self.handler = handler
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._sock.settimeout(0.5)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            if peer_uid(conn) != os.getuid():
                # Take the client's request line first: closing on a client that is still sending
                # would reach it as a broken pipe instead of this answer.
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(b'{"ok": false, "error": "permission denied: not the owner of this run"}\n')
                except OSError:
                    pass
                return
            buf = b""
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        conn.sendall(json.dumps(self._answer(line), default=str).encode() + b"\n")
                    if len(buf) > 1 << 20:
                        return
            except OSError:
                return

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
            return {"ok": False, "error": f"unknown command; expected one of {', '.join(COMMANDS)}"}
        try:
            return self.handler(req)
        except Exception as e:  # a bad request must never kill the supervisor
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.close()
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
