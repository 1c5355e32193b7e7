"""Every key of the TUI, driven with Textual's pilot on replayed run directories.

Commands go to a real ``control.ControlServer`` on the run's socket whose handler records the
requests, so the tests see exactly what the supervisor would receive (the real supervisor is
driven in test_tui_supervisor.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sftui import control
from sftui.rundir import EventLog, RunDir, read_json, write_json_atomic
from sftui.tui.app import SftuiApp
from sftui.tui.confirm import BatchScreen, ConfirmScreen
from sftui.tui.help import HelpScreen
from sftui.tui.oom import OomScreen
from test_tui_support import CLOCK, HeldLock, fixed_clock, make_run, polled, screen_text, until


class Recorder:
    """A control server on the run's socket that answers ok and remembers each request."""

    def __init__(self, path: Path, reply_error: str | None = None):
        self.requests: list[dict] = []
        self.reply_error = reply_error
        self.event = threading.Event()
        self.server = control.ControlServer(Path(read_json(RunDir(path).run_json)["socket"]), self.handle)

    def handle(self, req: dict) -> dict:
        if req.get("cmd") != "ping":
            self.requests.append(req)
            self.event.set()
        if self.reply_error:
            return {"ok": False, "error": self.reply_error}
        return {"ok": True}

    def commands(self) -> list[dict]:
        return list(self.requests)

    def close(self) -> None:
        self.server.close()


class NotedApp(SftuiApp):
    """The app, with its notifications kept for the assertions."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[tuple[str, str]] = []

    def notify(self, message, *, title="", severity="information", timeout=None, markup=True):
        self.notes.append((str(message), severity))
        return super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def noted(self, part: str) -> bool:
        return any(part in m for m, _ in self.notes)


@pytest.fixture
def live(tmp_path):
    path = make_run(tmp_path, "live")
    lock = HeldLock(path)
    rec = Recorder(path)
    yield path, rec
    rec.close()
    lock.release()


async def key_latency(app, key: str, char: str, shown) -> float:
    """Seconds from a key event reaching the app to ``shown()`` (the pilot's own waits excluded;
    at most a little over 5 s, when it never shows)."""
    import asyncio

    from textual import events

    t0 = time.perf_counter()
    app.post_message(events.Key(key, char))
    while not shown():
        await asyncio.sleep(0.001)
        if time.perf_counter() - t0 > 5:
            break
    return time.perf_counter() - t0


async def test_help_opens_and_closes(live):
    path, _ = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for key in ("+  -", "checkpoint now", "stop training", "Ctrl-C", "training goes on"):
            assert key in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_rung_up_confirm_shows_forecast_and_cancel_sends_nothing(live):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock, poll_interval=3600)  # no poll after the first
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        latency = await key_latency(app, "plus", "+", lambda: isinstance(app.screen, ConfirmScreen)
                                    and any(d.region.height > 0 for d in app.screen.query(".dialog")))
        # Drawn from the view in hand, not after a poll (none comes) or a reply: a dialog takes
        # a few ms, or a few hundred on a loaded 2-core box; 2 s is the bound that cannot flake.
        assert latency < 2.0, f"the confirmation took {latency * 1000:.0f} ms to appear"
        text = screen_text(app)
        assert "16×2×2=64" in text and "12×2×2=48" in text
        assert "batch 16 ran out of memory before" in text  # the forecast of the new rung
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("plus")
        await pilot.press("escape")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.pause(0.2)
        assert rec.commands() == []
        assert app.noted("cancelled")


async def test_rung_down_confirmed_with_enter_sends_set_batch(live):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press("minus")
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "8×2×2=32" in text and "peak memory at batch 8: ?" in text
        await pilot.press("enter")
        assert app.noted("switch to batch 8 requested")  # at once, before the reply
        await until(pilot, lambda: rec.commands(), what="the request")
        assert rec.commands() == [{"cmd": "set_batch", "batch_size": 8}]


async def test_rung_up_confirmed_with_y(live):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press("plus", "y")
        await until(pilot, lambda: rec.commands(), what="the request")
        assert rec.commands() == [{"cmd": "set_batch", "batch_size": 16}]


async def test_top_and_bottom_of_the_ladder_say_so(tmp_path):
    path = make_run(tmp_path, "nogpu")  # at batch 16, the top rung
    lock = HeldLock(path)
    try:
        app = NotedApp(path, clock=fixed_clock)
        async with app.run_test(size=(100, 30)) as pilot:
            await polled(pilot)
            await pilot.press("plus")
            assert not isinstance(app.screen, ConfirmScreen)
            assert app.noted("already the top of the ladder")
    finally:
        lock.release()


async def test_batch_input_validates_then_sends(live):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press("b")
        assert isinstance(app.screen, BatchScreen)
        from textual.widgets import Input

        inp = app.screen.query_one(Input)
        await pilot.press("enter")  # empty
        assert "type a batch size" in screen_text(app)
        await pilot.press("x", "-", "0")  # letters and signs are not accepted; 0 is refused
        assert inp.value == "0"
        await pilot.press("enter")
        assert isinstance(app.screen, BatchScreen)
        assert "at least 1" in screen_text(app)
        await pilot.press("backspace", "1", "6")
        assert "16×2×2=64" in screen_text(app) and "ran out of memory before" in screen_text(app)
        await pilot.press("backspace", "backspace", "1", "0", "enter")
        assert not isinstance(app.screen, BatchScreen)
        assert app.noted("switch to batch 10 requested")
        await until(pilot, lambda: rec.commands(), what="the request")
        assert rec.commands() == [{"cmd": "set_batch", "batch_size": 10}]
        await pilot.press("b", "escape")
        assert not isinstance(app.screen, BatchScreen)
        assert len(rec.commands()) == 1


async def test_checkpoint_and_stop(live):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press("c")
        assert app.noted("checkpoint requested")
        await until(pilot, lambda: len(rec.commands()) == 1, what="checkpoint")
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.1)
        assert len(rec.commands()) == 1
        await pilot.press("s", "y")
        assert app.noted("stop requested")
        await until(pilot, lambda: len(rec.commands()) == 2, what="stop")
        assert rec.commands() == [{"cmd": "checkpoint"}, {"cmd": "stop"}]


async def test_refused_and_unreachable_commands_are_notifications(tmp_path):
    path = make_run(tmp_path, "live")
    lock = HeldLock(path)
    try:
        app = NotedApp(path, clock=fixed_clock)  # no control socket at all
        async with app.run_test(size=(100, 30)) as pilot:
            await polled(pilot)
            await pilot.press("c")
            await until(pilot, lambda: app.noted("supervisor is not running"), what="the error")
            assert app.is_running
        rec = Recorder(path, reply_error="no attempt is running (status starting)")
        try:
            app = NotedApp(path, clock=fixed_clock)
            async with app.run_test(size=(100, 30)) as pilot:
                await polled(pilot)
                await pilot.press("c")
                await until(pilot, lambda: app.noted("no attempt is running"), what="the refusal")
                assert any(sev == "error" for m, sev in app.notes if "no attempt" in m)
        finally:
            rec.close()
    finally:
        lock.release()


@pytest.mark.parametrize("key", ["q", "ctrl+c", "ctrl+q"])
async def test_leaving_keys_exit(live, key):
    path, rec = live
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        await pilot.press(key)
        await until(pilot, lambda: not app.is_running, what="the app to end")
    assert rec.commands() == []  # leaving sends nothing: the supervisor is not touched


async def test_finished_run_keys_say_so(tmp_path):
    path = make_run(tmp_path, "finished")
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot)
        for key in ("plus", "minus", "b", "c", "s"):
            await pilot.press(key)
            assert app.screen is app.screen_stack[0], key
        assert sum("the run has finished" in m for m, _ in app.notes) == 5
        await pilot.press("question_mark")  # help still works
        assert isinstance(app.screen, HelpScreen)


async def test_lost_run_is_shown_and_keys_say_so(tmp_path):
    path = make_run(tmp_path, "live")  # run.json says running, but nobody holds the lock
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(120, 30)) as pilot:
        await polled(pilot)
        assert app.view.status == "lost"
        assert "LOST" in screen_text(app)
        await pilot.press("c")
        assert app.noted("run lost") and app.noted("sftui run --resume")


async def test_crashed_run_shows_the_workers_last_lines(tmp_path):
    path = make_run(tmp_path, "crash")
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        text = screen_text(app)
        assert "FAILED" in text and "attempt 2 crashed (exit 3)" in text
        assert "attempt 2 ended: crash after step 60" in text
        assert "RuntimeError: NCCL watchdog timeout" in text  # the crash tail from the event
        assert "last lines of attempt-2.log" in text and "killed by signal 9" in text  # and from the log file


# --- the OOM prompt ---------------------------------------------------------------------------


@pytest.fixture
def oom(tmp_path):
    path = make_run(tmp_path, "oom")
    lock = HeldLock(path)
    rec = Recorder(path)
    yield path, rec
    rec.close()
    lock.release()


async def test_oom_prompt_accept(oom):
    path, rec = oom
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot, OomScreen)
        text = screen_text(app)
        assert "Step 6 ran out of memory at batch 16" in text
        assert "on GPU 1" in text and "78.1/80.0 GiB used at the time" in text
        assert "restart at batch 12×2×2=48" in text and "from step 5 (emergency" in text
        assert "Automatic choice in 23 s" in text
        await pilot.press("y")
        assert app.noted("restart at batch 12 requested")
        await until(pilot, lambda: rec.commands(), what="decide")
        assert rec.commands() == [{"cmd": "decide", "action": "restart", "batch_size": 12}]
        await pilot.press("enter")  # a second answer is not sent twice
        await pilot.pause(0.1)
        assert len(rec.commands()) == 1


async def test_oom_prompt_refuse_and_pick(oom):
    path, rec = oom
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot, OomScreen)
        await pilot.press("9")
        assert app.noted("no rung 9")
        await pilot.press("n")
        await until(pilot, lambda: rec.commands(), what="decide stop")
        assert rec.commands() == [{"cmd": "decide", "action": "stop", "batch_size": None}]
    app = NotedApp(path, clock=fixed_clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot, OomScreen)  # comes back on re-attach while the decision is pending
        await pilot.press("3")
        await until(pilot, lambda: len(rec.commands()) == 2, what="decide 8")
        assert rec.commands()[-1] == {"cmd": "decide", "action": "restart", "batch_size": 8}


async def test_oom_prompt_countdown_and_disappears_on_decision(oom):
    path, rec = oom
    now = [CLOCK]
    app = NotedApp(path, clock=lambda: now[0], poll_interval=0.1)
    async with app.run_test(size=(100, 30)) as pilot:
        await polled(pilot, OomScreen)
        screen = app.screen
        now[0] = CLOCK + 10
        screen.tick()
        assert "Automatic choice in 13 s" in screen_text(app)
        now[0] = CLOCK + 30
        screen.tick()
        assert "Time is up" in screen_text(app)
        # the supervisor decides (timeout): a decision event, run.json cleared
        run = RunDir(path)
        with EventLog(run.events, attempt=1) as log:
            log.emit("decision", by="timeout", action="restart", batch_size=12)
        data = read_json(run.run_json)
        data.update(status="running", pending_decision=None)
        write_json_atomic(run.run_json, data)
        await until(pilot, lambda: not isinstance(app.screen, OomScreen), what="the prompt to go")
        assert app.noted("decision by timeout: restart at batch 12")
