"""Batch switches, stops and resumes at other batch and world sizes: every sample of the epoch
is trained exactly once (proved from samples.jsonl) and the loss carries on. Real ranks, the
tiny model, the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             step_events, write_jsonl, write_run_json)

ROWS = 480


@pytest.fixture
def trainer_run(tmp_path: Path) -> tuple[rundir.RunDir, RunConfig]:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(data=str(data), batch=8, max_len=32, log_every=1, record_samples=True, cpu=True,
                    checkpoint_every=0, dataloader_workers=1)
    return run, cfg


def _exit_reasons(run: rundir.RunDir, attempt: int) -> list[str]:
    return [e["reason"] for e in events(run, "worker_exit", attempt)]


def _losses_around(run: rundir.RunDir, attempt: int) -> tuple[float, float]:
    """Loss of the last step of ``attempt`` and of the first step of the next one."""
    steps = step_events(run)
    before = [e for e in steps if e["attempt"] == attempt][-1]
    after = [e for e in steps if e["attempt"] == attempt + 1][0]
    assert after["step"] == before["step"] + 1
    return before["loss"], after["loss"]


def _assert_no_jump(run: rundir.RunDir, attempt: int) -> None:
    first = step_events(run)[0]["loss"]
    before, after = _losses_around(run, attempt)
    # Loosely: the resumed model is the trained one (far below the loss at step 1), and one
    # step's loss is within noise of the last one.
    assert after < first - 0.5, (first, before, after)
    assert abs(after - before) < 0.6, (before, after)


def test_switch_mid_epoch_8_6_4_trains_each_sample_once(trainer_run) -> None:
    run, cfg = trainer_run
    write_run_json(run, cfg, batch_size=8)
    codes = run_attempt(run, 1, 1, requests=[(15, (1, "switch", 6))])
    assert codes == [ev.WORKER_OK], log_tail(run, 1)
    assert _exit_reasons(run, 1) == ["switch"]
    assert [e["reason"] for e in events(run, "checkpoint", 1)] == ["switch"]

    next_attempt(run, batch_size=6, request_seq=1)
    assert run_attempt(run, 2, 1, requests=[(30, (2, "switch", 4))]) == [ev.WORKER_OK], log_tail(run, 2)
    assert _exit_reasons(run, 2) == ["switch"]

    next_attempt(run, batch_size=4, request_seq=2)
    assert run_attempt(run, 3, 1) == [ev.WORKER_OK], log_tail(run, 3)
    assert _exit_reasons(run, 3) == ["finished"]

    lines = assert_each_sample_once(run, ROWS)
    sizes = {a: [len(s["ids"]) for s in lines if s["attempt"] == a] for a in (1, 2, 3)}
    assert set(sizes[1]) == {8} and set(sizes[2]) == {6}
    assert set(sizes[3][:-1]) == {4} and sizes[3][-1] <= 4  # only the epoch's last step may be short
    _assert_no_jump(run, 1)
    _assert_no_jump(run, 2)
    assert (run.final / "model.safetensors").is_file()
    last = step_events(run)[-1]
    assert last["samples_seen"] == ROWS and last["epoch"] == 1.0 and last["step"] == last["total_steps"]


def test_stop_then_resume_at_another_batch(trainer_run) -> None:
    run, cfg = trainer_run
    write_run_json(run, cfg, batch_size=8)
    codes = run_attempt(run, 1, 1, requests=[(5, (1, "checkpoint", None)), (15, (2, "stop", None))])
    assert codes == [ev.WORKER_OK], log_tail(run, 1)
    assert _exit_reasons(run, 1) == ["stop"]
    reasons = [e["reason"] for e in events(run, "checkpoint", 1)]
    assert reasons == ["request", "stop"]
    stopped_at = events(run, "worker_exit", 1)[0]["step"]
    assert run.latest_checkpoint().name == f"step-{stopped_at:08d}"

    next_attempt(run, batch_size=5, grad_accum=2, request_seq=2)
    assert run_attempt(run, 2, 1) == [ev.WORKER_OK], log_tail(run, 2)
    lines = assert_each_sample_once(run, ROWS)
    sizes = [len(s["ids"]) for s in lines if s["attempt"] == 2]
    assert set(sizes[:-1]) == {10} and sizes[-1] <= 10
    _assert_no_jump(run, 1)
    first_resumed = [e for e in step_events(run) if e["attempt"] == 2][0]
    assert first_resumed["step"] == stopped_at + 1 and first_resumed["grad_accum"] == 2


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)], ids=["2-ranks-to-1", "1-rank-to-2"])
def test_resume_at_another_world_size(trainer_run, worlds: tuple[int, int]) -> None:
    run, cfg = trainer_run
    first, second = worlds
    cfg.num_processes = first
    write_run_json(run, cfg, batch_size=4, world_size=first)
    codes = run_attempt(run, 1, first, requests=[(10, (1, "stop", None))])
    assert codes == [ev.WORKER_OK] * first, log_tail(run, 1)
    assert _exit_reasons(run, 1) == ["stop"] * first
    assert len(events(run, "rank_start", 1)) == first

    cfg.num_processes = second
    next_attempt(run, config=cfg.to_dict(), world_size=second, batch_size=6, request_seq=1)
    assert run_attempt(run, 2, second) == [ev.WORKER_OK] * second, log_tail(run, 2)
    assert _exit_reasons(run, 2) == ["finished"] * second
    lines = assert_each_sample_once(run, ROWS)
    assert {len(s["ids"]) for s in lines if s["attempt"] == 1} == {4 * first}
    assert max(len(s["ids"]) for s in lines if s["attempt"] == 2) == 6 * second
    _assert_no_jump(run, 1)
