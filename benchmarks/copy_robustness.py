"""Expire-Span on a grid of copy tasks with ONE set of defaults: only the task flags change.

Every configuration is ``expire-span train --task copy --symbols K --gap D --max-span L`` with
the copy preset (``copy-cpu``: M = 32, its model and budget); the span hyperparameters come from
the span rule (``expire_span.training.span_rule``) and the auxiliary loss waits for the task to
be learned (``train.aux_hold``). Each run trains in a fresh process (a finished run is not
trained again, so the grid resumes), is evaluated on the test split, and its spans are read on a
test stream: for every layer, the spans of the K symbols against their distance to the answer
(K + D) and the median span of the fillers. All finished runs under ``--out`` go to ``--record``.

    OMP_NUM_THREADS=1 python benchmarks/copy_robustness.py --out runs/copy-robustness \\
        --record docs/results/copy-robustness.json
    # or split the grid over two processes, then gather:
    OMP_NUM_THREADS=1 python benchmarks/copy_robustness.py --only 16,1000,4096 4,100,1024 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from results import test_metrics, train  # noqa: E402

from expire_span.analysis.spans import token_spans
from expire_span.training import get_preset, load_checkpoint
from expire_span.training.config import merge

GRID = [(k, d, span) for span in (1024, 4096) for d in (100, 400, 1000) for k in (4, 8, 16)
        if not (span == 1024 and d == 1000)]
"""(K, D, L); D = 1000 needs L > 1.25 (K + D) / 0.9 + 53, so it runs at L = 4096 only."""
PRESET = "copy-cpu"


def run_name(symbols: int, gap: int, span: int) -> str:
    return f"k{symbols}-d{gap}-l{span}"


def selectivity(run_dir: Path, episodes: int = 3) -> list[dict[str, float]]:
    """Per layer: the K symbols' spans (min, median) against their distance to the answer (a
    symbol is still attended at the answer when its span plus the ramp R exceeds it), and the
    fillers' median span (against R + M), read by the trained model on ``episodes`` test
    episodes that follow a warm-up of ``eval_warmup`` tokens (the steady state evaluation
    scores)."""
    loaded = load_checkpoint(run_dir)
    task = loaded.run.build_task()
    opts = task.options
    length = task.episode_len
    total = opts.eval_warmup + (episodes + 2) * length
    tokens = task.batch("test", 0, range(1), total).tokens[0]
    spans = token_spans(loaded.model, tokens)  # [layers, T]
    ramp, block = loaded.model.config.ramp, loaded.model.config.block_len
    start = opts.eval_warmup
    # align to the first episode start after the warm-up: an episode starts after a GO run
    go = (tokens == task.go).nonzero().flatten()
    first = int(go[go >= start][0]) + opts.symbols + 1
    symbols, fillers = [], []
    for episode in range(episodes):
        base = first + episode * length
        symbols += list(range(base, base + opts.symbols))
        fillers += list(range(base + opts.symbols, base + opts.symbols + opts.gap))
    out = []
    for layer in range(spans.shape[0]):
        sym = spans[layer, symbols]
        fil = spans[layer, fillers]
        out.append({
            "layer": layer,
            "symbol_span_min": float(sym.min()),
            "symbol_span_median": float(sym.median()),
            "distance_to_answer": task.dependency_length,
            # a memory is still attended (m > 0) while its age is below e + R
            "symbols_visible_at_answer": bool(sym.min() + ramp > task.dependency_length),
            "filler_span_median": float(fil.median()),
            "filler_median_within_ramp_plus_block": bool(fil.median() <= ramp + block),
        })
    return out


def measure(symbols: int, gap: int, span: int, out: Path, seed: int,
            grace: int = 0, alpha: float | None = None) -> dict[str, Any]:
    overrides = ({"max_span": span} | ({"grace": grace} if grace else {})
                 | ({"alpha": alpha} if alpha is not None else {}))
    config = merge(get_preset(PRESET).config, {
        "task_options": {"symbols": symbols, "gap": gap}, "model": overrides,
        "train": {"seed": seed}})
    run_dir = out / run_name(symbols, gap, span)
    summary = train(config, run_dir)
    test = test_metrics(run_dir)
    model = summary["config"]["model"]
    return {
        "symbols": symbols, "gap": gap, "max_span": span, "block_len": model["block_len"],
        "accuracy": test["accuracy"], "avg_memory_size": test["memory_size"],
        "memory_over_dependency": test["memory_size"] / (symbols + gap),
        "steps": summary["steps"], "seconds": summary["train_seconds_this_session"],
        "selectivity": selectivity(run_dir),
        "settings": {name: model[name] for name in
                     ("ramp", "alpha", "init_percentage", "pre_div", "span_loss", "noisy",
                      "grace")}
                    | {name: summary["config"]["train"][name] for name in
                       ("aux_hold", "aux_hold_until", "aux_ramp", "lr", "batch_size", "seq_len",
                        "seed")},
        "run": str(run_dir),
    }


def markdown(records: list[dict[str, Any]]) -> str:
    """The table docs/results.md shows (every figure from ``records``)."""
    lines = ["| K | D | L | test accuracy | avg memory size | memory / (K + D) | limit "
             "| layer-0 symbol span min (+R) vs K + D | filler median span (layer 0 / 1) "
             "| steps | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["gap"], r["symbols"], r["max_span"])):
        limit = 0.5 if r["gap"] < 400 else 0.25
        layers = r["selectivity"]
        ramp = r["settings"]["ramp"]
        fillers = " / ".join(f"{layer['filler_span_median']:.1f}" for layer in layers)
        lines.append(
            f"| {r['symbols']} | {r['gap']} | {r['max_span']} | {r['accuracy']:.3f} "
            f"| {r['avg_memory_size']:.1f} | {r['memory_over_dependency']:.2f} | {limit} "
            f"| {layers[0]['symbol_span_min']:.0f} (+{ramp}) vs {r['symbols'] + r['gap']} "
            f"| {fillers} "
            f"| {r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, metavar="K,D,L",
                        help="run these configurations only (default: the whole grid; "
                        "--only with no value trains nothing and just gathers --record)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of every run (the recorded grid used 0)")
    parser.add_argument("--grace", type=int, default=0,
                        help="Expire-Span's grace G for every run (default 0: off, as in the grid "
                        "of record)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="Expire-Span's alpha for every run (default: the span rule's)")
    parser.add_argument("--out", default="runs/copy-robustness")
    parser.add_argument("--record", default=None,
                        help="write every finished configuration under --out to this JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = GRID if args.only is None else [tuple(int(v) for v in item.split(","))
                                           for item in args.only]
    out = Path(args.out)
    for symbols, gap, span in grid:
        record = measure(symbols, gap, span, out, args.seed, args.grace, args.alpha)
        print(json.dumps({k: v for k, v in record.items() if k != "settings"}), flush=True)
    if args.record:
        done = [(k, d, s) for k, d, s in GRID
                if (out / run_name(k, d, s) / "summary.json").exists()]
        records = [measure(k, d, s, out, args.seed, args.grace, args.alpha) for k, d, s in done]
        Path(args.record).write_text(json.dumps(records, indent=2) + "\n")
        print(f"{len(records)} configurations written to {args.record}")
        print(markdown(records))


if __name__ == "__main__":
    main()
