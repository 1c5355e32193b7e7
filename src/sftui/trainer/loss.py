"""The language-model head and cross-entropy over the trained positions only, in chunks.

A causal LM's forward computes logits for every position — padding and prompt included — and
the loss then copied them all to float32: at batch 16 × 512 × a 151,936-token vocabulary that is
5 GB in float32 alone, plus its gradient, for a loss that only reads the response positions. Here
the model runs up to its last hidden state; the head runs on the positions that are trained, a
chunk at a time, each chunk's float32 logits recomputed in the backward pass instead of kept
(activation checkpointing), so at most one chunk of logits is alive. The loss is the same sum.

``TrainingModel`` wraps the model so that DDP (through accelerate) still sees one forward per
micro-batch; ``bare`` is the model itself (checkpoints, ``final/``, evaluation): a LoRA run's
PeftModel, whose Hugging Face model inside (``adapters.inner``) is what the forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 512 * 1024**2  # float32 logits of one chunk


def plain_head(model: Any) -> nn.Linear | None:
    """The model's output projection when its logits are that projection of the last hidden
    state and nothing more (Llama, Qwen2/3, Mistral); None for models that scale or cap logits
    (Gemma's soft-capping, Cohere's scale) or are not causal LMs: those keep their own forward."""
    config = model.config
    if config.is_encoder_decoder or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = model.get_output_embeddings()
    base = getattr(model, model.base_model_prefix, None)
    return head if isinstance(head, nn.Linear) and isinstance(base, nn.Module) else None


def chunk_rows(vocab: int) -> int:
    """Trained positions per chunk: CHUNK_BYTES of float32 logits, at least 128."""
    return max(128, CHUNK_BYTES // (4 * vocab))


def _ce_sum(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@torch.compiler.disable
def head_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                  trained: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the cross-entropy of ``head(hidden)`` against ``labels`` at the positions whose
    label is not -100 (``labels`` already aligned with ``hidden``: shifted for a causal LM).
    ``trained``: those positions in the flattened (row, position) order, found on the host
    (``trained_positions``) so that selecting them needs no GPU-to-host sync.

    Never compiled (``--compile`` compiles the body up to here): the chunk loop runs once per
    chunk of trained positions, a count that changes every step, and dynamo would specialise
    on it and recompile at every step. The head is a matmul and a cross-entropy, kernels that
    compiling gains little on."""
    if trained is None:
        keep = labels != -100
        h, y = hidden[keep], labels[keep]
    else:
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained)
        y = labels.reshape(-1).index_select(0, trained)
    if h.shape[0] == 0:
        # No trained position (a padding row of a short last step): a zero that still reaches the
        # hidden states and the head, so that autograd and DDP see every parameter used.
        return (hidden.float().sum() + head.weight.float().sum()) * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    step = chunk_rows(head.out_features)
    for start in range(0, h.shape[0], step):
        part = (h[start:start + step], y[start:start + step], head.weight, head.bias)
        total = total + (checkpoint(_ce_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(*part))
    return total


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flattened positions a causal LM is trained on (labels shifted by one), from labels
    still on the host: the index travels with the batch, and the loss never waits for the GPU
    to count them (at small batches the step is bound by the host launching kernels)."""
    return (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)


class TrainingModel(nn.Module):
    """The model in its training form: ``forward(input_ids, labels, ...)`` returns the token-loss
    sum of the micro-batch, through the chunked head where the model has a plain one.

    Padded rows come with their ``attention_mask``; a packed row (trainer/batching.py) with
    ``position_ids`` and no mask, so that transformers builds the block-diagonal mask from
    where the positions restart, and its boundaries (``cu_seqlens``, ``max_seqlen``), which
    reach the attention only where it takes them (``batching.BOUNDED``)."""

    def __init__(self, model: Any):
        from sftui.trainer.adapters import inner

        super().__init__()
        self.bare = model
        # The Hugging Face model and its head are the bare model's own modules: kept out of this
        # wrapper's children, so that no weight is listed twice (state dicts, DDP's buckets).
        self.__dict__["net"] = inner(model)
        self.__dict__["head"] = plain_head(self.net)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                trained: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        from sftui.trainer import batching

        inputs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None:
                inputs[name] = value
        if cu_seqlens is not None and self.net.config._attn_implementation in batching.BOUNDED:
            inputs.update(batching.varlen_kwargs({"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}))
        if self.head is None:
            extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
            logits = self.net(**inputs, **extra).logits
            if decoder_input_ids is None:
                logits, labels = logits[:, :-1], labels[:, 1:]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        base = getattr(self.net, self.net.base_model_prefix)
        hidden = base(**inputs).last_hidden_state
        return head_loss_sum(hidden[:, :-1], labels[:, 1:], self.head, trained)
