"""Models: local save_pretrained directories (a causal LM and a T5) train and their final/
loads back; the presets' shapes; inputs the worker refuses (exit 2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from sftui import events as ev
from sftui import rundir
from sftui.config import RunConfig, default_lr
from sftui.trainer import flops, model
from trainer_helpers import (events, log_tail, next_attempt, qa_rows, run_attempt, step_events, update_run_json,
                             write_jsonl, write_run_json)

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=->"


def _tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    """A character tokenizer; without ``pad`` it has EOS only, as GPT-2's does."""
    specials = ["<s>", "</s>", "<unk>"] + (["<pad>"] if pad else [])
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra)


def _causal_dir(path: Path) -> Path:
    tok = _tokenizer(pad=False)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=1)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _t5_dir(path: Path) -> Path:
    tok = _tokenizer(pad=True)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,world", [("causal", 2), ("t5", 1)])
def test_local_model_dir_trains_and_final_loads_back(tmp_path: Path, kind: str, world: int) -> None:
    src = (_causal_dir if kind == "causal" else _t5_dir)(tmp_path / "model")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    held_out = write_jsonl(tmp_path / "eval.jsonl", qa_rows(10, seed=9))
    run = rundir.create(tmp_path / "run")
    cfg = RunConfig(model=str(src), data=str(data), eval_data=str(held_out), eval_every=3, batch=8, max_len=32,
                    log_every=2, cpu=True, num_processes=world, checkpoint_every=2, keep_checkpoints=2, lr=1e-3)
    write_run_json(run, cfg, sample_budget=48)
    assert run_attempt(run, 1, world) == [ev.WORKER_OK] * world, log_tail(run, 1)
    steps = step_events(run)
    total = 48 // (8 * world)
    assert [e["step"] for e in steps] == sorted({1, *range(2, total + 1, 2), total})
    assert steps[-1]["total_steps"] == total and steps[-1]["samples_seen"] == 48
    assert all(e["mfu"] is None for e in steps)
    assert [e["step"] for e in events(run, "eval")] == list(range(3, total + 1, 3))
    assert events(run, "eval")[0]["samples"] == 10 and events(run, "eval")[0]["loss"] > 0
    assert not (run.path / "tokenizer").exists()  # a model directory brings its own tokenizer
    saved = [(e["step"], e["reason"]) for e in events(run, "checkpoint")]
    assert saved == [(s, "periodic") for s in range(2, total, 2)] + [(total, "final")]
    kept = sorted(p.name for p in run.checkpoints.glob("step-*"))
    assert kept == [f"step-{s:08d}" for s, _ in saved[-2:]] and run.latest_checkpoint().name == kept[-1]

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
    trained = auto.from_pretrained(run.final, local_files_only=True)
    original = auto.from_pretrained(src, local_files_only=True)
    assert AutoTokenizer.from_pretrained(run.final, local_files_only=True).eos_token == "</s>"
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed


def test_preset_shapes(tmp_path: Path) -> None:
    model.build_char_tokenizer(Counter("abc"), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    with torch.device("meta"):
        chatlm = model.build_model("chatlm-mini", tok, seed=0, max_len=256)
    params = sum(p.numel() for p in chatlm.parameters())
    assert 185e6 < params < 190e6 and chatlm.config.vocab_size == 29298
    tiny = model.build_model("tiny", tok, seed=0, max_len=256)
    assert 1e6 < sum(p.numel() for p in tiny.parameters()) < 10e6
    assert default_lr("tiny") == 1e-3 and default_lr("chatlm-mini") == default_lr("/some/dir") == 1e-4


def test_mfu_counts_the_matmuls_a_token_passes_and_attention(tmp_path: Path) -> None:
    """DESIGN.md's MFU: 6 × the matmul parameters a token passes through (the embedding lookup
    not), the tied LM head only on the trained positions, plus 12 × layers × width × the average
    context, over the peak."""
    model.build_char_tokenizer(Counter("abc"), tmp_path / "tok")
    tiny = model.build_model("tiny", model.load_tokenizer(tmp_path / "tok"), seed=0, max_len=256)
    fpt = flops.flops_per_token(tiny, seq2seq=False)
    matmuls = sum(p.numel() for name, p in tiny.named_parameters() if "embed" not in name)
    assert fpt.enc == 0 and fpt.dec == 6 * matmuls and fpt.head_on_trained
    assert fpt.head == 6 * tiny.get_input_embeddings().weight.numel()
    rates = {"samples": 2.0, "enc_tokens": 0.0, "dec_tokens": 100.0, "trained_tokens": 30.0}  # 50 tokens a sample
    attention = 12 * tiny.config.num_hidden_layers * tiny.config.hidden_size * 50
    achieved = (fpt.dec + attention) * 100 + fpt.head * 30
    assert flops.mfu(rates, fpt, tiny.config, 1.0, 2) == round(achieved / 2e12, 4)
    assert flops.mfu(rates, fpt, tiny.config, 0.001, 1) == round(achieved / 1e9, 4)
    assert flops.mfu(rates, fpt, tiny.config, None, 1) is None and flops.peak_tflops(cuda=False) is None


def test_an_encoder_decoders_attention_counts_each_side_over_its_own_context(tmp_path: Path) -> None:
    """chatlm-mini (T5): the encoder's layers attend over the input, the decoder's over the target
    and (cross-attention) the input; the head, a plain one now, on the trained positions."""
    model.build_char_tokenizer(Counter("abc"), tmp_path / "tok")
    with torch.device("meta"):
        t5 = model.build_model("chatlm-mini", model.load_tokenizer(tmp_path / "tok"), seed=0, max_len=256)
    fpt = flops.flops_per_token(t5, seq2seq=True)
    assert fpt.head_on_trained and fpt.head == 6 * 29298 * 768 and fpt.enc > 0 and fpt.dec > fpt.enc
    rates = {"samples": 4.0, "enc_tokens": 400.0, "dec_tokens": 200.0, "trained_tokens": 200.0}  # 100 + 50 a sample
    attention = 12 * 768 * (10 * 400 * 100 + 10 * 200 * (50 + 100))
    achieved = fpt.enc * 400 + fpt.dec * 200 + fpt.head * 200 + attention
    assert flops.attention_flops(rates, t5.config) == attention
    assert flops.mfu(rates, fpt, t5.config, 1.0, 1) == round(achieved / 1e12, 4)


def test_chatlm_tokenizer_is_capped_at_the_model_vocab(tmp_path: Path) -> None:
    counts = Counter({chr(0x4E00 + i): 1 for i in range(30000)})
    model.build_char_tokenizer(counts, tmp_path / "tok", model.max_vocab("chatlm-mini"))
    assert len(model.load_tokenizer(tmp_path / "tok")) == 29298


def test_worker_refuses_bad_row_and_changed_max_len(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, qa_rows(10) + [{"prompt": "p", "response": ""}])
    run = rundir.create(tmp_path / "run")
    write_run_json(run, RunConfig(data=str(bad), batch=4, max_len=32, cpu=True))
    assert run_attempt(run, 1, 1) == [ev.WORKER_BAD_INPUT]
    (msg,) = [e["message"] for e in events(run, "log")]
    assert msg == f'{bad}:11: empty "response"'
    assert events(run)[-1]["kind"] == "worker_exit" and events(run)[-1]["reason"] == "error"

    good = write_jsonl(tmp_path / "good.jsonl", qa_rows(64))
    run = rundir.create(tmp_path / "run2")
    cfg = RunConfig(data=str(good), batch=4, max_len=32, cpu=True, log_every=1)
    write_run_json(run, cfg)
    assert run_attempt(run, 1, 1, requests=[(2, (1, "stop", None))]) == [ev.WORKER_OK], log_tail(run, 1)
    cfg.max_len = 48
    next_attempt(run, config=cfg.to_dict(), request_seq=1)
    assert run_attempt(run, 2, 1) == [ev.WORKER_BAD_INPUT]
    (msg,) = [e["message"] for e in events(run, "log", 2)]
    assert "written with --max-len 32, this run has 48" in msg
    update_run_json(run, data_fingerprint="0" * 64)
    assert run_attempt(run, 3, 1) == [ev.WORKER_BAD_INPUT]


def _t5_loss(net: T5ForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(**batch).loss


def test_position_bias_is_contiguous_in_autocast_dtype_and_keeps_the_loss() -> None:
    """The worker's T5 position biases come out contiguous and in autocast's dtype (what SDPA's
    fused kernels need of a mask); the loss and the bias's gradient stay what they were."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    plain = T5ForConditionalGeneration(config)
    hooked = T5ForConditionalGeneration(config)
    hooked.load_state_dict(plain.state_dict())
    assert model.fused_attention_bias(hooked) == 2  # the encoder's and the decoder's
    assert model.fused_attention_bias(AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=2, n_positions=32))) == 0

    attention = hooked.encoder.block[0].layer[0].SelfAttention
    bias = attention.compute_bias(5, 7)
    assert bias.dtype == torch.float32 and bias.is_contiguous()  # no autocast: the dtype stays
    assert torch.equal(bias, plain.encoder.block[0].layer[0].SelfAttention.compute_bias(5, 7))
    assert not plain.encoder.block[0].layer[0].SelfAttention.compute_bias(5, 7).is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = attention.compute_bias(5, 7)
        assert bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.shape == (1, 4, 5, 7)

    ids = torch.randint(1, 48, (3, 12))
    batch = {"input_ids": ids, "attention_mask": (torch.arange(12) < torch.tensor([[12], [9], [5]])).long(),
             "labels": torch.randint(1, 48, (3, 7))}
    a, b = _t5_loss(plain, batch), _t5_loss(hooked, batch)
    assert abs(a.item() - b.item()) <= 0.01 * abs(a.item())
    b.backward()
    grad = hooked.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
    assert grad is not None and grad.abs().sum() > 0
