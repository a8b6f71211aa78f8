"""What the peer comparisons share: the peers' models, one-thread CPU timing, the machine.

The peers are Hugging Face ``transformers`` GPT-2 (decoding with its KV cache) and
``x-transformers``' Transformer-XL recurrence (rotary positions, ``max_mem_len`` = L); both come
with the optional ``bench`` extra (``pip install -e '.[bench]'``) and the tests never need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What both peer comparisons take: the model shape (ours and the peer get the same one),
    the interleaved repeats, the seed and the JSON output."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-len", type=int, default=64)
    parser.add_argument("--ramp", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures to this JSON file")


def one_thread() -> None:
    """Time the compute a step costs: one thread, so CPU time is not spread over cores."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def cpu_seconds(work: Callable[[], Any]) -> tuple[float, Any]:
    """CPU time of ``work()`` in this process (with one thread: unaffected by other jobs)."""
    started = time.process_time()
    result = work()
    return time.process_time() - started, result


def interleaved(cases: dict[str, Callable[[], float]], repeats: int,
                echo: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Run every case once per repeat, in turn, so a change of machine load hits them all;
    each case returns its own figure (e.g. CPU ms per token)."""
    figures: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(repeats):
        for name, case in cases.items():
            figures[name].append(case())
            echo(f"  repeat {repeat + 1}/{repeats} {name}: {figures[name][-1]:.3f}")
    return figures


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in figures.items()}


def gpt2(n_layers: int, d_model: int, n_heads: int, vocab_size: int, positions: int):
    """``transformers``' GPT-2 of the given size (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab_size,
                        n_positions=positions, use_cache=True)
    return GPT2LMHeadModel(config).eval()


def xtransformers_xl(n_layers: int, d_model: int, n_heads: int, vocab_size: int, block_len: int,
                     max_mem_len: int):
    """``x-transformers``' decoder with Transformer-XL recurrence and rotary positions."""
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=vocab_size, max_seq_len=block_len, max_mem_len=max_mem_len,
        attn_layers=Decoder(dim=d_model, depth=n_layers, heads=n_heads, rotary_pos_emb=True),
    )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib.metadata import version

    import transformers
    import x_transformers  # noqa: F401  (its version is in the package metadata)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "x_transformers": version("x-transformers"), "threads": torch.get_num_threads()}


def write_json(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")
