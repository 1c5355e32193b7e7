"""End to end in a real terminal: `sftui run` (the TUI) inside tmux at 120x40, keys sent with
send-keys, the screen read with capture-pane: a batch switch, a detach (q prints the attach
command, training goes on), `sftui attach`, and a stop.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftui.rundir import RunDir, lock_is_held, read_json
from test_tui_supervisor import end_run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SFTUI = Path(sys.executable).with_name("sftui")


class Pane:
    def __init__(self, session: str, cwd: Path):
        self.session = session
        self._tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-c", str(cwd),
                   "env", "-i", f"HOME={os.environ.get('HOME', '/tmp')}", f"PATH={os.environ['PATH']}",
                   "TERM=xterm-256color", "bash", "--norc", "--noprofile")
        self._tmux("set-option", "-t", session, "status", "off")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", self.session, "-l", "--", line)
        self._tmux("send-keys", "-t", self.session, "Enter")

    def key(self, key: str) -> None:
        self._tmux("send-keys", "-t", self.session, "--", key)

    def text(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session)

    def wait(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first match of ``pattern`` on the screen; the default timeout is generous (a loaded
        2-core box), and a wait ends as soon as the text shows."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.text()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not on the screen after {timeout:g} s:\n{screen}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


def test_switch_detach_attach_stop_in_tmux(tmp_path):
    run_dir = tmp_path / "run"
    env = ""
    if os.environ.get("PYTHONPATH"):  # keep the interpreter's view of the package in the pane
        env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} "
    pane = Pane(f"sftui-e2e-{os.getpid()}", tmp_path)
    try:
        pane.type(f"{env}{SFTUI} run --cpu --max-steps 5000 --log-every 1 --checkpoint-every 0 --run-dir {run_dir}")
        pane.wait(r"RUNNING.*batch 16×1×1=16", 90)
        pane.wait(r"│ step [1-9]\d*/\d+", 90)  # training

        # a switch: one rung down, confirmed
        pane.key("-")
        pane.wait(r"One rung down")
        pane.wait(r"12×1×1=12\?")
        pane.key("y")
        pane.wait(r"switch to batch 12 requested")
        pane.wait(r"attempt 2 │ batch 12×1×1=12", 60)

        # detach: q leaves the screen, prints how to come back, and training goes on
        pane.key("q")
        pane.wait(r"Training goes on in the background")
        pane.wait(re.escape(f"sftui attach {run_dir}"))
        assert lock_is_held(RunDir(run_dir))
        step_before = read_json(RunDir(run_dir).run_json)["attempt"]
        assert step_before == 2

        # attach again
        pane.type(f"{env}{SFTUI} attach {run_dir}")
        pane.wait(r"RUNNING.*attempt 2 │ batch 12×1×1=12", 30)

        # stop, confirmed; the run ends as stopped (resumable)
        pane.key("s")
        pane.wait(r"Stop training\?")
        pane.key("y")
        pane.wait(r"stop requested")
        pane.wait(r"STOPPED", 60)
        pane.key("q")
        pane.wait(r"The run is stopped")
        assert read_json(RunDir(run_dir).run_json)["exit_code"] == 4
    finally:
        pane.close()
        end_run(run_dir)
