"""Locally built tokenizers with the chat templates people fine-tune with: a byte-level BPE trained
by `tokenizers` on the test's own text, saved with ``save_pretrained`` next to a template in the
style of Qwen2.5 (ChatML), Llama-3 and Mistral/Llama-2 (``[INST]``). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
INST = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + ' ' + eos_token }}"
    "{%- else %}{{- raise_exception('roles must alternate user/assistant') }}{%- endif %}"
    "{%- endfor %}"
)
TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"), "inst": (INST, "</s>")}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<pad>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen.",
    "写一首关于春天的诗。春风吹绿了江南岸，桃花开满了山坡。",
    "Add 12 and 30. The answer is 42.",
    "You are a helpful assistant. Answer briefly and politely.",
] * 20


def build_tokenizer(directory: Path, style: str | None) -> Path:
    """A fast tokenizer saved in ``directory`` with the template ``style`` (None: no template),
    its end-of-turn and pad tokens set as that family sets them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = TEMPLATES[style][1] if style else "</s>"
    bos = {"llama3": "<|begin_of_text|>", "inst": "<s>"}.get(style or "", None)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, pad_token="<pad>", bos_token=bos,
                                  additional_special_tokens=[s for s in SPECIALS if s not in (eot, "<pad>", bos)])
    if style:
        tok.chat_template = TEMPLATES[style][0]
    tok.save_pretrained(directory)
    return directory


def build_model_dir(directory: Path, style: str | None) -> Path:
    """A small Qwen2-shaped causal LM (random weights) saved beside a tokenizer of ``style``: what
    a user's local model directory holds, at a size that trains on the CPU in seconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    build_tokenizer(directory, style)
    config = Qwen2Config(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def build_blind_tokenizer(directory: Path) -> Path:
    """A tokenizer that knows only a few Latin letters and has no unknown token: text in other
    scripts tokenizes to nothing (a tokenizer that does not match the data, as from a wrong
    directory). No chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "a", "b", "c"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [])), eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(directory)
    return directory


def t5_dir(directory: Path) -> Path:
    """A small T5 (encoder-decoder) directory beside a BPE tokenizer without a chat template."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    build_tokenizer(directory, None)
    tok = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory
