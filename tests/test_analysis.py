"""Span analysis and training curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from expire_span.analysis import plot_run, render_html, render_png, token_spans
from expire_span.cli import main
from expire_span.training.config import vocab_size
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


def test_agent_spans_record_each_new_state_with_the_observation_that_made_it():
    from expire_span.analysis.agent_spans import (
        agent_spans,
        mean_spans_by,
        outcomes_by_length,
        start_groups,
    )
    from expire_span.training import RunConfig, get_preset

    run = RunConfig.from_dict(get_preset("corridor-test").config)
    run.model["memory"] = "expire-span"
    task = run.build_task()
    torch.manual_seed(0)
    agent = run.build_model(vocab_size(task))
    layer = agent.transformer.layers[0]
    torch.nn.init.normal_(layer.policy.span_predictor.weight, std=1.0)
    record = agent_spans(agent, task, steps=60, num_envs=3)
    assert record.spans.shape == (agent.config.n_layers, 60, 3)
    cue = record.observations[..., 0] < task.options.colours
    assert (record.episode_start == cue).all()  # the cue is shown at an episode's first step only
    assert record.episode_start[0].all()
    with torch.no_grad():  # a cue step reads (cue c, no previous action, reward 0)
        for colour in range(task.options.colours):
            inputs = agent.embed(torch.tensor([[[colour]]]), torch.tensor([[agent.num_actions]]),
                                 torch.zeros(1, 1))
            expected = layer.policy.spans(layer.norm_attention(inputs))[0, 0]
            chosen = torch.as_tensor(record.observations[..., 0] == colour)
            if bool(chosen.any()):
                torch.testing.assert_close(record.spans[0][chosen],
                                           expected.expand(int(chosen.sum())))
    table = mean_spans_by(record.spans, {"cue": cue, "none": cue & ~cue})
    assert set(table) == {"cue"} and table["cue"]["steps"] == int(cue.sum())
    groups, kinds = start_groups(record)  # one group per cue colour seen
    assert [observation[0] for observation in kinds] == sorted(
        set(record.observations[..., 0][cue].tolist()))
    for kind, observation in enumerate(kinds):
        chosen = groups[f"episode start, observation {kind}"]
        assert (chosen == (record.observations[..., 0] == observation[0])).all()
    assert (groups["other steps"] == ~cue).all()
    assert start_groups(record, max_kinds=len(kinds) - 1)[1] == []
    # every finished episode began at a recorded episode start (or before the recording)
    assert record.episodes
    for episode in record.episodes:
        if episode.start is not None:
            assert record.episode_start[episode.start, episode.env]
            following = record.episode_start[episode.start + 1:episode.start + episode.length,
                                             episode.env]
            assert not following.any()
    rows = outcomes_by_length(record, [0, 1000])
    complete = [e for e in record.episodes if e.start is not None]
    assert rows[0]["episodes"] == len(complete)
    assert rows[0]["success"] == pytest.approx(np.mean([e.success for e in complete]))
    first = [float(record.spans[0, e.start, e.env]) for e in complete]
    assert rows[0]["first_step_span"][0] == pytest.approx(np.mean(first), rel=1e-5)
    assert outcomes_by_length(record, [1000, 2000]) == []
