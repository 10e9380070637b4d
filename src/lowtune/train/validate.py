"""Validation: the mean loss of held-out records, token-weighted as training counts it, with no logits kept."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from lowtune.data.pack import PaddedCollator
from lowtune.data.templates import IGNORE_INDEX


def eval_loss(
    model: PreTrainedModel,
    rows: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict[str, list[int]]]], dict[str, Any]] | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Mean loss over every trained token of the encoded rows (token-weighted, as training counts it) and perplexity.

    The model must have `install_hidden_state_loss` on its base, so that a forward with labels returns the summed
    loss without keeping logits. `collate` builds the batches (padded by default; training passes its own, packed
    where it packs). `progress` is called after each batch with the records and the input tokens done (records go
    shortest first, so tokens tell the pace).
    """
    collate = collate or PaddedCollator(model.config.pad_token_id or 0)
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))
    total, tokens, inputs = 0.0, 0, 0
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        batch = collate(chunk)
        labels = batch["labels"]
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            total += model(**batch, num_items_in_batch=1).loss.item()  # summed over the batch's targets
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())  # position t predicts label t + 1
        inputs += sum(len(row["input_ids"]) for row in chunk)
        if progress is not None:
            progress(start + len(chunk), inputs)
    loss = total / tokens
    return {"eval_loss": loss, "perplexity": math.exp(loss), "eval_tokens": tokens}
