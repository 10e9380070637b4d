"""Hold records out for evaluation: the same (files, val_size, seed) always give the same split."""

from __future__ import annotations

import random
from collections.abc import Sequence

from lowtune.config import RunConfig
from lowtune.data.read import Example, read_examples
from lowtune.data.templates import input_separator
from lowtune.errors import UserError


def held_out_count(total: int, val_size: float) -> int:
    """val_size below 1 is a share of the records, 1 and above a count."""
    count = round(total * val_size) if val_size < 1 else int(val_size)
    if val_size > 0 and count == 0:
        count = 1
    if count >= total:
        raise UserError.one(
            f"data.val_size={val_size} holds out {count} of {total} records: none left to train on",
            fix="lower data.val_size",
        )
    return count


def split_examples(examples: Sequence[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random draw, each side kept in file order."""
    count = held_out_count(len(examples), val_size) if val_size > 0 else 0
    held = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def split_for_run(config: RunConfig, examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out) as a run makes them: data.eval_files when given, else val_size drawn from the examples."""
    if config.data.eval_files:
        separator = input_separator(config.data.template)
        return list(examples), read_examples(config.data.eval_files, config.data.format, separator)
    return split_examples(examples, config.data.val_size, config.train.seed)
