"""Atomic checkpoints: ``checkpoints/step-XXXXXXXX/`` with ``model.safetensors``,
``optimizer.pt``, ``scheduler.pt`` and ``state.json``.

A checkpoint is written into a temporary directory of the writer's own and renamed into place;
only then is ``checkpoints/latest`` replaced. A crash or a full disk mid-save leaves the
previous checkpoint whole and ``latest`` pointing at it. When two writers race (ranks saving
an emergency checkpoint alone), the first rename wins and the other discards its copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from sftui.rundir import RunDir, write_atomic

SPACE_MARGIN = 1.1


class CheckpointError(Exception):
    """A checkpoint could not be written (or read); the message names the path and the cause."""


@dataclass
class State:
    step: int
    samples_seen: int
    epoch: int
    batch_size: int
    grad_accum: int
    world_size: int
    data_fingerprint: str
    max_len: int
    seed: int


def read_state(path: Path) -> State:
    data = json.loads((path / "state.json").read_text())
    return State(**{k: data[k] for k in State.__dataclass_fields__})


def estimate_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the weights and the optimizer state take on disk (the tensors' own sizes)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return total


def save(run: RunDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: dict[str, Any],
         state: State, keep: int, tag: str = "") -> tuple[Path, int, float]:
    """Write checkpoint ``step-N`` and point ``latest`` at it; (path, bytes, seconds).

    ``tag`` makes the temporary directory unique per writer (rank and pid).
    """
    t0 = time.monotonic()
    final = run.checkpoint_dir(state.step)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    need = int(estimate_bytes(model, optimizer) * SPACE_MARGIN)
    free = shutil.disk_usage(run.checkpoints).free
    if free < need:
        raise CheckpointError(
            f"not enough disk space for a checkpoint in {run.checkpoints}: need about {_gib(need)}, {_gib(free)} free"
        )
    tmp = run.checkpoints / f".tmp-{final.name}-{tag or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(schedule, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer saved this step first
        write_atomic(run.latest, (final.name + "\n").encode(), mode=0o600)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write checkpoint {final}: {why}; {_previous(run)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run, keep)
    size = sum(f.stat().st_size for f in final.iterdir())
    return final, size, time.monotonic() - t0


def _previous(run: RunDir) -> str:
    prev = run.latest_checkpoint()
    return f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"


def prune(run: RunDir, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (never the one ``latest`` names) and no leftovers
    of dead writers' temporary directories."""
    latest = run.latest_checkpoint()
    steps = sorted(p for p in run.checkpoints.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else steps:
        if latest is None or old.name != latest.name:
            shutil.rmtree(old, ignore_errors=True)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[State, dict[str, Any]]:
    """Restore weights (and optimizer state) from a checkpoint; (state, schedule)."""
    try:
        load_model(model, str(path / "model.safetensors"))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model: {str(e).splitlines()[0]}") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    schedule = torch.load(path / "scheduler.pt", weights_only=True)
    return read_state(path), schedule


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
