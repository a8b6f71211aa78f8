"""Does a trained copy model need the fillers it keeps? Evaluate a copy checkpoint with the span
of the filler token in its first layer replaced by fixed values (every other span as predicted).

The first layer's span is a function of the token embedding alone, so every filler there has one
span. If accuracy holds with short filler spans, the kept fillers are an equilibrium of the
optimisation, not a need of the solution; if it falls, the model uses them.

    OMP_NUM_THREADS=1 python benchmarks/copy_filler_ablation.py \\
        --checkpoint runs/copy-robustness/k16-d400-l1024 --spans 200 100 48 16 \\
        --out docs/results/copy-filler-ablation-k16-d400.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from expire_span.training import evaluate_run, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--spans", type=float, nargs="+", required=True,
                        help="filler spans to evaluate with (the model's own is evaluated first)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    model, run = loaded.model, loaded.run
    if run.task != "copy" or model.config.memory != "expire-span":
        raise SystemExit("needs an expire-span checkpoint of the copy task")
    task = run.build_task()
    predictor = model.layers[0].policy.span_predictor
    captured = []
    probe = predictor.register_forward_hook(lambda module, inputs, spans: captured.append(spans))
    with torch.no_grad():
        model.eval()(torch.full((1, 1), task.filler, dtype=torch.long))
    probe.remove()
    own = float(captured[0][0, -1])
    state: dict[str, float | None] = {"span": None}

    def override(module, inputs, spans):  # the first layer's fillers all have the span `own`
        if state["span"] is None:
            return spans
        return torch.where((spans - own).abs() < 1e-3, torch.full_like(spans, state["span"]),
                           spans)

    predictor.register_forward_hook(override)
    rows = []
    for span in [None, *args.spans]:
        state["span"] = span
        metrics = evaluate_run(model, run, args.split, batch_size=run.eval_batch_size,
                               batches=run.train.eval_batches)
        row = {"filler_span": own if span is None else span, "own": span is None,
               "accuracy": metrics["accuracy"], "memory_size": metrics["memory_size"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        record = {"checkpoint": str(loaded.path), "layer": 0, "split": args.split,
                  "symbols": task.options.symbols, "gap": task.options.gap, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
