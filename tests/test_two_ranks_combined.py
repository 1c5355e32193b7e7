"""Issue 20's CPU part: the chat-template path, packed batches and LoRA together under two gloo
ranks. A real supervisor recovers from an OOM on rank 1 at the next rung with nothing lost; a
run trained on one rank resumes on two and then on one again (a switch between), and every
sample is trained exactly once (samples.jsonl), the adapters carried across world sizes. The
same on GPUs (NCCL) is for scripts on a multi-GPU machine; nothing here needs one."""

from __future__ import annotations

import json
from pathlib import Path

from chat_helpers import build_model_dir
from conftest import run_sftui
from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig
from sftui.runfile import base_fingerprint, lora_record
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             update_run_json, write_jsonl, write_run_json)

ROWS = 96
COMBINED = ("--lora", "--lora-r", "4", "--packing", "--lr", "3e-2")  # the chat template comes with the model


def test_an_oom_on_rank_1_restarts_both_ranks_at_the_next_rung_losing_nothing(tmp_path: Path) -> None:
    model = build_model_dir(tmp_path / "qwen2", "chatml")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))
    run = rundir.RunDir(tmp_path / "run")
    result = run_sftui("run", "--headless", "--cpu", "--num-processes", "2", "--model", str(model), "--data", str(data),
                       "--max-len", "32", "--batch", "8", "--ladder", "8,4", "--log-every", "1", "--checkpoint-every",
                       "0", "--record-samples", "--inject-oom-at-step", "3", "--inject-oom-rank", "1", "--on-oom", "auto",
                       "--run-dir", str(run.path), *COMBINED, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    (oom,) = events(run, "oom")
    assert (oom["rank"], oom["emergency_checkpoint"]) == (1, 2)
    assert [(s["attempt"], s["batch_size"], s["world_size"], s["resume_step"]) for s in events(run, "attempt_start")] \
        == [(1, 8, 2, None), (2, 4, 2, 2)]  # resumed after the last completed step: none lost
    assert [e["batches"] for e in events(run, "data")] == ["packed"] * 2
    assert all(e["chat_format"].startswith("chat template from tokenizer") for e in events(run, "data"))
    assert all(e["lora"] for e in events(run, "model"))
    assert_each_sample_once(run, ROWS)
    assert (run.final / "adapter_config.json").is_file() and (run.final / "chat_template.jinja").is_file()


def test_one_rank_then_two_then_one_train_each_sample_once(tmp_path: Path) -> None:
    """Attempt 1 on one rank stops at step 3; attempt 2 resumes it on two ranks and switches from
    batch 4 to 3; attempt 3 finishes on one rank at batch 5 × 2 accumulation."""
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(model=str(build_model_dir(tmp_path / "qwen2", "chatml")),
                    data=str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))), batch=8, max_len=32, log_every=1,
                    record_samples=True, cpu=True, checkpoint_every=0, dataloader_workers=1, lr=3e-2, lora=True,
                    lora_r=4, packing=True)
    write_run_json(run, cfg, batch_size=8)
    update_run_json(run, lora=lora_record(cfg), base_fingerprint=base_fingerprint(cfg.model))
    assert run_attempt(run, 1, 1, requests=[(3, (1, "stop", None))]) == [ev.WORKER_OK], log_tail(run, 1)

    cfg.num_processes = 2
    next_attempt(run, config=cfg.to_dict(), world_size=2, batch_size=4, request_seq=1)
    assert run_attempt(run, 2, 2, requests=[(5, (2, "switch", 3))]) == [ev.WORKER_OK] * 2, log_tail(run, 2)

    cfg.num_processes = 1
    next_attempt(run, config=cfg.to_dict(), world_size=1, batch_size=5, grad_accum=2, request_seq=2)
    assert run_attempt(run, 3, 1) == [ev.WORKER_OK], log_tail(run, 3)

    assert [e["reason"] for a in (1, 2, 3) for e in events(run, "worker_exit", a)] == \
        ["stop"] + ["switch"] * 2 + ["finished"]
    lines = assert_each_sample_once(run, ROWS)
    assert {len(s["ids"]) for s in lines if s["attempt"] == 1} == {8}
    assert {len(s["ids"]) for s in lines if s["attempt"] == 2} == {8}  # two ranks × 4
    assert max(len(s["ids"]) for s in lines if s["attempt"] == 3) == 10
    assert [e["batches"] for e in events(run, "data")] == ["packed"] * 3
    starts = events(run, "step")
    for attempt in (1, 2):
        before = [e for e in starts if e["attempt"] == attempt][-1]
        after = [e for e in starts if e["attempt"] == attempt + 1][0]
        assert after["step"] == before["step"] + 1 and after["samples_seen"] > before["samples_seen"]
    state = json.loads((run.latest_checkpoint() / "state.json").read_text())
    assert state["lora"] == lora_record(cfg) and state["samples_seen"] == ROWS
