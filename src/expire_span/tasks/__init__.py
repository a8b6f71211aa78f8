"""Tasks, each registered by name: data generators and loaders (:class:`SequenceTask`) and
reinforcement-learning environments (:class:`RLTask`)."""

from __future__ import annotations

from typing import Any

from expire_span.tasks.base import SPLITS, Batch, MetricAccumulator, SequenceTask, Shard
from expire_span.tasks.copy import CopyOptions, CopyTask
from expire_span.tasks.enwik8 import Enwik8Task
from expire_span.tasks.object_collision import ObjectCollisionTask
from expire_span.tasks.pg19 import PG19Task
from expire_span.tasks.rl import CorridorTask, InstructionTask, PortalTask, RLTask
from expire_span.tasks.streams import StreamTask
from expire_span.tasks.text import TextTask

_REGISTRY: dict[str, type[SequenceTask] | type[RLTask]] = {
    CopyTask.name: CopyTask,
    Enwik8Task.name: Enwik8Task,
    PG19Task.name: PG19Task,
    TextTask.name: TextTask,
    ObjectCollisionTask.name: ObjectCollisionTask,
    CorridorTask.name: CorridorTask,
    PortalTask.name: PortalTask,
    InstructionTask.name: InstructionTask,
}

for _task in _REGISTRY.values():
    if issubclass(_task, RLTask):
        _task.register_env()


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def task_class(name: str) -> type[SequenceTask] | type[RLTask]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}"
        ) from None


def build_task(name: str, options: dict[str, Any] | None = None) -> SequenceTask | RLTask:
    """Instantiate a task from its name and a mapping of its options (unknown keys rejected)."""
    cls = task_class(name)
    options = dict(options or {})
    known = set(cls.Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for task {name!r}: {', '.join(unknown)}")
    return cls(cls.Options(**options))


def is_rl_task(name: str) -> bool:
    """Whether the task is an environment (trained by reinforcement learning)."""
    return issubclass(task_class(name), RLTask)


__all__ = [
    "SPLITS",
    "Batch",
    "CopyOptions",
    "CopyTask",
    "Enwik8Task",
    "MetricAccumulator",
    "ObjectCollisionTask",
    "PG19Task",
    "RLTask",
    "SequenceTask",
    "Shard",
    "StreamTask",
    "TextTask",
    "available_tasks",
    "build_task",
    "is_rl_task",
    "task_class",
]
