"""`lowtune eval` on preference pairs: preference accuracy, reward margin and rewards of held-out pairs.

The rewards are the ones training logs (`train/preference.py`, the same passes and formulas): for DPO, beta x
(policy - reference) log-probability of each reply, the reference being the run's starting point (its
train.init_adapter when it had one, else the base with the adapter off), computed once, as training does; for ORPO,
each reply's length-normalised log-probability. An SFT run evaluated on pairs (`--data`) is scored as DPO from it
would start: DPO rewards (default beta) against its own starting point, the base.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftModel

from lowtune.config import RunConfig
from lowtune.data.pack import PaddedCollator
from lowtune.data.preference import Pair, encode_pairs, is_pair_file, read_pairs, split_pairs
from lowtune.data.split import held_out_of_run
from lowtune.errors import UserError
from lowtune.eval.report import PAIR_FIGURES, pair_figure
from lowtune.infer.session import ChatModel
from lowtune.model.lora import ADAPTER_CONFIG_FILE_NAME
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.preference import PairRows, PreferenceCollator, model_pair_terms, sequence_log_probs, summary
from lowtune.train.resolve import DEFAULT_BETA, Objective

log = logging.getLogger(__name__)
REFERENCE_ADAPTER = "reference"  # train.init_adapter, loaded beside the run's adapter for the reference pass


def evaluates_pairs(config: RunConfig, data: str | Path | None) -> bool:
    """Pairs are evaluated when `data` holds preference records, or, without `data`, when the run trained on pairs
    (an SFT data file given to a DPO run is evaluated as SFT records: loss, replies, scores)."""
    return is_pair_file(Path(data)) if data is not None else config.train.method != "sft"


def pair_results(
    folder: Path,
    config: RunConfig,
    data: str | Path | None,
    limit: int | None,
    base: bool,
    batch_size: int,
    model_path: str | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results of the held-out pairs (or `data`'s) under the run's adapter (and the base, with `base`), and one
    line per pair: its source, prompt, and each model's rewards and margin."""
    pairs, described = held_out_pairs(config, data)
    pairs = pairs[:limit] if limit else pairs
    chat_model = ChatModel.from_adapter(folder, model_path)
    model = chat_model.model
    install_hidden_state_loss(model.get_base_model())
    encoded = encode_pairs(pairs, chat_model.chat_format, config.data.max_length)
    log.info("evaluating on %d preference pairs: %s", len(encoded.pairs), described)
    collate = PreferenceCollator(PaddedCollator(chat_model.tokenizer.pad_token_id), packed=False)
    objective = run_objective(config)
    reference = None
    if objective.needs_reference:
        with starting_model(model, config):
            reference = sequence_log_probs(model, encoded.rows, collate, batch_size)[0]
    rows = PairRows(encoded.rows, reference)
    terms = {"adapter": model_pair_terms(model, rows, collate, batch_size, objective)}
    if base:
        with model.disable_adapter():
            terms["base"] = model_pair_terms(model, rows, collate, batch_size, objective)
    results = {
        "adapter": str(folder),
        "data": described,
        "pairs": len(encoded.pairs),
        "chat_format": chat_model.chat_format.name,
        "rewards": rewards_description(config, objective),
        "models": {name: summary(each) for name, each in terms.items()},
    }
    return results, _pair_lines(encoded.pairs, terms)


def held_out_pairs(config: RunConfig, data: str | Path | None) -> tuple[list[Pair], str]:
    """The pairs to evaluate on and where they come from: `data` when given, else the pairs the run held out (the
    same split training made)."""
    if data is not None:
        return read_pairs([str(data)], config.train.seed)[0], str(data)
    return held_out_of_run(config, "pairs", lambda: split_pairs(config)[1])


def run_objective(config: RunConfig) -> Objective:
    """The run's preference objective; an SFT run's pairs are scored with DPO's rewards at the default beta."""
    return Objective.of(config.train) if config.train.method != "sft" else Objective("dpo", DEFAULT_BETA)


@contextmanager
def starting_model(model: PeftModel, config: RunConfig) -> Iterator[None]:
    """Inside, `model` computes as the run's starting point, DPO's reference: its train.init_adapter (loaded beside
    the run's adapter, removed after), else the base with the adapter off."""
    if not config.train.init_adapter:
        with model.disable_adapter():
            yield
        return
    folder = Path(config.train.init_adapter)
    if not (folder / ADAPTER_CONFIG_FILE_NAME).is_file():
        raise UserError.one(
            "this run's train.init_adapter, its DPO reference, is not here",
            folder,
            fix="run lowtune eval from the folder training ran in (the path is relative to it), or put the adapter "
            "back there",
        )
    active = model.active_adapter
    model.load_adapter(str(folder), adapter_name=REFERENCE_ADAPTER)
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(active)
        model.delete_adapter(REFERENCE_ADAPTER)


def rewards_description(config: RunConfig, objective: Objective) -> str:
    if not objective.needs_reference:
        return f"ORPO rewards: each reply's mean log-probability per token (lambda {objective.weight:g})"
    start = f"train.init_adapter {config.train.init_adapter}" if config.train.init_adapter else "the base (adapter off)"
    return f"DPO rewards: beta {objective.weight:g} x (log-prob - reference log-prob), reference: {start}"


def formatted_pair_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """One model's figures for the terminal table, as the run report names them."""
    return {"pair loss": f"{metrics['loss']:.4f}"} | {
        label: pair_figure(name, metrics[name]) for name, label in PAIR_FIGURES.items()
    }


def _pair_lines(pairs: list[Pair], terms: dict[str, Any]) -> list[dict[str, Any]]:
    lines = []
    for index, pair in enumerate(pairs):
        line: dict[str, Any] = {"source": pair.source, "prompt": pair.prompt[-1].content}
        for name, each in terms.items():
            chosen, rejected = each.chosen[index].item(), each.rejected[index].item()
            line[name] = {"chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected}
        lines.append(line)
    return lines
