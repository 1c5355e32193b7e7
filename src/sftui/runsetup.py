"""A run from the command line's settings: a new run's directory and run.json once every input
has passed its checks, or a stopped run made ready to resume. The CLI calls it; the supervisor
takes over from the run.json written here. No torch, no textual (the data checks import only
the torch-free row formats).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sftui import chat
from sftui import config as cfgmod
from sftui.chat import ChatFormat
from sftui.config import ConfigError, RunConfig
from sftui.forecast import DEFAULT_TARGET
from sftui.probing import require_gpu
from sftui.rows import Scan, scan
from sftui.rundir import RunDir, create, lock_is_held
from sftui.runfile import RunFile, base_fingerprint, lora_record


def resolve_devices(cfg: RunConfig) -> str | None:
    """GPUs: all visible by default; --gpus picks among the visible ones. No GPU: the CPU (a note)."""
    if cfg.cpu:
        return None
    from sftui.telemetry import visible_gpus

    visible, why = visible_gpus()
    if cfg.gpus is None:
        if visible:
            cfg.gpus = visible
            return None
        cfg.cpu = True
        return f"{why}; training on the CPU"
    if not visible:
        raise ConfigError(f"--gpus: {why}")
    bad = [g for g in cfg.gpus if g >= len(visible)]
    if bad:
        raise ConfigError(f"--gpus: no GPU {bad[0]} ({len(visible)} visible: 0-{len(visible) - 1})")
    cfg.gpus = [visible[g] for g in cfg.gpus]
    return None


def check_data(cfg: RunConfig) -> tuple[str, int]:
    """Read every data row in the foreground (a bad row stops us before anything is written);
    return the training data's fingerprint and its usable rows, from the same one pass. Rows
    that --skip-bad-rows leaves out are counted on stderr, so they are never a surprise."""

    def checked(path: str) -> Scan:
        found = scan(path, cfg.skip_bad_rows)
        if found.skipped:
            print(f"sftui: {path}: skipping {found.skipped:,} bad rows of {found.usable + found.skipped:,} "
                  "(--skip-bad-rows)", file=sys.stderr)
        return found

    train = checked(cfg.data)
    if cfg.eval_data is not None:
        checked(cfg.eval_data)
    return train.fingerprint, train.usable


def check_chat(cfg: RunConfig) -> ChatFormat:
    """How rows become text, resolved now (run.json records it), and whether the model's
    tokenizer gives the data's responses any token: a local model's tokenizer is loaded and the
    first rows rendered. A preset's character tokenizer is built from the data: the built-in
    format (or none)."""
    if cfg.model in cfgmod.PRESETS:
        if cfg.chat_template not in ("auto", "none"):
            raise ConfigError(f"--chat-template: for a local model directory; {cfg.model} has a character "
                              "tokenizer built from the data (use --chat-template auto or none)")
        return ChatFormat("none" if cfg.chat_template == "none" else "builtin")
    print(f"sftui: checking the data against {cfg.model}'s tokenizer", file=sys.stderr, flush=True)
    tok = chat.load_tokenizer(cfg.model)
    fmt = chat.resolve(cfg.chat_template, tok)
    chat.check_rows(tok, fmt, cfg.data, cfg.skip_bad_rows, cfg.model)
    print(f"sftui: {fmt.describe()}", file=sys.stderr, flush=True)
    return fmt


def prepare_new(cfg: RunConfig, run_dir: str | None) -> RunDir:
    """A new run: every input checked, then its directory and run.json (nothing is written
    before the checks pass; with ``--batch auto`` the probe runs in it, and it goes again if the
    probe fails)."""
    auto = cfg.batch == "auto"
    if cfg.num_machines > 1:
        if auto:
            raise ConfigError("--batch auto: not with --num-machines (probe one machine with sftui probe, then give --batch)")
        if not run_dir:
            raise ConfigError("--run-dir: required with --num-machines (a directory every machine mounts)")
    if auto:
        require_gpu(cfg, "--batch auto")
    cfgmod.check_paths(cfg)
    note = resolve_devices(cfg)
    cfgmod.validate(cfg)
    fingerprint, rows = check_data(cfg)
    fmt = check_chat(cfg)
    lora_record(cfg)  # --lora-targets that name no layer of the base: refused before anything is written
    if cfg.lr is None:
        cfg.lr = cfgmod.default_lr(cfg.model)
    name = cfg.name or (Path(cfg.data).stem if cfg.data != "demo" else "demo")
    path = (Path(run_dir) if run_dir else default_run_dir(name)).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if (path / "run.json").exists():
            raise ConfigError(f"--run-dir: {path}: already holds a run ({existing_run_advice(RunDir(path))})")
        raise ConfigError(f"--run-dir: {path}: exists and is not an empty directory")
    existed = path.exists()
    try:
        run = create(path)
    except OSError as e:
        raise ConfigError(f"--run-dir: {path}: {e.strerror or e}") from None
    batch = probe_first_rung(run, cfg, fingerprint, rows, existed) if auto else None
    RunFile.new(cfg, name, fingerprint, rows, batch, fmt.record()).write(run)
    if note:
        print(f"sftui: {note}", file=sys.stderr)
    return run


def existing_run_advice(run: RunDir) -> str:
    """What to do with a run directory that is taken, by the state of the run in it."""
    if lock_is_held(run):
        return f"it is training now: sftui attach {run.path}"
    try:
        finished = RunFile.read(run).status == "finished"
    except (OSError, ValueError):
        finished = False
    if finished:
        return "it has finished; give another --run-dir"
    return f"continue it with --resume {run.path}"


def probe_first_rung(run: RunDir, cfg: RunConfig, fingerprint: str, rows: int, existed: bool) -> int:
    """``--batch auto``: probe in the foreground (its tokenizer and data cache stay for the run),
    print the table, keep the points in RUN_DIR/forecast.json, and return the largest batch that
    fits; where that lies past the ladder's top, ``cfg.ladder`` becomes a ladder built below it.
    On failure the new run directory goes again."""
    from sftui import probing

    try:
        result = probing.run_probe(cfg, fingerprint, rows, DEFAULT_TARGET, work_dir=run.path)
        print(probing.table(result), file=sys.stderr, flush=True)
        start = result.auto_start()
        if start is None:
            raise ConfigError("--batch auto: no rung of the ladder fits the GPU memory; lower --max-len, "
                              "add --gradient-checkpointing or smaller rungs to --ladder")
    except BaseException:
        for child in run.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not existed:
            run.path.rmdir()
        raise
    batch, cfg.ladder = start
    print(f"sftui: --batch auto: starting at batch {batch} (ladder {','.join(map(str, cfg.ladder))})",
          file=sys.stderr, flush=True)
    probing.write_forecast(run.path, result, cfg)
    return batch


def default_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (with a suffix when two runs start in one second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{name}-{stamp}"
    n = 2
    while path.exists():
        path = Path("runs") / f"{name}-{stamp}-{n}"
        n += 1
    return path


def prepare_resume(resume: str, values: dict[str, Any]) -> RunDir:
    """A stopped, failed or lost run made ready for its next supervisor: the flags given applied
    by the resume rules (runfile.RunFile.resumed), its inputs checked again, run.json written."""
    run = RunDir(Path(resume).absolute())
    if not run.is_run():
        raise ConfigError(f"--resume: {resume}: not a run directory (no run.json)")
    if lock_is_held(run):
        raise ConfigError(f"--resume: {resume}: in use by a live supervisor (attach with: sftui attach {resume})")
    try:
        state = RunFile.read(run)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {run.run_json}: unreadable run.json ({e})") from None
    if state.status == "finished":
        raise ConfigError(f"--resume: {resume}: this run has already finished")
    state = state.resumed(values)
    cfg = state.cfg
    if "gpus" in values or "cpu" in values:
        resolve_devices(cfg)
    cfgmod.validate(cfg)
    cfgmod.check_paths(cfg)
    fingerprint, _ = check_data(cfg)
    if fingerprint != state.data_fingerprint:
        raise ConfigError(f"--resume: the data changed since the run started ({cfg.data}); refusing to resume")
    if state.lora and base_fingerprint(cfg.model) != state.base_fingerprint:
        raise ConfigError(f"--resume: the base model {cfg.model} changed since the run started (its adapters "
                          "fit only the base they were trained on); refusing to resume")
    dataclasses.replace(state, config=cfg.to_dict(), ladder=cfg.ladder, world_size=cfg.world_size).write(run)
    return run
