"""Read and validate training records, every record checked before any model loads.

Files of any type (`data/files.py`: JSON, JSONL, CSV, TSV, Parquet, datasets folders) hold records of any format
(`data/formats.py`: alpaca, chat, sharegpt). Every record becomes an `Example`: a list of role/content messages plus
where it came from (file:line, or file:row), so that anything that goes wrong later can still point at the user's
record.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lowtune.config import BUILTIN_DATA_PREFIX, DataFile, RecordFormat
from lowtune.data.files import MISSING_FIX, file_type, read_file_records, records_folder
from lowtune.data.formats import Message, RecordError, to_messages
from lowtune.data.mix import draw
from lowtune.errors import Problem, UserError

__all__ = [
    "Example",
    "Message",
    "RecordError",
    "check_files_exist",
    "check_records",
    "file_conversations",
    "read_examples",
    "read_records",
    "resolve_data_path",
    "to_example",
]
MAX_REPORTED_PROBLEMS = 20
BUILTIN_DATASETS = {"huanhuan": "huanhuan.json"}


@dataclass(frozen=True)
class Example:
    """One training conversation; the replies of its assistant messages are what the model learns."""

    messages: tuple[Message, ...]
    source: str

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages[0].role == "system" else None


def resolve_data_path(name: str) -> Path:
    """Maps `builtin:NAME` onto the copy shipped inside the package; other names are plain paths."""
    if not name.startswith(BUILTIN_DATA_PREFIX):
        return Path(name)
    key = name[len(BUILTIN_DATA_PREFIX) :]
    if key not in BUILTIN_DATASETS:
        raise UserError.one(
            f"unknown built-in data set {name!r}",
            fix="built-in sets: " + ", ".join(BUILTIN_DATA_PREFIX + k for k in BUILTIN_DATASETS),
        )
    return Path(str(resources.files("lowtune.data") / "resources" / BUILTIN_DATASETS[key]))


def read_examples(
    files: Sequence[str | DataFile], fmt: RecordFormat = "auto", input_separator: str = "\n", seed: int = 0
) -> list[Example]:
    """Reads and validates every record of every file; raises one UserError listing all problems found.

    Args:
        files: paths (`builtin:NAME` for a bundled set), or DataFile entries that say how to read each.
        fmt: alpaca, chat, sharegpt, or auto (detected per record); for the files that do not state theirs.
        input_separator: how an alpaca record's `instruction` and non-empty `input` are joined into the user turn.
        seed: train.seed, for the files with a weight or samples (a mixture; see `data/mix.py`).
    """
    return _read(files, fmt, input_separator, seed, keep=True)[0]


def check_records(
    files: Sequence[str | DataFile], fmt: RecordFormat = "auto", input_separator: str = "\n", seed: int = 0
) -> int:
    """`read_examples` without keeping the records: every record of every file validated as it is read (a multi-GB
    file in little memory), each file's mixture drawn (a `samples` beyond the file is an error here too); returns
    how many records are drawn. `lowtune train` checks its data this way before torch is imported."""
    return _read(files, fmt, input_separator, seed, keep=False)[1]


def check_files_exist(files: Sequence[DataFile]) -> None:
    """Every data file is there (one UserError naming each missing one): checked before the tokenizer loads."""
    missing = []
    for entry in files:
        path = records_folder(resolve_data_path(entry.path), entry.type)  # a folder: checked here
        if file_type(path, entry.type) != "datasets" and not path.is_file():
            missing.append(Problem("data file not found", path, fix=MISSING_FIX))
    if missing:
        raise UserError(missing)


def _read(
    files: Sequence[str | DataFile], fmt: RecordFormat, input_separator: str, seed: int, keep: bool
) -> tuple[list[Example], int]:
    """(the drawn examples, or none unless `keep`; how many were drawn)."""
    examples: list[Example] = []
    problems: list[Problem] = []
    drawn = 0
    for place, entry in enumerate(files):
        file = DataFile.model_validate(entry)
        path, conversations = file_conversations(file, fmt, input_separator, problems)
        if keep:
            found = [Example(messages, f"{path}:{line}") for messages, line in conversations]
            total = len(found)
        else:
            total = sum(1 for _ in conversations)
        if not problems:
            indices = draw(file, str(path), total, seed, place).indices
            drawn += len(indices)
            if keep:
                examples += [found[i] for i in indices.tolist()]
    if problems:
        raise UserError(problems)
    if not drawn:
        names = ", ".join(str(entry) for entry in files)
        raise UserError.one("no training records in " + names, fix="give at least one record")
    return examples, drawn


def file_conversations(
    file: DataFile, fmt: RecordFormat, input_separator: str, problems: list[Problem]
) -> tuple[Path, Iterator[tuple[tuple[Message, ...], int]]]:
    """Where the records of one file are (checked to exist), and its (messages, line) pairs as they are read.

    Bad records go to `problems` instead (reading stops with a UserError at MAX_REPORTED_PROBLEMS).
    """
    path = records_folder(resolve_data_path(file.path), file.type)
    return path, _conversations(path, file, file.format if file.format != "auto" else fmt, input_separator, problems)


def _conversations(
    path: Path, file: DataFile, record_format: RecordFormat, input_separator: str, problems: list[Problem]
) -> Iterator[tuple[tuple[Message, ...], int]]:
    for line, record in read_file_records(path, file.type, file.columns):
        try:
            yield tuple(to_messages(record, record_format, input_separator, file.columns, file.roles)), line
        except RecordError as error:
            problems.append(Problem(error.message, path, line, error.fix))
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            problems.append(Problem(f"stopped after {MAX_REPORTED_PROBLEMS} problems", path))
            raise UserError(problems)


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yields (number, record) for each record of a data file of any supported type (see `data/files.py`)."""
    yield from read_file_records(Path(path))


def to_example(record: Any, fmt: RecordFormat, source: str, input_separator: str) -> Example:
    """One record (alpaca, chat or sharegpt; auto: detected from its keys) as an Example; raises RecordError."""
    return Example(tuple(to_messages(record, fmt, input_separator)), source)
