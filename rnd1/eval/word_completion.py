"""Finish a held-out word of code: demo samples a reader can judge, and a count that can fail.

A 2M-parameter byte-level model trained for a few minutes cannot write a function: asked to
continue ``def __init__(self`` it writes ``):`` and a screen of indentation, the likeliest bytes
after a line break, and that is true of the AR base and of its diffusion conversion alike. What
such a model can do is finish a word it is in the middle of, from the names in scope: after
``self.ass`` comes ``ertEqual``. So the demo's samples are word completions on the validation
split, which no run trained on:

- the **prompt** is the ``context`` characters of a held-out file that end a few letters into an
  identifier of at least six characters (the middle one of its line); all
  prompts have the same length, so a batch of them needs no padding and no attention mask;
- the **reference** is the rest of that identifier;
- a **completion** is the model's output up to its first character that cannot be part of an
  identifier.

``score`` counts the completions equal to the reference. The random-init baseline scores about
zero (it writes ``rereselalala``), the AR base most; where the converted model lands between them
is what the conversion kept. Items are chosen deterministically, evenly spaced over the split's
qualifying words, so every machine shows the same ones: none is picked for looking good.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{5,}")  # identifiers of >= 6 characters
_WORD_CHARS = re.compile(r"[A-Za-z0-9_]*")
_NOT_CODE = ("#", '"', "'")  # comment and docstring lines


@dataclass(frozen=True)
class WordItem:
    prompt: str  # the context, ending inside a word
    reference: str  # the rest of the word


def _word_in(line: str):
    """The match of the word to cut in ``line``, or None when the line does not qualify: indented
    code (inside a def or class), ASCII, not a comment or docstring line."""
    body = line.lstrip(" ")
    if len(line) - len(body) < 4 or not body.isascii() or body.startswith(_NOT_CODE):
        return None
    words = list(_WORD.finditer(line))  # six characters or more: never `self`
    return words[len(words) // 2] if words else None


def held_out_words(documents: list[str], n: int, *, keep: int = 3, context: int = 128) -> list[WordItem]:
    """``n`` items from held-out ``documents`` (source files), evenly spaced over all qualifying
    words; each prompt is ``context`` characters ending ``keep`` characters into its word."""
    if n < 1 or keep < 1:
        raise ValueError(f"n and keep must be >= 1, got n={n}, keep={keep}")
    candidates = []
    for doc in documents:
        offset = 0
        for line in doc.split("\n"):
            word = _word_in(line)
            if word is not None and offset + word.start() + keep >= context:
                candidates.append((doc, offset, line, word))
            offset += len(line) + 1
    if len(candidates) < n:
        raise ValueError(f"the documents hold {len(candidates)} qualifying words, fewer than the {n} asked for")
    items = []
    for i in np.linspace(0, len(candidates) - 1, n).round().astype(int):
        doc, offset, line, word = candidates[i]
        cut = word.start() + keep
        items.append(WordItem(prompt=doc[offset + cut - context:offset + cut],
                              reference=line[cut:word.end()]))
    return items


def completed_word(text: str) -> str:
    """A completion up to its first character that cannot be part of an identifier."""
    return _WORD_CHARS.match(text).group()


@dataclass(frozen=True)
class WordScore:
    right: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.right / self.total

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.total)


def score(completions: list[str], items: list[WordItem]) -> WordScore:
    if len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions for {len(items)} items")
    return WordScore(right=sum(c == it.reference for c, it in zip(completions, items)), total=len(items))
