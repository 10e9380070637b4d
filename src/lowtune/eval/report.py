"""report.md of a run: what was trained, on what data, how the loss went, and what the model now answers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lowtune.config import RunConfig
from lowtune.eval.inspect import HISTOGRAM_FILE_NAME, DataReport
from lowtune.eval.plots import plot_length_histogram, plot_losses

REPORT_FILE_NAME = "report.md"
LOSS_FIGURE_NAME = "loss.png"
# lowtune.recipe.SUMMARY_FILE_NAME; not imported, as the recipe imports this module.
SUMMARY_FILE_NAME = "run_summary.json"


def write_report(
    run_dir: str | Path,
    config: RunConfig,
    log_history: Sequence[Mapping[str, Any]] | None = None,
    data: DataReport | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Writes loss.png (with a log history), length_histogram.png (with data statistics) and report.md.

    Args:
        run_dir: the run's output folder; its run_summary.json, when there, heads the report.
        config: the run's resolved config, quoted at the end.
        log_history: `trainer.state.log_history` (train and eval losses).
        data: statistics of the training data (`lowtune.eval.inspect.analyse_examples`).
        samples: generations as `lowtune.eval.evaluate.sample_generations` returns them.

    Returns:
        The path of report.md.
    """
    folder = Path(run_dir)
    summary_file = folder / SUMMARY_FILE_NAME
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    lines = [f"# lowtune run `{folder.name}`", ""] + (_training(summary) if summary else [])
    if log_history is not None:
        plot_losses(log_history, folder / LOSS_FIGURE_NAME)
        lines += _losses(log_history)
    if summary and summary.get("preference"):
        lines += _preference(summary["preference"], log_history or [])
    if data is not None:
        plot_length_histogram(data.lengths, data.max_length, folder / HISTOGRAM_FILE_NAME)
        lines += _data(data)
    if samples:
        lines += _samples(samples)
    lines += ["## Config", "", _fenced(config.to_yaml(), "yaml"), ""]
    target = folder / REPORT_FILE_NAME
    target.write_text("\n".join(lines), encoding="utf-8")
    return target


def _training(summary: Mapping[str, Any]) -> list[str]:
    rows = {
        "steps": summary.get("steps"),
        "epochs": _rounded(summary.get("epochs")),
        "train loss (mean)": summary.get("train_loss"),
        "first / last logged loss": f"{summary.get('first_logged_loss')} / {summary.get('last_logged_loss')}",
        "seconds": summary.get("seconds"),
        "device": summary.get("device"),
        "peak memory (GiB)": summary.get("peak_memory_gib"),
    }
    return ["## Training", ""] + _table(rows.items()) + [""]


def _rounded(value: float | None) -> float | None:
    """Two decimals (0.1354401805 epochs reads 0.14); None stays None."""
    return None if value is None else round(value, 2)


def _losses(log_history: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Loss", "", f"![train and eval loss]({LOSS_FIGURE_NAME})", ""]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if evaluations:
        last = evaluations[-1]
        lines += [f"Last eval loss: {last['eval_loss']:.4f} at step {last.get('step')}.", ""]
    return lines


PAIR_FIGURES = {  # the held-out pairs' figures (train/preference.summary), as the report names them
    "accuracy": "preference accuracy",
    "reward_margin": "reward margin (mean)",
    "rewards_chosen": "chosen reward (mean)",
    "rewards_rejected": "rejected reward (mean)",
}


def _preference(preference: Mapping[str, Any], log_history: Sequence[Mapping[str, Any]]) -> list[str]:
    """A DPO or ORPO run's pairs and its held-out figures: the last evaluation's, then every evaluation's by step."""
    rows = {
        "method": preference.get("method"),
        "pairs trained / held out": f"{preference.get('pairs')} / {preference.get('held_out_pairs')}",
    }
    last = preference.get("last_eval") or {}
    rows |= {label: pair_figure(name, last[name]) for name, label in PAIR_FIGURES.items() if name in last}
    lines = ["## Preference (held-out pairs)", ""] + _table(rows.items()) + [""]
    evaluations = [entry for entry in log_history if "eval_accuracy" in entry]
    if evaluations:
        lines += ["| step | eval loss | " + " | ".join(PAIR_FIGURES.values()) + " |"]
        lines += ["|---" * (2 + len(PAIR_FIGURES)) + "|"]
        for entry in evaluations:
            figures = [pair_figure(name, entry[f"eval_{name}"]) for name in PAIR_FIGURES]
            lines += [f"| {entry.get('step')} | {entry['eval_loss']:.4f} | " + " | ".join(figures) + " |"]
        lines += [""]
    return lines


def pair_figure(name: str, value: float) -> str:
    return f"{value:.0%}" if name == "accuracy" else f"{value:.4f}"


def _data(data: DataReport) -> list[str]:
    return ["## Data", ""] + _table(data.summary()) + ["", f"![token lengths]({HISTOGRAM_FILE_NAME})", ""]


def _samples(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Sample generations", ""]
    for number, sample in enumerate(samples, start=1):
        ending = "stopped at the end of turn" if sample.get("stopped") else "ran to the token limit"
        lines += [f"### {number}", "", "Prompt:", "", _fenced(sample["prompt"]), ""]
        lines += ["Reference:", "", _fenced(sample["reference"]), ""]
        lines += [f"Reply ({ending}):", "", _fenced(sample["response"]), ""]
    return lines


def _table(rows: Iterable[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    return lines + [f"| {_cell(what)} | {_cell(value)} |" for what, value in rows]


def _cell(value: Any) -> str:
    return str(value).strip().replace("|", "\\|").replace("\n", " ")


def _fenced(text: str, language: str = "text") -> str:
    """A code block whose fence is longer than any run of backticks in the text, so no text can close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"
