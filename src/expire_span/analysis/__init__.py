"""Looking inside trained models and runs: per-token spans, heat maps, training curves."""

from expire_span.analysis.curves import plot_run, read_metrics
from expire_span.analysis.spans import render_html, render_png, token_spans

__all__ = ["plot_run", "read_metrics", "render_html", "render_png", "token_spans"]
