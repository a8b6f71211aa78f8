"""PPO training of memory agents: learning, outputs, resume, evaluation and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from expire_span.cli import main
from expire_span.training import RLConfig, RLTrainer, RunConfig, get_preset, load_checkpoint
from expire_span.training.config import vocab_size
from expire_span.training.ppo import Rollout, replay
from expire_span.training.presets import PRESETS
from expire_span.training.rollout import Episode, evaluate_agent

TINY = {
    "task": "corridor",
    "task_options": {"colours": 2, "min_length": 2, "max_length": 3},
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 2, "max_span": 8,
              "ramp": 2, "init_percentage": 0.9},
    "train": {"steps": 4, "batch_size": 3, "seq_len": 5, "lr": 1e-3, "warmup": 0,
              "eval_every": 2, "eval_batches": 2, "log_every": 2, "checkpoint_every": 2,
              "aux_hold": 0.0},  # runs extended on resume must not depend on the hold's end
    "rl": {"epochs": 2},
}


def tiny_run(rl: dict | None = None, model: dict | None = None, **train) -> RunConfig:
    config = json.loads(json.dumps(TINY))
    config["train"].update(train)
    config["rl"].update(rl or {})
    config["model"].update(model or {})
    return RunConfig.from_dict(config)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ppo_improves_a_tiny_agent_on_a_short_corridor(tmp_path):
    run = RunConfig.from_dict(get_preset("corridor-test").config)
    trainer = RLTrainer(run, tmp_path, progress=False)
    before = trainer.evaluate()
    summary = trainer.fit()
    assert before["success_rate"] < 0.75  # chance is 0.5: the untrained agent cannot beat it
    assert summary["success_rate"] >= 0.9
    assert summary["metrics"]["episodes"] == run.train.batch_size * run.train.eval_batches


def test_training_writes_metrics_checkpoints_and_a_summary(tmp_path):
    summary = RLTrainer(tiny_run(), tmp_path, progress=False).fit()
    assert {"success_rate", "mean_return", "avg_memory_size", "cache_size"} <= set(summary)
    assert summary["task"] == "corridor" and summary["primary_metric"] == "success_rate"
    assert summary["steps"] == 4 and summary["max_span"] == 8
    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert [r["step"] for r in records if r["split"] == "valid"] == [2, 4]
    for record in train:
        assert {"success_rate", "mean_return", "episodes", "policy_loss", "value_loss", "entropy",
                "aux_loss", "aux_weight", "memory_size", "memory_at_decision", "cache_size", "lr",
                "env_steps_per_s"} <= set(record)
    assert "memory_at_decision" in summary and "memory_at_decision" in summary["metrics"]
    files = {p.name for p in (tmp_path / "checkpoints" / "step-00000004").iterdir()}
    assert files == {"model.safetensors", "config.json", "trainer.pt", "memory.safetensors",
                     "checksums.json"}
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["rl"]["gamma"] == 0.99 and recorded["rl"]["epochs"] == 2


@pytest.mark.parametrize("carry", [False, True], ids=["reset", "carried"])
def test_resume_continues_exactly(tmp_path, carry):
    rl = {"carry_memory": carry}
    straight = RLTrainer(tiny_run(rl), tmp_path / "a", progress=False)
    straight.fit()
    RLTrainer(tiny_run(rl, steps=2), tmp_path / "b", progress=False).fit()
    resumed = RLTrainer(None, tmp_path / "b", resume=True, progress=False,
                        resume_overrides={"steps": 4})
    assert resumed.start_step == 2
    resumed.fit()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r for r in a if r["split"] == "valid"] == [r for r in b if r["split"] == "valid"]
    keys = ("step", "episodes", "success_rate", "policy_loss", "memory_size", "aux_weight")
    assert ([[r[k] for k in keys] for r in a if r["split"] == "train"]
            == [[r[k] for k in keys] for r in b if r["split"] == "train"])


def test_curriculum_lengths_grow_from_a_tenth_to_the_options():
    task = RunConfig.from_dict(get_preset("corridor-long").config).build_task()
    assert (task.options.min_length, task.options.max_length) == (100, 200)
    assert task.options.step_limit is None  # 2 x (max_length + 1): it follows the lengths
    assert task.curriculum_options(0.0) == {"min_length": 10, "max_length": 20}
    assert task.curriculum_options(0.5) == {"min_length": 55, "max_length": 110}
    assert task.curriculum_options(1.0) == {"min_length": 100, "max_length": 200}
    assert task.curriculum_options(3.0) == task.curriculum_options(1.0)
    assert task.curriculum_options(0.0, start=0.5) == {"min_length": 50, "max_length": 100}
    assert task.curriculum_options(0.5, start=0.5) == {"min_length": 75, "max_length": 150}
    task.options.step_limit = 500
    assert task.curriculum_options(0.0)["step_limit"] == 50


def test_the_curriculum_can_start_elsewhere(tmp_path):
    """``rl.curriculum_start`` sets the first lengths of training and of the span rule."""
    run = tiny_run({"curriculum_updates": 2, "curriculum_start": 0.5}, seq_len=40)
    run.task_options.update(min_length=10, max_length=20)
    trainer = RLTrainer(run, tmp_path, progress=False)
    trainer._train_step(0)
    assert {env.options.max_length for env in trainer.runner.envs.get_attr("unwrapped")} == {10}
    config = get_preset("corridor-long").config
    staged = RunConfig.from_dict({**config, "rl": {**config["rl"], "curriculum_updates": 100,
                                                   "curriculum_start": 0.5}})
    assert staged.resolved().model["init_percentage"] * 512 == pytest.approx(1.25 * 100 + 2 + 4)
    with pytest.raises(ValueError, match="curriculum_start"):
        RLConfig(curriculum_start=0.0)


def test_with_a_curriculum_spans_start_above_its_first_dependency():
    config = get_preset("corridor-long").config
    plain = RunConfig.from_dict(config).resolved().model
    # the rule's starting span 1.25 x dependency + R' + M with R' = M / 2 = 2 and M = 4
    assert plain["init_percentage"] * 512 == pytest.approx(1.25 * 200 + 2 + 4)
    staged = RunConfig.from_dict({**config, "rl": {**config["rl"], "curriculum_updates": 100}})
    model = staged.resolved().model  # first lengths 10-20
    assert model["init_percentage"] * 512 == pytest.approx(1.25 * 20 + 2 + 4)
    assert model["adapt_span_init"] == model["init_percentage"]


def test_curriculum_sets_the_episode_lengths_of_each_update(tmp_path):
    run = tiny_run({"curriculum_updates": 3}, seq_len=40, log_every=1)
    run.task_options.update(min_length=10, max_length=20)
    trainer = RLTrainer(run, tmp_path, progress=False)
    longest = []
    for step in range(4):
        trainer._train_step(step)
        envs = trainer.runner.envs.get_attr("unwrapped")
        longest.append({env.options.max_length for env in envs})
        if step == 0:  # 20 x 0.1 = 2: every episode ends within its limit 2 x (2 + 1)
            assert trainer.interval.episodes
            assert max(e.length for e in trainer.interval.episodes) <= 6
    assert longest == [{2}, {8}, {14}, {20}]  # 20 x (0.1 + 0.9 x step / 3)
    evaluation = RLTrainer(run, tmp_path / "eval", progress=False).task.options
    assert evaluation.max_length == 20  # evaluation builds its episodes from the options


def test_curriculum_is_logged_and_resumes_exactly(tmp_path):
    rl = {"curriculum_updates": 3, "carry_memory": True}
    straight = RLTrainer(tiny_run(rl, log_every=1), tmp_path / "a", progress=False)
    straight.fit()
    RLTrainer(tiny_run(rl, steps=2, log_every=1), tmp_path / "b", progress=False).fit()
    resumed = RLTrainer(None, tmp_path / "b", resume=True, progress=False,
                        resume_overrides={"steps": 4})
    resumed.fit()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)
    levels = [r["curriculum_level"] for r in read_metrics(tmp_path / "b") if r["split"] == "train"]
    assert levels == pytest.approx([1 / 3, 2 / 3, 1, 1])  # after each update


def test_a_gated_curriculum_waits_for_the_success_rate(tmp_path):
    run = tiny_run({"curriculum_updates": 2, "curriculum_success": 0.6}, steps=1)
    trainer = RLTrainer(run, tmp_path, progress=False)

    def rollout(successes):
        return Rollout(*([None] * 10), finished=[Episode(0, s, 3, s) for s in successes])

    trainer._advance_curriculum(rollout([1.0, 0.0]))  # 0.5 < 0.6: wait
    assert trainer.curriculum_level == 0.0
    trainer._advance_curriculum(rollout([]))  # nothing finished: wait
    assert trainer.curriculum_level == 0.0
    trainer._advance_curriculum(rollout([1.0, 1.0, 0.0]))  # 0.67: advance
    assert trainer.curriculum_level == 0.5
    for _ in range(3):
        trainer._advance_curriculum(rollout([1.0]))
    assert trainer.curriculum_level == 1.0


def test_a_curriculum_steps_back_after_a_failed_update_but_not_from_the_full_lengths(tmp_path):
    run = tiny_run({"curriculum_updates": 3, "curriculum_success": 0.8,
                    "curriculum_retreat": 0.6}, steps=1)
    trainer = RLTrainer(run, tmp_path, progress=False)

    def rollout(successes):
        return Rollout(*([None] * 10), finished=[Episode(0, s, 3, s) for s in successes])

    trainer._advance_curriculum(rollout([0.0]))  # already at the start: stays
    assert trainer.curriculum_level == 0.0
    trainer._advance_curriculum(rollout([1.0]))
    trainer._advance_curriculum(rollout([1.0]))
    assert trainer.curriculum_level == pytest.approx(2 / 3)
    trainer._advance_curriculum(rollout([1.0, 0.0, 1.0]))  # 0.67: between the two, waits
    assert trainer.curriculum_level == pytest.approx(2 / 3)
    trainer._advance_curriculum(rollout([1.0, 0.0]))  # 0.5 < 0.6: one step back
    assert trainer.curriculum_level == pytest.approx(1 / 3)
    trainer._advance_curriculum(rollout([1.0, 1.0]))
    trainer._advance_curriculum(rollout([1.0, 1.0]))
    trainer._advance_curriculum(rollout([0.0]))  # the full lengths are kept
    assert trainer.curriculum_level == 1.0


def test_a_curriculum_cannot_retreat_above_its_advance_gate():
    with pytest.raises(ValueError, match="curriculum_retreat"):
        RLConfig(curriculum_success=0.5, curriculum_retreat=0.7)


def test_a_task_without_a_curriculum_refuses_one(tmp_path):
    run = RunConfig.from_dict({**get_preset("portal-long").config, "rl": {"curriculum_updates": 5}})
    with pytest.raises(ValueError, match="no episode-length curriculum"):
        RLTrainer(run, tmp_path, progress=False)


def test_evaluation_uses_fresh_seeds_and_is_reproducible(tmp_path):
    trainer = RLTrainer(tiny_run(), tmp_path, progress=False)
    agent, task = trainer.model.train(), trainer.task
    valid = evaluate_agent(agent, task, "valid", 4, 3, seed=0)
    assert agent.training  # the mode is restored
    again = evaluate_agent(agent.eval(), task, "valid", 4, 3, seed=0)
    assert not agent.training
    assert valid == again and valid["episodes"] == 12
    assert 0 <= valid["success_rate"] <= 1 and valid["memory_size"] > 0
    sampled = [evaluate_agent(agent, task, "test", 4, 3, seed=0, greedy_actions=False)
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]["episodes"] == 12
    # other splits and seeds give other episodes
    lengths = {evaluate_agent(agent, task, split, 4, 3, seed=seed)["mean_length"]
               for split, seed in (("valid", 0), ("test", 0), ("valid", 1), ("valid", 2))}
    assert len(lengths) > 1


def test_loaded_checkpoint_is_an_agent_with_the_same_weights(tmp_path):
    trainer = RLTrainer(tiny_run(steps=2), tmp_path, progress=False)
    trainer.fit()
    loaded = load_checkpoint(tmp_path)
    assert type(loaded.model) is type(trainer.model)
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(params(loaded.model)[name], value, atol=0, rtol=0)


def test_rl_options_are_refused_for_sequence_tasks():
    with pytest.raises(ValueError, match="reinforcement-learning tasks only"):
        RunConfig.from_dict({"task": "copy", "rl": {"gamma": 0.5}}).resolved()
    with pytest.raises(ValueError, match="unknown rl option"):
        RunConfig.from_dict({**TINY, "rl": {"gama": 0.5}}).resolved()
    with pytest.raises(ValueError, match="gamma"):
        RunConfig.from_dict({**TINY, "rl": {"gamma": 1.5}}).resolved()


# ----------------------------------------------------------------------------- memory and spans


def span_bias_change(tmp_path, alpha: float, aux_hold: float) -> float:
    """How much one PPO update moved the span predictor's bias (l1 span loss: the auxiliary
    loss is alpha x the new memories' spans, non-zero whatever the ramp)."""
    run = tiny_run({"epochs": 1}, {"span_loss": "l1", "alpha": alpha}, aux_hold=aux_hold,
                   aux_hold_until=1.0)
    trainer = RLTrainer(run, tmp_path / f"{alpha}-{aux_hold}", progress=False)
    bias = trainer.model.transformer.layers[0].policy.span_predictor.bias
    before = float(bias.detach())
    trainer._train_step(0)
    return float(bias.detach()) - before


def test_ppo_objective_includes_the_auxiliary_loss(tmp_path):
    """With a large alpha the update shrinks the spans (the bias falls by about lr, Adam's first
    step); without it, it does not move that way: the aux loss is part of what is minimised."""
    lr = TINY["train"]["lr"]
    with_aux = span_bias_change(tmp_path, alpha=1.0, aux_hold=0.0)
    without = span_bias_change(tmp_path, alpha=0.0, aux_hold=0.0)
    assert with_aux < without - 0.5 * lr


def test_ppo_holds_the_auxiliary_loss_until_failures_fall(tmp_path):
    """While the gate holds (train.aux_hold), the auxiliary loss has no weight: the first update
    moves the spans exactly as with alpha = 0."""
    held = span_bias_change(tmp_path, alpha=1.0, aux_hold=0.5)
    assert held == span_bias_change(tmp_path, alpha=0.0, aux_hold=0.5)


def test_the_gate_opens_when_the_failure_rate_halves(tmp_path):
    trainer = RLTrainer(tiny_run(aux_hold=0.5, aux_hold_until=1.0, aux_ramp=0, steps=100),
                        tmp_path, progress=False)
    gate = trainer.aux_gate
    episode = Episode(0, 0.0, 3, 0.0)
    trainer._observe_failures(0, Rollout(*[None] * 10, finished=[episode, episode]))
    assert gate.opened_at is None and gate.start_loss == 1.0  # every episode failed
    trainer._observe_failures(1, Rollout(*[None] * 10))  # none finished: nothing observed
    assert gate.smoothed == 1.0
    success = Episode(0, 1.0, 3, 1.0)
    for step in range(2, 12):
        trainer._observe_failures(step, Rollout(*[None] * 10, finished=[success]))
        if gate.opened_at is not None:
            break
    assert gate.opened_at == step + 1 and gate.smoothed <= 0.5  # 0.9^k <= 0.5 at k = 7
    assert step == 8 and gate.scale(step + 1) == 1.0


def test_during_a_curriculum_the_gate_waits_for_the_full_lengths(tmp_path):
    run = tiny_run({"curriculum_updates": 2}, aux_hold=0.5, aux_hold_until=1.0, aux_ramp=0,
                   steps=100)
    trainer = RLTrainer(run, tmp_path, progress=False)
    failed, success = Episode(0, 0.0, 3, 0.0), Episode(0, 1.0, 3, 1.0)
    trainer._observe_failures(0, Rollout(*[None] * 10, finished=[failed]))
    assert trainer.aux_gate.start_loss is None  # level 0: not observed
    trainer.curriculum_advances = 2  # full lengths from here
    trainer._observe_failures(1, Rollout(*[None] * 10, finished=[failed]))
    assert trainer.aux_gate.start_loss == 1.0
    for step in range(2, 12):
        trainer._observe_failures(step, Rollout(*[None] * 10, finished=[success]))
    assert trainer.aux_gate.opened_at is not None


def test_carried_training_replays_what_it_acted_and_keeps_memory(tmp_path):
    trainer = RLTrainer(tiny_run({"carry_memory": True}, steps=1), tmp_path, progress=False)
    rollout = trainer.collect()
    assert bool(rollout.dones.any()) and not bool(rollout.resets.any())
    assert int(trainer.memory.sizes.min()) > 0  # nothing was forgotten at the episode ends
    trainer.model.train()
    logits, _, _ = replay(trainer.model, rollout)
    new = torch.log_softmax(logits, -1).gather(-1, rollout.actions[..., None])[..., 0]
    torch.testing.assert_close(new, rollout.log_probs, atol=1e-5, rtol=0)
    summary = trainer.fit()
    assert summary["config"]["rl"]["carry_memory"] is True


def xl_agent(window: int, length: int):
    run = RunConfig.from_dict({
        "task": "corridor", "task_options": {"min_length": length, "max_length": length},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 2,
                  "max_span": window, "memory": "transformer-xl"},
    }).resolved()
    torch.manual_seed(0)
    return run.build_model(vocab_size(run.build_task())), run.build_task()


@pytest.mark.parametrize("carry", [False, True], ids=["reset", "carried"])
def test_memory_at_decision_is_read_at_the_junction(carry):
    """A Transformer-XL with a window of 8 in corridors of 12 steps sees exactly 8 earlier steps
    at every junction, fewer on average over an episode (when memory is reset at its start)."""
    agent, task = xl_agent(window=8, length=12)
    metrics = evaluate_agent(agent, task, "valid", 3, 2, seed=0, carry_memory=carry)
    assert metrics["memory_at_decision"] == 8.0
    if not carry:
        assert metrics["memory_size"] < 7.0


def test_adaptive_span_starts_at_the_expire_span_span_in_every_rl_preset():
    for name, preset in PRESETS.items():
        if preset.config["task"] not in ("corridor", "instruction", "portal"):
            continue
        model = RunConfig.from_dict(preset.config).resolved().model
        assert model["adapt_span_init"] == model["init_percentage"] > 0, name


# ----------------------------------------------------------------------------- command line


def test_cli_trains_evaluates_and_resumes_an_rl_task(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--config", str(config), "--out", str(out),
                 "--model", "transformer-xl", "--gamma", "0.9", "--min-length", "3",
                 "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "success_rate" in printed and "max span L=8" in printed
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["rl"]["gamma"] == 0.9 and recorded["task_options"]["min_length"] == 3
    assert recorded["model"]["memory"] == "transformer-xl"
    assert main(["eval", "--checkpoint", str(out), "--split", "test", "--batches", "2",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "corridor" and result["metrics"]["episodes"] == 6
    assert {"success_rate", "mean_return", "memory_size"} <= set(result["metrics"])
    assert main(["train", "--no-progress", "--out", str(out), "--resume", "--gamma", "0.5"]) == 1
    assert "cannot change rl.gamma" in capsys.readouterr().err
    assert main(["train", "--no-progress", "--out", str(out), "--resume", "--steps", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_cli_help_lists_task_and_rl_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--task", "portal", "--help"])
    text = capsys.readouterr().out
    assert "--episode-steps" in text and "--entropy-coef" in text and "--gae-lambda" in text
    with pytest.raises(SystemExit):
        main(["train", "--task", "copy", "--help"])
    assert "--entropy-coef" not in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-length", "0"], "corridor: need 1 <= min_length <= max_length, got 0, 200"),
    (["--min-length", "150", "--max-length", "120"], "corridor: need 1 <= min_length"),
    (["--max-length", "600"], "max_span L=512 is too short for a dependency of 600 steps"),
])
def test_cli_refuses_bad_corridor_lengths_in_one_line(tmp_path, capsys, flags, message):
    argv = ["train", "--no-progress", "--preset", "corridor-long", "--out", str(tmp_path / "r"),
            "--steps", "1", "--eval-batches", "1", "--batch-size", "2",  # short if not refused
            *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_trainer_replays_in_blocks_when_asked(tmp_path, monkeypatch):
    seen = []

    def recording(agent, rollout, blocks=False):
        seen.append(blocks)
        return replay(agent, rollout, blocks)

    monkeypatch.setattr("expire_span.training.ppo.replay", recording)
    run = tiny_run({"carry_memory": True, "replay_blocks": True}, steps=1)
    RLTrainer(run, tmp_path, progress=False).fit()
    assert seen and all(seen)
