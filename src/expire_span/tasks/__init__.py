"""Tasks: data generators and loaders, each a :class:`SequenceTask` registered by name."""

from __future__ import annotations

from typing import Any

from expire_span.tasks.base import SPLITS, Batch, MetricAccumulator, SequenceTask, Shard
from expire_span.tasks.copy import CopyOptions, CopyTask

_REGISTRY: dict[str, type[SequenceTask]] = {
    CopyTask.name: CopyTask,
}


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def task_class(name: str) -> type[SequenceTask]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}"
        ) from None


def build_task(name: str, options: dict[str, Any] | None = None) -> SequenceTask:
    """Instantiate a task from its name and a mapping of its options (unknown keys rejected)."""
    cls = task_class(name)
    options = dict(options or {})
    known = set(cls.Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for task {name!r}: {', '.join(unknown)}")
    return cls(cls.Options(**options))


__all__ = [
    "SPLITS",
    "Batch",
    "CopyOptions",
    "CopyTask",
    "MetricAccumulator",
    "SequenceTask",
    "Shard",
    "available_tasks",
    "build_task",
    "task_class",
]
