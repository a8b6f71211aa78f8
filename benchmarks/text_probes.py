"""Probes of a trained character-level Expire-Span model (issue 16, item 4b-c): the inference-time
cut of L, the mean span of each word class, and a name inserted twice into a passage.

    OMP_NUM_THREADS=1 python benchmarks/text_probes.py --checkpoint runs/text-es \\
        --out docs/results/text-probes.json --image docs/images/text-probe-name.png

Reads the first ``--rows x --row-chars`` characters of the test split as ``--rows`` streams (each
from an empty memory), once with the trained spans and once per cut with every span capped at
``L / k``; prints Markdown tables and writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from expire_span.analysis import render_png
from expire_span.analysis.spans import stream
from expire_span.analysis.text_probes import (
    NATS_PER_BIT,
    capped_spans,
    character_classes,
    class_spans,
    cut_effect,
    names,
    nll_bits,
    word_counts,
)
from expire_span.training import load_checkpoint

NAME = "Humpty Dumpty"


def decoded(codec, tokens) -> str:
    return codec.decode(tokens.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run of --task text (expire-span)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--row-chars", type=int, default=4096)
    parser.add_argument("--cuts", type=int, nargs="+", default=[16, 4],
                        help="evaluate with spans capped at L / k for each k")
    parser.add_argument("--gap", type=int, default=600,
                        help="characters between the two occurrences of the inserted name")
    parser.add_argument("--out", default=None, help="JSON file for every figure")
    parser.add_argument("--image", default=None, help="PNG heat map of the name probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    model, run = loaded.model, loaded.run
    if run.task != "text":
        raise SystemExit(f"needs a checkpoint of --task text, not {run.task!r}")
    task, codec = run.build_task(), run.text_codec()
    L = model.config.max_span
    test = task.load_documents("test")
    start, count = int(test.bounds[0]), args.rows * args.row_chars
    if int(test.bounds[-1]) - start < count:
        raise SystemExit(f"the test split holds fewer than {count} characters")
    rows = torch.as_tensor(test.tokens[start:start + count].astype("int64")).view(args.rows, -1)
    train = task.load_documents("train")
    train_text = decoded(codec, train.tokens[int(train.bounds[0]):int(train.bounds[-1])])
    counts, known_names = word_counts(train_text), names(train_text)
    text = decoded(codec, rows.flatten())
    classes = character_classes(text, counts, known_names)
    targets = [kind for r in range(args.rows)
               for kind in classes[r * args.row_chars + 1:(r + 1) * args.row_chars]]

    full, spans = stream(model, rows)
    record = {"checkpoint": str(loaded.path), "max_span": L, "characters": count,
              "rows": args.rows, "bpc": nll_bits(full), "cuts": []}
    print(f"{loaded.path}: L = {L}, {count} test characters in {args.rows} streams, "
          f"{nll_bits(full):.4f} bpc with the trained spans")
    print("\n| spans capped at | bpc | mean change (bits) | top 1%: mean change | top 1%: share of "
          "the rise | top 1%: classes |\n|---|---|---|---|---|---|")
    for k in args.cuts:
        with capped_spans(model, L / k):
            cut, _ = stream(model, rows)
        effect = cut_effect(full, cut)
        order = (cut - full).flatten().argsort(descending=True)[:effect["top_tokens"]]
        top_classes = Counter(targets[i] for i in order.tolist())
        examples = []
        for index in order[:8].tolist():
            r, t = divmod(index, args.row_chars - 1)
            context = decoded(codec, rows[r, max(0, t - 40):t + 1])
            examples.append({"context": context, "next": decoded(codec, rows[r, t + 1:t + 2]),
                             "change_bits": float((cut - full)[r, t]) / NATS_PER_BIT})
        share = {kind: n / effect["top_tokens"] for kind, n in top_classes.most_common()}
        record["cuts"].append({"cap": L / k, "fraction": 1 / k, "bpc": nll_bits(cut), **effect,
                               "top_classes": share, "examples": examples})
        shown = ", ".join(f"{kind} {v:.0%}" for kind, v in list(share.items())[:3])
        print(f"| L/{k} = {L / k:.0f} | {nll_bits(cut):.4f} | {effect['mean_change_bits']:+.4f} | "
              f"{effect['top_mean_change_bits']:+.3f} | {effect['top_share_of_rise']:.0%} | "
              f"{shown} |")
    everything = Counter(targets)
    record["all_classes"] = {kind: n / len(targets) for kind, n in everything.most_common()}
    print("\nclasses of all scored characters: " + ", ".join(
        f"{kind} {v:.0%}" for kind, v in record["all_classes"].items()))

    table = class_spans(spans.flatten(1), classes)
    record["classes"] = table
    layers = spans.shape[0]
    print("\n| class | characters | " + " | ".join(f"layer {i} mean span" for i in range(layers))
          + " |\n|---|---|" + "---|" * layers)
    for row in table:
        print(f"| {row['class']} | {row['characters']} | " + " | ".join(
            f"{row[f'layer_{i}_mean_span']:.1f}" for i in range(layers)) + " |")

    record["name_probe"] = name_probe(model, codec, text, args.gap, args.image, L)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {args.out}")


def name_probe(model, codec, text: str, gap: int, image: str | None, L: int) -> dict:
    """A passage of test text with NAME after its first 200 characters and again ``gap``
    characters later: the spans of the first occurrence, and the loss of the second with the
    trained spans and with spans capped below the gap."""
    passage = (text[:200] + f" {NAME} " + text[200:200 + gap] + f" {NAME}")
    first = passage.index(NAME)
    second = passage.rindex(NAME)
    tokens = torch.as_tensor(codec.encode(passage).astype("int64"))[None]
    losses = {}
    for label, cap in (("trained", None), ("capped_below_gap", gap / 2)):
        with capped_spans(model, cap):
            nll, spans = stream(model, tokens)
        # characters 2.. of the second occurrence: the first letter cannot be predicted
        losses[label] = nll_bits(nll[0, second:second + len(NAME) - 1])
        if cap is None:
            trained = spans[:, 0]
    name_spans = trained[:, first:first + len(NAME)].mean(dim=1)
    result = {"passage_chars": len(passage), "gap": second - first, "cap": gap / 2,
              "name_mean_span": name_spans.tolist(),
              "passage_mean_span": trained.mean(dim=1).tolist(),
              "second_name_bits": losses}
    print(f"\nname probe ({NAME!r} twice, {second - first} characters apart): mean span of the "
          f"first occurrence per layer {[round(v, 1) for v in name_spans.tolist()]} vs the "
          f"passage's {[round(v, 1) for v in trained.mean(dim=1).tolist()]}; the second "
          f"occurrence costs {losses['trained']:.3f} bits per character with the trained spans, "
          f"{losses['capped_below_gap']:.3f} with spans capped at {gap / 2:.0f}")
    if image:
        labels = [codec.decode([t]) for t in tokens[0].tolist()]
        render_png(labels, trained, L, Path(image), f"{NAME!r} inserted twice", columns=100)
        print(f"wrote {image}")
    return result


if __name__ == "__main__":
    main()
