"""Data files (sftui/rows.py): every format × every row shape, every kind of bad row (named by
file and line, or Parquet row), --skip-bad-rows counting, sample ids, one pass that validates and
hashes, and all of it without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftui.config import ConfigError
from sftui.rows import DataError, Examples, fingerprint, parse_row, scan

PROMPT_RESPONSE = [{"prompt": "1+1=", "response": "2"}, {"prompt": "", "response": "hello"}]
ALPACA = [{"instruction": "Say hi", "input": "", "output": "hi"},
          {"instruction": "Add", "input": "2 and 3", "output": "5"}]
MESSAGES = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                          {"role": "assistant", "content": "ciao"}]}]
SHAPES = {"prompt_response": PROMPT_RESPONSE, "alpaca": ALPACA, "messages": MESSAGES}


def validate_file(path: str, skip_bad_rows: bool) -> tuple[int, int]:
    """(usable rows, skipped rows) of one scan."""
    found = scan(path, skip_bad_rows)
    return found.usable, found.skipped


def write(path: Path, rows: list, fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_format_and_shape_reads(tmp_path: Path, fmt: str, shape: str) -> None:
    rows = SHAPES[shape]
    path = write(tmp_path / f"d.{fmt}", rows, fmt)
    assert validate_file(str(path), skip_bad_rows=False) == (len(rows), 0)
    examples = list(Examples(str(path), False))
    assert [row for row, _ in examples] == list(range(len(rows)))
    for _, segments in examples:
        assert any(on and t for t, on in segments)
        assert segments[-1] == (None, True)  # every example ends in a trained EOS


def test_segments_of_each_shape() -> None:
    assert parse_row(PROMPT_RESPONSE[0], "x") == [("1+1=", False), ("2", True), (None, True)]
    alpaca = parse_row(ALPACA[1], "x")
    assert alpaca[0] == ("### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n", False)
    assert alpaca[1:] == [("5", True), (None, True)]
    chat = parse_row(MESSAGES[0], "x")
    assert [t for t, on in chat if on] == ["hello", None, "ciao", None]  # every assistant turn, with its EOS
    assert not any(on for t, on in chat if t and "user" in t)


BAD_ROWS = [
    ({"prompt": "p"}, 'missing field "response"'),
    ({"prompt": "p", "response": "  "}, 'empty "response"'),
    ({"prompt": 3, "response": "r"}, 'field "prompt" must be a string, got int'),
    ({"text": "hello"}, 'missing field "prompt"'),
    ({"instruction": "i", "input": "", "output": ""}, 'empty "output"'),
    ({"instruction": "i"}, 'missing field "output"'),
    ({"messages": "hi"}, 'field "messages" must be a list, got str'),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message to train on"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 'unknown role "bot"'),
    ({"messages": [{"role": "assistant", "content": 1}]}, 'field "content" must be a string, got int'),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_row_named_by_file_and_line(tmp_path: Path, bad, message: str) -> None:
    path = write(tmp_path / "d.jsonl", [PROMPT_RESPONSE[0], PROMPT_RESPONSE[1], bad], "jsonl")
    with pytest.raises(DataError) as err:
        validate_file(str(path), skip_bad_rows=False)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ConfigError)
    assert validate_file(str(path), skip_bad_rows=True) == (2, 1)


def test_invalid_json_line_and_skipping_keeps_row_ids(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: "):
        validate_file(str(path), False)
    assert validate_file(str(path), True) == (2, 1)
    assert [row for row, _ in Examples(str(path), True)] == [0, 2]  # ids count bad rows too


def test_json_list_bad_row_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", [PROMPT_RESPONSE[0], {"prompt": "x", "response": ""}], "json")
    line = path.read_text().splitlines().index("  {", 2) + 1  # where the second object starts
    with pytest.raises(DataError, match=rf'^{path}:{line}: empty "response"'):
        validate_file(str(path), False)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": \n]')
    with pytest.raises(DataError, match=rf"^{broken}:4: invalid JSON"):
        validate_file(str(broken), False)


def test_parquet_bad_row_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path / "d.parquet", [PROMPT_RESPONSE[0], {"prompt": "x", "response": None}], "parquet")
    with pytest.raises(DataError, match=rf'^{path}: row 2: missing field "response"'):
        validate_file(str(path), False)
    assert validate_file(str(path), True) == (1, 1)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        validate_file(str(tmp_path / "missing.jsonl"), False)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        validate_file(str(empty), False)
    all_bad = write(tmp_path / "b.jsonl", [{"prompt": "p"}], "jsonl")
    with pytest.raises(DataError, match=r"no usable rows \(1 skipped\)"):
        validate_file(str(all_bad), True)


def test_fingerprint_and_demo(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path / "d.jsonl", PROMPT_RESPONSE, "jsonl")
    assert fingerprint(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fingerprint("demo").startswith("demo-") and fingerprint("demo") == fingerprint("demo")
    usable, skipped = validate_file("demo", False)
    assert usable >= 2000 and skipped == 0


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_one_scan_validates_and_hashes_the_bytes(tmp_path: Path, fmt: str) -> None:
    import hashlib

    path = write(tmp_path / f"d.{fmt}", PROMPT_RESPONSE + [{"prompt": "p", "response": None}] + PROMPT_RESPONSE, fmt)
    with path.open("ab") as f:
        f.write(b"\n\n" if fmt != "parquet" else b"")  # trailing blank lines are bytes of the file too
    found = scan(str(path), skip_bad_rows=True)
    assert (found.usable, found.skipped) == (4, 1)
    assert found.fingerprint == fingerprint(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    demo = scan("demo", False)
    assert demo.fingerprint == fingerprint("demo") and demo.usable >= 2000


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_examples_say_how_much_of_the_file_is_read(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"d.{fmt}", PROMPT_RESPONSE * 50, fmt)
    examples = Examples(str(path), False)
    seen = [examples.fraction for _ in examples]
    assert seen == sorted(seen) and 0 < seen[0] < 0.1 and seen[-1] > 0.9
    assert examples.fraction == 1.0


def test_validation_imports_no_torch(tmp_path: Path) -> None:
    """The CLI's data check (runsetup.check_data) imports neither torch, numpy, transformers nor
    pyarrow (for JSONL), nor anything of sftui.trainer; it counts skipped rows on stderr."""
    path = write(tmp_path / "d.jsonl", PROMPT_RESPONSE + [{"prompt": "p"}], "jsonl")
    code = ("import sys; from sftui.config import RunConfig; from sftui.runsetup import check_data; "
            f"print(check_data(RunConfig(data={str(path)!r}, skip_bad_rows=True))); "
            "heavy = {'torch', 'numpy', 'transformers', 'pyarrow'} & set(sys.modules); "
            "assert not heavy and not [m for m in sys.modules if m.startswith('sftui.trainer')], sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str((fingerprint(str(path)), 2))
    assert out.stderr == f"sftui: {path}: skipping 1 bad rows of 3 (--skip-bad-rows)\n"
