"""The training loop of one rank, on accelerate: read the run, prepare data and model, train
step by step from the sample plan, checkpoint, and leave with a ``worker_exit`` event.

Read it top to bottom: ``train`` is the whole story; the helpers below it are the details.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch.utils.data import DataLoader

from sftui import chat, rows
from sftui import events as ev
from sftui.config import ConfigError, RunConfig, accumulates, default_lr, is_seq2seq, packing_refusal
from sftui.rundir import EventLog, RunDir, read_json, write_json_atomic
from sftui.runfile import RunFile, base_fingerprint
from sftui.trainer import adapters, batching, checkpoint, data, flops, model as models, norms, rendezvous
from sftui.trainer.loss import TrainingModel, trained_positions
from sftui.trainer.lifeline import Lifeline

OOM_MARKERS = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_ALLOCATED", "CUDNN_STATUS_NOT_ALLOC")
ACTIONS = ("switch", "stop", "checkpoint", "lost")  # request.json's, then a rank's own: its supervisor died
LOST_SEQ = 2**40  # above any request's seq, so that every rank's MAX agrees on it
CLIP_NORM = 1.0
PAD_MULTIPLE = 8  # on a GPU, batch widths are rounded up to this: tensor-core-friendly shapes


@dataclass(frozen=True)
class Rank:
    """Where this process stands: torchrun's environment plus the attempt number."""

    rank: int
    world: int
    local_rank: int
    attempt: int

    @classmethod
    def from_env(cls) -> "Rank":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("SFTUI_ATTEMPT", 1)))


def train(run: RunDir, log: EventLog, me: Rank, lifeline: Lifeline | None = None) -> int:
    spec = RunFile.read(run)
    cfg = spec.cfg
    batch, accum = int(spec.batch_size), int(spec.grad_accum)
    lead = me.rank == 0

    def phase(name: str, progress: float | None = None) -> None:
        if lead:
            log.emit("phase", phase=name, progress=progress)

    # --- the process group and the device ---
    accelerator, cuda = setup_device(cfg, me)
    device = accelerator.device
    uuid = gpu_uuid(device)
    log.emit("rank_start", rank=me.rank, pid=os.getpid(), host=socket.gethostname(), gpu_uuid=uuid)

    # --- resume point: refuse a checkpoint made from other data or another max length ---
    resume = run.latest_checkpoint()
    start = checkpoint.read_state(resume) if resume else None
    if start and start.data_fingerprint != spec.data_fingerprint:
        raise ConfigError(f"{resume}: the data changed since this checkpoint was written "
                          f"(fingerprint {start.data_fingerprint[:12]} there, {spec.data_fingerprint[:12]} now)")
    if start and start.max_len != cfg.max_len:
        raise ConfigError(f"{resume}: written with --max-len {start.max_len}, this run has {cfg.max_len}")
    base = base_fingerprint(cfg.model)
    if start and start.lora != spec.lora:
        raise ConfigError(f"{resume}: written with LoRA {start.lora}, this run has {spec.lora}")
    if start and start.lora and start.base_fingerprint != base:
        raise ConfigError(f"{resume}: its adapters were trained on another base model (fingerprint "
                          f"{start.base_fingerprint[:12]} there, {cfg.model} is {base[:12]} now)")

    # --- data: rank 0 checks it is unchanged and tokenizes it (once per run: cached), the others wait ---
    phase("validating")
    tok, train_data, eval_data, fmt = prepare_data(run, cfg, spec.data_fingerprint, me, phase, spec.chat_format)
    seq2seq = train_data.seq2seq
    refusal = packing_refusal(cfg.model) if cfg.packing else None
    if refusal:  # the CLI refuses it; a run.json written otherwise is refused here
        raise ConfigError(refusal)
    cfg = replace(cfg, packing=batching.packs(cfg.packing, seq2seq, device))  # its default decided here
    target = spec.sample_budget if spec.sample_budget else cfg.epochs * train_data.n
    plan = sample_plan(cfg, train_data, target)
    # --max-steps counts whole epochs of its own: the epoch shown never passes its total.
    epochs: float = cfg.epochs if not spec.sample_budget else round(target / train_data.n, 6)
    epochs = int(epochs) if epochs == int(epochs) else epochs
    if lead:
        log.emit("data", rows=train_data.n, skipped=train_data.skipped,
                 eval_rows=eval_data.n if eval_data is not None else None, target_samples=target,
                 chat_format=fmt.describe(), batches="packed" if cfg.packing else "padded")

    # --- the model, the optimizer, and the state to resume from ---
    phase("loading_model")
    peak_lr = cfg.lr if cfg.lr is not None else default_lr(cfg.model)
    net, opt = new_model(cfg, tok, device, peak_lr, batch)
    if lead:
        trainable, total = adapters.parameter_counts(net)
        log.emit("model", trainable_params=trainable, total_params=total, lora=spec.lora)
        if cfg.packing:
            log.emit("log", level="info", message=(
                f"packed batches: each micro-batch's samples end to end in rows of {cfg.max_len} tokens (--max-len), "
                "each sample masked to itself" if seq2seq else
                "packed batches: each micro-batch's samples end to end in one row, no padding")
                + f"; {net.config._attn_implementation} attention")
    step, seen = 0, 0
    if resume is not None:
        start, _ = checkpoint.load(resume, net, opt)
        step, seen = start.step, start.samples_seen
    resume_step = step if resume is not None else None
    schedule = Schedule(peak_lr, cfg.warmup * plan.target, plan.target)
    fpt = flops.flops_per_token(net, seq2seq)
    decoder_start = net.config.decoder_start_token_id if seq2seq else None
    form = TrainingModel(net)
    if form.scale is None and me.rank == 0:  # a T5 whose decoder scale no trial found (loss.decoder_scale)
        log.emit("log", level="warning", message="the model's forward scales its decoder states by neither "
                 "d_model^-0.5 nor 1: it keeps its own forward and full logits (slower, more memory)")
    model, optimizer = accelerator.prepare(form, opt)
    if cfg.compile and cuda:
        from sftui.trainer import compiling  # torch._dynamo's logging hooks, only when compiling

        phase("compiling")
        # The compile itself happens in the first step: heartbeats keep it from looking like a hang.
        mode = compiling.resolve_mode(cfg.compile_mode, world=me.world, cuda=cuda, layers=cfg.compile_layers,
                                      accumulates=accumulates(cfg), shapes_vary=shapes_vary(cfg, seq2seq, cuda))
        model, first_step = compiling.compile_model(model, cfg.compile_layers, mode, run.path, log, me.rank,
                                                    lambda: phase("compiling"), max(5.0, min(60.0, cfg.hang_timeout / 4)))
    else:
        first_step = nullcontext()
        if cfg.compile:
            log.emit("log", level="warning", message="--compile is ignored on the CPU")

    # --- the steps of this attempt, prepared by the DataLoader's workers from the plan ---
    per_step = batch * me.world * accum
    steps = plan.steps(seen, per_step)
    total_steps = step + len(steps)
    width = batch_width(cfg, seq2seq, cuda)
    packing = packed_layout(cfg, tok.pad_token_id, cuda, decoder_start) if cfg.packing else None
    loader = DataLoader(
        data.StepBatches(train_data, plan, steps, me.rank, batch, accum, tok.pad_token_id, width,
                         PAD_MULTIPLE if cuda else 1, packing),
        batch_size=None, num_workers=cfg.dataloader_workers,
        prefetch_factor=2 if cfg.dataloader_workers else None, pin_memory=cuda,
    )
    requests = Requests(run, spec.request_seq, lead, me.world, device,
                        (lambda: lifeline.lost) if lifeline is not None else (lambda: False))
    inject = cfg.inject_oom_at_step if me.attempt == 1 and me.rank == cfg.inject_oom_rank else None
    samples_log = os.open(run.samples, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600) \
        if lead and cfg.record_samples else None
    peak_tflops = cfg.peak_tflops or flops.peak_tflops(cuda)

    def save(reason: str, at_step: int, alone: bool = False) -> None:
        """A checkpoint of the state after ``at_step``: rank 0 writes and the others wait, or
        (emergency) this rank writes alone, with no collective."""
        if lead or alone:
            phase("checkpointing")
            state = checkpoint.State(at_step, seen, seen // plan.n, batch, accum, me.world, spec.data_fingerprint,
                                     cfg.max_len, cfg.seed, spec.lora, base)
            path, size, seconds = checkpoint.save(run, bare_model(accelerator, model), opt, schedule.state_dict(seen),
                                                  state, cfg.keep_checkpoints, tag=f"r{me.rank}-{os.getpid()}")
            log.emit("checkpoint", step=at_step, path=str(path.relative_to(run.path)), seconds=round(seconds, 3),
                     bytes=size, reason=reason)
        if not alone:
            accelerator.wait_for_everyone()

    def leave_for_oom(failed_step: int, where: str, message: str) -> int:
        """The emergency checkpoint (state after ``failed_step`` - 1, saved alone), then the
        ``oom`` event and ``worker_exit``."""
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        emergency = _emergency_checkpoint(failed_step, where, resume_step, save, log, me.rank)
        log.emit("oom", step=failed_step, batch_size=batch, rank=me.rank, gpu_uuid=uuid, where=where,
                 message=message, emergency_checkpoint=emergency, injected=inject == failed_step)
        log.emit("worker_exit", rank=me.rank, reason="oom", step=failed_step - 1)
        return ev.WORKER_OOM

    memory = MemoryReport(device if cuda else None)

    # --- training ---
    phase("training")
    if lifeline is not None:
        lifeline.training = True
    model.train()
    meter = Meter(device)
    for item in loader:
        step += 1
        torch.manual_seed(_step_seed(cfg.seed, step, me.rank))
        for group in opt.param_groups:
            group["lr"] = schedule.lr(item["seen"] + item["size"])
        oom: tuple[str, str] | None = None
        at = StepPhase()
        try:
            if step == inject:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected by --inject-oom-at-step {step} on rank {me.rank})")
            with first_step if step == (resume_step or 0) + 1 else nullcontext():
                loss, grad_norm = train_step(accelerator, model, optimizer, item["micro"], item["n_target"], me.world,
                                             decoder_start, at, widths_vary=width is None)
            meter.loss += loss
        except Exception as e:
            if not is_oom(e):
                raise
            oom = (at.where, str(e).splitlines()[0][:500])
        if oom is not None:
            # Outside the except block: the exception's frames, and with them the step's
            # tensors, are gone.
            return leave_for_oom(step, *oom)
        seen += item["size"]
        meter.add(item, grad_norm)
        if samples_log is not None:
            os.write(samples_log, (json.dumps({"attempt": me.attempt, "step": step, "epoch": item["epoch"],
                                               "ids": item["row_ids"]}) + "\n").encode())

        last_step = step == total_steps
        action = requests.exchange()
        if last_step and action is not None and action[0] != "checkpoint":
            action = None  # a switch or stop at the very end: the run simply finishes
        if action is not None or last_step or step == (resume_step or 0) + 1 or step % cfg.log_every == 0:
            loss, norm, per_s = meter.read(me.world)
            if lead:
                log.emit("step", step=step, total_steps=total_steps, epoch=round(seen / plan.n, 6), epochs=epochs,
                         samples_seen=seen, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=norm,
                         samples_per_s=per_s["samples"], tokens_per_s=per_s["tokens"], batch_size=batch,
                         grad_accum=accum, mfu=flops.mfu(per_s, fpt, net.config, peak_tflops, me.world))
                if cfg.compile and cuda and step == (resume_step or 0) + 1:
                    log.emit("log", level="info", message=f"torch.compile: the first step took {per_s['seconds']:.1f} s "
                                                          "(compiling, or loading the compile cache)")
        if step % cfg.log_every == 0:
            log.emit("rank_stats", step=step, rank=me.rank, gpu_uuid=uuid, **memory.report())
        if eval_data is not None and step % cfg.eval_every == 0:
            try:
                _evaluate(training_form(accelerator, model), eval_data, batch, me, tok.pad_token_id, decoder_start,
                          device, log, step)
            except Exception as e:
                if not is_oom(e):
                    raise
                oom = ("forward", "during evaluation: " + str(e).splitlines()[0][:480])
            if oom is not None:  # step is complete: the next one is where training stopped
                return leave_for_oom(step + 1, *oom)

        if action is not None and action[0] in ("switch", "stop", "lost"):
            # A lost supervisor: keep every step trained so far for --resume, then leave.
            save("supervisor_lost" if action[0] == "lost" else action[0], step)
            log.emit("worker_exit", rank=me.rank, reason="stop" if action[0] == "lost" else action[0], step=step)
            return ev.WORKER_OK
        if action is not None:
            save("request", step)
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last_step:
            save("periodic", step)

    # --- the run is complete ---
    save("final", step)
    if lead:
        phase("checkpointing")
        if fmt.kind == "template":  # inference's apply_chat_template then builds what training saw
            tok.chat_template = fmt.template
        if spec.lora:
            adapters.save_final(bare_model(accelerator, model), tok, run.final, cfg.merge)
        else:
            models.save_final(bare_model(accelerator, model), tok, run.final)
    accelerator.wait_for_everyone()
    log.emit("worker_exit", rank=me.rank, reason="finished", step=step)
    return ev.WORKER_OK


def setup_device(cfg: RunConfig, me: Rank) -> tuple[Accelerator, bool]:
    """This rank's GPU (capped by ``--mem-fraction``) or the CPU, and its Accelerator (bf16
    where the card has it). Shared with the memory probe, which must measure the same setup."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(me.local_rank)
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        if cfg.mem_fraction:
            fraction = cfg.mem_fraction[me.rank] if len(cfg.mem_fraction) > 1 else cfg.mem_fraction[0]
            torch.cuda.set_per_process_memory_fraction(fraction, me.local_rank)
    # torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers, which accelerate's
    # kwargs handler does not know yet; the choice is deliberate (below), and the warning opened
    # the log tail of every failed attempt.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    group_timeout = timedelta(seconds=max(60.0, cfg.hang_timeout))
    rendezvous.init_loopback_group(cuda, group_timeout)  # one node: nothing listens beyond loopback
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=group_timeout),
            # Buffers (rotary tables) are the same on every rank: no broadcast before each forward.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )
    return accelerator, cuda


def training_form(accelerator: Accelerator, model: Any) -> TrainingModel:
    """The model in its training form (TrainingModel) without DDP and without
    torch.compile's wrapper, which accelerate keeps by default: for evaluation."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def bare_model(accelerator: Accelerator, model: Any) -> Any:
    """The model itself, for checkpoints and ``final/``: no DDP, no compile wrapper (whose state
    dict names every parameter ``_orig_mod.…``, which a resumed attempt could not load), no
    training form around it."""
    return training_form(accelerator, model).bare


def sample_plan(cfg: RunConfig, train_data: data.Tokenized, target: int) -> data.Plan:
    """The run's sample plan of ``target`` samples (``--group-by-length`` sorts within chunks).
    Shared with the memory probe, whose packed worst case is this plan's heaviest micro-batch."""
    return data.Plan(train_data.n, cfg.seed, target,
                     data.length_key(train_data, cfg.max_len) if cfg.group_by_length else None)


def packed_layout(cfg: RunConfig, pad_id: int, cuda: bool,
                  decoder_start: int | None = None) -> batching.Packing | batching.RowPacking:
    """How a packed run lays out its micro-batches: a causal LM's in one row, in token buckets
    under ``--compile`` on a GPU, else widths rounded up to PAD_MULTIPLE there (shared with the
    memory probe); an encoder-decoder model's (``decoder_start`` given) in rows of ``--max-len``,
    as many columns as padding would have (``pad_width``)."""
    multiple = PAD_MULTIPLE if cuda else 1
    if decoder_start is not None:
        return batching.RowPacking(pad_id, decoder_start, cfg.max_len, pad_width(cfg, cuda), multiple)
    return batching.Packing(pad_id, cfg.max_len, buckets=cfg.compile and cuda, multiple=multiple)


def pad_width(cfg: RunConfig, cuda: bool) -> int | None:
    """The columns every batch is padded to: ``--max-len`` with ``--pad-to-max-len`` (by default
    with ``--compile`` on a GPU: a compiled graph is fastest on one shape), else None (each
    micro-batch's longest row, rounded up to PAD_MULTIPLE on a GPU). Shared with the memory
    probe. Packed batches (``--packing``) have a width of their own (batching.Packing)."""
    static = cfg.pad_to_max_len if cfg.pad_to_max_len is not None else cfg.compile and cuda
    return cfg.max_len if static else None


def batch_width(cfg: RunConfig, seq2seq: bool, cuda: bool) -> int | None:
    """The columns of this run's micro-batches, or None where they vary: a causal LM's packed row
    is as wide as its tokens (batching.Packing); a T5's packed rows (``max_len`` when compiled) and
    padded rows take ``pad_width``. Shared with scripts/profile_step.py."""
    return None if cfg.packing and not seq2seq else pad_width(cfg, cuda)


def shapes_vary(cfg: RunConfig, seq2seq: bool, cuda: bool) -> bool:
    """Whether this run's micro-batches come in many shapes (``compiling.resolve_mode``): a T5's
    packed rows vary in count, padded rows not padded to ``--max-len`` in width; a causal LM's
    packed row takes a few token buckets."""
    return (cfg.packing and seq2seq) or (not cfg.packing and pad_width(cfg, cuda) is None)


def new_model(cfg: RunConfig, tok: Any, device: torch.device, lr: float,
              batch: int | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """The model on the device and its AdamW, not yet prepared by accelerate (a checkpoint is
    loaded into both first): with ``--lora`` the base frozen and adapters on it (adapters.py), the
    optimizer over the adapters alone. With ``--packing`` the attention packed rows take
    (batching.packed_attention; a T5's on a GPU at micro-batches of ``batch`` samples,
    t5attention.packed_attention). Shared with the memory probe (no ``batch``: sdpa)."""
    net = models.build_model(cfg.model, tok, cfg.seed, cfg.max_len, device, adapters.base_dtype(cfg, device))
    seq2seq = net.config.is_encoder_decoder
    if cfg.packing and seq2seq and net.config._attn_implementation != "sdpa":
        # transformers hands 4-D masks to the attention as they are: sdpa takes them as booleans
        # (batching.row_masks), eager would add them, flex wants a block mask.
        raise ConfigError(f"--packing: {cfg.model} loads with {net.config._attn_implementation} attention; "
                          "packed encoder-decoder rows need sdpa")
    attention = batching.packed_attention(device) if cfg.packing and not seq2seq else None
    if cfg.packing and seq2seq and device.type == "cuda" and batch is not None:
        from sftui.trainer import t5attention  # triton, imported only where its kernels run

        attention = t5attention.packed_attention(device, batch, net.config.num_heads)
    if attention is not None:
        models.set_attention(net, attention)
    models.fused_attention_bias(net)
    norms.fuse_rms_norms(net)
    if cfg.gradient_checkpointing:
        net.config.use_cache = False
        net.gradient_checkpointing_enable()
        if cfg.lora:  # the embeddings are frozen: a reentrant checkpoint needs an input that wants grad
            net.enable_input_require_grads()
    lora = adapters.Lora.of(cfg)
    if lora is not None:
        net = adapters.apply_lora(net, lora)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return net, opt


@dataclass
class StepPhase:
    """Where a step is (forward, backward, optimizer), kept outside ``train_step`` so that an
    OOM can be placed once the step's frame, and its tensors, are gone."""

    where: str = "forward"


def train_step(accelerator: Accelerator, model: Any, optimizer: Any, micros: list[dict[str, torch.Tensor]],
               n_target: int, world: int, decoder_start: int | None,
               at: StepPhase, widths_vary: bool = False) -> tuple[torch.Tensor, torch.Tensor | float]:
    """One optimizer step over this rank's micro-batches: forward, backward (DDP syncs on the
    last one only), clipping, AdamW. Returns (step loss on the device, grad norm). Shared with
    the memory probe, so that it measures exactly what training allocates. ``widths_vary``:
    the micro-batches are not padded to one width (see ``token_loss_sum``)."""
    device = accelerator.device
    if device.type == "cuda":  # a new step for CUDA graphs (compiling.CUDA_GRAPHS); nothing without them
        torch.compiler.cudagraph_mark_step_begin()
    loss = torch.zeros((), device=device)
    for m, micro in enumerate(micros):
        trained = trained_positions(micro["labels"], shifted=decoder_start is None)
        micro = {**micro, "trained": trained.pin_memory() if device.type == "cuda" else trained}
        micro = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in micro.items()}  # a packed micro-batch's max_seqlen is an int
        last = m == len(micros) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            at.where = "forward"
            loss_sum = token_loss_sum(model, micro, decoder_start, widths_vary)
            at.where = "backward"
            accelerator.backward(scaled_loss(loss_sum, n_target, world))
        loss += loss_sum.detach() / max(1, n_target)
    at.where = "optimizer"
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _emergency_checkpoint(step: int, where: str, resume_step: int | None, save: Any, log: EventLog,
                          rank: int) -> int | None:
    """DESIGN.md's emergency checkpoint: the state after the last completed step, saved by this
    rank alone. None after an OOM in the optimizer step (part of the parameters may have been
    updated) or when no step has completed yet."""
    last = step - 1
    if where == "optimizer" or last == 0:
        return None
    if last == resume_step:
        return last  # the checkpoint this attempt started from already holds that state
    try:
        save("oom", last, alone=True)
    except Exception as e:  # noqa: BLE001 - the oom event must be written whatever happens here
        log.emit("log", level="error", message=f"rank {rank}: emergency checkpoint failed: {e}")
        return None
    return last


def token_loss_sum(model: Any, batch: dict[str, Any], decoder_start: int | None,
                   widths_vary: bool = False) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the target tokens of a micro-batch, from the
    model in its training form (TrainingModel, maybe wrapped by DDP; under --compile its body compiled).

    ``decoder_start`` is None for a causal LM (labels are the inputs, shifted by one) and the
    decoder's start token for an encoder-decoder model (labels feed the decoder, shifted right).
    A packed micro-batch (batching.Packing: ``position_ids``) goes in without an attention mask:
    a mask would keep transformers from finding the samples where the positions restart. Packed
    encoder-decoder rows (batching.RowPacking) bring their decoder inputs and which sample each
    position holds (the model's training form makes the masks of it).
    """
    labels = batch["labels"]
    packed = "position_ids" in batch
    rows = "decoder_sample" in batch
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "labels": labels}
    if packed:
        inputs["position_ids"] = batch["position_ids"]
    elif rows:
        for name in ("decoder_input_ids", "encoder_sample", "decoder_sample"):
            inputs[name] = batch[name]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if decoder_start is not None and not rows:
        decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], decoder_start), labels[:, :-1]], dim=1)
        inputs["decoder_input_ids"] = decoder_input_ids.masked_fill(decoder_input_ids == -100, decoder_start)
    # The batch varies (ladder rungs, a short last step, the rows packed samples need): a compiled
    # model takes it as a symbol rather than recompiling for each size. So does the width when
    # batches are not padded to one: unmarked, the first new width costs a second whole compile
    # (torch's automatic dynamic). A packed row is one row (dimension 0 is 1) of a varying width:
    # its token bucket. A no-op when not compiled.
    for tensor in inputs.values():
        torch._dynamo.maybe_mark_dynamic(tensor, 1 if packed else [0, 1] if widths_vary else 0)
    for name in ("trained", "cu_seqlens"):  # the trained positions (loss.trained_positions); the samples' bounds
        if name in batch:
            inputs[name] = batch[name]
            torch._dynamo.maybe_mark_dynamic(inputs[name], 0)
    if packed:
        inputs["max_seqlen"] = batch["max_seqlen"]
    return model(**inputs)


def scaled_loss(loss_sum: torch.Tensor, step_targets: int, world: int) -> torch.Tensor:
    """What a micro-batch backpropagates: its token-loss sum over the step's global target
    count, × world because DDP averages the ranks' gradients."""
    return loss_sum * (world / max(1, step_targets))


def is_oom(e: BaseException) -> bool:
    """CUDA out of memory, from the allocator or from the driver/cuBLAS/cuDNN."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MARKERS)


class Schedule:
    """Linear warm-up then cosine decay, on samples seen (not steps): a batch change does not
    bend it."""

    def __init__(self, peak: float, warmup_samples: float, target: int):
        self.peak, self.warmup, self.target = peak, warmup_samples, target

    def lr(self, seen: int) -> float:
        if seen < self.warmup:
            return self.peak * seen / self.warmup
        progress = (seen - self.warmup) / max(1.0, self.target - self.warmup)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def state_dict(self, seen: int) -> dict[str, Any]:
        return {"samples_seen": seen, "peak_lr": self.peak, "warmup_samples": self.warmup, "target_samples": self.target}


class Requests:
    """request.json, seen by all ranks at the same step.

    Rank 0 stats the file at every step boundary (reads it only when it changed); one integer
    all-reduce (MAX) tells every rank. On CUDA the integer comes back through pinned memory
    and an event, read one step late, so the check never waits for the GPU to drain.
    """

    def __init__(self, run: RunDir, handled_seq: int, lead: bool, world: int, device: torch.device,
                 lost: Callable[[], bool] = lambda: False):
        self.path, self.handled, self.lead, self.world, self.device = run.request, handled_seq, lead, world, device
        self.lost = lost  # () -> bool: this rank's supervisor is gone
        self._stat: tuple[float, int] | None = None
        self._value = 0
        self._cuda = device.type == "cuda" and world > 1
        self._inflight: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def _poll_file(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._value
        if (st.st_mtime, st.st_size) != self._stat:
            self._stat = (st.st_mtime, st.st_size)
            try:
                req = read_json(self.path)
                seq, action = int(req["seq"]), ACTIONS[:3].index(req["action"]) + 1
                self._value = seq * 8 + action
            except (OSError, ValueError, KeyError, TypeError):
                pass  # written atomically by the supervisor; anything else is not a request
        return self._value

    def exchange(self) -> tuple[str, int] | None:
        """(action, seq) of a request newer than any handled, the same on every rank, or None."""
        value = self._poll_file() if self.lead else 0
        if self.lost():
            value = LOST_SEQ * 8 + ACTIONS.index("lost") + 1
        if self.world > 1:
            value = self._all_reduce(value)
        seq, action = divmod(value, 8)
        if seq <= self.handled or not action:
            return None
        self.handled = seq
        return ACTIONS[action - 1], seq

    def _all_reduce(self, value: int) -> int:
        if not self._cuda:
            t = torch.tensor([value], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return int(t.item())
        # From pinned memory, asynchronously: torch.tensor(..., device="cuda") would wait for the GPU.
        t = torch.tensor([value], dtype=torch.int64).pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self._inflight = self._inflight, (host, done)
        if previous is None:
            return 0
        previous[1].synchronize()
        return int(previous[0].item())


class MemoryReport:
    """What ``rank_stats`` says of this rank's GPU memory: the allocated and the reserved peak
    (what an OOM is decided by; the probe forecasts it), and the caching allocator's retries
    since the last report (it freed its cache to satisfy a request: pressure before an OOM)."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self._retries = 0

    def report(self) -> dict[str, int | None]:
        if self.device is None:
            return {"mem_peak_bytes": None, "mem_reserved_bytes": None, "alloc_retries": None}
        retries = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))
        new, self._retries = retries - self._retries, retries
        return {"mem_peak_bytes": torch.cuda.max_memory_allocated(self.device),
                "mem_reserved_bytes": torch.cuda.max_memory_reserved(self.device), "alloc_retries": new}


class Meter:
    """Loss, grad norm and throughput since the last log line; the loss stays on the device
    until it is read, so logging does not force a GPU sync every step."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.grad_norm: torch.Tensor | float | None = None
        self.steps = self.samples = self.tokens = self.enc_tokens = self.trained = 0
        self.since = time.monotonic()

    def add(self, item: dict[str, Any], grad_norm: torch.Tensor | float) -> None:
        self.steps += 1
        self.samples += item["size"]
        self.tokens += item["n_tokens"]
        self.enc_tokens += item["n_enc"]
        self.trained += item["n_target"]
        self.grad_norm = grad_norm

    def read(self, world: int) -> tuple[float, float | None, dict[str, float]]:
        """(mean step loss, last grad norm, rates) over the interval; a collective when world > 1."""
        loss = self.loss
        if world > 1:
            dist.all_reduce(loss)
        now = time.monotonic()
        seconds = max(1e-9, now - self.since)
        rates = {"samples": round(self.samples / seconds, 3), "tokens": round(self.tokens / seconds, 1),
                 "enc_tokens": self.enc_tokens / seconds, "dec_tokens": (self.tokens - self.enc_tokens) / seconds,
                 "trained_tokens": self.trained / seconds, "seconds": seconds, "steps": self.steps}
        mean = float(loss.item()) / max(1, self.steps)
        norm = None if self.grad_norm is None else float(self.grad_norm)
        self.loss = torch.zeros_like(self.loss)
        self.steps = self.samples = self.tokens = self.enc_tokens = self.trained = 0
        self.since = now
        return round(mean, 6), None if norm is None else round(norm, 6), rates


def gpu_uuid(device: torch.device) -> str | None:
    """NVML's spelling of the GPU's UUID ("GPU-xxxxxxxx-..."), so the supervisor can match it."""
    if device.type != "cuda":
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Per-rank random state from (seed, step, rank): the same at any world size or attempt."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63)


def _evaluate(model: Any, eval_data: data.Tokenized, batch: int, me: Rank, pad_id: int, decoder_start: int | None,
              device: torch.device, log: EventLog, step: int) -> None:
    """Mean token loss over the eval set, each rank taking every world-th row. Runs on the
    unwrapped model: ranks may make different numbers of passes, so no DDP collective."""
    import numpy as np

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = np.arange(me.rank, eval_data.n, me.world)
    # Compiled layers stay out of it: an evaluation graph would be a second compile for a few batches.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for i in range(0, len(mine), batch):
            part = mine[i:i + batch]
            micro = {k: v.to(device) for k, v in data.collate(eval_data, part, pad_id).items()}
            total[0] += token_loss_sum(model, micro, decoder_start).double()
            total[1] += int(eval_data.n_target[part].sum())
    if me.world > 1:
        dist.all_reduce(total)
    model.train()
    if me.rank == 0:
        loss_sum, count = total.tolist()
        log.emit("eval", step=step, loss=round(loss_sum / max(1.0, count), 6), samples=eval_data.n)


def prepare_data(run: RunDir, cfg: RunConfig, expected_fingerprint: str, me: Rank, phase: Callable[..., None],
                 expected_chat: dict[str, Any] | None = None
                 ) -> tuple[Any, data.Tokenized, data.Tokenized | None, chat.ChatFormat]:
    """The tokenizer and the tokenized train (and eval) data, for training and the memory probe.

    Rank 0 checks that the data file is the one the run started with (its hash), builds what is
    missing (the preset's character tokenizer under RUN_DIR/tokenizer, the cache under
    RUN_DIR/cache) and then writes a ready marker for this attempt; the other ranks wait for
    it. The rows are not validated again: the CLI did (rows.scan), and tokenizing still names
    a bad row and counts the skipped ones. ``phase(name, progress)`` reports the tokenizing.
    The chat format is resolved as at the run's start (``expected_chat``, run.json's): a chat
    template that changed since is refused like changed data."""
    # Named by the attempt and its rendezvous port: never a marker left by an earlier launch.
    ready = run.cache / f"ready-attempt-{me.attempt}-{os.environ.get('MASTER_PORT', '0')}.json"
    seq2seq = is_seq2seq(cfg.model)
    tok_dir = run.path / "tokenizer" if models.is_preset(cfg.model) else Path(cfg.model)
    if me.rank != 0:
        while not ready.exists():
            time.sleep(0.1)
        keys = json.loads(ready.read_text())
        tok = models.load_tokenizer(tok_dir, preset=models.is_preset(cfg.model))
        train_data = data.Tokenized.open(run.cache / keys["train"])
        return (tok, train_data, data.Tokenized.open(run.cache / keys["eval"]) if keys["eval"] else None,
                chat_format(cfg, tok))

    run.cache.mkdir(exist_ok=True)
    found = rows.fingerprint(cfg.data)
    if found != expected_fingerprint:
        raise ConfigError(f"--data: {cfg.data} changed since the run started (sha256 {found[:12]}, "
                          f"run.json has {expected_fingerprint[:12]})")
    if models.is_preset(cfg.model) and not tok_dir.exists():
        models.build_char_tokenizer(rows.char_counts(cfg.data, cfg.skip_bad_rows), tok_dir, models.max_vocab(cfg.model))
    tok = models.load_tokenizer(tok_dir, preset=models.is_preset(cfg.model))
    tok_fp = models.tokenizer_fingerprint(tok)
    fmt = chat_format(cfg, tok)
    if expected_chat is not None and expected_chat.get("sha256") != fmt.sha256:
        raise ConfigError(f"--chat-template: the chat template changed since the run started "
                          f"({fmt.describe()}; run.json has {expected_chat.get('kind')} "
                          f"{(expected_chat.get('sha256') or '')[:12]})")
    template = fmt.template if fmt.kind == "template" else None
    keys: dict[str, str | None] = {"eval": None}
    last_beat = [0.0]

    def progress(fraction: float) -> None:
        if time.monotonic() - last_beat[0] > 1.0 or fraction >= 1.0:
            last_beat[0] = time.monotonic()
            phase("tokenizing", round(fraction, 4))

    out: list[data.Tokenized | None] = []
    for name, path, fp in (("train", cfg.data, found), ("eval", cfg.eval_data, None)):
        if path is None:
            out.append(None)
            continue
        fp = fp or rows.fingerprint(path)
        key = data.cache_key(fp, tok_fp, cfg.max_len, seq2seq, cfg.skip_bad_rows, fmt.sha256)
        directory = run.cache / key
        if not directory.exists():
            phase("tokenizing", 0.0)
            data.tokenize_to_cache(path, tok, cfg.max_len, seq2seq, cfg.skip_bad_rows, directory,
                                   progress if name == "train" else (lambda f: None), template)
        keys[name] = key
        out.append(data.Tokenized.open(directory))
    write_json_atomic(ready, keys)
    return tok, out[0], out[1], fmt


def chat_format(cfg: RunConfig, tok: Any) -> chat.ChatFormat:
    """How this run renders rows: a preset's character tokenizer has no template."""
    if models.is_preset(cfg.model):
        return chat.ChatFormat("none" if cfg.chat_template == "none" else "builtin")
    return chat.resolve(cfg.chat_template, tok)
