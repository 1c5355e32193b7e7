"""A row as the model's own chat template renders it, and which of its tokens are trained.

A causal LM fine-tuned on a format its chat template never produces learns the wrong thing: at
inference ``apply_chat_template`` builds the prompt. So when the tokenizer has a template (or
``--chat-template FILE`` gives one), every row goes through it: prompt/response and Alpaca rows
as one user turn and one assistant turn, ``messages`` as given (a system turn included).

The trained text of a conversation is each assistant turn's content plus whatever end-of-turn
text the template puts after it. It is found by rendering, not by searching token ids: the
conversation up to an assistant turn with the generation prompt ends where that turn's content
starts, and the conversation up to and including the turn ends where its end-of-turn ends. Those
character spans become token masks through the tokenizer's offsets. ``--chat-template none``
and tokenizers without a template keep the built-in format (rows.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftui.config import ConfigError

Message = dict[str, str]
Span = tuple[int, int]  # [start, end) in characters of the rendered text


@dataclass(frozen=True)
class ChatFormat:
    """How rows become text, as resolved at the start of a run (run.json's ``chat_format``)."""

    kind: str                   # "template" (the tokenizer's or --chat-template FILE), "builtin", "none"
    template: str | None = None
    source: str | None = None   # "tokenizer" or the file's path, for the log

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.template.encode()).hexdigest() if self.template is not None else None

    def record(self) -> dict[str, Any]:
        """run.json's ``chat_format``."""
        return {"kind": self.kind, "sha256": self.sha256, "source": self.source}

    def describe(self) -> str:
        """The words the log and the screen use."""
        if self.kind == "template":
            return f"chat template from {self.source} (sha256 {self.sha256[:12]})"
        if self.kind == "none":
            return "no chat format: prompt and response concatenated (--chat-template none)"
        return "built-in chat format (the tokenizer has no chat template)"


def resolve(setting: str, tokenizer: Any) -> ChatFormat:
    """``--chat-template``: ``auto`` (the tokenizer's template, else the built-in format),
    ``none``, or a Jinja file."""
    if setting == "none":
        return ChatFormat("none")
    if setting == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        return ChatFormat("template", template, "tokenizer") if template else ChatFormat("builtin")
    try:
        template = Path(setting).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template: {setting}: {getattr(e, 'strerror', None) or e}") from None
    if not template.strip():
        raise ConfigError(f"--chat-template: {setting}: empty file")
    return ChatFormat("template", template, setting)


def conversation(obj: dict[str, Any]) -> list[Message]:
    """A validated row of any format as chat turns (rows.parse_row has checked it)."""
    if obj.get("messages") is not None:
        return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    if obj.get("instruction") is not None:
        extra = obj.get("input") or ""
        user = obj["instruction"] + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]


class TemplateError(ValueError):
    """The template cannot render this conversation in a way whose trained part can be found."""


def render(tokenizer: Any, template: str, messages: list[Message]) -> tuple[str, list[Span]]:
    """The whole conversation as the template renders it, and the character span of every
    assistant turn's content with its end-of-turn text."""

    def text(turns: list[Message], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    try:
        full = text(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = text(messages[:i], True), text(messages[:i + 1], False)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise TemplateError(f"the chat template does not render turn {i + 1} (assistant) as a prefix "
                                    "of the whole conversation, so its trained part cannot be found")
            spans.append((len(before), len(through)))
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja2's errors (raise_exception in templates) name the problem
        raise TemplateError(f"the chat template failed: {e}") from None
    return full, spans


def encode(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered text (its special tokens come from the template: none added)
    and a mask of the trained ones: the tokens that start inside a trained span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans) and end > start) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_seq2seq(tokenizer: Any, template: str, messages: list[Message], eos: int) -> tuple[list[int], list[int]]:
    """An encoder-decoder row: the template renders the input side (every turn before the last
    assistant turn, with the generation prompt); the last assistant turn + EOS are the labels."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:
        source = tokenizer.apply_chat_template(messages[:last], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - see render
        raise TemplateError(f"the chat template failed: {e}") from None
    src = tokenizer(source, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
    return list(src) + [eos], list(tgt) + [eos]


SAMPLE_ROWS = 256  # rows the foreground check tokenizes before anything is written


def load_tokenizer(model_dir: str) -> Any:
    """A local model directory's tokenizer (transformers; it imports torch: only for a local
    model, whose tokenizer may not match the data or the model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        raise ConfigError(f"--model: {model_dir}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None


def check_rows(tokenizer: Any, fmt: ChatFormat, path: str, skip_bad_rows: bool, model_dir: str) -> None:
    """Before anything is written: the first SAMPLE_ROWS rows render (with the template, if any)
    and their trained text tokenizes to something. A data set none of whose sampled responses
    has a token stops here (a tokenizer that does not match its model is easy to get); a single
    such row is a bad row (the worker checks every row the same way while tokenizing)."""
    from sftui.rows import DataError, Examples

    empty: list[tuple[str, str]] = []
    sampled = 0
    for _, where, obj, segments in Examples(path, skip_bad_rows).sourced():
        sampled += 1
        trained = "".join(t for t, is_trained in segments if is_trained and t is not None)
        if not tokenizer(trained, add_special_tokens=False)["input_ids"]:
            empty.append((where, trained))
        elif fmt.kind == "template":
            try:
                render(tokenizer, fmt.template, conversation(obj))
            except TemplateError as e:
                raise DataError(f"{where}: {e}") from None
        if sampled == SAMPLE_ROWS:
            break
    if not empty:
        return
    where, text = empty[0]
    kind = type(tokenizer).__name__
    if len(empty) == sampled:
        raise DataError(f"--data: no token to train: with the tokenizer of {model_dir} ({kind}) the responses of the "
                        f"first {sampled} rows tokenize to nothing, e.g. {where}: {text[:40]!r}; is it the model's own "
                        "tokenizer?")
    if not skip_bad_rows:
        raise DataError(f"{where}: its trained text ({text[:40]!r}) tokenizes to nothing with the tokenizer of "
                        f"{model_dir} ({kind}) (--skip-bad-rows skips such rows)")
