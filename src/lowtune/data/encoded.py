"""Encoded records held as numpy arrays, and the views training takes of them.

A file's records, once encoded, are a few flat arrays (`EncodedSet`): every record's token ids one after another
(uint16 where the vocabulary fits, else uint32), a flag per token saying whether it is trained, and offsets. A
million short records take a few hundred MB this way, where lists of Python ints took over 5 GB. `Records` picks
records out of one or more sets (a mixture, a split) without copying them; `Rows` shows records as the rows the
collators and the trainer index (`{"input_ids", "attention_mask", "labels"}` lists), built when asked for.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lowtune.data.formats import Message
from lowtune.data.templates import IGNORE_INDEX, ChatFormat

ENCODE_BATCH = 256  # conversations per tokenizer call
Row = dict[str, list[int]]


@dataclass
class EncodedSet:
    """The encoded records of one source, cut to `max_length`; arrays named by what they hold per token or record."""

    ids: np.ndarray  # (tokens,) uint16 | uint32: the records' ids, one record after another
    trained: np.ndarray  # (tokens,) bool: the token is a target (its label is its id, else IGNORE_INDEX)
    offsets: np.ndarray  # (records + 1,) int64: record i is ids[offsets[i] : offsets[i + 1]]
    full_lengths: np.ndarray  # (records,) int32: token count before the cut
    trained_counts: np.ndarray  # (records,) int32: trained tokens after the cut (0: the record is dropped)
    digests: np.ndarray  # (records,) uint64: of the record's messages; exact duplicates share one
    lines: np.ndarray  # (records,) int64: the record's line (or row) in `file`
    file: str = ""  # what sources are named after: file:line
    names: list[str] | None = field(default=None, repr=False)  # sources that are not file:line (the Python API)
    origin: Any = field(default=None, repr=False)  # how to read the records again (`data/run_data.py`), or a list
    # of the Examples they were encoded from (the Python API)

    ARRAYS = ("ids", "trained", "offsets", "full_lengths", "trained_counts", "digests", "lines")

    def __len__(self) -> int:
        return len(self.full_lengths)

    def source(self, index: int) -> str:
        return self.names[index] if self.names is not None else f"{self.file}:{self.lines[index]}"

    def place(self, index: int) -> tuple[str, int | None]:
        """(file, line) of a record, as a Problem locates it."""
        if self.names is None:
            return self.file, int(self.lines[index])
        file, _, line = self.names[index].rpartition(":")
        return (file, int(line)) if line.isdigit() else (self.names[index], None)

    def row(self, index: int) -> Row:
        start, end = self.offsets[index], self.offsets[index + 1]
        ids = self.ids[start:end].astype(np.int64)
        labels = np.where(self.trained[start:end], ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()}

    def lengths(self) -> np.ndarray:
        """(records,) token count of each record after the cut."""
        return np.diff(self.offsets)

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.ARRAYS)

    def named(self, file: str, origin: Any = None) -> EncodedSet:
        return replace(self, file=file, origin=origin)


def digest_of(messages: Sequence[Message]) -> int:
    """A stable 64-bit digest of a conversation (the same in every process, unlike `hash`)."""
    text = "\x1e".join(f"{message.role}\x1f{message.content}" for message in messages)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class SetBuilder:
    """Grows an EncodedSet a record at a time in compact buffers (`array`: no Python int kept per token)."""

    def __init__(self, vocab_size: int, max_length: int):
        self.max_length = max_length
        self.id_code = "H" if vocab_size <= 1 << 16 else "I"
        self.ids, self.trained = array(self.id_code), bytearray()
        self.ends, self.full_lengths, self.trained_counts = array("q"), array("i"), array("i")
        self.digests, self.lines = array("Q"), array("q")

    def add(self, ids: list[int], flags: bytes | bytearray, digest: int, line: int) -> None:
        """One record: its ids and a byte a token (1: trained), before the cut to max_length."""
        self.full_lengths.append(len(ids))
        ids, flags = ids[: self.max_length], flags[: self.max_length]
        self.ids.extend(ids)
        self.trained += flags
        self.ends.append(len(self.ids))
        self.trained_counts.append(flags.count(1))
        self.digests.append(digest)
        self.lines.append(line)

    def build(self, file: str = "", names: list[str] | None = None) -> EncodedSet:
        offsets = np.zeros(len(self.ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self.ends, dtype=np.int64)
        return EncodedSet(
            ids=np.frombuffer(self.ids, dtype=np.uint16 if self.id_code == "H" else np.uint32),
            trained=np.frombuffer(self.trained, dtype=np.bool_),
            offsets=offsets,
            full_lengths=np.frombuffer(self.full_lengths, dtype=np.int32),
            trained_counts=np.frombuffer(self.trained_counts, dtype=np.int32),
            digests=np.frombuffer(self.digests, dtype=np.uint64),
            lines=np.frombuffer(self.lines, dtype=np.int64),
            file=file,
            names=names,
        )


def encode_conversations(
    conversations: Iterable[tuple[Sequence[Message], int]],
    chat_format: ChatFormat,
    max_length: int,
    last_reply_only: bool = False,
) -> SetBuilder:
    """Encodes (messages, line) pairs as they come, a batch per tokenizer call, into a SetBuilder; with
    `last_reply_only` (preference pairs) only the final reply is trained, not the replies of the history."""
    builder = SetBuilder(len(chat_format.tokenizer), max_length)
    batch: list[tuple[Sequence[Message], int]] = []

    def flush() -> None:
        encoded = chat_format.encode_flags([messages for messages, _ in batch])
        for (messages, line), (ids, flags) in zip(batch, encoded, strict=True):
            builder.add(ids, _last_reply(flags) if last_reply_only else flags, digest_of(messages), line)
        batch.clear()

    for item in conversations:
        batch.append(item)
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()
    return builder


def _last_reply(flags: bytearray) -> bytearray:
    """Only the last run of trained tokens (the final reply) stays trained."""
    end = flags.rfind(1) + 1
    start = flags.rfind(0, 0, end) + 1
    return bytearray(start) + flags[start:]


@dataclass
class Records:
    """Records picked out of encoded sets, in order: (set, indices of its records) parts, nothing copied."""

    parts: list[tuple[EncodedSet, np.ndarray]]

    @classmethod
    def whole(cls, sets: Sequence[EncodedSet]) -> Records:
        return cls([(each, np.arange(len(each))) for each in sets])

    def __len__(self) -> int:
        return sum(len(indices) for _, indices in self.parts)

    def __iter__(self) -> Iterator[tuple[EncodedSet, int]]:
        for each, indices in self.parts:
            for index in indices.tolist():
                yield each, index

    def per_record(self, name: str) -> np.ndarray:
        """(records,) one per-record array of the sets (full_lengths, trained_counts, digests), for these records."""
        values = [getattr(each, name)[indices] for each, indices in self.parts]
        return np.concatenate(values) if values else np.zeros(0, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        values = [each.lengths()[indices] for each, indices in self.parts]
        return np.concatenate(values) if values else np.zeros(0, dtype=np.int64)

    def where(self, keep: np.ndarray) -> Records:
        """The records whose flag in `keep` ((records,) bool, in this order) is set."""
        parts, start = [], 0
        for each, indices in self.parts:
            parts.append((each, indices[keep[start : start + len(indices)]]))
            start += len(indices)
        return Records(parts)

    def take(self, positions: Sequence[int] | np.ndarray) -> Records:
        """The records at these positions of this sequence (in this sequence's order, whatever theirs)."""
        keep = np.zeros(len(self), dtype=np.bool_)
        keep[np.asarray(positions, dtype=np.int64)] = True
        return self.where(keep)

    def sources(self, keep: np.ndarray | None = None) -> list[str]:
        """file:line of every record (of those flagged in `keep`)."""
        chosen = self if keep is None else self.where(keep)
        return [each.source(index) for each, index in chosen]

    def rows(self) -> Rows:
        return Rows(self)


class Rows(Sequence[Row]):
    """The records as training rows, each built when indexed: what `Trainer`, the collators and eval_loss take."""

    def __init__(self, records: Records):
        self.records = records
        self._sets = [each for each, _ in records.parts]
        self._indices = [indices for _, indices in records.parts]
        self._starts = np.cumsum([0] + [len(indices) for indices in self._indices])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        part = int(np.searchsorted(self._starts, position, side="right")) - 1
        return self._sets[part].row(int(self._indices[part][position - self._starts[part]]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def nbytes(self) -> int:
        """Memory the rows hold: their sets' arrays (shared by every view of them) and the selected indices."""
        unique = {id(each): each for each in self._sets}
        return sum(each.nbytes() for each in unique.values()) + sum(indices.nbytes for indices in self._indices)
