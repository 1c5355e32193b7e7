"""RunConfig: every setting of a run, its default, its flag, the TOML file, validation, ladder math.

Precedence: defaults < ``--config FILE.toml`` < flags. Each option is declared once, in
``OPTIONS``; cli.py builds its flags from that table and TOML keys are the same names with
``_`` or ``-``. Errors are ``ConfigError`` with one line naming the flag or file key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_LADDER = (16, 12, 8)
PRESETS = ("tiny", "chatlm-mini")
PATH_OPTIONS = {"model": PRESETS, "data": ("demo",), "eval_data": (), "chat_template": ("auto", "none")}  # option -> its values that are no path
ON_OOM = ("ask", "auto", "stop")
REPORT_TO = ("none", "tensorboard")
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# The modes that replay CUDA graphs, and each one's twin without them.
WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
GRAPH_MODES = tuple(WITHOUT_GRAPHS)
COMPILE_ONLY = ("compile_layers", "compile_mode")  # settings that mean something with --compile only
# torchrun's and accelerate's default; fixed rather than picked free, because the other machines
# must know it before the run starts.
DEFAULT_MAIN_PROCESS_PORT = 29500


class ConfigError(Exception):
    """Bad usage, config or input: the CLI prints the message on one line and exits 2."""


@dataclass
class RunConfig:
    model: str = "tiny"
    data: str = "demo"
    eval_data: str | None = None
    chat_template: str = "auto"  # auto (the tokenizer's, else the built-in format), none, or a Jinja file
    batch: int | str = 16  # an int, or "auto"
    ladder: list[int] = field(default_factory=lambda: list(DEFAULT_LADDER))
    grad_accum: int = 1
    effective_batch: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    max_len: int = 256
    lr: float | None = None  # None: default_lr(model), resolved when the run is created
    warmup: float = 0.03
    weight_decay: float = 0.0
    seed: int = 42
    gpus: list[int] | None = None
    cpu: bool = False
    num_processes: int = 1
    num_machines: int = 1
    main_process_ip: str | None = None
    main_process_port: int = DEFAULT_MAIN_PROCESS_PORT
    name: str | None = None
    on_oom: str | None = None  # None: ask while a TUI is attached, auto otherwise
    oom_timeout: float = 30.0
    max_oom_restarts: int = 5
    hang_timeout: float = 600.0
    notify: str | None = None
    report_to: str = "none"  # none, or tensorboard: event files under RUN_DIR/tensorboard/ (tboard.py)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    record_samples: bool = False
    log_every: int = 10
    eval_every: int = 100
    gradient_checkpointing: bool = False
    dataloader_workers: int = 1
    compile: bool = False
    pad_to_max_len: bool | None = None  # None: on with --compile on a GPU (see trainer/loop.pad_width)
    group_by_length: bool = False
    packing: bool | None = None  # a micro-batch's samples end to end, no padding (T5: in rows of max_len); None: batching.packs decides
    compile_layers: bool = False
    compile_mode: str | None = None  # None: compiling.resolve_mode decides (CUDA graphs or torch's default)
    mem_fraction: list[float] | None = None
    inject_oom_at_step: int | None = None
    inject_oom_rank: int = 0
    skip_bad_rows: bool = False
    peak_tflops: float | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 × lora_r
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: every linear layer of the transformer blocks
    merge: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- derived values ---

    @property
    def local_world_size(self) -> int:
        """Ranks on each machine."""
        if self.cpu:
            return self.num_processes
        return len(self.gpus) if self.gpus else 1

    @property
    def world_size(self) -> int:
        """Ranks on all machines (every machine runs as many as machine rank 0)."""
        return self.local_world_size * self.num_machines

    def notify_argv(self) -> list[str] | None:
        return shlex.split(self.notify) if self.notify else None


# --- option table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str           # RunConfig field
    parse: Callable[[str, str], Any]  # (text, where) -> value; raises ConfigError
    help: str
    metavar: str | None = None
    is_flag: bool = False  # boolean switch: --x sets True (and --no-x False when negatable)
    negatable: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _int(lo: int = 1, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(text: str, where: str) -> int:
        rng = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer {rng}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise ConfigError(f"{where}: expected an integer {rng}, got {value}")
        return value

    return parse


def _float(lo: float = 0.0, hi: float | None = None, lo_open: bool = False) -> Callable[[str, str], float]:
    def parse(text: str, where: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{where}: expected a number {rng}, got {text!r}")
        return value

    return parse


positive_int = _int()
parse_fraction = _float(0.0, 1.0, lo_open=True)  # a share of memory, in (0, 1]


def _str(text: str, where: str) -> str:
    text = str(text)
    if not text.strip():
        raise ConfigError(f"{where}: must not be empty")
    return text


def _batch(text: str, where: str) -> int | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{where}: expected a positive integer or 'auto', got {value}")
    return value


def _int_list(text: str, where: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")] if not isinstance(text, list) else [str(p) for p in text]
    if not parts or any(p == "" for p in parts):
        raise ConfigError(f"{where}: expected a comma-separated list of integers, got {text!r}")
    return [_int(0)(p, where) for p in parts]


def _ladder(text: str, where: str) -> list[int]:
    rungs = _int_list(text, where)
    if any(r < 1 for r in rungs):
        raise ConfigError(f"{where}: batch sizes must be positive, got {text!r}")
    if any(a <= b for a, b in zip(rungs, rungs[1:])):
        raise ConfigError(f"{where}: the ladder must be strictly descending (e.g. 16,12,8), got {text!r}")
    return rungs


def _names(text: Any, where: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",")] if not isinstance(text, list) else [str(p).strip() for p in text]
    if not parts or any(p == "" for p in parts):
        raise ConfigError(f"{where}: expected a comma-separated list of module names, got {text!r}")
    return parts


def _fractions(text: str, where: str) -> list[float]:
    parts = [p.strip() for p in str(text).split(",")] if not isinstance(text, list) else [str(p) for p in text]
    return [_float(0.0, 1.0, lo_open=True)(p, where) for p in parts]


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(text: str, where: str) -> str:
        if str(text) not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {text!r}")
        return str(text)

    return parse


def _bool(text: Any, where: str) -> bool:
    if isinstance(text, bool):
        return text
    raise ConfigError(f"{where}: expected true or false, got {text!r}")


OPTIONS: tuple[Option, ...] = (
    Option("model", _str, "tiny, chatlm-mini, or a local Hugging Face model directory (default: tiny)", "NAME|PATH"),
    Option("data", _str, "demo, or a JSONL/JSON/Parquet file (prompt/response, Alpaca or chat messages)", "demo|PATH"),
    Option("eval_data", _str, "held-out data in the same formats; evaluated every --eval-every steps", "PATH"),
    Option("chat_template", _str, "how rows become text: auto (the model tokenizer's chat template, else sftui's "
           "built-in format), none (prompt and response concatenated), or a Jinja template file (default: auto)",
           "auto|none|FILE"),
    Option("batch", _batch, "per-GPU batch size (default: 16); it is put on the ladder", "N"),
    Option("ladder", _ladder, "descending batch sizes to fall back through on out-of-memory (default: 16,12,8)", "16,12,8"),
    Option("grad_accum", _int(), "gradient accumulation steps (default: 1)", "N"),
    Option("effective_batch", _int(), "target batch × GPUs × accumulation; accumulation is recomputed per rung", "N"),
    Option("epochs", _int(), "passes over the data (default: 1)", "N"),
    Option("max_steps", _int(), "stop after N optimizer steps' worth of samples (wins over --epochs)", "N"),
    Option("max_len", _int(8), "maximum tokens per example; longer prompts are cut from the left (default: 256)", "N"),
    Option("lr", _float(0.0, lo_open=True), "peak learning rate (default: the model preset's)", "F"),
    Option("warmup", _float(0.0, 1.0), "warm-up as a fraction of the samples of the run (default: 0.03)", "F"),
    Option("weight_decay", _float(0.0), "AdamW weight decay (default: 0)", "F"),
    Option("seed", _int(0, 2**32 - 1), "random seed of the sample order and initialisation (default: 42)", "N"),
    Option("gpus", _int_list, "GPU indices to use (default: all visible)", "0,1"),
    Option("cpu", _bool, "train on the CPU (gloo ranks)", is_flag=True),
    Option("num_processes", _int(), "with --cpu: number of ranks (default: 1)", "N"),
    Option("num_machines", _int(), "machines the run spans; the others join with `sftui node RUN_DIR --machine-rank R` "
           "(default: 1)", "N"),
    Option("main_process_ip", _str, "with --num-machines > 1: this machine's address, which the others reach", "IP"),
    Option("main_process_port", _int(1), f"with --num-machines > 1: the rendezvous port on --main-process-ip "
           f"(default: {DEFAULT_MAIN_PROCESS_PORT})", "PORT"),
    Option("name", _str, "run name, used in the run directory's name (default: the data's name)", "NAME"),
    Option("on_oom", _choice(*ON_OOM), "on CUDA OOM: ask (TUI attached), auto (next rung), stop", "ask|auto|stop"),
    Option("oom_timeout", _float(0.0), "seconds an OOM question waits before deciding as auto (default: 30)", "SECONDS"),
    Option("max_oom_restarts", _int(0), "OOM restarts allowed per run (default: 5)", "N"),
    Option("hang_timeout", _float(1.0), "seconds without a step or heartbeat before an attempt is a hang (default: 600)", "SECONDS"),
    Option("notify", _str, "command run (no shell) with the event as JSON on stdin at decision_needed and run_end", "CMD"),
    Option("report_to", _choice(*REPORT_TO), "also write the metrics for another tool: tensorboard (event files "
           "under RUN_DIR/tensorboard/) or none (default: none)", "none|tensorboard"),
    Option("checkpoint_every", _int(0), "optimizer steps between checkpoints; 0 = only at the end (default: 500)", "N"),
    Option("keep_checkpoints", _int(1), "checkpoints kept (default: 2)", "K"),
    Option("record_samples", _bool, "write samples.jsonl: the sample ids of every step", is_flag=True),
    Option("log_every", _int(), "steps between log lines and rank_stats (default: 10)", "N"),
    Option("eval_every", _int(), "steps between evaluations with --eval-data (default: 100)", "N"),
    Option("gradient_checkpointing", _bool, "trade compute for activation memory", is_flag=True),
    Option("dataloader_workers", _int(0), "background processes preparing batches (default: 1)", "N"),
    Option("compile", _bool, "torch.compile the model (GPU)", is_flag=True, negatable=True),
    Option("compile_layers", _bool, "with --compile: compile each repeated layer instead of the whole model "
           "(a shorter compile, slower steps at small batches)", is_flag=True),
    Option("compile_mode", _choice(*COMPILE_MODES), "with --compile: torch.compile's mode; reduce-overhead replays "
           "each step's kernels as CUDA graphs, without the host launching them one by one; not with --grad-accum or "
           "--effective-batch (default: reduce-overhead for a model compiled whole on one GPU without --grad-accum or "
           "--effective-batch whose batches keep a few shapes, where it was measured; default with --compile-layers, "
           "several GPUs, a T5's packed rows or padded rows under --no-pad-to-max-len)", "|".join(COMPILE_MODES)),
    Option("pad_to_max_len", _bool, "pad every batch to --max-len: the same shapes at every step "
           "(default: on with --compile, where a new shape costs a recompile)", is_flag=True, negatable=True),
    Option("group_by_length", _bool, "sort each chunk of 8,192 samples of an epoch's order by length, longest "
           "first: batches of similar rows, less padding (a gain for eager runs; --compile pads to --max-len)",
           is_flag=True),
    Option("packing", _bool, "lay each micro-batch's samples end to end instead of padding them, no token "
           "attending across samples: a causal LM's in one row (padding-free), a T5-family encoder-decoder's in rows "
           "of --max-len (default: on for a causal LM on a GPU where torch has its variable-length attention kernel, "
           "measured faster there; off elsewhere, and for T5: an H200 ran it slower than padded at batch 16)",
           is_flag=True, negatable=True),
    Option("mem_fraction", _fractions, "cap each rank's CUDA memory (one value, or one per rank)", "F[,F...]"),
    Option("inject_oom_at_step", _int(), "raise a real torch.OutOfMemoryError in step N of the first attempt", "N"),
    Option("inject_oom_rank", _int(0), "the rank that raises it (default: 0)", "R"),
    Option("skip_bad_rows", _bool, "skip unusable data rows (and count them) instead of stopping", is_flag=True),
    Option("peak_tflops", _float(0.0, lo_open=True), "the card's dense bf16 peak for MFU, when it is not in the table", "F"),
    Option("lora", _bool, "train LoRA adapters on a frozen base (bf16 on a GPU) instead of every weight", is_flag=True),
    Option("lora_r", _int(1), "with --lora: the adapters' rank (default: 16)", "R"),
    Option("lora_alpha", _float(0.0, lo_open=True), "with --lora: the adapters' scale is alpha / r (default: 2 × r)", "F"),
    Option("lora_dropout", _float(0.0, 1.0), "with --lora: dropout on the adapters' input (default: 0)", "F"),
    Option("lora_targets", _names, "with --lora: the linear layers to adapt, by name or name suffix "
           "(default: every linear layer of the transformer blocks)", "q_proj,v_proj"),
    Option("merge", _bool, "with --lora: also write final/merged, the base with the adapters folded in (bf16)",
           is_flag=True),
)
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


# --- loading ------------------------------------------------------------------------------------


def unreadable(where: str, e: OSError) -> ConfigError:
    """One line for a file that cannot be opened: missing, a directory, or not ours to read."""
    what = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory",
            PermissionError: "permission denied"}.get(type(e), e.strerror or str(e))
    return ConfigError(f"{where}: {what}")


def load_toml(path: str) -> dict[str, Any]:
    """Read a config file into RunConfig values, naming the file and key in every error."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise unreadable(f"--config: {path}", e) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        option = OPTION_BY_NAME.get(name)
        where = f"{path}: {key}"
        if option is None:
            raise ConfigError(f"{where}: unknown setting")
        if isinstance(value, (dict, list)) and name not in ("ladder", "gpus", "mem_fraction", "lora_targets"):
            raise ConfigError(f"{where}: expected a single value")
        if option.is_flag:
            values[name] = _bool(value, where)
        elif isinstance(value, bool):
            raise ConfigError(f"{where}: expected {option.metavar or 'a value'}, got {value!r}")
        elif isinstance(value, list):
            values[name] = option.parse(",".join(str(v) for v in value), where)
        else:
            values[name] = option.parse(value if isinstance(value, str) else str(value), where)
    # A path in a config file is read from the file's directory, as people expect of a file
    # they keep beside their data; not from wherever sftui happens to be started.
    for name, keywords in PATH_OPTIONS.items():
        value = values.get(name)
        if isinstance(value, str) and value not in keywords and not os.path.isabs(value):
            values[name] = str(Path(path).parent / value)
    return values


def build(flag_values: dict[str, Any], config_file: str | None = None) -> RunConfig:
    """Defaults < config file < flags, then the cross-field checks."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_toml(config_file))
    values.update(flag_values)
    cfg = RunConfig(**values)
    validate(cfg, flag_values.keys())
    return cfg


def validate(cfg: RunConfig, given: Any = ()) -> None:
    """Checks that involve several settings (each flag alone was checked when parsed)."""
    if cfg.batch != "auto":
        cfg.ladder = ladder_with(cfg.ladder, int(cfg.batch))
    if cfg.effective_batch is not None and "grad_accum" in given:
        raise ConfigError("--grad-accum and --effective-batch: give one or the other")
    if cfg.num_processes > 1 and not cfg.cpu:
        raise ConfigError("--num-processes: only with --cpu (on GPUs, one process runs per GPU of --gpus)")
    if cfg.cpu and cfg.gpus:
        raise ConfigError("--cpu and --gpus: give one or the other")
    if cfg.gpus is not None and len(set(cfg.gpus)) != len(cfg.gpus):
        raise ConfigError(f"--gpus: a GPU is listed twice: {','.join(map(str, cfg.gpus))}")
    if cfg.mem_fraction is not None and len(cfg.mem_fraction) not in (1, cfg.world_size):
        raise ConfigError(f"--mem-fraction: give one value or one per rank ({cfg.world_size}), got {len(cfg.mem_fraction)}")
    if cfg.num_machines > 1 and not cfg.main_process_ip:
        raise ConfigError(f"--main-process-ip: required with --num-machines {cfg.num_machines} "
                          "(this machine's address, which the other machines reach)")
    if cfg.num_machines == 1 and cfg.main_process_ip is not None:
        raise ConfigError("--main-process-ip: only with --num-machines > 1")
    if cfg.main_process_port > 65535:
        raise ConfigError(f"--main-process-port: expected a port from 1 to 65535, got {cfg.main_process_port}")
    for name in COMPILE_ONLY:
        if not cfg.compile and getattr(cfg, name) != getattr(RunConfig, name):
            raise ConfigError(f"{OPTION_BY_NAME[name].flag}: only with --compile")
    if cfg.compile_mode in GRAPH_MODES and accumulates(cfg):
        raise ConfigError(f"--compile-mode {cfg.compile_mode}: its CUDA graphs would overwrite the gradients "
                          "accumulated over a step's micro-batches; not with --grad-accum or --effective-batch")
    if not cfg.lora:
        defaults = RunConfig()
        given_lora = [n for n in LORA_OPTIONS if n in given or getattr(cfg, n) != getattr(defaults, n)]
        if given_lora:
            raise ConfigError(f"{OPTION_BY_NAME[given_lora[0]].flag}: only with --lora")
        if cfg.merge:
            raise ConfigError("--merge: only with --lora (a full fine-tune's final/ is already a whole model)")
    if cfg.inject_oom_rank >= cfg.world_size:
        raise ConfigError(f"--inject-oom-rank: {cfg.inject_oom_rank} is not a rank of a run of {cfg.world_size}")
    if cfg.notify is not None:
        try:
            argv = shlex.split(cfg.notify)
        except ValueError as e:
            raise ConfigError(f"--notify: {e}") from None
        if not argv:
            raise ConfigError("--notify: empty command")


def is_seq2seq(model: str) -> bool:
    """Encoder-decoder (labels on the decoder side) or causal LM, read from the config only."""
    if model in PRESETS:
        return model == "chatlm-mini"
    return bool(_model_config(model).get("is_encoder_decoder", False))


# Encoder-decoder families whose attention knows positions only as a learned bias of their distance:
# a sample packed anywhere in a row (trainer/batching.RowPacking) sees what it sees alone. BART,
# Marian, Pegasus and the like add absolute position embeddings: packed, their samples would start
# at the wrong positions.
RELATIVE_POSITION_SEQ2SEQ = ("t5", "mt5", "umt5")


def packing_refusal(model: str) -> str | None:
    """Why ``--packing`` cannot apply to ``model`` (None: it can): an encoder-decoder model packs
    only where its positions are relative (RELATIVE_POSITION_SEQ2SEQ)."""
    if not is_seq2seq(model) or model == "chatlm-mini":
        return None
    kind = _model_config(model).get("model_type")
    if kind in RELATIVE_POSITION_SEQ2SEQ:
        return None
    return (f"--packing: {model} is an encoder-decoder model with absolute positions ({kind}); packed rows "
            f"are for causal LMs and encoder-decoders with relative ones ({', '.join(RELATIVE_POSITION_SEQ2SEQ)})")


def _model_config(model: str) -> dict[str, Any]:
    with open(Path(model) / "config.json") as f:
        return json.load(f)


def check_paths(cfg: RunConfig) -> None:
    """The inputs that exist on disk: data files and a model directory (no rows read here), and
    whether the model's kind allows ``--packing`` (``packing_refusal``)."""
    for name in ("data", "eval_data"):
        value = getattr(cfg, name)
        if value is None or (name == "data" and value == "demo"):
            continue
        flag = OPTION_BY_NAME[name].flag
        p = Path(value)
        if not p.exists():
            raise ConfigError(f"{flag}: {value}: no such file")
        if p.is_dir():
            raise ConfigError(f"{flag}: {value}: is a directory, expected a .jsonl, .json or .parquet file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{flag}: {value}: permission denied")
    if cfg.model not in PRESETS:
        p = Path(cfg.model)
        if not p.is_dir():
            raise ConfigError(f"--model: {cfg.model}: not a preset ({', '.join(PRESETS)}) nor a directory")
        if not (p / "config.json").is_file():
            raise ConfigError(f"--model: {cfg.model}: no config.json (expected a save_pretrained directory)")
    refusal = packing_refusal(cfg.model) if cfg.packing else None
    if refusal:
        raise ConfigError(refusal)


# --- ladder math --------------------------------------------------------------------------------


def ladder_with(ladder: list[int], batch: int) -> list[int]:
    """The ladder with ``batch`` on it (inserted in order when missing)."""
    return sorted(set(ladder) | {batch}, reverse=True)


def ladder_below(top: int, ladder: list[int]) -> list[int]:
    """A ladder from ``top`` down in the default ladder's steps (16 → 12 → 8: ×3/4, then ×2/3,
    halving every two rungs; multiples of 8 from 64 up, of 4 from 16) until it comes within a
    quarter of ``ladder``'s rungs, which follow. ``--batch auto`` starts past a ladder that
    stops short with this below it."""
    below = [r for r in ladder if r < top]
    floor = 1.25 * max(below, default=0)
    out, b, steps = [top], float(top), itertools.cycle((3 / 4, 2 / 3))
    while True:
        b *= next(steps)
        unit = 8 if b >= 64 else 4 if b >= 16 else 1
        rung = int(round(b / unit) * unit)
        if rung <= floor or rung < 1:
            return out + below
        if rung < out[-1]:
            out.append(rung)


def next_rung(ladder: list[int], batch: int) -> int | None:
    """The next smaller batch on the ladder, or None at the bottom."""
    smaller = [b for b in ladder if b < batch]
    return max(smaller) if smaller else None


def rung_above(ladder: list[int], batch: int) -> int | None:
    larger = [b for b in ladder if b > batch]
    return min(larger) if larger else None


def accumulates(cfg: RunConfig) -> bool:
    """Whether a step of this run may be several micro-batches: at every rung with --grad-accum,
    at some with --effective-batch."""
    return cfg.grad_accum > 1 or cfg.effective_batch is not None


def grad_accum_for(cfg: RunConfig, batch: int) -> int:
    """Accumulation steps at this per-GPU batch: fixed, or as close to --effective-batch as it gets."""
    if cfg.effective_batch is None:
        return cfg.grad_accum
    return max(1, round(cfg.effective_batch / (batch * cfg.world_size)))


def default_lr(model: str) -> float:
    """The peak learning rate when ``--lr`` is not given: 1e-3 for the few-million-parameter
    ``tiny``, 1e-4 for ``chatlm-mini`` and any local model."""
    return 1e-3 if model == "tiny" else 1e-4


def count_steps(seen: int, per_step: int, rows: int, target: int) -> int:
    """Optimizer steps from ``seen`` samples to ``target``, ``per_step`` samples a step, never
    crossing an epoch of ``rows`` samples (the sample plan's rule, trainer/data.Plan)."""
    total = 0
    while seen < target:
        epoch_end = min(target, (seen // rows + 1) * rows)
        total += -(-(epoch_end - seen) // per_step)
        seen = epoch_end
    return total


def samples_in_steps(steps: int, per_step: int, rows: int) -> int:
    """The samples the first ``steps`` optimizer steps of a fresh run train: what ``--max-steps``
    becomes, so that without a batch change the run ends at exactly that step."""
    whole_epochs, rest = divmod(steps, -(-rows // per_step))
    return whole_epochs * rows + min(rows, rest * per_step)
