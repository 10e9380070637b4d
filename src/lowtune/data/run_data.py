"""The data of a run, in one streaming pass per file: read, validate, encode (or read back from the cache), draw the
mixture, hold records out, and cut the training rows.

Records are never all held as Python objects: each file's records go from the reader to the tokenizer a batch at a
time and into numpy arrays (`data/encoded.py`), so memory grows with the tokens, not with the records' text. The few
records shown as text later (the report's samples) are read again from their files by line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from lowtune.config import DataFile, RecordFormat, RunConfig
from lowtune.data import cache
from lowtune.data.encode import EncodedData, training_data
from lowtune.data.encoded import EncodedSet, Records, Rows, encode_conversations
from lowtune.data.mix import Mixture, draw
from lowtune.data.read import Example, file_conversations
from lowtune.data.split import held_out_positions
from lowtune.data.templates import ChatFormat, input_separator
from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)


@dataclass
class DrawnFiles:
    """The records drawn from a list of files, and the cache entries to write once the whole run's data is valid."""

    records: Records
    mixture: Mixture
    to_cache: list[tuple[str, EncodedSet, Path]]

    def save_to_cache(self) -> None:
        for key, encoded, path in self.to_cache:
            cache.save(key, encoded, path)
        self.to_cache = []


def read_files(
    files: Sequence[DataFile], fmt: RecordFormat, separator: str, chat_format: ChatFormat, max_length: int, seed: int
) -> DrawnFiles:
    """Every file encoded (or read from the cache) and drawn as its weight or samples say; one UserError for every
    bad record of every file."""
    problems: list[Problem] = []
    sets, drawn, to_cache = [], [], []
    for place, entry in enumerate(files):
        encoded, key, path = _encoded_file(entry, fmt, separator, chat_format, max_length, problems)
        if problems:
            continue
        if key is not None:
            to_cache.append((key, encoded, path))
        sets.append(encoded.named(str(path), (entry, fmt, separator)))
        drawn.append(draw(entry, str(path), len(encoded), seed, place))
    if problems:
        raise UserError(problems)
    records = Records([(each, choice.indices) for each, choice in zip(sets, drawn, strict=True)])
    if not len(records):
        names = ", ".join(str(entry) for entry in files)
        raise UserError.one("no training records in " + names, fix="give at least one record")
    return DrawnFiles(records, Mixture(tuple(drawn)), to_cache)


def read_run_files(config: RunConfig, files: Sequence[DataFile], chat_format: ChatFormat) -> DrawnFiles:
    """read_files as the run's config says (its data.files or data.eval_files)."""
    data = config.data
    separator = input_separator(data.template)
    return read_files(files, data.format, separator, chat_format, data.max_length, config.train.seed)


def _encoded_file(
    entry: DataFile,
    fmt: RecordFormat,
    separator: str,
    chat_format: ChatFormat,
    max_length: int,
    problems: list[Problem],
) -> tuple[EncodedSet, str | None, Path]:
    """(the file's encoded set, the cache key to write it under or None, its path)."""
    path, conversations = file_conversations(entry, fmt, separator, problems)
    key = None
    if cache.cacheable(path):
        record_format = entry.format if entry.format != "auto" else fmt
        reading = {"type": entry.type, "format": record_format, "columns": entry.columns, "roles": entry.roles}
        reading["separator"] = separator
        key = cache.entry_key(cache.file_digest(path), reading, chat_format, max_length)
        cached = cache.load(key)
        if cached is not None:
            return cached, None, path
    return encode_conversations(conversations, chat_format, max_length).build(), key, path


@dataclass
class RunData:
    """What a run trains and evaluates on."""

    records: Records  # every record drawn from data.files (held-out ones too), in file order
    mixture: Mixture
    held_out: Records
    train: EncodedData
    held_out_rows: Rows | list


def prepare_data(config: RunConfig, chat_format: ChatFormat) -> RunData:
    """data.files read and drawn, records held out (data.eval_files, or val_size of them), the training rows cut;
    the cache entries are written only once all of it is valid."""
    data = config.data
    drawn = read_run_files(config, data.files, chat_format)
    drawn.mixture.log()
    train, held_out, evaluation = split_run_records(config, drawn, chat_format)
    encoded = training_data(train, data.max_length, data.truncation)
    held_out_rows = training_data(held_out, data.max_length).rows if len(held_out) else []
    for each in (drawn, evaluation):
        if each is not None:
            each.save_to_cache()
    return RunData(drawn.records, drawn.mixture, held_out, encoded, held_out_rows)


def split_run_records(
    config: RunConfig, drawn: DrawnFiles, chat_format: ChatFormat
) -> tuple[Records, Records, DrawnFiles | None]:
    """(train, held out, the eval files read or None) as a run splits the records drawn from data.files: the
    records of data.eval_files when given, else val_size of them drawn with train.seed (`split.split_examples`'s
    draw). `lowtune data inspect` makes the same split."""
    data = config.data
    if data.eval_files:
        evaluation = read_run_files(config, data.eval_files, chat_format)
        return drawn.records, evaluation.records, evaluation
    held = np.zeros(len(drawn.records), dtype=np.bool_)
    held[held_out_positions(len(drawn.records), data.val_size, config.train.seed)] = True
    return drawn.records.where(~held), drawn.records.where(held), None


def first_examples(records: Records, count: int) -> list[Example]:
    """The first `count` records as Examples (messages), read again from their files by line."""
    wanted = list(islice(records, count))
    found: dict[tuple[int, int], Example] = {}
    for each in {id(each): each for each, _ in wanted}.values():
        needed = {int(each.lines[index]) for other, index in wanted if other is each}
        if isinstance(each.origin, list):  # the Examples the set was encoded from (the Python API): no file to read
            continue
        entry, fmt, separator = each.origin
        path, conversations = file_conversations(entry, fmt, separator, [])
        for messages, line in conversations:
            if line in needed:
                found[id(each), line] = Example(messages, f"{path}:{line}")
                needed.discard(line)
                if not needed:
                    break
    return [
        each.origin[index] if isinstance(each.origin, list) else found[id(each), int(each.lines[index])]
        for each, index in wanted
    ]
