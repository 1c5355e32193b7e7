"""Loss normalisation: the gradient of a step does not depend on how the step is split
(one micro-batch or two, one rank or two), because every micro-batch divides its token-loss
sum by the step's global target count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sftui.rows import char_counts
from sftui.trainer import data, model
from sftui.trainer.loop import is_oom, scaled_loss, token_loss_sum
from sftui.trainer.loss import TrainingModel
from trainer_helpers import qa_rows, write_jsonl


def _setup(tmp_path: Path):
    rows = qa_rows(8, seed=3)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    model.build_char_tokenizer(char_counts(str(path), False), tmp_path / "tok")
    tok = model.load_tokenizer(tmp_path / "tok")
    cache = data.tokenize_to_cache(str(path), tok, 32, False, False, tmp_path / "c", lambda f: None)
    net = model.build_model("tiny", tok, seed=0, max_len=32)
    return net, cache, tok.pad_token_id


def _grads(net: torch.nn.Module, cache: data.Tokenized, pad: int, splits: list[list[list[int]]]) -> torch.Tensor:
    """Gradient of one step given as ranks × micro-batches of row indices; ranks are averaged
    as DDP averages them."""
    world = len(splits)
    step_rows = np.array([i for rank in splits for micro in rank for i in micro])
    targets = int(cache.n_target[step_rows].sum())
    per_rank = []
    for rank in splits:
        net.zero_grad(set_to_none=True)
        for micro in rank:
            batch = data.collate(cache, np.array(micro), pad)
            scaled_loss(token_loss_sum(TrainingModel(net), batch, None), targets, world).backward()
        per_rank.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    return torch.stack(per_rank).mean(0)


def test_gradient_does_not_depend_on_the_split(tmp_path: Path) -> None:
    net, cache, pad = _setup(tmp_path)
    whole = _grads(net, cache, pad, [[[0, 1, 2, 3, 4, 5]]])
    accum_2 = _grads(net, cache, pad, [[[0, 1, 2], [3, 4, 5]]])
    ranks_2 = _grads(net, cache, pad, [[[0, 1, 2]], [[3, 4, 5]]])
    uneven = _grads(net, cache, pad, [[[0], [1, 2, 3]], [[4], [5]]])
    for other in (accum_2, ranks_2, uneven):
        torch.testing.assert_close(other, whole, rtol=1e-4, atol=1e-6)


def test_oom_recognition() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ALLOCATED"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("CUDA error: out of memory"))
