"""The language-model head and cross-entropy over the trained positions only, in chunks.

A causal LM's forward computes logits for every position — padding and prompt included — and
the loss then copied them all to float32: at batch 16 × 512 × a 151,936-token vocabulary that is
5 GB in float32 alone, plus its gradient, for a loss that only reads the response positions. Here
the model runs up to its last hidden state (a T5's decoder's, scaled as its own forward scales it
before the head); the head runs on the positions that are trained, a chunk at a time, so at most
one chunk of logits is alive. The loss is the same sum.

Each chunk's gradient (softmax − one-hot, w.r.t. its logits) is taken in the forward, while its
logits exist, and turned at once into the gradients of the hidden rows, the head weight and its
bias (a fused linear cross-entropy, as Liger-Kernel's, in plain torch); the backward only scales
them. Recomputing the logits in the backward instead (activation checkpointing, as this did
before) cost a second head matmul and float32 pass per chunk: a few % of a step at a 151,936
vocabulary. The price: the head's float32 weight gradient is held from the forward to the
backward (frozen heads, LoRA's, have none).

``TrainingModel`` wraps the model so that DDP (through accelerate) still sees one forward per
micro-batch; ``bare`` is the model itself (checkpoints, ``final/``, evaluation): a LoRA run's
PeftModel, whose Hugging Face model inside (``adapters.inner``) is what the forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 512 * 1024**2  # float32 logits of one chunk
# The head's rows (the vocabulary) are padded to a multiple of this for its matmuls: a logits row
# of 29,298 (chatlm-mini's vocabulary) is 2-byte aligned, and cuBLAS then takes a slow kernel.
VOCAB_ALIGN = 64


def plain_head(model: Any) -> nn.Linear | None:
    """The model's output projection when its logits are that projection of the last hidden
    state and nothing more: Llama, Qwen2/3, Mistral, and the T5 family (its decoder's output,
    maybe scaled first: ``decoder_scale``); None for models that scale or cap logits (Gemma's
    soft-capping, Cohere's scale) and for other encoder-decoders (BART adds a
    ``final_logits_bias``): those keep their own forward."""
    from sftui.config import RELATIVE_POSITION_SEQ2SEQ

    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = model.get_output_embeddings()
    if config.is_encoder_decoder:
        plain = config.model_type in RELATIVE_POSITION_SEQ2SEQ
    else:
        plain = isinstance(getattr(model, model.base_model_prefix, None), nn.Module)
    return head if isinstance(head, nn.Linear) and plain else None


def decoder_states(model: Any, inputs: dict[str, Any], decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder's last decoder states, as its forward computes them before the head: the
    encoder's run here unless ``inputs`` bring it (``encoder_outputs``: packed rows), and
    ``inputs``' ``attention_mask`` masks the encoder (when it runs here) and the cross-attention."""
    encoded = inputs.get("encoder_outputs")
    if encoded is None:
        encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    return model.get_decoder()(
        input_ids=decoder_input_ids, attention_mask=inputs.get("decoder_attention_mask"),
        encoder_hidden_states=encoded[0], encoder_attention_mask=inputs.get("attention_mask"), use_cache=False)[0]


def decoder_scale(model: Any) -> float | None:
    """What an encoder-decoder's own forward multiplies its decoder states by before the head,
    found by running it once on two tokens (in eval mode, under no_grad: no dropout, no random
    number drawn): d_model^-0.5 or 1. transformers' T5 scales with tied embeddings (5.x reads
    ``scale_decoder_outputs``, 4.x ``tie_word_embeddings``) and its mT5 of 5.24 does not, whatever
    its config says: a flag read here would be wrong for one of them. None when neither scale
    gives the model's logits (or they are all zero): the model keeps its own forward."""
    config = model.config
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device)
    start = torch.tensor([[getattr(config, "decoder_start_token_id", None) or 0]], device=device)
    head = model.get_output_embeddings()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids, decoder_input_ids=start, use_cache=False).logits[0, -1].float()
            states = decoder_states(model, {"input_ids": ids}, start)[0, -1]
            bound = 0.02 * want.abs().max().item()
            for scale in (config.d_model ** -0.5, 1.0):
                got = F.linear(states * scale, head.weight, head.bias).float()  # as the chunked head computes
                if bound > 0 and (got - want).abs().max().item() <= bound:
                    return scale
    finally:
        model.train(training)
    return None


def chunk_rows(vocab: int) -> int:
    """Trained positions per chunk: CHUNK_BYTES of float32 logits, at least 128."""
    return max(128, CHUNK_BYTES // (4 * vocab))


def _head_loss(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               grads: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                       torch.Tensor | None]:
    """The cross-entropy sum of ``F.linear(h, weight, bias)`` against ``y`` a chunk at a time, and
    the gradients of that sum w.r.t. (h, weight, bias) that ``grads`` asks for, taken from each
    chunk's logits while they are alive (softmax − one-hot). The logits are in the dtype F.linear
    would give under the ambient autocast (bf16 on a GPU), their log-softmax in float32.

    Few passes over a chunk's logits (rows × vocabulary, the largest tensors of a small model's
    step): a ``log_softmax`` in float32 (for bf16 logits torch first takes a float32 copy), an
    ``exp_`` in place and one cast to the gradient's dtype, where a float32 copy, a log-sum-exp
    (a max, a temporary, an exp and a sum), a subtraction and an exp went before: the head's
    forward and backward at a Qwen2.5-0.5B shape's batch 16 took 9.0 ms against 11.1 (H200,
    scripts/bench_head_loss.py, docs/BENCHMARKS.md)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    hc = h.to(dtype)  # cast once, not per chunk
    w, b = _aligned(weight, bias, dtype)
    grad_h = torch.empty_like(h, dtype=torch.float32) if grads[0] else None
    grad_w = grad_b = None  # float32 sums begun by the first chunk (head_loss_sum: h has rows)
    total = h.new_zeros((), dtype=torch.float32)
    step, vocab = chunk_rows(w.shape[0]), weight.shape[0]
    for start in range(0, h.shape[0], step):
        rows, target = hc[start:start + step], y[start:start + step, None]
        logp = torch.log_softmax(F.linear(rows, w, b), -1, dtype=torch.float32)
        # The labels index the real vocabulary (a label past it fails there, as without the padding).
        total = total - logp[:, :vocab].gather(1, target).sum()
        if not any(grads):
            continue
        probs = logp.exp_()
        probs[:, :vocab].scatter_add_(1, target, torch.full_like(target, -1.0, dtype=torch.float32))
        if grads[2]:  # False without a bias
            grad_b = probs.sum(0) if grad_b is None else grad_b.add_(probs.sum(0))
        g = probs.to(dtype)
        del logp, probs  # the chunk's float32 tensor, freed before its matmuls (it was alive into the next chunk)
        if grad_h is not None:
            grad_h[start:start + step] = g @ w
        if grads[1]:
            grad_w = (g.T @ rows).float() if grad_w is None else grad_w.add_(g.T @ rows)
    # The aligned rows' gradients are zeros: cut off.
    return (total, grad_h, None if grad_w is None else grad_w[:vocab],
            None if grad_b is None else grad_b[:vocab])


def _aligned(weight: torch.Tensor, bias: torch.Tensor | None,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in ``dtype``, their rows padded to a multiple of VOCAB_ALIGN:
    zero weights and a bias of -inf, so that the padded logits are -inf, their probabilities 0,
    and no loss or gradient changes. A float32 weight under autocast is cast per step anyway and
    the padding rides on that copy; a weight already in ``dtype`` (a bf16 LoRA base) is copied
    once more per step. On an H200 the weight-gradient matmul of chatlm-mini's 29,298-token head took 7.9 ms
    a step in a 2-byte-aligned cuBLAS kernel (batch 256 packed, 2026-12-02, docs/BENCHMARKS.md)."""
    extra = -weight.shape[0] % VOCAB_ALIGN
    b = None if bias is None else bias.to(dtype)
    if not extra:
        return weight.to(dtype), b
    b = weight.new_zeros(weight.shape[0], dtype=dtype) if b is None else b
    return F.pad(weight.to(dtype), (0, 0, 0, extra)), F.pad(b, (0, extra), value=float("-inf"))


class _FusedHeadLoss(torch.autograd.Function):
    """The head's cross-entropy sum whose gradients are computed in the forward, chunk by chunk
    (Liger-Kernel's fused linear cross-entropy, in plain torch): no chunk's logits outlive it and
    none is recomputed; the backward only scales the saved gradients by its incoming one."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        need = ctx.needs_input_grad
        total, *grads = _head_loss(h, y, weight, bias, (need[0], need[2], need[3]))
        ctx.save_for_backward(*grads)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Scaled in float32 and in place (no second copy of the head's gradient while the backward's
        # activations are alive; a second backward through this graph is refused), then rounded once.
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_out).to(dtype)
                                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return grad_h, None, grad_w, grad_b


@torch.compiler.disable
def head_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                  trained: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the cross-entropy of ``head(hidden)`` against ``labels`` at the positions whose
    label is not -100 (``labels`` already aligned with ``hidden``: shifted for a causal LM).
    ``trained``: those positions in the flattened (row, position) order, found on the host
    (``trained_positions``) so that selecting them needs no GPU-to-host sync.

    Never compiled (``--compile`` compiles ``TrainingModel.body``, the part before it; the
    decorator keeps it eager in a model compiled whole): the chunk loop runs once per chunk of
    trained positions, a count that changes every step, and dynamo would specialise on it and
    recompile at every step. The head is a matmul and a cross-entropy, kernels that
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
    if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return _FusedHeadLoss.apply(h, y, head.weight, head.bias)
    return _head_loss(h, y, head.weight, head.bias, (False, False, False))[0]


def trained_positions(labels: torch.Tensor, *, shifted: bool) -> torch.Tensor:
    """The flattened positions a model is trained on (a causal LM's labels ``shifted`` by one,
    an encoder-decoder's as they are), from labels still on the host: the index travels with the
    batch, and the loss never waits for the GPU to count them (at small batches the step is
    bound by the host launching kernels)."""
    return ((labels[:, 1:] if shifted else labels) != -100).reshape(-1).nonzero().squeeze(1)


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
        head = plain_head(self.net)
        # None: a T5-family model whose forward scales by neither candidate keeps its own (loop warns).
        self.scale = decoder_scale(self.net) if head is not None and self.net.config.is_encoder_decoder else 1.0
        self.__dict__["head"] = None if self.scale is None else head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                trained: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, encoder_sample: torch.Tensor | None = None,
                decoder_sample: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(input_ids, labels, attention_mask, position_ids, decoder_input_ids, cu_seqlens, max_seqlen,
                        encoder_sample, decoder_sample)
        if self.head is None:
            return out
        return head_loss_sum(out, labels if decoder_input_ids is not None else labels[:, 1:], self.head, trained)

    def body(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, decoder_input_ids: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None, max_seqlen: int | None, encoder_sample: torch.Tensor | None,
             decoder_sample: torch.Tensor | None) -> torch.Tensor:
        """The part ``--compile`` compiles (``compile``): the states the head takes, aligned with
        the labels it is given (a causal LM's last position dropped, a T5's decoder states
        scaled as its forward scales them), or, for a model without a plain head, its own loss sum."""
        from sftui.trainer import batching

        inputs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None:
                inputs[name] = value
        if cu_seqlens is not None and self.net.config._attn_implementation in batching.BOUNDED:
            inputs.update(batching.varlen_kwargs({"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}))
        if encoder_sample is not None and decoder_sample is not None:
            # Packed encoder-decoder rows (batching.RowPacking): the model's forward hands one mask
            # to the encoder and the cross-attention alike, so the encoder runs first, alone; the
            # forward then passes its ``attention_mask`` to the cross-attention only.
            masks = batching.row_masks(encoder_sample, decoder_sample)
            encoded = self.net.get_encoder()(input_ids=input_ids, attention_mask=masks["attention_mask"])
            inputs = {"encoder_outputs": encoded, "attention_mask": masks["cross_attention_mask"],
                      "decoder_attention_mask": masks["decoder_attention_mask"], "use_cache": False}
        if self.head is None:
            extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
            logits = self.net(**inputs, **extra).logits
            if decoder_input_ids is None:
                logits, labels = logits[:, :-1], labels[:, 1:]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        if decoder_input_ids is not None:
            states = decoder_states(self.net, inputs, decoder_input_ids)
            return states if self.scale == 1.0 else states * self.scale
        base = getattr(self.net, self.net.base_model_prefix)
        return base(**inputs).last_hidden_state[:, :-1]

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``Module.compile`` (torch.compile in place, its arguments), of ``body`` alone: the head's
        loss runs its chunk loop a number of times that changes every step and stays eager. Compiled
        whole, the model met that loop as a graph break, and dynamo traced the model twice (its
        first pass stops at a break and starts over to compile what comes before it): 16.1 s of
        tracing against 9.8 s with the loss inside the graph, a small T5 on the CPU (2026-12-02); a
        compiled chatlm-mini's first step after an OOM took 29.4 s from a warm cache, against 10.1 s
        for the body alone (H200, docs/BENCHMARKS.md). Called inside DDP's forward, the body
        still gets dynamo's DDP optimizer (it looks for the active DDP module)."""
        self.body = torch.compile(self.body, *args, **kwargs)
