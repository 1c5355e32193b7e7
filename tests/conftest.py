"""Shared fixtures: run the real `sftui` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


def sftui_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_sftui(*args: str, cwd: Path | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m sftui ARGS` as a user would run it (stdout is not a TTY, so `run` is headless)."""
    return subprocess.run(
        [sys.executable, "-m", "sftui", *args], cwd=cwd, env=sftui_env(), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, **kw,
    )


@pytest.fixture
def sftui():
    return run_sftui
