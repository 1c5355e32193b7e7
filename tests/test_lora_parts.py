"""LoRA's parts without a run: the torch-free reading of a base's linear layers agrees with the
model's own modules, and MFU and the forecast's fixed memory count a frozen base as frozen."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from chat_helpers import build_model_dir
from sftui.config import RunConfig
from sftui.runfile import PRESET_LINEARS, base_linear_layers
from sftui.trainer import adapters, flops, model
from sftui.trainer.probe import model_state_bytes


def _tok(tmp_path: Path):
    model.build_char_tokenizer(Counter("abcdef"), tmp_path / "tok")
    return model.load_tokenizer(tmp_path / "tok", preset=True)


def test_the_linear_layers_read_without_torch_are_the_models_own(tmp_path) -> None:
    tok = _tok(tmp_path)
    for name in ("tiny", "chatlm-mini"):
        with torch.device("meta"):
            net = model.build_model(name, tok, seed=0, max_len=64)
        leaves = {n.rsplit(".", 1)[-1] for n in adapters.target_modules(net, None)}
        assert leaves == set(PRESET_LINEARS[name]), name
    directory = build_model_dir(tmp_path / "qwen2", "chatml")
    net = model.build_model(str(directory), None, seed=0, max_len=64)
    assert sorted(base_linear_layers(str(directory))) == sorted(adapters.target_modules(net, None))
    assert "lm_head" not in " ".join(adapters.target_modules(net, None))


def test_mfu_and_model_state_count_the_frozen_base_as_frozen(tmp_path) -> None:
    """6 × the adapters' parameters (forward, activation and weight gradients), 4 × the frozen
    base's (no weight gradient), the frozen head too; the fixed memory: the base's weights once,
    the adapters' four times (weights, gradients, two moments)."""
    cfg = RunConfig(lora=True, lora_r=4)
    tiny = model.build_model("tiny", _tok(tmp_path), seed=0, max_len=64)
    net = adapters.apply_lora(tiny, adapters.Lora.of(cfg))
    fpt = flops.flops_per_token(net, seq2seq=False)
    params = dict(adapters.inner(net).named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen = sum(p.numel() for n, p in params.items() if not p.requires_grad and "embed" not in n)
    assert trainable == adapters.parameter_counts(net)[0] > 0
    assert fpt.dec == 6 * trainable + 4 * frozen
    assert fpt.head == 4 * tiny.get_input_embeddings().weight.numel()  # tied, frozen
    frozen_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if not p.requires_grad)
    assert model_state_bytes(net) == frozen_bytes + 4 * 4 * trainable
    assert all(p.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
