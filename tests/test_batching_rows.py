"""trainer/batching.py's RowPacking: an encoder-decoder (T5) micro-batch packed into rows of
--max-len. Each sample lands in one row, whole, on both sides; the masks keep it to itself; the
packed rows give the padded micro-batch's loss sum and gradients (a small T5, float32 on the CPU,
through the worker's TrainingModel and token_loss_sum), and would not with any mask opened;
compiled, rows of any count share one graph."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from chat_helpers import t5_dir
from sftui.trainer import batching, data, loop, loss, model as models
from trainer_helpers import qa_rows, write_jsonl

MAX_LEN = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, data.Tokenized]:
    """A small T5 directory and rows of varied lengths tokenized as sftui does for it."""
    tmp = tmp_path_factory.mktemp("rows")
    model_dir = t5_dir(tmp / "t5")
    tok = models.load_tokenizer(model_dir)
    cache = data.tokenize_to_cache(str(write_jsonl(tmp / "qa.jsonl", qa_rows(48))), tok, MAX_LEN, True, False,
                                   tmp / "cache", lambda f: None)
    assert len(set(np.diff(cache.label_offsets).tolist())) > 2
    return model_dir, tok, cache


def packer(tok: Any, width: int | None = None) -> batching.RowPacking:
    return batching.RowPacking(tok.pad_token_id, tok.pad_token_id, MAX_LEN, width)  # t5_dir's decoder start: pad


IDS = np.array([5, 1, 8, 12, 0, 19, 3, 22, 30, 41, 7, 2])


def test_each_sample_lands_whole_in_one_row_within_max_len(setup) -> None:
    _, tok, cache = setup
    rows = packer(tok).rows(cache, IDS)
    assert sorted(k for row in rows for k in row) == list(range(len(IDS)))
    enc, dec = (np.diff(off)[IDS] for off in (cache.offsets, cache.label_offsets))
    assert all(enc[row].sum() <= MAX_LEN and dec[row].sum() <= MAX_LEN for row in rows)
    assert 1 < len(rows) < len(IDS)  # rows of several samples: fewer rows than samples
    # first fit decreasing: the samples in order of their longer side (ties in plan order), and a
    # sample opens a new row only when no row before had room for it on both sides
    rank = np.argsort(np.argsort(-np.maximum(enc, dec), kind="stable"))
    for r, row in enumerate(rows):
        assert list(rank[row]) == sorted(rank[row])
        opener = row[0]
        for earlier in rows[:r]:
            before = [k for k in earlier if rank[k] < rank[opener]]
            assert enc[before].sum() + enc[opener] > MAX_LEN or dec[before].sum() + dec[opener] > MAX_LEN


def test_the_longest_samples_are_placed_first() -> None:
    """Three short samples then three long ones: in plan order the short ones share a row and each
    long one needs a row of its own (4 rows); longest first, each short one fills a long one's
    row (3 rows). The layout changes, not the samples."""
    lengths = np.array([10, 10, 10, 38, 38, 38])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cache = SimpleNamespace(offsets=offsets, label_offsets=offsets)
    rows = batching.RowPacking(0, 0, MAX_LEN).rows(cache, np.arange(6))
    assert rows == [[3, 0], [4, 1], [5, 2]]


def test_the_layout_and_the_masks(setup) -> None:
    """Tokens, labels and decoder inputs per sample as the padded path has them; encoder,
    decoder (causal) and cross attention within a sample only; the padding attends to itself."""
    _, tok, cache = setup
    pack = packer(tok)
    micro = pack(cache, IDS)
    padded = data.collate(cache, IDS, tok.pad_token_id)
    masks = batching.row_masks(micro["encoder_sample"], micro["decoder_sample"])
    enc_mask, dec_mask, cross = (masks[k][:, 0] for k in ("attention_mask", "decoder_attention_mask",
                                                         "cross_attention_mask"))
    for r, row in enumerate(pack.rows(cache, IDS)):
        at_e = at_d = 0
        for k in row:
            n_e = int(padded["attention_mask"][k].sum())
            n_d = int((padded["labels"][k] != -100).sum())
            e, d = slice(at_e, at_e + n_e), slice(at_d, at_d + n_d)
            assert torch.equal(micro["input_ids"][r, e], padded["input_ids"][k, :n_e])
            assert torch.equal(micro["labels"][r, d], padded["labels"][k, :n_d])
            assert micro["decoder_input_ids"][r, at_d] == tok.pad_token_id
            assert torch.equal(micro["decoder_input_ids"][r, at_d + 1:at_d + n_d], padded["labels"][k, :n_d - 1])
            assert enc_mask[r, e].sum() == n_e * n_e and enc_mask[r, e, e].all()
            assert dec_mask[r, d].sum() == n_d * (n_d + 1) // 2
            assert torch.equal(dec_mask[r, d, d], torch.ones(n_d, n_d, dtype=torch.bool).tril())
            assert cross[r, d].sum() == n_d * n_e and cross[r, d, e].all()
            at_e, at_d = at_e + n_e, at_d + n_d
        assert (micro["labels"][r, at_d:] == -100).all() and (micro["input_ids"][r, at_e:] == tok.pad_token_id).all()
        assert not enc_mask[r, at_e:, :at_e].any() and not enc_mask[r, :at_e, at_e:].any()
        assert not dec_mask[r, at_d:, :at_d].any() and not dec_mask[r, :at_d, at_d:].any()
        assert enc_mask[r].diagonal().all() and dec_mask[r].diagonal().all()
    assert micro["input_ids"].shape[1] <= MAX_LEN and micro["labels"].shape[1] <= MAX_LEN
    assert micro["encoder_sample"].dtype == micro["decoder_sample"].dtype == torch.int32
    assert packer(tok, MAX_LEN)(cache, IDS)["input_ids"].shape[1] == MAX_LEN  # compiled: one width
    assert (pack(cache, IDS, weight=False)["labels"] == -100).all()
    # compiled (one width), a lone row gets a padding row beside it: no dimension of size 1
    lone = packer(tok, MAX_LEN)(cache, IDS[:1])
    assert lone["input_ids"].shape[0] == 2 and (lone["encoder_sample"][1] == -1).all()
    assert (lone["labels"][1] == -100).all() and pack(cache, IDS[:1])["input_ids"].shape[0] == 1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_packed_rows_give_the_padded_loss_and_gradients(setup, checkpointing: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, tok, cache = setup
    net = models.build_model(str(model_dir), tok, 0, MAX_LEN, "cpu", torch.float32).train()
    if checkpointing:
        net.gradient_checkpointing_enable()
    form, start = loss.TrainingModel(net), net.config.decoder_start_token_id
    results = []
    for micro in (data.collate(cache, IDS, tok.pad_token_id), packer(tok)(cache, IDS)):
        net.zero_grad()
        total = loop.token_loss_sum(form, micro, start)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in net.parameters()]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert torch.allclose(packed, padded, rtol=1e-5), (packed, padded)
    for a, b in zip(padded_grads, packed_grads):  # float32 sums in another order: relative to each tensor's scale
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    # each mask matters: opened to every position of its row (the decoder's still causal), the loss moves
    micro = packer(tok)(cache, IDS)
    real = batching.row_masks
    with torch.no_grad():
        for name in ("attention_mask", "decoder_attention_mask", "cross_attention_mask"):
            def opened(enc: torch.Tensor, dec: torch.Tensor, name: str = name) -> dict[str, torch.Tensor]:
                masks = real(enc, dec)
                whole = torch.ones_like(masks[name])
                return {**masks, name: whole.tril() if name == "decoder_attention_mask" else whole}

            with monkeypatch.context() as patch:
                patch.setattr(batching, "row_masks", opened)
                leaked = loop.token_loss_sum(form, micro, start)
            assert not torch.allclose(leaked, packed, rtol=1e-3), name


def test_compiled_rows_share_one_graph_across_row_counts(setup) -> None:
    """--compile: rows of max-len columns, their count varying with the samples, through
    loop.token_loss_sum (which marks it dynamic) into a compiled TrainingModel: nothing is
    compiled after the first micro-batch (dynamo with the eager backend, the CPU)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    model_dir, tok, cache = setup
    net = models.build_model(str(model_dir), tok, 0, MAX_LEN, "cpu", torch.float32)
    torch._dynamo.reset()
    graphs = CompileCounter()
    compiled = loss.TrainingModel(net)
    compiled.compile(backend=graphs)
    counts, first = set(), None
    for n in (6, 12, 30, 1, 20):  # 1: one sample, one row and its padding row
        micro = packer(tok, MAX_LEN)(cache, np.arange(n))
        counts.add(micro["input_ids"].shape[0])
        loop.token_loss_sum(compiled, micro, net.config.decoder_start_token_id).backward()
        first = first or graphs.frame_count
    assert len(counts) >= 3, counts
    assert graphs.frame_count == first, (first, graphs.frame_count)


def test_packed_rows_are_refused_for_an_attention_that_would_misread_their_masks(setup, monkeypatch) -> None:
    """transformers hands 4-D masks over as they are: T5's eager attention would add the booleans
    instead of masking. A model that loads with any attention but sdpa is refused, one line."""
    from sftui.config import ConfigError, RunConfig

    model_dir, tok, _ = setup
    build = models.build_model

    def eager(*args: Any, **kwargs: Any) -> Any:
        net = build(*args, **kwargs)
        net.set_attn_implementation("eager")
        return net

    cfg = RunConfig(model=str(model_dir), max_len=MAX_LEN, cpu=True, packing=True)
    loop.new_model(cfg, tok, torch.device("cpu"), 1e-3)  # sdpa, as it loads
    monkeypatch.setattr(models, "build_model", eager)
    with pytest.raises(ConfigError, match="loads with eager attention; packed encoder-decoder rows need sdpa"):
        loop.new_model(cfg, tok, torch.device("cpu"), 1e-3)
