"""run.json's one owner: a typed record of its fields, how a fresh run's is made, the rung
arithmetic, the resume rules, and reading and writing it (atomically, through rundir).

The supervisor writes it; the CLI writes a new run's and a resumed run's before the supervisor
starts; the ranks, ``sftui node``, the control client and every view read it. Nobody else
spells its keys. docs/DESIGN.md ("run.json") lists the fields.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from sftui import config as cfgmod
from sftui.config import ConfigError, RunConfig
from sftui.rundir import RunDir, read_json, write_json_atomic

ENDED = ("finished", "failed", "stopped")
# Settings a resumed run may change: how it is watched, saved, placed and batched, not what it
# trains on or how (the model, the data, the length, the seed and the schedule stay).
RESUME_MUTABLE = frozenset({
    "batch", "ladder", "on_oom", "oom_timeout", "max_oom_restarts", "hang_timeout", "notify", "checkpoint_every",
    "keep_checkpoints", "log_every", "eval_every", "dataloader_workers", "compile", "gpus", "cpu",
    "num_processes", "mem_fraction", "record_samples", "skip_bad_rows", "peak_tflops",
    "num_machines", "main_process_ip", "main_process_port", "pad_to_max_len", "compile_layers",
})


@dataclass
class RunFile:
    """The fields of run.json (DESIGN.md "run.json"), and only those. Every field has a default
    so that a reader (``status`` of a damaged or foreign run.json, a test's partial one) gets
    what is there; the CLI writes a whole one with ``new`` before any supervisor reads it."""

    name: str = ""
    created: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "starting"
    attempt: int = 0
    # the rung the current attempt runs at (with_rung); None only in a partial file
    batch_size: int | None = None
    grad_accum: int | None = None
    world_size: int | None = None
    effective_batch: int | None = None
    ladder: list[int] = field(default_factory=list)
    oom_rungs: list[int] = field(default_factory=list)
    oom_restarts: int = 0
    sample_budget: int | None = None
    request_seq: int = 0
    data_fingerprint: str = ""
    chat_format: dict[str, Any] | None = None  # {kind: template|builtin|none, sha256, source} as resolved at the start
    supervisor_pid: int | None = None
    socket: str | None = None
    pending_decision: dict[str, Any] | None = None
    exit_code: int | None = None
    reason: str | None = None
    v: int = 1

    # --- making one ---

    @classmethod
    def new(cls, cfg: RunConfig, name: str, data_fingerprint: str, rows: int, batch: int | None = None,
            chat_format: dict[str, Any] | None = None) -> "RunFile":
        """A fresh run's: ``rows`` are the data's usable rows (``--max-steps`` becomes the samples
        of that many steps), ``batch`` the probe's rung when the config says ``auto``."""
        first = int(cfg.batch) if batch is None else batch
        accum = cfgmod.grad_accum_for(cfg, first)
        effective = first * cfg.world_size * accum
        return cls(name=name, created=time.time(), config=cfg.to_dict(), batch_size=first, grad_accum=accum,
                   world_size=cfg.world_size, effective_batch=effective, ladder=list(cfg.ladder),
                   data_fingerprint=data_fingerprint, chat_format=chat_format,
                   sample_budget=cfgmod.samples_in_steps(cfg.max_steps, effective, rows) if cfg.max_steps else None)

    def with_rung(self, batch: int) -> "RunFile":
        """The run at per-GPU ``batch``: the one place grad-accum and the effective batch are
        worked out for a rung (fixed, or as near ``--effective-batch`` as it gets)."""
        cfg = self.cfg
        accum = cfgmod.grad_accum_for(cfg, batch)
        return dataclasses.replace(self, batch_size=batch, grad_accum=accum, world_size=cfg.world_size,
                                   effective_batch=batch * cfg.world_size * accum,
                                   ladder=cfgmod.ladder_with(self.ladder, batch))

    def resumed(self, values: dict[str, Any]) -> "RunFile":
        """The run continued with the flags ``values`` (parsed, as given): settings outside
        RESUME_MUTABLE must keep their value; devices are resolved by the caller. ConfigError
        names the flag."""
        if values.get("batch") == "auto":
            raise ConfigError("--batch auto: only for a new run; give a number to change a resumed run's batch")
        cfg = self.cfg
        for name, value in values.items():
            if name in RESUME_MUTABLE:
                setattr(cfg, name, value)
            elif value != getattr(cfg, name):
                flag = cfgmod.OPTION_BY_NAME[name].flag
                raise ConfigError(f"{flag}: cannot change on --resume (the run has {getattr(cfg, name)!r})")
        if "gpus" in values or "cpu" in values:
            if "cpu" in values:
                cfg.gpus = None
            else:
                cfg.cpu = False
            if "num_processes" not in values and "cpu" not in values:
                cfg.num_processes = 1
        batch = int(cfg.batch) if "batch" in values else self.batch_size
        cfg.ladder = cfgmod.ladder_with(cfg.ladder, batch)
        return dataclasses.replace(self, config=cfg.to_dict(), batch_size=batch, ladder=cfg.ladder,
                                   world_size=cfg.world_size, status="starting", pending_decision=None,
                                   exit_code=None, reason=None)

    # --- reading it ---

    @property
    def cfg(self) -> RunConfig:
        """The run's settings (a fresh copy: changing it changes nothing here)."""
        return RunConfig.from_dict(self.config)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    # --- the file ---

    @classmethod
    def read(cls, run: RunDir) -> "RunFile":
        """OSError when it cannot be read, ValueError when it is not a run.json."""
        raw = read_json(run.run_json)
        if not isinstance(raw, dict):
            raise ValueError(f"{run.run_json}: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, run: RunDir) -> None:
        write_json_atomic(run.run_json, dataclasses.asdict(self))
