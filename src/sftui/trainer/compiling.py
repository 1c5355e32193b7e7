"""``--compile``: torch.compile for the worker, set up so that its cost is paid once per run.

- The whole model is compiled by default, in place, all but the head's loss
  (``loss.TrainingModel.compile``): at small batches the step is bound by launching kernels,
  and one graph launches the fewest. ``--compile-layers`` compiles each repeated
  layer (a T5Block, a LlamaDecoderLayer) in place instead: the layers share their code, so a
  few graphs serve them all and the compile takes less time; the embeddings, the LM head and
  the loss stay eager, and parameter names do not change. Its shapes are dynamic, so a new
  rung or the short last step of an epoch reuses the same graphs.
- The compile cache lives on disk under the run directory (``RUN_DIR/compile-cache``, or
  ``$SFTUI_COMPILE_CACHE`` to share one between runs): a restart after an OOM, a switch or a
  stop is a new process, and it loads what attempt 1 compiled instead of compiling again.
- Every recompile, and torch's silent fall-back to eager past its recompile limit, becomes a
  ``log`` event: a run that quietly stopped being compiled says so in its log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx.experimental._config as fx_config
from torch.nn.parallel import DistributedDataParallel

from sftui.rundir import EventLog

CACHE_DIR = "compile-cache"
_MESSAGE_CHARS = 400


def cache_dir(run_path: Path) -> Path:
    """Where inductor keeps its compiled graphs for this run. Set outright: importing a
    transformers model has already written inductor's default (/tmp) into the environment."""
    where = os.environ.get("SFTUI_COMPILE_CACHE") or str(run_path / CACHE_DIR)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = where
    return Path(where)


class RecompileEvents(logging.Handler):
    """torch._dynamo's recompile reasons and its recompile-limit warning, as ``log`` events.

    While the first step compiles (``settled`` False), a second graph for the same layer code
    is expected (the first layer of a stack computes the position bias, a decoder layer is not
    an encoder layer): those are ``info``. Any later recompile is a ``warning``.
    """

    def __init__(self, log: EventLog, rank: int):
        super().__init__(logging.DEBUG)
        self.log, self.rank = log, rank
        self.settled = False

    def emit(self, record: logging.LogRecord) -> None:
        recompile = record.name.endswith("__recompiles")
        if not recompile and record.levelno < logging.WARNING:
            return
        text = " ".join(record.getMessage().split())[:_MESSAGE_CHARS]
        prefix = "torch.compile recompiled" if recompile else "torch.compile"
        level = "info" if recompile and not self.settled else "warning"
        try:
            self.log.emit("log", level=level, message=f"rank {self.rank}: {prefix}: {text}")
        except Exception:  # noqa: BLE001 - a log line must never take training down
            self.handleError(record)


CUDA_GRAPHS = "reduce-overhead"


def resolve_mode(mode: str | None, *, world: int, cuda: bool, layers: bool, accumulates: bool,
                 shapes_vary: bool) -> str:
    """``--compile-mode``, or its default: CUDA graphs (``reduce-overhead``) where they were
    measured, a model compiled whole in one process on a GPU, whose step at small batches waits
    on the host launching its kernels: a Qwen2.5-0.5B shape at batch 16, packed, 250.5 samples/s
    without CUDA graphs and 286.3 with them (two H200s 13 minutes apart); chatlm-mini (T5) at
    batch 16, padded, 342.8 and 665.3 (two H200s 10 minutes apart; 2026-12-02,
    docs/BENCHMARKS.md). Elsewhere ``default``: under DDP and with ``--compile-layers``, where
    CUDA graphs were not measured; on the CPU, which has none; when the micro-batch's shape
    ``shapes_vary`` over many values (a T5's packed rows, ``batching.RowPacking``, in their count;
    rows padded to each micro-batch's longest, ``--no-pad-to-max-len``, in their width), where a
    graph would be recorded, and its memory kept, for every value; and when the run ``accumulates`` gradients
    (``--grad-accum`` over 1, or ``--effective-batch`` at any rung: the whole run, so that every
    attempt agrees), where a step's second micro-batch would replay over the gradients of its
    first (``config.validate`` refuses a mode with CUDA graphs there)."""
    measured = world == 1 and cuda and not layers and not shapes_vary
    return mode or (CUDA_GRAPHS if measured and not accumulates else "default")


def compile_model(model: Any, layers: bool, mode: str, run_path: Path, log: EventLog, rank: int,
                  beat: Callable[[], None], interval: float) -> tuple[Any, "FirstStep"]:
    """The model compiled as a whole, or with ``layers`` layer by layer (``compile_regions``;
    still the whole model when it has no repeated layers), in torch.compile's ``mode``; the
    cache under the run and recompiles reported; and the context to run the first step in,
    where the compile happens."""
    where = cache_dir(run_path)
    events = RecompileEvents(log, rank)
    torch._logging.set_logs(recompiles=True)  # also printed into attempt-N.log
    logging.getLogger("torch._dynamo").addHandler(events)
    model, compiled = compile_for_training(model, layers, mode)
    if rank == 0:
        log.emit("log", level="info", message=f"torch.compile: {compiled}, mode {mode}; cache in {where}")
    return model, FirstStep(Heartbeat(beat, interval), events)


def compile_for_training(model: Any, layers: bool, mode: str = "default",
                         backend: Any = "inductor") -> tuple[Any, str]:
    """The model as training (and the memory probe) compile it: layer by layer with ``layers``
    when it has repeated layers, else whole but for the head's loss, in place, in torch.compile's
    ``mode`` (``backend``: another of torch.compile's backends, as the CPU tests take); and what
    was compiled, in words. Under CUDA graphs each step begins with
    ``torch.compiler.cudagraph_mark_step_begin`` (``loop.train_step``): the graphs' outputs of
    the step before are dead by then, so the graphs replay without copying them out."""
    no_size_guards()
    compiled = compile_regions(model, mode=mode, backend=backend) if layers else None
    if compiled:
        return model, compiled
    # The batch dimension is marked dynamic by loop.token_loss_sum.
    form = model.module if isinstance(model, DistributedDataParallel) else model
    form.compile(**_compile_kwargs(mode, backend))  # in place: TrainingModel.compile, all but the head's loss
    return model, WHOLE_MODEL if getattr(form, "head", None) is None else BUT_THE_HEAD


def _compile_kwargs(mode: str, backend: Any) -> dict[str, Any]:
    """torch.compile's arguments, its defaults (inductor, mode "default") passed as nothing."""
    return {**({} if backend == "inductor" else {"backend": backend}), **({} if mode == "default" else {"mode": mode})}


def no_size_guards() -> None:
    """Keeps inductor's choice of fusing a norm's two reductions (mix-order reduction) from
    guarding on a dynamic size. Its strict checks ask whether rows × columns reach 5 Mi elements
    (and rows reach 4,096 and twice the columns), which torch 2.11 answers with guards on the
    symbol: a packed Qwen2.5-0.5B run under ``--compile`` compiled its whole model a second time
    (~70 s) when a token bucket crossed ``896 × width < 5242880`` (H200, 2026-12-02;
    docs/BENCHMARKS.md), and a padded run's batch would recompile crossing the same line between
    rungs. Non-strict mode skips those checks (torch's own knob "to avoid recompilations"), so
    small shapes take the fused kernel too, which torch finds a little slower there (torch 2.13
    still makes the checks in strict mode). Process-wide: the process compiles for training alone."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
        inductor_config.triton.mix_order_reduction_non_strict_mode = True


WHOLE_MODEL = "the whole model"
BUT_THE_HEAD = "the whole model but its head's loss"
# Graphs per layer code: encoder and decoder layers and the first layer of each (it computes
# the position bias). torch's default limit of 8 would leave little room before eager.
_RECOMPILE_LIMIT = 32


def repeated_layers(model: Any) -> list[torch.nn.Module]:
    """The members of every ModuleList of two or more modules of one class, outermost only."""
    found: list[torch.nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            found.extend(module)
            inside.append(name + ".")
    return found


def compile_regions(model: Any, dynamic: bool | None = True, mode: str = "default",
                    backend: Any = "inductor") -> str | None:
    """Compiles each repeated layer of ``model`` in place (``Module.compile``: parameter names
    do not change) in torch.compile's ``mode``; says what it compiled, or None when there is no
    repeated layer."""
    layers = repeated_layers(model)
    if not layers:
        return None
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # Without this, a batch dimension that happens to equal the number of heads (12: a rung of
    # the default ladder) is taken for the same symbol, specialised, and recompiled later.
    fx_config.use_duck_shape = False
    for layer in layers:
        layer.compile(dynamic=dynamic, **_compile_kwargs(mode, backend))
    kinds = ", ".join(sorted({type(layer).__name__ for layer in layers}))
    return f"{len(layers)} layers ({kinds}), {'dynamic' if dynamic else 'static'} shapes"


class FirstStep:
    """The first compiled step: heartbeats while it compiles, and recompiles inside it are
    expected (see ``RecompileEvents``)."""

    def __init__(self, heartbeat: "Heartbeat", events: RecompileEvents):
        self.heartbeat, self.events = heartbeat, events

    def __enter__(self) -> "FirstStep":
        self.heartbeat.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.heartbeat.__exit__(*exc)
        self.events.settled = True


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds on a thread while the block runs.

    The first compiled step compiles the model inside it — minutes for a 188 M-parameter T5 —
    and writes nothing meanwhile; these beats (``phase: compiling`` events) keep the supervisor
    from taking it for a hang. They stop after ``max_seconds``, so a compile that never ends is
    still caught by ``--hang-timeout``.
    """

    def __init__(self, beat: Callable[[], None], interval: float, max_seconds: float = 1800.0):
        self.beat, self.interval, self.max_seconds = beat, interval, max_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-heartbeat", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._done.wait(self.interval) and time.monotonic() < deadline:
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a heartbeat must never take training down
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
