"""The model's RMS norms through ``torch.nn.functional.rms_norm``: a converter of the model's
training form, as LoRA is (adapters.py); the weights, their names and ``final/`` do not change.

Eager, a small model's step is bound by the host launching kernels, not by the GPU: a profile of
the Qwen2.5-0.5B shape at batch 16 on an H200 ran 66 ms of kernels per step of a loop that took 155
(docs/BENCHMARKS.md). Transformers' RMS norm is written out as separate tensor operations — a
power, a mean, an addition, a reciprocal square root and two products forward, more backward —
each its own kernel, for each of the 2 × layers + 1 norms of a causal LM. ``rms_norm`` is one
operation, which torch runs as a fused kernel on a GPU (and as those same operations on the
CPU).

A norm is converted only when its forward takes the hidden states alone and agrees with
``rms_norm`` on a random input and a random weight (``agrees``), tried once per class: a norm
that computes anything else (Gemma's ``1 + weight``, a gated norm, a centred LayerNorm) keeps its
forward. Where ``rms_norm`` would return another dtype than the norm (a bf16 LoRA base under
autocast), the call goes to the norm's own forward: a full fine-tune's (float32) norms are the
ones converted.
"""

from __future__ import annotations

import inspect
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
    """The epsilon of a module that looks like an RMS norm: a leaf named *Norm* whose forward
    takes the hidden states alone (a gated norm's ``forward(hidden_states, gate=None)`` would be
    called with its gate), whose one parameter is a 1-D ``weight``, with a float epsilon; None
    for anything else."""
    if "Norm" not in type(module).__name__ or next(module.children(), None) is not None:
        return None
    if len(inspect.signature(type(module).forward).parameters) != 2:  # self, hidden_states
        return None
    params = dict(module.named_parameters(recurse=False))
    if list(params) != ["weight"] or params["weight"].dim() != 1 or list(module.buffers(recurse=False)):
        return None
    return next((getattr(module, name) for name in EPS_NAMES if isinstance(getattr(module, name, None), float)), None)


def agrees(module: nn.Module, eps: float) -> bool:
    """Whether ``module``'s own forward equals ``rms_norm`` (input and weight random, float32):
    rows of unit scale, and rows of 1e-3, whose mean square is near epsilon, so that a norm using
    its epsilon otherwise (outside the root, scaled) disagrees too."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, weight.shape[0], generator=gen) * torch.tensor([1.0] * 3 + [1e-3] * 3)[:, None]
    w = torch.randn(weight.shape[0], generator=gen)
    x, w = x.to(weight.device), w.to(weight.device)
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            own = torch.func.functional_call(module, {"weight": w}, (x,))
            fused = F.rms_norm(x, (weight.shape[0],), w, eps)
    except Exception:  # noqa: BLE001 - a norm that cannot be tried keeps its forward
        return False
    return own.shape == fused.shape and torch.allclose(own.float(), fused, rtol=1e-4, atol=1e-5)


def _rms_norm(module: nn.Module, eps: float, own: Callable[[torch.Tensor], torch.Tensor],
              hidden_states: torch.Tensor) -> torch.Tensor:
    """The converted forward, where ``rms_norm`` gives the norm's own result and dtype: float32
    input and weight (a full fine-tune under autocast, whose parameters are float32), or any one
    dtype outside autocast. Else the norm's own forward: an input whose dtype is not the weight's
    (Qwen3's query and key norms under autocast: bf16 projections, a float32 weight), for which
    ``rms_norm`` has no fused kernel and returns the input's dtype; and bf16 weights under
    autocast (a LoRA base), which CUDA's autocast would run through ``rms_norm`` in float32."""
    weight = module.weight
    if hidden_states.dtype != weight.dtype or (
            weight.dtype != torch.float32 and torch.is_autocast_enabled(hidden_states.device.type)):
        return own(hidden_states)
    return F.rms_norm(hidden_states, (weight.shape[0],), weight, eps)
