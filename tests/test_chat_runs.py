"""Causal LMs as people fine-tune them, end to end on the CPU (issue 16): a local Qwen2-shaped
model whose tokenizer carries a ChatML template trains through that template, says so, and leaves
it in final/ so that apply_chat_template gives what training saw; a tokenizer that turns the data
into nothing stops the run before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from chat_helpers import CHATML, build_blind_tokenizer, build_model_dir
from conftest import kinds, read_events, run_sftui
from sftui import chat
from sftui.trainer import data

COMMON = ["--cpu", "--max-len", "128", "--batch", "2", "--checkpoint-every", "0", "--log-every", "1"]
ROWS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"instruction": "Translate to German", "input": "good morning", "output": "Guten Morgen."},
    {"messages": [{"role": "system", "content": "Answer briefly and politely."},
                  {"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "The answer is 42."},
                  {"role": "user", "content": "写一首关于春天的诗。"},
                  {"role": "assistant", "content": "春风吹绿了江南岸，桃花开满了山坡。"}]},
] * 4


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_a_model_with_a_chat_template_trains_through_it_and_final_keeps_it(tmp_path):
    model = build_model_dir(tmp_path / "qwen", "chatml")
    data_file = write(tmp_path / "chat.jsonl", ROWS)
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), "--model", str(model), "--data", str(data_file),
                       "--max-steps", "3", *COMMON, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "chat template from tokenizer (sha256 " in result.stderr
    (data_event,) = kinds(read_events(run_dir), "data")
    assert data_event["chat_format"].startswith("chat template from tokenizer")
    recorded = json.loads((run_dir / "run.json").read_text())["chat_format"]
    assert recorded["kind"] == "template" and recorded["sha256"] == chat.ChatFormat("template", CHATML).sha256

    # what training saw, row by row, is what apply_chat_template builds from final/
    final = AutoTokenizer.from_pretrained(run_dir / "final")
    assert final.chat_template == CHATML
    (cache,) = [p for p in (run_dir / "cache").iterdir() if (p / "meta.json").exists()]
    cached = data.Tokenized.open(cache)
    for i, row in enumerate(ROWS[:3]):
        ids = cached.ids[cached.offsets[i]:cached.offsets[i + 1]].tolist()
        assert ids == final.apply_chat_template(chat.conversation(row), tokenize=True, return_dict=False), i
        trained = [t for t, m in zip(ids, cached.mask[cached.offsets[i]:cached.offsets[i + 1]]) if m]
        answers = [m["content"] for m in chat.conversation(row) if m["role"] == "assistant"]
        assert final.decode(trained) == "".join(f"{a}<|im_end|>\n" for a in answers)

    plain = run_sftui("run", "--headless", "--run-dir", str(tmp_path / "plain"), "--model", str(model), "--data",
                      str(data_file), "--max-steps", "1", "--chat-template", "none", *COMMON, cwd=tmp_path)
    assert plain.returncode == 0 and "no chat format" in plain.stderr, plain.stderr


def test_a_tokenizer_that_turns_the_data_into_nothing_stops_before_anything_is_written(tmp_path):
    """The silent empty run: it trained to the end with loss 0.0000 and exit 0."""
    model = build_model_dir(tmp_path / "qwen", None)
    build_blind_tokenizer(model)  # the model's directory now holds a tokenizer that does not match the data
    chinese = write(tmp_path / "zh.jsonl", [{"prompt": "问题", "response": "回答"}] * 5)
    run_dir = tmp_path / "run"
    result = run_sftui("run", "--headless", "--run-dir", str(run_dir), "--model", str(model), "--data", str(chinese),
                       "--max-steps", "2", *COMMON, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]  # the one error line, after "checking the data …"
    assert "no token to train" in line and str(model) in line and "zh.jsonl:1" in line and "Traceback" not in result.stderr
    assert not run_dir.exists()

    # one such row among good ones is a bad row: named, or skipped and counted
    mixed = write(tmp_path / "mixed.jsonl", [{"prompt": "cab", "response": "abc"}] * 3 + [{"prompt": "a", "response": "回答"}])
    bad = run_sftui("run", "--headless", "--run-dir", str(run_dir), "--model", str(model), "--data", str(mixed),
                    "--max-steps", "1", *COMMON, cwd=tmp_path)
    assert bad.returncode == 2 and "mixed.jsonl:4: its trained text ('回答') tokenizes to nothing" in bad.stderr, bad.stderr
    assert not run_dir.exists()
    skipped = run_sftui("run", "--headless", "--run-dir", str(run_dir), "--model", str(model), "--data", str(mixed),
                        "--max-steps", "1", "--skip-bad-rows", *COMMON, cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stdout[-2000:] + skipped.stderr
    assert kinds(read_events(run_dir), "data")[0]["skipped"] == 1
