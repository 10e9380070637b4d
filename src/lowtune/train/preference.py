"""DPO and ORPO on lowtune's own stack: pairs batched like records, each reply's log-probability from hidden states.

Why not TRL's trainers: they compute vocabulary-sized logits for every position and pad chosen and rejected to one
length; here each sequence's log-probability comes from the chunked per-row loss (`train/loss.py`), the pairs go
through lowtune's padded or packed batches, fused LoRA and `LowtuneTrainer` (resume, Ctrl-C checkpoints, atomic
saves) unchanged.

DPO's reference is the model training starts from (a fresh adapter's B is zero, so that is the base with the adapter
off; with train.init_adapter it is that policy, as DPO prescribes). Its log-probabilities are computed once, in one
no-grad pass before training: no second model or adapter is held, nothing is recomputed at each step. A resumed run
computes them again from the same starting model, so it trains against the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from lowtune.config import RunConfig
from lowtune.data.batching import LengthBucketBatchSampler
from lowtune.data.preference import PairRows, PreferenceData
from lowtune.train.resolve import Objective, Resolved
from lowtune.train.trainer import LowtuneTrainer, prepare_model_and_collator, training_arguments, with_callbacks

log = logging.getLogger(__name__)


@dataclass
class PairTerms:
    """Per pair (P,): the loss, and the implicit rewards of each reply (DPO: beta x (policy - reference) log-prob;
    ORPO: the length-normalised log-probability)."""

    losses: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


def pair_terms(
    logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None, objective: Objective
) -> PairTerms:
    """The loss of each pair from its sequences' summed log-probabilities (2P,: chosen, rejected alternating).

    DPO: -log sigmoid(beta ((pc - rc) - (pr - rr))). ORPO: the chosen reply's mean token NLL plus
    lambda x -log sigmoid(log odds(chosen) - log odds(rejected)), log odds(y) = log p - log(1 - p) of the
    length-normalised log-probability.
    """
    if objective.method == "dpo":
        assert reference is not None
        chosen = objective.weight * (logps[0::2] - reference[0::2])
        rejected = objective.weight * (logps[1::2] - reference[1::2])
        return PairTerms(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())
    mean = logps / tokens.clamp(min=1)  # (2P,) length-normalised
    log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))
    odds_ratio = -F.logsigmoid(log_odds[0::2] - log_odds[1::2])
    return PairTerms(-mean[0::2] + objective.weight * odds_ratio, mean[0::2].detach(), mean[1::2].detach())


def pair_outputs(model: torch.nn.Module, batch: dict[str, Any], objective: Objective) -> dict[str, torch.Tensor]:
    """A batch's pairs' loss, divided by the step's pair count (`num_items_in_batch`; the batch's own when None),
    and their sums of rewards, margin, accuracy and pairs for the log. Every shape is fixed by the batch's, and
    nothing is read back to the host: a CUDA graph can capture it."""
    batch = dict(batch)
    reference, pairs = batch.pop("reference_logps", None), batch.pop("num_items_in_batch", None)
    out = model(**batch)
    terms = pair_terms(out.logps.float(), out.tokens, _float(reference), objective)
    margin = terms.chosen - terms.rejected
    return {
        "loss": terms.losses.sum() / (len(terms.losses) if pairs is None else pairs),
        "rewards_chosen": terms.chosen.sum(),
        "rewards_rejected": terms.rejected.sum(),
        "reward_margin": margin.sum(),
        "accuracy": (margin > 0).float().sum(),
        "pairs": torch.ones_like(margin).sum(),
    }


def summary(terms: PairTerms) -> dict[str, float]:
    """Mean loss, rewards, margin and preference accuracy (the share of pairs whose chosen reward is higher)."""
    margin = terms.chosen - terms.rejected
    return {
        "loss": terms.losses.mean().item(),
        "rewards_chosen": terms.chosen.mean().item(),
        "rewards_rejected": terms.rejected.mean().item(),
        "reward_margin": margin.mean().item(),
        "accuracy": (margin > 0).float().mean().item(),
    }


class PairBatchSampler(LengthBucketBatchSampler):
    """Batches of pairs (by their lengths, chosen + rejected), yielded as sequence indices: 2i and 2i + 1 for pair
    i. Processes share a batch by pairs, never splitting one."""

    def __iter__(self) -> Iterator[list[int]]:
        for pairs in super().__iter__():
            yield [sequence for pair in pairs for sequence in (2 * pair, 2 * pair + 1)]


class PreferenceCollator:
    """The run's collator (padded or packed) over a batch's sequences, plus which sequence each token belongs to
    and, for DPO, the sequences' reference log-probabilities."""

    shape_fields = "tokens x record slots x sequences"

    def __init__(self, collator: Callable[[Sequence[dict]], dict[str, Any]], packed: bool):
        self.collator, self.packed = collator, packed

    def shape(self, lengths: Sequence[int]) -> tuple[int, ...]:
        """The packed row's shape (`PackedCollator.shape`) and the sequence count: what a CUDA graph fixes."""
        return (*self.collator.shape(lengths), len(lengths))

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([{key: row[key] for key in ("input_ids", "attention_mask", "labels")} for row in rows])
        lengths = torch.tensor([len(row["input_ids"]) for row in rows])
        owners = torch.arange(len(rows))
        if self.packed:  # one row, the sequences one after another (and any padding the collator added: no label)
            ids = owners.repeat_interleave(lengths)
            ids = F.pad(ids, (0, batch["labels"].shape[1] - len(ids)))
            batch["sequence_ids"] = ids[None]
        else:
            batch["sequence_ids"] = owners[:, None].expand_as(batch["labels"]).contiguous()
        batch["sequences"] = len(rows)
        if "reference_logp" in rows[0]:
            batch["reference_logps"] = torch.tensor([row["reference_logp"] for row in rows], dtype=torch.float64)
        return batch


def sequence_log_probs(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    collate: PreferenceCollator,
    pairs_per_batch: int,
    autocast: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-probability, trained tokens) of every sequence of `rows` (2P: the pairs' sequences), in one
    no-grad pass in eval mode (no dropout), in fixed batches of whole pairs: the same rows always give the same
    values. The model needs `install_hidden_state_loss` on its base."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, tokens = [], []
    step = 2 * pairs_per_batch
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), cast:
        for start in range(0, len(rows), step):
            batch = collate([rows[i] for i in range(start, min(start + step, len(rows)))])
            batch.pop("reference_logps", None)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch)
            logps.append(out.logps.double().cpu())
            tokens.append(out.tokens.double().cpu())
    model.train(was_training)
    return torch.cat(logps).numpy(), torch.cat(tokens).numpy()


class PreferenceTrainer(LowtuneTrainer):
    """LowtuneTrainer whose loss is DPO's or ORPO's over pairs. A step's loss is the mean over its pairs (the
    micro-batches of one step weigh every pair alike); rewards, margin and accuracy are logged beside it."""

    def __init__(
        self,
        *args: Any,
        objective: Objective,
        pairs_per_batch: int,
        autocast: torch.dtype | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.objective, self.pairs_per_batch = objective, pairs_per_batch
        self.autocast = autocast

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any = None) -> tuple[list, Any]:
        """The step's micro-batches, and its item count: pairs here (Trainer counts labelled tokens)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        pairs = sum(batch["sequences"] // 2 for batch in batches)
        return batches, torch.tensor(pairs, device=self.args.device) if batches else None

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ) -> Any:
        outputs = self.pass_outputs(model, inputs | {"num_items_in_batch": num_items_in_batch})
        loss = outputs.pop("loss")
        self._add_to_log(outputs)
        return (loss, outputs) if return_outputs else loss

    def pass_outputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pair_outputs(model, batch, self.objective)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._pass_sums:
            pairs = self._pass_sums.pop("pairs").item()
            logs = logs | {name: value.item() / pairs for name, value in self._pass_sums.items()}
            self._pass_sums = {}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """Loss, rewards, reward margin and preference accuracy of the held-out pairs."""
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        terms = model_pair_terms(
            self.model, rows, self.row_collator, self.pairs_per_batch, self.objective, self.autocast
        )
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in summary(terms).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def model_pair_terms(
    model: torch.nn.Module,
    rows: PairRows,
    collate: PreferenceCollator,
    pairs_per_batch: int,
    objective: Objective,
    autocast: torch.dtype | None = None,
) -> PairTerms:
    """Each pair's loss and rewards under `model`, in one no-grad pass (DPO: against the rows' reference)."""
    logps, tokens = sequence_log_probs(model, rows, collate, pairs_per_batch, autocast)
    reference = torch.from_numpy(rows.reference) if rows.reference is not None else None
    return pair_terms(torch.from_numpy(logps), torch.from_numpy(tokens), reference, objective)


def _float(reference: torch.Tensor | None) -> torch.Tensor | None:
    return None if reference is None else reference.float()


def build_preference_trainer(
    config: RunConfig,
    resolved: Resolved,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: PreferenceData,
    held_out: PreferenceData | None,
    checkpoint_files: Callable[[Path], None] | None = None,
) -> PreferenceTrainer:
    """A PreferenceTrainer on the encoded pairs, as `resolved` chose; for DPO, the reference log-probabilities of
    every pair (held-out ones too) computed first, by the model as it starts."""
    batching = resolved.batching
    objective = Objective.of(config.train)
    collator = PreferenceCollator(prepare_model_and_collator(model, resolved, tokenizer), batching.packed)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved.autocast or "")
    per_batch = batching.records or max(1, (batching.tokens or 0) * len(train.lengths) // sum(train.lengths))
    rows = [PairRows(data.rows) for data in (train, held_out) if data is not None]
    if objective.needs_reference:
        log.info("DPO reference: log-probabilities of %d sequences under the starting model", sum(map(len, rows)))
        rows = [PairRows(each.rows, sequence_log_probs(model, each, collator, per_batch, autocast)[0]) for each in rows]
    sampler = PairBatchSampler(
        train.lengths, batching.records or 1, batching.tokens, batching.packed, config.train.seed, merge=batching.merged
    )
    trainer = PreferenceTrainer(
        model=model,
        args=training_arguments(config, resolved, evaluate=held_out is not None),
        train_dataset=rows[0],
        eval_dataset=rows[1] if held_out is not None else None,
        data_collator=collator,
        processing_class=tokenizer,
        batch_sampler=sampler,
        checkpoint_files=checkpoint_files,
        objective=objective,
        pairs_per_batch=per_batch,
        autocast=autocast,
    )
    return with_callbacks(trainer, config)
