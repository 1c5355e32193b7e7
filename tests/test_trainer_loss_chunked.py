"""trainer/loss.py: the head and cross-entropy over the trained positions only, in chunks, give the
same loss and the same gradients as the model's own full logits (the tiny Llama shape on the CPU;
a tiny T5 keeps its own forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from sftui.trainer import loss


def batch(vocab: int, rows: int = 3, width: int = 17) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0                          # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100                      # the prompt is not trained
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_loss(net, b):
    logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def test_chunked_loss_equals_the_full_loss_and_its_gradients(monkeypatch):
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    b = batch(300)
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * 300 * 7)  # 128-row floor: force several chunks below
    monkeypatch.setattr(loss, "chunk_rows", lambda vocab: 7)
    wrapped = loss.TrainingModel(net)
    assert wrapped.head is net.lm_head
    chunked = wrapped(**b)
    chunked.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    reference = full_loss(net, b)
    reference.backward()
    want = [p.grad for p in net.parameters()]
    assert torch.allclose(chunked, reference, rtol=1e-5), (chunked, reference)
    assert all(torch.allclose(a, w, atol=1e-6, rtol=1e-4) for a, w in zip(got, want))
    with torch.no_grad():
        assert torch.allclose(wrapped(**b), reference, rtol=1e-5)
        # the positions counted on the host select the same ones
        assert torch.allclose(wrapped(**b, trained=loss.trained_positions(b["labels"])), reference, rtol=1e-5)


def test_models_whose_logits_are_not_a_plain_head_keep_their_own_forward():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2)).eval()
    assert loss.plain_head(t5) is None
    capped = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))
    capped.config.final_logit_softcapping = 30.0
    assert loss.plain_head(capped) is None
    b = batch(100)
    b["decoder_input_ids"] = b["input_ids"].clamp(min=0)
    wrapped = loss.TrainingModel(t5)
    logits = t5(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                decoder_input_ids=b["decoder_input_ids"]).logits
    want = F.cross_entropy(logits.float().reshape(-1, 100), b["labels"].reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(wrapped(**b), want)


def test_the_compiled_model_does_not_recompile_when_the_trained_count_changes():
    """Under --compile every batch is padded to one width, but each step trains another number of
    positions: the chunk loop must not make dynamo specialise on that count (it would recompile
    every step, then give up to eager at the recompile limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    compiled = torch.compile(loss.TrainingModel(net), backend="eager")
    torch._dynamo.reset()
    counters.clear()
    for prompt in (4, 6, 9, 11):  # the same shapes, another count of trained positions each time
        b = batch(300)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        b["labels"][:, :prompt] = -100
        compiled(**b, trained=loss.trained_positions(b["labels"])).backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
