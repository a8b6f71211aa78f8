"""The input-vector path of the model, the agent, its step-by-step memory across episodes, the
PPO replay and GAE."""

from __future__ import annotations

import pytest
import torch

from expire_span import MemoryTransformer, available_policies
from expire_span.model import MemoryAgent, agent_vocab_size
from expire_span.tasks import build_task
from expire_span.training import RLConfig
from expire_span.training.ppo import Rollout, gae, replay
from expire_span.training.rollout import EnvRunner, greedy, sampler
from tests.helpers import tiny_config, tiny_model

POLICIES = available_policies()
ATOL = 1e-5


def tiny_agent(policy: str, task, seed: int = 0) -> MemoryAgent:
    torch.manual_seed(seed)
    config = tiny_config(policy, vocab_size=agent_vocab_size(task.observation_sizes,
                                                             task.num_actions),
                         block_len=4, max_span=16)
    agent = MemoryAgent(config, task.observation_sizes, task.num_actions)
    for layer in agent.transformer.layers:  # spans that differ between memories
        predictor = getattr(layer.policy, "span_predictor", None)
        if predictor is not None:
            torch.nn.init.normal_(predictor.weight, std=1.0)
    torch.nn.init.normal_(agent.policy.weight, std=0.5)
    return agent.eval()


@pytest.mark.parametrize("policy", POLICIES)
def test_encode_on_token_embeddings_is_forward(policy):
    model = tiny_model(policy)
    tokens = torch.randint(0, 13, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(tokens)
        encoded = model.encode(model.embedding(tokens))
    torch.testing.assert_close(model.head(encoded.hidden), out.logits, atol=0, rtol=0)
    torch.testing.assert_close(encoded.aux_loss, out.aux_loss, atol=0, rtol=0)
    torch.testing.assert_close(encoded.memory_size, out.memory_size, atol=0, rtol=0)


def test_encode_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(1, 2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="width 16"):
        model.encode(torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        model.encode(torch.zeros(2, 32))


def test_agent_checks_its_vocabulary_and_inputs():
    task = build_task("corridor")
    with pytest.raises(ValueError, match="vocab_size must be"):
        MemoryAgent(tiny_config(vocab_size=5), task.observation_sizes, task.num_actions)
    agent = tiny_agent("expire-span", task)
    with pytest.raises(ValueError, match="out of range"):
        agent(torch.full((1, 1, 1), 9), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="expected observations"):
        agent(torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
              torch.zeros(1, 1))


@pytest.mark.parametrize("policy", POLICIES)
def test_agent_step_by_step_equals_one_call(policy):
    task = build_task("instruction")
    agent = tiny_agent(policy, task)
    generator = torch.Generator().manual_seed(1)
    sizes = torch.tensor(task.observation_sizes)
    observations = (torch.rand(3, 25, len(sizes), generator=generator) * sizes).long()
    actions = torch.randint(0, task.num_actions + 1, (3, 25), generator=generator)
    rewards = torch.rand(3, 25, generator=generator)
    with torch.no_grad():
        whole = agent(observations, actions, rewards)
        memory, logits, values = None, [], []
        for t in range(25):
            out = agent(observations[:, t : t + 1], actions[:, t : t + 1],
                        rewards[:, t : t + 1], memory)
            memory = out.memory
            logits.append(out.logits)
            values.append(out.values)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(values, 1), whole.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("task_name", ["corridor", "portal"])
def test_memory_does_not_leak_across_episodes(policy, task_name):
    """What the agent computes in an episode depends on that episode only: the outputs of every
    step of environment 0's second and third episodes, read while the other environments and
    earlier episodes filled the memory, equal those of the same steps read from an empty memory."""
    options = {"corridor": {"min_length": 3, "max_length": 9},
               "portal": {"rooms": 4, "episode_steps": 7}}[task_name]
    task = build_task(task_name, options)
    agent = tiny_agent(policy, task)
    runner = EnvRunner(task.vector_env(3), agent, task.seeds(0, "train", 3))
    episodes: list[list] = [[]]
    with torch.no_grad():
        while len(episodes) < 4:
            record = runner.step(agent, sampler(torch.Generator().manual_seed(len(episodes))))
            episodes[-1].append(record)
            if bool(record.done[0]):
                assert int(runner.memory.sizes[:, 0].max()) == 0  # forgotten at once
                episodes.append([])
        for episode in episodes[1:3]:
            memory = agent.init_memory(1)
            for record in episode:
                out = agent(record.observations[:1, None], record.prev_actions[:1, None],
                            record.prev_rewards[:1, None], memory)
                memory = out.memory
                torch.testing.assert_close(out.logits[0, 0], record.output.logits[0, 0],
                                           atol=ATOL, rtol=0)
            # the episode started from "no previous action, no reward"
            assert int(episode[0].prev_actions[0]) == task.num_actions
            assert float(episode[0].prev_rewards[0]) == 0.0


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_recomputes_the_rollout_exactly(policy):
    """Before any update, replaying a rollout (with its memory resets) gives the acting policy:
    the PPO ratio starts at 1."""
    task = build_task("corridor", {"min_length": 2, "max_length": 5})
    agent = tiny_agent(policy, task)
    rollout, records = recorded_rollout(agent, task)
    agent.train()  # dropout is 0 and noise is off: training mode computes the same function
    logits, values, _ = replay(agent, rollout)
    torch.testing.assert_close(logits, torch.stack([r.output.logits[:, 0] for r in records]),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(values, torch.stack([r.output.values[:, 0] for r in records]),
                               atol=ATOL, rtol=0)
    assert logits.requires_grad


def recorded_rollout(agent, task, carry_memory: bool = False):
    """20 sampled steps of 4 environments recorded from mid-episode (after 7 greedy steps, so
    the memory is not empty), with at least 4 episode ends, and the steps' records; with
    ``carry_memory`` no row is reset at an episode end."""
    runner = EnvRunner(task.vector_env(4), agent, task.seeds(3, "train", 4),
                       carry_memory=carry_memory)
    with torch.no_grad():
        for _ in range(7):
            runner.step(agent, greedy)
        start = runner.memory
        records = [runner.step(agent, sampler(torch.Generator().manual_seed(0)))
                   for _ in range(20)]
    assert sum(int(r.done.sum()) for r in records) >= 4

    def stacked(name):
        return torch.stack([getattr(r, name) for r in records])

    rollout = Rollout(
        memory=start, observations=stacked("observations"), prev_actions=stacked("prev_actions"),
        prev_rewards=stacked("prev_rewards"), actions=stacked("actions"),
        log_probs=torch.zeros(20, 4), values=torch.zeros(20, 4), rewards=stacked("rewards"),
        dones=stacked("done"), last_value=torch.zeros(4),
        resets=torch.zeros(20, 4, dtype=torch.bool) if carry_memory else None,
    )
    return rollout, records


def naive_advantages(rewards, values, dones, last_value, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, summed until the episode ends."""
    steps, batch = rewards.shape
    next_values = torch.cat([values[1:], last_value[None]])
    advantages = torch.zeros(steps, batch)
    for b in range(batch):
        for t in range(steps):
            total, weight = 0.0, 1.0
            for k in range(t, steps):
                alive = 0.0 if dones[k, b] else 1.0
                delta = rewards[k, b] + gamma * alive * next_values[k, b] - values[k, b]
                total += weight * delta
                if dones[k, b]:
                    break
                weight *= gamma * lam
            advantages[t, b] = total
    return advantages


def test_gae_matches_the_naive_sum_and_a_hand_computed_case():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(9, 3, generator=generator)
    values = torch.rand(9, 3, generator=generator)
    dones = torch.rand(9, 3, generator=generator) < 0.25
    last = torch.rand(3, generator=generator)
    advantages, returns = gae(rewards, values, dones, last, 0.9, 0.8)
    torch.testing.assert_close(advantages, naive_advantages(rewards, values, dones, last, 0.9,
                                                            0.8))
    torch.testing.assert_close(returns, advantages + values)
    # two steps, episode ends after the first: A_1 = r_1 + g V_end - V_1, A_0 = r_0 - V_0
    advantages, _ = gae(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [0.25]]),
                        torch.tensor([[True], [False]]), torch.tensor([4.0]), 0.5, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5], [2.0 + 0.5 * 4.0 - 0.25]]))


def test_transformer_built_for_an_agent_is_a_plain_memory_transformer():
    task = build_task("portal")
    agent = tiny_agent("transformer-xl", task)
    assert isinstance(agent.transformer, MemoryTransformer)
    assert agent.config.vocab_size == sum(task.observation_sizes) + task.num_actions + 1


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("policy", POLICIES)
def test_row_memory_sizes_are_each_samples_own(policy, attention):
    """``row_memory_size`` counts what each sample attended: it averages to ``memory_size``, and
    a sample whose memory was just reset attended nothing while the others saw their window."""
    model = tiny_model(policy, attention=attention, block_len=1)
    tokens = torch.randint(0, 13, (3, 31), generator=torch.Generator().manual_seed(2))
    memory = None
    with torch.no_grad():
        for t in range(30):
            memory = model.encode(model.embedding(tokens[:, t : t + 1]), memory).memory
        memory = memory.reset(torch.tensor([False, True, False]))
        out = model.encode(model.embedding(tokens[:, 30:]), memory)
    rows = out.row_memory_size
    assert rows.shape == (len(model.layers), 3)
    torch.testing.assert_close(rows.mean(dim=1), out.memory_size, atol=1e-5, rtol=0)
    assert (rows[:, 1] == 0).all() and (rows[:, 0] > 0).all() and (rows[:, 2] > 0).all()
    if policy == "transformer-xl":  # the window: exactly L earlier steps
        assert rows[:, 0].tolist() == [24.0] * len(model.layers)


def test_carried_memory_streams_episodes_with_increasing_steps():
    """With ``carry_memory`` an environment's memory survives its episode ends: the next
    episode's steps attend to the previous episode's memories, whose absolute steps lie before
    the episode start, and the step counter never goes back. The episode start stays visible:
    the previous action is "none" exactly at the first step of every episode."""
    task = build_task("corridor", {"min_length": 3, "max_length": 5})
    agent = tiny_agent("transformer-xl", task)  # window 16: keeps every memory of 3 episodes
    runner = EnvRunner(task.vector_env(2), agent, task.seeds(0, "train", 2), carry_memory=True)
    starts, ended = [0], False
    with torch.no_grad():
        for step in range(40):
            first = bool(runner.prev_actions[0] == task.num_actions)
            assert first == (step == starts[-1])
            record = runner.step(agent, sampler(torch.Generator().manual_seed(step)))
            assert runner.memory.next_step == step + 1
            if bool(record.done[0]):
                starts.append(step + 1)
                ended = True
            elif ended:  # a later episode: memories from before its start are still there
                steps = runner.memory.layers[0].steps[0][runner.memory.layers[0].valid[0]]
                assert int(steps.min()) < starts[-1] <= int(steps.max())
    assert len(starts) >= 3
    assert int(runner.memory.sizes[:, 0].min()) == 16  # the full window, across episodes


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("policy", ["expire-span", "transformer-xl"])
def test_replay_recomputes_a_carried_rollout_exactly(policy, blocks):
    """The replay applies the acting run's memory rule: carried memory is not reset at episode
    ends (replaying with resets would change the steps after them); in one block call as step
    by step."""
    task = build_task("corridor", {"min_length": 2, "max_length": 5})
    agent = tiny_agent(policy, task)
    rollout, records = recorded_rollout(agent, task, carry_memory=True)
    agent.train()
    logits, values, aux = replay(agent, rollout, blocks)
    torch.testing.assert_close(logits, torch.stack([r.output.logits[:, 0] for r in records]),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(values, torch.stack([r.output.values[:, 0] for r in records]),
                               atol=ATOL, rtol=0)
    if blocks:  # the same auxiliary loss as the steps' mean
        torch.testing.assert_close(aux, replay(agent, rollout)[2], atol=1e-7, rtol=1e-4)


def test_a_block_replay_refuses_a_rollout_with_resets():
    task = build_task("corridor", {"min_length": 2, "max_length": 5})
    agent = tiny_agent("expire-span", task)
    rollout, _ = recorded_rollout(agent, task)
    with pytest.raises(ValueError, match="step by step"):
        replay(agent, rollout, blocks=True)


def test_block_replay_needs_carried_memory():
    with pytest.raises(ValueError, match="needs rl.carry_memory"):
        RLConfig(replay_blocks=True)
