"""The paper's accuracy-against-memory plots: each policy over its own knob, on one task.

For one task configuration (a preset, plus ``--set section.field=value`` overrides), trains

- Expire-Span at every ``--alphas`` (its loss coefficient; the span rule sets the rest), and
  at every ``--max-spans`` if given (the paper's error-against-L experiment; the other policies
  keep the preset's L),
- Transformer-XL at every ``--windows`` (L = the window),
- Adaptive-Span at every ``--adapt-losses``, starting at the same span as Expire-Span,
- the Compressive Transformer at every ``--compressive-spans`` (L = its FIFO plus compressed
  reach; n_m and n_cm follow from L),

each in a fresh process with the same budget, then evaluates each on the test split and measures
the CPU time of a training step of the trained model on one block with its memory (as
``expire-span bench --checkpoint``). It writes every point (test metric, the task's baseline such
as object collision's ``constant_error``, average memory size attended per query on the test
stream, ms per block, training seconds, the settings; ``test_<metric>`` and ``seconds`` repeat
the test metric and the training seconds under the names the results files use) to
``--record`` as JSON and draws the metric against memory size and against time per block to
``--image``. A point whose run directory holds a finished run is not trained again, so an
interrupted sweep continues where it stopped. ``--merge A.json[:SERIES] B.json ...`` trains
nothing: it gathers the records of several sweeps (e.g. Expire-Span at several L with different
starting spans, and the baselines) into one record, plot and table, each file's points drawn as
its own line when it names a series.

    OMP_NUM_THREADS=1 python benchmarks/frontier.py --preset copy-cpu --out runs/frontier-copy \\
        --alphas 1e-5 1e-4 1e-3 --windows 208 260 416 512 --adapt-losses 1e-5 1e-4 1e-3 \\
        --compressive-spans 256 512 1024 \\
        --record docs/results/frontier-copy.json --image docs/images/frontier-copy.png
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from results import test_metrics, train, training_cost  # noqa: E402

from expire_span.training import RunConfig, get_preset  # noqa: E402
from expire_span.training.config import merge  # noqa: E402

SWEEPS = {
    "expire-span": ("alphas", "alpha"),
    "transformer-xl": ("windows", "max_span"),
    "adaptive-span": ("adapt_losses", "adapt_span_loss"),
    "compressive": ("compressive_spans", "max_span"),
}
"""Policy -> (command-line list, the ModelConfig field it sets)."""


def parse_override(text: str) -> dict[str, Any]:
    """``section.field=value`` -> ``{section: {field: value}}`` (value read as a Python literal,
    else as a string)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot:
        raise argparse.ArgumentTypeError(f"expected section.field=value, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return {section: {name: parsed}}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    config = get_preset(args.preset).config
    for override in args.set:
        config = merge(config, override)
    return merge(config, {"train": {"seed": args.seed}})


def starting_span_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The Expire-Span run's resolved span settings (the span rule's, unless given), so that
    Adaptive-Span starts at the same span."""
    resolved = RunConfig.from_dict(merge(config, {"model": {"memory": "expire-span"}})).resolved()
    return {"adapt_span_init": resolved.model["init_percentage"],
            "ramp": resolved.model["ramp"]}


def points(args: argparse.Namespace, config: dict[str, Any]) -> list[tuple[str, str, Any, dict]]:
    """(policy, field, value, model overrides) for every point of the sweep."""
    adaptive = starting_span_settings(config)
    out = []
    for policy, (option, field) in SWEEPS.items():
        for value in getattr(args, option) or []:
            model = {"memory": policy, field: value}
            if policy == "adaptive-span":
                model = {**adaptive, **model}
            if policy == "expire-span" and args.max_spans:
                out.extend((policy, field, value, {**model, "max_span": span})
                           for span in args.max_spans)
            else:
                out.append((policy, field, value, model))
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every point, in order; the record and the plot are rewritten as each one lands."""
    config = base_config(args)
    records = []
    for policy, field, value, model in points(args, config):
        name = f"{policy}-{field}-{value}"
        if field != "max_span" and "max_span" in model:
            name += f"-max_span-{model['max_span']}"
        run_dir = Path(args.out) / name
        summary = train(merge(config, {"model": model}), run_dir)
        run = RunConfig.from_dict(summary["config"])
        test = test_metrics(run_dir)
        metric = summary["primary_metric"]
        record = {
            "task": run.task, "model": policy, "parameter": field, "value": value,
            "max_span": run.model["max_span"], "metric": metric, "test": test[metric],
            f"test_{metric}": test[metric],
            **{name: test[name] for name in ("constant_error",) if name in test},
            "avg_memory_size": test["memory_size"], "train_seconds":
                summary["train_seconds_this_session"], "seconds":
                summary["train_seconds_this_session"], "steps": summary["steps"],
            "peak_rss_mb": summary["peak_rss_mb"], "seed": args.seed, "run": str(run_dir),
            "settings": {"task_options": run.task_options, "model": run.model},
            **training_cost(run_dir, run, name),
        }
        print(json.dumps({k: v for k, v in record.items() if k != "settings"}), flush=True)
        records.append(record)
        write(records, args)
    return records


def series(records: list[dict[str, Any]]) -> list[str]:
    """The lines of a plot, in the order they first appear: a record's ``series`` (set by
    ``--merge``), else its policy."""
    return list(dict.fromkeys(r.get("series", r["model"]) for r in records))


def merged(specs: list[str]) -> list[dict[str, Any]]:
    """The records of ``PATH[:SERIES]`` files, in order, with the names the results files use
    (``test_<metric>``, ``seconds``) for records written before they existed."""
    records = []
    for spec in specs:
        path, _, name = spec.partition(":")
        for record in json.loads(Path(path).read_text()):
            record = {f"test_{record['metric']}": record["test"],
                      "seconds": record["train_seconds"], **record}
            if name:
                record["series"] = name
            records.append(record)
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    """The table docs/results.md shows: every point, each series' rows by memory size."""
    metric = records[0]["metric"]
    lines = [f"| model | knob | value | L | test {metric} | avg memory size | ms per block "
             "| training seconds |", "|---|---|---|---|---|---|---|---|"]
    for name in series(records):
        for r in sorted((r for r in records if r.get("series", r["model"]) == name),
                        key=lambda r: r["avg_memory_size"]):
            block = f"{r['block_ms']:.1f}" if "block_ms" in r else "-"
            lines.append(f"| {name} | {r['parameter']} | {r['value']:g} | {r['max_span']} "
                         f"| {r['test']:.3f} | {r['avg_memory_size']:.1f} | {block} "
                         f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def write(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Rewrite the record, the plot and the table (printed) with every point so far."""
    print(markdown(records), flush=True)
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(records, indent=2) + "\n")
    plot(records, Path(args.image), args.title or args.preset or "")


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Metric against memory size and against CPU time per block, one line per policy."""
    metric = records[0]["metric"]
    timed = all("block_ms" in r for r in records)
    figure, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 5.5, 3.8),
                                squeeze=False)
    for name in series(records):
        mine = sorted((r for r in records if r.get("series", r["model"]) == name),
                      key=lambda r: r["avg_memory_size"])
        axes[0][0].plot([r["avg_memory_size"] for r in mine], [r["test"] for r in mine], "o-",
                        label=name)
        if timed:
            axes[0][1].plot([r["block_ms"] for r in mine], [r["test"] for r in mine], "o-",
                            label=name)
    axes[0][0].set(xlabel="average memory size (earlier steps attended per query, test)",
                   ylabel=f"test {metric}", xscale="log", title=title)
    if timed:
        axes[0][1].set(xlabel="ms per training block (CPU time, trained model and memory)",
                       ylabel=f"test {metric}", xscale="log", title=title)
    for axis in axes[0]:  # log axes: label the decades only (minor labels overlap)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="the task configuration to sweep")
    parser.add_argument("--set", type=parse_override, action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a preset value, e.g. task_options.gap=400 (repeatable)")
    parser.add_argument("--alphas", type=float, nargs="*", help="Expire-Span loss coefficients")
    parser.add_argument("--max-spans", type=int, nargs="*",
                        help="train Expire-Span at each of these maximum spans L (default: the "
                             "preset's)")
    parser.add_argument("--windows", type=int, nargs="*", help="Transformer-XL windows")
    parser.add_argument("--adapt-losses", type=float, nargs="*",
                        help="Adaptive-Span loss coefficients")
    parser.add_argument("--compressive-spans", type=int, nargs="*",
                        help="Compressive Transformer maximum spans L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="run directories go here")
    parser.add_argument("--merge", nargs="+", metavar="RECORD[:SERIES]",
                        help="train nothing: gather these records (see above)")
    parser.add_argument("--record", required=True, help="JSON file of every point")
    parser.add_argument("--image", required=True, help="the plot (PNG)")
    parser.add_argument("--title", default=None, help="plot title (default: the preset)")
    args = parser.parse_args()
    if args.merge:
        write(merged(args.merge), args)
        return
    if args.preset is None or args.out is None:
        parser.error("--preset and --out are needed unless --merge is given")
    if not points(args, base_config(args)):
        raise SystemExit("nothing to sweep: give at least one of --alphas, --windows, "
                         "--adapt-losses, --compressive-spans")
    measure(args)


if __name__ == "__main__":
    main()
