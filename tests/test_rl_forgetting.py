"""Forgetting is exercised by the RL presets meant to show it: the preset's Expire-Span agent does
not compute the function of a full-window Transformer-XL with the same weights, because memories
expire (within episodes or across carried memory), and its auxiliary loss is not 0.

The same check on today's ``corridor-cpu`` preset (memory reset every episode, spans of 0.6 L
longer than any episode, ramp loss) finds the two functions identical and the loss exactly 0:
that is why its Corridor results said nothing about forgetting (docs/rl.md)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from expire_span.model import MemoryAgent
from expire_span.training import RunConfig, get_preset
from expire_span.training.config import merge, vocab_size
from expire_span.training.rollout import EnvRunner, sampler

ENVS = 4


@dataclass
class Comparison:
    gap: float
    """Largest difference of the final hidden states of the two agents over the stream."""
    aux_loss: float
    """Largest auxiliary loss of the Expire-Span agent at any step."""
    expire_memory: float
    """Mean memory (cache) size of the Expire-Span agent at the last step."""
    full_memory: float
    """The same for the full-window Transformer-XL."""


def build(config: dict, seed: int = 0) -> tuple[RunConfig, MemoryAgent]:
    run = RunConfig.from_dict(config).resolved()
    torch.manual_seed(seed)
    agent = run.build_model(vocab_size(run.build_task()))
    return run, agent.eval()


def compare_with_full_window(preset: str, steps: int) -> Comparison:
    """Run the preset's Expire-Span agent (untrained, sampled actions) on ``ENVS`` environment
    streams for ``steps`` steps, with the preset's memory rule (reset per episode or carried);
    read the same inputs with a Transformer-XL agent that holds the same weights and sees the
    whole window L (no mask, nothing expires before L)."""
    config = merge(get_preset(preset).config, {"model": {"memory": "expire-span"}})
    run, expire = build(config)
    full_config = merge(run.to_dict(), {"model": {"memory": "transformer-xl"}})
    full_run = RunConfig.from_dict(full_config)
    full = full_run.build_model(vocab_size(run.build_task())).eval()
    missing, unexpected = full.load_state_dict(expire.state_dict(), strict=False)
    assert not missing and all("span_predictor" in key for key in unexpected)
    task, carry = run.build_task(), run.rl_config.carry_memory
    runner = EnvRunner(task.vector_env(ENVS), expire, task.seeds(0, "train", ENVS), carry)
    choose = sampler(torch.Generator().manual_seed(0))
    full_memory = full.init_memory(ENVS)
    gap = aux = 0.0
    with torch.no_grad():
        for _ in range(steps):
            inputs = (runner.observations[:, None], runner.prev_actions[:, None],
                      runner.prev_rewards[:, None])
            memory = runner.memory
            record = runner.step(expire, choose)
            mine = expire.transformer.encode(expire.embed(*inputs), memory)
            theirs = full.transformer.encode(full.embed(*inputs), full_memory)
            full_memory = theirs.memory if carry else theirs.memory.reset(record.done)
            gap = max(gap, float((mine.hidden - theirs.hidden).abs().max()))
            aux = max(aux, float(record.output.aux_loss))
    return Comparison(gap, aux, float(runner.memory.sizes.float().mean()),
                      float(full_memory.sizes.float().mean()))


@pytest.mark.parametrize("preset", ["corridor-long", "corridor-far"])
def test_corridor_expire_span_is_not_a_full_window_transformer_xl(preset):
    """Fails if the preset's spans never act: memory reset every episode with spans longer than
    the episodes, or spans as long as L, or a zero auxiliary loss. corridor-far is the preset of
    the Corridor claim (docs/rl.md, stop 27)."""
    result = compare_with_full_window(preset, steps=400)
    assert result.gap > 1e-3  # the functions differ (they agree exactly when nothing expired) ...
    assert result.expire_memory < 0.7 * result.full_memory  # ... because memories expired
    assert result.aux_loss > 0  # and the span loss acts


def test_todays_corridor_preset_computes_a_full_window_transformer_xl():
    """The check above finds nothing on corridor-cpu (memory reset every episode, spans of
    0.6 L = 77 steps, corridors of at most 60): the two agents agree and the loss is 0."""
    result = compare_with_full_window("corridor-cpu", steps=200)
    assert result.gap < 1e-4
    assert result.aux_loss == 0.0


@pytest.mark.parametrize("preset", ["corridor-long", "instruction-long", "portal-long"])
def test_stream_presets_carry_memory_and_start_both_span_policies_together(preset):
    run = RunConfig.from_dict(get_preset(preset).config).resolved()
    model, task = run.model, run.build_task()
    assert run.rl_config.carry_memory and model["span_loss"] == "l1"
    start = model["init_percentage"] * model["max_span"]
    assert start > task.dependency_length  # spans start above what the decision needs
    assert model["adapt_span_init"] == model["init_percentage"]
