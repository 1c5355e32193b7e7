"""LoRA (issue 18) with real ranks on the CPU: switches, stops and resumes at other batches and
world sizes train every sample exactly once and carry the trained adapters on; a checkpoint holds
the adapters alone; ``final/`` holds peft's adapter and, with ``--merge``, a plain model with the
same logits; a checkpoint refuses another base or other LoRA settings; bad flags stop before
anything is written. The built-in ``tiny`` (Llama-shaped), a small Qwen2 directory and a small T5
directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chat_helpers import build_model_dir, t5_dir
from conftest import run_sftui
from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig
from sftui.runfile import base_fingerprint, lora_record
from trainer_helpers import (assert_each_sample_once, events, log_tail, next_attempt, qa_rows, run_attempt,
                             step_events, update_run_json, write_jsonl, write_run_json)

ROWS = 192
LR = {"tiny": 3e-3, "qwen2": 3e-2, "t5": 3e-2}  # adapters start at zero: a rate that moves them in a few steps


def model_for(kind: str, tmp_path: Path) -> str:
    if kind == "tiny":
        return "tiny"
    if kind == "qwen2":
        return str(build_model_dir(tmp_path / "qwen2", "chatml"))
    return str(t5_dir(tmp_path / "t5"))


def lora_run(tmp_path: Path, kind: str, **overrides) -> tuple[rundir.RunDir, RunConfig]:
    """A run directory and run.json as the CLI writes them for a LoRA run of ``kind``."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(ROWS))
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(model=model_for(kind, tmp_path), data=str(data), batch=8, max_len=32, log_every=1,
                    record_samples=True, cpu=True, checkpoint_every=0, dataloader_workers=1, lr=LR[kind],
                    lora=True, lora_r=4, **overrides)
    write_run_json(run, cfg, batch_size=8)
    update_run_json(run, lora=lora_record(cfg), base_fingerprint=base_fingerprint(cfg.model))
    return run, cfg


def cli(*args: str, cwd: Path):
    return run_sftui("run", "--headless", "--cpu", "--max-len", "32", "--log-every", "1", "--checkpoint-every", "0",
                     *args, cwd=cwd)


# --- sample-exact switches and resumes ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny", "qwen2", "t5"])
def test_switch_stop_and_resume_at_other_batches_and_worlds_train_each_sample_once(tmp_path, kind) -> None:
    run, cfg = lora_run(tmp_path, kind, gradient_checkpointing=kind == "qwen2")
    assert run_attempt(run, 1, 1, requests=[(4, (1, "switch", 6))]) == [ev.WORKER_OK], log_tail(run, 1)
    ckpt = run.latest_checkpoint()
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "optimizer.pt", "scheduler.pt",
                                                      "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["lora"] == lora_record(cfg) and state["base_fingerprint"] == base_fingerprint(cfg.model)

    next_attempt(run, batch_size=6, request_seq=1)
    assert run_attempt(run, 2, 1, requests=[(10, (2, "stop", None))]) == [ev.WORKER_OK], log_tail(run, 2)

    cfg.num_processes = 2  # DDP (gloo) over the adapters alone
    next_attempt(run, config=cfg.to_dict(), world_size=2, batch_size=3, grad_accum=2, request_seq=2)
    assert run_attempt(run, 3, 2) == [ev.WORKER_OK] * 2, log_tail(run, 3)
    assert [e["reason"] for e in events(run, "worker_exit", 3)] == ["finished"] * 2

    lines = assert_each_sample_once(run, ROWS)
    assert {len(s["ids"]) for s in lines if s["attempt"] == 1} == {8}
    assert {len(s["ids"]) for s in lines if s["attempt"] == 2} == {6}
    steps = step_events(run)
    first = steps[0]["loss"]
    for attempt in (1, 2):
        before = [e for e in steps if e["attempt"] == attempt][-1]
        after = [e for e in steps if e["attempt"] == attempt + 1][0]
        assert after["step"] == before["step"] + 1
        if kind == "tiny":  # (the 32-wide random directories barely learn) the trained adapters, not zeros
            assert after["loss"] < first - 0.3 and abs(after["loss"] - before["loss"]) < 0.5, (first, before, after)
    # AdamW's state went from attempt to attempt with the adapters: its step count is the run's.
    moments = torch.load(run.latest_checkpoint() / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in moments.values()} == {steps[-1]["step"]}
    assert (run.final / "adapter_config.json").is_file() and not (run.final / "merged").exists()


def test_an_oom_restart_resumes_the_adapters_from_the_emergency_checkpoint(tmp_path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    run = rundir.RunDir(tmp_path / "run")
    result = cli("--data", str(data), "--batch", "8", "--ladder", "8,4", "--on-oom", "auto", "--inject-oom-at-step", "3",
                 "--record-samples", "--lora", "--lora-r", "4", "--run-dir", str(run.path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (oom,) = events(run, "oom")
    assert oom["emergency_checkpoint"] == 2
    (start,) = [e for e in events(run, "attempt_start") if e["attempt"] == 2]
    assert start["resume_step"] == 2 and start["batch_size"] == 4  # no step lost
    assert [e["reason"] for e in events(run, "checkpoint")] == ["oom", "final"]
    assert_each_sample_once(run, 64)


# --- final/ and --merge -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "t5"])
def test_merged_final_gives_the_logits_of_base_plus_adapter(tmp_path, kind) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    model = model_for(kind, tmp_path)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    run_dir = tmp_path / "run"
    result = cli("--model", model, "--data", str(data), "--batch", "8", "--lr", str(LR[kind]), "--lora",
                 "--lora-r", "4", "--merge", "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    final = run_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    if kind == "qwen2":  # the tokenizer keeps its chat template, in final/ and in merged/
        assert AutoTokenizer.from_pretrained(final).chat_template
        assert AutoTokenizer.from_pretrained(final / "merged").chat_template

    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    merged = auto.from_pretrained(final / "merged")  # a plain model: no peft needed
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
    base = auto.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    extra = {"decoder_input_ids": ids[:, :4]} if kind == "t5" else {}
    with torch.no_grad():
        plain = base(input_ids=ids, **extra).logits
        adapted = PeftModel.from_pretrained(base, final).eval()(input_ids=ids, **extra).logits
        folded = merged.float().eval()(input_ids=ids, **extra).logits
    moved = (adapted - plain).abs().max().item()
    assert moved > 0.05, "the adapters did not train"
    assert (folded - adapted).abs().max().item() < 0.1 * moved  # bf16 rounding, not the adapters' effect


# --- the checkpoint's size, and what it refuses -------------------------------------------------


def test_a_lora_checkpoint_is_under_5_percent_of_a_full_one(tmp_path) -> None:
    """tiny's layers are 256 wide: rank 4 is to tiny what rank 16+ is to a 7B model (its
    checkpoint ~0.5 % of a full one)."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(32))
    sizes = {}
    for name, flags in (("full", []), ("lora", ["--lora", "--lora-r", "4"])):
        result = cli("--data", str(data), "--batch", "8", "--max-steps", "2", "--run-dir", str(tmp_path / name),
                     *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        (ckpt,) = [e for e in rundir.read_all(tmp_path / name / "events.jsonl") if e["kind"] == "checkpoint"]
        sizes[name] = ckpt["bytes"]
    assert sizes["lora"] < 0.05 * sizes["full"], sizes

    # what trains, in `sftui status` and the TUI header (tiny at r 4: 78,080 of 3,250,176 parameters)
    said = "LoRA r4 α8: 78.1K of 3.3M params"
    status = run_sftui("status", str(tmp_path / "lora"), cwd=tmp_path)
    assert f"  {said} trained\n" in status.stdout, status.stdout
    assert "params" not in run_sftui("status", str(tmp_path / "full"), cwd=tmp_path).stdout
    from sftui.tui.header import HeaderPanel
    from sftui.viewmodel import Poller

    view = Poller(tmp_path / "lora").poll(force=True)
    assert said in HeaderPanel().build(view, 200, 1).plain


def test_resuming_onto_another_base_or_other_lora_settings_is_refused(tmp_path) -> None:
    run, cfg = lora_run(tmp_path, "qwen2")
    assert run_attempt(run, 1, 1, requests=[(3, (1, "stop", None))]) == [ev.WORKER_OK], log_tail(run, 1)

    # The CLI: other LoRA settings, then a changed base directory, each one line, exit 2, run.json untouched.
    before = run.run_json.read_bytes()
    other = run_sftui("run", "--resume", str(run.path), "--lora-r", "8", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0 and "--lora-r" in other.stderr
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=640, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(cfg.model)
    moved = run_sftui("run", "--resume", str(run.path), cwd=tmp_path)
    assert moved.returncode == 2 and moved.stderr.strip().count("\n") == 0, moved.stderr
    assert "base model" in moved.stderr and run.run_json.read_bytes() == before

    # The worker itself (its checkpoint's state.json), should a run.json say otherwise.
    next_attempt(run, request_seq=1)
    assert run_attempt(run, 2, 1) == [ev.WORKER_BAD_INPUT]
    assert "trained on another base model" in log_tail(run, 2)
    update_run_json(run, base_fingerprint=base_fingerprint(cfg.model), lora={**lora_record(cfg), "r": 8},
                    config={**cfg.to_dict(), "lora_r": 8})
    next_attempt(run)
    assert run_attempt(run, 3, 1) == [ev.WORKER_BAD_INPUT]
    errors = [e["message"] for e in events(run, "log", 3) if e["level"] == "error"]
    assert len(errors) == 1 and "written with LoRA" in errors[0]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,says", [
    (["--lora", "--lora-r", "0"], "--lora-r: expected an integer >= 1, got 0"),
    (["--merge"], "--merge: only with --lora"),
    (["--lora-r", "8"], "--lora-r: only with --lora"),
    (["--lora-dropout", "0.1"], "--lora-dropout: only with --lora"),
    (["--lora", "--lora-targets", "q_proj,nope"], "--lora-targets: 'nope' matches no linear layer of tiny"),
    (["--lora", "--lora-targets", "lm_head"], "--lora-targets: 'lm_head' matches no linear layer"),
])
def test_bad_lora_flags_stop_with_one_line_before_anything_is_written(tmp_path, flags, says) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    result = cli("--data", str(data), "--run-dir", str(tmp_path / "run"), *flags, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("sftui: ")
    assert says in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "run").exists()


def test_targets_of_a_model_directory_are_read_from_its_weights(tmp_path) -> None:
    model = model_for("qwen2", tmp_path)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    result = cli("--model", model, "--data", str(data), "--run-dir", str(tmp_path / "run"), "--lora",
                 "--lora-targets", "self_attn.q_proj,wo", cwd=tmp_path)
    assert result.returncode == 2 and "'wo' matches no linear layer" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
