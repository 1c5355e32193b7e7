"""--packing in real runs (the tiny Llama-shaped model, the CPU, float32): a packed run learns
exactly what the padded one learns, step by step; switches, stops and resumes at other batch and
world sizes still train every sample once (samples.jsonl); the run says that its batches are
packed; a T5 packs into rows of --max-len as faithfully. Beside them, on the same
tiny model: compiled packed steps of several token buckets share one graph, and the memory
probe's packed worst case is batch × the padded width."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chat_helpers import t5_dir
from conftest import kinds, read_events, run_sftui, write_rows
from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig
from sftui.runfile import RunFile
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             write_jsonl, write_run_json)

ROWS = 240
PACKED_LINE = "packed batches: each micro-batch's samples end to end in one row"
ROWS_LINE = "packed batches: each micro-batch's samples end to end in rows of"


def cli_run(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    """A short headless run of the real command line; its directory and its log."""
    data = write_rows(tmp_path / "d.jsonl", 48)
    run_dir = tmp_path / name
    result = run_sftui("run", "--headless", "--cpu", "--run-dir", str(run_dir), "--data", str(data), "--batch", "8",
                       "--max-steps", "5", "--log-every", "1", "--max-len", "32", "--checkpoint-every", "0", *extra,
                       cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return run_dir, result.stdout


def test_a_packed_run_trains_the_padded_runs_loss_curve_and_says_it_is_packed(tmp_path: Path) -> None:
    """Same seed, same rows, same steps: per-step losses and grad norms within 1e-4 relative,
    so packing changes the layout of a batch and nothing it trains. The run records and says it."""
    padded_dir, padded_log = cli_run(tmp_path, "padded")
    packed_dir, packed_log = cli_run(tmp_path, "packed", "--packing")
    padded, packed = (kinds(read_events(d), "step") for d in (padded_dir, packed_dir))
    assert len(padded) == len(packed) == 5 and padded[-1]["loss"] < padded[0]["loss"]
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (padded, packed)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (padded, packed)
        assert a["samples_seen"] == b["samples_seen"]

    assert json.loads((packed_dir / "run.json").read_text())["config"]["packing"] is True
    assert json.loads((padded_dir / "run.json").read_text())["config"]["packing"] is None  # the default: padded on a CPU
    assert [e["batches"] for e in kinds(read_events(packed_dir), "data")] == ["packed"]
    assert [e["batches"] for e in kinds(read_events(padded_dir), "data")] == ["padded"]
    assert f"{PACKED_LINE}, no padding; sdpa attention" in packed_log and "packed batches" not in padded_log
    assert [line for line in packed_log.splitlines() if " data: " in line][0].endswith("; packed batches")
    assert [line for line in padded_log.splitlines() if " data: " in line][0].endswith("; padded batches")
    status = run_sftui("status", str(packed_dir), cwd=tmp_path)
    assert status.returncode == 0 and "packed batches" in status.stdout.splitlines()[0], status.stdout
    assert "packed" not in run_sftui("status", str(padded_dir), cwd=tmp_path).stdout


@pytest.mark.parametrize("kind", ["tiny", "t5"])
def test_packed_switch_stop_and_resume_at_other_batches_train_each_sample_once(tmp_path: Path, kind: str) -> None:
    """Two gloo ranks at batch 4, a switch to 3, a stop, a resume at batch 5 × 2 accumulation on
    one rank: every sample of the epoch trained exactly once, the loss carrying on; for the tiny
    causal LM (one row a micro-batch) and a small T5 (rows of --max-len)."""
    run = rundir.create(tmp_path / "run")
    model = "tiny" if kind == "tiny" else str(t5_dir(tmp_path / "t5"))
    cfg = RunConfig(model=model, data=str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))), batch=4, max_len=32,
                    log_every=1, record_samples=True, cpu=True, checkpoint_every=0, dataloader_workers=1,
                    num_processes=2, packing=True, lr=None if kind == "tiny" else 3e-3)
    write_run_json(run, cfg, batch_size=4, world_size=2)
    assert run_attempt(run, 1, 2, requests=[(4, (1, "switch", 3))]) == [ev.WORKER_OK] * 2, log_tail(run, 1)
    next_attempt(run, batch_size=3, request_seq=1)
    assert run_attempt(run, 2, 2, requests=[(14, (2, "stop", None))]) == [ev.WORKER_OK] * 2, log_tail(run, 2)
    cfg.num_processes = 1
    next_attempt(run, config=cfg.to_dict(), world_size=1, batch_size=5, grad_accum=2, request_seq=2)
    assert run_attempt(run, 3, 1) == [ev.WORKER_OK], log_tail(run, 3)

    assert [e["reason"] for a in (1, 2, 3) for e in events(run, "worker_exit", a)] == \
        ["switch"] * 2 + ["stop"] * 2 + ["finished"]
    lines = assert_each_sample_once(run, ROWS)
    sizes = {a: {len(s["ids"]) for s in lines if s["attempt"] == a} for a in (1, 2, 3)}
    assert sizes[1] == {8} and sizes[2] == {6} and max(sizes[3]) == 10
    assert [e["batches"] for e in events(run, "data")] == ["packed"] * 3
    line = PACKED_LINE if kind == "tiny" else ROWS_LINE
    assert sum(line in e["message"] for e in events(run, "log")) == 3
    steps = events(run, "step")
    assert steps[-1]["samples_seen"] == ROWS and steps[-1]["loss"] < steps[0]["loss"] - (0.5 if kind == "tiny" else 0)


def test_a_packed_t5_run_trains_the_padded_runs_loss_curve(tmp_path: Path) -> None:
    """An encoder-decoder model packs into rows of --max-len: same seed, rows and steps, per-step
    losses and grad norms within 1e-4 relative of the padded run's, and the run says so."""
    model = str(t5_dir(tmp_path / "t5"))
    padded_dir, _ = cli_run(tmp_path, "padded", "--model", model, "--lr", "3e-3")
    packed_dir, packed_log = cli_run(tmp_path, "packed", "--model", model, "--lr", "3e-3", "--packing")
    padded, packed = (kinds(read_events(d), "step") for d in (padded_dir, packed_dir))
    assert len(padded) == len(packed) == 5 and padded[-1]["loss"] < padded[0]["loss"]
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (padded, packed)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (padded, packed)
    assert [e["batches"] for e in kinds(read_events(packed_dir), "data")] == ["packed"]
    assert f"{ROWS_LINE} 32 tokens (--max-len), each sample masked to itself; sdpa attention" in packed_log


def bart_dir(directory: Path) -> Path:
    """A small BART (an encoder-decoder with absolute position embeddings) beside t5_dir's tokenizer."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    t5_dir(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    for name in ("config.json", "model.safetensors"):
        (directory / name).unlink()
    config = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def test_packing_an_encoder_decoder_with_absolute_positions_is_refused(tmp_path: Path) -> None:
    """Packed rows put a sample at any offset of its row: right for T5's relative bias, wrong for
    BART's absolute position embeddings. The CLI refuses before anything is written (exit 2, one
    line); a run.json asking for it anyway is bad input for the rank."""
    model = bart_dir(tmp_path / "bart")
    run_dir = tmp_path / "run"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(16))
    result = run_sftui("run", "--headless", "--cpu", "--model", str(model), "--data", str(data), "--packing",
                       "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"sftui: --packing: {model} is an encoder-decoder model with absolute positions (bart); packed rows are "
        "for causal LMs and encoder-decoders with relative ones (t5, mt5, umt5)"], result.stderr
    assert not run_dir.exists() and not (tmp_path / "runs").exists()

    run = rundir.create(tmp_path / "written")
    write_run_json(run, RunConfig(model=str(model), data=str(data), batch=4, max_len=32, cpu=True, packing=True))
    assert run_attempt(run, 1, 1) == [ev.WORKER_BAD_INPUT], log_tail(run, 1)
    assert "absolute positions (bart)" in log_tail(run, 1)


def test_packing_by_default_where_packed_rows_take_the_varlen_kernel() -> None:
    """--packing's default: a causal LM on a GPU whose torch has varlen_attn (registering it needs
    no GPU), never an encoder-decoder model, never the CPU; an explicit choice always wins."""
    import torch

    from sftui.trainer import batching

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert batching.packs(None, False, gpu) is True and batching.packed_attention(gpu) == batching.VARLEN
    assert batching.packs(None, True, gpu) is False
    assert batching.packs(None, False, cpu) is False
    assert batching.packs(True, False, cpu) is True and batching.packs(False, False, gpu) is False


def test_packing_may_change_on_resume() -> None:
    """The sample plan does not depend on the layout of a batch."""
    spec = RunFile.new(RunConfig(batch=8), "r", "f" * 64, 100)
    assert spec.resumed({"packing": True}).cfg.packing is True


def char_data(tmp_path: Path) -> tuple[Any, Any]:
    """The tiny preset's character tokenizer and 200 rows tokenized at --max-len 32."""
    from sftui.rows import char_counts
    from sftui.trainer import data, model as models

    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(200))
    models.build_char_tokenizer(char_counts(str(path), False), tmp_path / "tok")
    tok = models.load_tokenizer(tmp_path / "tok")
    return tok, data.tokenize_to_cache(str(path), tok, 32, False, False, tmp_path / "cache", lambda f: None)


def test_the_probes_packed_worst_case_is_the_widest_packed_row_the_run_meets(tmp_path: Path) -> None:
    """Packed, the probe's worst case is the plan's heaviest micro-batch at that batch: as many
    tokens as the widest window of 6 consecutive samples in any epoch's order (brute force here),
    no wider than batch × the longest row, and no micro-batch the run's own StepBatches hand out
    from any starting point is wider. The trainer's own step runs on it."""
    import numpy as np
    import torch
    from accelerate import Accelerator

    from sftui.trainer import batching, data, loop, loss, probe

    tok, cache = char_data(tmp_path)
    cfg = RunConfig(packing=True, epochs=2, max_len=32, seed=7)
    lengths = np.asarray(cache.n_tokens)
    plan = data.Plan(cache.n, cfg.seed, 2 * cache.n)
    heaviest, at = max((int(lengths[plan.order(e)[i:i + 6]].sum()), e * cache.n + i)
                       for e in range(2) for i in range(cache.n - 5))
    eager = probe._worst_case_packed(cache, 6, 6, tok.pad_token_id, cfg)
    assert int(np.diff(eager["cu_seqlens"].numpy())[:6].sum()) == heaviest
    assert eager["input_ids"].shape == (1, -(-heaviest // loop.PAD_MULTIPLE) * loop.PAD_MULTIPLE)
    assert heaviest < 6 * int(lengths.max())
    compiled = probe._worst_case_packed(cache, 6, 6, tok.pad_token_id, replace(cfg, compile=True))
    assert compiled["input_ids"].shape == (1, batching.Packing(tok.pad_token_id, 32, buckets=True).layout(heaviest, 6)[0])
    packing = batching.Packing(tok.pad_token_id, 32, multiple=loop.PAD_MULTIPLE)
    for seen in (0, 1, 5, 199, 203, at):  # where a resume or a switch may start; at: the heaviest window's
        steps = plan.steps(seen, 6)
        widths = [m["input_ids"].shape[1] for j in range(len(steps))
                  for m in data.StepBatches(cache, plan, steps, 0, 6, 1, tok.pad_token_id, None,
                                            loop.PAD_MULTIPLE, packing)[j]["micro"]]
        assert max(widths) <= eager["input_ids"].shape[1], (seen, max(widths))
    assert widths[0] == eager["input_ids"].shape[1]  # a run that starts there meets it: exact, not a bound
    net, opt = loop.new_model(cfg, tok, torch.device("cpu"), 1e-3)
    step_loss, _ = loop.train_step(Accelerator(cpu=True), loss.TrainingModel(net), opt, [eager],
                                   int((eager["labels"] != -100).sum()), 1, None, loop.StepPhase())
    assert torch.isfinite(step_loss) and step_loss > 0


def test_compiled_packed_steps_share_one_graph_across_token_buckets(tmp_path: Path) -> None:
    """--compile with packing: rows of several token buckets, each with its own count of samples
    and trained positions, through loop.token_loss_sum (which marks the row's width dynamic) into
    a compiled TrainingModel: no recompile per bucket (dynamo with the eager backend, the CPU)."""
    import numpy as np
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from sftui.trainer import batching, loop, loss, model as models

    tok, cache = char_data(tmp_path)
    packing = batching.Packing(tok.pad_token_id, 32, buckets=True)
    net = models.build_model("tiny", tok, 0, 32, torch.device("cpu"), torch.float32)
    torch._dynamo.reset()
    graphs = CompileCounter()  # the eager backend, counting what dynamo hands it
    compiled = torch.compile(loss.TrainingModel(net), backend=graphs)
    widths, first = set(), None
    for rows in (8, 16, 40, 64, 24):
        micro = packing(cache, np.arange(rows))
        micro["trained"] = loss.trained_positions(micro["labels"], shifted=True)
        widths.add(micro["input_ids"].shape[1])
        loop.token_loss_sum(compiled, micro, None).backward()
        first = first or graphs.frame_count
    assert len(widths) >= 4, widths
    assert graphs.frame_count == first, (first, graphs.frame_count)  # nothing compiled after the first step
