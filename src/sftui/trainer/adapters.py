"""Model converters (torchtitan's word): what turns the loaded base model into the model a run
trains. One converter today, LoRA through peft: the base frozen (bf16 on a GPU, no float32
copy), low-rank adapters on its linear layers in float32, and the few tensors a checkpoint then
holds. The worker and the memory probe convert alike (``loop.new_model``), so the probe measures
what training reserves.

A LoRA run's ``net`` is a ``peft.PeftModel``; ``inner`` is the Hugging Face model inside it, which
the loss (``loss.TrainingModel``) runs. Only peft APIs of 0.13 and older are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sftui.config import RunConfig
from sftui.runfile import EMBEDDING_NAMES, check_targets, lora_record, target_matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Lora:
    """A run's LoRA settings, as run.json's ``lora`` and a checkpoint's state.json record them."""

    r: int
    alpha: float
    dropout: float
    targets: list[str] | None  # module-name suffixes; None: every linear layer of the blocks

    @classmethod
    def of(cls, cfg: RunConfig) -> "Lora | None":
        record = lora_record(cfg)
        return None if record is None else cls(**record)


def base_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The dtype the base is loaded in: bf16 when it is frozen on a GPU that has it (LoRA: no
    float32 copy is ever made), else float32 (full fine-tuning keeps float32 master weights;
    the CPU path trains in float32)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cfg.lora and cuda_bf16 else torch.float32


def target_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The full names of the linear layers LoRA wraps: those of the transformer blocks (never
    the LM head nor an embedding) whose name ends in one of ``targets`` (all of them when None).
    ConfigError when a target matches none."""
    head = model.get_output_embeddings()
    linears = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and not any(e in name for e in EMBEDDING_NAMES)]
    if targets is None:
        return linears
    check_targets(targets, linears, "the model")
    return [name for name in linears if any(target_matches(name, t) for t in targets)]


def apply_lora(model: "PreTrainedModel", lora: Lora) -> Any:
    """The base frozen, adapters on its target layers in float32: a ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    names = target_modules(model, lora.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names,
                        bias="none", task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    net = get_peft_model(model, config)
    for p in net.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # older peft creates adapters in the base layer's dtype
    return net


def inner(net: Any) -> "PreTrainedModel":
    """The Hugging Face model itself: inside a PeftModel, or the net when it is one."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a LoRA checkpoint holds: the trainable ones, by their names in ``net``."""
    return {name: p.detach().contiguous() for name, p in net.named_parameters() if p.requires_grad}


def load_trainable(net: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy a checkpoint's trainable tensors into ``net``; the names that do not fit (missing,
    unexpected or of another shape), empty when all fit."""
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    wrong = sorted(set(params) ^ set(tensors))
    wrong += [n for n in params.keys() & tensors.keys() if params[n].shape != tensors[n].shape]
    if wrong:
        return wrong
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return []


def parameter_counts(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, for the first log lines and the header."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in net.parameters())


def save_final(net: Any, tok: "PreTrainedTokenizerBase", final_dir: Path, merge: bool) -> None:
    """``final/``: the adapter in peft's ``save_pretrained`` form and the tokenizer (with its
    chat template); with ``merge`` also ``merged/``: the adapters folded into the base, in bf16,
    a plain Hugging Face model directory (with the tokenizer) that loads without peft. The merge
    is done in place: this is the run's last act, its final checkpoint is already written."""
    from transformers.utils import logging

    from sftui.rundir import fresh_dir

    logging.disable_progress_bar()
    with fresh_dir(final_dir, replace=True) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if merge:
            merged = net.merge_and_unload().to(torch.bfloat16)
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tok.save_pretrained(tmp / "merged")
