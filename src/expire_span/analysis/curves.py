"""Training curves from a run's ``metrics.jsonl``: the task metric and the memory size per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir``'s ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return read_metrics_file(path)


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (one JSON object per line; a raw log kept under
    docs/results is one), with the line number of any that is not JSON."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON: {error}") from None
    return records


def plot_run(run_dir: Path, out: Path) -> Path:
    """Loss, the validation metric and the average memory size (per layer when logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training records yet")
    summary_path = run_dir / "config.json"
    label = run_dir.name
    if summary_path.is_file():
        config = json.loads(summary_path.read_text())
        label = f"{config.get('task')} / {config.get('model', {}).get('memory')}"
    figure, (loss_axis, metric_axis, memory_axis) = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = [r["step"] for r in train]
    loss_axis.plot(steps, [r["loss"] for r in train], label="train")
    if valid:
        loss_axis.plot([r["step"] for r in valid], [r["loss"] for r in valid], label="valid")
    loss_axis.set_title("loss (nats)")
    metric = "accuracy"
    for key in ("bpc", "bpb", "error", "success_rate", "accuracy"):
        if valid and key in valid[-1]:
            metric = key
            break
    if valid:
        metric_axis.plot([r["step"] for r in valid], [r.get(metric) for r in valid], marker="o")
    metric_axis.set_title(f"valid {metric}")
    per_layer = [r.get("memory_size_per_layer") for r in train]
    if all(per_layer):
        for layer in range(len(per_layer[0])):
            memory_axis.plot(steps, [values[layer] for values in per_layer],
                             label=f"layer {layer}")
    else:
        memory_axis.plot(steps, [r["memory_size"] for r in train], label="mean over layers")
    memory_axis.set_title("average memory size")
    for axis in (loss_axis, metric_axis, memory_axis):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    loss_axis.legend()
    memory_axis.legend(fontsize=8)
    figure.suptitle(label)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
