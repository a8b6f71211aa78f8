"""Crash test: a training run killed (SIGKILL) at 20 moments, several of them inside a checkpoint
write, and resumed each time, ends with the weights of an uninterrupted run.

Each life is a real ``expire-span train`` process (copy-test's model, small batches, a checkpoint
every 2 steps). After every kill: every checkpoint directory in the run loads with its trainer
state and memory (none is ever damaged), ``--resume`` would start from the newest complete one
and the steps lost since the last logged step are at most one checkpoint interval. At the end the
weights, the logged training losses and the final evaluation equal those of an uninterrupted
run with the same seed, exactly, and nothing the killed writes left behind remains. About two
minutes on 2 busy CPU cores (most of it is 22 Python start-ups): marked slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from safetensors.torch import load_file

from expire_span.training import load_checkpoint
from expire_span.training.checkpoint import load_latest_valid

STEPS, EVERY, KILLS = 60, 2, 20
ARGS = ["--preset", "copy-test", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16",
        "--checkpoint-every", str(EVERY), "--keep-checkpoints", "3", "--log-every", "1",
        "--eval-every", "1000", "--eval-batches", "1", "--no-progress", "--no-tensorboard"]
SRC = Path(__file__).resolve().parents[1] / "src"


def start(out: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "expire_span", "train", "--out", str(out)]
    command += ["--resume", "--no-progress"] if resume else ARGS  # a resume takes the saved config
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def train_records(out: Path) -> list[dict]:
    """The training records of metrics.jsonl (a line being written is ignored)."""
    path = out / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "train":
            records.append(record)
    return records


def last_logged(out: Path) -> int:
    return max((record["step"] for record in train_records(out)), default=0)


def temporary_checkpoints(out: Path) -> set[str]:
    root = out / "checkpoints"
    return {entry.name for entry in os.scandir(root) if entry.name.startswith(".step-")} \
        if root.exists() else set()


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``condition`` every 0.5 ms; False if the process ended (or the time ran out)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_run_killed_twenty_times_ends_as_an_uninterrupted_run(tmp_path):
    out, rng = tmp_path / "killed", random.Random(17)
    resumed_from, inside_writes, lost = 0, 0, []
    for life in range(KILLS):
        process = start(out, resume=life > 0)
        root = out / "checkpoints"
        if life == 0:  # the first life: past its first checkpoint
            started = (root / "latest").exists
        else:
            started = partial(lambda since: last_logged(out) > since, resumed_from)
        assert wait_for(started, process), f"life {life} ended early: {process.stderr.read()}"
        leftovers = temporary_checkpoints(out)
        if life % 5 in (1, 3):  # aim inside a checkpoint write: its temporary directory exists
            writing = partial(lambda old: bool(temporary_checkpoints(out) - old), leftovers)
            assert wait_for(writing, process), f"life {life} ended: {process.stderr.read()}"
            time.sleep(rng.uniform(0.0, 0.015))
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        assert process.poll() is None, "the run ended before its kill: raise STEPS"
        kill(process)
        newest = max(path.name for path in root.glob("step-*"))
        if temporary_checkpoints(out) - leftovers:
            inside_writes += 1  # killed before the rename
        elif (root / "latest").read_text() != newest:
            inside_writes += 1  # killed after the rename, before latest was updated

        for directory in sorted(root.glob("step-*")):  # no checkpoint is ever damaged
            load_checkpoint(directory, training_state=True)
        loaded, skipped = load_latest_valid(out)
        assert skipped == []
        logged = last_logged(out)
        assert loaded.step >= resumed_from
        assert logged - loaded.step <= EVERY, (life, logged, loaded.step)
        lost.append(logged - loaded.step)
        resumed_from = loaded.step
    print(f"{KILLS} kills, {inside_writes} inside a checkpoint write; steps lost: {lost}")
    assert inside_writes >= 3

    process = start(out, resume=True)
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors
    straight = tmp_path / "straight"
    process = start(straight, resume=False)
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors

    final = f"checkpoints/step-{STEPS:08d}/model.safetensors"
    weights, expected = load_file(str(out / final)), load_file(str(straight / final))
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert weights[name].equal(value), name
    losses = [(r["step"], r["loss"]) for r in train_records(out)]
    assert losses == [(r["step"], r["loss"]) for r in train_records(straight)]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    summaries = [json.loads((run / "summary.json").read_text())["metrics"]
                 for run in (out, straight)]
    assert summaries[0] == summaries[1]
    # what the killed writes left behind went with the next complete checkpoint
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
