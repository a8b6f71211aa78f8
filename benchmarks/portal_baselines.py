"""Scripted Portal policies: what a given amount of map memory is worth, in goals per episode.

The learned agents of docs/rl.md are judged against these (same episodes, seeds 0..N-1):

- ``random``: a uniformly random portal (what a policy that remembers nothing is reduced to);
- ``direct``: remembers every edge it took this episode and takes one that led straight to the
  goal, else a random portal (what one attention lookup, "where did I go from this room to
  that one", can do);
- ``direct-explore``: the same, but tries portals it has not taken from this room before
  falling back to a random one;
- ``oracle``: reads the hidden map and takes a shortest path.

    python benchmarks/portal_baselines.py --rooms 4 --portals 3 --episode-steps 32
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np

from expire_span.tasks.rl.portal import PortalEnv, shortest_distances

Edges = dict[tuple[int, int], int]
Policy = Callable[[PortalEnv, Edges, np.random.Generator], int]


def random_portal(env: PortalEnv, edges: Edges, rng: np.random.Generator) -> int:
    return int(rng.integers(env.options.portals))


def _known_direct(env: PortalEnv, edges: Edges) -> int | None:
    """A portal taken before from this room that led straight to the goal, if any."""
    return next((portal for portal in range(env.options.portals)
                 if edges.get((env.room, portal)) == env.goal), None)


def direct(env: PortalEnv, edges: Edges, rng: np.random.Generator) -> int:
    known = _known_direct(env, edges)
    return known if known is not None else random_portal(env, edges, rng)


def direct_explore(env: PortalEnv, edges: Edges, rng: np.random.Generator) -> int:
    known = _known_direct(env, edges)
    if known is not None:
        return known
    untried = [p for p in range(env.options.portals) if (env.room, p) not in edges]
    return int(rng.choice(untried)) if untried else random_portal(env, edges, rng)


def oracle(env: PortalEnv, edges: Edges, rng: np.random.Generator) -> int:
    distance = shortest_distances(env.destinations)
    return int(np.argmin(distance[env.destinations[env.room], env.goal]))


POLICIES: dict[str, Policy] = {"random": random_portal, "direct": direct,
                               "direct-explore": direct_explore, "oracle": oracle}


def evaluate(policy: Policy, episodes: int, **options: int) -> dict[str, float]:
    """Mean goals per episode and mean ``info["success"]`` over ``episodes`` seeded episodes."""
    env = PortalEnv(**options)
    goals, success = [], []
    for seed in range(episodes):
        env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        edges: Edges = {}
        total, terminated, info = 0.0, False, {}
        while not terminated:
            room = env.room
            portal = policy(env, edges, rng)
            observation, reward, terminated, _, info = env.step(portal)
            edges[(room, portal)] = int(observation[0])  # the room it led to, as observed
            total += reward
        goals.append(total)
        success.append(info["success"])
    return {"goals": float(np.mean(goals)), "success": float(np.mean(success))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--portals", type=int, default=3)
    parser.add_argument("--episode-steps", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args()
    options = {"rooms": args.rooms, "portals": args.portals, "episode_steps": args.episode_steps}
    results = {name: evaluate(policy, args.episodes, **options)
               for name, policy in POLICIES.items()}
    print(f"rooms {args.rooms}, portals {args.portals}, {args.episode_steps} steps, "
          f"{args.episodes} episodes: goals per episode / success")
    for name, result in results.items():
        print(f"  {name:15s} {result['goals']:5.1f} / {result['success']:.2f}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"options": options, "episodes": args.episodes, "policies": results}, file,
                      indent=2)


if __name__ == "__main__":
    main()
