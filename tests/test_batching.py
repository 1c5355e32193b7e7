"""trainer/batching.py: packed micro-batches of a causal LM. The samples laid end to end in one row
give the padded micro-batch's logits, loss sum and gradients (a tiny Qwen2, float32 on the CPU,
through transformers' own mask builders and sftui's chunked loss); no token attends across
samples; a step packs exactly its sample ids; the --compile bucket rule."""

from __future__ import annotations

import inspect
import random
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chat_helpers import CORPUS, build_model_dir
from sftui import chat
from sftui.trainer import batching, data, loss
from trainer_helpers import write_jsonl

MAX_LEN = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, data.Tokenized]:
    """A local Qwen2-shaped model directory with a ChatML tokenizer, and rows of varied lengths
    tokenized by sftui (template applied, prompts masked, some cut at MAX_LEN)."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("batching")
    model_dir = build_model_dir(tmp / "model", "chatml")
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.sample(CORPUS[:5], rng.randint(1, 3)))[:rng.randint(5, 150)],
             "response": CORPUS[rng.randint(0, 4)][:rng.randint(2, 60)]} for _ in range(24)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    cache = data.tokenize_to_cache(str(write_jsonl(tmp / "rows.jsonl", rows)), tok, MAX_LEN, False, False,
                                   tmp / "cache", lambda f: None, chat.resolve("auto", tok).template)
    assert len(set(np.diff(cache.offsets).tolist())) > 5 and np.diff(cache.offsets).max() == MAX_LEN
    return model_dir, tok, cache


def load(model_dir: Path, attn: str, checkpointing: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    if checkpointing:
        net.gradient_checkpointing_enable()
    return net.train()


def hidden(net: Any, micro: dict[str, Any], **extra: Any) -> torch.Tensor:
    """The last hidden state as the training model computes it: padded rows with their attention
    mask; a packed row with its position ids and no mask (transformers then finds the samples)."""
    base = getattr(net, net.base_model_prefix)
    if "position_ids" in micro:
        return base(input_ids=micro["input_ids"], position_ids=micro["position_ids"], use_cache=False,
                    **extra).last_hidden_state
    return base(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"], use_cache=False).last_hidden_state


def loss_sum(net: Any, micro: dict[str, Any], states: torch.Tensor) -> torch.Tensor:
    """sftui's loss of the micro-batch: its chunked head and cross-entropy, shifted by one."""
    return loss.head_loss_sum(states[:, :-1], micro["labels"][:, 1:], net.lm_head)


def per_sample(states: torch.Tensor, micro: dict[str, Any], lengths: np.ndarray) -> list[torch.Tensor]:
    """Each sample's rows of ``states``: from the padded rows, or cut from the packed row."""
    if "cu_seqlens" not in micro:
        return [states[i, :n] for i, n in enumerate(lengths)]
    return [states[0, a:a + n] for a, n in zip(micro["cu_seqlens"].tolist(), lengths)]


def compare(net: Any, cache: data.Tokenized, ids: np.ndarray, pad_id: int, padded_net: Any = None,
            backward: bool = True, **extra: Any) -> None:
    """The packed micro-batch (with a padding tail) through ``net`` against the padded one of the
    same samples (through ``padded_net``, the same weights; by default ``net``): per-token logits,
    the loss sum and (with ``backward``) every gradient."""
    padded = data.collate(cache, ids, pad_id)
    packed = batching.Packing(pad_id, MAX_LEN, buckets=True)(cache, ids)
    lengths = np.diff(cache.offsets)[ids]
    assert packed["input_ids"].shape[1] > lengths.sum()  # the tail is there, and must change nothing
    results = []
    for model, micro in ((padded_net or net, padded), (net, packed)):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            states = hidden(model, micro, **(extra if micro is packed else {}))
            total = loss_sum(model, micro, states)
        if backward:
            total.backward()
        logits = [model.lm_head(s).detach() for s in per_sample(states, micro, lengths)]
        results.append((total.detach(), logits, [p.grad.clone() for p in model.parameters() if backward]))
    (want, want_logits, want_grads), (got, got_logits, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(setup, attn: str, checkpointing: bool) -> None:
    model_dir, tok, cache = setup
    compare(load(model_dir, attn, checkpointing), cache, np.array([3, 0, 7, 11, 5]), tok.pad_token_id)


@pytest.mark.slow  # flex_attention runs on the CPU only compiled by inductor: a minute or more on a small box
def test_packed_equals_padded_flex_attention(setup) -> None:
    """Forward only: torch's flex_attention has no backward on the CPU (scripts/bench_packing.py
    trains it on a GPU against the padded loss curve)."""
    model_dir, tok, cache = setup
    compare(load(model_dir, "flex_attention"), cache, np.array([3, 0, 7, 11, 5]), tok.pad_token_id, backward=False)


def per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float | None, window_size: tuple[int, int],
                 enable_gqa: bool = False) -> torch.Tensor:
    """What torch's varlen kernel computes, on the CPU: each document alone through causal SDPA."""
    import torch.nn.functional as F

    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in pairwise(bounds))
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                     scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
                      for a, b in pairwise(bounds)])


def varlen_with_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch 2.12's signature: fewer key/value heads taken as they are."""
    return per_document(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa)


def varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch 2.10's signature, refusing fewer key/value heads than query heads."""
    assert q.shape[1] == k.shape[1] == v.shape[1]
    return per_document(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def varlen_native_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch 2.11's signature (no ``enable_gqa``) over a kernel that takes fewer key/value heads as
    they are, as FlashAttention's does."""
    return per_document(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa=k.shape[1] < q.shape[1])


def varlen_wrong_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """A kernel that takes fewer key/value heads and pairs them with the wrong query heads (tiled,
    not grouped): the trial at registration must catch it and keep the repeat."""
    if k.shape[1] < q.shape[1]:
        k, v = (t.repeat(1, q.shape[1] // t.shape[1], 1) for t in (k, v))
    return per_document(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def with_kernel(monkeypatch: pytest.MonkeyPatch, kernel: Any) -> None:
    """``VARLEN`` registered over ``kernel`` in place of torch's varlen_attn, for this test only."""
    import torch.nn.attention.varlen
    from transformers import AttentionInterface

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", kernel)
    monkeypatch.setitem(AttentionInterface._global_mapping, batching.VARLEN, None)  # gone again after the test
    batching.register_varlen("cpu")


@pytest.mark.parametrize("kernel, native", [(varlen_with_gqa, True), (varlen_without_gqa, False),
                                            (varlen_native_gqa, True), (varlen_wrong_gqa, False)],
                         ids=["gqa-flag", "no-gqa", "native-gqa", "wrong-gqa"])
def test_varlen_attention_through_the_model(setup, monkeypatch: pytest.MonkeyPatch, kernel: Any, native: bool) -> None:
    """``VARLEN`` glue: the boundaries travel from the model's forward to the attention, the
    layout and the key heads (GQA) are right: handed over as they are where the kernel takes
    them (its ``enable_gqa``, or found at registration), repeated where it does not. torch's
    varlen kernel runs on CUDA only: a CPU reference in its signature stands in for it here."""
    heads: list[int] = []

    def watched(q, k, v, *args, **kwargs):
        heads.append(k.shape[1])
        return kernel(q, k, v, *args, **kwargs)

    watched.__signature__ = inspect.signature(kernel)
    with_kernel(monkeypatch, watched)
    model_dir, tok, cache = setup
    net = load(model_dir, batching.VARLEN)
    assert net.config.num_key_value_heads < net.config.num_attention_heads
    assert batching.takes_fewer_kv_heads(kernel, "cpu") is (native and kernel is not varlen_with_gqa)
    heads.clear()
    ids = np.array([3, 0, 7, 11, 5])
    micro = batching.Packing(tok.pad_token_id, MAX_LEN, buckets=True)(cache, ids)
    compare(net, cache, ids, tok.pad_token_id, load(model_dir, "sdpa"), **batching.varlen_kwargs(micro))
    want = net.config.num_key_value_heads if native else net.config.num_attention_heads
    assert heads and set(heads) == {want}, heads


def test_varlen_attention_under_autocast(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast, as on a GPU, the kernel gets bf16 queries, keys and values (FlashAttention
    takes nothing else), though the rotary embedding leaves queries and keys in float32; the result
    is SDPA's under the same autocast, to bf16 rounding."""
    dtypes: list[set[torch.dtype]] = []

    def bf16_only(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        dtypes.append({q.dtype, k.dtype, v.dtype})
        return varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    with_kernel(monkeypatch, bf16_only)
    dtypes.clear()  # the trial at registration (float32 on the CPU)
    model_dir, tok, cache = setup
    micro = batching.Packing(tok.pad_token_id, MAX_LEN)(cache, np.array([3, 0, 7]))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got = hidden(load(model_dir, batching.VARLEN), micro, **batching.varlen_kwargs(micro))
        want = hidden(load(model_dir, "sdpa"), micro)
    assert dtypes and all(d == {torch.bfloat16} for d in dtypes)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_samples(setup, attn: str) -> None:
    """Changing the first sample's tokens changes its own logits and no other sample's; with
    position ids that do not restart (one long sequence) the later samples would change too."""
    model_dir, tok, cache = setup
    net = load(model_dir, attn).eval()
    ids = np.array([2, 9, 4])
    lengths = np.diff(cache.offsets)[ids]
    micro = batching.Packing(tok.pad_token_id, MAX_LEN)(cache, ids)
    changed = {**micro, "input_ids": micro["input_ids"].clone()}
    changed["input_ids"][0, 1:lengths[0]] = (changed["input_ids"][0, 1:lengths[0]] + 1) % net.config.vocab_size
    unpacked = {**micro, "position_ids": torch.arange(int(lengths.sum()))[None]}
    with torch.no_grad():
        before, after = (per_sample(hidden(net, m), micro, lengths) for m in (micro, changed))
        joined = per_sample(hidden(net, {**unpacked, "input_ids": changed["input_ids"]}), micro, lengths)
        joined_before = per_sample(hidden(net, unpacked), micro, lengths)
    assert not torch.allclose(before[0], after[0])
    for a, b in zip(before[1:], after[1:]):
        assert torch.equal(a, b)
    assert not torch.allclose(joined[2], joined_before[2])


def test_packed_layout(setup) -> None:
    """The row holds each sample's tokens and labels as the padded rows do, end to end; position
    ids restart at each sample; the tail is padding in documents of at most max-len tokens,
    untrained; with zero weight nothing is trained."""
    _, tok, cache = setup
    ids = np.array([5, 1, 8, 12, 0, 19, 3, 22])
    padded = data.collate(cache, ids, tok.pad_token_id)
    lengths = np.diff(cache.offsets)[ids]
    plain = batching.Packing(tok.pad_token_id, MAX_LEN)(cache, ids)
    assert plain["input_ids"].shape == (1, lengths.sum()) and plain["max_seqlen"] == lengths.max()
    assert plain["cu_seqlens"].dtype == torch.int32
    assert plain["cu_seqlens"].tolist() == [0, *np.cumsum(lengths).tolist()]
    for k, (a, n) in enumerate(zip(plain["cu_seqlens"].tolist(), lengths)):
        for name in ("input_ids", "labels"):
            assert torch.equal(plain[name][0, a:a + n], padded[name][k, :n])
        assert plain["position_ids"][0, a:a + n].tolist() == list(range(n))
        assert plain["labels"][0, a] == -100
    tokens = int(lengths.sum())
    bucketing = batching.Packing(tok.pad_token_id, MAX_LEN, buckets=True)
    bucketed = bucketing(cache, ids)
    assert bucketed["input_ids"].shape == (1, batching.token_bucket(tokens + bucketing.tail_documents(len(ids)),
                                                                    MAX_LEN * len(ids)))
    assert len(bucketed["cu_seqlens"]) == len(ids) + bucketing.tail_documents(len(ids)) + 1
    # A row rounded up to 5 × max-len has a tail longer than max-len: it comes in pieces.
    tailed = batching.Packing(tok.pad_token_id, MAX_LEN, multiple=5 * MAX_LEN)(cache, ids)
    width = tailed["input_ids"].shape[1]
    assert width % (5 * MAX_LEN) == 0 and width - tokens > MAX_LEN
    docs = np.diff(tailed["cu_seqlens"].numpy())
    assert docs[:len(ids)].tolist() == lengths.tolist() and (docs[len(ids):] <= MAX_LEN).all()
    assert tailed["max_seqlen"] == MAX_LEN and tailed["cu_seqlens"][-1] == width
    tail = slice(tokens, width)
    assert (tailed["input_ids"][0, tail] == tok.pad_token_id).all() and (tailed["labels"][0, tail] == -100).all()
    assert tailed["position_ids"][0, tail].tolist() == [i for n in docs[len(ids):] for i in range(n)]
    assert (batching.Packing(tok.pad_token_id, MAX_LEN)(cache, ids, weight=False)["labels"] == -100).all()
    # Every token a target (a row with no prompt): a sample's first token is still not trained, as padded.
    every = replace(cache, mask=np.ones_like(cache.mask))
    labels = batching.Packing(tok.pad_token_id, MAX_LEN)(every, ids)["labels"][0]
    padded_labels = data.collate(every, ids, tok.pad_token_id)["labels"]
    assert torch.equal(labels, torch.cat([padded_labels[k, :n] for k, n in enumerate(lengths)]))
    assert (labels != -100).sum() == lengths.sum() - len(ids)


def test_a_step_packs_exactly_its_samples(setup) -> None:
    """Through StepBatches, packed: every micro-batch holds exactly the samples the padded one
    holds (the plan's), and the trained tokens the loss counts are the step's ``n_target``,
    over a whole epoch with a short last step (a zero-weight pass)."""
    _, tok, cache = setup
    plan = data.Plan(cache.n, seed=3, target=cache.n)
    steps = plan.steps(0, 5 * 2)
    assert steps[-1][1] < 5  # the last step leaves its second micro-batch empty
    padded = data.StepBatches(cache, plan, steps, 0, 5, 2, tok.pad_token_id)
    packed = data.StepBatches(cache, plan, steps, 0, 5, 2, tok.pad_token_id,
                              packing=batching.Packing(tok.pad_token_id, MAX_LEN, buckets=True))
    for j in range(len(steps)):
        want, got = padded[j], packed[j]
        assert got["row_ids"] == want["row_ids"]
        for p, q in zip(want["micro"], got["micro"]):
            rows = [p["input_ids"][k, :int(n)] for k, n in enumerate(p["attention_mask"].sum(1))]
            bounds = q["cu_seqlens"].tolist()
            docs = [q["input_ids"][0, a:b] for a, b in pairwise(bounds)]
            assert all(torch.equal(r, d) for r, d in zip(rows, docs))
            assert all((d == tok.pad_token_id).all() for d in docs[len(rows):])  # the rest is the tail
        counts = [sum(int((m["labels"][:, 1:] != -100).sum()) for m in item["micro"]) for item in (want, got)]
        assert counts == [got["n_target"]] * 2


@given(tokens=st.integers(1, 40_000), samples=st.integers(1, 128))
def test_token_bucket(tokens: int, samples: int) -> None:
    """A bucket holds the tokens, wastes at most a fifth of the row (past the smallest bucket),
    is a multiple of 64, and never exceeds the padded micro-batch (samples × max-len)."""
    cap = samples * 512
    if tokens > cap:
        with pytest.raises(ValueError):
            batching.token_bucket(tokens, cap)
        return
    width = batching.token_bucket(tokens, cap)
    assert tokens <= width <= cap
    if width < cap:
        assert width % 64 == 0 and (width <= batching.MIN_BUCKET or width * 4 <= tokens * 5)


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), max_len=st.sampled_from([8, 64, 512]))
def test_bucketed_tails_keep_one_document_count(lengths: list[int], max_len: int) -> None:
    """Under --compile every micro-batch of a sample count has the same number of documents (one
    cu_seqlens length: one CUDA graph per bucket), each tail document 1 to max-len tokens, the row a
    bucket no wider than the padded micro-batch; samples that leave too little room for those
    documents take the whole padded width, in pieces."""
    lengths = [min(n, max_len) for n in lengths]
    packing = batching.Packing(0, max_len, buckets=True)
    tokens, samples = sum(lengths), len(lengths)
    width, tail = packing.layout(tokens, samples)
    assert width == tokens + int(tail.sum()) <= samples * max_len
    assert (tail >= 1).all() and (tail <= max_len).all()
    if tokens + packing.tail_documents(samples) <= samples * max_len:
        assert len(tail) == packing.tail_documents(samples)
        assert width == batching.token_bucket(tokens + len(tail), samples * max_len)
    else:
        assert width == samples * max_len
    # A row never narrows as its tokens grow: the probe's heaviest micro-batch is the widest row.
    assert all(packing.layout(t, samples)[0] <= packing.layout(t + 1, samples)[0]
               for t in range(max(samples, tokens - 64), min(tokens + 64, samples * max_len)))


def test_token_buckets_are_few() -> None:
    """Four widths per doubling: a compiled step meets a handful of shapes, not one per length."""
    widths = {batching.token_bucket(t, 10**9) for t in range(1, 16_385)}
    assert sorted(widths) == [256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072,
                              3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384]
