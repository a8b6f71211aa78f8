"""Object Collision's generator against expectations that do not come from it.

- the release variant's velocity draw against the normal distribution;
- labels and queries recomputed from the raw token stream alone (cells, colours, queried pair);
- the statistics of generated splits (collision rate, cell steps, labelled share, quadrants,
  query pairs) against an independent brute-force simulation of the documented rules, written
  here with numpy's own random generator, and against closed forms where there is one;
- the release variant on the paper's board against the step-by-step reference;
- the ``constant_error`` an evaluation reports, and the ``variant`` option's errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from expire_span.cli import main
from expire_span.config import ModelConfig
from expire_span.model import MemoryTransformer
from expire_span.tasks import build_task
from expire_span.tasks.object_collision import CollisionOptions, CollisionSimulator, to_velocity
from expire_span.training import RunConfig, get_preset
from expire_span.training.evaluate import evaluate
from tests.collision_reference import reference_simulation

VARIANTS = ("release", "simple")
BOARD = {"grid": 8, "colours": 3, "colour_change": 0.05, "easy_query": 0.4}
"""A small board for the statistics: collisions are frequent, so estimates are tight."""
SIMULATIONS, FRAMES = 300, 800


# ---------------------------------------------------------------- the velocity draw

def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_release_velocity_components_are_independent_normals_of_sd_speed():
    bits = np.random.default_rng(0).integers(0, 2**63, size=40_000, dtype=np.int64)
    v = to_velocity(bits.astype(np.uint64), 0.5, "release")
    assert v.shape == (40_000, 2)
    for component in (v[:, 0], v[:, 1]):
        z = np.sort(component / 0.5)
        ks = np.max(np.abs(_normal_cdf(z) - (np.arange(1, len(z) + 1) - 0.5) / len(z)))
        assert ks < 1.63 / math.sqrt(len(z))  # Kolmogorov-Smirnov at the 1% level
        assert abs(z.mean()) < 0.03 and abs(z.var() - 1.0) < 0.04
    assert abs(np.corrcoef(v[:, 0], v[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(v[:, 0] ** 2, v[:, 1] ** 2)[0, 1]) < 0.03  # independent, not only
    # uncorrelated (a fixed speed would make the squares perfectly anti-correlated)
    fixed = to_velocity(bits.astype(np.uint64), 0.5, "simple")
    assert np.allclose(np.hypot(fixed[:, 0], fixed[:, 1]), 0.5)


# ---------------------------------------------------------------- recomputation from tokens

def _parse(tokens: np.ndarray, grid: int, colours: int):
    """Cells [S, T, 2 particles, 2], colours [S, T, 2] and queried pair [S, T, 2] of 2-particle
    frames, read back from the tokens."""
    t = tokens.astype(np.int64)
    cells = np.stack([t[..., [0, 1]], t[..., [3, 4]]], axis=2) - np.array([0, grid])
    return cells, t[..., [2, 5]] - 2 * grid, t[..., [6, 7]] - 2 * grid - colours


def _recompute(cells, colour, query, grid: int, ordered: bool):
    """Labels and 'query is the most recent colliding pair' flags of one simulation, by a
    plain scan over its frames."""
    last: dict[tuple[int, int], tuple[int, int]] = {}
    recent = None
    labels, is_recent = [], []
    for t in range(len(cells)):
        (x0, y0), (x1, y1) = cells[t]
        if (x0, y0) == (x1, y1):
            pair = (int(colour[t, 0]), int(colour[t, 1]))
            if not ordered:
                pair = (min(pair), max(pair))
            last[pair] = (int(x0), int(y0))
            recent = pair
        asked = (int(query[t, 0]), int(query[t, 1]))
        if asked in last:
            x, y = last[asked]
            labels.append(1 + 2 * int(x + 0.5 > grid / 2) + int(y + 0.5 > grid / 2))
        else:
            labels.append(0)
        is_recent.append(recent is not None and asked == recent)
    return np.array(labels), np.array(is_recent), recent is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_equal_a_recomputation_from_the_token_stream(variant):
    options = CollisionOptions(variant=variant, **BOARD)
    tokens, labels = CollisionSimulator(options).simulate("test", np.arange(60), 600)
    cells, colour, query = _parse(tokens, options.grid, options.colours)
    assert ((colour >= 0) & (colour < options.colours)).all()
    assert ((query >= 0) & (query < options.colours)).all()
    assert ((cells >= 0) & (cells < options.grid)).all()
    recent_hits = frames_after_first = 0
    for s in range(60):
        expected, is_recent, _ = _recompute(cells[s], colour[s], query[s], options.grid,
                                            ordered=variant == "release")
        assert labels[s].tolist() == expected.tolist()
        collided = (cells[s, :, 0] == cells[s, :, 1]).all(-1)
        after = np.maximum.accumulate(collided)  # frames at or after the first collision
        recent_hits += int(is_recent[after].sum())
        frames_after_first += int(after.sum())
    # a query is the most recent colliding pair with p = easy + (1 - easy) / pairs
    pairs = options.colours ** 2 if variant == "release" else 6
    p = 0.4 + 0.6 / pairs
    share = recent_hits / frames_after_first
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / frames_after_first) + 0.005


# ---------------------------------------------------------------- brute-force simulation

def _brute_force(variant: str, simulations: int, frames: int, seed: int, grid: int,
                 colours: int, colour_change: float, easy_query: float, speed: float = 0.5):
    """The documented rules for 2 particles, with numpy's generator: tokens-level quantities
    (cells [S, T, 2, 2], colours [S, T, 2], query [S, T, 2], labels [S, T])."""
    rng = np.random.default_rng(seed)

    def new_velocity(n: int) -> np.ndarray:
        if variant == "release":
            return rng.normal(0.0, speed, size=(n, 2))
        angle = rng.uniform(0.0, 2 * np.pi, size=n)
        return speed * np.stack([np.cos(angle), np.sin(angle)], axis=-1)

    def inside(z: np.ndarray) -> np.ndarray:
        return ((z > 0) & (z < grid - 1)).all(-1)

    rows = np.arange(simulations)
    unordered = [(a, b) for a in range(colours) for b in range(a, colours)]
    position = rng.uniform(0, grid - 1, size=(simulations, 2, 2))
    velocity = np.stack([new_velocity(simulations), new_velocity(simulations)], axis=1)
    colour = rng.integers(0, colours, size=(simulations, 2))
    last = np.full((simulations, colours, colours), -1)  # cell code of each pair's last hit
    recent = np.full((simulations, 2), -1)
    out_cells = np.zeros((simulations, frames, 2, 2), dtype=np.int64)
    out_colour = np.zeros((simulations, frames, 2), dtype=np.int64)
    out_query = np.zeros((simulations, frames, 2), dtype=np.int64)
    out_label = np.zeros((simulations, frames), dtype=np.int64)
    for t in range(frames):
        for p in range(2):
            leaving = ~inside(position[:, p] + velocity[:, p])
            while leaving.any():
                velocity[leaving, p] = new_velocity(int(leaving.sum()))
                leaving = ~inside(position[:, p] + velocity[:, p])
            position[:, p] += velocity[:, p]
        change = rng.random((simulations, 2)) < colour_change
        colour = np.where(change, rng.integers(0, colours, size=(simulations, 2)), colour)
        cells = np.rint(position).astype(np.int64)
        hit = (cells[:, 0] == cells[:, 1]).all(-1)
        pair = colour.copy() if variant == "release" else np.sort(colour, axis=1)
        last[rows[hit], pair[hit, 0], pair[hit, 1]] = cells[hit, 0, 0] * grid + cells[hit, 0, 1]
        recent[hit] = pair[hit]
        if variant == "release":
            random_pair = rng.integers(0, colours, size=(simulations, 2))
        else:
            random_pair = np.array(unordered)[rng.integers(0, len(unordered), size=simulations)]
        easy = (rng.random(simulations) < easy_query) & (recent[:, 0] >= 0)
        query = np.where(easy[:, None], recent, random_pair)
        code = last[rows, query[:, 0], query[:, 1]]
        x, y = code // grid, code % grid
        out_label[:, t] = np.where(code >= 0, 1 + 2 * (2 * x >= grid) + (2 * y >= grid), 0)
        out_cells[:, t], out_colour[:, t], out_query[:, t] = cells, colour, query
    return out_cells, out_colour, out_query, out_label


def _statistics(cells, colour, query, labels) -> dict[str, np.ndarray]:
    """Per-simulation statistics [S] of one run."""
    step = np.abs(np.diff(cells[..., 0], axis=1))  # x-cell change per frame, both particles
    collided = (cells[:, :, 0] == cells[:, :, 1]).all(-1)
    labelled = labels > 0
    return {
        "collision_rate": collided.mean(1),
        "cell_step": step.mean((1, 2)),
        "long_step": (step >= 2).mean((1, 2)),
        "labelled": labelled.mean(1),
        "query_a_above_b": (query[..., 0] > query[..., 1]).mean(1),
        "query_same_colour": (query[..., 0] == query[..., 1]).mean(1),
        "quadrant_1": ((labels == 1).sum(1) / np.maximum(labelled.sum(1), 1)),
    }


@pytest.fixture(scope="module", params=VARIANTS)
def two_runs(request):
    """Per-simulation statistics of the generator and of the brute force, same settings."""
    variant = request.param
    options = CollisionOptions(variant=variant, **BOARD)
    tokens, labels = CollisionSimulator(options).simulate("train", np.arange(SIMULATIONS), FRAMES)
    generated = _statistics(*_parse(tokens, options.grid, options.colours), labels)
    brute = _statistics(*_brute_force(variant, SIMULATIONS, FRAMES, seed=7, **BOARD))
    return variant, generated, brute


@pytest.mark.parametrize("name", ["collision_rate", "cell_step", "long_step", "labelled",
                                  "query_a_above_b", "query_same_colour", "quadrant_1"])
def test_statistics_agree_with_an_independent_brute_force_simulation(two_runs, name):
    """Means over simulations agree within 4 standard errors (simulations are independent)."""
    _, generated, brute = two_runs
    a, b = generated[name], brute[name]
    error = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) <= 4 * error + 1e-9, (name, a.mean(), b.mean(), error)


def test_statistics_match_the_closed_forms(two_runs):
    variant, generated, _ = two_runs
    g, c = BOARD["grid"], BOARD["colours"]
    # positions stay (nearly) uniform on (0, g - 1)^2: an edge cell is half as wide, so two
    # particles share a cell with probability (sum_k p_k^2)^2, p = 1/(g-1) inside, 1/(2(g-1)) at
    # the edges
    uniform = ((g - 1.5) / (g - 1) ** 2) ** 2
    assert generated["collision_rate"].mean() == pytest.approx(uniform, rel=0.1)
    assert generated["quadrant_1"].mean() == pytest.approx(0.25, abs=0.04)  # symmetric board
    if variant == "release":  # ordered pairs: a random query has a > b as often as a < b, and
        # a == b with probability 1 / c; cells can move by 2 in one frame (|v_x| > 1.5)
        assert generated["query_a_above_b"].mean() > 0.25
        assert generated["long_step"].mean() > 0
    else:  # unordered pairs a <= b; a fixed speed of 0.5 moves a cell by at most 1
        assert generated["query_a_above_b"].max() == 0
        assert generated["long_step"].max() == 0
        # random queries pick a == b with probability c / (c (c + 1) / 2) = 2 / (c + 1)
        assert generated["query_same_colour"].mean() > 0.6 * 2 / (c + 1)


# ---------------------------------------------------------------- the paper's board

def test_the_release_variant_on_the_papers_board_matches_the_step_by_step_reference():
    options = CollisionOptions()  # the paper's: 2 particles, 5 colours, 16x16, speed 0.5
    assert options.variant == "release"
    tokens, labels = CollisionSimulator(options).simulate("valid", np.arange(3), 1500, chunk=9)
    for sim in range(3):
        ref_tokens, ref_labels = reference_simulation(options, "valid", sim, 1500)
        assert tokens[sim].reshape(-1).tolist() == ref_tokens
        assert labels[sim].tolist() == ref_labels
    assert (labels > 0).any()
    assert (tokens[..., 6] > tokens[..., 7]).any()  # ordered pairs in the queries


def test_the_paper_presets_use_the_release_variant():
    for name in ("object-collision-16k", "object-collision-32k", "object-collision-64k",
                 "object-collision-cpu", "object-collision-2colours"):
        run = RunConfig.from_dict(get_preset(name).config).resolved()
        assert run.task_options["variant"] == "release", name


def answer_distances(preset: str) -> np.ndarray:
    """Tokens from each labelled query of four test simulations (5000 frames) back to the first
    token of the frame of the asked pair's last collision, parsed from the tokens alone."""
    options = CollisionOptions(**get_preset(preset).config["task_options"])
    tokens, labels = CollisionSimulator(options).simulate("test", np.arange(4), 5000)
    cells, colour, query = _parse(tokens, options.grid, options.colours)
    distances = []
    for s in range(4):
        last: dict[tuple[int, int], int] = {}
        for t in range(5000):
            if (cells[s, t, 0] == cells[s, t, 1]).all():
                last[(int(colour[s, t, 0]), int(colour[s, t, 1]))] = t
            if labels[s, t] > 0:  # tokens back to the first token of the collision's frame
                asked = (int(query[s, t, 0]), int(query[s, t, 1]))
                distances.append(8 * (t - last[asked]) + 7)
    assert len(distances) > 0.95 * 4 * 5000
    return np.array(distances)


def test_the_cpu_preset_needs_more_memory_than_a_short_window_holds():
    """docs/tasks.md: on object-collision-cpu (4x4, one colour) about two answers in three lie
    beyond the 64-token block, a third beyond 160, almost none beyond L = 1024."""
    options = get_preset("object-collision-cpu").config["task_options"]
    assert (options["variant"], options["grid"], options["colours"]) == ("release", 4, 1)
    distances = answer_distances("object-collision-cpu")
    assert 0.55 < np.mean(distances > 64) < 0.75 and 0.25 < np.mean(distances > 160) < 0.45
    assert np.mean(distances <= 1024) > 0.97
    assert get_preset("object-collision-cpu").config["model"]["max_span"] == 1024


def test_the_two_colour_board_needs_more_memory_still():
    """docs/tasks.md: on object-collision-2colours half the answers lie beyond 256 tokens, four
    in five within L = 1024."""
    distances = answer_distances("object-collision-2colours")
    assert 0.4 < np.mean(distances > 256) < 0.65 and 0.7 < np.mean(distances <= 1024) < 0.9


# ---------------------------------------------------------------- constant error, options

def test_constant_error_is_the_error_of_the_most_frequent_label():
    task = build_task("object-collision", {"grid": 6})
    counts = np.zeros(task.vocab_size)
    counts[1:5] = [10, 30, 40, 20]
    assert task.baseline_metrics(counts) == {"constant_error": pytest.approx(60.0)}
    assert math.isnan(task.baseline_metrics(np.zeros(task.vocab_size))["constant_error"])


def test_evaluation_reports_the_constant_error_of_the_positions_it_scored(tmp_path):
    task = build_task("object-collision", {"grid": 6, "valid_frames": 300, "eval_tokens": 2000,
                                           "simulation_frames": 150, "cache_dir": str(tmp_path)})
    model = MemoryTransformer(ModelConfig(vocab_size=task.vocab_size, d_model=16, n_layers=1,
                                          n_heads=2, block_len=8, max_span=32))
    metrics = evaluate(model, task, "valid", 2, 40, 0)
    labels = np.concatenate([task.documents("valid").labels[s * 150:][:150] for s in (0, 1)])
    scored = labels[: 2000 // 8]  # eval_tokens: the first 2000 positions = 250 frames
    counts = np.bincount(scored[scored > 0], minlength=5)[1:]
    assert metrics["positions"] == counts.sum()
    assert metrics["constant_error"] == pytest.approx(100 * (1 - counts.max() / counts.sum()))


def test_an_unknown_variant_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(ValueError, match="variant must be one of release, simple"):
        CollisionOptions(variant="paper")
    code = main(["train", "--task", "object-collision", "--variant", "paper",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "variant must be one of release, simple" in err
    assert "Traceback" not in err
