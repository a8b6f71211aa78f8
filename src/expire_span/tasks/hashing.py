"""Counter-based random numbers: a value is a pure function of its coordinates.

Synthetic tasks draw the symbols of (split, row, episode) from a hash of those integers, so any
batch can be generated directly, in any order, by any process, vectorised and without state.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_ints(*coordinates: np.ndarray | int) -> np.ndarray:
    """A well-mixed uint64 for every element of the broadcast coordinates."""
    with np.errstate(over="ignore"):
        arrays = np.broadcast_arrays(*(np.asarray(c, dtype=np.int64) for c in coordinates))
        state = np.zeros(arrays[0].shape, dtype=np.uint64)
        for coordinate in arrays:
            state = _splitmix64(state ^ coordinate.astype(np.uint64))
        return state


def uniform_ints(high: int, *coordinates: np.ndarray | int) -> np.ndarray:
    """Integers in ``[0, high)`` (int64), one per element of the broadcast coordinates."""
    return (hash_ints(*coordinates) % np.uint64(high)).astype(np.int64)
