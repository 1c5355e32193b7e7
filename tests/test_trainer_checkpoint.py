"""Checkpoint atomicity: a write that fails (disk full mid-save, too little free space) leaves
the previous checkpoint whole and ``latest`` pointing at it, with a message naming the path."""

from __future__ import annotations

import errno
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from sftui import rundir
from sftui.trainer import checkpoint, model


def _state(step: int) -> checkpoint.State:
    return checkpoint.State(step=step, samples_seen=8 * step, epoch=0, batch_size=8, grad_accum=1, world_size=1,
                            data_fingerprint="demo", max_len=32, seed=42)


@pytest.fixture
def trainer_parts(tmp_path: Path):
    model.build_char_tokenizer(Counter("abc"), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    net = model.build_model("tiny", tok, seed=0, max_len=32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(input_ids=torch.tensor([[1, 4, 5]])).logits.sum().backward()
    opt.step()
    return rundir.create(tmp_path / "run"), net, opt


def test_failed_write_leaves_previous_checkpoint_whole(trainer_parts, monkeypatch) -> None:
    run, net, opt = trainer_parts
    path, size, _ = checkpoint.save(run, net, opt, {"samples_seen": 8}, _state(1), keep=2)
    assert path == run.checkpoint_dir(1) and size > 0
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save(run, net, opt, {"samples_seen": 16}, _state(2), keep=2)
    message = str(err.value)
    assert str(run.checkpoint_dir(2)) in message and "disk full" in message
    assert "previous checkpoint step-00000001 is intact" in message
    assert run.latest_checkpoint() == run.checkpoint_dir(1)
    assert not run.checkpoint_dir(2).exists() and not list(run.checkpoints.glob(".tmp-*"))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    state, schedule = checkpoint.load(path, net, opt)
    assert state == _state(1) and schedule == {"samples_seen": 8}


def test_too_little_free_space_is_refused_before_writing(trainer_parts, monkeypatch) -> None:
    run, net, opt = trainer_parts
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(checkpoint.CheckpointError, match=rf"not enough disk space for a checkpoint in {run.checkpoints}"):
        checkpoint.save(run, net, opt, {}, _state(1), keep=2)
    assert run.latest_checkpoint() is None and list(run.checkpoints.iterdir()) == []


def test_keep_newest_and_first_rename_wins(trainer_parts) -> None:
    run, net, opt = trainer_parts
    for step in (1, 2, 3):
        checkpoint.save(run, net, opt, {}, _state(step), keep=2)
    assert sorted(p.name for p in run.checkpoints.glob("step-*")) == ["step-00000002", "step-00000003"]
    # Two ranks saving the same emergency step alone: the second finds it there and keeps it.
    checkpoint.save(run, net, opt, {}, _state(3), keep=2, tag="r1")
    assert run.latest_checkpoint() == run.checkpoint_dir(3)
    assert not list(run.checkpoints.glob(".tmp-*"))
    fresh = model.build_model("tiny", model.load_tokenizer(run.path.parent / "tok"), seed=1, max_len=32)
    checkpoint.load(run.checkpoint_dir(3), fresh, None)
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b)
