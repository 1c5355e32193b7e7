"""Model FLOPs utilisation (MFU), as DESIGN.md defines it: achieved FLOP/s ÷ the cards' datasheet
dense bf16 peak. Achieved FLOPs count non-padding tokens only, encoder and decoder tokens each
through their own half of the model: 6 × the trained and 4 × the frozen (LoRA's base) matmul
parameters a token passes through (forward and backward), the LM head only on the positions it
runs on, plus attention (``attention_flops``). The worker's ``step`` events and the benchmark scripts use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense bf16 datasheet peaks (TFLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
               ("L40S", 362.0), ("L40", 181.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A10G", 70.0),
               ("A6000", 155.0), ("L4", 121.0), ("V100", 125.0))


def peak_tflops(cuda: bool) -> float | None:
    """This process's card's dense bf16 peak from ``PEAK_TFLOPS``; None on the CPU or for a card
    not in the table (``--peak-tflops`` gives it)."""
    if not cuda:
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@dataclass(frozen=True)
class TokenFlops:
    """Training FLOPs per token through each part of the model, without attention: ``enc`` per
    encoder token, ``dec`` per decoder token (a causal LM's every token), ``head`` per token the
    LM head runs on (``head_on_trained``: only the trained positions, as loss.py's chunked head;
    else every decoder token)."""

    enc: float
    dec: float
    head: float
    head_on_trained: bool


def flops_per_token(model: Any, seq2seq: bool) -> TokenFlops:
    """6 × the trained matmul parameters a token passes through (forward 2, activation gradient
    2, weight gradient 2) plus 4 × the frozen ones (a LoRA base: its weight gradient is never
    computed, the activation gradient still flows through it). Embedding lookups are no matmuls
    and do not count; the LM head (a tied one is the embedding matrix) is counted apart."""
    from sftui.trainer.adapters import inner
    from sftui.trainer.loss import plain_head

    net = inner(model)
    head = net.get_output_embeddings()
    enc = dec = 0.0
    for name, p in net.named_parameters():
        if "embed" in name or name.startswith("shared") or p is head.weight:
            continue
        cost = (6.0 if p.requires_grad else 4.0) * p.numel()
        if seq2seq and name.startswith("encoder."):
            enc += cost
        else:
            dec += cost
    head_cost = (6.0 if head.weight.requires_grad else 4.0) * head.weight.numel()
    return TokenFlops(enc, dec, head_cost, plain_head(net) is not None)


def mfu(rates: dict[str, float], fpt: TokenFlops, config: Any, peak: float | None, world: int) -> float | None:
    """Achieved FLOP/s over ``world`` cards' peak; None without a known peak (the CPU).

    ``rates``: per second, ``samples``, the non-padding ``enc_tokens`` and ``dec_tokens``, and the
    ``trained_tokens`` (the positions the loss reads); ``fpt`` from ``flops_per_token``.
    """
    if not peak:
        return None
    head_tokens = rates["trained_tokens"] if fpt.head_on_trained else rates["dec_tokens"]
    flops = (fpt.enc * rates["enc_tokens"] + fpt.dec * rates["dec_tokens"] + fpt.head * head_tokens
             + attention_flops(rates, config))
    return round(flops / (peak * 1e12 * world), 4)


def attention_flops(rates: dict[str, float], config: Any) -> float:
    """Attention's FLOP/s: 12 × width per query token and key it attends to (scores and the
    weighted sum, forward and backward), over a sample's average length on each side. A causal
    LM's every layer attends over its sample; an encoder-decoder's encoder layers over the input,
    its decoder layers over the target and, in the cross-attention, the input (counting both
    sides as one context, as before 2026-12-02, overstated a T5's by about 1 % of its FLOPs)."""
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    samples = max(1e-9, rates["samples"])
    enc, dec = rates["enc_tokens"], rates["dec_tokens"]
    if not enc:
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0)
        return 12.0 * width * layers * dec * dec / samples
    enc_layers = getattr(config, "num_layers", None) or getattr(config, "encoder_layers", 0)
    dec_layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or enc_layers
    return 12.0 * width * (enc_layers * enc * enc + dec_layers * dec * (dec + enc)) / samples
