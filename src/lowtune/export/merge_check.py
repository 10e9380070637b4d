"""Does the merged model answer as base + adapter did in training? Measured before a merge is written.

The reference is the run's base + adapter as trained (a quantized base quantized, as `lowtune chat` loads it); the
prompts are the run's held-out records, or a file of prompts. The figures (`export/verify.py`) go into the merged
folder as merge_report.json, and a merge beyond the limits stops, with nothing written, unless forced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lowtune.config import load_run_config
from lowtune.data.read import Message, read_examples
from lowtune.data.templates import input_separator
from lowtune.errors import Problem, UserError
from lowtune.eval.evaluate import held_out_examples, prompt_and_reference
from lowtune.export.verify import Comparison, Limits, compare, comparison_table
from lowtune.infer.chat import read_prompts
from lowtune.infer.session import ChatModel, base_model_settings

log = logging.getLogger(__name__)

REPORT_FILE_NAME = "merge_report.json"
OTHER_TARGET = {"dequantized": "original", "original": "dequantized"}

# Measured (docs/deploy.md): a merge that computes what was trained stays well inside these (rounding alone: mean KL
# below 0.01, agreement above 95%), a wrong scale or weight lands far outside, and so may the full-precision weights
# of a small 4-bit model (SmolLM2-135M: mean KL 0.23, agreement 80%).
DEFAULT_LIMITS = Limits(max_kl=0.05, min_agreement=0.9)


@dataclass(frozen=True)
class MergeCheck:
    """How the merged model is compared with base + adapter as trained, before anything is written.

    Attributes:
        prompts_file: JSONL of prompts (strings or {"prompt", "system"}) to compare on; None: the run's held-out
            records (data.val_size or data.eval_files), else the last records of its training data.
        prompts: how many prompts, at most.
        max_new_tokens: the length of the reference's greedy answers, along which the models are compared.
        limits: the largest difference that passes (see DEFAULT_LIMITS).
        force: write the merged model even when it crosses the limits (its report says so).
    """

    prompts_file: Path | None = None
    prompts: int = 16
    max_new_tokens: int = 32
    limits: Limits = DEFAULT_LIMITS
    force: bool = False

    def problems(self) -> list[Problem]:
        """What is wrong with the check's settings, before any weight is loaded."""
        problems = []
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            problems.append(Problem("prompts file not found", self.prompts_file))
        if not self.limits.max_kl >= 0:
            problems.append(Problem(f"--max-kl {self.limits.max_kl} is negative", fix="give 0 or more (nats)"))
        if not 0 <= self.limits.min_agreement <= 1:
            problems.append(Problem(f"--min-agreement {self.limits.min_agreement} is not a share", fix="give 0 to 1"))
        return problems


def check_merge(
    merged: ChatModel,
    adapter_dir: Path,
    into: str,
    check: MergeCheck,
    model_path: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Compares the merged model with base + adapter as trained; returns the report for merge_report.json.

    Args:
        merged: the merged model, in memory.
        adapter_dir: the run folder it was merged from.
        into: the weights it was merged into (`merge.merge_target`).
        check: prompts, limits and force.
        model_path: the base model folder, when it moved since training.
        console: where the figures' table is printed (None: only logged).

    Raises:
        UserError: the difference crosses the limits and `check.force` is off.
    """
    quantization = base_model_settings(adapter_dir).quantization
    against = f"{quantization} base + adapter" if quantization != "none" else "base + adapter"
    conversations, source = check_prompts(adapter_dir, check)
    reference = ChatModel.from_adapter(adapter_dir, model_path)
    comparison = compare(reference, merged, conversations, check.max_new_tokens)
    del reference  # the merged model is saved next: let the memory go first
    _log(comparison, against, source)
    if console is not None:
        console.print(comparison_table(comparison, check.limits, f"merged model (into {into}) vs {against}"))
    crossed = check.limits.crossed(comparison)
    report = {
        "adapter": str(adapter_dir),
        "into": into,
        "dtype": str(merged.model.dtype).removeprefix("torch."),
        "reference": f"{against}, as trained",
        "prompts_source": source,
        "max_new_tokens": check.max_new_tokens,
        **comparison.to_dict(),
        "limits": {"max_mean_kl": check.limits.max_kl, "min_greedy_agreement": check.limits.min_agreement},
        "passed": not crossed,
        "forced": bool(crossed) and check.force,
    }
    if crossed and not check.force:
        raise UserError.one(
            f"the merged model does not answer as {against}: {'; '.join(crossed)} (on {comparison.prompts} prompts, "
            f"{comparison.positions} next tokens); nothing was written",
            fix=_fix(quantization, into),
        )
    if crossed:
        log.warning("The merged model strays from %s (%s); written anyway (--force)", against, "; ".join(crossed))
    return report


def check_prompts(adapter_dir: Path, check: MergeCheck) -> tuple[list[list[Message]], str]:
    """The conversations the merge is checked on, and where they come from: `check.prompts_file`, else the run's
    held-out records, else (a run that held none out) the last records of its training data."""
    if check.prompts_file is not None:
        conversations = [_conversation(prompt, system) for prompt, system in read_prompts(Path(check.prompts_file))]
        return conversations[: check.prompts], str(check.prompts_file)
    config = load_run_config(adapter_dir)
    if config.data.eval_files or config.data.val_size > 0:
        examples, source = held_out_examples(config)
        examples = examples[: check.prompts]
    else:
        separator = input_separator(config.data.template)
        examples = read_examples(config.data.files, config.data.format, separator, config.train.seed)
        examples = examples[-check.prompts :]
        source = "the last records of data.files: the run held none out, so it was trained on them"
    return [prompt_and_reference(example)[0] for example in examples], source


def _conversation(prompt: str, system: str | None) -> list[Message]:
    return ([Message("system", system)] if system is not None else []) + [Message("user", prompt)]


def _log(comparison: Comparison, against: str, source: str) -> None:
    log.info(
        "The merged model against %s (as trained), on %d prompts (%s), %d next tokens: greedy agreement %.2f%%, "
        "mean KL %.3g nats",
        against,
        comparison.prompts,
        source,
        comparison.positions,
        100 * comparison.greedy_agreement,
        comparison.mean_kl,
    )


def _fix(quantization: str, into: str) -> str:
    instead = f"try --into {OTHER_TARGET[into]}, or " if quantization != "none" else ""
    return (
        f"{instead}check the adapter and the base model; --force writes it anyway, with these figures in "
        f"{REPORT_FILE_NAME} (--max-kl and --min-agreement set the limits)"
    )
