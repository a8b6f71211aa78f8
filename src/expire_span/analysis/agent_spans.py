"""What a trained Expire-Span agent remembers: the span it gives each observation it reads.

The agent acts in fresh environments (a test split) exactly as in evaluation, one step per call,
and the span predictors' outputs for each new state are recorded with the observation that made
it; :func:`mean_spans_by` then averages them over groups of steps (Corridor's cue against its
corridor cells, Instruction's instruction against the distractors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from expire_span.analysis.spans import expire_span_policies
from expire_span.model import MemoryAgent
from expire_span.tasks.rl.base import RLTask
from expire_span.training.rollout import EnvRunner, greedy, sampler


@dataclass
class AgentSpans:
    """``steps`` steps of ``B`` environments: ``observations`` ``[S, B, F]`` (what each step
    read), ``episode_start`` ``[S, B]`` (the step began an episode), ``spans`` ``[n_layers,
    S, B]`` (the span given to the state that step added to the memory) and the ``episodes``
    that ended."""

    observations: np.ndarray
    episode_start: np.ndarray
    spans: Tensor
    episodes: list[FinishedEpisode]


@dataclass
class FinishedEpisode:
    """An episode that ended within the recorded steps: environment ``env``, its first step's
    index ``start`` (``None`` when it began before the recording), ``length`` and ``success``."""

    env: int
    start: int | None
    length: int
    success: float


@torch.no_grad()
def agent_spans(agent: MemoryAgent, task: RLTask, steps: int, num_envs: int = 8, seed: int = 0,
                carry_memory: bool = True, greedy_actions: bool = False) -> AgentSpans:
    """Act for ``steps`` steps in ``num_envs`` test environments and record every new state's
    span in every layer (``ValueError`` unless the agent's memory is Expire-Span)."""
    policies = expire_span_policies(agent.transformer)
    was_training = agent.training
    agent.eval()
    runner = EnvRunner(task.vector_env(num_envs), agent, task.seeds(seed, "test", num_envs),
                       carry_memory)
    choose = greedy if greedy_actions else sampler(
        torch.Generator(device=agent.device).manual_seed(seed))
    current: list[Tensor] = []
    handles = [policy.span_predictor.register_forward_hook(
        lambda module, inputs, output: current.append(output[:, -1]))
        for policy in policies]
    observations, starts, spans, episodes = [], [], [], []
    try:
        for index in range(steps):
            observations.append(runner.observations.cpu().numpy())
            starts.append((runner.prev_actions == runner.none_action).cpu().numpy())
            current.clear()
            record = runner.step(agent, choose)
            spans.append(torch.stack(current).float().cpu())
            for episode in record.finished:
                start = index - episode.length + 1
                episodes.append(FinishedEpisode(episode.env, start if start >= 0 else None,
                                                episode.length, episode.success))
    finally:
        for handle in handles:
            handle.remove()
        agent.train(was_training)
    return AgentSpans(np.stack(observations), np.stack(starts), torch.stack(spans, dim=1),
                      episodes)


def outcomes_by_length(record: AgentSpans, edges: list[int]) -> list[dict]:
    """Success and first-step span (mean per layer) of the finished episodes whose length lies in
    each ``[edges[k], edges[k + 1])``: whether the episodes a policy fails are those that outlast
    the span of what it saw first (Corridor's cue). Episodes begun before the recording are
    left out; empty bins too."""
    rows = []
    complete = [e for e in record.episodes if e.start is not None]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        chosen = [e for e in complete if low <= e.length < high]
        if not chosen:
            continue
        first = torch.stack([record.spans[:, e.start, e.env] for e in chosen])  # [E, layers]
        rows.append({"lengths": [low, high], "episodes": len(chosen),
                     "success": float(np.mean([e.success for e in chosen])),
                     "first_step_span": [float(v) for v in first.mean(dim=0)]})
    return rows


def start_groups(record: AgentSpans, max_kinds: int = 8
                 ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Step groups for :func:`mean_spans_by`: "episode start", "other steps" and, when at most
    ``max_kinds`` distinct observations begin an episode, "episode start, observation k" for
    each (returned too, in that order). A one-layer agent's span is a function of the
    observation alone, so e.g. Corridor's two cue colours each get one span."""
    starts = record.episode_start
    groups = {"episode start": starts, "other steps": ~starts}
    distinct = np.unique(record.observations[starts], axis=0)
    if len(distinct) > max_kinds:
        return groups, []
    for kind, observation in enumerate(distinct):
        same = (record.observations == observation).all(axis=-1)
        groups[f"episode start, observation {kind}"] = starts & same
    return groups, distinct.tolist()


def mean_spans_by(spans: Tensor, groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per group (a ``[S, B]`` bool mask of steps): its number of steps and mean span per layer
    (``spans``: ``[n_layers, S, B]``); empty groups are left out."""
    table = {}
    for name, chosen in groups.items():
        mask = torch.as_tensor(chosen)
        if not bool(mask.any()):
            continue
        table[name] = {"steps": int(mask.sum()),
                       "mean_span": [float(layer[mask].mean()) for layer in spans],
                       "median_span": [float(layer[mask].median()) for layer in spans]}
    return table
