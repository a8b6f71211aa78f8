"""Training-step cost: our Expire-Span and Transformer-XL beside `x-transformers`' XL recurrence.

One training step is forward, backward and an Adam step on a block of M tokens per row, with the
memory full (ours primed with ``L + R`` states by the bench's ``primed_memory``, x-transformers'
with ``max_mem_len`` random states per layer) and carried from step to step. For every L:

- ``expire-span r=R``: ours at controlled retention r (``set_retention``, as in ``expire-span
  bench``); its average memory size is measured on warm-up steps;
- ``xl matched r=R``: our Transformer-XL whose window is that memory size, and ``x-xl matched
  r=R``: x-transformers with ``max_mem_len`` equal to it;
- with ``--full``: ``xl L`` and ``x-xl L``, both at the window L.

The figure is the CPU time per step (one thread), the median of ``--repeats`` steps interleaved
across the cases of one L; the ratios are printed and written as JSON.

    OMP_NUM_THREADS=1 python benchmarks/train_vs_peers.py --spans 1024 4096 16384 \\
        --retentions 0.05 0.25 --full 1024 4096 --out docs/results/train-vs-peers.json
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peers import (
    add_common_arguments,
    cpu_seconds,
    interleaved,
    machine,
    medians,
    one_thread,
    write_json,
    xtransformers_xl,
)

from expire_span import MemoryTransformer, ModelConfig
from expire_span.benchmarking import primed_memory, set_retention

VOCAB = 256


def tokens(generator: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, VOCAB, (args.batch, args.block_len + 1), generator=generator)


def ours(memory: str, span: int, retention: float | None, args: argparse.Namespace
         ) -> tuple[Callable[[], float], list[float]]:
    """A training step of our model; also returns the list its memory sizes are appended to."""
    torch.manual_seed(args.seed)
    model = MemoryTransformer(ModelConfig(
        vocab_size=VOCAB, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        block_len=args.block_len, max_span=span, memory=memory, ramp=args.ramp))
    if retention is not None:
        set_retention(model, retention, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    state = {"memory": primed_memory(model, args.batch, generator)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    sizes: list[float] = []
    model.train()

    def step() -> float:
        batch = tokens(generator, args)

        def work() -> None:
            out = model(batch[:, :-1], state["memory"])
            loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            optimizer.step()
            model.after_optimizer_step()
            state["memory"] = out.memory
            sizes.append(float(out.memory_size.mean()))

        return 1000 * cpu_seconds(work)[0]

    return step, sizes


def peer(max_mem_len: int, args: argparse.Namespace) -> Callable[[], float]:
    """A training step of x-transformers' XL recurrence with ``max_mem_len`` memories."""
    torch.manual_seed(args.seed)
    model = xtransformers_xl(args.layers, args.d_model, args.heads, VOCAB, args.block_len,
                             max_mem_len).train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    state = {"mems": [0.02 * torch.randn(args.batch, max_mem_len, args.d_model, generator=generator)
                      for _ in range(args.layers)]}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        batch = tokens(generator, args)

        def work() -> None:
            logits, mems = model(batch[:, :-1], mems=state["mems"], return_mems=True)
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["mems"] = mems

        return 1000 * cpu_seconds(work)[0]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--spans", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.05, 0.25])
    parser.add_argument("--full", type=int, nargs="*", default=[1024, 4096],
                        help="the L at which XL with window L is also compared")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    one_thread()

    record = {"args": vars(args), "machine": machine(), "results": {}}
    lines = []
    for span in args.spans:
        cases: dict[str, Callable[[], float]] = {}
        for retention in args.retentions:
            step, sizes = ours("expire-span", span, retention, args)
            for _ in range(args.warmup):
                step()
            window = max(args.block_len, round(sum(sizes) / len(sizes)))
            cases[f"expire-span r={retention:g}"] = step
            cases[f"xl matched r={retention:g}"] = ours("transformer-xl", window, None, args)[0]
            cases[f"x-xl matched r={retention:g}"] = peer(window, args)
            record["results"].setdefault(str(span), {})[f"window r={retention:g}"] = window
        if span in args.full:
            cases["xl L"] = ours("transformer-xl", span, None, args)[0]
            cases["x-xl L"] = peer(span, args)
        for name, case in cases.items():
            if not name.startswith("expire-span"):
                for _ in range(args.warmup):
                    case()
        print(f"L={span}: CPU ms per training step (batch {args.batch}, M={args.block_len})")
        figures = interleaved(cases, args.repeats)
        summary = medians(figures)
        record["results"][str(span)].update({"cpu_ms_per_step": summary, "all": figures})
        for retention in args.retentions:
            es, xl, peer_xl = (summary[f"{kind} r={retention:g}"]
                               for kind in ("expire-span", "xl matched", "x-xl matched"))
            window = record["results"][str(span)][f"window r={retention:g}"]
            lines.append(f"L={span}, r={retention:g} (window {window}): ES {es:.0f} ms, "
                         f"ES / XL(window) {es / xl:.2f}x; x-xl(window) / ES {peer_xl / es:.2f}x, "
                         f"x-xl(window) / XL(window) {peer_xl / xl:.2f}x")
        if "xl L" in summary:
            lines.append(f"L={span}: XL(L) {summary['xl L']:.0f} ms, x-xl(L) / XL(L) "
                         f"{summary['x-xl L'] / summary['xl L']:.2f}x")
        print("\n".join(lines[-len(args.retentions) - ("xl L" in summary):]))
        del cases
        gc.collect()
    print("\n".join(lines))
    record["ratios"] = lines
    write_json(args.out, record)


if __name__ == "__main__":
    main()
