"""Portal (our definition, SPEC.md section 4): remember a map learned by moving through it.

- ``R`` rooms; each room has ``P`` portals (the actions). Where each portal leads is drawn at the
  start of an episode and stays fixed during it: in every room one portal, at a random index,
  follows a random cycle through all the rooms (so every room can reach every other), the other
  portals lead to uniformly random other rooms.
- An episode is ``episode_steps`` steps long and holds as many trials as the agent completes: a
  trial shows a goal room (in the trial's first observation only, or in every one of its
  observations with ``goal_visible``); reaching it gives reward 1 and starts the next trial at
  once, with a new goal, from the room the agent is in.
- The faster the agent reaches goals, the more trials fit in the episode and the more reward it
  collects. Nothing in an observation reveals the map, so only an agent that remembers where the
  portals it took led (in this episode: the map changes every episode) can take shortest paths.

Observation: ``[room, previous room, goal]``: the room the agent is in, the room it came from
(``R`` at the start of an episode) and the goal (``R`` except at the start of a trial, unless
``goal_visible``). Each observation together with the previous action thus records one edge of
the map. With ``goal_visible`` the only thing to remember is the map; without it, also the goal.

``info["success"]`` at the end of an episode is the fraction of its completed trials that took a
shortest path (0 when none was completed); ``info["trials"]`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from expire_span.tasks.rl.base import RLTask, SymbolicEnv, check_ints


@dataclass
class PortalOptions:
    rooms: int = 6
    """R: rooms."""
    portals: int = 3
    """P: portals per room (the actions)."""
    episode_steps: int = 48
    """Steps per episode: how long the map must be remembered."""
    goal_visible: bool = False
    """Show the goal in every observation of its trial (False: in the trial's first only)."""

    def __post_init__(self) -> None:
        check_ints("portal", self, "rooms", "portals", "episode_steps")
        if not isinstance(self.goal_visible, bool):
            raise ValueError(f"portal: goal_visible must be true or false, got "
                             f"{self.goal_visible!r}")
        if self.rooms < 2:
            raise ValueError(f"portal: rooms must be >= 2, got {self.rooms}")
        if self.portals < 1:
            raise ValueError(f"portal: portals must be >= 1, got {self.portals}")
        if self.episode_steps < 1:
            raise ValueError(f"portal: episode_steps must be >= 1, got {self.episode_steps}")


def shortest_distances(destinations: np.ndarray) -> np.ndarray:
    """``[R, R]`` number of portal steps from each room to each room (breadth-first search)."""
    rooms = destinations.shape[0]
    distance = np.full((rooms, rooms), -1, dtype=np.int64)
    for source in range(rooms):
        distance[source, source] = 0
        frontier = [source]
        while frontier:
            reached = []
            for room in frontier:
                for target in destinations[room]:
                    if distance[source, target] < 0:
                        distance[source, target] = distance[source, room] + 1
                        reached.append(int(target))
            frontier = reached
    return distance


class PortalEnv(SymbolicEnv):
    """Observation ``MultiDiscrete([R, R + 1, R + 1])``; action ``Discrete(P)``: take a portal."""

    Options = PortalOptions
    state_fields = ("destinations", "room", "goal", "steps", "trial_steps", "trial_distance",
                    "completed", "optimal")
    options: PortalOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        rooms = self.options.rooms
        self.none = rooms
        self.observation_space = spaces.MultiDiscrete([rooms, rooms + 1, rooms + 1])
        self.action_space = spaces.Discrete(self.options.portals)
        self.destinations = np.zeros((rooms, self.options.portals), dtype=np.int64)
        self.room = self.goal = self.steps = self.trial_steps = self.trial_distance = 0
        self.completed = self.optimal = 0

    def _random_map(self) -> np.ndarray:
        rooms, portals, rng = self.options.rooms, self.options.portals, self.np_random
        # uniformly random other room: draw from R - 1 values and skip the room itself
        others = rng.integers(rooms - 1, size=(rooms, portals))
        destinations = others + (others >= np.arange(rooms)[:, None])
        cycle = rng.permutation(rooms)
        slots = rng.integers(portals, size=rooms)
        destinations[cycle, slots] = np.roll(cycle, -1)
        return destinations

    def _new_trial(self) -> None:
        others = int(self.np_random.integers(self.options.rooms - 1))
        self.goal = others + (others >= self.room)
        self.trial_steps = 0
        self.trial_distance = int(shortest_distances(self.destinations)[self.room, self.goal])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.destinations = self._random_map()
        self.room = int(self.np_random.integers(self.options.rooms))
        self.steps = self.completed = self.optimal = 0
        self._new_trial()
        return self._observation(self.room, self.none, self.goal), {}

    def step(self, action: Any):
        action = self._check_action(action)
        previous = self.room
        self.room = int(self.destinations[previous, action])
        self.steps += 1
        self.trial_steps += 1
        reward, new_trial = 0.0, False
        if self.room == self.goal:
            reward, new_trial = 1.0, True
            self.completed += 1
            self.optimal += int(self.trial_steps == self.trial_distance)
            self._new_trial()
        shown_goal = self.goal if new_trial or self.options.goal_visible else self.none
        terminated = self.steps >= self.options.episode_steps
        info: dict[str, Any] = {}
        if terminated:
            info["success"] = self.optimal / self.completed if self.completed else 0.0
            info["trials"] = self.completed
        return self._observation(self.room, previous, shown_goal), reward, terminated, False, info


class PortalTask(RLTask):
    name = "portal"
    Options = PortalOptions
    env_class = PortalEnv
    env_id = "expire_span/Portal-v0"
    primary_metric = "mean_return"
    """Goals reached per episode: what the map is for (``success_rate``, the share of trials
    that took a shortest path, is 1.0 for an agent that completes one trial well)."""

    options: PortalOptions

    @property
    def dependency_length(self) -> int:
        """An edge seen at an episode's first step may be needed at its last one. (A conservative
        bound: an agent that uses the map needs each edge only until it next takes it.)"""
        return self.options.episode_steps - 1
