"""What every trainer shares: the run directory, resume, the step loop with its progress bar,
periodic logging (metrics.jsonl and TensorBoard), evaluation and checkpoints, stop signals,
divergence checks, mixed precision and the process group of a distributed run.

Under torchrun, every process runs the loop; rank 0 alone writes the run directory, shows
progress and evaluates (the others wait), and the processes agree on when to stop.

A trainer for a kind of task (token streams, environments) subclasses :class:`TrainingLoop` and
says what one training step, one log line, an evaluation and the summary's extra fields are.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from expire_span.memory import Memory
from expire_span.training.aux_gate import run_gate
from expire_span.training.checkpoint import (
    BEST,
    CHECKPOINTS,
    METRICS_FILE,
    CheckpointError,
    LoadedCheckpoint,
    json_safe,
    link_checkpoint,
    load_latest_valid,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from expire_span.training.config import RunConfig, TrainConfig, vocab_size
from expire_span.training.distributed import current
from expire_span.training.tensorboard import TENSORBOARD_DIR, TensorBoardLog

SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "config.json"
RESUMABLE_TRAIN_FIELDS = frozenset(
    {"steps", "eval_every", "eval_batches", "eval_batch_size", "log_every", "checkpoint_every",
     "keep_checkpoints", "keep_best", "device", "tensorboard", "precision", "accumulate",
     "lr_drop_at",
     "lr_drop"}
)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parameter_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per learning-rate factor, where a module states its own
    (``lr_scale``, e.g. a memory policy's span parameters) for the parameters it holds directly
    or below it; the rest at ``lr``. With every factor 1 this is one group, as before."""
    scales: dict[int, float] = {}
    for module in model.modules():
        scale = getattr(module, "lr_scale", 1.0)
        if scale != 1.0:
            for parameter in module.parameters():
                scales[id(parameter)] = scale
    groups: dict[float, list[nn.Parameter]] = {}
    for parameter in model.parameters():
        groups.setdefault(scales.get(id(parameter), 1.0), []).append(parameter)
    return [{"params": params, "lr": lr * scale} for scale, params in groups.items()]


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite; training stopped before the update."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run stopped between two steps and saved a checkpoint."""


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets a flag (the loop stops cleanly between
    steps); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def learning_rate_factor(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to 10% at the last step; times
    ``lr_drop`` from step ``lr_drop_at`` on. ``step`` counts the steps already taken: the
    factor for the step of index ``step``."""
    drop_at = math.inf if train.lr_drop_at is None else train.lr_drop_at

    def schedule(step: int) -> float:
        if step < train.warmup:
            return (step + 1) / train.warmup
        if train.schedule == "constant":
            return 1.0
        progress = (step - train.warmup) / max(1, train.steps - train.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def factor(step: int) -> float:
        return schedule(step) * (train.lr_drop if step >= drop_at else 1.0)

    return factor


def apply_resume_overrides(saved: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The saved configuration with the training fields a resumed run may change."""
    train = saved.train
    for key, value in overrides.items():
        if key not in RESUMABLE_TRAIN_FIELDS:
            raise ValueError(
                f"cannot change train.{key} when resuming; only "
                f"{', '.join(sorted(RESUMABLE_TRAIN_FIELDS))} may change"
            )
        setattr(train, key, value)
    TrainConfig.__post_init__(train)
    return saved


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank one or one a crash cut short."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is None:
            write_text_atomic(path, "")
        elif path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= keep_until_step]
            write_text_atomic(path, "".join(ln + "\n" for ln in kept))  # a crash keeps it whole

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


class TrainingLoop(ABC):
    """Trains the task's network into ``out_dir`` (see :mod:`expire_span.training.checkpoint` for
    its layout).

    Args:
        run: the resolved configuration (ignored for all but ``resume_overrides`` on resume).
        out_dir: run directory.
        resume: continue from the newest loadable checkpoint in ``out_dir``.
        resume_overrides: training fields to change when resuming (e.g. ``{"steps": 2000}``).
        progress: show a progress bar (rank 0 only).
        echo: where to print messages (rank 0 only).

    Subclasses implement :meth:`_setup`, :meth:`_train_step`, :meth:`_log_record`,
    :meth:`evaluate` and :meth:`_postfix`, and may extend :meth:`_summary`,
    :meth:`_trainer_state` and :meth:`_restore`. ``self.memory`` (the memory of this process's
    training rows) is saved with checkpoints; a trainer keeping it elsewhere overrides
    :meth:`_local_memory` and :meth:`_restore_memory`.
    """

    def __init__(
        self,
        run: RunConfig | None,
        out_dir: str | Path,
        *,
        resume: bool = False,
        resume_overrides: dict[str, Any] | None = None,
        progress: bool = True,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.group = current()
        self.progress = progress and self.group.is_main
        self.echo = echo if self.group.is_main else _silent
        self.start_step = 0
        loaded = None
        if resume:
            loaded, skipped = load_latest_valid(self.out_dir)
            for message in skipped:
                self.echo(f"warning: skipped an unreadable checkpoint: {message}")
            run = apply_resume_overrides(loaded.run, resume_overrides or {})
        elif run is None:
            raise ValueError("a RunConfig is needed unless resuming")
        elif any((self.out_dir / CHECKPOINTS).glob("step-*")):  # not a first write killed
            raise FileExistsError(
                f"{self.out_dir} already holds a run; continue it with --resume or choose "
                "another --out"
            )
        assert run is not None
        run = run.resolved()
        self.run = run
        self.train_cfg = run.train
        self.device = self.group.place(resolve_device(run.train.device))
        if run.train.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"train.precision fp16 needs a CUDA device, not {self.device}: "
                             "use bf16 (or fp32) on the CPU")
        self.autocast_dtype = AUTOCAST_DTYPES.get(run.train.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=run.train.precision == "fp16")
        """Scales fp16 losses so that small gradients survive; a no-op otherwise."""
        self.task = run.build_task()
        self.rows = run.train.batch_size
        """Training rows (streams or environments) whose memory ``self.memory`` holds."""

        torch.manual_seed(run.train.seed)
        if loaded is not None:
            self.model = loaded.model
        else:
            self.model = run.build_model(vocab_size(self.task))
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, run.train.lr), lr=run.train.lr,
            weight_decay=run.train.weight_decay, eps=run.train.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(run.train)
        )
        self.memory: Memory | None = None
        self.aux_gate = run_gate(run.train, self.model)
        """When the policies' auxiliary losses start to act (checkpointed with the trainer)."""
        self.best: dict[str, Any] | None = None
        """``{"step", "metric", "value"}`` of the best validation score so far (checkpointed)."""
        self._setup()
        if loaded is not None:
            self._restore(loaded)
        self.resumed = resume
        self.log: MetricsLog | None = None
        self.board: TensorBoardLog | None = None
        if self.group.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / RUN_CONFIG_FILE, run.to_dict())
            self.log = MetricsLog(self.out_dir / METRICS_FILE, self.start_step if resume else None)

    # ------------------------------------------------------------------ to implement

    @abstractmethod
    def _setup(self) -> None:
        """Build what the subclass needs (``self.run``, ``self.task``, ``self.model`` exist; a
        checkpoint being resumed is restored afterwards)."""

    @abstractmethod
    def _train_step(self, step: int) -> None:
        """One training step (call :meth:`_update` with its loss); the loop steps the scheduler."""

    @abstractmethod
    def _log_record(self, step: int) -> dict[str, Any]:
        """The training statistics gathered since the last log line (then forget them)."""

    @abstractmethod
    def evaluate(self, split: str = "valid", progress: bool = False) -> dict[str, float]:
        """Task metrics, with ``memory_size`` and ``cache_size``."""

    @abstractmethod
    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a log record."""

    # ------------------------------------------------------------------ state

    def _trainer_state(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        state["aux_gate"] = self.aux_gate.state_dict()
        state["best"] = self.best
        return state

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        state = loaded.trainer_state
        if state is None:
            raise CheckpointError(f"checkpoint {loaded.path} has no trainer state to resume from")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.aux_gate.load_state_dict(state.get("aux_gate"))
        self.best = state.get("best")
        self._reschedule()
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if loaded.memory_tensors is not None:
            empty = self.model.init_memory(self.rows)
            self._restore_memory(empty.load_state_dict(loaded.memory_tensors))
        self.start_step = loaded.step
        self.echo(f"resuming from {loaded.path} at step {self.start_step}")

    def _reschedule(self) -> None:
        """Set the learning rate of the next step from this run's schedule: the optimizer's
        saved one came from the schedule at save time, which a resume may have changed
        (``steps`` for the cosine, ``lr_drop_at``). Unchanged, this is the very same value."""
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _local_memory(self) -> Memory | None:
        """The memory of this process's training rows, as checkpoints save it."""
        return self.memory

    def _restore_memory(self, memory: Memory) -> None:
        """Take up the memory of all training rows of a checkpoint."""
        self.memory = memory

    def save(self, step: int, name: str | None = None) -> Path | None:
        """Write a checkpoint (rank 0; the others hand it their rows' memory and return None):
        its memory holds every row of the global batch, in order; ``name``: see
        :func:`save_checkpoint`."""
        memory = self._local_memory()
        if self.group.distributed:
            parts = self.group.gather(None if memory is None else memory.to("cpu"))
            if parts is None:
                return None
            memory = None if any(part is None for part in parts) else Memory.concat(parts)
        return save_checkpoint(
            self.out_dir, step, self.run, self.model, self._trainer_state(), memory,
            keep=self.train_cfg.keep_checkpoints, name=name,
        )

    def _save_best(self, step: int, written: Path | None, periodic: bool) -> None:
        """Make step ``step`` the best checkpoint: the periodic one just ``written`` (rank 0's
        path; every rank knows whether there was one) is linked, not written again."""
        if not periodic:
            self.save(step, name=BEST)
        elif written is not None:
            link_checkpoint(written, BEST)

    def _improves(self, step: int, metrics: dict[str, float] | None) -> bool:
        """Whether ``metrics`` (rank 0's validation; None elsewhere) are at least as good as the
        best so far on the task's primary metric; if so they become the best. Ties go to the
        later checkpoint: on a solved task, the one whose spans have shrunk the most."""
        if metrics is None:
            return False
        metric = self.task.primary_metric
        value = float(metrics[metric])
        if self.best is not None and not (
                value >= self.best["value"] if self.task.higher_is_better
                else value <= self.best["value"]):
            return False
        self.best = {"step": step, "metric": metric, "value": value}
        return True

    def autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass (``train.precision``; off for fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def _write(self, record: dict[str, Any]) -> None:
        """A record for metrics.jsonl and TensorBoard (rank 0 writes them; others do nothing)."""
        if self.log is not None:
            self.log.write(record)
        if self.board is not None:
            self.board.write(record)

    def _evaluate_on_main(self) -> dict[str, float] | None:
        """Rank 0 evaluates (with the unwrapped model) while the others wait at a barrier."""
        metrics = self.evaluate() if self.group.is_main else None
        self.group.barrier()
        return metrics

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any] | None:
        """Train to ``train.steps``; return (and write) the summary (None on ranks other than
        0, which write nothing)."""
        cfg = self.train_cfg
        if self.group.is_main and cfg.tensorboard:
            self.board = TensorBoardLog(self.out_dir / TENSORBOARD_DIR,
                                        self.start_step if self.resumed else None)
        try:
            return self._fit(cfg)
        finally:
            if self.board is not None:
                self.board.close()
                self.board = None

    def _fit(self, cfg: TrainConfig) -> dict[str, Any] | None:
        step = self.start_step
        started = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        last_eval: dict[str, float] | None = None
        evaluated = improved = False
        with StopSignals() as stop:
            try:
                while step < cfg.steps:
                    self._train_step(step)
                    self.scheduler.step()
                    step += 1
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        record = self._log_record(step)
                        self._write(record)
                        bar.set_postfix(self._postfix(record))
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        last_eval, evaluated = self._evaluate_on_main(), True
                        if last_eval is not None:
                            self._write({"step": step, "split": "valid", **last_eval})
                        improved = cfg.keep_best and self.group.any(
                            self._improves(step, last_eval))
                    stopping = self.group.any(stop.requested is not None)
                    periodic = step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping
                    if periodic:
                        path = self.save(step)
                    if improved:  # after the periodic checkpoint: a crash here loses neither
                        self._save_best(step, path if periodic else None, periodic)
                        improved = False
                    if stopping:
                        raise TrainingInterrupted(
                            f"{stop.requested or 'a stop signal'} at step {step}: checkpoint "
                            f"saved to {path or self.out_dir}; continue with --resume"
                        )
            except TrainingDiverged as error:
                self._write({"step": step, "event": "diverged", "message": str(error)})
                raise
            finally:
                bar.close()
        if not evaluated:
            last_eval = self._evaluate_on_main()
        if last_eval is None:
            return None
        summary = self._summary(step, last_eval, time.perf_counter() - started)
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)
        return summary

    def _update(self, loss: Tensor, step: int) -> None:
        """Backpropagate ``loss`` and take an optimizer step (see :meth:`_optimizer_step`)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        self._optimizer_step(step, [loss.detach()])

    def _backward(self, loss: Tensor) -> None:
        """Add the gradient of ``loss`` (scaled under fp16) to the parameters' gradients."""
        self.scaler.scale(loss).backward()

    def _optimizer_step(self, step: int, losses: list[Tensor]) -> None:
        """Clip the gradients and take an optimizer step, unless a loss (of any process) or the
        gradient norm is not finite: then the weights stay as they were and
        :class:`TrainingDiverged` is raised. Under fp16, an overflowing gradient only makes the
        loss scaler skip the step and lower its scale, as mixed precision expects."""
        bad = next((loss for loss in losses if not torch.isfinite(loss)), None)
        if self.group.any(bad is not None):
            value = math.nan if bad is None else float(bad)
            raise TrainingDiverged(self._diverged_message(step, "loss", value))
        self.scaler.unscale_(self.optimizer)
        clip = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise TrainingDiverged(self._diverged_message(step, "gradient norm", float(grad_norm)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_optimizer_step()

    def _diverged_message(self, step: int, what: str, value: float) -> str:
        saved = sorted((self.out_dir / CHECKPOINTS).glob("step-*"))
        last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved"
        return (f"{what} became {value} at step {step + 1}; stopped before updating the "
                f"weights; {last}. Try a lower learning rate or a stronger gradient clip.")

    def _summary(self, step: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        config = self.model.config
        return {
            "task": self.run.task,
            "model": config.memory,
            "steps": step,
            "metrics": metrics,
            "primary_metric": self.task.primary_metric,
            "avg_memory_size": metrics["memory_size"],
            "cache_size": metrics["cache_size"],
            "max_span": config.max_span,
            "block_len": config.block_len,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "train_seconds_this_session": seconds,
            "best": self.best,
            "device": str(self.device),
            "processes": self.group.world_size,
            "config": self.run.to_dict(),
        }


def _silent(message: str) -> None:
    """Where messages of ranks other than 0 go."""
