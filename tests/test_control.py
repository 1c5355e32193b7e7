"""control.py: the socket is private, replies come one per line, bad requests get errors."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from sftui import rundir
from sftui.control import ControlError, ControlServer, request


@pytest.fixture
def served(tmp_path):
    run = rundir.create(tmp_path / "r")
    seen = []

    def handler(req):
        seen.append(req)
        if req["cmd"] == "set_batch":
            raise ValueError("boom")
        return {"ok": True, "echo": req["cmd"]}

    server = ControlServer(run.default_socket_path(), handler)
    rundir.write_json_atomic(run.run_json, {"socket": str(server.path)})
    yield run, server, seen
    server.close()


def test_socket_is_0600_and_answers(served):
    run, server, seen = served
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert request(run, {"cmd": "ping"})["echo"] == "ping"
    assert seen == [{"cmd": "ping"}]


def test_errors_are_replies_not_crashes(served):
    run, server, _ = served
    with pytest.raises(ControlError, match="unknown command"):
        request(run, {"cmd": "rm -rf"})
    with pytest.raises(ControlError, match="ValueError: boom"):
        request(run, {"cmd": "set_batch"})
    with socket.socket(socket.AF_UNIX) as s:  # raw garbage, then a good line on the same connection
        s.connect(str(server.path))
        s.sendall(b"not json\n" + json.dumps({"cmd": "ping"}).encode() + b"\n")
        replies = b""
        while replies.count(b"\n") < 2:
            replies += s.recv(4096)
    first, second = [json.loads(x) for x in replies.splitlines()]
    assert first == {"ok": False, "error": "not JSON"} and second["ok"]


def test_no_supervisor_is_a_clear_error(tmp_path):
    run = rundir.create(tmp_path / "r")
    rundir.write_json_atomic(run.run_json, {"socket": str(tmp_path / "gone.sock")})
    with pytest.raises(ControlError, match="not running"):
        request(run, {"cmd": "ping"})
    server_closed = rundir.create(tmp_path / "s")
    with pytest.raises(ControlError, match="no control socket"):
        request(server_closed, {"cmd": "ping"})


def test_a_connection_closed_by_the_server_is_a_clear_error(tmp_path):
    run = rundir.create(tmp_path / "r")
    path = tmp_path / "rude.sock"
    rundir.write_json_atomic(run.run_json, {"socket": str(path)})
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    import threading

    def slam() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # a reset, before any reply

    t = threading.Thread(target=slam)
    t.start()
    try:
        with pytest.raises(ControlError):
            request(run, {"cmd": "ping"})
    finally:
        t.join()
        server.close()
