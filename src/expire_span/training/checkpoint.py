"""Checkpoints: written atomically, loaded with clear errors.

Layout of a run directory::

    OUT/config.json                  the resolved run configuration
    OUT/metrics.jsonl                one JSON object per log or evaluation step
    OUT/summary.json                 written at the end of a run
    OUT/checkpoints/latest           name of the newest complete checkpoint
    OUT/checkpoints/step-000200/     model.safetensors, config.json, memory.safetensors,
                                     trainer.pt (optimizer, scheduler, step, random states)

A checkpoint is written into a temporary directory that is renamed into place, and ``latest`` is
replaced atomically afterwards, so an interruption at any moment leaves the previous checkpoint
intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from expire_span.memory import Memory
from expire_span.model import MemoryAgent, MemoryTransformer
from expire_span.training.config import RunConfig

Network = MemoryTransformer | MemoryAgent

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MEMORY_FILE = "memory.safetensors"
TRAINER_FILE = "trainer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass
class LoadedCheckpoint:
    path: Path
    run: RunConfig
    model: Network
    trainer_state: dict[str, Any] | None
    memory_tensors: dict[str, torch.Tensor] | None

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"]) if self.trainer_state else 0


def write_json_atomic(path: Path, value: Any) -> None:
    _write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: Path,
    step: int,
    run: RunConfig,
    model: Network,
    trainer_state: dict[str, Any],
    memory: Memory | None,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` of a run, point ``latest`` at it, keep the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        config = {"run": run.to_dict(), "model": model.config.to_dict(), "step": step}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        torch.save({**trainer_state, "step": step}, tmp / TRAINER_FILE)
        if memory is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in memory.state_dict().items()}
            save_file(tensors, str(tmp / MEMORY_FILE))
        for item in tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, name.encode())
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """Checkpoint directories ``path`` designates, preferred first.

    ``path`` may be a checkpoint directory itself, a run directory or its ``checkpoints`` folder
    (then the one ``latest`` names comes first, followed by the older ones, newest first).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if (path / MODEL_FILE).exists() or path.name.startswith("step-"):
        return [path]
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    latest_file = root / LATEST
    if latest_file.exists():
        named = root / latest_file.read_text().strip()
        steps = [named] + [p for p in steps if p != named]
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    return steps


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load one checkpoint directory (see :func:`checkpoint_candidates` for ``path``)."""
    directory = checkpoint_candidates(path)[0]
    return _load_directory(directory, device)


def load_latest_valid(path: str | Path, device: str | torch.device = "cpu"):
    """The newest loadable checkpoint, and the errors of newer ones that could not be loaded."""
    errors: list[str] = []
    for directory in checkpoint_candidates(path):
        try:
            return _load_directory(directory, device), errors
        except CheckpointError as error:
            errors.append(str(error))
    raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))


def _read(directory: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """Run ``reader`` on a checkpoint file, turning any failure into a :class:`CheckpointError`
    (torch, safetensors and json raise many different kinds on damaged files)."""
    try:
        return reader(directory / name)
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory}: {name} is corrupt: {error}") from error


def _load_directory(directory: Path, device: str | torch.device) -> LoadedCheckpoint:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory is missing: {directory}")
    for required in (CONFIG_FILE, MODEL_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {required} is missing")
    saved = _read(directory, CONFIG_FILE, lambda path: json.loads(path.read_text()))
    try:
        run = RunConfig.from_dict(saved["run"])
        model = run.build_model(saved["model"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {directory}: {CONFIG_FILE} is unreadable: {error}"
        ) from error
    missing, unexpected = _read(
        directory, MODEL_FILE, lambda path: load_model(model, path, strict=False)
    )
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory}: {MODEL_FILE} does not match its config "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    model.to(device)
    trainer_state = memory = None
    if (directory / TRAINER_FILE).is_file():
        trainer_state = _read(
            directory, TRAINER_FILE,
            lambda path: torch.load(path, map_location="cpu", weights_only=True),
        )
    if (directory / MEMORY_FILE).is_file():
        memory = _read(directory, MEMORY_FILE, lambda path: load_file(str(path)))
    return LoadedCheckpoint(directory, run, model, trainer_state, memory)
