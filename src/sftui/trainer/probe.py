"""The memory probe's ranks: ``python -m sftui.trainer.probe PROBE_DIR``, one process per GPU,
started by ``sftui probe`` / ``--batch auto`` through the supervisor's own launcher (so DDP, its
gradient buckets and NCCL's buffers are there, as in training).

Each trial runs a few optimizer steps at one per-GPU batch size on a batch of the longest rows
of the data, padded to the widest row: the worst case training can meet. A causal LM packed
(``--packing``, its default on a GPU), the worst case is the run's own: its sample plan's heaviest
micro-batch at that batch (data.heaviest_micro_batch), packed as training packs it, since a packed
row's width is its samples' tokens, and batch × the widest row would overstate it about twofold on
rows of varied length. An encoder-decoder model's packed rows are bounded by batch rows of --max-len. It measures peak *reserved* memory (what decides
an OOM) from a cleared allocator. forecast.next_trial picks the trials: the smallest rung, then
what the forecast recommends until that rung has been measured. The device, the model, the
optimizer and the step are the trainer's own (loop.setup_device, loop.new_model,
loop.train_step); nothing here is a second copy of training.

PROBE_DIR/spec.json says what to measure (written by sftui/probing.py). Rank 0 rewrites
PROBE_DIR/result.json after every trial; a rank that runs out of memory while other ranks wait in
a collective writes PROBE_DIR/oom-rank-R.json and exits at once (WORKER_OOM), and the launcher
tears the others down. The processes exit when done: nothing stays on the GPU.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

def main() -> None:
    from sftui.trainer.lifeline import die_with_parent, exit_now

    die_with_parent()
    if len(sys.argv) != 2:
        print("usage: python -m sftui.trainer.probe PROBE_DIR", file=sys.stderr)
        exit_now(2)
    from sftui import events as ev
    from sftui.config import ConfigError

    try:
        code = probe(Path(sys.argv[1]))
    except ConfigError as e:
        print(f"probe: error: {e}", flush=True)
        code = ev.WORKER_BAD_INPUT
    exit_now(code)


def probe(out: Path) -> int:
    import torch.distributed as dist

    from sftui import events as ev
    from sftui import forecast
    from sftui.config import WITHOUT_GRAPHS, ConfigError, RunConfig, default_lr
    from sftui.rundir import RunDir, write_json_atomic
    from sftui.trainer import batching, loop, loss

    if not CudaMemory.available():
        raise ConfigError("no CUDA GPU visible to torch (the probe measures GPU memory)")
    spec = json.loads((out / "spec.json").read_text())
    me = loop.Rank.from_env()
    lead = me.rank == 0
    # The probe trains on nothing but the train data; eval data is the run's business.
    cfg = replace(RunConfig.from_dict(spec["config"]), eval_data=None)

    def say(text: str) -> None:
        if lead:
            print(f"probe: {text}", flush=True)

    accelerator, _ = loop.setup_device(cfg, me)
    device = accelerator.device
    memory = CudaMemory(device)
    accelerator.wait_for_everyone()  # NCCL's own buffers exist before free memory is read
    gpu = _gpu_info(memory, cfg, me)
    gpus = [gpu]
    if me.world > 1:
        gpus = [None] * me.world
        dist.all_gather_object(gpus, gpu)
    budget = min(g["budget"] for g in gpus)

    def phase(name: str, progress: float | None = None) -> None:
        say(name + (f" {progress * 100:.0f}%" if isinstance(progress, (int, float)) else ""))

    tok, train_data, _, _ = loop.prepare_data(RunDir(Path(spec["work_dir"])), cfg, spec["data_fingerprint"], me, phase)
    cfg = replace(cfg, packing=batching.packs(cfg.packing, train_data.seq2seq, device))  # as the run decides it
    # A causal LM's packed row is as wide as its samples' tokens: its worst case is the plan's own.
    # An encoder-decoder's packed rows (batching.RowPacking) are never more than its samples nor
    # wider than --max-len (rounded up as widths are): batch rows that wide bound them, though
    # padding alone would stop at the longest row of the data.
    one_row = cfg.packing and not train_data.seq2seq
    rows_width = -(-cfg.max_len // loop.PAD_MULTIPLE) * loop.PAD_MULTIPLE if cfg.packing and train_data.seq2seq else None
    say("loading the model")
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.model)
    net, opt = loop.new_model(cfg, tok, device, lr)
    model_state = model_state_bytes(net)
    decoder_start = net.config.decoder_start_token_id if train_data.seq2seq else None
    model, optimizer = accelerator.prepare(loss.TrainingModel(net), opt)
    if cfg.compile:
        from sftui.trainer import compiling

        # Training's mode, less its CUDA graphs: the trials of every rung run in this one process,
        # and the graphs' memory pool, kept from one rung's trial to the next, would be counted in
        # the later rungs' peaks (with them, a compiled Qwen2.5-0.5B run at batch 16 reserved 15.90
        # GiB, without them 15.21: docs/BENCHMARKS.md, 2026-12-02).
        mode = cfg.compile_mode or "default"
        mode = WITHOUT_GRAPHS.get(mode, mode)
        model, _ = compiling.compile_for_training(model, cfg.compile_layers, mode)
    model.train()

    ladder, target = [int(b) for b in spec["ladder"]], float(spec["target"])
    points: list[forecast.Point] = []
    started = time.monotonic()
    result = {"gpus": gpus, "budget_bytes": budget, "model_state_bytes": model_state, "points": [], "done": False}

    def save() -> None:
        if lead:
            result["points"] = forecast.points_to_json(points)
            result["trial_seconds"] = round(time.monotonic() - started, 2)
            write_json_atomic(out / "result.json", result)

    save()
    while True:
        # Rank 0 decides (its clock ends the search), every rank follows: one all-reduce.
        nxt = forecast.next_trial(ladder, points, budget, target, model_state) if lead else 0
        if lead and points and time.monotonic() - started > float(spec["max_seconds"]):
            say(f"stopping after {time.monotonic() - started:.0f} s of trials (the time limit)")
            nxt = None
        batch = _agree(nxt or 0, device, me.world)
        if not batch:
            break
        say(f"batch {batch}: {int(spec['steps'])} optimizer steps on "
            + (f"the heaviest {batch} samples the run packs together" if one_row else f"the {batch} longest rows"))
        width = rows_width or loop.pad_width(cfg, True)
        micro = (_worst_case_batch(train_data, batch, tok.pad_token_id, width) if not one_row else
                 _worst_case_packed(train_data, batch, batch * me.world * cfg.grad_accum, tok.pad_token_id, cfg))
        peak, per_s, oom = _trial(accelerator, model, optimizer, micro, batch, me.world, decoder_start,
                                  int(spec["steps"]), memory, widths_vary=width is None)
        if oom and me.world > 1:
            # The other ranks wait in a collective this rank will never join: say so and leave.
            write_json_atomic(out / f"oom-rank-{me.rank}.json", {"batch": batch, "message": oom})
            print(f"probe: rank {me.rank}: batch {batch} ran out of memory", flush=True)
            return ev.WORKER_OOM
        peak = _agree(peak or 0, device, me.world) if me.world > 1 else peak
        points.append(forecast.Point(batch, peak, None if per_s is None else round(per_s * me.world, 2)))
        say(f"batch {batch}: " + ("out of memory" if peak is None else
                                  f"peak {peak / 2**30:.2f} GiB reserved, {per_s * me.world:.1f} samples/s"))
        save()
    result["done"] = True
    save()
    accelerator.wait_for_everyone()
    return ev.WORKER_OK


def model_state_bytes(net: Any) -> int:
    """A lower bound of the forecast's fixed part: every weight as it is held (a LoRA base
    frozen in bf16), and for the trained ones their gradients and AdamW's two moments, each of
    the weight's own size (float32 adapters)."""
    total = 0
    for p in net.parameters():
        total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return total


class CudaMemory:
    """The CUDA caching allocator's figures for one device (one class: a CPU test stands in)."""

    def __init__(self, device: Any):
        import torch

        self.device = device
        self.cuda = torch.cuda

    @staticmethod
    def available() -> bool:
        import torch

        return torch.cuda.is_available()

    def name(self) -> str:
        return self.cuda.get_device_name(self.device)

    def free_total(self) -> tuple[int, int]:
        free, total = self.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def clear(self) -> None:
        """Give the cached blocks back: a trial starts as a fresh process at its batch would."""
        gc.collect()
        self.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)

    def sync(self) -> None:
        self.cuda.synchronize(self.device)

    def peak_reserved(self) -> int:
        return int(self.cuda.max_memory_reserved(self.device))


def _gpu_info(memory: CudaMemory, cfg: Any, me: Any) -> dict[str, Any]:
    """This rank's card: name, UUID, total and free memory once the process is set up, and its
    budget: free memory, capped by --mem-fraction (the allocator's own ceiling)."""
    from sftui.trainer import loop

    free, total = memory.free_total()
    budget = free
    if cfg.mem_fraction:
        fraction = cfg.mem_fraction[me.rank] if len(cfg.mem_fraction) > 1 else cfg.mem_fraction[0]
        budget = min(free, int(fraction * total))
    return {"rank": me.rank, "name": memory.name(), "uuid": loop.gpu_uuid(memory.device),
            "total": total, "free": free, "budget": budget}


def _agree(value: int, device: Any, world: int) -> int:
    """The largest of the ranks' values (rank 0's decision, a trial's peak)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _longest_rows(data: Any, batch: int) -> Any:
    """The ``batch`` longest rows, longest first (repeated when there are fewer)."""
    import numpy as np

    return np.resize(np.argsort(-np.asarray(data.n_tokens), kind="stable"), batch)


def _worst_case_batch(data: Any, batch: int, pad_id: int, width: int | None = None) -> dict[str, Any]:
    """``batch`` of the longest rows (repeated when there are fewer), padded to the widest input
    (and label) row of the whole data, or to ``width`` where training pads every batch to it:
    the largest micro-batch any step can hand the model."""
    import numpy as np
    import torch.nn.functional as F

    from sftui.trainer.data import collate

    micro = collate(data, _longest_rows(data, batch), pad_id)
    widths = {"input_ids": width or int(np.diff(data.offsets).max())}
    if data.seq2seq:
        widths["labels"] = width or int(np.diff(data.label_offsets).max())
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    for name in micro:
        width = widths["labels" if name == "labels" and data.seq2seq else "input_ids"]
        micro[name] = F.pad(micro[name], (0, width - micro[name].shape[1]), value=fill[name])
    return micro


def _worst_case_packed(data: Any, batch: int, per_step: int, pad_id: int, cfg: Any) -> dict[str, Any]:
    """With ``--packing``: the heaviest micro-batch at ``batch`` of the sample plan loop.train
    makes when it starts at ``per_step`` samples a step (data.heaviest_micro_batch, over every
    epoch the run begins), packed as loop.train packs on a GPU (token buckets under ``--compile``,
    else a multiple of PAD_MULTIPLE): no packed row the run meets at this batch is wider."""
    import math

    from sftui.config import samples_in_steps
    from sftui.trainer import loop
    from sftui.trainer.data import heaviest_micro_batch

    target = samples_in_steps(cfg.max_steps, per_step, data.n) if cfg.max_steps else math.ceil(cfg.epochs * data.n)
    rows = heaviest_micro_batch(loop.sample_plan(cfg, data, target), data.n_tokens, batch, -(-target // data.n))
    return loop.packed_layout(cfg, pad_id, cuda=True)(data, rows)


def _trial(accelerator: Any, model: Any, optimizer: Any, micro: dict[str, Any], batch: int, world: int,
           decoder_start: int | None, steps: int, memory: CudaMemory,
           widths_vary: bool) -> tuple[int | None, float | None, str | None]:
    """(peak reserved bytes, samples/s of this rank, OOM message) of ``steps`` optimizer steps
    on ``micro``, which holds ``batch`` samples (padded rows, or one packed row),
    from what a fresh process at this batch starts with: the weights alone, the allocator's
    cache empty; AdamW's state is made anew by the first step, in training's order. The step is
    compiled as training compiles it (``widths_vary`` as there)."""
    from sftui.trainer import loop

    n_target = int((micro["labels"] != -100).sum())
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    memory.clear()
    memory.reset_peak()
    try:
        timed_from = None
        for s in range(steps):
            if s == 1:  # the first step pays for kernels' autotuning and the optimizer's state
                memory.sync()
                timed_from = time.monotonic()
            loop.train_step(accelerator, model, optimizer, [micro], n_target, world, decoder_start, loop.StepPhase(),
                            widths_vary)
        memory.sync()
    except Exception as e:
        if not loop.is_oom(e):
            raise
        return None, None, str(e).splitlines()[0][:300]
    per_s = batch * (steps - 1) / (time.monotonic() - timed_from) if timed_from is not None else None
    return memory.peak_reserved(), per_s, None


if __name__ == "__main__":
    main()
