"""Object Collision: the vectorised generator against a step-by-step reference, caching, the
labelled positions, the metric and the presets."""

from __future__ import annotations

import numpy as np
import pytest

from expire_span.cli import main
from expire_span.tasks import available_tasks, build_task
from expire_span.tasks.object_collision import CollisionOptions, CollisionSimulator
from expire_span.training import DEFAULT_PRESETS, RunConfig, Trainer, get_preset
from tests.collision_reference import reference_simulation

OPTION_SETS = [  # the release variant on the paper's board: test_object_collision_generator.py
    {"variant": "simple"},  # 2 particles, 5 colours, 16x16, speed 0.5
    {"particles": 3, "colours": 3, "grid": 6, "speed": 0.9, "colour_change": 0.2, "data_seed": 3},
    {"particles": 4, "colours": 2, "grid": 4, "speed": 1.2, "easy_query": 0.9, "data_seed": 1,
     "variant": "simple"},
]


@pytest.mark.parametrize("values", OPTION_SETS)
def test_vectorised_generator_matches_the_step_by_step_reference(values):
    options = CollisionOptions(**values)
    simulator = CollisionSimulator(options)
    frames = 300
    for chunk in (None, 7):  # state carried across chunks of frames gives the same frames
        tokens, labels = simulator.simulate("valid", np.arange(3), frames, chunk=chunk)
        for sim in range(3):
            ref_tokens, ref_labels = reference_simulation(options, "valid", sim, frames)
            assert tokens[sim].reshape(-1).tolist() == ref_tokens
            assert labels[sim].tolist() == ref_labels
    assert (labels > 0).any()  # collisions happened, so labels were exercised


def test_the_default_board_has_collisions_in_every_quadrant():
    _, labels = CollisionSimulator(CollisionOptions()).simulate("train", np.arange(40), 2000)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert (counts[1:] > 0.1 * counts[1:].sum()).all()


def small(**values):
    base = {"train_frames": 900, "valid_frames": 500, "test_frames": 300,
            "simulation_frames": 200}
    return build_task("object-collision", {**base, **values})


def test_splits_are_cached_simulations_equal_to_the_reference(tmp_path):
    task = small(cache_dir=str(tmp_path))
    documents = task.documents("valid")
    assert documents.lengths.tolist() == [200 * 8, 200 * 8, 100 * 8]
    for sim, frames in enumerate((200, 200, 100)):
        ref_tokens, ref_labels = reference_simulation(task.options, "valid", sim, frames)
        start = sim * 200
        assert documents.tokens[start * 8:(start + frames) * 8].tolist() == ref_tokens
        assert documents.labels[start:start + frames].tolist() == ref_labels
    cached = sorted(tmp_path.glob("object-collision-valid-*"))
    assert len(cached) == 1
    stamp = (cached[0] / "tokens.npy").stat().st_mtime_ns
    again = small(cache_dir=str(tmp_path)).documents("valid")  # read back, not regenerated
    assert (cached[0] / "tokens.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(again.tokens, documents.tokens)
    small(cache_dir=str(tmp_path), data_seed=1).documents("valid")
    assert len(sorted(tmp_path.glob("object-collision-valid-*"))) == 2
    assert not np.array_equal(small(cache_dir=str(tmp_path), data_seed=1)
                              .documents("valid").tokens, documents.tokens)


def test_only_the_last_token_of_a_frame_is_labelled_and_scored():
    task = small(grid=6)  # a small board: collisions in every short simulation
    assert task.vocab_size == 2 * 6 + 2 * 5
    labels = task.documents("valid").labels
    per_row, frames = [[], [], []], 0
    for batch in task.eval_batches("valid", 3, 24, 1):
        assert int(batch.tokens.max()) < task.vocab_size
        labelled = batch.targets > 0
        assert (batch.weights.bool() == labelled).all()
        assert (batch.targets <= 4).all()
        frames += int((batch.tokens >= 2 * 6 + 5).sum()) // 2  # two query tokens per frame
        for r in range(3):
            per_row[r] += batch.targets[r][labelled[r]].tolist()
    assert frames == 500
    assert sum(per_row, []) == [int(x) for x in labels[:500] if x > 0]
    train = task.batch("train", 5, range(4), 400)
    positions = train.targets.nonzero()[:, 1]
    assert len(positions) > 0 and ((positions + 1) % 8 == 0).all()  # frames start at 0 mod T


def test_error_rate_is_a_percentage_of_labelled_positions():
    task = small()
    assert task.primary_metric == "error" and not task.higher_is_better
    assert task.derived_metrics(1.3, 0.25) == {"error": pytest.approx(75.0)}


@pytest.mark.parametrize(
    "values, message",
    [({"particles": 1}, "particles"), ({"grid": 1}, "grid"), ({"speed": 8.0}, "speed"),
     ({"colour_change": 1.5}, "colour_change"), ({"valid_frames": 0}, "valid_frames"),
     ({"eval_tokens": 0}, "eval_tokens")],
)
def test_invalid_options(values, message):
    with pytest.raises(ValueError, match=message):
        build_task("object-collision", values)


def test_a_short_training_run_reports_the_error_rate(tmp_path):
    run = RunConfig.from_dict({
        "task": "object-collision",
        "task_options": {"grid": 8, "train_frames": 2000, "valid_frames": 200,
                         "test_frames": 200, "simulation_frames": 1000},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 16, "max_span": 64},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 32, "eval_batch_size": 3},
    })
    summary = Trainer(run, tmp_path / "run", progress=False).fit()
    assert summary["primary_metric"] == "error"
    assert 0 <= summary["metrics"]["error"] <= 100
    assert summary["metrics"]["positions"] > 0


def test_gpu_presets_carry_the_papers_hyperparameters():
    spans = {"object-collision-16k": 16384, "object-collision-32k": 32768,
             "object-collision-64k": 65536}
    for name, span in spans.items():
        config = get_preset(name).config
        model, train = config["model"], config["train"]
        assert (model["max_span"], model["n_layers"], model["d_model"], model["d_inner"],
                model["n_heads"], model["block_len"]) == (span, 6, 512, 1024, 4, 256)
        assert model["pre_norm"] and train["lr"] == 1e-4 and model["alpha"] == 2e-6
        run = RunConfig.from_dict(config).resolved()  # builds (no data is generated yet)
        assert run.task_options["train_frames"] == 50_000_000
    enwik8 = get_preset("enwik8-12l").config
    assert (enwik8["model"]["n_layers"], enwik8["model"]["max_span"],
            enwik8["model"]["block_len"], enwik8["train"]["lr"]) == (12, 16384, 512, 7e-4)


def test_every_task_has_a_listed_default_cpu_preset(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for task in available_tasks():
        assert f"* {DEFAULT_PRESETS[task]}" in listed
        assert get_preset(DEFAULT_PRESETS[task]).config["task"] == task
    for name in ("enwik8-12l", "object-collision-16k", "object-collision-32k",
                 "object-collision-64k"):
        assert name in listed
