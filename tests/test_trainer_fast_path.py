"""The worker's fast path on the CPU: --group-by-length keeps the plan's promises (a function of
(seed, epoch) only, every sample once across a stop and a resume at another batch), and
regional compilation compiles the repeated layers in place without changing what is trained
or the checkpoint's parameter names."""

from __future__ import annotations

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
from sftui.trainer.loss import TrainingModel
from sftui.trainer import compiling, data, loop, model
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             write_jsonl, write_run_json)

MAX_LEN = 32


def _tokenized(tmp_path: Path, rows: int, seq2seq: bool, seed: int = 3) -> tuple[data.Tokenized, object]:
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(rows, seed=seed))
    model.build_char_tokenizer(char_counts(str(path), False), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    cache = data.tokenize_to_cache(str(path), tok, MAX_LEN, seq2seq, False, tmp_path / "cache", lambda f: None)
    return cache, tok


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "encoder-decoder"])
def test_each_chunk_of_the_epoch_is_sorted_longest_first(tmp_path: Path, monkeypatch, seq2seq: bool) -> None:
    monkeypatch.setattr(data, "GROUP_CHUNK", 16)
    cache, _ = _tokenized(tmp_path, 56, seq2seq)
    key = data.length_key(cache, MAX_LEN)
    plain, grouped = data.Plan(cache.n, 7, cache.n), data.Plan(cache.n, 7, cache.n, key)
    for epoch in (0, 1):
        mixed, order = plain.order(epoch), grouped.order(epoch)
        assert sorted(order) == list(range(cache.n))
        for start in range(0, cache.n, 16):  # 16, 16, 16 and a last chunk of 8
            chunk = order[start:start + 16]
            assert set(chunk) == set(mixed[start:start + 16])  # the same rows, only reordered
            assert (np.diff(key[chunk]) <= 0).all()
    assert not np.array_equal(grouped.order(0), grouped.order(1))
    if seq2seq:  # the key puts the input's band first, then the label length
        inputs, labels = np.diff(cache.offsets), np.diff(cache.label_offsets)
        band = inputs * 8 // (MAX_LEN + 1)
        assert (key == band * (MAX_LEN + 1) + labels).all()


def test_grouped_batches_carry_less_padding(tmp_path: Path) -> None:
    cache, tok = _tokenized(tmp_path, 256, False)
    key = data.length_key(cache, MAX_LEN)

    def padded_positions(plan: data.Plan) -> int:
        steps = data.StepBatches(cache, plan, plan.steps(0, 16), 0, 16, 1, tok.pad_token_id, None, 8)
        return sum(int(m["input_ids"].numel()) for item in steps for m in item["micro"])

    plain, grouped = padded_positions(data.Plan(cache.n, 0, cache.n)), padded_positions(data.Plan(cache.n, 0, cache.n, key))
    real = int(cache.n_tokens.sum())
    assert real <= grouped < plain
    assert grouped - real < (plain - real) / 2


def test_group_by_length_stop_and_resume_at_another_batch_trains_each_sample_once(tmp_path: Path) -> None:
    rows = 240
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(rows))
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(data=str(path), batch=8, max_len=MAX_LEN, log_every=1, record_samples=True, cpu=True,
                    checkpoint_every=0, dataloader_workers=1, group_by_length=True)
    write_run_json(run, cfg, batch_size=8)
    assert run_attempt(run, 1, 1, requests=[(6, (1, "stop", None))]) == [ev.WORKER_OK], log_tail(run, 1)
    next_attempt(run, batch_size=5, grad_accum=2, request_seq=1)
    assert run_attempt(run, 2, 1) == [ev.WORKER_OK], log_tail(run, 2)
    assert events(run, "worker_exit", 2)[0]["reason"] == "finished"
    lines = assert_each_sample_once(run, rows)
    # The epoch (fewer rows than a chunk) went from the longest rows to the shortest, across
    # the stop and the change of batch.
    cache = data.Tokenized.open(next(p for p in run.cache.iterdir() if (p / "meta.json").exists()))
    length_of = dict(zip(cache.row_ids.tolist(), cache.n_tokens.tolist()))
    trained = [length_of[i] for line in lines for i in line["ids"]]
    assert trained == sorted(trained, reverse=True)


def _tiny_t5(vocab: int, pad: int, eos: int) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="relu", pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    return T5ForConditionalGeneration(config)


def test_regional_compilation_compiles_the_layers_in_place(tmp_path: Path) -> None:
    cache, tok = _tokenized(tmp_path, 48, True)
    plan = data.Plan(cache.n, 0, cache.n, data.length_key(cache, MAX_LEN))
    curves, names = [], []
    for compiled in (False, True):
        net = _tiny_t5(len(tok), tok.pad_token_id, tok.eos_token_id)
        if compiled:
            # The eager backend: the graphs dynamo captures run as they are (no code generation on CI).
            torch._dynamo.reset()
            what = compiling.compile_regions(net, backend="eager")
            assert what == "6 layers (T5Block), dynamic shapes"
            assert all(layer._compiled_call_impl is not None for layer in compiling.repeated_layers(net))
            assert net.lm_head._compiled_call_impl is None  # everything else stays eager
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        steps = data.StepBatches(cache, plan, plan.steps(0, 8), 0, 8, 1, tok.pad_token_id, None, 8)
        curves.append([float(loop.train_step(Accelerator(cpu=True), TrainingModel(net), opt, item["micro"], item["n_target"], 1,
                                             net.config.decoder_start_token_id, loop.StepPhase())[0])
                       for item in steps])
        names.append(list(net.state_dict()))
    torch._dynamo.reset()
    assert len(curves[0]) == 6
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)
    assert names[1] == names[0]  # checkpoints and final/ keep the model's own parameter names


def test_only_the_outermost_repeated_layers_are_compiled() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))  # repeated, but inside a layer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(2))
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])  # not one class

    net = Net()
    assert compiling.repeated_layers(net) == list(net.layers)
    assert compiling.repeated_layers(torch.nn.Linear(2, 2)) == []


def test_checkpoints_of_a_compiled_model_keep_the_parameter_names(monkeypatch) -> None:
    """A model wrapped by torch.compile (as --compile once did; it now compiles in place) names every
    weight ``_orig_mod.…``: a checkpoint written through that wrapper was refused by the next attempt
    (seen on an H200 after an OOM), and ``bare_model`` still takes any such wrapper off."""
    net = _tiny_t5(40, 0, 1)
    names = list(net.state_dict())
    accelerator = Accelerator(cpu=True)
    prepared = torch.compile(accelerator.prepare(TrainingModel(net)), backend="eager")
    assert list(prepared.state_dict())[0].startswith("_orig_mod.")
    assert list(loop.bare_model(accelerator, prepared).state_dict()) == names


@pytest.mark.parametrize("seq2seq", [True, False])
def test_the_compiled_form_traces_the_model_once(tmp_path: Path, seq2seq: bool) -> None:
    """--compile compiles the training form's body in place, the head's loss left out: dynamo
    traces the model once, with no graph break (compiled whole, the head's eager loss was a break,
    and dynamo traced the model a second time to compile what came before it), and the
    parameter names stay the model's own."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    train, tok = _tokenized(tmp_path, 12, seq2seq)
    net = _tiny_t5(len(tok), tok.pad_token_id, tok.eos_token_id) if seq2seq else \
        model.build_model("tiny", tok, 0, 64)
    names = list(net.state_dict())
    form = TrainingModel(net)
    assert form.head is not None
    torch._dynamo.reset()
    counters.clear()
    graphs = CompileCounter()
    compiled, what = compiling.compile_for_training(form, False, backend=graphs)
    assert compiled is form and what == compiling.BUT_THE_HEAD
    micro = data.collate(train, np.arange(4), tok.pad_token_id)
    loop.token_loss_sum(form, micro, net.config.decoder_start_token_id if seq2seq else None).backward()
    assert graphs.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert list(form.state_dict()) == ["bare." + name for name in names]  # no _orig_mod. in between
    torch._dynamo.reset()


def test_a_compiled_model_takes_new_widths_without_compiling_again() -> None:
    """Without --pad-to-max-len the width changes from batch to batch; the worker marks it dynamic
    from the start, so a compiled model's graphs serve every width and batch size (unmarked,
    the first new width cost a second whole compile)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = _tiny_t5(40, 0, 1)
    counter = CompileCounter()
    compiled = TrainingModel(net)
    compiled.compile(backend=counter)
    generator = torch.Generator().manual_seed(0)
    for batch, enc_width, dec_width in ((4, 24, 16), (4, 17, 9), (3, 30, 21), (6, 11, 5)):
        micro = {"input_ids": torch.randint(2, 40, (batch, enc_width), generator=generator),
                 "attention_mask": torch.ones(batch, enc_width, dtype=torch.long),
                 "labels": torch.randint(2, 40, (batch, dec_width), generator=generator)}
        loop.token_loss_sum(compiled, micro, 0, widths_vary=True).backward()
        if batch == 4 and enc_width == 24:
            first = counter.frame_count
    assert first >= 1 and counter.frame_count == first
    torch._dynamo.reset()
