"""Span analysis and training curves."""

from __future__ import annotations

import json

import pytest
import torch

from expire_span.analysis import plot_run, render_html, render_png, token_spans
from expire_span.cli import main
from tests.helpers import tiny_model
from tests.test_training import TINY


def test_token_spans_of_the_first_layer_match_the_predictor_on_embeddings():
    model = tiny_model("expire-span", init_percentage=0.4)
    tokens = torch.randint(0, 13, (50,), generator=torch.Generator().manual_seed(0))
    spans = token_spans(model, tokens)
    assert spans.shape == (2, 50)
    layer = model.layers[0]
    with torch.no_grad():
        inputs = layer.norm_attention(model.embedding(tokens))
        expected = layer.policy.spans(inputs.unsqueeze(0))[0]
    torch.testing.assert_close(spans[0], expected, atol=1e-4, rtol=1e-5)
    assert (spans >= 0).all() and (spans <= model.config.max_span).all()


def test_token_spans_refuse_other_policies_and_empty_input():
    with pytest.raises(ValueError, match="expire-span model"):
        token_spans(tiny_model("transformer-xl"), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        token_spans(tiny_model(), torch.tensor([], dtype=torch.long))


def test_renderers_write_a_heat_map_and_a_page_with_values_on_hover(tmp_path):
    text = list("a <b> & c\nd")
    spans = torch.linspace(0, 24, len(text)).repeat(2, 1)
    render_png(text, spans, 24, tmp_path / "s.png", "t", columns=5)
    render_html(text, spans, 24, tmp_path / "s.html", "t")
    assert (tmp_path / "s.png").stat().st_size > 1000
    page = (tmp_path / "s.html").read_text()
    assert page.count('title="layer 0: span') == len(text)
    assert ">&lt;</span>" in page and ">&amp;</span>" in page and "<b>" not in page
    assert 'title="layer 1: span 24"' in page


def test_plot_command_draws_a_run(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--config", str(config), "--out", str(run)]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["memory_size_per_layer"]) == TINY["model"]["n_layers"]
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path, tmp_path / "x.png")


def test_spans_command_needs_a_text_task(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--config", str(config), "--out", str(run)]) == 0
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["spans", "--checkpoint", str(run), "--text", str(text)]) == 1
    assert "has no text form" in capsys.readouterr().err
