"""benchmarks/frontier.py and copy_robustness.py: what makes their comparisons fair.

The sweeps themselves take CPU-hours; these tests check the points they would train: every
policy gets the task's budget unchanged, Adaptive-Span starts at Expire-Span's starting span,
and the knob each sweep turns reaches the model configuration.
"""

from __future__ import annotations

import argparse
import json

import pytest

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def frontier():
    with benchmark_script("frontier") as module:
        yield module


def sweep_args(frontier, *argv: str) -> argparse.Namespace:
    namespace = argparse.Namespace(preset="copy-cpu", set=[], alphas=None, windows=None,
                                   adapt_losses=None, compressive_spans=None, max_spans=None,
                                   seed=3)
    for item in argv:
        key, value = item.split("=", 1)
        if key == "set":
            namespace.set.append(frontier.parse_override(value))
        else:
            kind = int if key == "max_spans" else float
            setattr(namespace, key, [kind(v) for v in value.split(",")])
    return namespace


def test_adaptive_span_starts_where_expire_span_starts(frontier):
    # copy-cpu: K + D = 208, M = 32 -> the span rule's start 1.25 * 208 + 16 + 32 = 308 of 512
    args = sweep_args(frontier, "adapt_losses=1e-5,1e-3", "alphas=1e-4")
    config = frontier.base_config(args)
    points = frontier.points(args, config)
    adaptive = [model for policy, _, _, model in points if policy == "adaptive-span"]
    assert [m["adapt_span_loss"] for m in adaptive] == [1e-5, 1e-3]
    for model in adaptive:
        assert model["adapt_span_init"] == pytest.approx(308 / 512)
        assert model["ramp"] == 16


def test_the_start_follows_a_changed_task(frontier):
    # a gap of 400: K + D = 408 -> start 1.25 * 408 + 48 = 558 of L = 1024
    args = sweep_args(frontier, "set=task_options.gap=400", "set=model.max_span=1024",
                      "adapt_losses=1e-4")
    (_, _, _, model), = frontier.points(args, frontier.base_config(args))
    assert model["adapt_span_init"] == pytest.approx(558 / 1024)


def test_every_point_keeps_the_budget_and_turns_only_its_knob(frontier):
    args = sweep_args(frontier, "alphas=1e-3", "windows=216", "compressive_spans=256")
    config = frontier.base_config(args)
    assert config["train"]["seed"] == 3
    points = frontier.points(args, config)
    assert [(p, field, value) for p, field, value, _ in points] == [
        ("expire-span", "alpha", 1e-3), ("transformer-xl", "max_span", 216),
        ("compressive", "max_span", 256)]
    for policy, field, value, model in points:
        assert model == {"memory": policy, field: value}


def test_max_spans_multiply_expire_span_points_only(frontier):
    args = sweep_args(frontier, "alphas=1e-4", "max_spans=256,1024", "windows=216")
    points = frontier.points(args, frontier.base_config(args))
    assert [model for _, _, _, model in points] == [
        {"memory": "expire-span", "alpha": 1e-4, "max_span": 256},
        {"memory": "expire-span", "alpha": 1e-4, "max_span": 1024},
        {"memory": "transformer-xl", "max_span": 216}]


def test_merged_records_keep_their_order_and_name_their_series(frontier, tmp_path):
    point = {"model": "expire-span", "metric": "error", "test": 50.0, "train_seconds": 12.0,
             "avg_memory_size": 100.0}
    (tmp_path / "a.json").write_text(json.dumps([point, {**point, "test": 40.0}]))
    (tmp_path / "b.json").write_text(json.dumps([{**point, "model": "transformer-xl"}]))
    records = frontier.merged([str(tmp_path / "a.json") + ":from 128", str(tmp_path / "b.json")])
    assert [(r["test_error"], r["seconds"], r.get("series")) for r in records] == [
        (50.0, 12.0, "from 128"), (40.0, 12.0, "from 128"), (50.0, 12.0, None)]
    assert frontier.series(records) == ["from 128", "transformer-xl"]


def test_overrides_are_read_as_literals_and_bad_ones_are_refused(frontier):
    assert frontier.parse_override("train.lr=3e-4") == {"train": {"lr": 3e-4}}
    assert frontier.parse_override("model.memory=expire-span") == {
        "model": {"memory": "expire-span"}}
    with pytest.raises(argparse.ArgumentTypeError, match="section.field=value"):
        frontier.parse_override("lr=3e-4")


def test_rl_claims_name_the_window_of_transformer_xl_only_and_refuse_mismatches(tmp_path):
    def write(name, value):
        path = tmp_path / name
        path.write_text(json.dumps(value))
        return str(path)

    config = {"task": "corridor", "task_options": {"min_length": 100}, "rl": {},
              "train": {"seed": 2}, "model": {"alpha": 1e-6, "span_loss": "l1", "ramp": 16,
                                              "n_layers": 1, "d_model": 32,
                                              "init_percentage": 0.06}}
    metrics = {"success_rate": 0.5, "memory_at_decision": 20.0, "memory_size": 12.0,
               "mean_length": 150.0, "episodes": 128.0}
    records = [write(f"{m}.json", {"task": "corridor", "split": "test", "model": m,
                                   "max_span": 64, "step": 7, "metrics": metrics})
               for m in ("expire-span", "transformer-xl")]
    with benchmark_script("rl_claims") as module:
        result = module.gather([f"{records[0]}:{write('c.json', config)}:best",
                                f"{records[1]}:{tmp_path / 'c.json'}"])
        entries = result["corridor"]
        assert [(e["model"], e["window"], e["seed"], e["label"]) for e in entries] == [
            ("expire-span", None, 2, "best"), ("transformer-xl", 64, 2, None)]
        assert entries[0]["memory_at_decision"] == 20.0 and entries[0]["avg_memory_size"] == 12.0
        other = write("other.json", {**config, "task": "instruction"})
        with pytest.raises(ValueError, match="given with a config for 'instruction'"):
            module.gather([f"{records[0]}:{other}"])


def test_rl_claims_append_keeps_old_entries_and_replaces_a_re_recorded_checkpoint():
    def entry(source, success):
        return {"sources": [source, "c.json"], "success": success}

    old = {"corridor": [entry("a.json", 0.5), entry("b.json", 0.6)],
           "instruction": [entry("i.json", 0.9)]}
    new = {"corridor": [entry("b.json", 0.7), entry("c.json", 1.0)],
           "portal": [entry("p.json", 0.1)]}
    with benchmark_script("rl_claims") as module:
        result = module.merged(old, new)
    assert {task: [(e["sources"][0], e["success"]) for e in entries]
            for task, entries in result.items()} == {
        "corridor": [("a.json", 0.5), ("b.json", 0.7), ("c.json", 1.0)],
        "instruction": [("i.json", 0.9)], "portal": [("p.json", 0.1)]}
