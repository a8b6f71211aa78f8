"""``expire-span generate``: continue a prompt with a trained text model, streaming the text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from expire_span.model import generate_stream
from expire_span.training import load_checkpoint
from expire_span.training.loop import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expire-span generate",
        description="Read a prompt, then sample tokens one at a time with the memory carried "
        "and pruned as it expires; the text is printed as it is produced.",
    )
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="make sampling reproducible")
    parser.add_argument("--device", default="auto")
    return parser


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = _prompt(args)
    if not text:
        raise ValueError("the prompt is empty: give at least one character")
    loaded = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    codec = loaded.run.text_codec()
    unknown = sorted({char for char in text if codec.decode(codec.encode(char)) != char})
    if unknown:
        raise ValueError(f"the prompt holds characters the model never saw in training: "
                         f"{''.join(unknown)!r}")
    prompt = torch.tensor(codec.encode(text), dtype=torch.long)
    pending: list[int] = []
    banned = [] if codec.unknown_id is None else [codec.unknown_id]
    for step in generate_stream(loaded.model, prompt, args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, banned=banned):
        pending.append(int(step.tokens[0]))
        piece = codec.decode(pending)
        if not piece.endswith("\ufffd") or len(pending) >= 4:  # wait for whole UTF-8 characters
            sys.stdout.write(piece)
            sys.stdout.flush()
            pending = []
    sys.stdout.write(codec.decode(pending) + "\n")
    return 0
