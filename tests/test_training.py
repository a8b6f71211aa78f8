"""Trainer, checkpoints and the command line: outputs, resume, failures, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from expire_span import available_policies
from expire_span.cli import main
from expire_span.training import (
    CheckpointError,
    RunConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    get_preset,
    load_checkpoint,
)
from expire_span.training.checkpoint import sha256

TINY = {
    "task": "copy",
    "task_options": {"symbols": 2, "gap": 6, "alphabet": 4},
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 4, "max_span": 16,
              "ramp": 2, "alpha": 1e-3, "init_percentage": 0.8},
    "train": {"steps": 6, "batch_size": 3, "seq_len": 8, "lr": 1e-2, "warmup": 2,
              "eval_every": 3, "eval_batches": 2, "log_every": 2, "checkpoint_every": 2,
              # no hold: its deadline is a fraction of train.steps, which resumes here extend
              "aux_hold": 0.0},
}


def tiny_run(memory: str = "expire-span", **train) -> RunConfig:
    config = json.loads(json.dumps(TINY))
    config["model"]["memory"] = memory
    config["train"].update(train)
    return RunConfig.from_dict(config)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_metrics_checkpoints_and_summary(tmp_path):
    summary = Trainer(tiny_run(), tmp_path, progress=False).fit()
    assert {"task", "model", "steps", "metrics", "avg_memory_size"} <= set(summary)
    assert summary["steps"] == 6 and summary["task"] == "copy"
    assert summary["model"] == "expire-span"
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6]
    for record in train:
        assert {"loss", "aux_loss", "memory_size", "cache_size", "lr", "tokens_per_s"} <= set(
            record
        )
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest == "step-00000006"
    files = {p.name for p in (tmp_path / "checkpoints" / latest).iterdir()}
    assert files == {"model.safetensors", "config.json", "trainer.pt", "memory.safetensors",
                     "checksums.json"}
    # keep_checkpoints=2: older ones are removed
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 2
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["model"]["pre_norm"] is True  # every field is recorded, not just given ones
    assert recorded["task_options"]["data_seed"] == 0


@pytest.mark.parametrize("memory", available_policies())
def test_resume_continues_exactly(tmp_path, memory):
    straight = Trainer(tiny_run(memory), tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(tiny_run(memory, steps=4), tmp_path / "b", progress=False)
    first.fit()
    resumed = Trainer(None, tmp_path / "b", resume=True, resume_overrides={"steps": 6},
                      progress=False)
    assert resumed.start_step == 4
    resumed.fit()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    train_a = [(r["step"], r["loss"]) for r in a if r["split"] == "train"]
    train_b = [(r["step"], r["loss"]) for r in b if r["split"] == "train"]
    assert train_a == train_b  # the log holds each step once, with the same values
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], abs=1e-6)


SPAN_PARAMETERS = {"expire-span": "span_predictor.", "adaptive-span": "span_fraction"}


@pytest.mark.parametrize("memory", sorted(SPAN_PARAMETERS))
def test_span_lr_scale_scales_the_first_step_of_the_span_parameters_only(tmp_path, memory):
    """Adam's first step moves every parameter by lr * sign(gradient): with the factor s the
    span parameters move s times as far and nothing else changes."""
    moves = {}
    for scale in (1.0, 0.25):
        run = tiny_run(memory, steps=1, eval_every=1, checkpoint_every=1)
        run.model.update(span_lr_scale=scale, init_percentage=0.3)  # spans 4.8: ramps reached
        trainer = Trainer(run, tmp_path / str(scale), progress=False)
        start = params(trainer.model)
        trainer.fit()
        moves[scale] = {k: v - start[k] for k, v in params(trainer.model).items()}
    span_names = [k for k in moves[1.0] if SPAN_PARAMETERS[memory] in k]
    assert span_names
    for name, move in moves[1.0].items():
        expected = 0.25 * move if name in span_names else move
        torch.testing.assert_close(moves[0.25][name], expected, rtol=1e-4, atol=1e-9)
    assert any(moves[1.0][k].abs().max() > 0 for k in span_names)


def test_a_whole_number_span_lr_scale_from_a_config_file_also_makes_a_group():
    from expire_span.training.loop import parameter_groups

    run = tiny_run()
    run.model["span_lr_scale"] = 4  # JSON and TOML give integers for whole numbers
    model = run.build_model(16)
    groups = parameter_groups(model, 1e-3)
    assert [group["lr"] for group in groups] == [1e-3, 4e-3]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        p.numel() for p in model.layers[0].policy.parameters())


@pytest.mark.parametrize("memory", sorted(SPAN_PARAMETERS))
def test_resume_with_a_span_parameter_group_continues_exactly(tmp_path, memory):
    def run(steps):
        config = tiny_run(memory, steps=steps)
        config.model["span_lr_scale"] = 0.5
        return config

    straight = Trainer(run(6), tmp_path / "a", progress=False)
    straight.fit()
    assert len(straight.optimizer.param_groups) == 2
    Trainer(run(4), tmp_path / "b", progress=False).fit()
    resumed = Trainer(None, tmp_path / "b", resume=True, resume_overrides={"steps": 6},
                      progress=False)
    resumed.fit()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)


def test_a_learning_rate_drop_continues_a_finished_run_as_if_planned(tmp_path):
    """The released enwik8 run's second phase: a run planned with its drop at step 4 (lr x 0.1
    for steps 5 and 6) equals a 4-step run without it continued by --resume with --steps 6
    --lr-drop-at 4, to the bit, and both log the dropped rate from step 5 on."""
    planned = Trainer(tiny_run(lr_drop_at=4, log_every=1), tmp_path / "a", progress=False)
    planned.fit()
    Trainer(tiny_run(steps=4, log_every=1), tmp_path / "b", progress=False).fit()
    resumed = Trainer(None, tmp_path / "b", resume=True,
                      resume_overrides={"steps": 6, "lr_drop_at": 4}, progress=False)
    resumed.fit()
    for name, value in params(planned.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)
    lr = TINY["train"]["lr"]
    rates = {run: {r["step"]: r["lr"] for r in read_metrics(tmp_path / run)
                   if r["split"] == "train"} for run in ("a", "b")}
    # a record's lr is the rate of the step after it (the scheduler has stepped); run b's
    # record of step 4 was written before the drop was planned
    assert rates["a"][3] == rates["b"][3] == rates["b"][4] == pytest.approx(lr)
    assert rates["a"][4] == pytest.approx(0.1 * lr)
    assert rates["a"][5] == rates["b"][5] == pytest.approx(0.1 * lr)
    unplanned = Trainer(tiny_run(log_every=1), tmp_path / "c", progress=False)
    unplanned.fit()
    assert any(not torch.equal(params(unplanned.model)[name], value)
               for name, value in params(planned.model).items())


def test_learning_rate_factor_of_the_enwik8_preset():
    """enwik8-12l: warm-up over 8000 steps, 7e-4 up to step 100k, 7e-5 for the last 10k."""
    from expire_span.training.loop import learning_rate_factor

    run = RunConfig.from_dict(get_preset("enwik8-12l").config)
    factor = learning_rate_factor(run.train)
    rates = {step: run.train.lr * factor(step) for step in (0, 3999, 7999, 8000, 99_999,
                                                             100_000, 109_999)}
    assert rates[0] == pytest.approx(7e-4 / 8000) and rates[3999] == pytest.approx(3.5e-4)
    assert rates[7999] == rates[8000] == rates[99_999] == pytest.approx(7e-4)
    assert rates[100_000] == rates[109_999] == pytest.approx(7e-5)
    assert run.train.steps == 110_000


@pytest.mark.parametrize("field, value", [("lr_drop_at", -1), ("lr_drop", 0.0),
                                          ("lr_drop", 1.5)])
def test_bad_learning_rate_drops_are_refused(field, value):
    with pytest.raises(ValueError, match=f"train.{field}"):
        tiny_run(**{field: value})


def test_interrupt_saves_a_checkpoint_and_resume_loses_nothing(tmp_path, monkeypatch):
    straight = Trainer(tiny_run(checkpoint_every=100), tmp_path / "a", progress=False)
    straight.fit()

    trainer = Trainer(tiny_run(checkpoint_every=100), tmp_path / "b", progress=False)
    original = trainer.task.batch

    def batch_then_signal(split, step, rows, seq_len):
        if split == "train" and step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step still completes
        return original(split, step, rows, seq_len)

    monkeypatch.setattr(trainer.task, "batch", batch_then_signal)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        trainer.fit()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-00000003"
    resumed = Trainer(None, tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)


def scripted_validation(monkeypatch, trainer: Trainer, scores: list[float]) -> None:
    """Make the trainer's periodic evaluations return ``scores`` (as the primary metric) in
    turn."""
    original, remaining = trainer.evaluate, list(scores)

    def evaluate(split="valid", progress=False):
        return {**original(split, progress), trainer.task.primary_metric: remaining.pop(0)}

    monkeypatch.setattr(trainer, "evaluate", evaluate)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_the_best_validation_checkpoint_is_kept_through_worse_ones_and_a_resume(
        tmp_path, monkeypatch, higher_is_better):
    scores = [0.5, 0.9, 0.7] if higher_is_better else [0.9, 0.5, 0.7]
    trainer = Trainer(tiny_run(eval_every=2, keep_checkpoints=1), tmp_path, progress=False)
    monkeypatch.setattr(trainer.task, "higher_is_better", higher_is_better)
    scripted_validation(monkeypatch, trainer, scores)
    best_weights = {}
    original_save_best = trainer._save_best

    def save_best(*args):
        best_weights.update(params(trainer.model))
        return original_save_best(*args)

    monkeypatch.setattr(trainer, "_save_best", save_best)
    summary = trainer.fit()
    metric = trainer.task.primary_metric
    assert summary["best"] == {"step": 4, "metric": metric, "value": 0.5 if not
                               higher_is_better else 0.9}
    best = load_checkpoint(tmp_path / "checkpoints" / "best")
    assert best.step == 4
    for name, value in params(best.model).items():  # the weights of step 4, not the last ones
        torch.testing.assert_close(value, best_weights[name], atol=0, rtol=0)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000006"]
    # a resumed run knows the best so far: worse scores do not replace it
    resumed = Trainer(None, tmp_path, resume=True, resume_overrides={"steps": 10},
                      progress=False)
    monkeypatch.setattr(resumed.task, "higher_is_better", higher_is_better)
    scripted_validation(monkeypatch, resumed, [0.8, 0.7] if higher_is_better else [0.6, 0.7])
    assert resumed.fit()["best"]["step"] == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "best").step == 4


def test_the_best_shares_the_files_of_a_periodic_checkpoint_or_is_written_alone(
        tmp_path, monkeypatch):
    linked = Trainer(tiny_run(eval_every=2, keep_checkpoints=5), tmp_path / "a", progress=False)
    scripted_validation(monkeypatch, linked, [0.5, 0.9, 0.7])
    linked.fit()
    root = tmp_path / "a" / "checkpoints"
    for item in (root / "step-00000004").iterdir():  # the same files, not a second write
        assert (root / "best" / item.name).stat().st_ino == item.stat().st_ino
    alone = Trainer(tiny_run(eval_every=3), tmp_path / "b", progress=False)  # evals at 3 and 6,
    scripted_validation(monkeypatch, alone, [0.9, 0.5])  # checkpoints at 2, 4, 6
    alone.fit()
    best = load_checkpoint(tmp_path / "b" / "checkpoints" / "best", training_state=True)
    assert best.step == 3


def test_a_tie_goes_to_the_later_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_run(eval_every=2), tmp_path, progress=False)
    scripted_validation(monkeypatch, trainer, [0.9, 0.9, 0.5])
    assert trainer.fit()["best"]["step"] == 4


def test_keep_best_off_writes_no_best_checkpoint(tmp_path):
    Trainer(tiny_run(keep_best=False), tmp_path, progress=False).fit()
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_run(steps=10), tmp_path, progress=False)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if module.training and calls["n"] > 5 else output

    trainer.model.head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as error:
        trainer.fit()
    assert "NaN" in str(error.value) or "nan" in str(error.value)
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    loaded = load_checkpoint(tmp_path)
    assert loaded.path.name == latest
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    assert read_metrics(tmp_path)[-1]["event"] == "diverged"


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    Trainer(tiny_run(steps=2), tmp_path, progress=False).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_run(steps=2), tmp_path, progress=False)


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path):
    Trainer(tiny_run(), tmp_path, progress=False).fit()
    latest = tmp_path / "checkpoints" / "step-00000006"
    (latest / "model.safetensors").write_bytes(b"\x00" * 10)
    messages = []
    trainer = Trainer(None, tmp_path, resume=True, progress=False, echo=messages.append,
                      resume_overrides={"steps": 8})
    assert trainer.start_step == 4
    assert any("corrupt" in m for m in messages)


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    Trainer(tiny_run(steps=2), tmp_path, progress=False).fit()
    partial = tmp_path / "checkpoints" / ".step-00000004.abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path).path.name == "step-00000002"


def test_a_run_killed_in_its_first_checkpoint_write_starts_again_and_leftovers_go(tmp_path):
    """A kill during the first checkpoint write leaves only a hidden temporary directory: no
    checkpoint to resume, so a new start must be allowed (not refused as "already holds a
    run"); the next completed checkpoint removes what killed writes left behind, and a metrics
    line cut short by a kill does not stop a resume."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".step-00000002.abc").mkdir()
    (root / ".step-00000002.abc" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.xyz").write_bytes(b"step-")
    Trainer(tiny_run(steps=4), tmp_path, progress=False).fit()
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-00000002",
                                                      "step-00000004"]
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "split": "tra')
    resumed = Trainer(None, tmp_path, resume=True, resume_overrides={"steps": 6},
                      progress=False)
    assert resumed.start_step == 4
    assert all(json.loads(line)["step"] <= 4
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_a_deletion_killed_midway_never_leaves_a_damaged_checkpoint(tmp_path, monkeypatch):
    """Old checkpoints (beyond keep_checkpoints) are deleted; a crash in the middle of that
    (here: rmtree dies after removing one file) must leave every visible step-N loadable."""
    Trainer(tiny_run(steps=4, keep_checkpoints=2), tmp_path, progress=False).fit()
    rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        files = sorted(Path(path).rglob("*.safetensors"))
        if files:
            files[0].unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        Trainer(None, tmp_path, resume=True, resume_overrides={"steps": 6},
                progress=False).fit()
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    steps = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [p.name for p in steps][-1] == "step-00000006"
    for directory in steps:
        load_checkpoint(directory, training_state=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "corrupt"),
        (lambda d: (d / "model.safetensors").unlink(), "missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is corrupt"),
        (lambda d: rewrite_checksummed(d, "config.json", '{"run": {}}'), "unreadable"),
        (lambda d: (d / "trainer.pt").write_bytes(b"xx"), "corrupt"),
        (lambda d: flip_byte(d / "model.safetensors"), "model.safetensors is corrupt"),
        (lambda d: flip_byte(d / "memory.safetensors"), "memory.safetensors is corrupt"),
        (lambda d: (d / "checksums.json").unlink(), "checksums.json is missing"),
    ],
)
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage, message):
    Trainer(tiny_run(steps=2), tmp_path, progress=False).fit()
    damage(tmp_path / "checkpoints" / "step-00000002")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, training_state=True)


def test_a_checkpoint_from_before_checksums_loads_unverified_with_a_warning(tmp_path, capsys):
    """Written by an older version (no checksums.json, no format in its config), it loads, says
    so, and resumes; a current checkpoint missing its checksums stays refused (above)."""
    Trainer(tiny_run(steps=2), tmp_path, progress=False).fit()
    directory = tmp_path / "checkpoints" / "step-00000002"
    (directory / "checksums.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    del config["format"]
    (directory / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(directory, training_state=True)
    assert "predates checksums" in capsys.readouterr().err
    assert loaded.trainer_state is not None and loaded.memory_tensors is not None
    Trainer(None, tmp_path, resume=True, resume_overrides={"steps": 3}, progress=False).fit()


def rewrite_checksummed(directory: Path, name: str, text: str) -> None:
    """Replace a checkpoint file and its recorded checksum (a file that is intact but wrong)."""
    (directory / name).write_text(text)
    manifest = json.loads((directory / "checksums.json").read_text())
    manifest["sha256"][name] = sha256(directory / name)
    (directory / "checksums.json").write_text(json.dumps(manifest))


def flip_byte(path: Path) -> None:
    """Overwrite one byte in the second half of a file: inside the tensor data of a
    safetensors file, which its format does not check."""
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_tensor_data_is_detected_and_eval_falls_back_to_an_intact_checkpoint(
        tmp_path, capsys):
    Trainer(tiny_run(steps=4), tmp_path, progress=False).fit()
    latest = tmp_path / "checkpoints" / "step-00000004"
    flip_byte(latest / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(latest)
    assert main(["eval", "--checkpoint", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 2
    assert captured.err.count("\n") == 1 and "skipped an unreadable checkpoint" in captured.err
    messages = []
    resumed = Trainer(None, tmp_path, resume=True, progress=False, echo=messages.append)
    assert resumed.start_step == 2 and any("corrupt" in m for m in messages)


def test_eval_does_not_need_the_memory_or_the_trainer_state(tmp_path, capsys):
    Trainer(tiny_run(steps=4), tmp_path, progress=False).fit()
    latest = tmp_path / "checkpoints" / "step-00000004"
    flip_byte(latest / "memory.safetensors")
    (latest / "trainer.pt").write_bytes(b"xx")
    assert main(["eval", "--checkpoint", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 4 and captured.err == ""


def test_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- command line


def cli(*args: str) -> int:
    return main(["train", "--no-progress", *args] if args and args[0].startswith("--") else
                list(args))


@pytest.mark.parametrize("memory", available_policies())
def test_cli_train_then_eval(tmp_path, capsys, memory):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items()}))
    out = tmp_path / "run"
    assert cli("--config", str(config), "--out", str(out), "--model", memory,
               "--steps", "4") == 0
    printed = capsys.readouterr().out
    assert "average memory size" in printed and "max span L=16" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == memory and summary["steps"] == 4
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert result["step"] == 4


def test_cli_precedence_preset_then_file_then_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nd_model = 24\nn_heads = 2\n[train]\nsteps = 3\nbatch_size = 2\n'
                      'seq_len = 8\neval_batches = 1\n')
    out = tmp_path / "run"
    assert cli("--preset", "copy-test", "--config", str(config), "--steps", "2",
               "--out", str(out)) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model"]["d_model"] == 24  # file over preset
    assert recorded["model"]["max_span"] == 128  # preset over library default
    assert recorded["train"]["steps"] == 2  # flag over file
    assert recorded["task_options"]["gap"] == 40


def test_cli_refuses_compressive_sizes_for_other_memories(tmp_path, capsys):
    """--mem-len used to be ignored silently by Transformer-XL (whose window is --max-span)."""
    out = tmp_path / "run"
    assert cli("--memory", "transformer-xl", "--mem-len", "8", "--out", str(out)) == 1
    assert "--mem-len size Compressive's memory" in capsys.readouterr().err
    assert not out.exists()


def test_cli_resume_refuses_to_change_the_model(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert cli("--config", str(config), "--out", str(out), "--steps", "2") == 0
    assert cli("--out", str(out), "--resume", "--alpha", "0.5") == 1
    assert "cannot change model.alpha" in capsys.readouterr().err
    assert cli("--out", str(out), "--resume", "--steps", "4") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ramp", "0"], "ramp"),
        (["--max-span", "2", "--block-len", "4"], "max_span"),
        (["--model", "lstm"], "unknown memory policy"),
        (["--preset", "nope"], "unknown preset"),
        (["--config", "missing.toml"], "config file not found"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(tmp_path, capsys, args, message):
    assert cli(*args, "--out", str(tmp_path / "x")) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_cli_resume_needs_a_run_directory(tmp_path, capsys):
    assert cli("--resume") == 1
    assert "--resume needs --out" in capsys.readouterr().err
    assert cli("--resume", "--out", str(tmp_path)) == 1
    assert "no checkpoint found" in capsys.readouterr().err


def test_cli_eval_of_a_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_presets_lists_the_defaults(capsys):
    assert main(["presets"]) == 0
    assert "copy-cpu" in capsys.readouterr().out


@pytest.fixture(scope="module")
def branch_source(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 4 and 6 (never changed by the tests)."""
    root = tmp_path_factory.mktemp("branch-source")
    config = root / "run.json"
    config.write_text(json.dumps(TINY))
    assert cli("--config", str(config), "--out", str(root / "run"), "--steps", "6") == 0
    return root / "run"


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_a_branch_without_changes_continues_exactly_like_the_source(tmp_path, branch_source):
    # Branched from step 4 of a 6-step run and trained to 6 with nothing changed: the weights
    # and the log equal the source's (the weights, optimizer, random states and memory all come
    # with the branch; the copied log is cut at the checkpoint and continued).
    source, out = branch_source, tmp_path / "branch"
    assert cli("--branch-from", str(source / "checkpoints" / "step-00000004"),
               "--out", str(out)) == 0
    for name, value in params(load_checkpoint(source).model).items():
        torch.testing.assert_close(params(load_checkpoint(out).model)[name], value,
                                   atol=0, rtol=0)
    assert untimed(read_metrics(out)) == untimed(read_metrics(source))


def test_a_branch_changes_the_losses_and_keeps_its_source(tmp_path, branch_source):
    source = branch_source
    before = sha256(source / "checkpoints" / "step-00000004" / "config.json")
    out = tmp_path / "branch"
    assert cli("--branch-from", str(source / "checkpoints" / "step-00000004"), "--out", str(out),
               "--alpha", "0.5", "--span-loss", "l1", "--steps", "8") == 0
    loaded = load_checkpoint(out)
    assert loaded.step == 8
    assert (loaded.model.config.alpha, loaded.model.config.span_loss) == (0.5, "l1")
    assert json.loads((out / "config.json").read_text())["model"]["alpha"] == 0.5
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [2, 4, 6, 8]
    assert sha256(source / "checkpoints" / "step-00000004" / "config.json") == before
    assert load_checkpoint(source).model.config.alpha == TINY["model"]["alpha"]


@pytest.mark.parametrize("args, message", [
    (["--d-model", "32"], "a branch cannot change d_model"),
    (["--gap", "3"], "cannot change task_options.gap in a branch"),
    (["--resume"], "--branch-from needs --out"),
])
def test_a_branch_refuses_what_it_cannot_continue(tmp_path, capsys, branch_source, args,
                                                  message):
    capsys.readouterr()
    assert cli("--branch-from", str(branch_source), "--out", str(tmp_path / "b"), *args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_branch_needs_a_new_directory(tmp_path, capsys, branch_source):
    capsys.readouterr()
    assert cli("--branch-from", str(branch_source), "--out", str(branch_source)) == 1
    assert "is not empty" in capsys.readouterr().err
