"""Atomic checkpoints: ``checkpoints/step-XXXXXXXX/`` with ``model.safetensors``,
``optimizer.pt``, ``scheduler.pt`` and ``state.json``; a LoRA run's holds ``adapter.safetensors``
(the trainable tensors alone) instead of ``model.safetensors``, and its state.json the LoRA
settings and the base model's fingerprint it fits.

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
from safetensors.torch import load_file, load_model, save_file, save_model

from sftui.rundir import RunDir, fresh_dir, write_atomic
from sftui.trainer import adapters

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
    lora: dict[str, Any] | None = None  # run.json's lora: the adapters' settings
    base_fingerprint: str | None = None  # with lora: the base the adapters fit


def read_state(path: Path) -> State:
    """state.json of a checkpoint; CheckpointError naming the file when it is missing or not
    what sftui writes (truncated, tampered with, from another program)."""
    where = path / "state.json"
    try:
        data = json.loads(where.read_bytes())
        values = {k: data[k] for k in State.__dataclass_fields__ if k not in _OPTIONAL or k in data}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: unreadable checkpoint state ({_first_line(e)}); {_REFUSED}") from None
    kinds = {"data_fingerprint": str}
    for name, value in values.items():
        if name in _OPTIONAL:
            if value is not None and not isinstance(value, _OPTIONAL[name]):
                raise CheckpointError(f"{where}: unreadable checkpoint state ({name} is {value!r}); {_REFUSED}")
            continue
        want = kinds.get(name, int)
        if not isinstance(value, want) or isinstance(value, bool) or (want is int and value < 0):
            raise CheckpointError(f"{where}: unreadable checkpoint state ({name} is {value!r}); {_REFUSED}")
    return State(**values)


_OPTIONAL = {"lora": dict, "base_fingerprint": str}  # absent from a full fine-tune's older checkpoints


def _weights(model: torch.nn.Module, state: State) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the trainable tensors of a LoRA run, else all."""
    return adapters.trainable_state(model) if state.lora else model.state_dict()


def estimate_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: State) -> int:
    """Bytes the weights and the optimizer state take on disk (the tensors' own sizes)."""
    total = sum(t.numel() * t.element_size() for t in _weights(model, state).values())
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
    need = int(estimate_bytes(model, optimizer, state) * SPACE_MARGIN)
    free = shutil.disk_usage(run.checkpoints).free
    if free < need:
        raise CheckpointError(
            f"not enough disk space for a checkpoint in {run.checkpoints}: need about {_gib(need)}, {_gib(free)} free"
        )
    try:
        with fresh_dir(final, tag) as tmp:
            try:
                if state.lora:
                    save_file(adapters.trainable_state(model), str(tmp / "adapter.safetensors"))
                else:
                    save_model(model, str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(schedule, tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
                for f in tmp.iterdir():
                    _fsync(f)
                _fsync(tmp)
            except Exception as e:
                raise _write_failed(run, final, e) from e  # while the partial copy is still there
        write_atomic(run.latest, (final.name + "\n").encode(), mode=0o600)
    except OSError as e:  # the rename, or the ``latest`` pointer
        raise _write_failed(run, final, e) from e
    prune(run, keep)
    size = sum(f.stat().st_size for f in final.iterdir())
    return final, size, time.monotonic() - t0


def _write_failed(run: RunDir, final: Path, e: Exception) -> CheckpointError:
    """One line for a failed write. safetensors and torch.save report a full disk as their own
    errors (SafetensorError, "RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos"), not as OSError: the filesystem is asked, before the partial copy is removed."""
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or _nearly_full(run.checkpoints)
    why = "disk full" if full else (getattr(e, "strerror", None) or _first_line(e))
    return CheckpointError(f"could not write checkpoint {final}: {why}; {_previous(run)}")


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
    for tmp in run.checkpoints.glob(".tmp-step-*"):
        if not _writer_alive(tmp.name):  # a writer killed mid-save (kill -9, host OOM) left it
            shutil.rmtree(tmp, ignore_errors=True)


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process named at the end of a temporary directory's name (``...-PID``) lives."""
    try:
        pid = int(tmp_name.rsplit("-", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[State, dict[str, Any]]:
    """Restore weights (and optimizer state) from a checkpoint; (state, schedule).

    Weights come from safetensors and the rest through ``torch.load(weights_only=True)``: a
    checkpoint from elsewhere never runs code. Anything unreadable (truncated, tampered with,
    another model's) is a CheckpointError naming the file.
    """
    state = read_state(path)
    weights = path / ("adapter.safetensors" if state.lora else "model.safetensors")
    try:
        if state.lora:
            missing, unexpected = adapters.load_trainable(model, load_file(str(weights))), []
        else:
            missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # SafetensorError, OSError, a shape mismatch's RuntimeError
        raise CheckpointError(f"{weights}: unreadable weights ({_first_line(e)}); {_REFUSED}") from None
    if missing or unexpected:
        names = ", ".join(list(missing)[:2] + list(unexpected)[:2])
        raise CheckpointError(f"{weights}: the weights do not fit the model (missing or unexpected: {names}); "
                              f"{_REFUSED}")
    if optimizer is not None:
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    schedule = _torch_load(path / "scheduler.pt")
    if not isinstance(schedule, dict):
        raise CheckpointError(f"{path / 'scheduler.pt'}: unreadable (not a dict); {_REFUSED}")
    return state, schedule


_REFUSED = ("refusing to resume from it (to resume from an earlier checkpoint, write its name, "
            "e.g. step-00000010, into checkpoints/latest)")


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers; a pickle that
    would run code is refused), every failure as one line."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, a truncated zip's RuntimeError, OSError
        raise CheckpointError(f"{path}: unreadable or not a plain-tensor file ({_first_line(e)}); {_REFUSED}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
