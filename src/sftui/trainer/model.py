"""Models and tokenizers: local Hugging Face directories and the built-in presets.

Nothing is downloaded. ``tiny`` (a ~3M-parameter Llama-shaped causal LM) and ``chatlm-mini``
(ChatLM-mini-Chinese's T5 shape, ~188M parameters) are built from configs with random, seeded
weights; their tokenizer is a character tokenizer built from the run's data (see
``build_char_tokenizer``). A local directory brings its own config, weights and tokenizer.
Their default learning rates are config.default_lr's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftui.config import PRESETS
from sftui.rundir import fresh_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHATLM_VOCAB = 29298
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def is_preset(model: str) -> bool:
    return model in PRESETS


def max_vocab(model: str) -> int | None:
    """The largest tokenizer a preset's embedding can take (None: no limit, tiny sizes to fit)."""
    return CHATLM_VOCAB if model == "chatlm-mini" else None


def build_char_tokenizer(counts: Counter, out_dir: Path, limit: int | None = None) -> None:
    """A character-level tokenizer over the characters of the data, most frequent first, saved
    with ``save_pretrained`` into ``out_dir`` (written under a temporary name, then renamed).

    For ``chatlm-mini`` this stands in for ChatLM-mini-Chinese's own tokenizer, which cannot be
    downloaded here: the characters of the data, capped at the model's vocabulary of 29,298;
    rarer characters map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    room = None if limit is None else limit - len(vocab)
    for ch, _ in counts.most_common(room):
        vocab.setdefault(ch, len(vocab))
    # BPE without merges over the whole text is one token per character, and twice as fast as
    # a per-character pre-tokenizer regex.
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    with fresh_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)


def load_tokenizer(directory: str | Path, preset: bool = False) -> "PreTrainedTokenizerBase":
    """A tokenizer saved with ``save_pretrained``; the pad token falls back to EOS.

    A preset's own character tokenizer is loaded as what it is: importing AutoTokenizer took
    6 s on a GPU machine whose image holds many libraries (the model registry comes with it).
    """
    if preset:
        from transformers import PreTrainedTokenizerFast as loader
    else:
        from transformers import AutoTokenizer as loader
    tok = loader.from_pretrained(str(directory), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"{directory}: the tokenizer has no EOS token; sftui ends every response with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok: "PreTrainedTokenizerBase") -> str:
    """Identifies the tokenization, for the data cache's key."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([type(tok).__name__, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id])
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def build_model(name: str, tok: "PreTrainedTokenizerBase", seed: int, max_len: int,
                device: Any = "cpu", dtype: Any = None) -> "PreTrainedModel":
    """The model in ``dtype`` (default float32) on ``device``: a preset with seeded random
    weights (initialised right there: 0.8 s for chatlm-mini on a GPU, 4 s on the CPU), or a local
    directory, read straight in ``dtype`` (a frozen bf16 base never exists in float32)."""
    import torch
    from transformers import AutoConfig

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    if is_preset(name):
        with torch.device(device):
            return _preset(name, tok, max_len).to(dtype)
    config = AutoConfig.from_pretrained(name, local_files_only=True)
    return auto_class(config).from_pretrained(name, local_files_only=True, dtype=dtype).to(device)


def auto_class(config: Any) -> Any:
    """The transformers Auto class a local directory of this config loads through."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def _preset(name: str, tok: "PreTrainedTokenizerBase", max_len: int) -> "PreTrainedModel":
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    if name == "tiny":
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(512, max_len),
            tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return LlamaForCausalLM(config)
    config = T5Config(
        vocab_size=CHATLM_VOCAB, d_model=768, d_kv=64, d_ff=3072, num_layers=10, num_decoder_layers=10,
        num_heads=12, feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def set_attention(model: Any, name: str) -> None:
    """``set_attn_implementation(name)`` on the model and on every model inside it: transformers
    5.17 passes the name on only to inner models whose config is of another class, and a T5's
    encoder and decoder stacks hold copies of its own config, so their attentions kept sdpa (seen
    on an H200 with 5.17, 2026-12-02; 5.24 passes it on)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(name)


def fused_attention_bias(model: Any) -> int:
    """Shape T5-style relative position biases so that SDPA's fused kernels take the biased
    self-attentions; returns how many bias embeddings were hooked (0 without any).

    T5's ``compute_bias`` looks the bias up as (query, key, heads) and permutes it to
    (1, heads, query, key): its last dimension then has stride ``heads``. SDPA gets it as the
    additive mask, and every fused kernel on a GPU needs the mask's last stride to be 1, so
    each biased self-attention ran SDPA's float32 math path (batch × heads × L × L scores,
    softmax and dropout, and the casts between; seen on an H200 with transformers 5.17, whose
    mask code does not make it contiguous). The hook lays the embedding's output out heads
    first, so that the permuted bias is contiguous, and in autocast's dtype, the query's.
    """
    import torch

    def heads_first(module: Any, args: Any, out: Any) -> Any:
        kind = out.device.type
        if torch.is_autocast_enabled(kind):
            out = out.to(torch.get_autocast_dtype(kind))
        return out.permute(2, 0, 1).contiguous().permute(1, 2, 0) if out.dim() == 3 else out

    hooked = 0
    for name, module in model.named_modules():
        if name.endswith("relative_attention_bias") and isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(heads_first)
            hooked += 1
    return hooked


def save_final(model: Any, tok: "PreTrainedTokenizerBase", final_dir: Path) -> None:
    """The trained model and its tokenizer in ``save_pretrained`` form, replaced atomically."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    with fresh_dir(final_dir, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
