"""Training data after the rows (sftui/rows.py): tokenizing them into memory-mapped arrays,
and the sample plan that fixes which sample each optimizer step trains on each rank.

Tokenization gets the tokenizer handed in; only the collation of a batch imports torch.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sftui import chat
from sftui.rows import DataError, Examples, Segments
from sftui.rundir import fresh_dir

CACHE_VERSION = 1
_CHUNK_ROWS = 4096
# --group-by-length sorts chunks of this many samples of an epoch's permutation (see Plan).
GROUP_CHUNK = 8192
# An encoder-decoder row is grouped by its input length in this many bands, then by its labels.
_INPUT_BANDS = 8


# --- tokenizing into memory-mapped arrays ---------------------------------------------------------


@dataclass
class Tokenized:
    """Tokenized rows of one data file, memory-mapped: flat token arrays plus offsets.

    Causal: ``ids`` (prompt + response + EOS) and ``mask`` (1 where the token is a target).
    Encoder-decoder: ``ids`` (input) and ``labels`` (response + EOS, own offsets).
    """

    n: int
    seq2seq: bool
    ids: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None
    labels: np.ndarray | None
    label_offsets: np.ndarray | None
    row_ids: np.ndarray      # source row number of each usable row
    n_target: np.ndarray     # tokens each row contributes to the loss
    n_tokens: np.ndarray     # non-padding tokens each row puts through the model
    skipped: int

    @classmethod
    def open(cls, directory: Path) -> "Tokenized":
        meta = json.loads((directory / "meta.json").read_text())

        def arr(name: str, dtype: Any) -> np.ndarray | None:
            p = directory / f"{name}.bin"
            if not p.exists():
                return None
            if p.stat().st_size == 0:
                return np.zeros(0, dtype)
            with open(p, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # Rows are read in shuffled order: read-ahead would only fill memory with rows of
            # later steps (at a million rows, most of the file).
            mapped.madvise(mmap.MADV_RANDOM)
            return np.frombuffer(mapped, dtype=dtype)

        return cls(
            n=meta["n"], seq2seq=meta["seq2seq"], skipped=meta["skipped"],
            ids=arr("ids", np.int32), offsets=arr("offsets", np.int64), mask=arr("mask", np.uint8),
            labels=arr("labels", np.int32), label_offsets=arr("label_offsets", np.int64),
            row_ids=arr("row_ids", np.int64), n_target=arr("n_target", np.int32), n_tokens=arr("n_tokens", np.int32),
        )


def truncate_causal(ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut to ``max_len``: the prompt (everything before the first target) loses tokens from the
    left, and the response keeps at least a quarter of the length (all of it when shorter)."""
    if len(ids) <= max_len:
        return ids, mask
    p = mask.index(1) if 1 in mask else len(ids)
    rest = len(ids) - p
    keep_resp = min(rest, max(max_len - p, max_len // 4))
    keep_prompt = max_len - keep_resp
    return ids[p - keep_prompt:p + keep_resp], mask[p - keep_prompt:p + keep_resp]


def encode_causal(segments: Segments, token_ids: list[list[int]], bos: int | None, eos: int,
                  max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and target mask of one example; ``token_ids`` holds each text segment's ids."""
    ids: list[int] = [] if bos is None else [bos]
    mask: list[int] = [0] * len(ids)
    texts = iter(token_ids)
    for text, trained in segments:
        part = [eos] if text is None else next(texts)
        ids += part
        mask += [int(trained)] * len(part)
    return truncate_causal(ids, mask, max_len)


def encode_seq2seq(segments: Segments, token_ids: list[list[int]], eos: int, max_len: int) -> tuple[list[int], list[int]]:
    """Encoder input (everything before the last trained text, cut from the left) and labels."""
    last = max(i for i, (text, trained) in enumerate(segments) if trained and text is not None)
    source: list[int] = []
    texts = iter(token_ids)
    target: list[int] = []
    for i, (text, _) in enumerate(segments):
        if text is None:
            continue
        ids = next(texts)
        if i < last:
            source += ids
        elif i == last:
            target = ids
    source = source[-(max_len - 1):] + [eos] if max_len > 1 else [eos]
    return source, (target + [eos])[:max_len]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts; straight from the Rust tokenizer when there is one (skipping
    transformers' per-row conversion, a tenth of the time at a million rows)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def cache_key(data_fingerprint: str, tokenizer_fingerprint: str, max_len: int, seq2seq: bool, skip_bad_rows: bool,
              chat_sha256: str | None = None) -> str:
    text = json.dumps([CACHE_VERSION, data_fingerprint, tokenizer_fingerprint, max_len, seq2seq, skip_bad_rows]
                      + ([chat_sha256] if chat_sha256 else []))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenize_to_cache(path: str, tokenizer: Any, max_len: int, seq2seq: bool, skip_bad_rows: bool, directory: Path,
                      progress: Callable[[float], None], template: str | None = None) -> Tokenized:
    """Tokenize every usable row into flat arrays under ``directory`` (renamed into place when
    complete, so a half-written cache is never used). Memory stays bounded: chunks of rows.
    ``progress`` gets the share of the file read after each chunk. Bad rows raise a DataError
    naming the file and line, or are skipped and counted with ``skip_bad_rows``; a row whose
    trained text tokenizes to nothing is a bad row. With ``template`` (a chat template), rows are
    rendered through it (sftui/chat.py) instead of the built-in format."""
    names = ["ids", "offsets", "row_ids", "n_target", "n_tokens"] + (["labels", "label_offsets"] if seq2seq else ["mask"])
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    n = 0
    empty = 0  # rows skipped because their trained text tokenizes to nothing
    ends = {"offsets": 0, "label_offsets": 0}

    def flush(chunk: list[tuple[int, str, dict[str, Any], Segments]], files: dict[str, Any]) -> None:
        nonlocal n, empty
        texts = [t for _, _, _, segs in chunk for t, _ in segs if t is not None]
        encoded = _encode(tokenizer, texts)
        pos = 0
        cols: dict[str, list] = {name: [] for name in names}
        for row, where, obj, segs in chunk:
            k = sum(1 for t, _ in segs if t is not None)
            parts, pos = encoded[pos:pos + k], pos + k
            flags = [is_trained for t, is_trained in segs if t is not None]  # parts holds the texts' ids, in order
            if not any(ids for ids, is_trained in zip(parts, flags) if is_trained):
                if not skip_bad_rows:
                    raise DataError(f"{where}: its trained text ({_excerpt(segs)}) tokenizes to nothing with this "
                                    "tokenizer; is it the model's own? (--skip-bad-rows skips such rows)")
                empty += 1
                continue
            if template is not None:
                messages = chat.conversation(obj)
                try:
                    if seq2seq:
                        src, tgt = chat.encode_seq2seq(tokenizer, template, messages, eos)
                        src, tgt = src[-max_len:], tgt[:max_len]
                    else:
                        ids, mask = truncate_causal(*chat.encode(tokenizer, *chat.render(tokenizer, template, messages)),
                                                    max_len)
                except chat.TemplateError as e:
                    raise DataError(f"{where}: {e}") from None
            if seq2seq:
                if template is None:
                    src, tgt = encode_seq2seq(segs, parts, eos, max_len)
                cols["ids"].append(src)
                cols["labels"].append(tgt)
                cols["n_target"].append(len(tgt))
                cols["n_tokens"].append(len(src) + len(tgt))
            else:
                if template is None:
                    ids, mask = encode_causal(segs, parts, bos, eos, max_len)
                cols["ids"].append(ids)
                cols["mask"].append(mask)
                cols["n_target"].append(sum(mask[1:]))
                cols["n_tokens"].append(len(ids))
            cols["row_ids"].append(row)
        for name, off in (("ids", "offsets"), ("labels", "label_offsets")):
            if name not in files:
                continue
            lengths = np.fromiter((len(x) for x in cols[name]), np.int64, len(cols[name]))
            files[off].write((ends[off] + np.cumsum(lengths)).tobytes())
            ends[off] += int(lengths.sum())
            files[name].write(np.fromiter(chain.from_iterable(cols[name]), np.int32, int(lengths.sum())).tobytes())
        if "mask" in files:
            files["mask"].write(np.fromiter(chain.from_iterable(cols["mask"]), np.uint8).tobytes())
        for name, dtype in (("row_ids", np.int64), ("n_target", np.int32), ("n_tokens", np.int32)):
            files[name].write(np.asarray(cols[name], dtype).tobytes())
        n += len(cols["row_ids"])

    examples = Examples(path, skip_bad_rows)
    with fresh_dir(directory) as tmp:
        with ExitStack() as stack:
            files = {name: stack.enter_context(open(tmp / f"{name}.bin", "wb")) for name in names}
            files["offsets"].write(np.zeros(1, np.int64).tobytes())
            if seq2seq:
                files["label_offsets"].write(np.zeros(1, np.int64).tobytes())
            chunk: list[tuple[int, str, dict[str, Any], Segments]] = []
            for item in examples.sourced():
                chunk.append(item)
                if len(chunk) == _CHUNK_ROWS:
                    flush(chunk, files)
                    chunk = []
                    progress(examples.fraction)
            if chunk:
                flush(chunk, files)
            progress(1.0)
        if n == 0:
            raise DataError(f"{path}: no row has a token to train: every response tokenizes to nothing with this "
                            "tokenizer; is it the model's own?")
        meta = {"n": n, "seq2seq": seq2seq, "skipped": examples.skipped + empty, "max_len": max_len}
        (tmp / "meta.json").write_text(json.dumps(meta))
    return Tokenized.open(directory)


def _excerpt(segments: Segments, width: int = 40) -> str:
    """The trained text of a row, shortened, for an error message."""
    text = "".join(t for t, trained in segments if trained and t is not None)
    return repr(text if len(text) <= width else text[:width] + "…")


def length_key(data: Tokenized, max_len: int) -> np.ndarray:
    """What ``--group-by-length`` sorts on: a causal row's length; for an encoder-decoder row,
    its input length in one of a few bands, then its label length, so that both sides of a
    step's rows are of similar length."""
    if not data.seq2seq:
        return data.n_tokens.astype(np.int64)
    inputs = np.diff(data.offsets)
    labels = np.diff(data.label_offsets)
    band = np.minimum(inputs * _INPUT_BANDS // (max_len + 1), _INPUT_BANDS - 1)
    return band * (max_len + 1) + labels


# --- the sample plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which samples each optimizer step trains, as a function of samples seen only.

    Epoch e's order is a permutation fixed by (seed, e). A step consumes the next E = batch ×
    world × grad_accum samples of that order, but never crosses an epoch boundary nor the
    run's target; so a run can stop after any step and resume at any batch or world size from
    exactly the next sample.

    With ``lengths`` (``--group-by-length``), each chunk of ``GROUP_CHUNK`` consecutive
    samples of that permutation is sorted by length, longest first: the rows of a step are
    then of similar length and their batches carry little padding. The chunk size is fixed,
    not derived from the batch or the world size, so the order stays a function of (seed,
    epoch) and resuming at another batch still continues from exactly the next sample.
    """

    n: int        # usable rows
    seed: int
    target: int   # samples of the whole run
    lengths: np.ndarray | None = field(default=None, compare=False)  # sort key per row, from length_key

    def order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.lengths is None:
            return order
        for start in range(0, self.n, GROUP_CHUNK):
            chunk = order[start:start + GROUP_CHUNK]
            order[start:start + GROUP_CHUNK] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        return order

    def step_size(self, seen: int, per_step: int) -> int:
        return min(per_step, self.n - seen % self.n, self.target - seen)

    def steps(self, seen: int, per_step: int) -> list[tuple[int, int]]:
        """(samples seen before, samples in the step) of every step from ``seen`` to the target."""
        out = []
        while seen < self.target:
            size = self.step_size(seen, per_step)
            out.append((seen, size))
            seen += size
        return out

    def step_indices(self, seen: int, size: int, order: np.ndarray | None = None) -> np.ndarray:
        """Dataset indices (not row ids) of the step that starts at ``seen``."""
        if order is None:
            order = self.order(seen // self.n)
        pos = seen % self.n
        return order[pos:pos + size]


def heaviest_micro_batch(plan: Plan, tokens: np.ndarray, batch: int, epochs: int) -> np.ndarray:
    """Dataset indices of the ``batch`` consecutive samples of one epoch's order (over the first
    ``epochs`` epochs) with the most ``tokens``. Every micro-batch of a run at this batch is such a
    window or part of one, wherever a resume, a switch or a rank's slice starts it (a step never
    crosses an epoch's end), so packed, no micro-batch of the run is wider: the run's own worst
    case, well under batch × the longest row when rows vary in length."""
    window = min(batch, plan.n)
    heaviest: list[tuple[int, np.ndarray]] = []  # (tokens, indices) of each epoch's heaviest window
    for epoch in range(max(1, epochs)):
        order = plan.order(epoch)
        sums = np.concatenate([[0], np.cumsum(tokens[order], dtype=np.int64)])
        totals = sums[window:] - sums[:-window]
        at = int(totals.argmax())
        heaviest.append((int(totals[at]), order[at:at + window]))
    return max(heaviest, key=lambda found: found[0])[1]


def rank_micro_batches(indices: np.ndarray, rank: int, batch: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's fixed slice of a step, in ``grad_accum`` micro-batches (some maybe empty)."""
    start = rank * batch * grad_accum
    return [indices[start + m * batch:start + (m + 1) * batch] for m in range(grad_accum)]


class StepBatches:
    """Map-style dataset for a DataLoader: item j is this rank's micro-batches of the j-th step
    of the attempt, already collated; sftui's plan, not a sampler, owns the order. ``packing``
    (a ``batching.Packing``) lays each micro-batch's samples end to end instead of padding them."""

    def __init__(self, data: Tokenized, plan: Plan, steps: list[tuple[int, int]], rank: int, batch: int,
                 grad_accum: int, pad_id: int, width: int | None = None, multiple: int = 1,
                 packing: Callable[[Tokenized, np.ndarray, bool], dict[str, Any]] | None = None):
        self.data, self.plan, self.steps = data, plan, steps
        self.rank, self.batch, self.grad_accum, self.pad_id = rank, batch, grad_accum, pad_id
        self.width, self.multiple, self.packing = width, multiple, packing
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, j: int) -> dict[str, Any]:
        seen, size = self.steps[j]
        epoch = seen // self.plan.n
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.plan.order(epoch))
        indices = self.plan.step_indices(seen, size, self._order[1])
        micro = []
        for part in rank_micro_batches(indices, self.rank, self.batch, self.grad_accum):
            # A micro-batch past the end of a short last step still runs (every rank makes the
            # same number of passes): one real row with zero weight.
            rows, weight = (part, True) if len(part) else (indices[:1], False)
            micro.append(self.packing(self.data, rows, weight) if self.packing is not None else
                         collate(self.data, rows, self.pad_id, weight=weight, width=self.width, multiple=self.multiple))
        return {
            "seen": seen,
            "size": size,
            "epoch": epoch,
            "row_ids": self.data.row_ids[indices].tolist(),
            "n_target": int(self.data.n_target[indices].sum()),
            "n_tokens": int(self.data.n_tokens[indices].sum()),
            "n_enc": int((self.data.offsets[indices + 1] - self.data.offsets[indices]).sum()) if self.data.seq2seq else 0,
            "micro": micro,
        }


def collate(data: Tokenized, indices: np.ndarray, pad_id: int, weight: bool = True,
            width: int | None = None, multiple: int = 1) -> dict[str, Any]:
    """Right-padded tensors of some rows; labels are -100 off target (by position, not id).

    ``width`` (at least the longest row: ``--max-len``) pads every batch to the same columns,
    inputs and labels alike: a compiled model then sees one shape. Otherwise the columns are
    the longest row's, rounded up to a ``multiple`` (8 on a GPU: tensor-core-friendly shapes).
    The padding is masked out of attention and carries label -100, so it changes neither the
    loss nor its token count.
    """
    import torch

    def padded(flat: np.ndarray, offsets: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
        rows = [flat[offsets[i]:offsets[i + 1]] for i in indices]
        columns = max(max(len(r) for r in rows), width or 0)
        columns = -(-columns // multiple) * multiple
        out = np.full((len(rows), columns), fill, np.int64)
        present = np.zeros((len(rows), columns), np.int64)
        for k, r in enumerate(rows):
            out[k, :len(r)] = r
            present[k, :len(r)] = 1
        return out, present

    ids, attention = padded(data.ids, data.offsets, pad_id)
    if data.seq2seq:
        labels, _ = padded(data.labels, data.label_offsets, -100)
    else:
        mask, _ = padded(data.mask, data.offsets, 0)
        mask[:, 0] = 0  # the first position has nothing before it to predict it from
        labels = np.where(mask == 1, ids, -100)
    if not weight:
        labels[:] = -100
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
    }
