"""The model's RMS norms through ``torch.nn.functional.rms_norm``: a converter of the model's
training form, as LoRA is (adapters.py); the weights, their names and ``final/`` do not change.

Eager, a small model's step is bound by the host launching kernels, not by the GPU: a profile of
the Qwen2.5-0.5B shape at batch 16 on an H200 had the GPU busy 70 ms of a step of about 130
(docs/BENCHMARKS.md). Transformers' RMS norm is written out as separate tensor operations — a
power, a mean, an addition, a reciprocal square root and two products forward, about twice as
many backward — each its own kernel, for each of the 2 × layers + 1 norms of a causal LM.
``rms_norm`` is one operation, which torch runs as a fused kernel on a GPU (and as those same
operations on the CPU).

A norm is converted only when its own forward agrees with ``rms_norm`` on a random input and a
random weight (``agrees``), tried once per class: a norm that computes anything else (Gemma's
``1 + weight``, a centred LayerNorm) keeps its forward.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPS_NAMES = ("variance_epsilon", "eps")


def fuse_rms_norms(model: nn.Module) -> int:
    """Points the forward of every RMS norm of ``model`` that ``rms_norm`` reproduces at
    ``rms_norm``; returns how many were converted."""
    verdicts: dict[type, bool] = {}
    converted = 0
    for module in model.modules():
        eps = norm_eps(module)
        if eps is None:
            continue
        kind = type(module)
        if kind not in verdicts:
            verdicts[kind] = agrees(module, eps)
        if verdicts[kind]:
            module.forward = partial(_rms_norm, module, eps, module.forward)
            converted += 1
    return converted


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a module that looks like an RMS norm: a leaf named *Norm* whose one
    parameter is a 1-D ``weight``, with a float epsilon; None for anything else."""
    if "Norm" not in type(module).__name__ or next(module.children(), None) is not None:
        return None
    params = dict(module.named_parameters(recurse=False))
    if list(params) != ["weight"] or params["weight"].dim() != 1 or list(module.buffers(recurse=False)):
        return None
    return next((getattr(module, name) for name in EPS_NAMES if isinstance(getattr(module, name, None), float)), None)


def agrees(module: nn.Module, eps: float) -> bool:
    """Whether ``module``'s own forward equals ``rms_norm`` (input and weight random, float32)."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(weight.device)
    w = torch.randn(weight.shape[0], generator=gen).to(weight.device)
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            own = torch.func.functional_call(module, {"weight": w}, (x,))
            fused = F.rms_norm(x, (weight.shape[0],), w, eps)
    except Exception:  # noqa: BLE001 - a norm that cannot be tried keeps its forward
        return False
    return own.shape == fused.shape and torch.allclose(own.float(), fused, rtol=1e-4, atol=1e-5)


def _rms_norm(module: nn.Module, eps: float, own: Callable[[torch.Tensor], torch.Tensor],
              hidden_states: torch.Tensor) -> torch.Tensor:
    """The converted forward. An input whose dtype is not the weight's (Qwen3's query and key
    norms under autocast: bf16 projections, a float32 weight) takes the norm's own forward:
    ``rms_norm`` has no fused kernel for it and would return the input's dtype, not the
    weight's."""
    weight = module.weight
    if hidden_states.dtype != weight.dtype:
        return own(hidden_states)
    return F.rms_norm(hidden_states, (weight.shape[0],), weight, eps)
