"""Hold records out for evaluation: the same (files, val_size, seed) always give the same split."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from lowtune.config import RunConfig
from lowtune.data.read import Example, read_examples
from lowtune.data.templates import input_separator
from lowtune.errors import UserError

log = logging.getLogger(__name__)
Held = TypeVar("Held")


def held_out_count(total: int, val_size: float, warn: bool = True) -> int:
    """val_size below 1 is a share of the records, 1 and above a count.

    A share too small for the data (it rounds to no record) or too large for it (it would leave none to train on)
    holds out nothing, and says so (unless `warn` is false: the preflight, which training follows); a count that
    leaves no training record is an error.
    """
    if val_size <= 0:
        return 0
    if val_size >= 1:
        count = int(val_size)
        if count >= total:
            raise UserError.one(
                f"data.val_size={count} holds out {count} records, and the data has {total}: none left to train on",
                fix=f"give a count below {total}, or a share such as 0.1"
                if total > 1
                else "add records, or set data.val_size: 0",
            )
        return count
    count = round(total * val_size)
    if 0 < count < total or not warn:
        return count if 0 < count < total else 0
    log.warning(
        "data.val_size=%g of %d records would hold out %d: holding out nothing, so no evaluation (a count such as "
        "data.val_size: 1 holds out that many)",
        val_size,
        total,
        count,
    )
    return 0


def held_out_positions(total: int, val_size: float, seed: int) -> list[int]:
    """The positions of the records held out of `total`: a seeded random draw, ascending."""
    return sorted(random.Random(seed).sample(range(total), held_out_count(total, val_size)))


def split_examples(examples: Sequence[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random draw, each side kept in file order."""
    held = set(held_out_positions(len(examples), val_size, seed))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def split_for_run(config: RunConfig, examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out) as a run makes them: data.eval_files when given, else val_size drawn from the examples."""
    if config.data.eval_files:
        separator = input_separator(config.data.template)
        held_out = read_examples(config.data.eval_files, config.data.format, separator, config.train.seed)
        return list(examples), held_out
    return split_examples(examples, config.data.val_size, config.train.seed)


def held_out_of_run(config: RunConfig, noun: str, held_out: Callable[[], list[Held]]) -> tuple[list[Held], str]:
    """What a finished run held out for evaluation (`held_out()`: the same split training made), and where it came
    from; a run that held out no `noun` (records, pairs) is a UserError that says to give them with --data."""
    fix = f"give {noun} to evaluate on with --data FILE"
    if not config.data.eval_files and config.data.val_size <= 0:
        raise UserError.one(
            f"this run has no held-out {noun}: it was trained without data.val_size or data.eval_files", fix=fix
        )
    chosen = held_out()
    if config.data.eval_files:
        return chosen, "data.eval_files: " + ", ".join(map(str, config.data.eval_files))
    if not chosen:
        raise UserError.one(
            f"data.val_size={config.data.val_size:g} held out no {noun.rstrip('s')} of this run's data "
            f"(too few {noun})",
            fix=fix,
        )
    return chosen, f"held out of data.files (val_size {config.data.val_size:g}, seed {config.train.seed})"
