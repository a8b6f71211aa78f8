"""Bad inputs and odd outputs: one clear error, valid JSON, plain-text help."""

from __future__ import annotations

import json
import math

import pytest

from expire_span import ModelConfig
from expire_span.cli import bench, evaluate, generate, main, spans, train
from expire_span.tasks import available_tasks
from expire_span.training.loop import MetricsLog


def strict_json(text: str):
    """``json.loads`` refusing the non-standard ``NaN`` and ``Infinity``."""
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("field", ["alpha", "pre_div", "dropout", "init_percentage",
                                   "rope_base", "adapt_span_loss", "compress_loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_hyperparameters_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        ModelConfig(vocab_size=10, **{field: value})


def test_cli_rejects_alpha_nan_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--preset", "copy-test", "--alpha", "nan",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alpha must be a finite number" in err
    assert not (out / "checkpoints").exists()


def test_metrics_without_scored_positions_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.write({"step": 3, "loss": math.nan, "bpc": math.inf, "nested": {"x": [math.nan, 1.0]}})
    record = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert record == {"step": 3, "loss": None, "bpc": None, "nested": {"x": [None, 1.0]}}


def test_eval_output_is_valid_json_when_a_metric_is_nan(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--preset", "copy-test", "--steps", "1",
                 "--eval-every", "1", "--eval-batches", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: {"loss": math.nan})
    assert main(["eval", "--checkpoint", str(out), "--no-progress",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert strict_json(capsys.readouterr().out)["metrics"] == {"loss": None}
    assert strict_json((tmp_path / "eval.json").read_text())["metrics"] == {"loss": None}


def all_help_texts() -> dict[str, str]:
    texts = {name: module.build_parser().format_help()
             for name, module in [("bench", bench), ("eval", evaluate), ("generate", generate),
                                  ("spans", spans)]}
    for task in available_tasks():
        texts[f"train --task {task}"] = train.build_parser(task).format_help()
    return texts


def test_help_texts_are_plain_text():
    for command, text in all_help_texts().items():
        assert "``" not in text and ":func:" not in text and ":class:" not in text, command
        assert ":meth:" not in text and ":data:" not in text, command


def test_train_help_shows_the_schedule_entry_intact(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "After warm-up: constant or cosine (decay to 10% at the last step)" in text
