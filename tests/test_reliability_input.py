"""Bad input, property-based: whatever the config file, the flag values or the data rows hold, the
answer is a result or one clear line (ConfigError / DataError), never another exception; on the
command line, exit 2, one line on stderr, no traceback, nothing written. And checkpoints or run
files from elsewhere are never unpickled with code: a tampered or truncated checkpoint is refused
with a message naming the file."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from conftest import kinds, read_events, run_sftui, sftui_env, wait_for_event, wait_no_processes, write_rows
from sftui import config
from sftui.config import ConfigError
from sftui.rows import DataError, Examples, scan
from sftui.rundir import RunDir
from sftui.trainer import checkpoint, model

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(e: Exception) -> None:
    message = str(e)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)


# --- the config file ------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"k{i} = {toml_value(x)}" for i, x in enumerate(v.values())) + "}"


toml_strings = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
scalars = st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    toml_strings, st.sampled_from(["auto", "16,12,8", "0,1", "ask", "0.5", "8", "-1", ""]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.just("x"), scalars, max_size=1))
keys = st.sampled_from([o.name for o in config.OPTIONS] + [o.name.replace("_", "-") for o in config.OPTIONS]
                       + ["batchsize", "run_dir", "resume"])


def build_from(tmp: Path, body: bytes):
    path = tmp / "c.toml"
    path.write_bytes(body)
    try:
        return config.build({}, str(path))
    except ConfigError as e:
        one_line(e)
        return None


@FAST
@given(body=st.one_of(text.map(str.encode), st.binary(max_size=200)))
@example(body=b"batch = [1\n")
@example(body=b"\xff\xfe")
@example(body=b"lr = inf\n")
@example(body=b"hang_timeout = 1e400\n")
def test_any_config_text_gives_a_config_or_one_line(body):
    with tempfile.TemporaryDirectory() as tmp:
        build_from(Path(tmp), body)


@FAST
@given(table=st.dictionaries(keys, values, max_size=6))
@example(table={"lr": math.inf})
@example(table={"oom_timeout": math.inf})
@example(table={"seed": 2**70})
@example(table={"ladder": [8, 12]})
@example(table={"cpu": True, "gpus": [0]})
def test_known_keys_with_any_values_give_a_config_or_one_line(table):
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()).encode()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_from(Path(tmp), body)
    if cfg is not None:  # what was accepted is usable: finite numbers, a descending ladder, sane ranges
        for name, value in cfg.to_dict().items():
            if isinstance(value, float):
                assert math.isfinite(value), (name, value)
        assert cfg.ladder == sorted(set(cfg.ladder), reverse=True) and all(b >= 1 for b in cfg.ladder)
        assert 0 <= cfg.seed < 2**32


# --- flag values ----------------------------------------------------------------------------------

VALUED = [o for o in config.OPTIONS if not o.is_flag]


@FAST
@given(option=st.sampled_from(VALUED), value=st.one_of(text, st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10",
                                                                            "1_000", " 8 ", "8,", ",", "auto"])))
def test_any_flag_value_parses_or_is_one_line(option, value):
    try:
        parsed = option.parse(value, option.flag)
    except ConfigError as e:
        one_line(e)
        assert str(e).startswith(option.flag), str(e)
        return
    for v in parsed if isinstance(parsed, list) else [parsed]:
        assert not isinstance(v, float) or math.isfinite(v), (option.flag, value, parsed)


@FAST
@given(value=st.one_of(text, st.integers(), st.floats(), st.none(), st.lists(st.integers(), max_size=3)))
def test_boolean_settings_take_only_booleans(value):
    with pytest.raises(ConfigError) as err:
        config.OPTION_BY_NAME["cpu"].parse(value, "--cpu")
    one_line(err.value)


# --- data rows ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(["prompt", "response", "instruction", "input", "output",
                                                                "messages", "role", "content", "x"]), children,
                                               max_size=4)),
    max_leaves=12,
)


def check_file(path: Path) -> None:
    for skip in (False, True):
        try:
            found = scan(str(path), skip)
            assert found.usable >= 1 and found.skipped >= 0
            for _row, segments in Examples(str(path), skip):
                assert any(trained for _, trained in segments)
        except DataError as e:
            one_line(e)
            assert str(path) in str(e)


@FAST
@given(rows=st.lists(json_values, max_size=6))
def test_any_jsonl_rows_validate_or_name_the_bad_line(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        check_file(path)


@FAST
@given(lines=st.lists(st.one_of(st.binary(max_size=60), text.map(str.encode)), max_size=6))
@example(lines=[b"[" * 100_000])
@example(lines=[b'{"prompt": "a", "response": "b"}', b"\xff"])
def test_any_bytes_as_jsonl_validate_or_name_the_bad_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(b"\n".join(lines))
        check_file(path)


@FAST
@given(rows=st.lists(json_values, max_size=6), cut=st.integers(0, 400))
@example(rows=[], cut=0)
def test_any_json_list_validates_or_names_the_bad_line(rows, cut):
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.json"
        whole.write_text(json.dumps(rows, indent=1))
        check_file(whole)
        torn = Path(tmp) / "torn.json"
        torn.write_text(json.dumps(rows, indent=1)[:cut] or "[")
        check_file(torn)
        deep = Path(tmp) / "deep.json"
        deep.write_text("[" * 50_000 + "]" * 50_000)
        check_file(deep)


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.none(), st.text(max_size=10)), "response": st.one_of(st.none(), st.text(max_size=10))}),
    min_size=1, max_size=5), cut=st.one_of(st.none(), st.integers(0, 300)))
def test_any_parquet_rows_validate_or_name_the_bad_row(rows, cut):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows) if any(rows) else pa.table({"x": [1] * len(rows)}), path)
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        check_file(path)


# --- bad flag values on the command line ----------------------------------------------------------

def rejected(option, value: str) -> bool:
    try:
        option.parse(value, option.flag)
    except ConfigError:
        return True
    return False


argv_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(option=st.sampled_from([o for o in VALUED if o.name not in ("model", "data", "eval_data", "name", "notify")]),
       value=st.one_of(argv_text, st.sampled_from(["0", "-1", "nan", "inf", "1e400", "x", "16,,8"])))
def test_bad_flag_values_on_the_command_line_exit_2_with_one_line(option, value):
    assume(rejected(option, value))
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "sftui", "run", "--cpu", f"{option.flag}={value}"], cwd=tmp,
                                env=sftui_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and option.flag in lines[0], result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert os.listdir(tmp) == [], "something was written"


# --- checkpoints from elsewhere -------------------------------------------------------------------

MARKER = Path(tempfile.gettempdir()) / f"sftui-pwned-{os.getpid()}"


class Evil:
    """Unpickling this runs a shell command: what a hostile optimizer.pt would do."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def evil_zip(path: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": Evil()}, path)


def evil_raw(path: Path) -> None:
    path.write_bytes(pickle.dumps(Evil()))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    b = bytearray(path.read_bytes())
    for i in range(100, len(b), 997):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


TAMPER = {
    "weights truncated": ("model.safetensors", truncate, "model.safetensors: unreadable weights"),
    "weights garbage": ("model.safetensors", lambda p: p.write_bytes(os.urandom(4096)), "model.safetensors: unreadable weights"),
    "weights of another model": ("model.safetensors", None, "model.safetensors: the weights do not fit the model"),
    "optimizer scrambled": ("optimizer.pt", scramble, "optimizer.pt: unreadable"),
    "optimizer truncated": ("optimizer.pt", truncate, "optimizer.pt: unreadable"),
    "optimizer runs code (zip)": ("optimizer.pt", evil_zip, "optimizer.pt: unreadable or not a plain-tensor file"),
    "scheduler runs code (raw pickle)": ("scheduler.pt", evil_raw, "scheduler.pt: unreadable or not a plain-tensor file"),
    "state garbage": ("state.json", lambda p: p.write_bytes(b"\x00{not json"), "state.json: unreadable checkpoint state"),
    "state wrong types": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "7"})),
                          "state.json: unreadable checkpoint state (step is '7')"),
    "state missing": ("state.json", lambda p: p.unlink(), "state.json: unreadable checkpoint state"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ck")
    model.build_char_tokenizer(Counter("abcdef"), tmp / "tok")
    tok = model.load_tokenizer(tmp / "tok")
    net = model.build_model("tiny", tok, seed=0, max_len=32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(input_ids=torch.tensor([[1, 4, 5]])).logits.sum().backward()
    opt.step()
    from sftui import rundir

    run = rundir.create(tmp / "run")
    state = checkpoint.State(3, 24, 0, 8, 1, 1, "demo", 32, 42)
    path, _, _ = checkpoint.save(run, net, opt, {"samples_seen": 24}, state, keep=2)
    return tok, path


@pytest.mark.parametrize("case", list(TAMPER))
def test_a_tampered_checkpoint_is_refused_naming_the_file(saved, tmp_path, case):
    tok, original = saved
    ck = tmp_path / original.name
    shutil.copytree(original, ck)
    name, tamper, needle = TAMPER[case]
    if tamper is None:  # a real safetensors file of another shape
        from safetensors.torch import save_model

        save_model(torch.nn.Linear(3, 2), str(ck / name))
    else:
        tamper(ck / name)
    net = model.build_model("tiny", tok, seed=0, max_len=32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(ck, net, opt)
    one_line(err.value)
    assert str(err.value).startswith(str(ck / name)) and needle.split(": ", 1)[1] in str(err.value), str(err.value)
    assert "refusing to resume from it" in str(err.value)
    assert not MARKER.exists(), "unpickling ran the payload"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run stopped at a checkpoint (resumable), copied by each test before tampering."""
    tmp = tmp_path_factory.mktemp("stopped")
    data_file = write_rows(tmp / "d.jsonl", 400)
    run_dir = tmp / "run"
    r = run_sftui("run", "--detach", "--cpu", "--run-dir", str(run_dir), "--data", str(data_file), "--max-len", "32",
                  "--batch", "4", "--log-every", "1", "--checkpoint-every", "0", cwd=tmp, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for_event(run_dir, lambda e: e["kind"] == "step" and e["step"] >= 2)
    assert run_sftui("stop", str(run_dir)).returncode == 0
    assert wait_for_event(run_dir, lambda e: e["kind"] == "run_end")["exit_code"] == 4
    wait_no_processes(run_dir)
    return run_dir


@pytest.mark.parametrize("case", ["optimizer runs code (zip)", "state garbage"])
def test_resume_from_a_tampered_checkpoint_fails_cleanly_with_the_message(stopped_run, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    name, tamper, needle = TAMPER[case]
    ck = RunDir(run_dir).latest_checkpoint()
    tamper(ck / name)
    result = run_sftui("run", "--resume", str(run_dir), "--headless", cwd=tmp_path, timeout=300)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr
    end = kinds(read_events(run_dir), "run_end")[-1]
    assert end["status"] == "failed" and f"{ck / name}: {needle.split(': ', 1)[1]}" in end["reason"], end["reason"]
    log = (run_dir / "attempt-2.log").read_text()
    assert "Traceback" not in log and str(ck / name) in log
    assert not MARKER.exists(), "unpickling ran the payload"
    assert RunDir(run_dir).latest_checkpoint() == ck  # refused, not replaced
    wait_no_processes(run_dir)
