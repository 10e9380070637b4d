"""Collators: padded batches (B, T) or packed rows (1, total) with positions restarting at every record.

A packed row carries `cu_seq_lens_*` / `max_length_*` (the keyword names transformers passes to variable-length
attention kernels) and `position_ids`; transformers' own SDPA and flex masks read the sample boundaries from the
position ids, so no token attends across two records whichever kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowtune.data.templates import IGNORE_INDEX

Row = dict[str, list[int]]


class PaddedCollator:
    """Pads to the longest row of the batch: input_ids with the pad id, labels with -100, attention_mask 0."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = torch.tensor(row["input_ids"])
            labels[i, :length] = torch.tensor(row["labels"])
            attention_mask[i, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def padded_length(tokens: int, bucket: int) -> int:
    """A packed row's length once padded up to a multiple of `bucket` tokens."""
    return -(-tokens // bucket) * bucket


class PackedCollator:
    """Concatenates the batch into one row of real tokens only (no padding).

    With `bucket`, the row is padded up to a multiple of `bucket` tokens by one more record that trains nothing, and
    the record count up to a power of two by empty records: batches then fall into a few shapes (`max_length` is the
    row's length), each of which a CUDA graph captures once; `real_tokens` then counts the tokens before padding.
    """

    shape_fields = "tokens x record slots"  # what `shape` gives

    def __init__(self, bucket: int | None = None, pad_token_id: int = 0):
        self.bucket, self.pad_token_id = bucket, pad_token_id

    def shape(self, lengths: Sequence[int]) -> tuple[int, int]:
        """(tokens, record slots) of the padded row of records of these lengths (with `bucket` only)."""
        assert self.bucket is not None
        records = 1 << len(lengths).bit_length()  # a power of two above the count: room for the padding record
        return padded_length(sum(lengths), self.bucket), records

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor | int]:
        lengths = [len(row["input_ids"]) for row in rows]
        input_ids = [t for row in rows for t in row["input_ids"]]
        labels = []
        for row in rows:
            # A record's first token has no prediction inside the record: never let it be the target of the
            # previous record's last position.
            labels += [IGNORE_INDEX] + row["labels"][1:]
        longest, real_tokens = max(lengths), len(input_ids)
        if self.bucket is not None:
            tokens, records = self.shape(lengths)
            padding = tokens - real_tokens
            input_ids += [self.pad_token_id] * padding
            labels += [IGNORE_INDEX] * padding
            lengths += [padding] + [0] * (records - len(rows) - 1)  # the padding record, then empty ones
            longest = tokens
        cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        padded = {"real_tokens": real_tokens} if self.bucket is not None else {}
        return padded | {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
