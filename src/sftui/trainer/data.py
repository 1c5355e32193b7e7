"""Training data: reading and validating rows, tokenizing them into memory-mapped arrays, and
the sample plan that fixes which sample each optimizer step trains on each rank.

Reading and validation import neither torch nor transformers (the CLI checks a data file in
the foreground before the run directory exists); tokenization gets the tokenizer handed in,
and only the collation of a batch imports torch.

An example is a list of segments ``(text, trained)``; ``text`` None stands for the EOS token.
Causal LMs see the segments in order, with the untrained ones masked out of the loss by
position; encoder-decoder models get everything before the last trained text as input and
that text + EOS as labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sftui.config import ConfigError, unreadable
from sftui.trainer import demo

Segments = list[tuple[str | None, bool]]

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
CACHE_VERSION = 1
_CHUNK_ROWS = 4096
# --group-by-length sorts chunks of this many samples of an epoch's permutation (see Plan).
GROUP_CHUNK = 8192
# An encoder-decoder row is grouped by its input length in this many bands, then by its labels.
_INPUT_BANDS = 8


class DataError(ConfigError):
    """A data file or row that cannot be trained on; one line, ``FILE:LINE: what is wrong``."""


# --- reading rows ---------------------------------------------------------------------------------


def fingerprint(path: str) -> str:
    """sha256 of the file's bytes (for the demo, of its generated rows, so a changed generator is a
    changed dataset): a resumed run refuses a changed file."""
    if path == "demo":
        text = json.dumps(demo.rows(), ensure_ascii=False, sort_keys=True).encode()
        return "demo-" + hashlib.sha256(text).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _records(path: str) -> Iterator[tuple[int, str, Any]]:
    """(row id, where, parsed object or a DataError for an unparseable row) for every row."""
    if path == "demo":
        for i, row in enumerate(demo.rows()):
            yield i, f"demo: row {i + 1}", row
        return
    kind = _file_kind(path)
    if kind == "parquet":
        yield from _parquet_records(path)
    elif kind == "json":
        yield from _json_list_records(path)
    else:
        yield from _jsonl_records(path)


def _file_kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"PAR1"):
        return "parquet"
    return "json" if head.startswith(b"[") else "jsonl"


def _jsonl_records(path: str) -> Iterator[tuple[int, str, Any]]:
    row = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj: Any = json.loads(line)
            except UnicodeDecodeError:
                obj = DataError(f"{where}: not UTF-8 text")
            except ValueError as e:
                obj = DataError(f"{where}: invalid JSON: {getattr(e, 'msg', e)}")
            except RecursionError:
                obj = DataError(f"{where}: invalid JSON: nested too deeply")
            yield row, where, obj
            row += 1


def _json_list_records(path: str) -> Iterator[tuple[int, str, Any]]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0) + 1  # past "["
    line, line_pos = 1, 0
    row = 0
    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", line_pos, i)
        line_pos = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: invalid JSON: nested too deeply") from None
        yield row, f"{path}:{line}", obj
        row += 1
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise DataError(f"{path}:{line_of(i + 1)}: invalid JSON: extra data after the list")
            return
        raise DataError(f"{path}:{line_of(i)}: invalid JSON: expected ',' or ']' in the list")


def _parquet_records(path: str) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq  # only for Parquet: pyarrow is an optional dependency

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=_CHUNK_ROWS):
        for obj in batch.to_pylist():
            yield row, f"{path}: row {row + 1}", obj
            row += 1


def _string(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f'{where}: missing field "{key}"')
        return ""
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    return value


def parse_row(obj: Any, where: str) -> Segments:
    """One row of any supported format as segments; DataError naming ``where`` when unusable."""
    if isinstance(obj, DataError):
        raise obj
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("messages") is not None:
        return _chat(obj["messages"], where)
    if obj.get("instruction") is not None:
        instruction = _string(obj, "instruction", where)
        extra = _string(obj, "input", where, required=False)
        output = _string(obj, "output", where)
        if not output.strip():
            raise DataError(f'{where}: empty "output"')
        template = ALPACA_TEMPLATE_INPUT if extra else ALPACA_TEMPLATE
        return [(template.format(instruction=instruction, input=extra), False), (output, True), (None, True)]
    if obj.get("prompt") is None and obj.get("response") is None:
        raise DataError(f'{where}: missing field "prompt" (expected prompt/response, instruction/input/output or messages)')
    prompt = _string(obj, "prompt", where)
    response = _string(obj, "response", where)
    if not response.strip():
        raise DataError(f'{where}: empty "response"')
    return [(prompt, False), (response, True), (None, True)]


def _chat(messages: Any, where: str) -> Segments:
    """Chat turns as ``<|role|>\\n`` headers; every assistant turn is trained, up to its EOS."""
    if not isinstance(messages, list):
        raise DataError(f'{where}: field "messages" must be a list, got {type(messages).__name__}')
    segments: Segments = []
    trained = False
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {n} must be an object with role and content")
        role = _string(m, "role", f"{where}: message {n}")
        content = _string(m, "content", f"{where}: message {n}")
        if role not in ROLES:
            raise DataError(f'{where}: message {n}: unknown role "{role}" (expected {", ".join(ROLES)})')
        if role == "assistant":
            if not content.strip():
                raise DataError(f"{where}: message {n}: empty assistant content")
            segments += [("<|assistant|>\n", False), (content, True), (None, True), ("\n", False)]
            trained = True
        else:
            segments.append((f"<|{role}|>\n{content}\n", False))
    if not trained:
        raise DataError(f"{where}: no assistant message to train on")
    while segments and segments[-1] == ("\n", False):
        segments.pop()
    return segments


def iter_examples(path: str, skip_bad_rows: bool, skipped: list[int] | None = None) -> Iterator[tuple[int, Segments]]:
    """(row id, segments) of every usable row; bad rows raise, or are counted into ``skipped``."""
    for row, where, obj in _records(path):
        try:
            segments = parse_row(obj, where)
        except DataError:
            if not skip_bad_rows:
                raise
            if skipped is not None:
                skipped.append(row)
            continue
        yield row, segments


def validate_file(path: str, skip_bad_rows: bool) -> tuple[int, int]:
    """(usable rows, skipped rows) of a data file; DataError on the first bad row unless skipping."""
    skipped: list[int] = []
    try:
        usable = sum(1 for _ in iter_examples(path, skip_bad_rows, skipped))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(str(unreadable(path, e))) from None
    if usable == 0:
        raise DataError(f"{path}: no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return usable, len(skipped)


def char_counts(path: str, skip_bad_rows: bool) -> Counter:
    """How often each character occurs in the data: the vocabulary of a character tokenizer."""
    counts: Counter = Counter()
    for _, segments in iter_examples(path, skip_bad_rows):
        for text, _ in segments:
            if text:
                counts.update(text)
    return counts


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


def cache_key(data_fingerprint: str, tokenizer_fingerprint: str, max_len: int, seq2seq: bool, skip_bad_rows: bool) -> str:
    text = json.dumps([CACHE_VERSION, data_fingerprint, tokenizer_fingerprint, max_len, seq2seq, skip_bad_rows])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenize_to_cache(path: str, tokenizer: Any, max_len: int, seq2seq: bool, skip_bad_rows: bool, directory: Path,
                      total_rows: int, progress: Callable[[float], None]) -> Tokenized:
    """Tokenize every usable row into flat arrays under ``directory`` (renamed into place when
    complete, so a half-written cache is never used). Memory stays bounded: chunks of rows."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = ["ids", "offsets", "row_ids", "n_target", "n_tokens"] + (["labels", "label_offsets"] if seq2seq else ["mask"])
    files = {name: open(tmp / f"{name}.bin", "wb") for name in names}
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    n = 0
    ends = {"offsets": 0, "label_offsets": 0}
    files["offsets"].write(np.zeros(1, np.int64).tobytes())
    if seq2seq:
        files["label_offsets"].write(np.zeros(1, np.int64).tobytes())
    skipped: list[int] = []

    def flush(chunk: list[tuple[int, Segments]]) -> None:
        nonlocal n
        texts = [t for _, segs in chunk for t, _ in segs if t is not None]
        encoded = _encode(tokenizer, texts)
        pos = 0
        cols: dict[str, list] = {name: [] for name in names}
        for row, segs in chunk:
            k = sum(1 for t, _ in segs if t is not None)
            parts, pos = encoded[pos:pos + k], pos + k
            if seq2seq:
                src, tgt = encode_seq2seq(segs, parts, eos, max_len)
                cols["ids"].append(src)
                cols["labels"].append(tgt)
                cols["n_target"].append(len(tgt))
                cols["n_tokens"].append(len(src) + len(tgt))
            else:
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
        n += len(chunk)
        progress(min(1.0, n / max(1, total_rows)))

    try:
        chunk: list[tuple[int, Segments]] = []
        for item in iter_examples(path, skip_bad_rows, skipped):
            chunk.append(item)
            if len(chunk) == _CHUNK_ROWS:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
        for f in files.values():
            f.close()
        meta = {"n": n, "seq2seq": seq2seq, "skipped": len(skipped), "max_len": max_len}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, directory)
        except OSError:  # another writer got there first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n == 0:
        raise DataError(f"{path}: no usable rows")
    return Tokenized.open(directory)


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

    def count_steps(self, seen: int, per_step: int) -> int:
        total = 0
        while seen < self.target:
            epoch_end = min(self.target, (seen // self.n + 1) * self.n)
            total += math.ceil((epoch_end - seen) / per_step)
            seen = epoch_end
        return total

    def step_indices(self, seen: int, size: int, order: np.ndarray | None = None) -> np.ndarray:
        """Dataset indices (not row ids) of the step that starts at ``seen``."""
        if order is None:
            order = self.order(seen // self.n)
        pos = seen % self.n
        return order[pos:pos + size]


def rank_micro_batches(indices: np.ndarray, rank: int, batch: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's fixed slice of a step, in ``grad_accum`` micro-batches (some maybe empty)."""
    start = rank * batch * grad_accum
    return [indices[start + m * batch:start + (m + 1) * batch] for m in range(grad_accum)]


class StepBatches:
    """Map-style dataset for a DataLoader: item j is this rank's micro-batches of the j-th step
    of the attempt, already collated; sftui's plan, not a sampler, owns the order."""

    def __init__(self, data: Tokenized, plan: Plan, steps: list[tuple[int, int]], rank: int, batch: int,
                 grad_accum: int, pad_id: int, width: int | None = None, multiple: int = 1):
        self.data, self.plan, self.steps = data, plan, steps
        self.rank, self.batch, self.grad_accum, self.pad_id = rank, batch, grad_accum, pad_id
        self.width, self.multiple = width, multiple
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
            micro.append(collate(self.data, part if len(part) else indices[:1], self.pad_id, weight=len(part) > 0,
                                 width=self.width, multiple=self.multiple))
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
