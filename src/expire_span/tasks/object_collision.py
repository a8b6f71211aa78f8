"""Object Collision (``--task object-collision``): SPEC.md section 4, in two variants (both written
down in docs/tasks.md).

``variant="release"`` (the default, and the paper presets') behaves like the authors' released
generator, where the paper's numbers come from; ``variant="simple"`` is this project's first
reading of SPEC.md. They differ in two rules:

==================  =========================================  ====================================
rule                release                                    simple
==================  =========================================  ====================================
velocity            each component ``speed * N(0, 1)``,        ``speed`` times a unit vector of
                    redrawn the same way at a bounce            uniform direction
colour pairs        ordered: (colour of the lower-numbered     unordered ``a <= b``; random query
                    particle, colour of the other); a random   uniform over the
                    query draws both colours independently     ``colours (colours + 1) / 2`` pairs
                    (``colours ** 2`` pairs)
==================  =========================================  ====================================

Particles move on a ``grid x grid`` board. Each frame, every particle

1. moves by its velocity; if the move would leave the open square ``(0, grid - 1)^2`` it draws new
   velocities until one stays inside (a bounce) and keeps it until the next bounce; then
2. changes colour with probability ``colour_change`` (to a uniformly drawn colour).

A particle's cell is its position rounded to the nearest integer. Two particles *collide* in a
frame when they share a cell after moving; their colour pair then records that cell as its last
collision and becomes the most recent colliding pair. The frame then asks about a colour pair:
with probability ``easy_query`` the most recent colliding pair (if any; else a random one), else a
random pair.

A frame is ``3 * particles + 2`` tokens: ``x``, ``y + grid``, ``colour + 2 grid`` for each particle,
then the queried pair ``a + 2 grid + colours``, ``b + 2 grid + colours``. Its last token is labelled
with the quadrant ``1 + 2 [2x >= grid] + [2y >= grid]`` of the queried pair's last collision, or 0
(not scored) when the pair has not collided yet. Loss and error rate count labelled positions only.

A split is made of independent simulations of ``simulation_frames`` frames (the last one shorter),
each a document (memory is reset between them). Every random draw is a counter-based hash of
(seed, split, simulation, frame, particle, purpose, attempt), so the generator is vectorised over
simulations (and over frames wherever the physics allows), any simulation can be regenerated on
its own, and a plain step-by-step loop gives exactly the same frames (tests/collision_reference.py).
Generated splits are cached on disk and memory-mapped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from expire_span.tasks.base import SPLITS
from expire_span.tasks.corpus import cache_root, fingerprint
from expire_span.tasks.hashing import hash_ints
from expire_span.tasks.streams import Documents, StreamOptions, StreamTask

GENERATOR_VERSION = 1  # part of the cache key: bump when the generated data changes

# Purposes of the random draws (a coordinate of the hash).
POSITION, DIRECTION, COLOUR, CHANGE, NEW_COLOUR, EASY, QUERY = range(7)
MAX_PARTICLES = 1024
MAX_ATTEMPTS = 64  # direction draws per bounce before heading straight for the centre
ATTEMPT_BLOCK = 8
DIRECTION_BITS = 16
_angles = 2 * np.pi * np.arange(1 << DIRECTION_BITS) / (1 << DIRECTION_BITS)
DIRECTIONS = np.stack([np.cos(_angles), np.sin(_angles)], axis=-1)
"""Unit vectors a direction draw picks from (a table, so that every implementation gets
bit-identical velocities)."""
RADIUS_BITS = 16
RADII = np.sqrt(-2.0 * np.log1p(-(np.arange(1 << RADIUS_BITS) + 0.5) / (1 << RADIUS_BITS)))
"""Quantiles of the Rayleigh distribution (the length of a 2-D standard normal vector) at the
midpoints of ``2^16`` equal-probability bins: a radius from this table times a uniform direction is
a Box-Muller draw of two independent N(0, 1) components (truncated at 4.9 sigma, P ~ 1e-5)."""
VARIANTS = ("release", "simple")


def simulation_key(seed: int, split: str, simulation: np.ndarray | int) -> np.ndarray:
    """The per-simulation root of every random draw."""
    return hash_ints(seed, SPLITS.index(split), simulation)


def draw(key, frame, particle, purpose: int, attempt=0) -> np.ndarray:
    """uint64 random bits for (simulation key, frame, particle, purpose, attempt), broadcast.
    ``frame`` is 0 for the initial state and ``t + 1`` for frame ``t``."""
    counter = ((np.asarray(frame, dtype=np.int64) * MAX_PARTICLES + particle) * 8 + purpose)
    return hash_ints(np.asarray(key).view(np.int64), counter * 256 + attempt)


def uniform(bits: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from random bits (53 bits of precision)."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def direction(bits: np.ndarray) -> np.ndarray:
    return DIRECTIONS[(bits & np.uint64((1 << DIRECTION_BITS) - 1)).astype(np.int64)]


def to_velocity(bits: np.ndarray, speed: float, variant: str) -> np.ndarray:
    """The velocity ``[..., 2]`` a draw gives: ``speed`` times a unit vector (``simple``) or
    ``speed`` times two independent N(0, 1) components (``release``, as the authors' generator)."""
    if variant == "simple":
        return speed * direction(bits)
    radius = RADII[((bits >> np.uint64(DIRECTION_BITS))
                    & np.uint64((1 << RADIUS_BITS) - 1)).astype(np.int64)]
    return (speed * radius)[..., None] * direction(bits)


def colour_pairs(colours: int, ordered: bool = False) -> list[tuple[int, int]]:
    """Colour pairs ``(a, b)`` in the order of their ids: all ``colours ** 2`` when ``ordered``
    (the release's), else the unordered ones ``a <= b``."""
    return [(a, b) for a in range(colours) for b in range(0 if ordered else a, colours)]


def quadrant(x, y, grid: int):
    return 1 + 2 * (2 * x >= grid) + (2 * y >= grid)


@dataclass
class CollisionOptions(StreamOptions):
    variant: str = "release"
    """``release``: the authors' generator (Gaussian velocity components, ordered colour pairs);
    ``simple``: fixed speed, unordered pairs (see the module docstring)."""
    particles: int = 2
    """Particles on the board."""
    colours: int = 5
    """Number of colours."""
    grid: int = 16
    """Side of the square board, in cells."""
    speed: float = 0.5
    """``release``: standard deviation of each velocity component; ``simple``: distance a
    particle moves per frame."""
    colour_change: float = 0.05
    """Probability per frame that a particle changes colour."""
    easy_query: float = 0.4
    """Probability that a frame asks about the most recent colliding pair (else a random pair)."""
    train_frames: int = 50_000_000
    """Frames in the training split."""
    valid_frames: int = 5_000_000
    """Frames in the validation split."""
    test_frames: int = 5_000_000
    """Frames in the test split."""
    simulation_frames: int = 50_000
    """Frames per independent simulation; memory is reset between simulations."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"object-collision: variant must be one of {', '.join(VARIANTS)}, "
                             f"got {self.variant!r}")
        if not 2 <= self.particles <= MAX_PARTICLES:
            raise ValueError(f"object-collision: particles must be in [2, {MAX_PARTICLES}], "
                             f"got {self.particles}")
        if self.colours < 1 or self.grid < 2:
            raise ValueError("object-collision: colours must be >= 1 and grid >= 2, got "
                             f"{self.colours} and {self.grid}")
        if not 0 < self.speed < (self.grid - 1) / 2:
            raise ValueError(f"object-collision: speed must be in (0, (grid - 1) / 2), "
                             f"got {self.speed}")
        for name in ("colour_change", "easy_query"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"object-collision: {name} must be a probability, "
                                 f"got {getattr(self, name)}")
        for name in ("train_frames", "valid_frames", "test_frames", "simulation_frames"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"object-collision: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def frame_tokens(self) -> int:
        return 3 * self.particles + 2

    @property
    def ordered_pairs(self) -> bool:
        """Whether a colour pair is ordered by particle number (the release) or not."""
        return self.variant == "release"

    def frames(self, split: str) -> int:
        return {"train": self.train_frames, "valid": self.valid_frames,
                "test": self.test_frames}[split]


class CollisionSimulator:
    """Vectorised generator: many simulations advance together, one frame at a time for the
    motion (a bounce depends on the position), in chunks of frames for everything else."""

    def __init__(self, options: CollisionOptions) -> None:
        self.options = options
        pairs = colour_pairs(options.colours, options.ordered_pairs)
        self.pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self.pair_id = np.zeros((options.colours, options.colours), dtype=np.int64)
        for index, (a, b) in enumerate(pairs):
            self.pair_id[a, b] = index
            if not options.ordered_pairs:
                self.pair_id[b, a] = index

    def simulate(
        self, split: str, simulations: np.ndarray, frames: int,
        tokens: np.ndarray | None = None, labels: np.ndarray | None = None,
        progress: bool = False, chunk: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``0 .. frames - 1`` of the given simulations: tokens ``[S, frames, 3N + 2]`` and
        labels ``[S, frames]`` (written into ``tokens`` / ``labels`` when given). Frames are
        processed ``chunk`` at a time (default: sized to bound memory); the result is the same."""
        opts = self.options
        count, n = len(simulations), opts.particles
        if tokens is None:
            tokens = np.zeros((count, frames, opts.frame_tokens), dtype=np.int64)
        if labels is None:
            labels = np.zeros((count, frames), dtype=np.int64)
        key = simulation_key(opts.data_seed, split, np.asarray(simulations, dtype=np.int64))
        state = self._initial_state(key)
        chunk = chunk or max(16, (1 << 21) // max(1, count * n))
        bar = tqdm(total=frames, desc=f"object-collision {split}", unit="frame",
                   disable=None if progress else True, leave=False)  # None: only on a terminal
        with bar:
            for start in range(0, frames, chunk):
                stop = min(frames, start + chunk)
                chunk_tokens, chunk_labels = self._advance(key, state, start, stop)
                tokens[:, start:stop] = chunk_tokens.transpose(1, 0, 2)
                labels[:, start:stop] = chunk_labels.T
                bar.update(stop - start)
        return tokens, labels

    def _initial_state(self, key: np.ndarray) -> dict[str, np.ndarray]:
        opts = self.options
        k = key[:, None]
        particle = np.arange(opts.particles)[None, :]
        position = np.stack(
            [uniform(draw(k, 0, particle, POSITION, axis)) for axis in (0, 1)], axis=-1
        ) * (opts.grid - 1)
        return {
            "position": position,
            "velocity": self._velocity(draw(k, 0, particle, DIRECTION)),
            "colour": (draw(k, 0, particle, COLOUR) % np.uint64(opts.colours)).astype(np.int64),
            "last_cell": np.full((len(key), len(self.pairs)), -1, dtype=np.int64),
            "recent": np.full(len(key), -1, dtype=np.int64),
        }

    def _velocity(self, bits: np.ndarray) -> np.ndarray:
        return to_velocity(bits, self.options.speed, self.options.variant)

    def _inside(self, position: np.ndarray) -> np.ndarray:
        return ((position > 0) & (position < self.options.grid - 1)).all(axis=-1)

    def _move(self, key: np.ndarray, state: dict[str, np.ndarray], frame: int) -> np.ndarray:
        """Advance every particle by one frame (with bounces); return the new positions.

        A bouncing particle takes the first of its velocity draws 1, 2, ... that stays inside;
        the draws are tried ``ATTEMPT_BLOCK`` at a time so that a frame needs few numpy calls.
        """
        opts = self.options
        position, velocity = state["position"], state["velocity"]
        moved = position + velocity
        sims, particles = np.nonzero(~self._inside(moved))
        first = 1
        while len(sims):
            here = position[sims, particles][:, None, :]  # [m, 1, 2]
            if first > MAX_ATTEMPTS:  # practically never: head for the centre, always valid
                delta = (opts.grid - 1) / 2 - here
                norm = np.sqrt(delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1])
                candidate_velocity = opts.speed * (delta / norm[..., None])
            else:
                attempts = np.arange(first, min(first + ATTEMPT_BLOCK, MAX_ATTEMPTS + 1))
                bits = draw(key[sims, None], frame + 1, particles[:, None], DIRECTION, attempts)
                candidate_velocity = self._velocity(bits)  # [m, attempts, 2]
            candidate = here + candidate_velocity
            ok = self._inside(candidate)
            found = ok.any(axis=1)
            rows, choice = np.nonzero(found)[0], ok.argmax(axis=1)[found]
            velocity[sims[found], particles[found]] = candidate_velocity[rows, choice]
            moved[sims[found], particles[found]] = candidate[rows, choice]
            sims, particles = sims[~found], particles[~found]
            first += candidate_velocity.shape[1]
        state["position"] = moved
        return moved

    def _advance(self, key: np.ndarray, state: dict[str, np.ndarray], start: int, stop: int):
        """Frames ``start .. stop - 1``: tokens ``[T, S, 3N + 2]`` and labels ``[T, S]``."""
        opts = self.options
        grid, length = opts.grid, stop - start
        cells = np.rint(np.stack([self._move(key, state, f) for f in range(start, stop)]))
        cells = cells.astype(np.int64)  # [T, S, N, 2]

        frame = np.arange(start + 1, stop + 1)[:, None, None]
        k, particle = key[None, :, None], np.arange(opts.particles)[None, None, :]
        change = uniform(draw(k, frame, particle, CHANGE)) < opts.colour_change
        new_colour = (draw(k, frame, particle, NEW_COLOUR) % np.uint64(opts.colours)).astype(
            np.int64)
        colour = _forward_fill(np.where(change, new_colour, -1), state["colour"])  # [T, S, N]
        state["colour"] = colour[-1]

        # Collisions, particle pair by particle pair in (p, q) order: a later pair wins.
        code = cells[..., 0] * grid + cells[..., 1]  # [T, S, N]
        recent = np.full((length, len(key)), -1, dtype=np.int64)
        events = []
        for p in range(opts.particles):
            for q in range(p + 1, opts.particles):
                t, s = np.nonzero(code[:, :, p] == code[:, :, q])  # sorted by frame
                pair = self.pair_id[colour[t, s, p], colour[t, s, q]]
                recent[t, s] = pair
                events.append((np.searchsorted(t, np.arange(length + 1)), s, pair, code[t, s, p]))
        recent = _forward_fill(recent, state["recent"])  # [T, S]
        state["recent"] = recent[-1]

        frame, k = frame[..., 0], k[..., 0]
        easy = uniform(draw(k, frame, 0, EASY)) < opts.easy_query
        random_pair = (draw(k, frame, 0, QUERY) % np.uint64(len(self.pairs))).astype(np.int64)
        query = np.where(easy & (recent >= 0), recent, random_pair)  # [T, S]
        last_cell, sims = state["last_cell"], np.arange(len(key))  # [S, K], updated in place
        cell = np.empty((length, len(key)), dtype=np.int64)
        for t in range(length):  # collisions are sparse: apply each frame's, then look up
            for bounds, s, pair, hit_cell in events:
                now = slice(bounds[t], bounds[t + 1])
                last_cell[s[now], pair[now]] = hit_cell[now]
            cell[t] = last_cell[sims, query[t]]
        labels = np.where(cell >= 0, quadrant(cell // grid, cell % grid, grid), 0)

        offset = 2 * grid + opts.colours
        per_particle = np.stack([cells[..., 0], cells[..., 1] + grid, colour + 2 * grid], axis=-1)
        tokens = np.concatenate(
            [per_particle.reshape(length, len(key), -1), self.pairs[query] + offset], axis=-1
        )
        return tokens, labels


def _forward_fill(values: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Along axis 0, each entry becomes the last value >= 0 at or before it (``carry`` before
    the first one)."""
    steps = np.arange(len(values)).reshape((-1,) + (1,) * (values.ndim - 1))
    last = np.maximum.accumulate(np.where(values >= 0, steps, -1), axis=0)
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=0)
    return np.where(last >= 0, filled, carry[None])


class FrameDocuments(Documents):
    """Simulations as documents: targets are the labels on each frame's last token."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, frames: np.ndarray) -> None:
        self.width = tokens.shape[2]
        self.frames_per_row = tokens.shape[1]
        self.tokens = tokens.reshape(-1)
        self.labels = labels.reshape(-1)
        self.lengths = np.asarray(frames, dtype=np.int64) * self.width

    def windows(self, docs, offsets, counts, width):
        steps = np.arange(width, dtype=np.int64)[None, :]
        valid = steps < counts[:, None]
        start = docs * self.frames_per_row * self.width + offsets
        index = np.where(valid, start[:, None] + steps, 0)
        inputs = np.where(valid, self.tokens[index], 0).astype(np.int64)
        last = valid & (index % self.width == self.width - 1)
        targets = np.where(last, self.labels[index // self.width], 0).astype(np.int64)
        return inputs, targets, (targets > 0).astype(np.float32)


class ObjectCollisionTask(StreamTask):
    name = "object-collision"
    Options = CollisionOptions
    primary_metric = "error"
    higher_is_better = False

    options: CollisionOptions

    def __init__(self, options: CollisionOptions | None = None) -> None:
        super().__init__(options or CollisionOptions())

    @property
    def vocab_size(self) -> int:
        return 2 * self.options.grid + 2 * self.options.colours

    def derived_metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        """``error``: percentage of labelled positions predicted wrongly (chance: 75)."""
        return {"error": 100.0 * (1.0 - accuracy)}

    def baseline_metrics(self, target_counts: np.ndarray) -> dict[str, float]:
        """``constant_error``: the error of the best constant answer on the positions evaluated
        (the most frequent quadrant there, chosen in hindsight): a model that has learned
        nothing from the past scores this, not 75."""
        total = float(np.sum(target_counts))
        if total == 0:
            return {"constant_error": float("nan")}
        return {"constant_error": 100.0 * (1.0 - float(np.max(target_counts)) / total)}

    def simulation_lengths(self, split: str) -> np.ndarray:
        total, per = self.options.frames(split), self.options.simulation_frames
        lengths = np.full(-(-total // per), per, dtype=np.int64)
        lengths[-1] = total - per * (len(lengths) - 1)
        return lengths

    def load_documents(self, split: str) -> FrameDocuments:
        opts = self.options
        lengths = self.simulation_lengths(split)
        generation = {k: v for k, v in vars(opts).items() if k not in ("eval_tokens", "cache_dir")}
        key = fingerprint(GENERATOR_VERSION, generation, split)
        directory = cache_root(opts.cache_dir) / f"object-collision-{split}-{key}"
        if not (directory / "labels.npy").is_file():
            self._generate(split, lengths, directory)
        tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        labels = np.load(directory / "labels.npy", mmap_mode="r")
        return FrameDocuments(tokens, labels, lengths)

    def _generate(self, split: str, lengths: np.ndarray, directory: Path) -> None:
        """Generate a split into ``directory`` (written under a temporary name, then renamed)."""
        width, frames = self.options.frame_tokens, int(lengths.max())
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            dtype = np.uint8 if self.vocab_size <= 256 else np.uint16
            tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype,
                                               shape=(len(lengths), frames, width))
            labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(lengths), frames))
            CollisionSimulator(self.options).simulate(
                split, np.arange(len(lengths)), frames, tokens, labels, progress=True
            )
            tokens.flush()
            labels.flush()
            del tokens, labels
            try:
                os.rename(tmp, directory)
            except OSError:  # another process finished first: use its copy
                if not (directory / "labels.npy").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
