"""Model FLOPs utilisation (MFU), as DESIGN.md defines it: achieved FLOP/s ÷ the cards' datasheet
dense bf16 peak. Achieved FLOPs count non-padding tokens only, encoder and decoder tokens each
through their own half of the model: 6 × the matmul parameters a token passes through (forward
and backward), plus attention. The worker's ``step`` events and the benchmark scripts use it.
"""

from __future__ import annotations

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


def flops_per_token(model: Any, seq2seq: bool) -> tuple[float, float]:
    """Training FLOPs per (encoder, decoder) token without attention: 6 × the matmul parameters
    the token passes through. Embedding lookups are no matmuls and do not count; a tied LM head
    (the embedding matrix) does, on the decoder side."""
    enc = dec = 0
    for name, p in model.named_parameters():
        if "embed" in name or name.startswith("shared"):
            continue
        if seq2seq and name.startswith("encoder."):
            enc += p.numel()
        else:
            dec += p.numel()
    if getattr(model.config, "tie_word_embeddings", False):
        dec += model.get_input_embeddings().weight.numel()
    return 6.0 * enc, 6.0 * dec


def mfu(rates: dict[str, float], enc_fpt: float, dec_fpt: float, config: Any, peak: float | None,
        world: int) -> float | None:
    """Achieved FLOP/s over ``world`` cards' peak; None without a known peak (the CPU).

    ``rates``: per second, ``samples`` and the non-padding ``enc_tokens`` and ``dec_tokens``;
    ``enc_fpt``/``dec_fpt`` from ``flops_per_token``. Attention adds 12 × layers × width per
    token, over a sample's average context (its tokens).
    """
    if not peak:
        return None
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    tokens = rates["enc_tokens"] + rates["dec_tokens"]
    attention = 12.0 * layers * width * (tokens / max(1e-9, rates["samples"]))
    flops = enc_fpt * rates["enc_tokens"] + dec_fpt * rates["dec_tokens"] + attention * tokens
    return round(flops / (peak * 1e12 * world), 4)
