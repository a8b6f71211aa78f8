"""Checkpoints: written atomically, loaded with clear errors.

Layout of a run directory::

    OUT/config.json                  the resolved run configuration
    OUT/metrics.jsonl                one JSON object per log or evaluation step
    OUT/summary.json                 written at the end of a run
    OUT/checkpoints/latest           name of the newest complete checkpoint
    OUT/checkpoints/step-000200/     model.safetensors, config.json, memory.safetensors,
                                     trainer.pt (optimizer, scheduler, step, random states),
                                     checksums.json (the SHA-256 of each of the others)
    OUT/checkpoints/best/            the same, at the best validation score so far (hard links
                                     to a step-N when it is one of them;
                                     ``train.keep_best``; never pruned, never resumed from)

A checkpoint is written into a temporary directory that is renamed into place, and ``latest`` is
replaced atomically afterwards, so an interruption at any moment leaves the previous checkpoint
intact and ``latest`` pointing at a complete one. ``checksums.json`` is written last; loading
verifies every file it reads against it, so damage anywhere in a file (also inside tensor data,
which the formats do not check) is a :class:`CheckpointError`, and a caller given a run directory
falls back to the newest intact checkpoint. A model is loaded without reading the trainer state
or the memory (``training_state=False``: evaluation, generation), so damage there cannot stop it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
BEST = "best"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MEMORY_FILE = "memory.safetensors"
TRAINER_FILE = "trainer.pt"
CHECKSUMS_FILE = "checksums.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = 2
"""Written into every checkpoint's config (format 2: with checksums). A checkpoint whose config
has no format was written before checksums existed; it loads unverified, with a warning."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass
class LoadedCheckpoint:
    path: Path
    run: RunConfig
    model: Network
    trainer_state: dict[str, Any] | None
    memory_tensors: dict[str, torch.Tensor] | None
    saved_step: int = 0

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"]) if self.trainer_state else self.saved_step


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN: a
    window without scored positions has no loss, written ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    text = json.dumps(json_safe(value), indent=2, sort_keys=True, allow_nan=False)
    _write_atomic(path, text.encode() + b"\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content all at once: a crash leaves the old content or the new one."""
    _write_atomic(path, text.encode())


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
    name: str | None = None,
) -> Path:
    """Write checkpoint ``step`` of a run, point ``latest`` at it, keep the newest ``keep``;
    with a ``name`` (e.g. :data:`BEST`), write it under that name instead, replacing the one
    there, with ``latest`` and the ``step-*`` checkpoints untouched."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    numbered = name is None
    name = f"step-{step:08d}" if name is None else name
    with _staged(root, name) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        config = {"run": run.to_dict(), "model": model.config.to_dict(), "step": step,
                  "format": FORMAT}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        torch.save({**trainer_state, "step": step}, tmp / TRAINER_FILE)
        if memory is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in memory.state_dict().items()}
            save_file(tensors, str(tmp / MEMORY_FILE))
        for item in tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        _write_checksums(tmp)
    if numbered:
        _write_atomic(root / LATEST, name.encode())
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            _discard(old)
    _remove_leftovers(root)
    return root / name


def _write_checksums(directory: Path) -> None:
    """Record the SHA-256 of every file in ``directory`` (written last: it vouches for the rest)."""
    checksums = {item.name: sha256(item) for item in sorted(directory.iterdir())}
    _write_atomic(directory / CHECKSUMS_FILE, json.dumps(
        {"sha256": checksums}, indent=2, sort_keys=True).encode() + b"\n")


def link_checkpoint(source: Path, name: str) -> Path:
    """Make the complete checkpoint ``source`` also the one called ``name`` in its folder
    (replacing it), without writing it again: its files are hard-linked (copied where the file
    system cannot link); checkpoint files are never changed once written, so sharing them is
    safe."""
    with _staged(source.parent, name) as tmp:
        for item in source.iterdir():
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
    return source.parent / name


BRANCHABLE_MODEL_FIELDS = ("alpha", "span_loss", "ramp", "noisy",
                           "adapt_span_loss", "compress_loss")
"""Model fields a branch may change: they shape the losses and masks, not the parameters or the
optimizer's groups, so the branch continues the saved weights and training state exactly."""


def branch_checkpoint(source: str | Path, out_dir: str | Path,
                      model_overrides: dict[str, Any]) -> Path:
    """Start run ``out_dir`` (new or empty) from the complete checkpoint ``source`` (a checkpoint,
    or a run whose newest intact one is taken) with ``model_overrides`` (only
    :data:`BRANCHABLE_MODEL_FIELDS`) applied, so that resuming it continues the same weights,
    optimizer, random states and memory under the changed losses: an ablation from a common
    point. The source run's metrics are copied (resuming drops those after the checkpoint).
    Returns the new checkpoint directory."""
    fixed = sorted(set(model_overrides) - set(BRANCHABLE_MODEL_FIELDS))
    if fixed:
        raise ValueError(f"a branch cannot change {', '.join(fixed)} (it may change only "
                         f"{', '.join(BRANCHABLE_MODEL_FIELDS)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; a branch starts a new run directory")
    loaded, _ = load_latest_valid(source, training_state=True)
    saved = json.loads((loaded.path / CONFIG_FILE).read_text())
    run = RunConfig.from_dict({**saved["run"],
                               "model": {**saved["run"]["model"], **model_overrides}})
    model_config = dataclasses.replace(loaded.model.config, **model_overrides)  # validates
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{loaded.step:08d}"  # (a branch from ``best`` becomes a numbered checkpoint)
    with _staged(root, name) as tmp:
        for item in loaded.path.iterdir():
            if item.name not in (CONFIG_FILE, CHECKSUMS_FILE):
                shutil.copy2(item, tmp / item.name)
        config = {**saved, "run": run.to_dict(), "model": model_config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_checksums(tmp)
    _write_atomic(root / LATEST, name.encode())
    metrics = loaded.path.parent.parent / METRICS_FILE
    if metrics.is_file():
        shutil.copy2(metrics, out_dir / METRICS_FILE)
    return root / name


@contextmanager
def _staged(root: Path, name: str) -> Iterator[Path]:
    """A hidden temporary directory in ``root`` to fill; renamed to ``name`` (replacing what was
    there) when the block ends, removed if it fails: no one ever sees a half-written checkpoint
    under its name."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        yield tmp
        final = root / name
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(directory: Path) -> None:
    """Delete a checkpoint so that no half-deleted one is ever seen under its name (a crash
    during ``rmtree`` would leave a damaged ``step-N``): renamed to a hidden name first
    (atomic), then removed."""
    hidden = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.deleted."))
    os.replace(directory, hidden / directory.name)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Remove what writes and deletions killed midway left behind (hidden ``.step-*``
    directories, ``.latest.*`` files): with large models each is a checkpoint's worth of disk.
    Called after a checkpoint is complete, by the only process writing checkpoints."""
    for entry in root.iterdir():
        if entry.name.startswith((".step-", f".{BEST}.")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{LATEST}.") and entry.is_file():
            entry.unlink(missing_ok=True)



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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def warn_skipped(message: str) -> None:
    print(f"warning: skipped an unreadable checkpoint: {message}", file=sys.stderr)


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    training_state: bool = False,
    on_skip: Callable[[str], None] | None = warn_skipped,
) -> LoadedCheckpoint:
    """Load a checkpoint's model (see :func:`checkpoint_candidates` for ``path``): the newest
    intact checkpoint when ``path`` is a run directory, calling ``on_skip`` with the error of
    each newer damaged one; exactly ``path`` when it is a checkpoint directory.
    ``training_state`` also reads (and verifies) the trainer state and the memory."""
    loaded, skipped = load_latest_valid(path, device, training_state)
    for message in skipped:
        if on_skip is not None:
            on_skip(message)
    return loaded


def load_latest_valid(path: str | Path, device: str | torch.device = "cpu",
                      training_state: bool = True):
    """The newest loadable checkpoint, and the errors of newer ones that could not be loaded."""
    errors: list[str] = []
    for directory in checkpoint_candidates(path):
        try:
            return _load_directory(directory, device, training_state), errors
        except CheckpointError as error:
            errors.append(str(error))
    if len(errors) == 1:
        raise CheckpointError(errors[0])
    raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))


def _checksums(directory: Path) -> dict[str, str] | None:
    """The recorded SHA-256 of each file, or None for a checkpoint from before checksums."""
    if not (directory / CHECKSUMS_FILE).is_file():
        saved = _read(directory, CONFIG_FILE, lambda path: json.loads(path.read_text()))
        if isinstance(saved, dict) and "format" not in saved:
            print(f"warning: checkpoint {directory} predates checksums: loaded unverified",
                  file=sys.stderr)
            return None
        raise CheckpointError(f"checkpoint {directory} is incomplete: {CHECKSUMS_FILE} is "
                              "missing")
    manifest = _read(directory, CHECKSUMS_FILE, lambda path: json.loads(path.read_text()))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        raise CheckpointError(f"checkpoint {directory}: {CHECKSUMS_FILE} is corrupt")
    return manifest["sha256"]


def _verify(directory: Path, name: str, checksums: dict[str, str] | None) -> None:
    """Raise unless ``name`` exists and has the checksum the checkpoint recorded for it (any
    content, for a checkpoint from before checksums)."""
    if not (directory / name).is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    if checksums is None:
        return
    if name not in checksums:
        raise CheckpointError(f"checkpoint {directory}: {name} has no checksum")
    if sha256(directory / name) != checksums[name]:
        raise CheckpointError(f"checkpoint {directory}: {name} is corrupt (its SHA-256 differs "
                              f"from the one in {CHECKSUMS_FILE})")


def _holds(directory: Path, name: str, checksums: dict[str, str] | None) -> bool:
    """Whether the checkpoint was written with the optional file ``name``."""
    return (directory / name).is_file() if checksums is None else name in checksums


def _read(directory: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """Run ``reader`` on a checkpoint file, turning any failure into a :class:`CheckpointError`
    (torch, safetensors and json raise many different kinds on damaged files)."""
    try:
        return reader(directory / name)
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory}: {name} is corrupt: {error}") from error


def _load_directory(directory: Path, device: str | torch.device,
                    training_state: bool = True) -> LoadedCheckpoint:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory is missing: {directory}")
    for required in (CONFIG_FILE, MODEL_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {required} is missing")
    checksums = _checksums(directory)
    for required in (CONFIG_FILE, MODEL_FILE):
        _verify(directory, required, checksums)
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
    if training_state and _holds(directory, TRAINER_FILE, checksums):
        _verify(directory, TRAINER_FILE, checksums)
        trainer_state = _read(
            directory, TRAINER_FILE,
            lambda path: torch.load(path, map_location="cpu", weights_only=True),
        )
    if training_state and _holds(directory, MEMORY_FILE, checksums):
        _verify(directory, MEMORY_FILE, checksums)
        memory = _read(directory, MEMORY_FILE, lambda path: load_file(str(path)))
    return LoadedCheckpoint(directory, run, model, trainer_state, memory,
                            saved_step=int(saved.get("step", 0)))
