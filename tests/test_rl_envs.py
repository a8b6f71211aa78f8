"""The RL environments: dynamics and rewards on scripted actions, seeding, state save/restore,
gymnasium's registry and vector API, and the chance level of memoryless policies."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from expire_span.tasks import build_task
from expire_span.tasks.rl import CorridorEnv, InstructionEnv, PortalEnv
from expire_span.tasks.rl.instruction import CHOICE, DISTRACTOR, INSTRUCTION
from expire_span.tasks.rl.portal import shortest_distances

ENVS = {
    "corridor": (CorridorEnv, {"colours": 3, "min_length": 3, "max_length": 6}),
    "portal": (PortalEnv, {"rooms": 5, "portals": 3, "episode_steps": 30}),
    "instruction": (InstructionEnv, {"colours": 3, "objects": 4, "choices": 4, "min_delay": 2,
                                     "max_delay": 5}),
}


def corridor_oracle(env: CorridorEnv) -> int:
    """Reads the hidden cue: forward until the junction, then the cue's exit."""
    return 0 if env.position < env.length else 1 + env.cue


def portal_oracle(env: PortalEnv) -> int:
    """Reads the hidden map: a portal that shortens the distance to the goal."""
    distance = shortest_distances(env.destinations)
    return int(np.argmin(distance[env.destinations[env.room], env.goal]))


def instruction_oracle(env: InstructionEnv) -> int:
    matches = np.flatnonzero((env.options_shown == [env.colour, env.item]).all(axis=1))
    return int(matches[0]) if env.steps == env.delay + 1 else 0


def run_episode(env, policy, seed=None):
    observation, _ = env.reset(seed=seed)
    observations, rewards = [observation], []
    while True:
        observation, reward, terminated, truncated, info = env.step(policy(env, observation))
        observations.append(observation)
        rewards.append(reward)
        if terminated or truncated:
            return observations, rewards, terminated, truncated, info


# ----------------------------------------------------------------------------- corridor


def test_corridor_shows_the_cue_once_then_corridor_then_junction():
    env = CorridorEnv(colours=3, min_length=4, max_length=4)
    observation, info = env.reset(seed=1)
    cue = int(observation[0])
    assert cue == env.cue and 0 <= cue < 3 and info["length"] == 4
    seen = []
    for action in (0, 2, 3, 0):  # every action moves forward in the one-way corridor
        observation, reward, terminated, truncated, _ = env.step(action)
        seen.append(int(observation[0]))
        assert reward == 0 and not terminated and not truncated
    assert seen == [3, 3, 3, 4]  # corridor = C, junction = C + 1
    observation, reward, terminated, _, _ = env.step(0)  # forward at the junction: a wall
    assert int(observation[0]) == 4 and reward == 0 and not terminated and env.position == 4
    _, reward, terminated, truncated, info = env.step(1 + cue)
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, 1.0)


def test_corridor_wrong_exit_and_step_limit():
    env = CorridorEnv(colours=2, min_length=2, max_length=2, step_limit=5)
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    _, reward, terminated, _, info = env.step(1 + (1 - env.cue))
    assert (reward, terminated, info["success"]) == (0.0, True, 0.0)
    env.reset(seed=0)
    results = [env.step(0) for _ in range(5)]  # never takes an exit
    assert [r[3] for r in results] == [False] * 4 + [True]
    assert results[-1][1] == 0.0 and results[-1][4]["success"] == 0.0
    assert CorridorEnv(max_length=20).options.limit == 42


def test_corridor_lengths_and_cues_cover_their_ranges():
    env = CorridorEnv(colours=3, min_length=5, max_length=8)
    env.reset(seed=3)
    draws = [(env.reset()[1]["length"], env.cue) for _ in range(300)]
    assert {length for length, _ in draws} == {5, 6, 7, 8}
    assert {cue for _, cue in draws} == {0, 1, 2}


def test_corridor_oracle_scores_100_percent_and_memoryless_policies_score_chance():
    colours, episodes = 3, 1500
    env = CorridorEnv(colours=colours, min_length=3, max_length=9)
    oracle = [run_episode(env, lambda e, _: corridor_oracle(e), seed=s)[4]["success"]
              for s in range(200)]
    assert np.mean(oracle) == 1.0
    # A memoryless policy sees "junction" whatever the cue, so it takes one fixed exit there
    # (or a random one). On the same episodes, exactly one of the C fixed exits is right for
    # each episode, so their success rates sum to exactly 1 and each is about 1 / C.
    rates = []
    for exit_ in range(colours):
        def policy(e, observation, exit_=exit_):
            return 1 + exit_ if observation[0] == colours + 1 else 0
        rates.append(np.mean([run_episode(env, policy, seed=s)[4]["success"]
                              for s in range(episodes)]))
    assert sum(rates) == pytest.approx(1.0)
    tolerance = 4 * np.sqrt((1 / colours) * (1 - 1 / colours) / episodes)
    assert max(abs(r - 1 / colours) for r in rates) < tolerance
    rng = np.random.default_rng(0)

    def random_exit(e, observation):
        return int(rng.integers(1, colours + 1)) if observation[0] == colours + 1 else 0

    random_rate = np.mean([run_episode(env, random_exit, seed=s)[4]["success"]
                           for s in range(episodes)])
    assert abs(random_rate - 1 / colours) < tolerance


# ----------------------------------------------------------------------------- portal


def naive_distances(destinations: np.ndarray) -> np.ndarray:
    rooms = destinations.shape[0]
    distance = np.full((rooms, rooms), np.inf)
    np.fill_diagonal(distance, 0)
    for room in range(rooms):
        for target in destinations[room]:
            if target != room:
                distance[room, target] = 1
    for k, i, j in itertools.product(range(rooms), repeat=3):  # Floyd-Warshall
        distance[i, j] = min(distance[i, j], distance[i, k] + distance[k, j])
    return distance


def test_portal_maps_are_random_per_episode_strongly_connected_and_without_self_loops():
    env = PortalEnv(rooms=6, portals=3)
    env.reset(seed=5)
    maps = []
    for _ in range(30):
        env.reset()
        destinations = env.destinations.copy()
        assert (destinations != np.arange(6)[:, None]).all()
        distance = shortest_distances(destinations)
        assert (distance >= 0).all()  # the hidden cycle reaches every room
        np.testing.assert_array_equal(distance, naive_distances(destinations))
        maps.append(destinations.tobytes())
    assert len(set(maps)) == 30


def test_portal_trials_goals_and_rewards_on_a_scripted_episode():
    env = PortalEnv(rooms=5, portals=3, episode_steps=25)
    observation, _ = env.reset(seed=2)
    room, previous, goal = (int(v) for v in observation)
    assert (room, previous) == (env.room, 5) and goal == env.goal != room
    total, trials = 0.0, 0
    for step in range(25):
        action = portal_oracle(env)
        target = int(env.destinations[env.room, action])
        came_from, old_goal = env.room, env.goal
        observation, reward, terminated, truncated, info = env.step(action)
        assert int(observation[0]) == target and int(observation[1]) == came_from
        reached = target == old_goal
        assert reward == float(reached)
        # the goal is shown only in a trial's first observation
        assert int(observation[2]) == (env.goal if reached else 5)
        if reached:
            assert env.goal != target
        total += reward
        trials += int(reached)
        assert terminated == (step == 24) and not truncated
    assert info["trials"] == trials == total > 0
    assert info["success"] == 1.0  # the oracle always takes a shortest path


def test_portal_goal_visible_shows_the_goal_at_every_step_and_changes_nothing_else():
    hidden, visible = PortalEnv(rooms=4, portals=3, episode_steps=40), \
        PortalEnv(rooms=4, portals=3, episode_steps=40, goal_visible=True)
    first_hidden, _ = hidden.reset(seed=7)
    first_visible, _ = visible.reset(seed=7)
    np.testing.assert_array_equal(first_hidden, first_visible)
    rng = np.random.default_rng(0)
    shown_later = 0
    for _ in range(40):
        action = int(rng.integers(3))
        obs_h, reward_h, done_h, _, info_h = hidden.step(action)
        obs_v, reward_v, done_v, _, info_v = visible.step(action)
        np.testing.assert_array_equal(obs_h[:2], obs_v[:2])  # same map, same walk
        assert (reward_h, done_h, info_h) == (reward_v, done_v, info_v)
        assert int(obs_v[2]) == visible.goal  # always the current goal
        assert int(obs_h[2]) == (hidden.goal if reward_h else 4)
        shown_later += int(not reward_v)
    assert shown_later > 0  # steps inside a trial, where only the visible goal differs


def test_portal_success_counts_shortest_paths_only():
    env = PortalEnv(rooms=4, portals=2, episode_steps=200)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    *_, info = run_episode(env, lambda e, _: int(rng.integers(2)))
    assert info["trials"] > 5
    assert 0.0 <= info["success"] < 1.0
    assert info["success"] == pytest.approx(env.optimal / env.completed)


# ----------------------------------------------------------------------------- instruction


def test_instruction_phases_choice_and_reward():
    env = InstructionEnv(colours=3, objects=4, choices=4, min_delay=3, max_delay=3)
    observation, _ = env.reset(seed=4)
    blank = [3, 4]
    assert observation[0] == INSTRUCTION
    assert list(observation[1:3]) == [env.colour, env.item]
    assert list(observation[3:]) == blank * 3
    for _ in range(3):
        observation, reward, terminated, _, _ = env.step(0)
        assert observation[0] == DISTRACTOR and reward == 0 and not terminated
        assert list(observation[3:]) == blank * 3
        assert observation[1] < 3 and observation[2] < 4
    observation, reward, terminated, _, _ = env.step(0)
    assert observation[0] == CHOICE and not terminated
    options = observation[1:].reshape(4, 2)
    assert len({tuple(o) for o in options}) == 4  # distinct
    target = [env.colour, env.item]
    assert sum((o == target).all() for o in options) == 1
    # decoys come from a small grid around the instruction: some share its colour or object
    assert any((o[0] == env.colour) != (o[1] == env.item) for o in options)
    right = int(np.flatnonzero((options == target).all(axis=1))[0])
    saved = env.get_state()
    _, reward, terminated, _, info = env.step((right + 1) % 4)
    assert (reward, terminated, info["success"]) == (0.0, True, 0.0)
    env.set_state(saved)
    _, reward, terminated, _, info = env.step(right)
    assert (reward, terminated, info["success"]) == (1.0, True, 1.0)


def test_instruction_actions_before_the_choice_change_nothing():
    env = InstructionEnv(min_delay=4, max_delay=8)
    first = run_episode(env, lambda e, _: 0 if e.steps <= e.delay else 1, seed=9)
    second = run_episode(env, lambda e, _: e.steps % 3 if e.steps <= e.delay else 1, seed=9)
    for a, b in zip(first[0], second[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[1] == second[1]


def test_instruction_choice_alone_does_not_reveal_the_instruction():
    """Policies that see only the choice score chance: the most "central" option (sharing an
    attribute with the most others), or a fixed position."""
    choices, episodes = 3, 3000
    env = InstructionEnv(colours=3, objects=3, choices=choices, min_delay=0, max_delay=0)
    env.reset(seed=0)
    central = first = 0
    for _ in range(episodes):
        env.reset()
        observation, *_ = env.step(0)
        options = observation[1:].reshape(choices, 2)
        shared = [sum(int((o[0] == p[0]) or (o[1] == p[1])) for p in options) for o in options]
        right = int(np.flatnonzero((options == [env.colour, env.item]).all(axis=1))[0])
        central += int(int(np.argmax(shared)) == right)
        first += int(right == 0)
    tolerance = 4 * np.sqrt((1 / choices) * (1 - 1 / choices) / episodes)
    assert abs(central / episodes - 1 / choices) < tolerance
    assert abs(first / episodes - 1 / choices) < tolerance


def test_instruction_oracle_scores_100_percent():
    env = InstructionEnv(colours=2, objects=2, choices=3, min_delay=0, max_delay=3)
    results = [run_episode(env, lambda e, _: instruction_oracle(e), seed=s)[4]["success"]
               for s in range(100)]
    assert np.mean(results) == 1.0


# ----------------------------------------------------------------------------- all envs


@pytest.mark.parametrize("name", sorted(ENVS))
def test_gymnasium_checker_accepts_the_env(name):
    cls, options = ENVS[name]
    check_env(cls(**options), skip_render_check=True)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_seeding_reproduces_episodes_and_different_seeds_differ(name):
    cls, options = ENVS[name]

    def trajectory(seed):
        env = cls(**options)
        rng = np.random.default_rng(0)  # the same action sequence every time
        observation, _ = env.reset(seed=seed)
        out = [observation.tolist()]
        for _ in range(60):
            observation, reward, terminated, truncated, _ = env.step(
                int(rng.integers(env.action_space.n)))
            out.append((observation.tolist(), reward, terminated, truncated))
            if terminated or truncated:
                observation, _ = env.reset()
                out.append(observation.tolist())
        return out

    assert trajectory(11) == trajectory(11)
    assert trajectory(11) != trajectory(12)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_saved_state_continues_exactly(name):
    cls, options = ENVS[name]
    env = cls(**options)
    env.reset(seed=3)
    for _ in range(2):
        env.step(0)
    state = env.get_state()
    rng = np.random.default_rng(1)
    actions = [int(rng.integers(env.action_space.n)) for _ in range(40)]

    def play(e):
        out = []
        for action in actions:
            observation, reward, terminated, truncated, _ = e.step(action)
            out.append((observation.tolist(), reward))
            if terminated or truncated:
                out.append(e.reset()[0].tolist())
        return out

    expected = play(env)
    other = cls(**options)
    other.reset(seed=99)
    other.set_state(state)
    assert play(other) == expected


@pytest.mark.parametrize("name", sorted(ENVS))
def test_registered_ids_and_the_vector_api(name):
    task = build_task(name, ENVS[name][1])
    single = gym.make(task.env_id, **task.options_dict())
    assert single.observation_space == task.env_class(**task.options_dict()).observation_space
    envs = task.vector_env(4)
    observations, _ = envs.reset(seed=task.seeds(0, "train", 4))
    assert observations.shape == (4, len(task.observation_sizes))
    ended = 0
    for _ in range(80):
        actions = envs.action_space.sample()
        observations, rewards, terminated, truncated, info = envs.step(actions)
        assert observations.shape == (4, len(task.observation_sizes)) and rewards.shape == (4,)
        done = terminated | truncated
        if done.any():
            ended += int(done.sum())
            final = info["final_info"]
            assert final["_success"][done].all()
            assert ((final["success"][done] >= 0) & (final["success"][done] <= 1)).all()
            # the returned observation already belongs to the next episode
            for index in np.flatnonzero(done):
                restarted = envs.envs[index].unwrapped
                assert observations[index].tolist() == _first_observation(restarted)
    assert ended > 0
    # gymnasium's own SyncVectorEnv over gym.make works as well
    manual = gym.vector.SyncVectorEnv([lambda: gym.make(task.env_id, **task.options_dict())] * 2)
    manual.reset(seed=[1, 2])
    manual.step(manual.action_space.sample())


def _first_observation(env) -> list[int]:
    """What an environment that has just been reset shows (read from its state)."""
    if isinstance(env, CorridorEnv):
        return [env.cue]
    if isinstance(env, PortalEnv):
        return [env.room, env.options.rooms, env.goal]
    blank = [env.options.colours, env.options.objects] * (env.options.choices - 1)
    return [INSTRUCTION, env.colour, env.item, *blank]


def test_split_seeds_are_disjoint():
    seeds = {split: set(build_task("corridor").seeds(0, split, 1000))
             for split in ("train", "valid", "test")}
    assert not seeds["train"] & seeds["valid"] and not seeds["train"] & seeds["test"]
    assert not seeds["valid"] & seeds["test"]
    assert build_task("corridor").seeds(0, "valid", 5) != build_task("corridor").seeds(1, "valid",
                                                                                       5)


def test_bad_options_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="min_length"):
        CorridorEnv(min_length=5, max_length=3)
    with pytest.raises(ValueError, match="step_limit"):
        CorridorEnv(max_length=10, step_limit=10)
    with pytest.raises(ValueError, match="rooms"):
        PortalEnv(rooms=1)
    with pytest.raises(ValueError, match="choices"):
        InstructionEnv(colours=1, objects=2, choices=3)
    with pytest.raises(ValueError, match="invalid action"):
        env = CorridorEnv()
        env.reset(seed=0)
        env.step(7)


# ----------------------------------------------------------------------------- long episodes


def test_long_corridor_shows_the_cue_only_at_its_first_step():
    """Corridors of 100-200 steps: one cue, then nothing but corridor cells until the junction,
    which comes exactly N steps after the cue; the cue's exit pays, the other does not."""
    env = CorridorEnv(colours=2, min_length=100, max_length=200)
    assert env.options.limit == 402
    lengths = set()
    for seed in range(20):
        observation, info = env.reset(seed=seed)
        cue, length = int(observation[0]), info["length"]
        assert cue == env.cue < 2 and 100 <= length <= 200
        lengths.add(length)
        tokens = [int(env.step(0)[0][0]) for _ in range(length)]
        assert tokens == [2] * (length - 1) + [3]  # corridor = C, junction = C + 1
        saved = env.get_state()
        _, reward, terminated, _, info = env.step(1 + (1 - cue))
        assert (reward, terminated, info["success"]) == (0.0, True, 0.0)
        env.set_state(saved)
        _, reward, terminated, _, info = env.step(1 + cue)
        assert (reward, terminated, info["success"]) == (1.0, True, 1.0)
    assert len(lengths) > 10


def test_long_instruction_delay_shows_the_instruction_once():
    env = InstructionEnv(colours=3, objects=3, choices=3, min_delay=50, max_delay=100)
    delays = set()
    for seed in range(10):
        observation, _ = env.reset(seed=seed)
        assert observation[0] == INSTRUCTION and 50 <= env.delay <= 100
        delays.add(env.delay)
        phases = [int(env.step(0)[0][0]) for _ in range(env.delay + 1)]
        assert phases == [DISTRACTOR] * env.delay + [CHOICE]
        *_, info = env.step(instruction_oracle(env))
        assert info["success"] == 1.0
    assert len(delays) > 5


def test_long_portal_episode_holds_many_trials_on_one_map():
    env = PortalEnv(rooms=4, portals=3, episode_steps=128)
    env.reset(seed=1)
    destinations = env.destinations.copy()
    total = 0.0
    for _ in range(127):
        _, reward, terminated, _, _ = env.step(portal_oracle(env))
        total += reward
        assert not terminated
    np.testing.assert_array_equal(env.destinations, destinations)  # the map stays
    *_, terminated, _, info = env.step(portal_oracle(env))
    assert terminated and info["trials"] >= 40 and info["success"] == 1.0


def test_decision_steps_and_dependency_lengths():
    corridor = build_task("corridor", {"colours": 3, "min_length": 100, "max_length": 150})
    observations = np.array([[0], [3], [4], [2], [4]])  # cue, corridor, junction, cue, junction
    assert corridor.decision_steps(observations).tolist() == [False, False, True, False, True]
    assert corridor.dependency_length == 150
    instruction = build_task("instruction", {"min_delay": 5, "max_delay": 9})
    phases = np.zeros((3, len(instruction.observation_sizes)), dtype=np.int64)
    phases[:, 0] = [INSTRUCTION, DISTRACTOR, CHOICE]
    assert instruction.decision_steps(phases).tolist() == [False, False, True]
    assert instruction.dependency_length == 10
    portal = build_task("portal", {"episode_steps": 40})
    assert portal.decision_steps(np.zeros((2, 3), dtype=np.int64)).tolist() == [True, True]
    assert portal.dependency_length == 39


@pytest.mark.parametrize(("cls", "options", "message"), [
    (CorridorEnv, {"min_length": 100.5, "max_length": 200}, "corridor: min_length must be an "
                                                             "integer, got 100.5"),
    (CorridorEnv, {"max_length": True}, "corridor: max_length must be an integer"),
    (CorridorEnv, {"min_length": 0, "max_length": 200}, "corridor: need 1 <= min_length"),
    (CorridorEnv, {"min_length": 200, "max_length": 100}, "corridor: need 1 <= min_length"),
    (InstructionEnv, {"max_delay": 20.0}, "instruction: max_delay must be an integer"),
    (PortalEnv, {"episode_steps": "128"}, "portal: episode_steps must be an integer"),
    (PortalEnv, {"goal_visible": 1}, "portal: goal_visible must be true or false"),
])
def test_non_integer_and_bad_lengths_are_refused(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_scripted_portal_baselines_order_by_the_map_they_remember():
    """benchmarks/portal_baselines.py: the references the learned agents are judged against."""
    from tests.helpers import benchmark_script

    with benchmark_script("portal_baselines") as module:
        options = {"rooms": 4, "portals": 3, "episode_steps": 32}
        goals = {name: module.evaluate(policy, 40, **options)
                 for name, policy in module.POLICIES.items()}
    assert goals["oracle"]["success"] == 1.0
    assert (goals["random"]["goals"] < goals["direct"]["goals"]
            < goals["direct-explore"]["goals"] < goals["oracle"]["goals"])
    assert goals["direct"]["goals"] > 1.5 * goals["random"]["goals"]  # the claim is reachable
