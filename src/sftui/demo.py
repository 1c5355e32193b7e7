"""The built-in demo dataset: Chinese and English question/answer pairs generated in code.

The tasks (arithmetic, copying, reversal, templated translation) have structure a
few-million-parameter model picks up within one epoch, so `sftui run` with no arguments shows
a loss that visibly falls. The rows are the same on every machine and every call: a fixed
seed, no files. The demo's tokenizer is the `tiny` preset's character tokenizer
(trainer/model.py), built from these rows like from any other data. Torch-free: the CLI
checks and fingerprints the demo like a data file (rows.py).
"""

from __future__ import annotations

import random
from typing import Callable

DEMO_ROWS = 6000
_SEED = 20240601

_COLORS = [("红色的", "red"), ("蓝色的", "blue"), ("绿色的", "green"), ("黑色的", "black"), ("白色的", "white")]
_SIZES = [("大", "big"), ("小", "small"), ("老", "old"), ("年轻的", "young")]
_ANIMALS = [("猫", "cat"), ("狗", "dog"), ("鸟", "bird"), ("鱼", "fish"), ("马", "horse"), ("牛", "cow")]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_HANZI = "天地人日月山水火木金土风云雨雪春夏秋冬东南西北上下左右大小多少"

Maker = Callable[[random.Random], tuple[str, str]]


def rows(n: int = DEMO_ROWS) -> list[dict[str, str]]:
    """``n`` prompt/response rows, deterministic, cycling through the tasks."""
    rng = random.Random(_SEED)
    return [dict(zip(("prompt", "response"), _TASKS[i % len(_TASKS)](rng))) for i in range(n)]


def _add(prompt: str) -> Maker:
    """``prompt`` with two numbers below 100 in its ``{}``; the response is their sum."""
    def make(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randrange(100), rng.randrange(100)
        return prompt.format(a, b), f" {a + b}"
    return make


def _word_task(prompt: str, alphabet: str, answer: Callable[[str], str]) -> Maker:
    """A random word of ``alphabet`` in ``prompt``; the response is ``answer(word)``."""
    def make(rng: random.Random) -> tuple[str, str]:
        w = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))
        return prompt.format(w), f" {answer(w)}"
    return make


def _translate(prompt: str, to_english: bool) -> Maker:
    """A size, colour and animal phrase in one language; the response is the other's."""
    def make(rng: random.Random) -> tuple[str, str]:
        (cz, ce), (sz, se), (az, ae) = rng.choice(_COLORS), rng.choice(_SIZES), rng.choice(_ANIMALS)
        zh, en = f"{sz}{cz}{az}", f"{se} {ce} {ae}"
        return (prompt.format(zh), f" {en}") if to_english else (prompt.format(en), f" {zh}")
    return make


def _same(w: str) -> str:
    return w


def _reversed(w: str) -> str:
    return w[::-1]


_TASKS: tuple[Maker, ...] = (
    _add("add {}+{} ="), _add("计算 {}加{} 等于"),
    _word_task("copy: {} ->", _LETTERS, _same), _word_task("复制：{} ->", _HANZI, _same),
    _word_task("reverse: {} ->", _LETTERS, _reversed), _word_task("反转：{} ->", _HANZI, _reversed),
    _translate("translate to English: {} ->", True), _translate("翻译成中文：{} ->", False),
)
