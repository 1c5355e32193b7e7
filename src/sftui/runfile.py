"""run.json's one owner: a typed record of its fields, how a fresh run's is made, the rung
arithmetic, the resume rules, and reading and writing it (atomically, through rundir).

The supervisor writes it; the CLI writes a new run's and a resumed run's before the supervisor
starts; the ranks, ``sftui node``, the control client and every view read it. Nobody else
spells its keys. docs/DESIGN.md ("run.json") lists the fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time
from pathlib import Path
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
    "num_machines", "main_process_ip", "main_process_port", "pad_to_max_len", "compile_layers", "compile_mode", "merge",
    "report_to", "packing",
})
# Parameter names of embeddings and LM heads, never a LoRA target (trainer/adapters.py agrees).
EMBEDDING_NAMES = ("embed", "shared", "lm_head", "wte", "wpe")
# The linear layers of the presets' blocks (trainer/model.py builds them; a test keeps these true).
PRESET_LINEARS = {"tiny": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  "chatlm-mini": ("q", "k", "v", "o", "wi", "wo")}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


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
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, targets} with --lora (lora_record), else None
    base_fingerprint: str = ""  # the base model's (base_fingerprint): a LoRA checkpoint fits only it
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
                   data_fingerprint=data_fingerprint, chat_format=chat_format, lora=lora_record(cfg),
                   base_fingerprint=base_fingerprint(cfg.model),
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
        if values.get("compile") is False:  # the settings of a compile go with it, unless given anew
            for name in cfgmod.COMPILE_ONLY:
                if name not in values:
                    setattr(cfg, name, getattr(cfgmod.RunConfig(), name))
        # --inject-oom-at-step fires in attempt 1 only: a resumed run injects nothing, and its rank
        # need not exist in the resumed world (a run of 2 with rank 1 injecting, resumed on 1 GPU).
        cfg.inject_oom_at_step, cfg.inject_oom_rank = None, 0
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


# --- the base model, as a LoRA run records it (no torch: the CLI checks before anything is written) ---


def base_fingerprint(model: str) -> str:
    """A hash of the base model: its config.json and the names and sizes of its weight files
    (reading 15 GB of weights to hash them would take a minute); for a preset, its name (its
    config is fixed in code, its weights follow from the seed and its vocabulary from the data,
    which run.json fixes on their own)."""
    h = hashlib.sha256()
    if model in cfgmod.PRESETS:
        h.update(f"preset:{model}".encode())
    else:
        root = Path(model)
        h.update((root / "config.json").read_bytes())
        for f in sorted(root.iterdir()):
            if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
                h.update(f"\n{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def target_matches(module: str, target: str) -> bool:
    """peft's rule for a target named in a list: the module's full name, or a suffix of it at a dot."""
    return module == target or module.endswith("." + target)


def base_linear_layers(model: str) -> list[str] | None:
    """The linear layers of the base's blocks, by name, read from its safetensors headers (the
    2-D ``.weight`` tensors that are no embedding nor head); a preset's from PRESET_LINEARS; None
    when the weights are not safetensors (the worker checks then)."""
    if model in PRESET_LINEARS:
        return list(PRESET_LINEARS[model])
    files = sorted(Path(model).glob("*.safetensors"))
    if not files:
        return None
    names = []
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        names += [k[: -len(".weight")] for k, v in header.items()
                  if k.endswith(".weight") and isinstance(v, dict) and len(v.get("shape", ())) == 2
                  and not any(e in k for e in EMBEDDING_NAMES)]
    return names


def check_targets(targets: list[str] | None, layers: list[str], model: str) -> None:
    """ConfigError naming the first of ``targets`` that matches none of ``layers`` (and the
    layers' own names, to choose from)."""
    for t in targets or ():
        if not any(target_matches(name, t) for name in layers):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ConfigError(f"--lora-targets: {t!r} matches no linear layer of {model} "
                              f"(its linear layers: {', '.join(leaves)})")


def lora_record(cfg: RunConfig) -> dict[str, Any] | None:
    """run.json's ``lora``: {r, alpha, dropout, targets} (alpha resolved, targets as given or
    None for every linear layer of the blocks), None without --lora. ConfigError when a target
    names no linear layer of the base."""
    if not cfg.lora:
        return None
    layers = base_linear_layers(cfg.model)
    if layers is not None:
        check_targets(cfg.lora_targets, layers, cfg.model)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r
    return {"r": cfg.lora_r, "alpha": float(alpha), "dropout": cfg.lora_dropout,
            "targets": list(cfg.lora_targets) if cfg.lora_targets else None}
