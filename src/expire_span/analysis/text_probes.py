"""What a trained Expire-Span language model does with its memory, token by token.

Two probes of the paper (section 5.3 and its appendix) on character-level text:

- **The inference-time cut.** Evaluate the same model with every span capped at ``L / k``
  (:func:`capped_spans`, applied to the span predictors, so masks, auxiliary loss and pruning all
  see the capped value) and compare per-token losses: if the memory matters, the loss rises on a
  few tokens, those that need the far past, and hardly anywhere else.
- **Which tokens live long.** The mean span of the characters of each word class
  (:func:`character_classes`): names, rare and frequent words, punctuation, whitespace.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from expire_span.analysis.spans import expire_span_policies
from expire_span.model import MemoryTransformer

WORD = re.compile(r"[A-Za-z]+")
CLASSES = ("name", "rare word", "frequent word", "other word", "digit", "punctuation",
           "space", "newline")
"""Character classes of :func:`character_classes`, in table order."""
FREQUENT_WORDS = 100
"""A word is frequent when it is among this many most common (lower-cased) training words."""
RARE_COUNT = 20
"""A word is rare when the training text holds it (lower-cased) fewer times than this."""
NATS_PER_BIT = math.log(2)


@contextmanager
def capped_spans(model: MemoryTransformer, cap: float | None) -> Iterator[None]:
    """Inside the ``with`` block, every predicted span is at most ``cap`` (``None``: unchanged): the
    paper's "reduce L at inference", with the trained weights untouched."""
    if cap is None:
        yield
        return
    if cap <= 0:
        raise ValueError(f"the span cap must be > 0, got {cap}")
    handles = [policy.span_predictor.register_forward_hook(
        lambda module, inputs, output: output.clamp(max=cap))
        for policy in expire_span_policies(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cut_effect(full: Tensor, cut: Tensor, top_fraction: float = 0.01) -> dict[str, float]:
    """How a cut changed the per-token losses (same shape, nats): the mean change over all tokens
    and over the ``top_fraction`` whose loss rose most, both in bits, and the share of the total
    rise those tokens carry."""
    change = (cut - full).flatten() / NATS_PER_BIT
    count = max(1, round(top_fraction * change.numel()))
    top = change.topk(count).values
    rise = change.clamp(min=0).sum()
    return {"mean_change_bits": float(change.mean()), "top_mean_change_bits": float(top.mean()),
            "top_tokens": count, "top_share_of_rise": float(top.sum() / rise) if rise > 0 else 0.0}


def word_counts(text: str) -> Counter[str]:
    """Lower-cased word counts of ``text``."""
    return Counter(word.lower() for word in WORD.findall(text))


def names(text: str) -> set[str]:
    """The (lower-cased) words that ``text`` only ever writes capitalised: names such as
    ``Moses`` or ``Jerusalem`` (a word that also starts sentences, ``And``, also occurs in lower
    case and is not one)."""
    capitalised, lower = set(), set()
    for word in WORD.findall(text):
        (capitalised if word[0].isupper() else lower).add(word.lower())
    return capitalised - lower


def character_classes(text: str, counts: Counter[str], known_names: set[str]) -> list[str]:
    """The class (one of :data:`CLASSES`) of every character of ``text``: a letter takes its
    word's class (a name, else rare, frequent or other by ``counts``), the rest their kind."""
    frequent = {word for word, _ in counts.most_common(FREQUENT_WORDS)}
    classes = []
    for char in text:
        if char == "\n":
            classes.append("newline")
        elif char.isspace():
            classes.append("space")
        elif char.isdigit():
            classes.append("digit")
        elif not char.isalpha():
            classes.append("punctuation")
        else:
            classes.append("")  # a letter: filled in by its word below
    for match in WORD.finditer(text):
        word = match.group().lower()
        if word in known_names:
            kind = "name"
        elif counts[word] < RARE_COUNT:
            kind = "rare word"
        elif word in frequent:
            kind = "frequent word"
        else:
            kind = "other word"
        classes[match.start():match.end()] = [kind] * (match.end() - match.start())
    return [kind or "other word" for kind in classes]  # letters outside A-Z (none in English)


def class_spans(spans: Tensor, classes: list[str]) -> list[dict[str, float | int | str]]:
    """Per class: its number of characters and the mean span in each layer (``spans``:
    ``[n_layers, T]`` for the ``T`` characters ``classes`` describes)."""
    if spans.shape[1] != len(classes):
        raise ValueError(f"{spans.shape[1]} spans for {len(classes)} characters")
    rows = []
    labels = torch.tensor([CLASSES.index(kind) for kind in classes])
    for index, kind in enumerate(CLASSES):
        chosen = labels == index
        if not bool(chosen.any()):
            continue
        row: dict[str, float | int | str] = {"class": kind, "characters": int(chosen.sum())}
        for layer, values in enumerate(spans):
            row[f"layer_{layer}_mean_span"] = float(values[chosen].mean())
        rows.append(row)
    return rows


def nll_bits(losses: Tensor) -> float:
    """Mean of per-token losses given in nats, in bits."""
    return float(losses.mean()) / NATS_PER_BIT


__all__ = ["CLASSES", "NATS_PER_BIT", "capped_spans", "character_classes", "class_spans",
           "cut_effect", "names", "nll_bits", "word_counts"]
