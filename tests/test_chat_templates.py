"""trainer/chat.py: rows through the model's own chat template (ChatML, Llama-3 and [INST] styles on
locally built tokenizers); the trained tokens of every assistant turn decode back to exactly its
content and the end-of-turn text the template puts after it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from chat_helpers import TEMPLATES, build_tokenizer
from sftui.config import ConfigError
from sftui import chat

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}],
    "system": [{"role": "system", "content": "Answer briefly and politely."},
               {"role": "user", "content": "Add 12 and 30."},
               {"role": "assistant", "content": "The answer is 42."}],
    "multi-turn": [{"role": "user", "content": "Translate to German: good morning."},
                   {"role": "assistant", "content": "Guten Morgen."},
                   {"role": "user", "content": "写一首关于春天的诗。"},
                   {"role": "assistant", "content": "春风吹绿了江南岸，桃花开满了山坡。"}],
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {style: AutoTokenizer.from_pretrained(build_tokenizer(root / style, style)) for style in TEMPLATES}


@pytest.mark.parametrize("style", sorted(TEMPLATES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_trained_tokens_are_each_assistant_turn_and_its_end_of_turn(tokenizers, style, name):
    tok, messages = tokenizers[style], CONVERSATIONS[name]
    fmt = chat.resolve("auto", tok)
    assert fmt.kind == "template" and fmt.template == TEMPLATES[style][0] and fmt.source == "tokenizer"
    text, spans = chat.render(tok, fmt.template, messages)
    assert text == tok.apply_chat_template(messages, tokenize=False)  # what inference builds, exactly
    ids, mask = chat.encode(tok, text, spans)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    # each trained run of tokens decodes to one assistant turn's content, then the end of turn
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tok.decode(run) for run in runs]
    turn_text = {"chatml": "{}<|im_end|>\n", "llama3": "{}<|eot_id|>", "inst": " {} </s>"}[style]
    assert decoded == [turn_text.format(a) for a in answers] == [text[s:e] for s, e in spans]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert all(m["content"] in untrained for m in messages if m["role"] != "assistant")


def test_every_row_format_becomes_a_conversation():
    assert chat.conversation({"prompt": "p", "response": "r"}) == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert chat.conversation({"instruction": "i", "input": "x", "output": "o"})[0] == {"role": "user", "content": "i\n\nx"}
    assert chat.conversation({"instruction": "i", "input": "", "output": "o"})[0]["content"] == "i"
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert chat.conversation({"messages": turns}) == turns


def test_resolve_none_builtin_and_a_file(tmp_path, tokenizers):
    from chat_helpers import build_tokenizer as build

    plain = AutoTokenizer.from_pretrained(build(tmp_path / "plain", None))
    assert chat.resolve("auto", plain).kind == "builtin"
    assert chat.resolve("none", tokenizers["chatml"]).kind == "none"
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATES["llama3"][0])
    fmt = chat.resolve(str(f), plain)
    assert (fmt.kind, fmt.source, fmt.template) == ("template", str(f), TEMPLATES["llama3"][0])
    assert len(fmt.sha256) == 64 and f"sha256 {fmt.sha256[:12]}" in fmt.describe()
    with pytest.raises(ConfigError, match="--chat-template: .*nope.jinja"):
        chat.resolve(str(tmp_path / "nope.jinja"), plain)


def test_a_template_that_refuses_a_conversation_says_why(tokenizers):
    tok = tokenizers["inst"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
           {"role": "tool", "content": "d"}]
    with pytest.raises(chat.TemplateError, match="roles must alternate"):
        chat.render(tok, TEMPLATES["inst"][0], bad)


def test_an_encoder_decoder_row_keeps_its_split_with_the_template_rendering_the_input(tokenizers):
    """T5: the template renders every turn before the last assistant turn, with the generation
    prompt, as the encoder's input; the last assistant turn and EOS are the labels."""
    tok = tokenizers["chatml"]
    messages = CONVERSATIONS["multi-turn"]
    src, tgt = chat.encode_seq2seq(tok, TEMPLATES["chatml"][0], messages, tok.eos_token_id)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(src[:-1]) == prompt and src[-1] == tok.eos_token_id
    assert tok.decode(tgt[:-1]) == messages[-1]["content"] and tgt[-1] == tok.eos_token_id
