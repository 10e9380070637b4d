"""Encode examples into training rows (input_ids, attention_mask, labels), cut to max_length."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lowtune.data.read import Example, RecordError, to_example
from lowtune.data.templates import IGNORE_INDEX, ChatFormat, build_chat_format, input_separator
from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)


@dataclass
class EncodedData:
    """Training rows plus what happened on the way: records cut by max_length, and those dropped."""

    rows: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # sources of records left with no trained token

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]

    @property
    def trained_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in self.rows)


def encode_examples(
    examples: Sequence[Example], chat_format: ChatFormat, max_length: int, truncation: str = "cut"
) -> EncodedData:
    """Encodes every example; a record that truncation leaves with no trained token is dropped and counted.

    With truncation "error", records longer than max_length stop the run instead, each named by file and line.
    """
    encoded = EncodedData(rows=[])
    too_long: list[Problem] = []
    for example in examples:
        input_ids, labels = chat_format.encode(example.messages)
        if len(input_ids) > max_length and truncation == "error":
            file, _, line = example.source.rpartition(":")
            too_long.append(
                Problem(
                    f"record of {len(input_ids)} tokens, longer than data.max_length={max_length}",
                    file,
                    int(line) if line.isdigit() else None,
                )
            )
            continue
        if len(input_ids) > max_length:
            encoded.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            encoded.dropped.append(example.source)
            continue
        encoded.rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if too_long:
        too_long[-1].fix = "raise data.max_length, shorten those records, or set data.truncation: cut"
        raise UserError(too_long)
    if encoded.truncated:
        log.warning(
            "%d of %d records are longer than max_length=%d and were cut at the end",
            encoded.truncated,
            len(examples),
            max_length,
        )
    if encoded.dropped:
        log.warning(
            "%d records dropped: nothing left to train on after cutting to max_length=%d (first: %s)",
            len(encoded.dropped),
            max_length,
            encoded.dropped[0],
        )
    if not encoded.rows:
        raise UserError.one(
            f"every record was dropped: none has a trained token within max_length={max_length}",
            fix="raise data.max_length",
        )
    return encoded


def encode_records(
    records: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str = "auto",
    system: str | None = None,
    max_length: int = 1024,
) -> list[dict[str, list[int]]]:
    """Python API: alpaca or chat records (dicts) -> rows of input_ids, attention_mask and labels.

    The same path as `lowtune train`: records are validated, rendered with the chosen chat format (`auto`,
    `tokenizer`, `qwen` or `seed`), and rows that truncation leaves without a trained token are dropped.
    """
    chat_format = build_chat_format(template, tokenizer, system)
    separator = input_separator(chat_format.name)
    examples = []
    for index, record in enumerate(records):
        try:
            examples.append(to_example(record, "auto", f"record {index}", separator))
        except RecordError as error:
            raise UserError.one(f"record {index}: {error.message}", fix=error.fix) from None
    return encode_examples(examples, chat_format, max_length).rows
