"""The memory probe on the CPU: no GPU means exit 2 with one line and nothing written; the ranks
started through the launcher leave nothing running; the probe's search loop (with the CUDA
allocator's figures stood in for) measures what forecast.next_trial asks; the worst-case batch;
the table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sftui import forecast, probing
from sftui.config import ConfigError, RunConfig
from sftui.rows import char_counts, fingerprint
from sftui.trainer import data, model as models
from sftui.trainer import probe as probe_mod
from trainer_helpers import write_jsonl

GIB = 1024**3


def _no_gpu_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_probe_without_a_gpu_exits_2_with_one_line(sftui, tmp_path):
    r = sftui("probe", "--model", "tiny", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    line = _no_gpu_line(r.stderr)
    assert line.startswith("sftui: probe: ") and "GPU" in line and "it measures GPU memory" in line
    assert list(tmp_path.iterdir()) == []


def test_batch_auto_without_a_gpu_exits_2_and_writes_nothing(sftui, tmp_path):
    r = sftui("run", "--batch", "auto", "--max-steps", "2", cwd=tmp_path)
    assert r.returncode == 2
    line = _no_gpu_line(r.stderr)
    assert line.startswith("sftui: --batch auto: ") and "GPU" in line
    assert list(tmp_path.iterdir()) == []
    r = sftui("run", "--batch", "auto", "--cpu", cwd=tmp_path)
    assert r.returncode == 2 and "not with --cpu" in _no_gpu_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_probe_flags_are_run_flags_and_checked(sftui, tmp_path):
    r = sftui("probe", "--target", "1.5", cwd=tmp_path)
    assert r.returncode == 2 and "--target" in _no_gpu_line(r.stderr)
    (tmp_path / "cpu.toml").write_text("cpu = true\n")
    r = sftui("probe", "--config", "cpu.toml", cwd=tmp_path)
    assert r.returncode == 2 and "not with --cpu" in _no_gpu_line(r.stderr)
    r = sftui("probe", "--max-len", "4", cwd=tmp_path)
    assert r.returncode == 2 and "--max-len" in _no_gpu_line(r.stderr)
    for run_only in (["--on-oom", "auto"], ["--cpu"]):
        r = sftui("probe", *run_only, cwd=tmp_path)
        assert r.returncode == 2 and "unrecognized arguments" in _no_gpu_line(r.stderr)
    r = sftui("probe", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--gradient-checkpointing" in r.stdout and "--target" in r.stdout


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_without_cuda_say_so_and_leave_nothing_behind(tmp_path, world):
    """Through the real launcher: each rank finds no CUDA device, the probe raises the one-line
    error, every rank has exited and the probe's temporary directory is gone."""
    cfg = RunConfig(model="tiny", data="demo", cpu=True, num_processes=world, ladder=[8, 4])
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("sftui-probe-*"))
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"^probe: no CUDA GPU visible to torch"):
        probing.run_probe(cfg, fingerprint("demo"), 100, 0.85, say=lines.append)
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("sftui-probe-*")) == before


class FakeMemory(probe_mod.CudaMemory):
    """A 48 GiB card with 40 GiB free whose peak is 2 GiB + 1 GiB × the trial's batch."""

    batch = 0

    def __init__(self, device):
        self.device = device

    @staticmethod
    def available() -> bool:
        return True

    def name(self) -> str:
        return "Fake GPU 48GB"

    def free_total(self) -> tuple[int, int]:
        return 40 * GIB, 48 * GIB

    def clear(self) -> None:
        pass

    def reset_peak(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def peak_reserved(self) -> int:
        return (2 + FakeMemory.batch) * GIB


def test_the_search_loop_measures_what_the_forecast_asks(tmp_path, monkeypatch):
    """The rank's own loop in this process, on the trainer's real model, data and step; only the
    allocator's figures are stood in for."""
    real_batch = probe_mod._worst_case_batch

    def worst_case(train_data, batch, pad_id, width):
        FakeMemory.batch = batch
        return real_batch(train_data, batch, pad_id, width)

    monkeypatch.setattr(probe_mod, "CudaMemory", FakeMemory)
    monkeypatch.setattr(probe_mod, "_worst_case_batch", worst_case)
    cfg = RunConfig(model="tiny", data="demo", cpu=True, ladder=[16, 12, 8, 4], mem_fraction=[0.5])
    (tmp_path / "spec.json").write_text(json.dumps({
        "config": cfg.to_dict(), "data_fingerprint": fingerprint("demo"), "work_dir": str(tmp_path), "ladder": cfg.ladder,
        "target": 0.85, "steps": 2, "max_seconds": 120}))
    assert probe_mod.probe(tmp_path) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["done"]
    assert result["gpus"][0]["budget"] == 24 * GIB  # --mem-fraction 0.5 of 48 GiB, under the 40 GiB free
    assert result["budget_bytes"] == 24 * GIB and result["model_state_bytes"] > 0
    points = forecast.points_from_json(result["points"])
    # 4 first; from one point the slope is rough, so 8 (12 might not fit); from two, 16 fits
    assert [p.batch for p in points] == [4, 8, 16]
    assert all(p.samples_per_s and p.samples_per_s > 0 for p in points)
    # 2 + 16 = 18 GiB (+3 %) fits 0.85 × 24 = 20.4 GiB, and was measured: the search ends there
    res = probing.ProbeResult(cfg.ladder, 0.85, 1, result["gpus"], result["budget_bytes"],
                              result["model_state_bytes"], points, 1.0)
    assert res.recommended == 16
    assert (tmp_path / "tokenizer").is_dir() and any((tmp_path / "cache").iterdir())  # kept for the run


def _char_data(tmp_path: Path, seq2seq: bool) -> tuple[data.Tokenized, int]:
    rows = [{"prompt": "p" * n, "response": "r" * m} for n, m in ((3, 20), (30, 2), (10, 10), (5, 5))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    models.build_char_tokenizer(char_counts(str(path), False), tmp_path / "tok")
    tok = models.load_tokenizer(tmp_path / "tok")
    cache = data.tokenize_to_cache(str(path), tok, 24, seq2seq, False, tmp_path / f"c{seq2seq}", lambda f: None)
    return cache, tok.pad_token_id


@pytest.mark.parametrize("seq2seq", [False, True])
def test_the_worst_case_batch_is_the_longest_rows_at_the_widest_width(tmp_path, seq2seq):
    cache, pad = _char_data(tmp_path, seq2seq)
    micro = probe_mod._worst_case_batch(cache, 6, pad)
    widths = np.diff(cache.offsets)
    assert micro["input_ids"].shape == (6, widths.max())
    if seq2seq:
        assert micro["labels"].shape == (6, np.diff(cache.label_offsets).max())
    else:
        assert micro["labels"].shape == micro["input_ids"].shape
    # the rows are the longest first, repeated when the batch is larger than the data
    longest = int(np.argmax(cache.n_tokens))
    expected = data.collate(cache, np.array([longest]), pad)["input_ids"][0]
    assert micro["input_ids"][0, :len(expected)].tolist() == expected.tolist()
    assert (micro["labels"] != -100).sum() > 0
    # where training pads every batch to --max-len, so does the probe
    static = probe_mod._worst_case_batch(cache, 6, pad, 24)
    assert {name: tuple(t.shape) for name, t in static.items()} == {name: (6, 24) for name in micro}


def recorded_result() -> probing.ProbeResult:
    gpus = [{"rank": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "total": int(79.2 * GIB),
             "free": int(78.6 * GIB), "budget": int(78.6 * GIB)}]
    points = [forecast.Point(8, int(7.1 * GIB), 210.0), forecast.Point(32, int(19.4 * GIB), 480.0),
              forecast.Point(96, int(52.2 * GIB), 600.0)]
    return probing.ProbeResult([128, 96, 64, 32, 16, 8], 0.85, 1, gpus, int(78.6 * GIB), int(2.8 * GIB), points, 31.4)


def test_the_table_marks_the_recommendation_and_every_rung():
    res = recorded_result()
    assert res.recommended == 96
    text = probing.table(res)
    assert "NVIDIA H100 80GB HBM3" in text and "0.85 × 78.6 GiB = 66.8 GiB" in text
    rows = {int(line.split()[0]): line for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {128, 96, 64, 32, 16, 8}
    assert "← recommended" in rows[96] and " no " in rows[128] and " yes " in rows[64]
    assert "52.2 GiB" in rows[96] and "600.0" in rows[96]
    assert "recommended: --batch 96" in text
    out = res.to_json(RunConfig(model="chatlm-mini"))
    assert out["recommended"] == 96 and out["budget_bytes"] == int(78.6 * GIB) and len(out["rows"]) == 6
    assert forecast.points_from_json(out["points"]) == res.points


def test_a_short_ladder_gets_a_note_and_nothing_fitting_says_what_to_do():
    res = recorded_result()
    beyond = forecast.rungs_above([16, 12, 8], 10_000)
    short = probing.ProbeResult([16, 12, 8], 0.85, 1, res.gpus, res.budget, res.model_state, res.points, 1.0, beyond)
    # 96 was measured at 52.2 GiB; past it the band widens: 104 fits under 66.8 GiB, 120 does not
    assert short.recommended == 16 and short.largest == 104
    text = probing.table(short)
    assert "the ladder stops short: batch 104 fits too; --batch auto starts there (ladder 104,80,52,40,24,16,12,8)" in text
    rows = [int(line.split()[0]) for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert rows == [104, 96, 32, 16, 12, 8]  # the rungs, the batches measured past them, the largest
    assert short.auto_start() == (104, [104, 80, 52, 40, 24, 16, 12, 8])
    assert short.to_json(RunConfig(model="chatlm-mini"))["largest_fitting"] == 104
    assert res.auto_start() == (96, res.ladder)  # a ladder that does not stop short stays
    tiny = probing.ProbeResult([16, 12, 8], 0.85, 1, res.gpus, 4 * GIB, res.model_state, res.points, 1.0)
    assert tiny.recommended is None and "no rung fits" in probing.table(tiny) and tiny.auto_start() is None
