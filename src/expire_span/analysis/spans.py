"""What a trained Expire-Span model remembers: the span it gives each token in each layer.

The spans are read from the model's own span predictors while it reads the text block by block,
exactly as during evaluation, so they are the values that decided what was kept.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch
from torch import Tensor

from expire_span.model import MemoryTransformer
from expire_span.policies.expire_span import ExpireSpanPolicy


def expire_span_policies(model: MemoryTransformer) -> list[ExpireSpanPolicy]:
    """The model's layer policies; ``ValueError`` unless every layer is Expire-Span."""
    policies = [layer.policy for layer in model.layers]
    if not all(isinstance(policy, ExpireSpanPolicy) for policy in policies):
        raise ValueError(
            f"span analysis needs an expire-span model; this one uses {model.config.memory!r}"
        )
    return policies


@torch.no_grad()
def stream(model: MemoryTransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Read ``tokens`` (``[B, T]``, each row one stream from an empty memory) block by block as
    evaluation does; return the next-token losses in nats (``[B, T - 1]``, position ``t``
    predicts token ``t + 1``) and every token's span in every layer (``[n_layers, B, T]``)."""
    policies = expire_span_policies(model)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError("stream expects [B, T] token ids with T >= 1")
    was_training = model.training
    model.eval()
    captured: list[list[Tensor]] = [[] for _ in policies]
    block_length = [0]

    def hook_for(index: int):
        def hook(module, inputs, output):  # output: [B, N] spans of [memory; block]
            captured[index].append(output[:, -block_length[0]:])
        return hook

    handles = [policy.span_predictor.register_forward_hook(hook_for(i))
               for i, policy in enumerate(policies)]
    losses = []
    try:
        memory = None
        tokens = tokens.to(model.device)
        for block in tokens.split(model.config.block_len, dim=1):
            block_length[0] = block.shape[1]
            out = model(block, memory)
            memory = out.memory
            losses.append(out.logits.float().log_softmax(-1))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    log_probs = torch.cat(losses, dim=1)[:, :-1]
    nll = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    spans = torch.stack([torch.cat(parts, dim=1) for parts in captured])
    return nll.cpu(), spans.float().cpu()


def token_spans(model: MemoryTransformer, tokens: Tensor) -> Tensor:
    """``[n_layers, T]`` expire-span of every token of ``tokens`` (``[T]``) in every layer."""
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError("token_spans expects a non-empty 1-D sequence of token ids")
    return stream(model, tokens.unsqueeze(0))[1][:, 0]


def colour_scale(spans: Tensor) -> float:
    """The top of the colour scale: the largest span shown (spans of a short run are far below L,
    and a 0..L scale would paint them all alike)."""
    return max(float(spans.max()), 1.0)


def _colours(spans: Tensor, top: float) -> list[list[tuple[int, int, int]]]:
    import matplotlib

    colormap = matplotlib.colormaps["viridis"]
    values = (spans / top).clamp(0, 1).tolist()
    return [[tuple(int(255 * c) for c in colormap(v)[:3]) for v in row] for row in values]


def render_html(text: list[str], spans: Tensor, max_span: int, path: Path, title: str) -> None:
    """A self-contained page: one section per layer, every character coloured by its span, the
    value shown on hover."""
    top = colour_scale(spans)
    colours = _colours(spans, top)
    sections = []
    for layer, row in enumerate(colours):
        cells = []
        for char, (r, g, b), value in zip(text, row, spans[layer].tolist(), strict=True):
            ink = "#000" if (r * 299 + g * 587 + b * 114) > 128000 else "#fff"
            shown = html.escape(char) if char not in ("\n", " ") else ("&#9166;<br>"
                                                                      if char == "\n" else " ")
            cells.append(f'<span style="background:rgb({r},{g},{b});color:{ink}" '
                         f'title="layer {layer}: span {value:.0f}">{shown}</span>')
        mean = float(spans[layer].mean())
        sections.append(f"<h2>layer {layer} <small>(mean span {mean:.0f} of L={max_span})"
                        f"</small></h2>\n<p class=t>{''.join(cells)}</p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .t{{font-family:monospace;font-size:15px;
line-height:1.6;white-space:pre-wrap;word-break:break-all}} .t span{{padding:1px 0}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Each character is coloured by the expire-span the model predicted for it (dark: forgotten at
once, bright: the longest span on this page, {top:.0f} steps; the model's maximum is
L={max_span}). Hover a character for its value.</p>
{chr(10).join(sections)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def render_png(text: list[str], spans: Tensor, max_span: int, path: Path, title: str,
               columns: int = 80) -> None:
    """A heat map over the text, one panel per layer, ``columns`` characters per line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length = spans.shape
    lines = -(-length // columns)
    top = colour_scale(spans)
    figure, axes = plt.subplots(layers, 1, squeeze=False, layout="constrained",
                                figsize=(columns * 0.13 + 1.5, layers * (lines * 0.2 + 0.6)))
    grid = torch.full((lines * columns,), float("nan"))
    for layer in range(layers):
        axis = axes[layer, 0]
        grid[:length] = spans[layer]
        image = axis.imshow(grid.view(lines, columns).numpy(), cmap="viridis", vmin=0,
                            vmax=top, aspect="auto", interpolation="nearest")
        for index, char in enumerate(text):
            if char.strip():
                value = float(spans[layer, index]) / top
                axis.text(index % columns, index // columns, char, ha="center", va="center",
                          fontsize=6, family="monospace",
                          color="black" if value > 0.6 else "white")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"layer {layer}", fontsize=9, loc="left")
        figure.colorbar(image, ax=axis, fraction=0.02, pad=0.01, label=f"span (L={max_span})")
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=130)
    plt.close(figure)
