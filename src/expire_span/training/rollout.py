"""Running an agent in a batch of environments, one step per call, and evaluating it.

The agent reads each environment step by step (calls of one step; the model guarantees these
equal block calls). When an environment's episode ends, its previous action and reward become
"none" and 0 (so the agent sees every episode start), and by default its memory is reset before
the next episode's first step, so nothing leaks from one episode into the next. With
``carry_memory`` the memory is kept instead: each environment is one endless stream of episodes,
whose absolute steps keep increasing (``Memory.next_step`` is never reset), so earlier episodes'
memories age and expire as the memory policy decides (docs/rl.md, "Memory carried across
episodes").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from expire_span.memory import Memory
from expire_span.model import AgentOutput, MemoryAgent
from expire_span.tasks import RLTask


@dataclass
class Episode:
    """A finished episode of environment ``env``; ``success`` is its ``info["success"]``."""

    env: int
    episode_return: float
    length: int
    success: float


def decision_memory(output: AgentOutput, decisions: Tensor) -> tuple[float, int]:
    """(sum, count) of the memory sizes (mean over layers) of the rows where ``decisions``
    (``[B]`` bool) holds: what the agent attended when it took the decisions the task scores."""
    sizes = output.row_memory_size.mean(dim=0)[decisions.to(output.row_memory_size.device)]
    return float(sizes.sum()), int(sizes.numel())


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """``episodes``, ``success_rate``, ``mean_return``, ``mean_length`` (NaN when none)."""
    if not episodes:
        nan = float("nan")
        return {"episodes": 0.0, "success_rate": nan, "mean_return": nan, "mean_length": nan}
    return {
        "episodes": float(len(episodes)),
        "success_rate": float(np.mean([e.success for e in episodes])),
        "mean_return": float(np.mean([e.episode_return for e in episodes])),
        "mean_length": float(np.mean([e.length for e in episodes])),
    }


@dataclass
class StepRecord:
    """One step of every environment: what the agent read, what it did and what came back
    (``[B]`` tensors; ``done`` marks episodes that ended, after which memory was reset unless it
    is carried, and ``finished`` describes them)."""

    observations: Tensor
    prev_actions: Tensor
    prev_rewards: Tensor
    output: AgentOutput
    actions: Tensor
    rewards: Tensor
    done: Tensor
    finished: list[Episode]


class EnvRunner:
    """A vector environment, the agent's memory for each environment, and what the agent reads
    next (observation, previous action, previous reward).

    Args:
        envs: a gymnasium vector environment that resets finished episodes in the same step.
        agent: the agent (used for its memory layout and action count).
        seeds: one seed per environment, for the first reset.
        carry_memory: keep each environment's memory across its episodes (a stream of
            episodes) instead of resetting it when an episode ends.
    """

    def __init__(self, envs: gym.vector.VectorEnv, agent: MemoryAgent, seeds: list[int],
                 carry_memory: bool = False) -> None:
        self.envs = envs
        self.carry_memory = carry_memory
        self.num_envs = envs.num_envs
        self.none_action = agent.num_actions
        observations, _ = envs.reset(seed=seeds)
        device = agent.device
        self.observations = torch.as_tensor(observations, dtype=torch.long, device=device)
        self.prev_actions = torch.full((self.num_envs,), self.none_action, device=device)
        self.prev_rewards = torch.zeros(self.num_envs, device=device)
        self.memory: Memory = agent.init_memory(self.num_envs)
        self.returns = np.zeros(self.num_envs)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def read(self, agent: MemoryAgent) -> AgentOutput:
        """The agent's output for the current step (the memory is not advanced here)."""
        return agent(self.observations[:, None], self.prev_actions[:, None],
                     self.prev_rewards[:, None], self.memory)

    def step(self, agent: MemoryAgent, choose: Callable[[Tensor], Tensor]) -> StepRecord:
        """Read the current step, act with ``choose(logits [B, A]) -> actions [B]``, step the
        environments, and reset the memory of those whose episode ended (unless carried)."""
        out = self.read(agent)
        actions = choose(out.logits[:, 0])
        observations, rewards, terminated, truncated, info = self.envs.step(actions.cpu().numpy())
        done = np.logical_or(terminated, truncated)
        self.returns += rewards
        self.lengths += 1
        finished = []
        for index in np.flatnonzero(done):
            success = float(info["final_info"]["success"][index])
            finished.append(Episode(int(index), float(self.returns[index]),
                                    int(self.lengths[index]), success))
            self.returns[index], self.lengths[index] = 0.0, 0
        device = self.observations.device
        record = StepRecord(
            self.observations, self.prev_actions, self.prev_rewards, out, actions,
            torch.as_tensor(rewards, dtype=torch.float32, device=device),
            torch.as_tensor(done, device=device), finished,
        )
        self.observations = torch.as_tensor(observations, dtype=torch.long, device=device)
        self.prev_actions = actions.masked_fill(record.done, self.none_action)
        self.prev_rewards = record.rewards.masked_fill(record.done, 0.0)
        self.memory = out.memory if self.carry_memory else out.memory.reset(record.done)
        return record

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """Everything but the memory (saved separately) needed to continue exactly."""
        return {
            "observations": self.observations.cpu(),
            "prev_actions": self.prev_actions.cpu(),
            "prev_rewards": self.prev_rewards.cpu(),
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
            "envs": [env.unwrapped.get_state() for env in self.envs.envs],
        }

    def load_state(self, state: dict[str, Any], memory: Memory | None) -> None:
        device = self.observations.device
        self.observations = state["observations"].to(device)
        self.prev_actions = state["prev_actions"].to(device)
        self.prev_rewards = state["prev_rewards"].to(device)
        self.returns = np.asarray(state["returns"], dtype=np.float64)
        self.lengths = np.asarray(state["lengths"], dtype=np.int64)
        for env, env_state in zip(self.envs.envs, state["envs"], strict=True):
            env.unwrapped.set_state(env_state)
        if memory is not None:
            self.memory = memory


def greedy(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


def sampler(generator: torch.Generator | None = None) -> Callable[[Tensor], Tensor]:
    """Samples actions from the policy (with ``generator``, or the global random state)."""

    def sample(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


@torch.no_grad()
def evaluate_agent(
    agent: MemoryAgent,
    task: RLTask,
    split: str,
    num_envs: int,
    episodes_per_env: int,
    seed: int,
    greedy_actions: bool = True,
    progress: bool = False,
    carry_memory: bool = False,
) -> dict[str, float]:
    """Run ``episodes_per_env`` fresh episodes in each of ``num_envs`` environments seeded for
    ``split`` (never the training seeds) and return their metrics, with the average memory size
    and cache size over the steps taken, and ``memory_at_decision``: the average memory size at
    the counted episodes' decision steps (:meth:`RLTask.decision_steps`, e.g. Corridor's
    junction; NaN if none). With ``carry_memory`` each environment's episodes form one stream
    (as in training with ``rl.carry_memory``), starting from an empty memory."""
    was_training = agent.training
    agent.eval()
    envs = task.vector_env(num_envs)
    seeds = task.seeds(seed, split, num_envs)
    runner = EnvRunner(envs, agent, seeds, carry_memory)
    generator = torch.Generator(device=agent.device).manual_seed(seeds[0])
    choose = greedy if greedy_actions else sampler(generator)
    counted: list[Episode] = []
    finished = np.zeros(num_envs, dtype=np.int64)
    memory_size = cache_size = decision_total = 0.0
    steps = decisions = 0
    bar = tqdm(total=num_envs * episodes_per_env, desc=f"eval {split}", disable=not progress,
               leave=False)
    try:
        while finished.min() < episodes_per_env:
            counting = torch.as_tensor(finished < episodes_per_env)
            decision = torch.as_tensor(task.decision_steps(runner.observations.cpu().numpy()))
            record = runner.step(agent, choose)
            total, count = decision_memory(record.output, decision & counting)
            decision_total, decisions = decision_total + total, decisions + count
            memory_size += float(record.output.memory_size.mean())
            cache_size += float(record.output.memory.sizes.float().mean())
            steps += 1
            for episode in record.finished:
                if finished[episode.env] < episodes_per_env:  # later episodes are not counted
                    counted.append(episode)
                    bar.update(1)
                finished[episode.env] += 1
    finally:
        bar.close()
        envs.close()
        agent.train(was_training)
    return {**episode_metrics(counted), "memory_size": memory_size / max(steps, 1),
            "memory_at_decision": decision_total / decisions if decisions else float("nan"),
            "cache_size": cache_size / max(steps, 1)}
