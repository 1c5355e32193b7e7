"""trainer/norms.py: RMS norms through torch's rms_norm, on real transformers models (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sftui.trainer import norms
from sftui.trainer.loss import TrainingModel


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               dropout_rate=0.0, decoder_start_token_id=0))


def randomize_norm_weights(model: nn.Module) -> None:
    """Norm weights start at ones; a trained model's do not (a converted norm must use them)."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if norms.norm_eps(module) is not None:
            module.weight.data = torch.rand(module.weight.shape, generator=gen) + 0.5


def loss_and_grads(model: nn.Module, seq2seq: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (3, 12), generator=gen)
    labels = torch.randint(1, 97, (3, 12), generator=gen)
    labels[0, :5] = -100
    if seq2seq:
        start = torch.zeros_like(labels[:, :1])
        decoder = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
        loss = TrainingModel(model)(ids, labels, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder)
    else:
        loss = TrainingModel(model)(ids, ids.masked_fill(labels == -100, -100), attention_mask=torch.ones_like(ids))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build,seq2seq,expected", [(qwen2, False, 2 * 2 + 1), (t5, True, 2 * 2 + 2 * 3 + 2)])
def test_converted_norms_train_as_the_models_own(build, seq2seq, expected):
    """Every RMS norm is converted (Qwen2: 2 per layer and the final one; T5: 2 per encoder
    layer, 3 per decoder layer, one final per stack), and the loss and every gradient equal the
    unconverted model's; the weights' names do not change."""
    own = build()
    randomize_norm_weights(own)
    fused = copy.deepcopy(own)
    assert norms.fuse_rms_norms(fused) == expected
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in own.named_parameters()]
    loss_own, grads_own = loss_and_grads(own, seq2seq)
    loss_fused, grads_fused = loss_and_grads(fused, seq2seq)
    torch.testing.assert_close(loss_fused, loss_own, rtol=1e-5, atol=1e-5)
    assert grads_fused.keys() == grads_own.keys()
    for name, grad in grads_own.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-5, msg=name)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated norm, in short: ``forward(hidden_states, gate=None)``; without a gate, an RMS norm."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None:
            hidden_states = hidden_states * torch.nn.functional.silu(gate)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


class EpsOutsideRootRMSNorm(nn.Module):
    """An RMS norm that adds its epsilon after the root: equal to rms_norm on rows of unit scale."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.weight * hidden_states / (hidden_states.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def test_a_norm_that_computes_something_else_keeps_its_forward():
    """Gemma's RMS norm scales by 1 + weight, another puts its epsilon outside the root: the
    trial disagrees and the module is left alone; a gated norm (a second argument) is not
    converted, since its gate would be dropped; a LayerNorm (two parameters) is not taken for an
    RMS norm at all."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    assert norms.fuse_rms_norms(gemma) == 0
    assert all("forward" not in vars(m) for m in gemma.modules())
    assert norms.fuse_rms_norms(EpsOutsideRootRMSNorm(8)) == 0
    gated = GatedRMSNorm(8)
    assert norms.agrees(gated, gated.variance_epsilon)  # without its gate it is an RMS norm...
    assert norms.fuse_rms_norms(gated) == 0  # ...but the model calls it with one
    x, gate = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(gated(x, gate), GatedRMSNorm(8)(x, gate))
    assert norms.norm_eps(nn.LayerNorm(8)) is None


def test_an_input_in_another_dtype_takes_the_norms_own_forward():
    """A bf16 input to a float32 norm (Qwen3's query/key norms under autocast) keeps transformers'
    result, dtype included: float32."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(8)
    norm.weight.data = torch.rand(8) + 0.5
    x = torch.randn(4, 8).bfloat16()
    expected = norm(x)
    assert norms.fuse_rms_norms(norm) == 1
    got = norm(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    y = torch.randn(4, 8)
    torch.testing.assert_close(norm(y), torch.nn.functional.rms_norm(y, (8,), norm.weight, norm.variance_epsilon))


def test_bf16_weights_under_autocast_take_the_norms_own_forward():
    """A LoRA base's bf16 norm under autocast: CUDA's autocast would run rms_norm in float32 and
    return float32 where transformers returns bf16, so the norm's own forward runs (the same
    result, bit for bit)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(8).to(torch.bfloat16)
    norm.weight.data = (torch.rand(8) + 0.5).bfloat16()
    x = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = norm(x)
        assert norms.fuse_rms_norms(norm) == 1
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_the_worker_builds_its_model_with_converted_norms(tmp_path):
    """loop.new_model (the worker's and the probe's model) converts a local causal LM's norms."""
    from chat_helpers import build_model_dir

    from sftui.config import RunConfig
    from sftui.trainer import loop, model as models

    directory = build_model_dir(tmp_path / "qwen", "chatml")
    net, _ = loop.new_model(RunConfig(model=str(directory)), models.load_tokenizer(directory), torch.device("cpu"), 1e-4)
    converted = [name for name, module in net.named_modules() if "forward" in vars(module)]
    assert converted == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                         "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
