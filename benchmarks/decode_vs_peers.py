"""Decoding cost per token: our Transformer-XL and Expire-Span beside `transformers`' GPT-2.

Every model has the same shape (layers, width, heads, vocabulary 256). Each reads a random prompt
and then samples ``--new-tokens`` tokens one at a time (softmax sampling, temperature 1): GPT-2
through its KV cache (its context grows to prompt + new tokens), ours through
``generate_stream`` (one call per token, pruned memory, key/value cache). The figure is the CPU
time per new token (one thread; the prompt is not counted), the median of ``--repeats`` runs
interleaved across the models; the ratios to GPT-2 are printed and written as JSON.

Expire-Span is either a fresh model (``--retention`` not given: every span starts at
``init_percentage * L``) or set to a controlled retention r by the bench's mechanism
(``set_retention``: the span predictor reads an embedding channel that a random r-fraction of the
vocabulary sets high, so those tokens live L steps and the rest expire at once); it is not a
trained model.

    OMP_NUM_THREADS=1 python benchmarks/decode_vs_peers.py --batch 1 8 \\
        --out docs/results/decode-vs-peers-small.json
    OMP_NUM_THREADS=1 python benchmarks/decode_vs_peers.py --layers 8 --d-model 512 --heads 8 \\
        --prompt 4096 --new-tokens 256 --max-span 4096 --retention 0.1 --batch 1 8 \\
        --out docs/results/decode-vs-peers-large.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from peers import (
    add_common_arguments,
    cpu_seconds,
    gpt2,
    interleaved,
    machine,
    medians,
    one_thread,
    write_json,
)

from expire_span import MemoryTransformer, ModelConfig
from expire_span.benchmarking import set_retention
from expire_span.model import generate_stream

VOCAB = 256


def gpt2_case(model, prompt: torch.Tensor, new_tokens: int, seed: int) -> Callable[[], float]:
    def run() -> float:
        generator = torch.Generator().manual_seed(seed)

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)

        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            tokens = sample(out.logits[:, -1])

            def decode() -> None:
                nonlocal out, tokens
                for _ in range(new_tokens):
                    out = model(input_ids=tokens, past_key_values=out.past_key_values,
                                use_cache=True)
                    tokens = sample(out.logits[:, -1])

            seconds, _ = cpu_seconds(decode)
        return 1000 * seconds / new_tokens

    return run


def ours_case(model: MemoryTransformer, prompt: torch.Tensor, new_tokens: int, seed: int,
              sizes: list[float]) -> Callable[[], float]:
    def run() -> float:
        stream = generate_stream(model, prompt, new_tokens + 1, temperature=1.0, seed=seed)
        next(stream)  # the prompt, read in blocks, and the first sample: not counted
        seconds, last = cpu_seconds(lambda: [step for step in stream][-1])
        sizes.append(float(last.memory.sizes.float().mean()))
        return 1000 * seconds / new_tokens

    return run


def ours(memory: str, args: argparse.Namespace) -> MemoryTransformer:
    torch.manual_seed(args.seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=args.d_model, n_layers=args.layers,
                         n_heads=args.heads, block_len=args.block_len, max_span=args.max_span,
                         memory=memory, ramp=args.ramp)
    model = MemoryTransformer(config).eval()
    if memory == "expire-span" and args.retention is not None:
        set_retention(model, args.retention, args.seed)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--max-span", type=int, default=1024, help="L of our models")
    parser.add_argument("--retention", type=float,
                        help="Expire-Span at this controlled retention (default: fresh model)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=["gpt2", "transformer-xl", "expire-span"])
    args = parser.parse_args()
    one_thread()

    record = {"args": vars(args), "machine": machine(), "results": {}}
    for batch in args.batch:
        prompt = torch.randint(0, VOCAB, (batch, args.prompt),
                               generator=torch.Generator().manual_seed(args.seed))
        cases, sizes = {}, {}
        for name in args.models:
            if name == "gpt2":
                peer = gpt2(args.layers, args.d_model, args.heads, VOCAB,
                            args.prompt + args.new_tokens + 1)
                cases[name] = gpt2_case(peer, prompt, args.new_tokens, args.seed)
            else:
                sizes[name] = []
                cases[name] = ours_case(ours(name, args), prompt, args.new_tokens, args.seed,
                                        sizes[name])
        print(f"batch {batch}: CPU ms per token")
        figures = interleaved(cases, args.repeats)
        summary = medians(figures)
        record["results"][str(batch)] = {"cpu_ms_per_token": summary, "all": figures,
                                         "memories_per_layer": {k: v[-1] for k, v in sizes.items()}}
        for name, value in summary.items():
            ratio = f", {value / summary['gpt2']:.2f}x GPT-2" if "gpt2" in summary else ""
            kept = f" ({sizes[name][-1]:.0f} memories per layer)" if name in sizes else ""
            print(f"batch {batch}, {name}: {value:.2f} ms/token{ratio}{kept}")
    write_json(args.out, record)


if __name__ == "__main__":
    main()
