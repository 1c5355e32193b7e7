"""trainer/loss.py: the head and cross-entropy over the trained positions only, in chunks, give the
same loss and the same gradients as the model's own full logits (tiny Llama and T5 shapes on the
CPU; a tiny BART keeps its own forward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

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
        assert torch.allclose(wrapped(**b, trained=loss.trained_positions(b["labels"], shifted=True)), reference, rtol=1e-5)


def test_models_whose_logits_are_not_a_plain_head_keep_their_own_forward():
    capped = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))
    capped.config.final_logit_softcapping = 30.0
    assert loss.plain_head(capped) is None
    bart = BartForConditionalGeneration(BartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32)).eval()
    assert loss.plain_head(bart) is None  # its logits add final_logits_bias
    b = batch(100)
    b["decoder_input_ids"] = b["input_ids"].clamp(min=0)
    logits = bart(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  decoder_input_ids=b["decoder_input_ids"]).logits
    want = F.cross_entropy(logits.float().reshape(-1, 100), b["labels"].reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(loss.TrainingModel(bart)(**b), want)


def t5_family(kind: str, scaled: bool = True, separate_head: bool = False) -> torch.nn.Module:
    """A tiny t5, mt5 or umt5 (no dropout), its vocabulary one the head pads for its matmuls (300 → 320).
    ``scaled`` False: ``tie_word_embeddings=False``, which transformers 5.x turns into an unscaled
    forward whose head is still the embedding; ``separate_head``: a head weight of its own."""
    import transformers

    cls, config = {"t5": ("T5ForConditionalGeneration", "T5Config"), "mt5": ("MT5ForConditionalGeneration", "MT5Config"),
                   "umt5": ("UMT5ForConditionalGeneration", "UMT5Config")}[kind]
    torch.manual_seed(0)
    net = getattr(transformers, cls)(getattr(transformers, config)(
        vocab_size=300, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=2, tie_word_embeddings=scaled,
        dropout_rate=0.0))
    if separate_head:
        net.lm_head.weight = torch.nn.Parameter(net.shared.weight.detach() * 0.5 + 0.01)
    return net


# (model, scaled, separate head): transformers 5.24's t5 and umt5 scale by d_model^-0.5 unless told not to;
# its mt5 never does; a head of its own has its own gradient.
FAMILY = [("t5", True, False), ("t5", False, False), ("t5", True, True), ("umt5", True, False), ("mt5", True, False)]


@pytest.mark.parametrize(("kind", "scaled", "separate"), FAMILY)
def test_the_t5_family_takes_the_chunked_head_with_its_own_loss_and_gradients(monkeypatch, kind, scaled, separate):
    """The T5 family's decoder states, scaled as its own forward scales them (found by running it:
    transformers' t5 and mt5 disagree), through the chunked head: the loss and every gradient of the
    model's own forward with labels, over several chunks, and the trained positions counted on the
    host as the loop counts them."""
    net = t5_family(kind, scaled, separate)
    assert (net.lm_head.weight is net.shared.weight) != separate
    monkeypatch.setattr(loss, "chunk_rows", lambda vocab: 7)
    wrapped = loss.TrainingModel(net)
    assert wrapped.head is net.lm_head and net.training  # the scale's trial run left it in training mode
    assert wrapped.scale == (16 ** -0.5 if scaled and kind != "mt5" else 1.0)
    b = batch(300)
    b["decoder_input_ids"] = b["input_ids"].roll(1, 1)
    got = wrapped(**b, trained=loss.trained_positions(b["labels"], shifted=False))
    got.backward()
    got_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    out = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"],
              labels=b["labels"])
    want = out.loss * (b["labels"] != -100).sum()  # the model's mean, as a sum
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, w in zip(got_grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())  # float32 sums in another order


def test_a_t5_whose_forward_scales_otherwise_keeps_its_own_forward():
    """A forward that multiplies its logits by neither d_model^-0.5 nor 1 (here a hook on the head):
    no scale gives its logits, so the model's own forward and full loss stay."""
    net = t5_family("t5")
    net.lm_head.register_forward_hook(lambda module, args, out: out * 3.0)
    wrapped = loss.TrainingModel(net)
    assert loss.decoder_scale(net) is None and wrapped.head is None
    b = batch(300)
    b["decoder_input_ids"] = b["input_ids"].roll(1, 1)
    out = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"],
              labels=b["labels"])
    torch.testing.assert_close(wrapped(**b), out.loss * (b["labels"] != -100).sum(), rtol=1e-5, atol=1e-4)


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
        compiled(**b, trained=loss.trained_positions(b["labels"], shifted=True)).backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


# The fused head loss itself: its value and the gradients it computes in the forward against autograd
# through the plain expression, over several chunks of the real chunk_rows (CHUNK_BYTES 0: 128 rows).

VOCAB, DIM, ROWS, WIDTH = 50, 16, 2, 200


def plain(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")


def head_case(dtype: torch.dtype, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """Hidden states, labels with a prompt and a padded tail masked out (~300 trained, 3 chunks), a head."""
    torch.manual_seed(0)  # the head's initialisation
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, WIDTH, DIM, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=g)
    labels[:, :30] = -100
    labels[1, -40:] = -100
    head = torch.nn.Linear(DIM, VOCAB, bias=bias).to(dtype)
    return hidden, labels, head


def grads(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    out = [None if t is None or t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_the_fused_loss_and_its_gradients_equal_autograd_through_the_plain_head(monkeypatch, dtype, bias, indexed):
    monkeypatch.setattr(loss, "CHUNK_BYTES", 0)
    calls, fused = [], loss._head_loss
    monkeypatch.setattr(loss, "_head_loss", lambda *a: calls.append(1) or fused(*a))
    hidden, labels, head = head_case(dtype, bias)
    assert (labels != -100).sum() > 2 * loss.chunk_rows(VOCAB)
    trained = (labels != -100).reshape(-1).nonzero().squeeze(1) if indexed else None
    got = loss.head_loss_sum(hidden, labels, head, trained)
    (got * 2.5).backward()  # the loop scales the sum (world / step targets): the gradients must follow
    assert len(calls) == 1  # the backward recomputes nothing
    got_grads = grads(hidden, head.weight, head.bias)
    keep = labels != -100
    want = plain(hidden[keep], labels[keep], head.weight, head.bias)
    (want * 2.5).backward()
    want_grads = grads(hidden, head.weight, head.bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)  # the same logits, summed in float32
    for a, w in zip(got_grads, want_grads):
        assert (a is None) == (w is None)
        if a is not None:
            assert a.dtype == dtype
            # bf16: each side rounds its own way (the fused weight gradient sums its chunks in float32)
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 2e-2 * w.abs().max()}
            torch.testing.assert_close(a, w, **tol)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_theirs():
    hidden, labels, head = head_case(torch.float32, bias=True)
    head.requires_grad_(False)
    loss.head_loss_sum(hidden, labels, head).backward()
    assert head.weight.grad is None and head.bias.grad is None
    got = grads(hidden)[0]
    keep = labels != -100
    plain(hidden[keep], labels[keep], head.weight, head.bias).backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-5, atol=1e-6)


def test_a_head_tied_to_the_embeddings_gets_both_gradients():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, DIM)
    head = torch.nn.Linear(DIM, VOCAB, bias=False)
    head.weight = embed.weight
    ids = torch.randint(0, VOCAB, (ROWS, WIDTH))
    labels = ids.roll(-1, 1)
    labels[:, :30] = -100

    def total(fused: bool) -> torch.Tensor:
        hidden = torch.tanh(embed(ids))
        if fused:
            return loss.head_loss_sum(hidden, labels, head)
        keep = labels != -100
        return plain(hidden[keep], labels[keep], head.weight, None)

    total(True).backward()
    got = grads(embed.weight)[0]
    total(False).backward()
    torch.testing.assert_close(got, embed.weight.grad, rtol=1e-5, atol=1e-6)


def test_without_gradients_only_the_loss_is_computed():
    hidden, labels, head = head_case(torch.float32, bias=True)
    keep = labels != -100
    want = plain(hidden[keep], labels[keep], head.weight, head.bias).detach()
    with torch.no_grad():
        got = loss.head_loss_sum(hidden, labels, head)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want)
    head.requires_grad_(False)
    got = loss.head_loss_sum(hidden.detach(), labels, head)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want)


def test_no_trained_position_is_a_zero_that_reaches_the_hidden_states_and_the_head():
    hidden, labels, head = head_case(torch.float32, bias=False)
    labels[:] = -100
    for trained in (None, torch.zeros(0, dtype=torch.long)):
        got = loss.head_loss_sum(hidden, labels, head, trained)
        got.backward()
        assert got.item() == 0.0
        assert not hidden.grad.any() and not head.weight.grad.any()
        grads(hidden, head.weight)


def test_under_autocast_the_logits_are_in_the_autocast_dtype_as_with_the_plain_head():
    """bf16 autocast on the CPU stands for a GPU's: float32 hidden states and head, bf16 logits."""
    hidden, labels, head = head_case(torch.float32, bias=True)
    keep = labels != -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.head_loss_sum(hidden, labels, head)
        want = plain(hidden[keep], labels[keep], head.weight, head.bias)
    got.backward()
    got_grads = grads(hidden, head.weight, head.bias)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)  # the same bf16 logits, summed in float32
    for a, w in zip(got_grads, grads(hidden, head.weight, head.bias)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=0, atol=2e-2 * w.abs().max())


def test_a_label_past_the_vocabulary_fails_as_without_the_heads_padding():
    """The head's matmuls pad the vocabulary (50 → 64 rows); a label in the padding is still an error."""
    hidden, labels, head = head_case(torch.float32, bias=False)
    labels[0, -1] = VOCAB
    with pytest.raises((RuntimeError, IndexError)):
        loss.head_loss_sum(hidden, labels, head)
