"""Tokenization: the truncation rule, prompt masking by position (pad == EOS), the memory-mapped
cache and the sample plan's arithmetic."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftui.config import count_steps
from sftui.rows import DataError
from sftui.trainer import data, model
from trainer_helpers import write_jsonl


@given(p=st.integers(0, 300), r=st.integers(1, 300), max_len=st.integers(8, 128))
def test_truncation_keeps_a_quarter_for_the_response(p: int, r: int, max_len: int) -> None:
    ids = list(range(p + r))
    mask = [0] * p + [1] * r
    out, out_mask = data.truncate_causal(ids, mask, max_len)
    kept_prompt, kept_resp = out_mask.count(0), out_mask.count(1)
    assert len(out) == min(p + r, max_len) and len(out) == len(out_mask)
    assert kept_resp >= min(r, max_len // 4)
    assert out[:kept_prompt] == ids[p - kept_prompt:p]  # the prompt is cut from the left
    assert out[kept_prompt:] == ids[p:p + kept_resp]  # the response keeps its beginning
    if p + r > max_len and p < max_len - max_len // 4:
        assert kept_prompt == p  # a prompt that leaves room is not cut at all


def _pad_is_eos_tokenizer(tmp_path: Path):
    """A character tokenizer whose pad token is the EOS token, as with many causal LMs."""
    model.build_char_tokenizer(Counter("abcdef =+-0123456789"), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def test_prompt_masked_by_position_when_pad_is_eos(tmp_path: Path) -> None:
    tok = _pad_is_eos_tokenizer(tmp_path)
    rows = [{"prompt": "ab =", "response": "cd"}, {"prompt": "a =", "response": "abcdef"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cache = data.tokenize_to_cache(str(path), tok, 64, False, False, tmp_path / "cache", lambda f: None)
    batch = data.collate(cache, np.array([0, 1]), tok.pad_token_id)
    ids, labels, attention = (batch[k].numpy() for k in ("input_ids", "labels", "attention_mask"))
    eos, bos = tok.eos_token_id, tok.bos_token_id
    # row 0: <s> a b ␣ = c d </s> then padding with the same id as EOS
    assert ids[0, 0] == bos and list(ids[0, 5:8]) == tok.convert_tokens_to_ids(["c", "d"]) + [eos]
    assert list(labels[0, :5]) == [-100] * 5
    assert list(labels[0, 5:8]) == list(ids[0, 5:8])  # the EOS after the response is a target
    assert (ids[0, 8:] == eos).all() and (labels[0, 8:] == -100).all() and (attention[0, 8:] == 0).all()
    assert cache.n_target.tolist() == [3, 7] and cache.row_ids.tolist() == [0, 1]


def test_seq2seq_encoding_and_cache_reopens(tmp_path: Path) -> None:
    tok = _pad_is_eos_tokenizer(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdefabcdef", "response": "0123456789abc"}])
    cache = data.tokenize_to_cache(str(path), tok, 8, True, False, tmp_path / "c", lambda f: None)
    src = cache.ids[cache.offsets[0]:cache.offsets[1]].tolist()
    tgt = cache.labels[cache.label_offsets[0]:cache.label_offsets[1]].tolist()
    assert len(src) == 8  # the input is cut from the left to max_len, ending in EOS
    assert src[-1] == tok.eos_token_id and src[:-1] == tok.convert_tokens_to_ids(list("abcdefabcdef"))[-7:]
    assert tgt == tok.convert_tokens_to_ids(list("01234567"))  # labels cut to max_len
    reopened = data.Tokenized.open(tmp_path / "c")
    assert reopened.n == 1 and reopened.seq2seq and not reopened.ids.flags.writeable and not reopened.ids.flags.owndata


def test_tokenizing_reports_progress_and_names_or_counts_bad_rows(tmp_path: Path) -> None:
    tok = _pad_is_eos_tokenizer(tmp_path)
    rows = [{"prompt": "ab =", "response": "cd"}] * 5000  # more than one chunk
    seen: list[float] = []
    cache = data.tokenize_to_cache(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 16, False, False,
                                   tmp_path / "c", seen.append)
    assert cache.n == 5000 and len(seen) == 2 and 0.5 < seen[0] < 1 and seen[-1] == 1.0
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"prompt": "x"}, rows[0]])
    with pytest.raises(DataError, match=rf'^{bad}:4: missing field "response"'):
        data.tokenize_to_cache(str(bad), tok, 16, False, False, tmp_path / "c2", seen.append)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp", "c2"))]  # nothing half-written
    skipping = data.tokenize_to_cache(str(bad), tok, 16, False, True, tmp_path / "c3", seen.append)
    assert (skipping.n, skipping.skipped, skipping.row_ids.tolist()) == (4, 1, [0, 1, 2, 4])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), per_step=st.integers(1, 20), epochs=st.integers(1, 3), stop=st.integers(0, 200),
       per_step_after=st.integers(1, 20))
def test_plan_covers_each_epoch_once_across_a_batch_change(n: int, per_step: int, epochs: int, stop: int,
                                                           per_step_after: int) -> None:
    plan = data.Plan(n, 7, epochs * n)
    first = plan.steps(0, per_step)
    cut = min(stop, len(first))
    resumed_at = first[cut][0] if cut < len(first) else plan.target
    steps = first[:cut] + plan.steps(resumed_at, per_step_after)
    assert len(plan.steps(resumed_at, per_step_after)) == count_steps(resumed_at, per_step_after, n, plan.target)
    trained = [plan.step_indices(seen, size) for seen, size in steps]
    for epoch in range(epochs):
        ids = np.concatenate([t for (seen, _), t in zip(steps, trained) if seen // n == epoch])
        assert sorted(ids.tolist()) == list(range(n))
    assert all((seen + size - 1) // n == seen // n for seen, size in steps)  # never across an epoch


def test_rank_slices_partition_a_step() -> None:
    indices = np.arange(22)  # a short last step of a 2-rank × batch 4 × accum 3 run (E = 24)
    parts = [data.rank_micro_batches(indices, r, 4, 3) for r in range(2)]
    assert all(len(p) == 3 for p in parts)  # every rank makes the same number of passes
    assert sorted(np.concatenate([m for p in parts for m in p]).tolist()) == list(range(22))
    assert len(parts[1][2]) == 2
