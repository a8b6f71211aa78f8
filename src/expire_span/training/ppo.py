"""PPO with GAE for memory agents on reinforcement-learning tasks.

One training step (an "update"):

1. **Rollout.** ``seq_len`` steps in each of ``batch_size`` environments, acting step by step in
   eval mode without gradients. The memory at the start of the segment is kept; an environment
   whose episode ends has its memory reset before its next step (unless ``rl.carry_memory``:
   then each environment is one stream of episodes). Episodes run across segments.
2. **Advantages.** GAE over the segment, bootstrapped from the value of the step that follows it;
   the end of an episode (terminated or cut by a step limit) is terminal, no value is carried
   across it (step limits are part of these tasks' definitions).
3. **PPO epochs.** ``epochs`` times: replay the segment step by step from the stored memory with
   the current weights, applying the same memory resets at the same steps, so every step sees the
   memory it saw while acting (recomputed with the current weights); then one optimizer step on
   the clipped objective, the value loss, the entropy bonus and the memory policy's auxiliary
   loss (weighted by the auxiliary gate, ``train.aux_hold``: held at 0 until the rollouts'
   failure rate has fallen, see :class:`~expire_span.training.aux_gate.AuxiliaryGate`).

Replaying step by step (calls of one step) rather than in blocks keeps episode boundaries exact:
``Memory.reset`` acts between calls, and a block call cannot reset one sample in its middle. As the
memory is detached between calls, no gradient flows from one step into an earlier one; the memory
at a segment's start was computed by the weights of the previous update (as hidden states of
recurrent PPO are).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from expire_span.memory import Memory
from expire_span.model import MemoryAgent
from expire_span.tasks import RLTask
from expire_span.training.checkpoint import LoadedCheckpoint
from expire_span.training.loop import TrainingLoop
from expire_span.training.rollout import (
    EnvRunner,
    Episode,
    decision_memory,
    episode_metrics,
    evaluate_agent,
    sampler,
)


@dataclass
class Rollout:
    """A segment of ``T`` steps of ``B`` environments (tensors ``[T, B, ...]``), the memory at
    its start and the value of the step after it (``[B]``). ``resets`` (``[T, B]`` bool) marks
    the steps after which a memory was reset; ``None`` means where episodes ended (``dones``),
    all False when memory is carried across episodes. ``finished``: the episodes it ended."""

    memory: Memory
    observations: Tensor
    prev_actions: Tensor
    prev_rewards: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    dones: Tensor
    last_value: Tensor
    resets: Tensor | None = None
    finished: list[Episode] = field(default_factory=list)

    def success_rate(self) -> float | None:
        """Mean success of the episodes this rollout finished (``None`` if it finished none)."""
        if not self.finished:
            return None
        return sum(e.success for e in self.finished) / len(self.finished)


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[T, B]`` tensors; returns (advantages, returns).

    ``A_t = delta_t + gamma lam (1 - done_t) A_{t+1}`` with
    ``delta_t = r_t + gamma (1 - done_t) V_{t+1} - V_t``, ``V_T`` = ``last_value``.
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(rewards.shape[0])):
        alive = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * alive * next_value - values[t]
        next_advantage = delta + gamma * lam * alive * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, advantages + values


def replay(agent: MemoryAgent, rollout: Rollout, blocks: bool = False
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute the segment from its start memory with the agent's current weights: step by
    step, or with ``blocks`` (a rollout without resets only) in one call.

    Returns logits ``[T, B, A]``, values ``[T, B]`` and the mean auxiliary loss.
    """
    if blocks:
        if rollout.resets is None or bool(rollout.resets.any()):
            raise ValueError("a rollout with memory resets is replayed step by step")
        out = agent(*(x.transpose(0, 1) for x in (rollout.observations, rollout.prev_actions,
                                                  rollout.prev_rewards)), rollout.memory)
        return out.logits.transpose(0, 1), out.values.transpose(0, 1), out.aux_loss
    memory = rollout.memory
    resets = rollout.dones if rollout.resets is None else rollout.resets
    logits, values, aux = [], [], []
    for t in range(rollout.actions.shape[0]):
        out = agent(rollout.observations[t, :, None], rollout.prev_actions[t, :, None],
                    rollout.prev_rewards[t, :, None], memory)
        memory = out.memory.reset(resets[t]) if bool(resets[t].any()) else out.memory
        logits.append(out.logits[:, 0])
        values.append(out.values[:, 0])
        aux.append(out.aux_loss)
    return torch.stack(logits), torch.stack(values), torch.stack(aux).mean()


class RLTrainer(TrainingLoop):
    """Trains a :class:`MemoryAgent` on an :class:`RLTask` with PPO; arguments as
    :class:`~expire_span.training.loop.TrainingLoop`.

    ``train.steps`` counts updates, ``train.batch_size`` environments, ``train.seq_len`` rollout
    steps per environment; the ``rl`` section holds the PPO hyperparameters.
    """

    task: RLTask
    model: MemoryAgent

    def _setup(self) -> None:
        cfg = self.train_cfg
        if self.group.distributed or cfg.accumulate != 1 or cfg.precision != "fp32":
            raise ValueError(
                "reinforcement-learning tasks train in one process, without gradient "
                "accumulation, in fp32: run without torchrun and leave train.accumulate at 1 "
                f"and train.precision at fp32 (got {self.group.world_size} processes, "
                f"accumulate {cfg.accumulate}, precision {cfg.precision})"
            )
        self.rl = self.run.rl_config
        seeds = self.task.seeds(self.train_cfg.seed, "train", self.rows)
        self.runner = EnvRunner(self.task.vector_env(self.rows), self.model, seeds,
                                self.rl.carry_memory)
        self.memory = self.runner.memory
        self.interval = _Interval()
        self.curriculum_advances = 0
        """Updates after which the curriculum advanced (checkpointed)."""
        if self.rl.curriculum_updates:
            self.task.curriculum_options(0.0)  # refuses a task without one, before training

    def _trainer_state(self) -> dict[str, Any]:
        return {**super()._trainer_state(), "runner": self.runner.state(),
                "curriculum_advances": self.curriculum_advances}

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        super()._restore(loaded)
        assert loaded.trainer_state is not None
        self.runner.load_state(loaded.trainer_state["runner"], self.memory)
        self.curriculum_advances = loaded.trainer_state.get("curriculum_advances", 0)

    def evaluate(self, split: str = "valid", progress: bool = False) -> dict[str, float]:
        return evaluate_agent(
            self.model, self.task, split, self.rows, self.train_cfg.eval_batches,
            self.train_cfg.seed, self.rl.eval_greedy, progress, self.rl.carry_memory,
        )

    @torch.no_grad()
    def collect(self) -> Rollout:
        """Act for ``seq_len`` steps in every environment (sampling from the policy)."""
        self.model.eval()
        start, choose = self.runner.memory, sampler()
        records, decisions = [], []
        for _ in range(self.run.seq_len):
            decisions.append(self.task.decision_steps(self.runner.observations.cpu().numpy()))
            records.append(self.runner.step(self.model, choose))
        last_value = self.runner.read(self.model).values[:, 0]
        self.memory = self.runner.memory
        for record, decision in zip(records, decisions, strict=True):
            self.interval.add_acting(record.finished, record.output, self.rows,
                                     torch.as_tensor(decision))
        logits = torch.stack([r.output.logits[:, 0] for r in records])
        actions = torch.stack([r.actions for r in records])
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, actions[..., None])[..., 0]

        def stacked(name: str) -> Tensor:
            return torch.stack([getattr(r, name) for r in records])

        return Rollout(
            memory=start, observations=stacked("observations"),
            prev_actions=stacked("prev_actions"), prev_rewards=stacked("prev_rewards"),
            actions=actions, log_probs=log_probs,
            values=torch.stack([r.output.values[:, 0] for r in records]),
            rewards=stacked("rewards"), dones=stacked("done"), last_value=last_value,
            resets=torch.zeros_like(stacked("done")) if self.rl.carry_memory else None,
            finished=[episode for record in records for episode in record.finished],
        )

    def _train_step(self, step: int) -> None:
        if self.rl.curriculum_updates:
            self.runner.envs.call("set_options",
                                  **self.task.curriculum_options(self.curriculum_level,
                                                                 self.rl.curriculum_start))
        rollout = self.collect()
        rl = self.rl
        advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones,
                                  rollout.last_value, rl.gamma, rl.gae_lambda)
        if rl.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        aux_weight = self.aux_gate.apply(self.model, step)
        self.model.train()
        for _ in range(rl.epochs):
            logits, values, aux_loss = replay(self.model, rollout, rl.replay_blocks)
            log_probs = torch.log_softmax(logits.float(), -1)
            new = log_probs.gather(-1, rollout.actions[..., None])[..., 0]
            ratio = (new - rollout.log_probs).exp()
            clipped = ratio.clamp(1.0 - rl.clip_range, 1.0 + rl.clip_range)
            policy_loss = -torch.min(ratio * advantages, clipped * advantages).mean()
            value_loss = 0.5 * (values - returns).pow(2).mean()
            entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
            loss = (policy_loss + rl.value_coef * value_loss - rl.entropy_coef * entropy
                    + aux_weight * aux_loss)
            self._update(loss, step)
            with torch.no_grad():
                clip_fraction = ((ratio - 1.0).abs() > rl.clip_range).float().mean()
            self.interval.add_update(policy_loss, value_loss, entropy, aux_loss, clip_fraction)
        self._observe_failures(step, rollout)
        self._advance_curriculum(rollout)

    @property
    def curriculum_level(self) -> float:
        """How far the episode lengths have grown (1: the task's options)."""
        updates = self.rl.curriculum_updates
        return min(1.0, self.curriculum_advances / updates) if updates else 1.0

    def _advance_curriculum(self, rollout: Rollout) -> None:
        """One step of ``1 / curriculum_updates`` towards the full lengths, after a rollout whose
        finished episodes reached ``curriculum_success``; one step back after one below
        ``curriculum_retreat`` (a rollout that finished none waits). The full lengths, once
        reached, are kept: from there the auxiliary gate takes over."""
        rl = self.rl
        if not rl.curriculum_updates or self.curriculum_level >= 1.0:
            return
        success = rollout.success_rate()
        if success is None:
            return
        if success >= rl.curriculum_success:
            self.curriculum_advances += 1
        elif success < rl.curriculum_retreat:
            self.curriculum_advances = max(0, self.curriculum_advances - 1)

    def _observe_failures(self, step: int, rollout: Rollout) -> None:
        """Hand the auxiliary gate this rollout's failure rate (1 - the mean success of the
        episodes it finished; nothing when it finished none): the RL counterpart of the sequence
        trainer's training loss, falling as the task is learned. During a curriculum the gate
        sees nothing: span penalties wait until the full-length task is being learned (the
        gate's deadline, ``aux_hold_until``, still applies)."""
        if self.aux_gate.opened_at is not None or self.curriculum_level < 1.0:
            return  # with a curriculum the hold counts from the full lengths on
        success = rollout.success_rate()
        self.aux_gate.observe(step, None if success is None else 1.0 - success)

    def _log_record(self, step: int) -> dict[str, Any]:
        record = self.interval.flush(step, self.scheduler.get_last_lr()[0])
        record["aux_weight"] = self.aux_gate.scale(step - 1)  # of the last update taken
        if self.rl.curriculum_updates:
            record["curriculum_level"] = self.curriculum_level  # for the next update
        return record

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"success": f"{record['success_rate']:.3f}",
                "return": f"{record['mean_return']:.2f}",
                "mem": f"{record['memory_size']:.0f}/{self.model.config.max_span}"}

    def _summary(self, step: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        summary = super()._summary(step, metrics, seconds)
        summary["success_rate"] = metrics["success_rate"]
        summary["mean_return"] = metrics["mean_return"]
        summary["memory_at_decision"] = metrics["memory_at_decision"]
        return summary


class _Interval:
    """Training statistics since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.episodes: list[Episode] = []
        self.losses: dict[str, float] = {}
        self.updates = self.acting_steps = self.env_steps = self.decisions = 0
        self.memory_size = self.cache_size = self.decision_memory = 0.0
        self.started = time.perf_counter()

    def add_acting(self, finished: list[Episode], output, rows: int, decisions: Tensor) -> None:
        """One acting step; ``decisions`` (``[B]`` bool) marks the rows at a decision step."""
        self.episodes.extend(finished)
        self.acting_steps += 1
        self.env_steps += rows
        self.memory_size += float(output.memory_size.mean())
        self.cache_size += float(output.memory.sizes.float().mean())
        total, count = decision_memory(output, decisions)
        self.decision_memory += total
        self.decisions += count

    def add_update(self, policy: Tensor, value: Tensor, entropy: Tensor, aux: Tensor,
                   clip_fraction: Tensor) -> None:
        self.updates += 1
        values = {"policy_loss": policy, "value_loss": value, "entropy": entropy,
                  "aux_loss": aux, "clip_fraction": clip_fraction}
        for name, value_ in values.items():
            self.losses[name] = self.losses.get(name, 0.0) + float(value_.detach())

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        record = {
            "step": step,
            "split": "train",
            **episode_metrics(self.episodes),
            **{name: total / max(self.updates, 1) for name, total in self.losses.items()},
            "memory_size": self.memory_size / max(self.acting_steps, 1),
            "memory_at_decision": (self.decision_memory / self.decisions if self.decisions
                                   else float("nan")),
            "cache_size": self.cache_size / max(self.acting_steps, 1),
            "lr": lr,
            "env_steps_per_s": self.env_steps / max(seconds, 1e-9),
        }
        self.reset()
        return record

