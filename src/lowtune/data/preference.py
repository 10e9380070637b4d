"""Preference records ({prompt | messages, chosen, rejected}) for DPO and ORPO: read, validated, encoded as pairs.

A record's prompt is a string (`prompt`, with an optional `system`) or the conversation before the reply (`messages`,
role/content turns ending with the user's); `chosen` and `rejected` are the two replies, each a string, an assistant
message, or a list of one assistant message (TRL's conversational layout). Records come through the same readers as
training records (`data/files.py`: JSON, JSONL, CSV, TSV, Parquet, datasets folders), every problem named by file and
line. A pair is encoded as two sequences in the run's chat format, the prompt masked and only the final reply
trained, each cut to data.max_length; sequence 2i is pair i's chosen reply, 2i + 1 its rejected one. The pairs are
held in memory as Python objects: preference sets are small beside SFT sets, so they skip the encoded-set cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from lowtune.config import DataFile, RunConfig
from lowtune.data.encoded import Records, Rows, encode_conversations
from lowtune.data.files import read_file_records, records_folder
from lowtune.data.formats import ROLES, Message, RecordError, check_turn_order
from lowtune.data.mix import Mixture, draw
from lowtune.data.read import MAX_REPORTED_PROBLEMS, Example, resolve_data_path
from lowtune.data.split import held_out_positions
from lowtune.data.templates import ChatFormat
from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)
PREFERENCE_FIX = 'write {"prompt": "...", "chosen": "the better reply", "rejected": "the worse reply"}'
SFT_RECORD_FIX = "give preference records {prompt | messages, chosen, rejected}, or set train.method: sft"
REPLY_KEYS = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    """One preference record: the conversation before the reply, the preferred reply and the other one."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str  # file:line

    def conversations(self) -> tuple[Example, Example]:
        return (
            Example((*self.prompt, Message("assistant", self.chosen)), self.source),
            Example((*self.prompt, Message("assistant", self.rejected)), self.source),
        )


def is_preference_record(record: Any) -> bool:
    return isinstance(record, dict) and all(key in record for key in REPLY_KEYS)


def to_pair(record: Any, source: str) -> Pair:
    """One preference record, validated; raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, found {type(record).__name__}", PREFERENCE_FIX)
    if not is_preference_record(record):
        missing = " and ".join(repr(key) for key in REPLY_KEYS if key not in record)
        looks_sft = any(key in record for key in ("instruction", "output", "conversations")) or "messages" in record
        what = "an SFT record" if looks_sft else "not a preference record"
        raise RecordError(f"{what}: missing {missing} (train.method dpo or orpo)", SFT_RECORD_FIX)
    prompt = _prompt(record)
    chosen, rejected = (_reply(record[key], key) for key in REPLY_KEYS)
    check_turn_order([*prompt, Message("assistant", chosen)])
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are the same reply: the pair teaches nothing", "drop the record")
    return Pair(prompt, chosen, rejected, source)


def _prompt(record: dict[str, Any]) -> tuple[Message, ...]:
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("'system' must be a string", "write it as text")
    if "messages" in record:
        if "prompt" in record:
            raise RecordError("both 'prompt' and 'messages': the prompt is said twice", "keep one of them")
        messages = _messages(record["messages"])
        if system and messages[0].role == "system":
            raise RecordError("two system prompts: 'system' and a system turn", "keep one of them")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = (Message("user", record["prompt"]),)
    else:
        found = "an empty 'prompt'" if "prompt" in record else "no 'prompt' or 'messages'"
        raise RecordError(f"{found}: a preference record needs the prompt its replies answer", PREFERENCE_FIX)
    return ((Message("system", system),) if system else ()) + messages


def _messages(raw: Any) -> tuple[Message, ...]:
    fix = 'write messages as the turns before the reply: [{"role": "user", "content": "..."}, ...]'
    if not isinstance(raw, list) or not raw:
        raise RecordError("'messages' must be a non-empty list of {role, content}", fix)
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            raise RecordError(f"messages[{index}] must be {{role: system, user or assistant, content: text}}", fix)
        messages.append(Message(item["role"], item["content"]))
    if messages[-1].role != "user":
        raise RecordError("'messages' must end with the user's turn: the replies are chosen and rejected", fix)
    return tuple(messages)


def _reply(value: Any, key: str) -> str:
    """A reply given as text, as an assistant message, or as a list of one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise RecordError(
                f"{key!r} must be the assistant's reply, found role {value.get('role')!r}", PREFERENCE_FIX
            )
        value = value.get("content")
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string or an assistant message", PREFERENCE_FIX)
    if not value.strip():
        raise RecordError(f"empty {key!r} reply", "fill it or drop the record")
    return value


def file_pairs(entry: DataFile, problems: list[Problem]) -> Iterator[Pair]:
    """The pairs of one file as they are read; bad records go to `problems` (reading stops at MAX_REPORTED_PROBLEMS)."""
    path = records_folder(resolve_data_path(entry.path), entry.type)
    if entry.columns or entry.roles or entry.format != "auto":
        problems.append(
            Problem("columns, roles and format apply to SFT records", path, fix="drop them from this data.files entry")
        )
        return
    for line, record in read_file_records(path, entry.type):
        try:
            yield to_pair(record, f"{path}:{line}")
        except RecordError as error:
            problems.append(Problem(error.message, path, line, error.fix))
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            problems.append(Problem(f"stopped after {MAX_REPORTED_PROBLEMS} problems", path))
            raise UserError(problems)


def read_pairs(files: Sequence[str | DataFile], seed: int) -> tuple[list[Pair], Mixture]:
    """Every file's pairs, drawn as its weight or samples say; one UserError for every bad record of every file."""
    problems: list[Problem] = []
    pairs: list[Pair] = []
    drawn = []
    for place, given in enumerate(files):
        entry = DataFile.model_validate(given)
        found = list(file_pairs(entry, problems))
        if problems:
            continue
        choice = draw(entry, str(resolve_data_path(entry.path)), len(found), seed, place)
        drawn.append(choice)
        pairs += [found[i] for i in choice.indices.tolist()]
    if problems:
        raise UserError(problems)
    if not pairs:
        raise UserError.one("no preference records in " + ", ".join(map(str, files)), fix="give at least one record")
    return pairs, Mixture(tuple(drawn))


@dataclass
class PreferenceData:
    """Encoded pairs: `rows[2i]` is pair i's chosen sequence, `rows[2i + 1]` its rejected one."""

    pairs: list[Pair]
    rows: Rows
    truncated: int  # sequences cut by max_length
    dropped: list[str]  # sources of pairs with a reply left with no trained token

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair (chosen + rejected): what a micro-batch's budget and the memory plan count."""
        each = self.rows.records.lengths()
        return (each[0::2] + each[1::2]).tolist()

    @property
    def trained_tokens(self) -> int:
        return int(self.rows.records.per_record("trained_counts").sum())

    def chosen(self) -> Records:
        """The chosen conversations (prompt and preferred reply): the report's samples and length figures."""
        records = self.rows.records
        return records.where(np.arange(len(records)) % 2 == 0)


def encode_pairs(
    pairs: Sequence[Pair], chat_format: ChatFormat, max_length: int, truncation: str = "cut"
) -> PreferenceData:
    """Both sequences of every pair in the run's chat format, only the final reply trained; a pair with a reply left
    with no trained token by the cut is dropped and counted (with truncation "error", a long one is refused)."""
    examples = [example for pair in pairs for example in pair.conversations()]
    builder = encode_conversations(((e.messages, 0) for e in examples), chat_format, max_length, last_reply_only=True)
    encoded = builder.build(names=[e.source for e in examples])
    encoded.origin = examples
    too_long = (encoded.full_lengths > max_length).reshape(-1, 2).any(axis=1)
    if truncation == "error" and too_long.any():
        problems = [
            Problem(f"a reply of this pair is longer than data.max_length={max_length} tokens", *_place(pair.source))
            for pair in [pair for pair, long in zip(pairs, too_long.tolist(), strict=True) if long][
                :MAX_REPORTED_PROBLEMS
            ]
        ]
        problems[-1].fix = "raise data.max_length, shorten those records, or set data.truncation: cut"
        raise UserError(problems)
    kept = (encoded.trained_counts > 0).reshape(-1, 2).all(axis=1)
    dropped = [pair.source for pair, keep in zip(pairs, kept.tolist(), strict=True) if not keep]
    if dropped:
        log.warning(
            "%d pairs dropped: a reply has no token left within max_length=%d (first: %s)",
            len(dropped),
            max_length,
            dropped[0],
        )
    if not kept.any():
        raise UserError.one(
            f"every pair was dropped: none fits data.max_length={max_length}", fix="raise data.max_length"
        )
    records = Records([(encoded, np.flatnonzero(np.repeat(kept, 2)))])
    kept_pairs = [pair for pair, keep in zip(pairs, kept.tolist(), strict=True) if keep]
    return PreferenceData(kept_pairs, records.rows(), int((encoded.full_lengths > max_length).sum()), dropped)


def _place(source: str) -> tuple[str, int | None]:
    file, _, line = source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (source, None)


@dataclass
class PreferenceRunData:
    """What a preference run trains and evaluates on."""

    train: PreferenceData
    held_out: PreferenceData | None
    mixture: Mixture


def prepare_preference_data(config: RunConfig, chat_format: ChatFormat) -> PreferenceRunData:
    """data.files read as pairs, pairs held out (data.eval_files, or val_size of them drawn with train.seed), both
    sides encoded."""
    data = config.data
    pairs, held_out, mixture = split_pairs(config)
    mixture.log()
    train = encode_pairs(pairs, chat_format, data.max_length, data.truncation)
    evaluation = encode_pairs(held_out, chat_format, data.max_length) if held_out else None
    return PreferenceRunData(train, evaluation, mixture)


def split_pairs(config: RunConfig) -> tuple[list[Pair], list[Pair], Mixture]:
    """The run's pairs to train on and to hold out (data.eval_files, or val_size of data.files drawn with
    train.seed: `lowtune eval` finds the same held-out pairs), and how data.files were drawn."""
    data = config.data
    pairs, mixture = read_pairs(data.files, config.train.seed)
    if data.eval_files:
        return pairs, read_pairs(data.eval_files, config.train.seed)[0], mixture
    held = set(held_out_positions(len(pairs), data.val_size, config.train.seed))
    return (
        [pair for i, pair in enumerate(pairs) if i not in held],
        [pair for i, pair in enumerate(pairs) if i in held],
        mixture,
    )


def is_pair_file(path: Path) -> bool:
    """Whether a data file holds preference records (its first record says: `lowtune eval --data` takes either)."""
    path = records_folder(resolve_data_path(str(path)))
    return any(is_preference_record(record) for _, record in islice(read_file_records(path), 1))


def check_pair_files(files: Sequence[str | DataFile], seed: int) -> int:
    """Every preference record of `files` validated (the preflight, before torch loads); returns how many are drawn."""
    return len(read_pairs(files, seed)[0])


class PairRows(Sequence[dict[str, Any]]):
    """The sequences of encoded pairs as training rows, each with its reference log-probability once it is known
    (DPO: `reference_logp`, which the preference collator batches)."""

    def __init__(self, rows: Rows, reference: np.ndarray | None = None):
        self.rows, self.reference = rows, reference

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        row: dict[str, Any] = self.rows[position]
        return row if self.reference is None else row | {"reference_logp": float(self.reference[position])}
