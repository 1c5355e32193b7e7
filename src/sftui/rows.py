"""Data rows: the formats (prompt/response, Alpaca, chat messages) read from JSONL, JSON or
Parquet, the bad-row rules, and the data's fingerprint.

Torch-free, numpy-free and transformers-free (pyarrow is imported only for Parquet): the CLI
checks a data file in the foreground before the run directory exists, with ``scan``, one pass
that validates the rows and hashes the bytes as they are read. The worker tokenizes the same
rows (trainer/data.py) through ``Examples``.

An example is a list of segments ``(text, trained)``; ``text`` None stands for the EOS token.
Causal LMs see the segments in order, with the untrained ones masked out of the loss by
position; encoder-decoder models get everything before the last trained text as input and
that text + EOS as labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from sftui import demo
from sftui.config import ConfigError, unreadable

Segments = list[tuple[str | None, bool]]
# (row id, where, parsed object or a DataError for an unparseable row, share of the source read)
Record = tuple[int, str, Any, float]

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
_PARQUET_BATCH_ROWS = 4096


class DataError(ConfigError):
    """A data file or row that cannot be trained on; one line, ``FILE:LINE: what is wrong``."""


# --- the fingerprint ------------------------------------------------------------------------------


def fingerprint(path: str) -> str:
    """sha256 of the file's bytes (for the demo, ``demo-`` + sha256 of its generated rows, so a
    changed generator is a changed dataset): a resumed run refuses a changed file."""
    digest = hashlib.sha256()
    _hash_source(path, digest)
    return _named(path, digest)


def _hash_source(path: str, digest: Any) -> None:
    """Feed the whole source to ``digest``: a file's bytes, or the demo's rows."""
    if path == "demo":
        digest.update(_demo_bytes(demo.rows()))
        return
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def _demo_bytes(rows: list[dict[str, str]]) -> bytes:
    """What the demo's fingerprint hashes: its rows as JSON."""
    return json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()


def _named(path: str, digest: Any) -> str:
    return ("demo-" if path == "demo" else "") + digest.hexdigest()


# --- reading and checking every row once ----------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """What the CLI needs of a data file: its usable and skipped rows and its fingerprint."""

    usable: int
    skipped: int
    fingerprint: str


def scan(path: str, skip_bad_rows: bool) -> Scan:
    """Read every row once, hashing the bytes as they pass (Parquet, whose reader cannot share
    the pass, and the demo are hashed on their own); DataError on the first bad row unless
    skipping, on a file that cannot be opened, and on a file with no usable row."""
    digest = hashlib.sha256()
    examples = Examples(path, skip_bad_rows, digest)
    try:
        usable = sum(1 for _ in examples)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(str(unreadable(path, e))) from None
    return Scan(usable, examples.skipped, _named(path, digest))


class Examples:
    """The usable rows of one data file, iterated as (row id, segments); row ids count bad rows
    too. As the rows pass, bad ones are counted (``skipped``; raised instead unless
    ``skip_bad_rows``), the share of the file read so far is kept (``fraction``, for progress)
    and the bytes go to ``digest`` (a hashlib object) when one is given. A file with no usable
    row ends the iteration with a DataError."""

    def __init__(self, path: str, skip_bad_rows: bool, digest: Any = None):
        self.path, self.skip_bad_rows, self.digest = path, skip_bad_rows, digest
        self.skipped = 0
        self.fraction = 0.0

    def __iter__(self) -> Iterator[tuple[int, Segments]]:
        for row, _, _, segments in self.sourced():
            yield row, segments

    def sourced(self) -> Iterator[tuple[int, str, dict[str, Any], Segments]]:
        """(row id, where, the row as read, segments): for what needs the row itself (a chat
        template renders its turns) or must name it (a response that tokenizes to nothing)."""
        usable = 0
        for row, where, obj, fraction in _records(self.path, self.digest):
            self.fraction = fraction
            try:
                segments = parse_row(obj, where)
            except DataError:
                if not self.skip_bad_rows:
                    raise
                self.skipped += 1
                continue
            usable += 1
            yield row, where, obj, segments
        self.fraction = 1.0
        if usable == 0:
            raise DataError(f"{self.path}: no usable rows" + (f" ({self.skipped} skipped)" if self.skipped else ""))


def char_counts(path: str, skip_bad_rows: bool) -> Counter:
    """How often each character occurs in the data: the vocabulary of a character tokenizer."""
    counts: Counter = Counter()
    for _, segments in Examples(path, skip_bad_rows):
        for text, _ in segments:
            if text:
                counts.update(text)
    return counts


# --- the readers ----------------------------------------------------------------------------------


def _records(path: str, digest: Any) -> Iterator[Record]:
    """Every row of the source; its bytes go to ``digest`` (unless None) as they are read."""
    if path == "demo":
        rows = demo.rows()
        if digest is not None:
            digest.update(_demo_bytes(rows))
        for i, row in enumerate(rows):
            yield i, f"demo: row {i + 1}", row, (i + 1) / len(rows)
        return
    kind = _file_kind(path)
    if kind == "parquet":
        if digest is not None:
            _hash_source(path, digest)
        yield from _parquet_records(path)
    elif kind == "json":
        yield from _json_list_records(path, digest)
    else:
        yield from _jsonl_records(path, digest)


def _file_kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"PAR1"):
        return "parquet"
    return "json" if head.startswith(b"[") else "jsonl"


def _jsonl_records(path: str, digest: Any) -> Iterator[Record]:
    row = 0
    with open(path, "rb") as f:
        size = max(1, os.fstat(f.fileno()).st_size)
        read = 0
        for lineno, line in enumerate(f, 1):
            read += len(line)
            if digest is not None:
                digest.update(line)
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
            yield row, where, obj, min(1.0, read / size)
            row += 1


def _json_list_records(path: str, digest: Any) -> Iterator[Record]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    with open(path, "rb") as f:
        raw = f.read()
    if digest is not None:
        digest.update(raw)
    try:
        # What reading in text mode gives: universal newlines.
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    del raw
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
        yield row, f"{path}:{line}", obj, end / len(text)
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


def _parquet_records(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # only for Parquet: pyarrow is an optional dependency

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    total = max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for obj in batch.to_pylist():
            yield row, f"{path}: row {row + 1}", obj, (row + 1) / total
            row += 1


# --- the row formats ------------------------------------------------------------------------------


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
