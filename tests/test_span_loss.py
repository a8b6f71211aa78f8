"""Expire-Span's two auxiliary-loss forms (``span_loss``) and the gate that holds auxiliary
losses back until the task is being learned (``train.aux_hold``)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from expire_span import ModelConfig
from expire_span.memory import LayerMemory
from expire_span.policies import BlockContext
from expire_span.policies.expire_span import ExpireSpanPolicy
from expire_span.training import RunConfig, Trainer
from expire_span.training.aux_gate import AuxiliaryGate
from tests.helpers import tiny_config
from tests.test_expire_span_formulas import (
    ALPHA,
    L,
    context_for,
    logit,
    make_policy,
    set_spans_by_first_channel,
)


def test_l1_loss_is_alpha_times_the_new_states_spans_over_t_and_b():
    # The block is steps 5 and 6 (spans 1.0 and 7.0); the five memories are not charged again.
    policy = make_policy(span_loss="l1")
    set_spans_by_first_channel(policy)
    context = context_for(policy, requires_grad=True)
    aux = policy.decide(context).aux_loss
    assert aux.item() == pytest.approx(ALPHA * (1.0 + 7.0) / (2 * 1))
    aux.backward()
    # d aux / d h0 = alpha / (T B) * L s (1 - s), s = e / L; zero for the old memories.
    expected = [0.0] * 5 + [ALPHA / 2 * L * s * (1 - s) for s in (0.1, 0.7)]
    torch.testing.assert_close(context.inputs.grad[0, :, 0], torch.tensor(expected))


def test_l1_loss_skips_padding_and_averages_over_the_batch():
    policy = make_policy(span_loss="l1")
    set_spans_by_first_channel(policy)
    single = context_for(policy)
    inputs = single.inputs.repeat(2, 1, 1)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 6] = False  # row 1's last state is padding
    states = LayerMemory(inputs, single.states.steps.repeat(2, 1), valid)
    context = BlockContext(states, inputs, single.age.repeat(2, 1, 1),
                           single.visible.repeat(2, 1, 1), next_step=7)
    aux = policy.decide(context).aux_loss
    assert aux.item() == pytest.approx(ALPHA * ((1.0 + 7.0) + 1.0) / (2 * 2))


def old_memory_context(policy: ExpireSpanPolicy, span: float, queries: int) -> BlockContext:
    """Memory at step 0 with the given span, then a block of ``queries`` states (steps 1..T)
    whose own spans are tiny (they reach no ramp inside the block beyond their first R steps
    and are not charged by the ramp form's gradient on the memory)."""
    spans = [span] + [0.5] * queries
    inputs = torch.zeros(1, len(spans), 4)
    inputs[0, :, 0] = torch.tensor([logit(s / L) for s in spans])
    inputs.requires_grad_(True)
    steps = torch.arange(len(spans)).unsqueeze(0)
    age = torch.arange(1, queries + 1).view(1, -1, 1) - steps.unsqueeze(1)
    states = LayerMemory(inputs.detach(), steps, torch.ones(1, len(spans), dtype=torch.bool))
    return BlockContext(states, inputs, age, age >= 0, next_step=queries + 1)


def test_one_alpha_charges_a_memory_the_same_in_both_forms():
    """Ramp form: a memory whose whole ramp (R queries) lies in one block gets alpha / (T B) per
    unit of span; l1 form: every new state gets alpha / (T B) once. The same pressure."""
    queries, span = 12, 3.5  # ramp queries at ages 4, 5, 6, 7: exactly R = 4 of them
    ramp = make_policy(span_loss="ramp")
    set_spans_by_first_channel(ramp)
    context = old_memory_context(ramp, span, queries)
    spans = ramp.spans(context.inputs)
    spans.retain_grad()
    ramp.spans = lambda _inputs: spans  # differentiate with respect to the spans themselves
    ramp.decide(context).aux_loss.backward()
    per_unit_ramp = spans.grad[0, 0].item()

    l1 = make_policy(span_loss="l1")
    set_spans_by_first_channel(l1)
    context = old_memory_context(l1, span, queries)
    spans = l1.spans(context.inputs)
    spans.retain_grad()
    l1.spans = lambda _inputs: spans
    l1.decide(context).aux_loss.backward()
    assert spans.grad[0, 0].item() == 0.0  # an old memory is not charged again
    assert per_unit_ramp == pytest.approx(ALPHA / queries)
    torch.testing.assert_close(spans.grad[0, 1:], torch.full((queries,), ALPHA / queries))


def test_unknown_span_loss_is_refused():
    with pytest.raises(ValueError, match="span_loss must be one of ramp, l1"):
        tiny_config(span_loss="L1")
    with pytest.raises(ValueError, match="span_loss"):
        ModelConfig(vocab_size=4, span_loss="")


# ----------------------------------------------------------------------------- gate


def test_gate_holds_until_the_smoothed_loss_halves_then_ramps():
    gate = AuxiliaryGate(hold=0.5, release_step=1000, ramp=4)
    gate.observe(0, None)  # a step with nothing scored neither starts nor releases
    assert gate.start_loss is None and gate.scale(1) == 0.0
    gate.observe(1, 2.0)
    for step in range(2, 6):
        gate.observe(step, 2.0)
        assert gate.scale(step + 1) == 0.0
    gate.observe(6, 0.0)  # smoothed: 0.9 * 2 = 1.8 > 1.0, still held
    assert gate.opened_at is None
    step = 6
    while gate.opened_at is None:
        step += 1
        gate.observe(step, 0.0)
    # 2 * 0.9^k <= 1 first at k = 7 zero losses: steps 6..12, released for step 13
    assert gate.opened_at == step + 1 == 13
    assert [gate.scale(s) for s in (12, 13, 14, 15, 16, 17)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_gate_releases_at_its_deadline_and_never_holds_with_zero():
    gate = AuxiliaryGate(hold=0.5, release_step=3, ramp=0)
    for step in range(3):
        assert gate.scale(step) == 0.0
        gate.observe(step, 5.0)
    assert gate.opened_at == 3 and gate.scale(3) == 1.0
    assert AuxiliaryGate(hold=0.0, release_step=10, ramp=0).scale(0) == 1.0


def test_gate_state_round_trips_and_old_checkpoints_mean_released():
    gate = AuxiliaryGate(0.5, 100, 10)
    gate.observe(0, 3.0)
    gate.observe(1, 2.0)
    copy = AuxiliaryGate(0.5, 100, 10)
    copy.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert copy.state_dict() == gate.state_dict()
    copy.load_state_dict(None)
    assert copy.scale(0) == 1.0


TINY = {
    "task": "copy",
    "task_options": {"symbols": 2, "gap": 6, "alphabet": 4},
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 4, "max_span": 16,
              "ramp": 2, "alpha": 1.0, "init_percentage": 0.3, "span_loss": "l1",
              "pre_div": 1.0},
    "train": {"steps": 3, "batch_size": 3, "seq_len": 8, "lr": 1e-2, "warmup": 0,
              "eval_every": 3, "eval_batches": 1, "log_every": 1, "checkpoint_every": 3,
              "tensorboard": False},
}


def span_bias_after_training(tmp_path, **train) -> float:
    config = json.loads(json.dumps(TINY))
    config["train"].update(train)
    trainer = Trainer(RunConfig.from_dict(config), tmp_path, progress=False)
    trainer.fit()
    return trainer.model.layers[0].policy.span_predictor.bias.item(), trainer


@pytest.mark.parametrize("hold", [0.0, 0.5])
def test_trainer_weighs_the_auxiliary_loss_by_the_gate(tmp_path, hold):
    """Held for the whole run, the auxiliary loss must not touch the spans (the run equals one
    with alpha = 0); released from the start, alpha = 1 must move them."""
    held, trainer = span_bias_after_training(tmp_path / "a", aux_hold=hold, aux_hold_until=1.0)
    config = json.loads(json.dumps(TINY))
    config["model"]["alpha"] = 0.0
    free = Trainer(RunConfig.from_dict({**config, "train": {**config["train"], "aux_hold": 0.0}}),
                   tmp_path / "b", progress=False)
    free.fit()
    without = free.model.layers[0].policy.span_predictor.bias.item()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
               .splitlines() if '"train"' in line]
    if hold:
        assert held == without
        assert {r["aux_weight"] for r in records} == {0.0}
    else:
        assert held < without - 1e-3
        assert {r["aux_weight"] for r in records} == {1.0}


@pytest.mark.parametrize("memory,held", [("expire-span", True), ("adaptive-span", True),
                                         ("compressive", False), ("transformer-xl", False)])
def test_only_losses_that_push_memories_out_are_held(tmp_path, memory, held):
    """A span penalty waits for the task; Compressive's reconstruction loss (which teaches its
    compressor to keep information) must not: held, it would never train on a task that is
    never learned."""
    config = json.loads(json.dumps(TINY))
    config["model"]["memory"] = memory
    trainer = Trainer(RunConfig.from_dict(config), tmp_path, progress=False)
    assert trainer.aux_gate.scale(0) == (0.0 if held else 1.0)


def test_the_default_hold_has_no_deadline():
    """The hold ends when the task is being learned, not at a fixed share of the run."""
    from expire_span.training.config import TrainConfig

    assert TrainConfig().aux_hold_until == 1.0
    gate = AuxiliaryGate(hold=0.5, release_step=math.ceil(1.0 * 100), ramp=0)
    for step in range(99):
        gate.observe(step, 2.0)  # a loss that never falls
    assert gate.scale(99) == 0.0


@pytest.mark.parametrize("span_loss", ["ramp", "l1"])
def test_a_training_step_descends_the_task_loss_plus_the_auxiliary_loss(tmp_path, span_loss):
    """The gradient of one training step (caught before clipping and the update) equals the
    gradient, computed here from the same weights and batch, of the mean cross-entropy over
    the scored positions plus the model's auxiliary loss; and differs from the task loss's
    alone on the span predictor (so leaving the auxiliary loss out would be seen)."""
    config = json.loads(json.dumps(TINY))
    config["model"].update(span_loss=span_loss, alpha=0.5)
    config["train"].update(aux_hold=0.0, steps=1)
    trainer = Trainer(RunConfig.from_dict(config), tmp_path, progress=False)
    start = copy.deepcopy(trainer.model)
    step_grads = {}
    backward = trainer._backward

    def catching(loss):
        backward(loss)
        step_grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer._backward = catching
    trainer._train_step(3)  # batch 3 of the stream (batch 0 scores nothing), no memory yet

    rows, seq_len = trainer.train_cfg.batch_size, trainer.run.seq_len
    batch = trainer.task.batch("train", 3, range(rows), seq_len)
    assert batch.weights.sum() > 0
    out = start.train()(batch.tokens)
    losses = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(),
                                               reduction="none").view_as(batch.weights)
    task_loss = (losses * batch.weights).sum() / batch.weights.sum()
    names = [name for name, _ in start.named_parameters()]
    task_grads = torch.autograd.grad(task_loss, list(start.parameters()), retain_graph=True)
    total_grads = torch.autograd.grad(task_loss + out.aux_loss, list(start.parameters()))
    assert step_grads.keys() == set(names)
    for name, grad in zip(names, total_grads, strict=True):
        torch.testing.assert_close(step_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    predictor = names.index("layers.0.policy.span_predictor.bias")
    assert (total_grads[predictor] - task_grads[predictor]).abs().max() > 1e-3


def test_gate_state_survives_resume(tmp_path):
    _, trainer = span_bias_after_training(tmp_path, aux_hold=0.5, aux_hold_until=1.0)
    state = trainer.aux_gate.state_dict()
    assert state["start_loss"] is not None
    resumed = Trainer(None, tmp_path, resume=True, progress=False)
    assert resumed.aux_gate.state_dict() == state


@pytest.mark.parametrize("field,value", [("aux_hold", 1.0), ("aux_hold", float("nan")),
                                         ("aux_hold_until", 1.5), ("aux_ramp", -1)])
def test_gate_fields_out_of_range_are_refused(field, value):
    config = json.loads(json.dumps(TINY))
    config["train"][field] = value
    with pytest.raises(ValueError, match=field):
        RunConfig.from_dict(config)


@pytest.mark.parametrize("flags,message", [
    (["--span-loss", "quadratic"], "span_loss must be one of ramp, l1"),
    (["--aux-hold", "1"], "train.aux_hold must be in [0, 1)"),
    (["--aux-hold-until", "nan"], "train.aux_hold_until must be in [0, 1]"),
    (["--aux-ramp", "-1"], "train.aux_ramp must be >= 0"),
    (["--gap", "2000", "--max-span", "1024"], "max_span L=1024 is too short for a dependency"),
    (["--grace", "-3"], "grace must be an integer >= 0"),
])
def test_cli_refuses_bad_span_settings_in_one_line(tmp_path, capsys, flags, message):
    from expire_span.cli import main

    code = main(["train", "--task", "copy", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_spans_do_not_collapse_on_a_copy_four_times_longer_than_copy_test(tmp_path):
    """copy-test's model and budget on a gap of 160 (copy-test: 40), the span settings from the
    span rule and the default hold: before the hold, spans shrank below the dependency before
    the task was learned (issue 14); with it the copy is solved and the spans then shrink."""
    from expire_span.training import evaluate_run, get_preset, load_checkpoint
    from expire_span.training.config import merge
    from expire_span.training.span_rule import DERIVED_FIELDS

    config = merge(get_preset("copy-test").config, {
        "task_options": {"gap": 160}, "model": {"max_span": 512},
        "train": {"steps": 500, "eval_every": 500, "checkpoint_every": 500,
                  "tensorboard": False}})
    for name in DERIVED_FIELDS:
        config["model"].pop(name, None)
    config["train"].pop("aux_hold")  # copy-test turns the hold off; this test needs the default
    run = RunConfig.from_dict(config)
    start = run.resolved().model["init_percentage"] * 512
    Trainer(run, tmp_path, progress=False).fit()
    loaded = load_checkpoint(tmp_path)
    test = evaluate_run(loaded.model, loaded.run, "test", 16, 5)
    assert test["accuracy"] >= 0.9
    assert test["memory_size"] < 0.8 * start  # the spans moved once the hold ended


# ----------------------------------------------------------------------------- span rule


def copy_run(**model):
    from expire_span.training import get_preset
    from expire_span.training.config import merge

    return RunConfig.from_dict(merge(get_preset("copy-cpu").config, {"model": model})).resolved()


def test_span_rule_values_for_copy_cpu_by_hand():
    # K + D = 208, M = 32: R = 16, start = 1.25 * 208 + 16 + 32 = 308 of L = 512; c = sqrt(64)
    model = copy_run().model
    assert model["ramp"] == 16 and model["alpha"] == 1e-4 and model["pre_div"] == 8.0
    assert model["init_percentage"] == pytest.approx(308 / 512)
    assert model["adapt_span_init"] == model["init_percentage"]


def test_span_rule_yields_to_given_values_and_starts_adaptive_span_alike():
    model = copy_run(init_percentage=0.7, ramp=4).model
    assert model["init_percentage"] == 0.7 and model["adapt_span_init"] == 0.7
    assert model["ramp"] == 4 and model["pre_div"] == 8.0


def test_span_rule_accepts_a_transformer_xl_window_below_its_starting_span():
    assert copy_run(memory="transformer-xl", max_span=216).model["max_span"] == 216
    with pytest.raises(ValueError, match="too short for a dependency of 208"):
        copy_run(memory="adaptive-span", max_span=216)
