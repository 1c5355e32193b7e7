"""The out-of-memory prompt: what happened (and the biggest holder of that GPU that is not this
attempt's, when there is one), the proposal, a countdown, and the choices.

Shown while ``RunState.pending_decision`` is set (a ``decision_needed`` event, also kept in
run.json, so it comes back on re-attach); the app removes it when the ``decision`` arrives.
An answer is posted to the app as ``OomScreen.Decided``; the prompt stays up, saying that the
answer was sent, until the supervisor's decision (or lets the user answer again when the
answer did not reach it).
"""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

from sftui.units import fmt_gib
from sftui.tui.ladder import rung_line
from sftui.tui.render import lines_text
from sftui.viewmodel import View, rung_effective

WHERE = {"forward": "in the forward pass", "backward": "in the backward pass",
         "optimizer": "in the optimizer step", "host": "in host memory"}


class OomScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("y,enter", "accept", "restart"),
        Binding("n", "refuse", "stop"),
        *(Binding(str(i), f"pick({i})", show=False) for i in range(1, 10)),
    ]

    class Decided(Message):
        """The user's answer: ``restart`` at ``batch``, or ``stop`` (``batch`` None)."""

        def __init__(self, action: str, batch: int | None):
            super().__init__()
            self.action = action
            self.batch = batch

    def __init__(self, view: View, clock: Callable[[], float]):
        super().__init__(classes="dialog-screen", id="oom-screen")
        self.view = view
        self.clock = clock
        self.sent: str | None = None

    # --- content ---

    @property
    def decision(self) -> dict:
        return self.view.state.pending_decision or {}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="oom") as box:
            box.border_title = "Out of memory"
            yield Static(self.what_text(), id="oom-what", classes="dialog-body")
            yield Static(self.proposal_text(), id="oom-proposal", classes="dialog-body")
            yield Static(self.countdown_text(), id="oom-countdown", classes="dialog-body")
            yield Static(self.rungs_text(), id="oom-rungs", classes="dialog-body")
            yield Static(self.keys_text(), id="oom-keys", classes="dialog-keys")

    def what_text(self) -> Text:
        oom = self.view.state.last_oom
        if not oom:
            return Text("The training ran out of memory (the details are not in the event log).", "bold red")
        where = WHERE.get(oom.get("where") or "", oom.get("where") or "")
        first = Text.assemble(("Step ", "bold red"), (f"{oom.get('step')}", "bold red"),
                              (f" ran out of memory at batch {oom.get('batch_size')}", "bold red"),
                              f" (rank {oom.get('rank')}, {where})",
                              (" [injected]" if oom.get("injected") else "", "dim"))
        uuid = oom.get("gpu_uuid")
        if not uuid:
            second = Text("on the CPU (host memory)" if oom.get("where") == "host" else "on the CPU")
        else:
            g, when = self.view.gpu_by_uuid(uuid, at=oom.get("t"))
            if g is None:
                second = Text(f"on GPU {uuid} (no telemetry for it)")
            else:
                name = (g.get("name") or "GPU").replace("NVIDIA ", "")
                at_the_time = isinstance(oom.get("t"), (int, float)) and when is not None and when <= oom["t"] + 1
                second = Text.assemble(f"on GPU {g.get('index')} ({name}): ",
                                       (f"{fmt_gib(g.get('mem_used'))}/{fmt_gib(g.get('mem_total'))} GiB used", "bold"),
                                       " at the time" if at_the_time else " now")
        holder = self.view.oom_holder()
        return lines_text([first, second, *([Text(holder, "bold yellow")] if holder else [])])

    def proposal_text(self) -> Text:
        prop = self.decision.get("proposed_batch")
        if prop is None:
            return Text.assemble(("No smaller rung: this was the bottom of the ladder. ", "bold"),
                                 "Lower --max-len or add --gradient-checkpointing, or pick a rung below.")
        return Text.assemble("Proposal: restart at batch ", (f"{rung_effective(self.view, prop)}", "bold green"),
                             f", {self.view.resume_from()}.")

    def countdown_text(self) -> Text:
        if self.sent:
            return Text(f"{self.sent} — waiting for the supervisor…", "bold yellow")
        deadline = self.decision.get("deadline")
        prop = self.decision.get("proposed_batch")
        auto = f"restart at batch {prop}" if prop is not None else "stop the run"
        if not isinstance(deadline, (int, float)):
            return Text(f"Automatic choice: {auto}")
        left = deadline - self.clock()
        if left <= 0:
            return Text(f"Time is up: the supervisor decides ({auto})…", "bold yellow")
        return Text.assemble("Automatic choice in ", (f"{left:.0f} s", "bold yellow"), f": {auto}")

    def rungs_text(self) -> Text:
        prop = self.decision.get("proposed_batch")
        ladder = self.view.state.ladder[:9]
        # `sftui decide R restart N` takes a batch size; here a digit is a rung's number
        head = "Or pick a rung:"
        if ladder:
            head = f"Or press a rung's number (not a batch size), e.g. {len(ladder)} for batch {ladder[-1]}:"
        lines = [Text(head, "dim")]
        for i, rung in enumerate(ladder, 1):
            line = rung_line(i, rung, self.view, 30)
            line.pad_right(max(0, 22 - line.cell_len))
            if rung == prop:
                line.append("  ← proposed", "green")
            lines.append(line)
        return lines_text(lines)

    def keys_text(self) -> Text:
        prop = self.decision.get("proposed_batch")
        n = min(9, len(self.view.state.ladder))
        parts = []
        if prop is not None:
            parts += [("y", "bold reverse"), "/", ("Enter", "bold reverse"), f" restart at {prop}   "]
        parts += [("n", "bold reverse"), " stop the run   "]
        if n:
            parts += [(f"1–{n}" if n > 1 else "1", "bold reverse"), " restart at that rung"]
        parts += ["\n", ("q", "bold reverse"), " leave this screen (the timeout decides)"]
        return Text.assemble(*parts)

    # --- updates ---

    def on_mount(self) -> None:
        self.set_interval(1.0, self.tick)

    def tick(self) -> None:
        self.query_one("#oom-countdown", Static).update(self.countdown_text())

    def update_view(self, view: View) -> None:
        same_question = repr(view.state.pending_decision) == repr(self.view.state.pending_decision)
        self.view = view
        if not same_question:
            self.sent = None
        for wid, fn in (("#oom-what", self.what_text), ("#oom-proposal", self.proposal_text),
                        ("#oom-countdown", self.countdown_text), ("#oom-rungs", self.rungs_text),
                        ("#oom-keys", self.keys_text)):
            self.query_one(wid, Static).update(fn())

    def failed(self, error: str) -> None:
        """The decision did not reach the supervisor: let the user try again."""
        self.sent = None
        self.tick()

    # --- actions ---

    def _send(self, action: str, batch: int | None, what: str) -> None:
        if self.sent:
            self.notify(f"already sent: {self.sent}", severity="warning")
            return
        self.sent = what
        self.tick()
        self.post_message(self.Decided(action, batch))

    def action_accept(self) -> None:
        prop = self.decision.get("proposed_batch")
        if prop is None:
            self.notify("no smaller rung to restart at: press n to stop, or a digit to pick a rung", severity="warning")
            return
        self._send("restart", prop, f"restart at batch {prop} requested")

    def action_refuse(self) -> None:
        self._send("stop", None, "stop requested")

    def action_pick(self, i: int) -> None:
        ladder = self.view.state.ladder
        if not 1 <= i <= len(ladder):
            self.notify(f"no rung {i}: the ladder has {len(ladder)} (a digit picks a rung's number, "
                        "not a batch size)", severity="warning")
            return
        self._send("restart", ladder[i - 1], f"restart at batch {ladder[i - 1]} requested")
