"""Probes of trained language models: per-token losses while streaming, the inference-time cut,
word classes of characters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expire_span.analysis.spans import stream
from expire_span.analysis.text_probes import (
    capped_spans,
    character_classes,
    class_spans,
    cut_effect,
    names,
    word_counts,
)
from tests.helpers import tiny_model


def tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 13, (rows, length), generator=torch.Generator().manual_seed(seed))

def test_stream_losses_are_the_cross_entropy_of_one_call_on_the_whole_rows():
    model = tiny_model("expire-span", init_percentage=0.4)
    x = tokens(3, 50)
    nll, spans = stream(model, x)
    assert nll.shape == (3, 49) and spans.shape == (model.config.n_layers, 3, 50)
    with torch.no_grad():
        logits = model(x).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                               reduction="none").view(3, 49)
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)

def test_capped_spans_bound_every_span_and_change_the_losses_only_when_they_bite():
    model = tiny_model("expire-span", init_percentage=0.4)
    x = tokens(2, 80)
    full, spans = stream(model, x)
    assert spans.max() > 6
    with capped_spans(model, 6.0):
        cut, capped = stream(model, x)
    assert capped.max() <= 6.0
    # the first layer's spans depend on the tokens alone; later layers see what the cap changed
    torch.testing.assert_close(capped[0], spans[0].clamp(max=6.0))
    assert (cut - full).abs().max() > 1e-3  # the memory mattered to some tokens
    with capped_spans(model, float(spans.max()) + 1):
        same, _ = stream(model, x)
    torch.testing.assert_close(same, full, atol=0, rtol=0)
    after, _ = stream(model, x)  # the cap is gone outside the block
    torch.testing.assert_close(after, full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="expire-span model"):
        with capped_spans(tiny_model("transformer-xl"), 4.0):
            pass

def test_cut_effect_by_hand():
    ln2 = torch.log(torch.tensor(2.0))
    full = torch.zeros(2, 50)
    cut = full.clone()
    cut[0, 3] = 4 * ln2  # one token rises by 4 bits, one by 1 bit, one falls by 2
    cut[1, 7] = 1 * ln2
    cut[1, 8] = -2 * ln2
    effect = cut_effect(full, cut, top_fraction=0.01)  # 1% of 100 tokens: the top one
    assert effect["top_tokens"] == 1
    assert effect["top_mean_change_bits"] == pytest.approx(4.0)
    assert effect["mean_change_bits"] == pytest.approx(3.0 / 100)
    assert effect["top_share_of_rise"] == pytest.approx(4.0 / 5.0)

def test_character_classes_by_hand():
    train = "And Moses said unto the people, and the people said. " * 25 + "Moses spake."
    counts = word_counts(train)
    assert counts["and"] == 50 and counts["spake"] == 1
    assert names(train) == {"moses"}
    text = "And Moses spake 12;\nthe"
    classes = character_classes(text, counts, names(train))
    expected = (["frequent word"] * 3 + ["space"] + ["name"] * 5 + ["space"]
                + ["rare word"] * 5 + ["space"] + ["digit"] * 2 + ["punctuation"]
                + ["newline"] + ["frequent word"] * 3)
    assert classes == expected

def test_class_spans_by_hand():
    spans = torch.tensor([[1.0, 2.0, 3.0, 10.0], [0.0, 0.0, 4.0, 8.0]])
    rows = class_spans(spans, ["space", "space", "name", "punctuation"])
    assert rows == [
        {"class": "name", "characters": 1, "layer_0_mean_span": 3.0, "layer_1_mean_span": 4.0},
        {"class": "punctuation", "characters": 1, "layer_0_mean_span": 10.0,
         "layer_1_mean_span": 8.0},
        {"class": "space", "characters": 2, "layer_0_mean_span": 1.5, "layer_1_mean_span": 0.0},
    ]
    with pytest.raises(ValueError, match="4 spans for 3"):
        class_spans(spans, ["space"] * 3)
