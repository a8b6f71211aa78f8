"""Object Collision: the vectorised generator against a step-by-step reference, caching, the
labelled positions, the metric and the presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    """The reported error is the percentage of labelled tokens whose label the trained model
    does not predict, recomputed here from its predictions over the validation stream (memory
    carried, reset where the task says a new simulation starts); and a model made to always
    answer q is reported wrong on exactly the labelled tokens whose label is not q (answering
    0, the class of unlabelled tokens, is always wrong: 100 %)."""
    run = RunConfig.from_dict({
        "task": "object-collision",
        "task_options": {"grid": 8, "train_frames": 2000, "valid_frames": 200,
                         "test_frames": 200, "simulation_frames": 1000},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 16, "max_span": 64},
        "train": {"steps": 20, "lr": 1e-2, "batch_size": 2, "seq_len": 32,
                  "eval_batch_size": 3, "eval_every": 20, "tensorboard": False},
    })
    trainer = Trainer(run, tmp_path / "run", progress=False)
    summary = trainer.fit()
    model, task = trainer.model.eval(), trainer.task
    batches = list(task.eval_batches("valid", 3, 32, trainer.train_cfg.eval_batches))
    wrong = labelled = 0
    labels = []
    memory = None
    with torch.no_grad():
        for batch in batches:
            if memory is not None and batch.reset is not None:
                memory = memory.reset(batch.reset)
            out = model(batch.tokens, memory)
            memory = out.memory
            scored = batch.weights > 0
            wrong += int((out.logits.argmax(-1) != batch.targets)[scored].sum())
            labelled += int(scored.sum())
            labels += batch.targets[scored].tolist()
    assert summary["primary_metric"] == "error"
    assert labelled > 0 and summary["metrics"]["positions"] == labelled
    assert summary["metrics"]["error"] == pytest.approx(100.0 * wrong / labelled, abs=1e-9)
    assert 0 < wrong < labelled  # a model right on some labels, wrong on others
    assert set(labels) <= {1, 2, 3, 4} and len(set(labels)) > 1

    with torch.no_grad():  # constant logits: 1 for quadrant q, 0 elsewhere
        model.layers[0].feed_forward[-1].weight.zero_()
        model.norm_out.weight.zero_()
        model.norm_out.bias.zero_()
        model.norm_out.bias[0] = 1.0
        for quadrant in (0, 1, 2, 3, 4):
            model.head.weight.zero_()
            model.head.weight[quadrant, 0] = 1.0
            error = trainer.evaluate()["error"]
            expected = 100.0 * sum(label != quadrant for label in labels) / len(labels)
            assert error == pytest.approx(expected, abs=1e-9)


RELEASED_COLLISION_MODEL = {
    # the authors' object_collision_{16,32,64}k.sh: --hid-sz 512 --inner-hid-sz 1024
    # --mem-sz 256 --nlayers 6 --nheads 4 --dropout 0.1 --pre-norm --expire-span
    # --expire-span-loss 2e-6 --expire-span-init-percentage 0.01 --expire-span-ramp 128
    # (--expire-span-noisy at 64k only)
    "d_model": 512, "d_inner": 1024, "block_len": 256, "n_layers": 6, "n_heads": 4,
    "dropout": 0.1, "pre_norm": True, "memory": "expire-span", "alpha": 2e-6,
    "init_percentage": 0.01, "ramp": 128,
}
RELEASED_COLLISION_TRAIN = {
    # --nepochs 100 --nbatches 1000 --batch-sz 512 --test-batch-sz 64 --lr 0.0001 --optim adam
    # --lr-warmup 1000 --grad-clip 0.1 (a block per step); the logging cadence is ours
    "steps": 100_000, "batch_size": 512, "eval_batch_size": 64, "lr": 1e-4, "warmup": 1000,
    "grad_clip": 0.1, "seq_len": 256,
}
OUR_CADENCE = {"eval_every": 1000, "log_every": 100, "checkpoint_every": 1000}


@pytest.mark.parametrize("span, noisy", [(16384, False), (32768, False), (65536, True)])
def test_gpu_presets_are_the_released_runs(span, noisy):
    """Every model and training value of the Object Collision presets, against the released
    scripts (nothing more, nothing less: an added or changed key fails), the paper's data sizes
    (50M / 5M / 5M frames) and task (2 particles, 5 colours, 16 x 16, speed 0.5, p = 0.05), and
    the settings the library fills in (no pre-division, ramp loss form, no weight decay,
    constant schedule)."""
    config = get_preset(f"object-collision-{span // 1024}k").config
    assert config["task"] == "object-collision"
    assert set(config) == {"task", "task_options", "model", "train"}
    assert config["task_options"] == {"variant": "release", "grid": 16, "colours": 5}
    assert config["model"] == {**RELEASED_COLLISION_MODEL, "max_span": span, "noisy": noisy}
    assert config["train"] == {**RELEASED_COLLISION_TRAIN, **OUR_CADENCE}
    run = RunConfig.from_dict(config).resolved()  # builds (no data is generated yet)
    options = run.task_options
    assert (options["train_frames"], options["valid_frames"], options["test_frames"]) == (
        50_000_000, 5_000_000, 5_000_000)
    assert (options["particles"], options["colours"], options["grid"], options["speed"],
            options["colour_change"], options["variant"]) == (2, 5, 16, 0.5, 0.05, "release")
    assert run.model["pre_div"] == 1.0 and run.model["span_loss"] == "ramp"
    assert run.model["prune_expired"] and not run.model["tie_embeddings"]
    assert (run.train.weight_decay, run.train.schedule, run.train.accumulate) == (
        0.0, "constant", 1)


def test_enwik8_preset_is_the_released_run():
    """The authors' enwik8.sh for the 12-layer Expire-Span (SPEC.md section 5): every model
    value and training value (100 x 1000 steps at lr 7e-4, then to 110 x 1000 at 7e-5); the
    model has the paper's 38M parameters."""
    config = get_preset("enwik8-12l").config
    assert config["model"] == {
        "d_model": 512, "n_layers": 12, "n_heads": 8, "d_inner": 2048, "block_len": 512,
        "max_span": 16384, "dropout": 0.3, "pre_norm": False, "memory": "expire-span",
        "ramp": 128, "alpha": 1e-6, "init_percentage": 0.1, "noisy": True,
    }
    assert config["train"] == {
        "steps": 110_000, "batch_size": 512, "seq_len": 512, "lr": 7e-4, "lr_drop_at": 100_000,
        "lr_drop": 0.1, "warmup": 8000, "grad_clip": 0.3, "eval_batch_size": 128,
        **OUR_CADENCE,
    }
    run = RunConfig.from_dict(config)
    with torch.device("meta"):
        model = run.build_model(256)
    assert 37.5e6 < sum(p.numel() for p in model.parameters()) < 38.5e6


def test_every_task_has_a_listed_default_cpu_preset(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for task in available_tasks():
        assert f"* {DEFAULT_PRESETS[task]}" in listed
        assert get_preset(DEFAULT_PRESETS[task]).config["task"] == task
    for name in ("enwik8-12l", "object-collision-16k", "object-collision-32k",
                 "object-collision-64k"):
        assert name in listed
