"""Figures of a run: loss curves and the token-length histogram, drawn off screen.

matplotlib is imported only here and only when a figure is drawn; each figure gets its own Agg canvas, so nothing
depends on a display or on pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_losses(log_history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Train loss and eval loss against the optimizer step, from `trainer.state.log_history`.

    Args:
        log_history: Trainer log entries; those with `loss` are training logs, those with `eval_loss` evaluations.
        path: the PNG to write (e.g. RUN/loss.png).

    Returns:
        The path written.
    """
    figure = _figure()
    axes = figure.subplots()
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, style, label=label)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlabel="step", ylabel="loss (nats per token)", title="Loss")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_length_histogram(lengths: Sequence[int], max_length: int, path: str | Path, bins: int = 40) -> Path:
    """Histogram of tokens per record (before truncation), with max_length marked: what lies right of it is cut.

    Returns:
        The path written.
    """
    figure = _figure()
    axes = figure.subplots()
    axes.hist(lengths, bins=bins, color="tab:blue", alpha=0.8)
    axes.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length = {max_length}")
    axes.set(xlabel="tokens per record", ylabel="records", title=f"Token lengths ({len(lengths)} records)")
    axes.legend()
    return _save(figure, path)


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target
