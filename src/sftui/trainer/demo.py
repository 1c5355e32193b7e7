"""The built-in demo dataset: Chinese and English question/answer pairs generated in code.

The tasks (arithmetic, copying, reversal, templated translation) have structure a
few-million-parameter model picks up within one epoch, so `sftui run` with no arguments shows
a loss that visibly falls. The rows are the same on every machine and every call: a fixed
seed, no files. The demo's tokenizer is the `tiny` preset's character tokenizer (model.py),
built from these rows like from any other data.
"""

from __future__ import annotations

import random

DEMO_ROWS = 6000
_SEED = 20240601

_COLORS = [("红色的", "red"), ("蓝色的", "blue"), ("绿色的", "green"), ("黑色的", "black"), ("白色的", "white")]
_SIZES = [("大", "big"), ("小", "small"), ("老", "old"), ("年轻的", "young")]
_ANIMALS = [("猫", "cat"), ("狗", "dog"), ("鸟", "bird"), ("鱼", "fish"), ("马", "horse"), ("牛", "cow")]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_HANZI = "天地人日月山水火木金土风云雨雪春夏秋冬东南西北上下左右大小多少"


def rows(n: int = DEMO_ROWS) -> list[dict[str, str]]:
    """``n`` prompt/response rows, deterministic, cycling through the tasks."""
    rng = random.Random(_SEED)
    makers = (_add, _add_zh, _copy, _copy_zh, _reverse, _reverse_zh, _to_english, _to_chinese)
    return [dict(zip(("prompt", "response"), makers[i % len(makers)](rng))) for i in range(n)]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a}+{b} =", f" {a + b}"


def _add_zh(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"计算 {a}加{b} 等于", f" {a + b}"


def _word(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, _LETTERS)
    return f"copy: {w} ->", f" {w}"


def _copy_zh(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, _HANZI)
    return f"复制：{w} ->", f" {w}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, _LETTERS)
    return f"reverse: {w} ->", f" {w[::-1]}"


def _reverse_zh(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, _HANZI)
    return f"反转：{w} ->", f" {w[::-1]}"


def _phrase(rng: random.Random) -> tuple[str, str]:
    (cz, ce), (sz, se), (az, ae) = rng.choice(_COLORS), rng.choice(_SIZES), rng.choice(_ANIMALS)
    return f"{sz}{cz}{az}", f"{se} {ce} {ae}"


def _to_english(rng: random.Random) -> tuple[str, str]:
    zh, en = _phrase(rng)
    return f"translate to English: {zh} ->", f" {en}"


def _to_chinese(rng: random.Random) -> tuple[str, str]:
    zh, en = _phrase(rng)
    return f"翻译成中文：{en} ->", f" {zh}"
