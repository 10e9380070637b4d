"""Encode examples into training rows (input_ids, attention_mask, labels), cut to max_length.

The rows are views of an `EncodedSet` (numpy arrays, `data/encoded.py`), each built when indexed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lowtune.data.encoded import Records, Rows, encode_conversations
from lowtune.data.read import MAX_REPORTED_PROBLEMS, Example, RecordError, to_example
from lowtune.data.templates import ChatFormat, build_chat_format, input_separator
from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)


@dataclass
class EncodedData:
    """Training rows plus what happened on the way: records cut by max_length, and those dropped."""

    rows: Rows
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # sources of records left with no trained token

    @property
    def lengths(self) -> list[int]:
        return self.rows.records.lengths().tolist()

    @property
    def trained_tokens(self) -> int:
        return int(self.rows.records.per_record("trained_counts").sum())


def encode_examples(
    examples: Sequence[Example], chat_format: ChatFormat, max_length: int, truncation: str = "cut"
) -> EncodedData:
    """Encodes every example; a record that truncation leaves with no trained token is dropped and counted.

    With truncation "error", records longer than max_length stop the run instead, each named by file and line.
    """
    builder = encode_conversations(((e.messages, 0) for e in examples), chat_format, max_length)
    return training_data(Records.whole([builder.build(names=[e.source for e in examples])]), max_length, truncation)


def training_data(records: Records, max_length: int, truncation: str = "cut") -> EncodedData:
    """The rows of encoded records: those longer than max_length cut (or, with truncation "error", refused, each
    named by file and line), those the cut leaves with no trained token dropped and counted."""
    too_long = records.per_record("full_lengths") > max_length
    if truncation == "error" and too_long.any():
        raise _too_long(records.where(too_long), max_length)
    empty = records.per_record("trained_counts") == 0
    encoded = EncodedData(records.where(~empty).rows(), int(too_long.sum()), records.sources(empty))
    if encoded.truncated:
        log.warning(
            "%d of %d records are longer than max_length=%d and were cut at the end",
            encoded.truncated,
            len(records),
            max_length,
        )
    if encoded.dropped:
        log.warning(
            "%d records dropped: nothing left to train on after cutting to max_length=%d (first: %s)",
            len(encoded.dropped),
            max_length,
            encoded.dropped[0],
        )
    if not len(encoded.rows):
        raise UserError.one(
            f"every record was dropped: none has a trained token within max_length={max_length}",
            fix="raise data.max_length",
        )
    return encoded


def _too_long(records: Records, max_length: int) -> UserError:
    lengths = records.per_record("full_lengths")
    problems = []
    for (each, index), length in zip(records, lengths[:MAX_REPORTED_PROBLEMS].tolist(), strict=False):
        file, line = each.place(index)
        problems.append(Problem(f"record of {length} tokens, longer than data.max_length={max_length}", file, line))
    if len(lengths) > MAX_REPORTED_PROBLEMS:
        problems.append(Problem(f"and {len(lengths) - MAX_REPORTED_PROBLEMS:,} more records as long"))
    problems[-1].fix = "raise data.max_length, shorten those records, or set data.truncation: cut"
    return UserError(problems)


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
    return list(encode_examples(examples, chat_format, max_length).rows)
