"""Per-token cost of streaming generation over a long run: Expire-Span vs Transformer-XL.

Both models have the same architecture and maximum span L; Expire-Span is set to controlled
retention r (a random r-fraction of the vocabulary lives L steps, the rest expires at once, see
``expire_span.benchmarking.set_retention``). Each generates ``--tokens`` tokens one at a
time after a short prompt; every ``--window`` tokens the script records the mean time per token,
the process's resident memory and the number of cached memories. Time is reported both as wall
time and as the process's CPU time (``time.process_time``; with ``OMP_NUM_THREADS=1`` the compute
a token costs, unaffected by other jobs sharing the machine); the plot shows CPU time. It prints
a summary and writes a plot and the raw series as JSON.

    OMP_NUM_THREADS=1 python benchmarks/generation_cost.py --tokens 100000 \\
        --baseline-tokens 20000 --out docs/images/generation-cost.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from expire_span import MemoryTransformer, ModelConfig  # noqa: E402
from expire_span.benchmarking import rss_mb, set_retention  # noqa: E402
from expire_span.model import generate_stream  # noqa: E402


def series(model: MemoryTransformer, tokens: int, window: int, seed: int) -> dict[str, list]:
    prompt = torch.randint(0, model.config.vocab_size, (1, model.config.block_len),
                           generator=torch.Generator().manual_seed(seed))
    out: dict[str, list] = {"tokens": [], "ms_per_token": [], "cpu_ms_per_token": [],
                            "rss_mb": [], "cache": []}
    started, cpu_started, count = time.perf_counter(), time.process_time(), 0
    for step in generate_stream(model, prompt, tokens, temperature=1.0, seed=seed):
        count += 1
        if count % window == 0:
            now, cpu_now = time.perf_counter(), time.process_time()
            out["tokens"].append(count)
            out["ms_per_token"].append(1000 * (now - started) / window)
            out["cpu_ms_per_token"].append(1000 * (cpu_now - cpu_started) / window)
            out["rss_mb"].append(rss_mb())
            out["cache"].append(float(step.memory.sizes.float().mean()))
            started, cpu_started = now, cpu_now
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--baseline-tokens", type=int,
                        help="tokens for Transformer-XL (default: --tokens); its window is full "
                        "after L tokens, so its cost is steady from there on")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--max-span", type=int, default=2048)
    parser.add_argument("--retention", type=float, default=0.05)
    parser.add_argument("--out", default="runs/generation_cost.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    for memory in ("expire-span", "transformer-xl"):
        torch.manual_seed(args.seed)
        config = ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, block_len=64,
                             max_span=args.max_span, memory=memory, ramp=32)
        model = MemoryTransformer(config).eval()
        if memory == "expire-span":
            set_retention(model, args.retention, args.seed)
        count = args.tokens if memory == "expire-span" else args.baseline_tokens or args.tokens
        results[memory] = series(model, count, args.window, args.seed)
        data = results[memory]
        print(f"{memory}: CPU ms/token first window {data['cpu_ms_per_token'][0]:.2f}, "
              f"last {data['cpu_ms_per_token'][-1]:.2f} (wall {data['ms_per_token'][0]:.2f}, "
              f"{data['ms_per_token'][-1]:.2f}); cache {data['cache'][-1]:.0f}; "
              f"RSS {data['rss_mb'][0]:.0f} -> {data['rss_mb'][-1]:.0f} MB")

    figure, (time_axis, cache_axis, rss_axis) = plt.subplots(1, 3, figsize=(14, 3.8))
    for memory, data in results.items():
        label = (f"expire-span (r={args.retention:g})" if memory == "expire-span" else memory)
        time_axis.plot(data["tokens"], data["cpu_ms_per_token"], label=label)
        cache_axis.plot(data["tokens"], data["cache"], label=label)
        rss_axis.plot(data["tokens"], data["rss_mb"], label=label)
    for axis, title in ((time_axis, "CPU ms per generated token"),
                        (cache_axis, "memories per layer"),
                        (rss_axis, "process resident memory (MB)")):
        axis.set_title(title)
        axis.set_xlabel("tokens generated")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    time_axis.legend()
    figure.suptitle(f"streaming generation, L={args.max_span}, 4 layers, d=128, batch 1, CPU")
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "series": results}))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
