"""Causal-LM loss straight from hidden states: the vocabulary-sized logits never exist whole.

transformers computes logits for every position (151,936 x tokens for Qwen, plus an fp32 copy) before the loss;
here only positions that carry a label are projected, chunk by chunk, and the gradient of each chunk is computed
at once, so memory holds one chunk of logits at a time. On CUDA, liger-kernel's fused linear cross-entropy does
the same in Triton; elsewhere `ChunkedLinearCrossEntropy` below does it in plain torch. Which one runs is the run's
choice (`train/resolve.py`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from lowtune import internals
from lowtune.data.templates import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20  # fp32 logits held at once
# Inside a CUDA graph more chunks cost no launches, and "masked" projects every position, labelled or not.
MASKED_CHUNK_BYTES = 64 * 2**20


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), the weight frozen.

    Gradient, per chunk with p = softmax(logits): d loss / d hidden = (p - onehot(targets)) @ weight. It is
    computed in the forward pass, so the chunk's logits can be freed at once; backward only scales it.

    With `masked`, rows whose target is IGNORE_INDEX count zero (and get a zero gradient): every row goes through,
    so no shape depends on the labels, which a CUDA graph needs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        onednn: bool = False,
        masked: bool = False,
    ) -> torch.Tensor:
        rows_per_chunk = chunk_rows(weight.shape[0], masked)
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 logits are upcast, as HF does
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        counted = (targets != IGNORE_INDEX).to(accumulate) if masked else None
        targets = targets.clamp(min=0) if masked else targets  # an ignored row picks class 0, then counts zero
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            scale = None if counted is None else counted[rows]
            picked = _picked_log_probs(hidden, weight, targets, rows, onednn, grad_hidden, scale)
            total -= picked.sum() if counted is None else picked.dot(counted[rows])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Per row: log_softmax(hidden @ weight.T)[row, targets[row]], the weight frozen (preference losses need the
    log-probability of each reply token, not their sum).

    Row i's log-probability depends on row i's hidden state only, so its gradient, (onehot(targets) - p) @ weight
    per chunk, is computed in the forward pass as the summed loss's is; backward scales row i by grad_output[i].
    `masked` only picks the smaller chunks of a CUDA graph (the caller weighs unlabelled rows zero).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        onednn: bool = False,
        masked: bool = False,
    ) -> torch.Tensor:
        rows_per_chunk = chunk_rows(weight.shape[0], masked)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        picked = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None  # of -log p: negated in backward
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            picked[rows] = _picked_log_probs(hidden, weight, targets, rows, onednn, grad_hidden)
        ctx.save_for_backward(grad_hidden)
        return picked

    @staticmethod
    def backward(ctx: Any, grad_picked: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * -grad_picked[:, None].to(grad_hidden.dtype), None, None, None, None


def _picked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: slice,
    onednn: bool,
    grad_hidden: torch.Tensor | None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(chunk,) log-probabilities of the targets of `hidden[rows]`; writes the gradient of their negated sum (each
    row times `scale`, when given) into grad_hidden[rows], when grad_hidden is given."""
    accumulate = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 logits are upcast, as HF does
    logits = _linear(hidden[rows].to(weight.dtype), weight, onednn).to(accumulate)  # (chunk, vocab)
    log_probs = logits.log_softmax(dim=-1)  # one pass over the vocabulary (logsumexp takes four)
    del logits
    picked = log_probs.gather(1, targets[rows, None])[:, 0]
    if grad_hidden is not None:
        probs = log_probs.exp_()  # in place: the chunk's log-probabilities are not needed again
        probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
        if scale is not None:
            probs.mul_(scale[:, None])
        grad_hidden[rows] = _linear(probs.to(weight.dtype), weight.T, onednn).to(hidden.dtype)
    return picked


def chunk_rows(vocab: int, masked: bool) -> int:
    """Rows of logits one chunk of the chunked loss holds."""
    return max(1, (MASKED_CHUNK_BYTES if masked else CHUNK_BYTES) // (4 * vocab))


def chunk_peak_bytes(rows: int, vocab: int, kernel: str) -> int:
    """What the chunked losses hold on top of the hidden states at their peak: a chunk's fp32 logits and their
    log-probabilities (liger's fused loss, its own small chunks, is not counted)."""
    if kernel not in ("chunked", "masked"):
        return 0
    return 8 * min(rows, chunk_rows(vocab, kernel == "masked")) * vocab


def _linear(x: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    return internals.onednn_linear(x, weight) if onednn else x @ weight.T


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernel: str = "chunked", onednn: bool = False
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (rows of hidden: (N, H)).

    kernel: "liger" (liger-kernel's fused linear cross-entropy, CUDA), "chunked", or "masked" (chunked over every
    row, IGNORE_INDEX targets counting zero); onednn: the chunked products through oneDNN.
    """
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden.to(weight.dtype), weight, targets, reduction="sum")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, onednn, kernel == "masked")


def causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    kernel: str = "chunked",
    onednn: bool = False,
) -> torch.Tensor:
    """Next-token loss: position t predicts labels[t + 1]; the sum is divided by the number of targets of the
    whole optimizer step when given (so gradient accumulation weighs every token alike), else of this batch.

    kernel "masked" takes every position (no selection: nothing waits for the GPU, every shape is fixed), the others
    only the labelled ones."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if kernel == "masked":
        rows, picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    else:
        rows, picked = hidden[:, :-1][keep], targets[keep]  # (N, H): the boolean selection syncs with the GPU
    total = linear_cross_entropy_sum(rows, weight, picked, kernel, onednn)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return total / torch.as_tensor(count, device=total.device, dtype=total.dtype)


@dataclass
class SequenceLogProbs(ModelOutput):
    """Summed log-probabilities of the trained tokens of each sequence of a batch, and their counts."""

    logps: torch.Tensor | None = None  # (sequences,)
    tokens: torch.Tensor | None = None  # (sequences,)


def sequence_log_probs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
    sequences: int,
    weight: torch.Tensor,
    onednn: bool = False,
    masked: bool = False,
) -> SequenceLogProbs:
    """Each of the `sequences` sequences' summed log-probability of its labels: position t predicts labels[t + 1],
    which belongs to the sequence sequence_ids[t + 1] says (a padded row is one sequence; a packed row holds
    several).

    `masked` takes every position, unlabelled ones weighing zero (no selection: every shape fixed, nothing waits for
    the GPU, as a CUDA graph needs); otherwise only the labelled positions are projected."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if masked:
        owners, counted = sequence_ids[:, 1:].reshape(-1), keep.reshape(-1)
        rows, picked_targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.clamp(min=0).reshape(-1)
    else:  # the boolean selection syncs with the GPU
        owners, counted, rows, picked_targets = sequence_ids[:, 1:][keep], None, hidden[:, :-1][keep], targets[keep]
    picked = ChunkedLinearLogProbs.apply(rows, weight, picked_targets, onednn, masked)  # (N,)
    weights = torch.ones_like(picked) if counted is None else counted.to(picked.dtype)  # 1 a labelled position
    logps = picked.new_zeros(sequences).index_add(0, owners, picked * weights)
    tokens = picked.new_zeros(sequences).index_add(0, owners, weights)
    return SequenceLogProbs(logps=logps, tokens=tokens)


def install_hidden_state_loss(model: PreTrainedModel, kernel: str = "chunked", onednn: bool = False) -> None:
    """Makes `model.forward(..., labels=...)` return the loss computed from hidden states (and no logits).

    kernel: "chunked", "masked" or "liger" (see `linear_cross_entropy_sum`); "transformers" keeps the model's own
    loss, which a run whose output layer trains needs (the fused loss gives the head no gradient). Without labels
    (generation) the model's own forward runs. With `sequence_ids` (preference pairs) it returns each sequence's
    summed log-probability instead (`sequence_log_probs`). The instance's forward is replaced, not the class's, so
    other models in the process are untouched.
    """
    head = model.get_output_embeddings()
    frozen_linear = isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.bias is None
    if kernel != "transformers" and not frozen_linear:
        raise RuntimeError(f"the {kernel} loss needs a frozen linear output layer without bias, not {head}")
    original_forward = model.forward

    def forward(
        self: PreTrainedModel,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("real_tokens", None)  # PackedCollator's count of the tokens before padding, not a model input
        sequence_ids, sequences = kwargs.pop("sequence_ids", None), kwargs.pop("sequences", None)
        if labels is None:
            return original_forward(input_ids=input_ids, **kwargs)
        # No cache: a loss never needs one, and with a cache transformers stops reading record boundaries from
        # packed position ids (records would attend to each other under SDPA or flex attention).
        kwargs["use_cache"] = False
        if kernel == "transformers":
            return original_forward(input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("logits_to_keep", None)
        hidden = self.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, H)
        weight = self.get_output_embeddings().weight
        if sequence_ids is not None:
            return sequence_log_probs(hidden, labels, sequence_ids, sequences, weight, onednn, kernel == "masked")
        return CausalLMOutputWithPast(loss=causal_lm_loss(hidden, labels, weight, num_items_in_batch, kernel, onednn))

    model.forward = types.MethodType(forward, model)
