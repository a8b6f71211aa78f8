"""Generation and span analysis of a trained text model from the command line."""

from __future__ import annotations

import json
import shutil

import pytest

from expire_span.cli import main
from tests.test_training import TINY


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny character-level model trained a few steps; its data folder is then deleted, so
    everything below works from the checkpoint alone."""
    root = tmp_path_factory.mktemp("text")
    data = root / "data"
    data.mkdir()
    (data / "book.txt").write_text("the cat sat on the mat. " * 60 + "é", encoding="utf-8")
    out = root / "run"
    config = root / "run.json"
    config.write_text(json.dumps({"model": TINY["model"], "train": TINY["train"]}))
    assert main(["train", "--no-progress", "--task", "text", "--data", str(data), "--config",
                 str(config), "--out", str(out)]) == 0
    shutil.rmtree(data)
    return out


def generate(run, *args):
    return main(["generate", "--checkpoint", str(run), "--max-new-tokens", "40", *args])


def test_generation_with_a_seed_is_reproducible(text_run, capsys):
    assert generate(text_run, "--prompt", "the cat", "--seed", "3") == 0
    first = capsys.readouterr().out
    assert generate(text_run, "--prompt", "the cat", "--seed", "3") == 0
    assert capsys.readouterr().out == first
    assert len(first.rstrip("\n")) == 40
    assert set(first.rstrip("\n")) <= set("the cat sat on the mat. ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "the dog"], "never saw in training: 'dg'"),
        (["--prompt-file", "/nonexistent.txt"], "prompt file not found"),
    ],
)
def test_generation_rejects_bad_prompts(text_run, capsys, args, message):
    assert generate(text_run, *args) == 1
    assert message in capsys.readouterr().err


def test_generation_needs_a_text_task(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "copy"
    assert main(["train", "--no-progress", "--config", str(config), "--out", str(run)]) == 0
    assert generate(run, "--prompt", "x") == 1
    assert "has no text form" in capsys.readouterr().err


def test_spans_command_renders_a_text(text_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the mat sat on the cat.", encoding="utf-8")
    out = tmp_path / "spans"
    assert main(["spans", "--checkpoint", str(text_run), "--text", str(text),
                 "--out", str(out)]) == 0
    page = (tmp_path / "spans.html").read_text()
    assert page.count('title="layer 0: span') == len("the mat sat on the cat.")
    assert (tmp_path / "spans.png").stat().st_size > 1000
    assert "mean span" in capsys.readouterr().out
