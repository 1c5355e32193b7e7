"""Static shapes (``--pad-to-max-len``, the compiled path's padding) train exactly what dynamic
padding trains: the padding is masked out of attention and carries label -100, so the loss
curve is the same within float32 noise, for a causal LM through the real worker and for an
encoder-decoder through the trainer's own step."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import T5Config, T5ForConditionalGeneration

from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig
from sftui.rows import char_counts
from sftui.trainer import data, loop, model
from sftui.trainer.loss import TrainingModel
from trainer_helpers import log_tail, qa_rows, run_attempt, step_events, write_jsonl, write_run_json

MAX_LEN = 32


def _losses(tmp_path: Path, name: str, rows: Path, pad: bool | None) -> list[float]:
    run = rundir.create(tmp_path / name)
    cfg = RunConfig(model="tiny", data=str(rows), batch=8, max_len=MAX_LEN, log_every=1, cpu=True,
                    checkpoint_every=0, pad_to_max_len=pad, dataloader_workers=0)
    write_run_json(run, cfg, sample_budget=48)
    assert run_attempt(run, 1, 1) == [ev.WORKER_OK], log_tail(run, 1)
    return [e["loss"] for e in step_events(run)]


def test_the_worker_learns_the_same_with_static_shapes(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "qa.jsonl", qa_rows(48))
    dynamic = _losses(tmp_path, "dynamic", rows, None)  # the default on the CPU: each batch's longest row
    static = _losses(tmp_path, "static", rows, True)
    assert len(dynamic) == 6 and dynamic[-1] < dynamic[0]
    np.testing.assert_allclose(static, dynamic, rtol=2e-5)


def test_every_batch_is_padded_to_max_len_without_changing_its_targets(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "qa.jsonl", qa_rows(16))
    model.build_char_tokenizer(char_counts(str(rows), False), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    cache = data.tokenize_to_cache(str(rows), tok, MAX_LEN, True, False, tmp_path / "c", lambda f: None)
    plan = data.Plan(cache.n, 0, 16)
    steps = plan.steps(0, 8)
    for width in (None, MAX_LEN):
        item = data.StepBatches(cache, plan, steps, 0, 4, 2, tok.pad_token_id, width)[0]
        for micro in item["micro"]:
            if width:
                assert all(t.shape[1] == MAX_LEN for t in micro.values())
            assert (micro["input_ids"][micro["attention_mask"] == 0] == tok.pad_token_id).all()
        assert sum(int((m["labels"] != -100).sum()) for m in item["micro"]) == item["n_target"]


@pytest.mark.parametrize("accum", [1, 2])
def test_an_encoder_decoder_step_is_the_same_with_static_shapes(tmp_path: Path, accum: int) -> None:
    rows = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24, seed=5))
    model.build_char_tokenizer(char_counts(str(rows), False), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    cache = data.tokenize_to_cache(str(rows), tok, MAX_LEN, True, False, tmp_path / "c", lambda f: None)
    plan = data.Plan(cache.n, 0, 24)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    curves = []
    for width in (None, MAX_LEN):
        torch.manual_seed(0)
        net = T5ForConditionalGeneration(config)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        accelerator = Accelerator(cpu=True)
        steps = data.StepBatches(cache, plan, plan.steps(0, 8), 0, 8 // accum, accum, tok.pad_token_id, width)
        losses = []
        for item in steps:
            loss, _ = loop.train_step(accelerator, TrainingModel(net), opt, item["micro"], item["n_target"], 1,
                                      config.decoder_start_token_id, loop.StepPhase())
            losses.append(float(loss))
        curves.append(losses)
    assert len(curves[0]) == 3
    np.testing.assert_allclose(curves[1], curves[0], rtol=2e-5)



def test_a_recompile_and_the_fall_back_to_eager_become_log_events(tmp_path: Path, monkeypatch) -> None:
    from sftui.trainer import compiling

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "inductor's default, replaced by the run's")
    monkeypatch.delenv("SFTUI_COMPILE_CACHE", raising=False)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # no codegen
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)  # every new shape recompiles
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    run = rundir.create(tmp_path / "run")
    dynamo_log = logging.getLogger("torch._dynamo")
    handlers = list(dynamo_log.handlers)
    torch._dynamo.reset()
    try:
        double, first_step = compiling.compile_model(Double(), False, "default", run.path, rundir.EventLog(run.events, 1), 0,
                                                     lambda: None, 60.0)
        with first_step:
            assert double(torch.ones(1)).tolist() == [2.0]
        for n in range(2, 5):
            assert double(torch.ones(n)).tolist() == [2.0] * n
    finally:
        dynamo_log.handlers[:] = handlers
        torch._dynamo.reset()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(run.path / "compile-cache")
    logs = [e for e in rundir.read_all(run.events) if e["kind"] == "log"]
    assert "the whole model" in logs[0]["message"]
    recompiles = [e for e in logs if "torch.compile recompiled" in e["message"]]
    assert [e["level"] for e in recompiles] == ["warning", "warning"]  # shapes 2 and 3, after the first step
    assert any("recompile_limit" in e["message"] for e in logs)  # then eager, said out loud


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2
