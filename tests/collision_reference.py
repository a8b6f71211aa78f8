"""A straightforward step-by-step Object Collision simulation: one simulation, one frame, one
particle at a time, in plain Python, following the rules written in docs/tasks.md.

It shares only the random draws with the vectorised generator (the counter-based hash, the
mapping of a draw to a velocity and the colour-pair numbering); the simulation itself is written
independently, so equal outputs test the vectorised physics, collisions, queries, labels and token
layout, in both variants (``release``: ordered colour pairs; ``simple``: unordered).
"""

from __future__ import annotations

import math

from expire_span.tasks.object_collision import (
    CHANGE,
    COLOUR,
    DIRECTION,
    EASY,
    MAX_ATTEMPTS,
    NEW_COLOUR,
    POSITION,
    QUERY,
    CollisionOptions,
    draw,
    simulation_key,
    to_velocity,
    uniform,
)


def reference_simulation(options: CollisionOptions, split: str, simulation: int, frames: int):
    """(tokens, labels) of the first ``frames`` frames, as flat Python lists."""
    n, grid, colours, speed = options.particles, options.grid, options.colours, options.speed
    key = simulation_key(options.data_seed, split, simulation)

    def rand(frame, particle, purpose, attempt=0):
        return draw(key, frame, particle, purpose, attempt)

    def new_velocity(bits):
        return [float(c) for c in to_velocity(bits, speed, options.variant)]

    def inside(x, y):
        return 0 < x < grid - 1 and 0 < y < grid - 1

    ordered = options.variant == "release"
    pairs = [(a, b) for a in range(colours) for b in range(0 if ordered else a, colours)]
    position = [[float(uniform(rand(0, p, POSITION, axis))) * (grid - 1) for axis in (0, 1)]
                for p in range(n)]
    velocity = [new_velocity(rand(0, p, DIRECTION)) for p in range(n)]
    colour = [int(rand(0, p, COLOUR)) % colours for p in range(n)]
    last_collision: dict[tuple[int, int], tuple[int, int]] = {}
    most_recent = None
    tokens, labels = [], []
    for t in range(frames):
        frame = t + 1
        for p in range(n):
            x, y = position[p]
            vx, vy = velocity[p]
            attempt = 0
            while not inside(x + vx, y + vy):
                attempt += 1
                if attempt > MAX_ATTEMPTS:
                    dx, dy = (grid - 1) / 2 - x, (grid - 1) / 2 - y
                    norm = math.sqrt(dx * dx + dy * dy)
                    vx, vy = speed * (dx / norm), speed * (dy / norm)
                else:
                    vx, vy = new_velocity(rand(frame, p, DIRECTION, attempt))
            position[p] = [x + vx, y + vy]
            velocity[p] = [vx, vy]
            if float(uniform(rand(frame, p, CHANGE))) < options.colour_change:
                colour[p] = int(rand(frame, p, NEW_COLOUR)) % colours
        cells = [(round(x), round(y)) for x, y in position]
        for p in range(n):
            for q in range(p + 1, n):
                if cells[p] == cells[q]:
                    pair = (colour[p], colour[q])
                    if not ordered:
                        pair = (min(pair), max(pair))
                    last_collision[pair] = cells[p]
                    most_recent = pair
        easy = float(uniform(rand(frame, 0, EASY))) < options.easy_query
        if easy and most_recent is not None:
            query = most_recent
        else:
            query = pairs[int(rand(frame, 0, QUERY)) % len(pairs)]
        label = 0
        if query in last_collision:
            cx, cy = last_collision[query]
            label = 1 + 2 * (2 * cx >= grid) + (2 * cy >= grid)
        for p in range(n):
            tokens += [cells[p][0], cells[p][1] + grid, colour[p] + 2 * grid]
        tokens += [query[0] + 2 * grid + colours, query[1] + 2 * grid + colours]
        labels.append(label)
    return tokens, labels
