"""The sftui screen: a Textual client of one run directory.

The app reads the run only through ``viewmodel.Poller`` (a ``RunWatcher``), on a worker thread:
each poll runs off the UI thread and re-arms itself with ``set_timer`` when its result has been
shown, so polls never overlap and a slow disk never freezes the keys. Commands go to the supervisor over
the control socket, also on worker threads. Leaving the app never touches the supervisor:
training goes on, and ``run_tui`` prints the command to come back.
"""

from __future__ import annotations

import errno
import shlex
import sys
import termios
import time
from time import monotonic
from pathlib import Path
from typing import Any, Callable

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.geometry import Size
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Footer

from sftui import control
from sftui.config import next_rung, rung_above
from sftui.rundir import RunDir, lock_is_held
from sftui.runfile import ENDED
from sftui.runstate import LIVE_STATUSES, RunState, describe_event
from sftui.tui.chart import LossChart
from sftui.tui.confirm import BatchScreen, ConfirmScreen
from sftui.tui.gpus import GpuPanel
from sftui.tui.header import HeaderPanel
from sftui.tui.help import HelpScreen
from sftui.tui.ladder import LadderPanel
from sftui.tui.logtail import LogPanel
from sftui.tui.oom import OomScreen
from sftui.tui.progress import ProgressPanel
from sftui.tui.system import SystemPanel
from sftui.tui.view import Panel, forecast_text
from sftui.viewmodel import Poller, View, rung_effective, wall_clock

PING_EVERY_S = 2.0  # the supervisor asks (--on-oom ask) while a TUI pinged within its freshness window
COMPACT_WIDTH = 100
COMPACT_HEIGHT = 32


class Polled(Message):
    """A poll finished: ``view`` is None when nothing visible changed; ``hung_up``: the terminal
    is gone."""

    def __init__(self, view: View | None, error: str | None = None, hung_up: bool = False):
        super().__init__()
        self.view = view
        self.error = error
        self.hung_up = hung_up


def terminal_hung_up() -> bool:
    """True once the terminal on stdin has hung up. A dropped SSH connection or a closed tmux pane
    does not always reach the TUI as SIGHUP (the session's leader was `make`, not a shell, or the
    TUI ran in a session of its own); Textual's input thread then reads end-of-file forever, at a
    whole core. Only EIO counts: no terminal at all (a test's headless driver) is not a hang-up."""
    try:
        termios.tcgetattr(sys.__stdin__.fileno())
    except termios.error as e:
        return bool(e.args) and e.args[0] == errno.EIO
    except (OSError, ValueError, AttributeError):  # stdin closed or replaced
        return False
    return False


class CommandDone(Message):
    def __init__(self, payload: dict[str, Any], reply: dict[str, Any] | None, error: str | None):
        super().__init__()
        self.payload = payload
        self.reply = reply
        self.error = error


class SftuiApp(App[None]):
    CSS_PATH = Path(__file__).with_name("sftui.tcss")  # absolute: subclasses live elsewhere
    TITLE = "sftui"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("plus,equals_sign", "rung(1)", "rung up", key_display="+"),
        Binding("minus,underscore", "rung(-1)", "rung down", key_display="-"),
        Binding("b", "batch", "batch"),
        Binding("c", "checkpoint", "checkpoint"),
        Binding("s", "stop", "stop"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "leave", "leave"),
        Binding("ctrl+c", "leave", "leave", show=False, priority=True),
        Binding("ctrl+q", "leave", "leave", show=False, priority=True),
    ]

    def __init__(self, run_dir: Path, clock: Callable[[], float] | None = None, poll_interval: float = 1.0,
                 history: bool = True):
        super().__init__()
        self.run_dir = Path(run_dir).absolute()
        self.clock = clock or wall_clock()
        self.poll_interval = poll_interval
        self.poller = Poller(self.run_dir, history=history)
        self.view: View | None = None
        self.poll_count = 0
        self.hung_up = False  # the terminal went away: the app ended without a word
        self.stop_requested = False  # this screen asked the supervisor to stop the run (s + y, or n at an OOM)
        self._polling = False
        self._poll_again = False
        self._timer: Timer | None = None
        self._oom: OomScreen | None = None
        self._pinging = False
        self._last_ping = float("-inf")

    # --- layout ---

    def compose(self) -> ComposeResult:
        yield HeaderPanel(id="header")
        yield GpuPanel("GPUs", id="gpus", classes="panel")
        with Horizontal(id="middle"):
            yield ProgressPanel("progress", id="progress", classes="panel")
            yield LadderPanel("ladder", id="ladder", classes="panel")
            yield SystemPanel("system", id="system", classes="panel")
        yield LossChart("loss", id="chart", classes="panel")
        yield LogPanel("log", id="log", classes="panel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._set_compact(self.size)
        self.poll_now()

    def on_resize(self, event: events.Resize) -> None:
        # This handler runs before App._on_resize has stored the new size (``self.size`` is still
        # the old one here) and before the screens lay out for it: the classes must follow the
        # event's size, or each resize gets the previous size's layout.
        self._set_compact(event.size)

    def _set_compact(self, size: Size) -> None:
        w, h = size
        main = self.screen_stack[0]  # the dashboard, even while a dialog is on top
        main.set_class(w < COMPACT_WIDTH or h < COMPACT_HEIGHT, "compact")
        main.set_class(h < 20, "tiny")

    # --- polling: a worker thread reads, the UI thread shows, then re-arms ---

    def poll_now(self) -> None:
        """Poll at once (or right after the poll in flight): after a key command."""
        if self._polling:
            self._poll_again = True
            return
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._polling = True
        self._poll_worker(self.view is None)

    @work(thread=True, exclusive=False, group="poll", exit_on_error=False)
    def _poll_worker(self, force: bool) -> None:
        if terminal_hung_up():
            self.post_message(Polled(None, hung_up=True))
            return
        try:
            view = self.poller.poll(force=force)
            msg = Polled(view)
        except Exception as e:  # a torn file or a vanished directory is shown, never a crash
            msg = Polled(None, f"{type(e).__name__}: {e}")
        self.post_message(msg)

    def on_polled(self, message: Polled) -> None:
        self._polling = False
        if message.hung_up:
            self.hung_up = True
            self.exit()
            return
        self.poll_count += 1
        if message.error:
            self.notify(f"reading the run failed: {message.error}", severity="error", timeout=5)
        if message.view is not None:
            self.view = message.view
            self._show(message.view)
        delay = 0.02 if self._poll_again else self.poll_interval
        self._poll_again = False
        self._timer = self.set_timer(delay, self.poll_now)
        self._maybe_ping()

    # --- presence: a live supervisor learns that a TUI is attached (so --on-oom defaults to ask) ---

    def _maybe_ping(self) -> None:
        v = self.view
        if v is None or not v.live or self._pinging:
            return
        now = monotonic()
        if now - self._last_ping < PING_EVERY_S:
            return
        self._last_ping = now
        self._pinging = True
        self._ping_worker()

    @work(thread=True, group="ping", exit_on_error=False)
    def _ping_worker(self) -> None:
        try:
            control.request(RunDir(self.run_dir), {"cmd": "ping", "client": "tui"}, timeout=1.0)
        except Exception:
            pass  # the header shows the state of the run; a missed ping is not news
        finally:
            self._pinging = False

    def _show(self, view: View) -> None:
        # a failed or lost run: the log (the worker's last lines) matters more than the chart
        self.screen_stack[0].set_class(view.in_trouble, "trouble")
        for panel in self.screen_stack[0].query(Panel):
            panel.show(view)
        self._sync_oom(view)

    # --- the OOM prompt follows RunState.pending_decision ---

    def _sync_oom(self, view: View) -> None:
        pending = view.state.pending_decision is not None and view.status in LIVE_STATUSES
        if pending and self._oom is None:
            # stale dialogs (a rung confirmation, the batch input) make no sense under the prompt
            while len(self.screen_stack) > 1 and isinstance(self.screen, (ConfirmScreen, BatchScreen)):
                self.pop_screen()
            self._oom = OomScreen(view, self.clock)
            self.push_screen(self._oom)
        elif pending and self._oom is not None:
            self._oom.update_view(view)
        elif not pending and self._oom is not None:
            oom, self._oom = self._oom, None
            if oom in self.screen_stack:
                while self.screen is not oom:
                    self.pop_screen()
                self.pop_screen()
            decision = describe_event(view.last_decision) if view.last_decision else None
            if decision:
                self.notify(decision, title="out of memory", timeout=4)

    def on_oom_screen_decided(self, message: OomScreen.Decided) -> None:
        """An answer at the prompt: the prompt stays (saying it was sent) until the decision event."""
        what = f"restart at batch {message.batch}" if message.action == "restart" else "stop"
        self.notify(f"{what} requested…", timeout=3)
        self._send({"cmd": "decide", "action": message.action, "batch_size": message.batch}, announce=None)

    # --- commands ---

    def _usable(self, what: str) -> bool:
        """True when a command can reach a live run; else say why."""
        v = self.view
        if v is None:
            self.notify("still reading the run…", severity="warning", timeout=2)
            return False
        if v.status in ENDED:
            self.notify(f"the run has {v.status}: nothing to {what}", severity="warning", timeout=3)
            return False
        if v.status == "lost":
            self.notify(f"the supervisor is gone (run lost): cannot {what}. "
                        f"Resume with: sftui run --resume {v.state.path}", severity="error", timeout=6)
            return False
        return True

    def _send(self, payload: dict[str, Any], announce: str | None) -> None:
        if _is_stop(payload):
            self.stop_requested = True
        if announce:
            self.notify(announce, timeout=3)
        self._command_worker(payload)

    @work(thread=True, group="control", exit_on_error=False)
    def _command_worker(self, payload: dict[str, Any]) -> None:
        try:
            reply, error = control.request(RunDir(self.run_dir), payload), None
        except control.ControlError as e:
            reply, error = None, str(e)
        except Exception as e:  # never a crash: the error is shown
            reply, error = None, f"{type(e).__name__}: {e}"
        self.post_message(CommandDone(payload, reply, error))

    def on_command_done(self, message: CommandDone) -> None:
        if message.error:
            if _is_stop(message.payload):
                self.stop_requested = False  # it never reached the supervisor: nothing to wait for
            self.notify(f"{message.payload['cmd']}: {message.error}", severity="error", timeout=6)
            if message.payload["cmd"] == "decide" and self._oom is not None:
                self._oom.failed(message.error)
        self.poll_now()

    def action_rung(self, direction: int) -> None:
        if not self._usable("switch"):
            return
        s = self.view.state
        if s.batch_size is None or not s.ladder:
            self.notify("the current rung is not known yet", severity="warning", timeout=3)
            return
        new = rung_above(s.ladder, s.batch_size) if direction > 0 else next_rung(s.ladder, s.batch_size)
        if new is None:
            self.notify(f"batch {s.batch_size} is already the {'top' if direction > 0 else 'bottom'} of the ladder",
                        severity="warning", timeout=3)
            return
        body = Text.assemble(
            f"Switch from batch {rung_effective(self.view, s.batch_size)} to ",
            (rung_effective(self.view, new), "bold"), "?\n",
            "Training checkpoints, then restarts at the new batch from that step.\n\n",
            forecast_text(self.view, new),
        )
        self.push_screen(ConfirmScreen(f"One rung {'up' if direction > 0 else 'down'}", body, yes=f"switch to {new}"),
                         lambda ok: self._switch(new) if ok else self.notify("cancelled", timeout=2))

    def _switch(self, batch: int) -> None:
        self._send({"cmd": "set_batch", "batch_size": batch}, f"switch to batch {batch} requested…")

    def action_batch(self) -> None:
        if not self._usable("switch"):
            return
        view = self.view

        def describe(value: int) -> Text:
            return Text.assemble(f"→ {rung_effective(view, value)}\n", forecast_text(view, value))

        def done(value: int | None) -> None:
            if value is None:
                self.notify("cancelled", timeout=2)
            elif value == view.state.batch_size:
                self.notify(f"already at batch {value}", severity="warning", timeout=3)
            else:
                self._switch(value)

        self.push_screen(BatchScreen(view.state.batch_size, describe), done)

    def action_checkpoint(self) -> None:
        if self._usable("checkpoint"):
            self._send({"cmd": "checkpoint"}, "checkpoint requested…")

    def action_stop(self) -> None:
        if not self._usable("stop"):
            return
        body = Text("Stop training? The worker checkpoints first; resume later with sftui run --resume.")
        self.push_screen(ConfirmScreen("Stop training", body, yes="stop"),
                         lambda ok: self._send({"cmd": "stop"}, "stop requested…") if ok
                         else self.notify("cancelled", timeout=2))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(str(self.run_dir)))

    def action_leave(self) -> None:
        self.exit()


def _is_stop(payload: dict[str, Any]) -> bool:
    """A request that ends the run: ``s`` confirmed, or ``n`` at the out-of-memory prompt."""
    return payload.get("cmd") == "stop" or (payload.get("cmd") == "decide" and payload.get("action") == "stop")


STOP_WAIT_S = 120.0  # how long leaving after a stop waits for the worker's checkpoint and the run's end


def read_run(run_dir: Path) -> RunState:
    """run.json and the lock, as the run stands now (no events: the exit code is in run.json).

    The lock first: a supervisor writes its run's end into run.json before it lets the lock go,
    so a run.json read after the lock is never older than the lock's answer. The other order
    could read "running", then find the lock just released, and call a run that ended "lost"."""
    state = RunState(run_dir)
    alive = lock_is_held(RunDir(run_dir))
    state.load_run_json()
    state.supervisor_alive = alive
    return state


def wait_for_end(run_dir: Path, timeout: float = STOP_WAIT_S, interval: float = 0.2) -> RunState:
    """The run once it is no longer live, or as it stands after ``timeout`` seconds."""
    deadline = monotonic() + timeout
    state = read_run(run_dir)
    while state.live and monotonic() < deadline:
        time.sleep(interval)
        state = read_run(run_dir)
    return state


def exit_code_after(app: SftuiApp, wait_s: float = STOP_WAIT_S) -> int:
    """What ``sftui run`` / ``sftui attach`` print and return once the screen is gone: the run's
    own exit code when it has ended (after a stop asked from this screen, once the worker has
    checkpointed and the run has ended, up to ``wait_s``); 0 while training goes on."""
    run_dir = app.run_dir
    state = read_run(run_dir)
    if app.hung_up:  # nobody to tell anything; training is not touched
        return state.exit_code if state.status in ENDED and state.exit_code is not None else 0
    if app.stop_requested and state.live:
        print("sftui: waiting for the run to stop (the worker checkpoints first; Ctrl-C leaves at once) …",
              file=sys.stderr, flush=True)
        try:
            state = wait_for_end(run_dir, wait_s)
        except KeyboardInterrupt:
            state = read_run(run_dir)
    attach = f"sftui attach {shlex.quote(str(run_dir))}"
    if state.live:
        pending = state.pending_decision or {}
        if state.status == "waiting" and isinstance(pending.get("deadline"), (int, float)):
            left = max(0, pending["deadline"] - time.time())
            print(f"An out-of-memory decision is pending; the supervisor decides by itself in {left:.0f} s.")
        if app.stop_requested:
            print(f"The run has not stopped within {wait_s:.0f} s (run {state.name or run_dir.name}, "
                  f"{state.status}); it stops after its checkpoint. Look at it with:")
        else:
            print(f"Training goes on in the background (run {state.name or run_dir.name}, {state.status}). "
                  "Come back with:")
    else:
        print(f"The run is {state.display_status}; no training is going on. Look at it again with:")
    print(attach)
    sys.stdout.flush()
    if state.status in ENDED and state.exit_code is not None:
        return state.exit_code
    return 0


def run_tui(run_dir: Path) -> int:
    """Show the run until the user leaves; then print how to come back and return the exit code
    of ``sftui run`` / ``sftui attach`` (``exit_code_after``). Leaving does not touch training."""
    app = SftuiApp(Path(run_dir).absolute())
    app.run()
    return exit_code_after(app)
