"""The screen in a browser (issue 19, item 2): `sftui serve` on a real CPU run, opened in
Debian's headless Chromium through Playwright. The page shows the run's step and loss (read from
the xterm.js terminal's own buffer), a key pressed in the page switches the batch, closing the
page ends its `sftui attach` and nothing else, and a request without the token is refused."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import kinds, processes_of, read_events, run_sftui, sftui_env, wait_for_event
from sftui.rundir import RunDir, lock_is_held
from test_tui_supervisor import end_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# textual-serve keeps its xterm.js Terminal in a closure. Its constructor assigns
# `this.terminal = new Terminal(...)`: a setter on Object.prototype sees that assignment first,
# keeps the terminal for the test and gives the object its own property, as the assignment would.
CAPTURE_TERMINAL = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  set(value) {
    Object.defineProperty(this, "terminal", {value, writable: true, configurable: true, enumerable: true});
    if (value && value.buffer && value.onData) window.sftuiTerminal = value;
  },
});
"""
READ_SCREEN = """() => {
  const t = window.sftuiTerminal;
  if (!t) return "";
  const b = t.buffer.active, rows = [];
  for (let y = 0; y < t.rows; y++) { const line = b.getLine(b.viewportY + y); rows.push(line ? line.translateToString(true) : ""); }
  return rows.join("\\n");
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def attaches(run_dir: Path) -> list[psutil.Process]:
    return [p for p in processes_of(run_dir) if "attach" in p.cmdline()]


def wait_until(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def start_server(run_dir: Path, port: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "sftui", "serve", str(run_dir), "--port", str(port)],
                              env=sftui_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in server.stdout:
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:\d+/[\w-]+/", line)
        if m:
            return server, m.group(0)
    raise AssertionError("sftui serve printed no URL:\n" + "".join(lines))


@pytest.mark.slow
def test_the_screen_in_a_browser(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("this test runs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    run_dir = tmp_path / "run"
    started = run_sftui("run", "--detach", "--run-dir", str(run_dir), "--cpu", "--max-steps", "5000", "--max-len", "32",
                        "--log-every", "1", "--checkpoint-every", "0", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    port = free_port()
    server, url = start_server(run_dir, port)
    try:
        token = url.rstrip("/").rsplit("/", 1)[1]
        assert len(token) >= 32
        # no token, or another one (its last character changed): refused, pages, scripts and the websocket alike
        wrong = token[:-1] + ("y" if token[-1] == "x" else "x")
        for path in ("/", "/ws", "/static/js/textual.js", f"/{wrong}/", f"/{wrong}/ws"):
            assert http_status(f"http://127.0.0.1:{port}{path}") == 403, path
        assert http_status(url) == 200
        listening = [c for c in psutil.Process(server.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                headless=True, viewport={"width": 1400, "height": 900})
            page = browser.new_page()
            page.add_init_script(CAPTURE_TERMINAL)
            page.goto(url)

            def shown_step() -> tuple[int, str] | None:
                """(step, loss) on the page when they are those of one of the run's step events."""
                screen = page.evaluate(READ_SCREEN)
                step, loss = re.search(r"step (\d+)/\d+", screen), re.search(r"loss (\d+\.\d{4})", screen)
                if not (step and loss):
                    return None
                shown = (int(step.group(1)), loss.group(1))
                events = {(e["step"], f"{e['loss']:.4f}") for e in kinds(read_events(run_dir), "step")}
                return shown if shown in events else None

            step, loss = wait_until("the run's step and loss on the page", shown_step, 120)
            page.screenshot(path=str(tmp_path / "sftui-serve.png"))
            print(f"screenshot of the page at step {step} (loss {loss}): {tmp_path / 'sftui-serve.png'}")
            assert len(wait_until("an `sftui attach` for the page", lambda: attaches(run_dir), 30)) == 1

            page.locator(".xterm-screen").click()
            page.keyboard.type("-")
            wait_until("the confirmation", lambda: "One rung down" in page.evaluate(READ_SCREEN), 30)
            page.keyboard.type("y")
            change = wait_for_event(run_dir, lambda e: e["kind"] == "batch_change" and e["by"] == "user", 180)
            assert (change["from"], change["to"]) == (16, 12)
            wait_until("the new rung on the page", lambda: "batch 12×1×1=12" in page.evaluate(READ_SCREEN), 60)
            page.screenshot(path=str(tmp_path / "sftui-serve-switched.png"))
            print(f"screenshot after the switch: {tmp_path / 'sftui-serve-switched.png'}")

            # the page is closed: its attach process ends; the run trains on at the new batch
            page.close()
            closed = time.time()
            wait_until("the page's `sftui attach` to end", lambda: not attaches(run_dir), 30)
            wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["t"] > closed and e["batch_size"] == 12, 180)
            assert lock_is_held(RunDir(run_dir)) and not kinds(read_events(run_dir), "run_end")

            # Ctrl-C on the server with a page open: the page's attach ends too, at once
            page = browser.new_page()
            page.goto(url)
            wait_until("an `sftui attach` for the new page", lambda: attaches(run_dir), 60)
            server.send_signal(signal.SIGINT)
            assert server.wait(15) == 0  # not aiohttp's minute of waiting for open pages
            assert not attaches(run_dir)
            browser.close()
        assert lock_is_held(RunDir(run_dir)) and not kinds(read_events(run_dir), "run_end")
    finally:
        end_run(run_dir)
        if server.poll() is None:  # the test failed before it stopped the server
            server.kill()
            server.wait()


def test_serve_refuses_bad_input_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for args, needle in (
            (["serve", str(tmp_path)], "not a run directory (no run.json)"),
            (["serve", str(run_dir), "--port", "0"], "--port: expected an integer >= 1"),
            (["serve", str(run_dir), "--port", "70000"], "--port: expected a port from 1 to 65535"),
            (["serve", str(run_dir), "--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}: Address already in use"),
            (["serve"], "no runs under ./runs; give a RUN_DIR"),
        ):
            result = run_sftui(*args, cwd=tmp_path, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
            assert result.stdout == "", result.stdout
