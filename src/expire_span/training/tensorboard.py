"""TensorBoard scalars beside ``metrics.jsonl``: the same records, for a live view of a run
(``tensorboard --logdir OUT/tensorboard``)."""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Writes every numeric field of a record as the scalar ``split/name`` at its ``step``
    (lists of numbers, such as per-layer memory sizes, as ``split/name/i``).

    Args:
        directory: where the event files go.
        resumed_at: the step a resumed run continues from; TensorBoard then drops what an
            earlier session logged after it, as ``metrics.jsonl`` does.
    """

    def __init__(self, directory: Path, resumed_at: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        purge_step = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        split = record.get("split", "event")
        for name, value in record.items():
            if name in ("step", "split"):
                continue
            if _is_number(value):
                self.writer.add_scalar(f"{split}/{name}", value, step)
            elif isinstance(value, list) and value and all(_is_number(v) for v in value):
                for index, item in enumerate(value):
                    self.writer.add_scalar(f"{split}/{name}/{index}", item, step)
        self.writer.flush()  # records come once per log line: a live view sees each at once

    def close(self) -> None:
        self.writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
