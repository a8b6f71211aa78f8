"""Training at scale on the CPU: two processes (gloo, DistributedDataParallel) against one,
gradient accumulation, mixed precision, TensorBoard logs and what rank 0 alone writes.

Tolerance: after three steps, the parameters of a run in two processes (or in micro-batches)
match those of one process reading the global batch in one pass within ``ATOL`` (float32: the
gradients are the same sums added in another order).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from expire_span.cli import main
from expire_span.training import RunConfig, Trainer, load_checkpoint
from expire_span.training.distributed import Group, process_group

ATOL = 1e-6
WORLD = 2
STEPS = 3
MEMORIES = ("expire-span", "transformer-xl", "compressive")

TINY = {
    "task": "copy",
    "task_options": {"symbols": 2, "gap": 6, "alphabet": 4},
    "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "block_len": 4, "max_span": 16,
              "ramp": 2, "alpha": 1e-3, "init_percentage": 0.5, "noisy": True,
              "compress_fn": "conv", "compress_rate": 2, "mem_len": 4},
    "train": {"steps": STEPS, "batch_size": 4, "seq_len": 8, "lr": 1e-2, "warmup": 2,
              "schedule": "cosine", "adam_eps": 1e-6, "eval_every": STEPS, "eval_batches": 1,
              "log_every": 1, "checkpoint_every": 2,
              # no hold: its deadline is a fraction of train.steps, which a resume here extends
              "aux_hold": 0.0},
}

# (run directory, memory policy, train overrides, resume)
JOBS = [
    *((memory, memory, {}, False) for memory in MEMORIES),
    ("accumulate", "expire-span", {"accumulate": 2}, False),
    ("resumed", "expire-span", {"steps": 2}, False),
    ("resumed", "expire-span", {"steps": STEPS}, True),
]


def tiny_run(memory: str = "expire-span", **train) -> RunConfig:
    config = json.loads(json.dumps(TINY))
    config["model"]["memory"] = memory
    config["train"].update(train)
    return RunConfig.from_dict(config)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _writes_under(root: Path, log: list[str]):
    """An audit hook noting every file this process opens for writing, creates, moves or
    removes under ``root``."""
    prefix = str(root)
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flag = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else (
                isinstance(flag, int) and bool(flag & flags))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        if writing and str(path).startswith(prefix):
            log.append(f"{event} {path}")

    return hook


def _worker(rank: int, port: int, root: Path, report: Path) -> None:
    """One of the two processes: the environment torchrun would set, then every job."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    writes: list[str] = []
    if rank:
        sys.addaudithook(_writes_under(root, writes))
    with process_group() as group:
        for name, memory, train, resume in JOBS:
            if resume:
                if group.is_main:  # keep the interrupted run for a resume in one process
                    shutil.copytree(root / name, root / f"{name}-copy")
                group.barrier()
                trainer = Trainer(None, root / name, resume=True, resume_overrides=train,
                                  progress=False)
            else:
                trainer = Trainer(tiny_run(memory, **train), root / name, progress=False)
            summary = trainer.fit()
            assert (summary is not None) == group.is_main
    report.with_name(f"{report.name}-{rank}").write_text(json.dumps(writes))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The run directories of :data:`JOBS`, trained in two processes."""
    root = tmp_path_factory.mktemp("ddp")
    runs, report = root / "runs", root / "writes"
    runs.mkdir()
    mp.start_processes(_worker, args=(_free_port(), runs, report), nprocs=WORLD,
                       start_method="spawn")
    return root


@pytest.mark.parametrize("memory", MEMORIES)
def test_two_processes_match_one_process_on_the_global_batch(two_processes, tmp_path, memory):
    single = Trainer(tiny_run(memory), tmp_path, progress=False)
    single.fit()
    runs = two_processes / "runs"
    assert_close(final_params(runs / memory), final_params(tmp_path), ATOL)
    # the checkpoint's memory is the global batch's: both processes' rows, in order
    ours = load_checkpoint(runs / memory, training_state=True).memory_tensors
    theirs = load_checkpoint(tmp_path, training_state=True).memory_tensors
    assert ours.keys() == theirs.keys()
    for key in ours:
        if ours[key].is_floating_point():
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
        else:
            assert torch.equal(ours[key], theirs[key]), key
    # the metrics rank 0 logs are those of the global batch
    fields = ("loss", "accuracy", "positions", "aux_loss", "memory_size", "cache_size", "lr")
    ours, theirs = read_metrics(runs / memory), read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in ours] == [(r["step"], r["split"]) for r in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        for name in fields:
            if name in reference and reference[name] is None:  # no scored positions
                assert mine[name] is None, name
            elif name in reference:
                assert mine[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name


def test_two_processes_with_micro_batches_match_one_process(two_processes, tmp_path):
    Trainer(tiny_run(), tmp_path, progress=False).fit()
    assert_close(final_params(two_processes / "runs" / "accumulate"), final_params(tmp_path),
                 ATOL)


def test_rank_zero_alone_writes_the_run_directory(two_processes):
    assert json.loads((two_processes / "writes-1").read_text()) == []
    for memory in MEMORIES:  # and it wrote each record once
        run = two_processes / "runs" / memory
        records = read_metrics(run)
        assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
        assert [r["step"] for r in records if r["split"] == "valid"] == [STEPS]
        assert json.loads((run / "summary.json").read_text())["processes"] == WORLD
        assert len(list((run / "tensorboard").iterdir())) == 1


def test_resume_of_a_two_process_run_continues_exactly(two_processes, tmp_path):
    runs = two_processes / "runs"
    # in two processes again: the same as never stopping
    assert_close(final_params(runs / "resumed"), final_params(runs / "expire-span"), 0.0)
    # in one process, from the memory the two processes gathered into the checkpoint
    resumed = Trainer(None, runs / "resumed-copy", resume=True,
                      resume_overrides={"steps": STEPS}, progress=False)
    resumed.fit()
    assert_close(final_params(runs / "resumed-copy"), final_params(runs / "expire-span"), ATOL)


def test_torchrun_trains_from_the_command_line(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "expire_span", "train", "--no-progress",
               "--config", str(config), "--out", str(out), "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("average memory size") == 1  # rank 0 alone reports
    assert json.loads((out / "summary.json").read_text())["processes"] == WORLD
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2]


# ----------------------------------------------------------------------------- one process


def test_micro_batches_match_one_pass(tmp_path):
    """Span noise included: every micro-batch draws the random numbers of the whole batch."""
    Trainer(tiny_run(), tmp_path / "one", progress=False).fit()
    Trainer(tiny_run(accumulate=4), tmp_path / "four", progress=False).fit()
    assert_close(final_params(tmp_path / "four"), final_params(tmp_path / "one"), ATOL)


def test_accumulation_may_change_when_resuming(tmp_path):
    Trainer(tiny_run(), tmp_path / "straight", progress=False).fit()
    Trainer(tiny_run(steps=2), tmp_path / "b", progress=False).fit()
    Trainer(None, tmp_path / "b", resume=True, resume_overrides={"steps": STEPS, "accumulate": 2},
            progress=False).fit()
    assert_close(final_params(tmp_path / "b"), final_params(tmp_path / "straight"), ATOL)


def test_rows_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        Trainer(tiny_run(accumulate=3), tmp_path, progress=False)


def test_bf16_trains_on_the_cpu(tmp_path):
    trainer = Trainer(tiny_run(steps=2, log_every=2, precision="bf16"), tmp_path,
                      progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    trained = trainer.model.state_dict()
    assert all(trained[k].dtype == torch.float32 for k in trained)  # autocast keeps fp32 weights
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_run(precision="fp16", device="cpu"), tmp_path, progress=False)


def test_tensorboard_holds_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_run(), tmp_path, progress=False).fit()
    records = read_metrics(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for split, name in [("train", "loss"), ("train", "memory_size"), ("train", "lr"),
                        ("valid", "accuracy"), ("train", "memory_size_per_layer/1")]:
        assert f"{split}/{name}" in tags
    for split, name in [("train", "loss"), ("valid", "accuracy")]:
        # metrics.jsonl writes null where TensorBoard holds NaN (no scored positions)
        logged = [(r["step"], math.nan if r[name] is None else r[name])
                  for r in records if r["split"] == split]
        scalars = [(e.step, pytest.approx(e.value, rel=1e-6, nan_ok=True))
                   for e in events.Scalars(f"{split}/{name}")]
        assert scalars == logged


def test_no_tensorboard_flag_writes_no_event_file(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--config", str(config), "--out", str(out),
                 "--steps", "1", "--no-tensorboard"]) == 0
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_reinforcement_learning_refuses_several_processes(tmp_path, monkeypatch):
    run = RunConfig.from_dict({"task": "corridor", "model": {"d_model": 16, "n_layers": 1,
                                                             "n_heads": 2, "block_len": 4},
                               "train": {"steps": 1, "batch_size": 2, "seq_len": 4}})
    from expire_span.training import RLTrainer, loop

    monkeypatch.setattr(loop, "current", lambda: Group(0, WORLD, 0))
    with pytest.raises(ValueError, match="train in one process"):
        RLTrainer(run, tmp_path / "a", progress=False)
    monkeypatch.setattr(loop, "current", lambda: Group())
    run.train.accumulate = 2
    with pytest.raises(ValueError, match="without gradient accumulation"):
        RLTrainer(run, tmp_path / "b", progress=False)


def test_each_process_takes_its_own_cuda_device():
    group = Group(1, WORLD, 1)
    assert group.place(torch.device("cuda")) == torch.device("cuda", 1)
    assert group.place(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="every process would use it"):
        group.place(torch.device("cuda", 0))
