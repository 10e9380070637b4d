"""Validation loss: token-weighted like training, from hidden states, the same padded or packed."""

from __future__ import annotations

import pytest
import torch

from lowtune.data.encode import encode_examples
from lowtune.data.read import read_examples
from lowtune.recipe import load_model
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.validate import eval_loss
from tests.conftest import MEMORISE, write_jsonl


def test_eval_loss_is_the_token_weighted_mean_of_the_plain_loss(tmp_path, tiny_qwen2, qwen_tokenizer):
    """Hidden-state loss in padded batches == transformers' own loss per record, weighted by its target count."""
    from lowtune.data.pack import PackedCollator, PaddedCollator
    from lowtune.data.templates import QwenFormat

    model, _ = load_model(tiny_qwen2, precision="fp32")
    chat_format = QwenFormat(qwen_tokenizer)
    examples = read_examples([str(write_jsonl(tmp_path / "m.jsonl", MEMORISE))])
    total = targets = 0.0
    for row in encode_examples(examples, chat_format, 1024).rows:
        labels = torch.tensor([row["labels"]])
        count = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * count
        targets += count
    model.requires_grad_(False)  # as in evaluation: the hidden-state loss gives no gradient to the output layer
    install_hidden_state_loss(model)
    rows = encode_examples(examples, chat_format, 1024).rows
    result = eval_loss(model, rows, PaddedCollator(qwen_tokenizer.pad_token_id), batch_size=3)
    packed = eval_loss(model, rows, PackedCollator(), batch_size=3)
    assert packed["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    done = []
    eval_loss(model, rows, batch_size=3, progress=lambda records, tokens: done.append((records, tokens)))
    lengths = sorted(len(row["input_ids"]) for row in rows)
    assert done == [(3, sum(lengths[:3])), (4, sum(lengths))]  # records and input tokens evaluated after each batch
    assert result["eval_tokens"] == targets and result["eval_loss"] == pytest.approx(total / targets, rel=1e-5)
