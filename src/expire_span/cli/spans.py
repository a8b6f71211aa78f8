"""``expire-span spans``: the expire-span of every character of a text, as a PNG and HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from expire_span.analysis import render_html, render_png, token_spans
from expire_span.training import load_checkpoint
from expire_span.training.loop import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expire-span spans",
        description="Render the span an Expire-Span model gives each character of a text, per "
        "layer: a PNG heat map and a self-contained HTML page (value on hover).",
    )
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint")
    parser.add_argument("--text", required=True, help="UTF-8 text file to read")
    parser.add_argument("--out", default="spans", help="output prefix (writes .png and .html)")
    parser.add_argument("--max-chars", type=int, default=2000,
                        help="read at most this many characters (the PNG grows with the text)")
    parser.add_argument("--columns", type=int, default=80, help="characters per line in the PNG")
    parser.add_argument("--device", default="auto")
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")[: args.max_chars]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    if not text:
        raise ValueError(f"{path} is empty")
    loaded = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    codec = loaded.run.text_codec()
    tokens = codec.encode(text).tolist()
    spans = token_spans(loaded.model, torch.tensor(tokens, dtype=torch.long))
    labels = [codec.decode([token]) for token in tokens]
    max_span = loaded.model.config.max_span
    title = f"{path.name}: expire-spans of {loaded.path}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_png(labels, spans, max_span, out.with_suffix(".png"), title, args.columns)
    render_html(labels, spans, max_span, out.with_suffix(".html"), title)
    for layer, row in enumerate(spans):
        print(f"layer {layer}: mean span {row.mean():.1f}, max {row.max():.1f} of L={max_span}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.html')}")
    return 0
