"""The view model (sftui.viewmodel): what every client computes from a run, without a screen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sftui.config import RunConfig, grad_accum_for
from sftui.rundir import EventLog, RunDir
from sftui.runstate import RunState
from sftui.viewmodel import Poller, RungMemory, View, rung_effective, rung_memory
from test_tui_support import GIB, make_run


def test_the_view_model_imports_neither_textual_nor_torch():
    """A browser view or `status` can use it where textual (or torch) is not installed."""
    code = ("import sys, sftui.viewmodel; "
            "print(sorted({'textual', 'rich', 'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def view_with(config: dict, world: int = 2) -> View:
    state = RunState(Path("/nowhere"), config=config, ladder=[16, 12, 8], batch_size=16, world_size=world,
                     grad_accum=2)
    return View(state=state, status="running", version=1)


def test_a_rungs_accumulation_is_the_supervisors():
    """--effective-batch: each rung's accumulation is recomputed as config.grad_accum_for does."""
    config = {"gpus": [0, 1], "effective_batch": 64, "grad_accum": 1}
    view = view_with(config)
    assert [rung_effective(view, b) for b in (16, 12, 8)] == ["16×2×2=64", "12×2×3=72", "8×2×4=64"]
    assert [grad_accum_for(RunConfig.from_dict(config), b) for b in (16, 12, 8)] == [2, 3, 4]
    assert rung_effective(view_with({"gpus": [0, 1], "grad_accum": 2}), 8) == "8×2×2=32"  # fixed


def test_rung_memory_is_words_without_styles():
    view = view_with({})
    view.state.oom_rungs, view.state.rung_peaks = [16], {12: int(30.5 * GIB)}
    assert rung_memory(view, 16).known == "oom"
    assert rung_memory(view, 12).text == "peak memory at batch 12: 30.5 GiB (measured)"
    assert rung_memory(view, 8) == RungMemory("unknown", "peak memory at batch 8: ? (not measured yet)")


def test_the_decision_kept_is_the_one_that_answered_the_open_question(tmp_path):
    path = make_run(tmp_path, "oom")  # a decision is pending; the history holds none
    poller = Poller(path)
    assert poller.poll().last_decision is None
    with EventLog(RunDir(path).events, attempt=1) as log:
        log.emit("decision", by="timeout", action="restart", batch_size=12)
    decision = poller.poll().last_decision
    assert decision is not None and decision["by"] == "timeout" and decision["batch_size"] == 12
    with EventLog(RunDir(path).events, attempt=2) as log:
        log.emit("decision_needed", reason="oom", proposed_batch=8, deadline=None)
    assert poller.poll().last_decision is None  # a new question: not answered yet
